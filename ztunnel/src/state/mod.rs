//! What the tunnel knows of the cluster: workloads and services, independent of their source.

mod agent;
mod file;
mod model;
mod watch;

pub use agent::{AgentFollower, PodNamespaces, state_id};
pub use file::parse_state_file;
pub use model::{
    AppProtocol, PortHandling, Protocol, Service, ServicePort, State, StateSpec, Workload,
    WorkloadIdentity,
};
pub use watch::{StateHandle, watch_state_file};

/// Why a state update was refused; the previous state stays in force.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {reason}")]
    Parse {
        path: std::path::PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    ParseNoLocation {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("{source_name}: {what}: {reason}")]
    Invalid {
        source_name: String,
        what: String,
        reason: String,
    },
    #[error("state file: {0}")]
    Untrusted(#[from] tunnel_proto::file_trust::FileTrustError),
}
