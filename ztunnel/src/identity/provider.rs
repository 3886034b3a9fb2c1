//! The seam between the tunnel and whoever signs workload certificates.

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::future::BoxFuture;
use rustls::pki_types::CertificateDer;
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
