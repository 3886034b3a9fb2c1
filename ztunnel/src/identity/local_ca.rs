//! A certificate authority whose root certificate and key are files on disk, signing in the
//! process: for tests and the fuzzer only. The tunnel binary has no flag that loads it (its
//! certificates come from the mesh CA, `MeshCaClient`), so no tunnel holds a signing key.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use tunnel_proto::file_trust::{Exposure, check_file, write_secret};

use super::{CertificateError, CertificateProvider, Identity, WorkloadCertificate};

/// Signs workload certificates with a root key read from a file.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    root_der: CertificateDer<'static>,
    lifetime: Duration,
    crypto: Arc<CryptoProvider>,
}

/// Allows for clocks that differ slightly between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

impl LocalCa {
    /// The root, for a trust bundle.
    pub fn root(&self) -> CertificateDer<'static> {
        self.root_der.clone()
    }

    /// Loads the root certificate and key (PEM) the CA signs with.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        lifetime: Duration,
        crypto: Arc<CryptoProvider>,
    ) -> Result<Self, CertificateError> {
        // The key signs every identity of the mesh: it must be ours alone; the root is the
        // trust bundle: no one else may swap it.
        check_file(key_path, Exposure::Secret)?;
        check_file(cert_path, Exposure::Trusted)?;
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CertificateError::BadPem {
            path: key_path.to_owned(),
            what: "private key",
            reason: e.to_string(),
        })?;
        let root_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| CertificateError::BadPem {
                path: cert_path.to_owned(),
                what: "certificate",
                reason: "no PEM CERTIFICATE block".into(),
            })?;
        let issuer =
            Issuer::from_ca_cert_der(&root_der, key).map_err(|e| CertificateError::BadPem {
                path: cert_path.to_owned(),
                what: "CA certificate",
                reason: e.to_string(),
            })?;
        Ok(LocalCa {
            issuer,
            root_der,
            lifetime,
            crypto,
        })
    }

    /// Writes a new self-signed root for `trust_domain` to `dir/ca.pem` and `dir/ca.key`.
    pub fn create_root(
        dir: &Path,
        trust_domain: &str,
    ) -> Result<(PathBuf, PathBuf), CertificateError> {
        let key = KeyPair::generate().map_err(|e| CertificateError::Key(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            DnType::OrganizationName,
            format!("Weft mesh CA ({trust_domain})"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params
            .self_signed(&key)
            .map_err(|e| CertificateError::Key(e.to_string()))?;
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        write(&cert_path, cert.pem().as_bytes())?;
        write_secret(&key_path, key.serialize_pem().as_bytes()).map_err(|source| {
            CertificateError::Write {
                path: key_path.clone(),
                source,
            }
        })?;
        Ok((cert_path, key_path))
    }

    fn sign(&self, identity: &Identity) -> Result<WorkloadCertificate, CertificateError> {
        let signing = |e: rcgen::Error| CertificateError::Signing {
            identity: identity.clone(),
            reason: e.to_string(),
        };
        let key = KeyPair::generate().map_err(signing)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let uri = identity.to_string();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(signing)?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let issued_at = SystemTime::now();
        let not_after = issued_at + self.lifetime;
        params.not_before = (issued_at - BACKDATE).into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer).map_err(signing)?;
        let chain = vec![cert.der().clone()];
        WorkloadCertificate::with_key(identity, chain, &key, &self.crypto, issued_at, not_after)
    }
}

impl CertificateProvider for LocalCa {
    fn fetch(
        &self,
        identity: &Identity,
    ) -> BoxFuture<'_, Result<WorkloadCertificate, CertificateError>> {
        let result = self.sign(identity);
        Box::pin(async move { result })
    }
}

fn read(path: &Path) -> Result<String, CertificateError> {
    std::fs::read_to_string(path).map_err(|source| CertificateError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, data: &[u8]) -> Result<(), CertificateError> {
    std::fs::write(path, data).map_err(|source| CertificateError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::peer_identity;

    #[tokio::test]
    async fn signs_certificates_that_carry_the_spiffe_id() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = LocalCa::create_root(dir.path(), "cluster.local").unwrap();
        let crypto = Arc::new(rustls::crypto::ring::default_provider());
        let ca = LocalCa::load(&cert, &key, Duration::from_secs(3600), crypto).unwrap();
        let id = Identity::new("cluster.local", "default", "web");
        let issued = ca.fetch(&id).await.unwrap();
        assert_eq!(peer_identity(issued.leaf()).unwrap(), id);
        let half = issued
            .refresh_at()
            .duration_since(issued.issued_at)
            .unwrap();
        assert_eq!(half, Duration::from_secs(1800));
    }

    #[test]
    fn a_missing_key_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = LocalCa::create_root(dir.path(), "cluster.local").unwrap();
        let crypto = Arc::new(rustls::crypto::ring::default_provider());
        let err = LocalCa::load(
            &cert,
            &dir.path().join("nope.key"),
            Duration::from_secs(1),
            crypto,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("nope.key"), "{err}");
    }

    #[test]
    fn the_root_key_is_written_private_and_refused_when_others_can_read_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = LocalCa::create_root(dir.path(), "cluster.local").unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let crypto = Arc::new(rustls::crypto::ring::default_provider());
        let err = LocalCa::load(&cert, &key, Duration::from_secs(3600), crypto)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("private key open to other users (mode 0644)"),
            "{err}"
        );
    }
}
