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
    // The last certificate is the root tunnels trust; the others go after each leaf. A root
    // staged for rotation and the roots retired by one are trusted beside it.
    let root = blocks.len() - 1;
    let mut bundle_pem = vec![blocks[root].clone()];
    for extra in [dir.join(NEXT).join("ca.pem"), dir.join(RETIRED)] {
        if extra.exists() {
            check_file(&extra, Exposure::Trusted)?;
            for block in certificate_blocks(&read(&extra)?) {
                if !bundle_pem.contains(&block) {
                    bundle_pem.push(block);
                }
            }
        }
    }
    Ok((
        Material {
            issuer,
            chain_pem: blocks[..root].to_vec(),
            bundle_pem,
        },
        created,
    ))
}

/// Where a new root waits, trusted but not signing yet.
const NEXT: &str = "next";
/// Roots that signed before a rotation: trusted until the certificates they signed expire.
const RETIRED: &str = "retired.pem";

/// Rotation, step 1: a new root in `next/` of `dir`. The CA trusts it at once (tunnels get it
/// in their bundle) but signs with the current key until [`promote`].
pub fn stage_root(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
    let next = dir.join(NEXT);
    if next.exists() {
        return Err(CaError::BadFile {
            path: next,
            reason: "a new root is staged already: promote it, or remove the folder".into(),
        });
    }
    std::fs::create_dir(&next).map_err(|source| CaError::Write {
        path: next.clone(),
        source,
    })?;
    create_root(&next.join("ca.pem"), &next.join("ca.key"), trust_domain)
}

/// Rotation, step 2, once every tunnel has the bundle with the new root: the new root signs;
/// the old one is kept trusted in `retired.pem`. Only for a root the CA made (a user's
/// intermediate is rotated by replacing `ca.pem` and `ca.key` with the new one).
pub fn promote(dir: &Path) -> Result<(), CaError> {
    let next = dir.join(NEXT);
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if !next.join("ca.pem").exists() || !next.join("ca.key").exists() {
        return Err(CaError::BadFile {
            path: next,
            reason: "no staged root to promote (stage one first)".into(),
        });
    }
    let current = read(&cert)?;
    if certificate_blocks(&current).len() != 1 {
        return Err(CaError::BadFile {
            path: cert,
            reason: "holds a chain: the CA signs as a user's intermediate, which is rotated by replacing ca.pem and ca.key".into(),
        });
    }
    // The old root stays trusted before anything else changes.
    let retired = dir.join(RETIRED);
    let mut kept = if retired.exists() {
        read(&retired)?
    } else {
        String::new()
    };
    kept.push_str(&current);
    write_atomically(&retired, kept.as_bytes())?;
    // The key first, then the certificate: in between, the CA finds them apart and keeps
    // signing with what it loaded before.
    for (from, to) in [(next.join("ca.key"), key), (next.join("ca.pem"), cert)] {
        std::fs::rename(&from, &to).map_err(|source| CaError::Write { path: to, source })?;
    }
    std::fs::remove_dir(&next).map_err(|source| CaError::Write { path: next, source })
}

/// Rotation, step 3, once the certificates the old roots signed have expired (a certificate
/// lifetime after [`promote`]): they are no longer trusted.
pub fn retire(dir: &Path) -> Result<bool, CaError> {
    let retired = dir.join(RETIRED);
    match std::fs::remove_file(&retired) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CaError::Write {
            path: retired,
            source,
        }),
    }
}

/// What changes when the CA's files change: their sizes and modification times.
pub fn fingerprint(dir: &Path) -> Vec<Option<(u64, std::time::SystemTime)>> {
    ["ca.pem", "ca.key", "next/ca.pem", RETIRED]
        .iter()
        .map(|name| {
            let meta = std::fs::metadata(dir.join(name)).ok()?;
            Some((meta.len(), meta.modified().ok()?))
        })
        .collect()
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<(), CaError> {
    let failed = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, data).map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)
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
