//! What Weft's node agent (`mesh-node`) tells the tunnel, shared by both: the workload and
//! service tables (which the tunnel also reads from a YAML state file: tests, single
//! machines), and the versioned protocol over a Unix socket that carries them with the local
//! pods' network namespaces ([`protocol`]).

pub mod file_trust;
pub mod last_failure;
pub mod peer;
pub mod protocol;
pub mod yaml;

use std::net::IpAddr;
use std::path::PathBuf;

pub use policy::{MtlsMode, NamedPolicy};
use serde::{Deserialize, Serialize};

/// How a workload accepts mesh traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    /// Enrolled: reached through its node's tunnel on port 15008.
    #[default]
    #[serde(rename = "HBONE")]
    Hbone,
    /// Not enrolled: reached by plain TCP.
    #[serde(rename = "TCP")]
    Tcp,
}

/// One pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub node: String,
    /// The pod's network namespace, required for pods on this tunnel's node.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub protocol: Protocol,
    /// The MeshPolicies in force for this workload (`namespace/name`, in [`StateSpec::policies`],
    /// in the order decisions name them); filled in by a node's agent for its own workloads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Whether plaintext may reach this workload (its MeshAuthentication's mode).
    #[serde(default, skip_serializing_if = "is_permissive")]
    pub mtls: MtlsMode,
}

fn is_permissive(mode: &MtlsMode) -> bool {
    *mode == MtlsMode::Permissive
}

fn default_service_account() -> String {
    "default".to_owned()
}

impl Workload {
    /// `namespace/name`, unique in the cluster.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A service port and the workload port it forwards to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
}

/// A service VIP and the workloads behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Workloads as `namespace/name`.
    #[serde(default)]
    pub endpoints: Vec<String>,
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The tables as a source hands them over, before validation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// The MeshPolicies that workloads name (valid ones only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<NamedPolicy>,
}
