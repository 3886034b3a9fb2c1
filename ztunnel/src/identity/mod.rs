//! Workload identities and the certificates that prove them.

pub mod bundle_file;
mod ca_client;
mod local_ca;
mod manager;
mod provider;
mod spiffe;

pub use ca_client::{CaClientSettings, MeshCaClient};
pub(crate) use ca_client::{bearer, controller_channel, describe_status};
pub use local_ca::LocalCa;
pub use manager::{CertificateManager, CertificateSlot};
pub use provider::{CertificateProvider, WorkloadCertificate};
pub use spiffe::{Identity, IdentityError};

/// Failures to obtain or use workload certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no usable {what}: {reason}")]
    BadPem {
        path: std::path::PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("cannot sign a certificate for {identity}: {reason}")]
    Signing { identity: Identity, reason: String },
    /// `reason` names the CA's address: kept in one string, so that this error (carried in
    /// every connection's error type) is no larger than the others.
    #[error("the mesh CA refused or failed the certificate of {identity}: {reason}")]
    CaRefused { identity: Identity, reason: String },
    #[error("no certificate for {identity} yet: {reason}")]
    Waiting { identity: Identity, reason: String },
    #[error("--ca-address {address}: {reason}")]
    CaAddress { address: String, reason: String },
    #[error("the node's CA token {path} cannot be used: {reason}")]
    BadToken {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("the signing key cannot be used with rustls: {0}")]
    Key(String),
    #[error(transparent)]
    Untrusted(#[from] tunnel_proto::file_trust::FileTrustError),
}
