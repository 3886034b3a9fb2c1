//! The seam between the tunnel and whoever signs workload certificates.

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::future::BoxFuture;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use super::{CertificateError, Identity};

/// A certificate chain and key proving one workload identity.
#[derive(Debug)]
pub struct WorkloadCertificate {
    pub identity: Identity,
    /// Leaf first, then intermediates; ready for rustls.
    pub certified_key: Arc<CertifiedKey>,
    /// When it was issued (its notBefore is a little earlier, for clock skew).
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCertificate {
    /// A certificate of `identity` for `chain` (leaf first), whose key is `key`, loaded for
    /// rustls with `crypto`.
    pub fn with_key(
        identity: &Identity,
        chain: Vec<CertificateDer<'static>>,
        key: &rcgen::KeyPair,
        crypto: &rustls::crypto::CryptoProvider,
        issued_at: SystemTime,
        not_after: SystemTime,
    ) -> Result<Self, CertificateError> {
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = crypto
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| CertificateError::Key(e.to_string()))?;
        Ok(WorkloadCertificate {
            identity: identity.clone(),
            certified_key: Arc::new(CertifiedKey::new(chain, signing_key)),
            issued_at,
            not_after,
        })
    }

    /// When the certificate should be replaced: half-way through its life.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life / 2
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // A CertifiedKey is always built from a non-empty chain (see LocalCa::sign).
        &self.certified_key.cert[0]
    }
}

/// Signs workload certificates: the mesh CA through CSRs (`MeshCaClient`), or in tests and
/// the fuzzer an in-process CA (`LocalCa`).
pub trait CertificateProvider: Send + Sync + 'static {
    /// Issues a fresh certificate for `identity`.
    fn fetch(
        &self,
        identity: &Identity,
    ) -> BoxFuture<'_, Result<WorkloadCertificate, CertificateError>>;
}
