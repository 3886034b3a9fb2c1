//! Mutual TLS 1.3 between workloads: SPIFFE-aware verification and rustls configurations.

mod bundle;
mod configs;
pub mod crypto;
mod verify;

pub use bundle::{Roots, TrustBundle};
pub use configs::TlsContext;
pub use verify::peer_identity;

use crate::identity::Identity;

/// Why a peer certificate is not accepted as a workload identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("peer certificate does not parse: {0}")]
    BadCertificate(String),
    #[error("peer certificate carries no SPIFFE ID (no spiffe:// URI SAN)")]
    NoSpiffeId,
    #[error("peer certificate carries {0} URI SANs: an X.509-SVID has exactly one, its SPIFFE ID")]
    SeveralUris(usize),
    #[error("peer certificate SPIFFE ID is malformed: {0}")]
    BadSpiffeId(#[from] crate::identity::IdentityError),
    #[error("peer identity {got} is from trust domain {:?}, expected {expected:?}", got.trust_domain)]
    WrongTrustDomain { got: Identity, expected: String },
    #[error("peer identity {got} is not the expected {}", expected.iter().map(ToString::to_string).collect::<Vec<_>>().join(" or "))]
    UnexpectedIdentity {
        got: Identity,
        expected: Vec<Identity>,
    },
    #[error("no TLS 1.3 support in the crypto provider: {0}")]
    Config(String),
}

impl From<TlsError> for rustls::Error {
    fn from(e: TlsError) -> Self {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            std::sync::Arc::new(e),
        )))
    }
}

/// A readable reason for a failed handshake: our own verification errors are shown with their
/// message rather than rustls' debug wrapping.
pub fn describe_handshake_error(error: &std::io::Error) -> String {
    let Some(rustls_error) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return error.to_string();
    };
    match rustls_error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            match other.0.downcast_ref::<TlsError>() {
                Some(ours) => format!("invalid peer certificate: {ours}"),
                None => rustls_error.to_string(),
            }
        }
        other => other.to_string(),
    }
}
