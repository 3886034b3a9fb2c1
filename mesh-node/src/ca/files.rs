//! The CA's key material on disk: `ca.pem` (the CA's certificate, then the intermediates above
//! it, then the root) and `ca.key` (its key: mode 0600, refused when others can read it). A
//! root is created when neither exists; one without the other is refused, never overwritten.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tunnel_proto::file_trust::{Exposure, check_file, write_secret};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::CaError;

/// Whether the CA's files were there or made now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Loaded from existing files.
    Loaded,
    /// Neither file existed: a new root was written.
    NewRoot,
}

/// What [`load_or_create`] reads.
pub(super) struct Material {
    pub issuer: Issuer<'static, KeyPair>,
    pub chain_pem: Vec<String>,
    pub bundle_pem: Vec<String>,
}

/// A new root lives this long; what it signs lives hours.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub(super) fn load_or_create(
    dir: &Path,
    trust_domain: &str,
) -> Result<(Material, Created), CaError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    let created = match (cert_path.exists(), key_path.exists()) {
        (false, false) => {
            create_root(&cert_path, &key_path, trust_domain)?;
            Created::NewRoot
        }
        (true, true) => Created::Loaded,
        (has_cert, _) => {
            let (missing, present) = if has_cert {
                (&key_path, &cert_path)
            } else {
                (&cert_path, &key_path)
            };
            return Err(CaError::BadFile {
                path: missing.clone(),
                reason: format!(
                    "missing, while {} exists: the certificate and key go together (restore it, or remove both to start a new root)",
                    present.display()
                ),
            });
        }
    };
    // The key signs every identity of the mesh: ours alone. The certificates are the trust
    // anchor: no one else may swap them.
    check_file(&key_path, Exposure::Secret)?;
    check_file(&cert_path, Exposure::Trusted)?;
    let bad_cert = |reason: String| CaError::BadFile {
        path: cert_path.clone(),
        reason,
    };
    let cert_text = read(&cert_path)?;
    let blocks = certificate_blocks(&cert_text);
    let ders: Vec<Vec<u8>> = rustls_pemfile::certs(&mut cert_text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_cert(e.to_string()))?
        .into_iter()
        .map(|der| der.to_vec())
        .collect();
    if ders.is_empty() || ders.len() != blocks.len() {
        return Err(bad_cert("no readable CERTIFICATE block".into()));
    }
    let (_, ca_cert) = X509Certificate::from_der(&ders[0]).map_err(|e| bad_cert(e.to_string()))?;
    let is_ca = ca_cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(bad_cert(
            "the first certificate is not a CA certificate (basic constraints CA:TRUE)".into(),
        ));
    }
    let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| CaError::BadFile {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    if key.public_key_raw() != ca_cert.public_key().subject_public_key.data.as_ref() {
        return Err(CaError::BadFile {
            path: key_path.clone(),
            reason: format!(
                "is not the key of the first certificate in {}",
                cert_path.display()
            ),
        });
    }
    let issuer = Issuer::from_ca_cert_der(&ders[0].as_slice().into(), key)
        .map_err(|e| bad_cert(e.to_string()))?;
    // The last certificate is the root tunnels trust; the others go after each leaf.
    let root = blocks.len() - 1;
    Ok((
        Material {
            issuer,
            chain_pem: blocks[..root].to_vec(),
            bundle_pem: vec![blocks[root].clone()],
        },
        created,
    ))
}

/// A self-signed root that may sign workload certificates and nothing else (path length 0).
fn create_root(cert_path: &Path, key_path: &Path, trust_domain: &str) -> Result<(), CaError> {
    let failed = |e: rcgen::Error| CaError::Signing(e.to_string());
    let key = KeyPair::generate().map_err(failed)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(
        DnType::OrganizationName,
        format!("Weft mesh CA ({trust_domain})"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    let cert = params.self_signed(&key).map_err(failed)?;
    // The key first: a certificate without its key would stop the next start.
    write_secret(key_path, key.serialize_pem().as_bytes()).map_err(|source| CaError::Write {
        path: key_path.to_owned(),
        source,
    })?;
    std::fs::write(cert_path, cert.pem()).map_err(|source| CaError::Write {
        path: cert_path.to_owned(),
        source,
    })
}

/// Each `CERTIFICATE` PEM block of `text`, as written.
fn certificate_blocks(text: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let end = start + len + END.len();
        blocks.push(format!("{}\n", &rest[start..end]));
        rest = &rest[end..];
    }
    blocks
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}
