//! What Weft's node agent (`mesh-node`) tells the tunnel, shared by both: the workload and
//! service tables (which the tunnel also reads from a YAML state file: tests, single
//! machines), and the versioned protocol over a Unix socket that carries them with the local
//! pods' network namespaces ([`protocol`]).

pub mod file_trust;
pub mod flow_merge;
pub mod flows;
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
    /// What the port speaks, as the Service declares it.
    #[serde(default, skip_serializing_if = "AppProtocol::is_unspecified")]
    pub app_protocol: AppProtocol,
}

/// What a Service declares one of its ports speaks: by its `appProtocol`, else by its name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// Not declared: parsed as HTTP only where policies name HTTP fields for the port.
    #[default]
    Unspecified,
    /// HTTP/1.1, or HTTP/2 with prior knowledge (gRPC, h2c): parsed, each request decided and
    /// counted.
    Http,
    /// Something else (TCP, TLS, a database's protocol): never parsed; HTTP fields of
    /// policies for it are enforced more strictly than written.
    Opaque,
}

/// Port name prefixes (`<protocol>` or `<protocol>-<suffix>`) that say HTTP, and that say
/// something else, as Istio reads them.
const HTTP_NAMES: &[&str] = &["http", "http2", "grpc", "grpc-web", "h2c"];
const OPAQUE_NAMES: &[&str] = &[
    "tcp", "tls", "https", "mongo", "mysql", "redis", "udp", "sctp",
];

impl AppProtocol {
    /// What a Service port declares: its `appProtocol` when set (`http`, `http2`, `grpc`,
    /// `grpc-web`, `kubernetes.io/h2c`, `kubernetes.io/ws`: HTTP; anything else opaque), else
    /// its name's protocol part (`http`, `http-web`, `grpc-api`: HTTP; `tcp-db`, `tls`,
    /// `mysql`: opaque; anything else undeclared).
    pub fn declared(app_protocol: Option<&str>, port_name: Option<&str>) -> Self {
        if let Some(declared) = app_protocol.filter(|p| !p.is_empty()) {
            let declared = declared.to_ascii_lowercase();
            let http = HTTP_NAMES.contains(&declared.as_str())
                || matches!(declared.as_str(), "kubernetes.io/h2c" | "kubernetes.io/ws");
            return if http {
                AppProtocol::Http
            } else {
                AppProtocol::Opaque
            };
        }
        let Some(name) = port_name else {
            return AppProtocol::Unspecified;
        };
        let name = name.to_ascii_lowercase();
        let named = |list: &[&str]| {
            list.iter().any(|p| {
                name == *p
                    || name
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with('-'))
            })
        };
        if named(HTTP_NAMES) {
            AppProtocol::Http
        } else if named(OPAQUE_NAMES) {
            AppProtocol::Opaque
        } else {
            AppProtocol::Unspecified
        }
    }

    pub fn is_unspecified(&self) -> bool {
        *self == AppProtocol::Unspecified
    }

    /// Two services declare the same workload port: opaque wins (never parse what one of them
    /// says is not HTTP; HTTP rules are then enforced more strictly, never less), then HTTP.
    pub fn merge(self, other: AppProtocol) -> AppProtocol {
        use AppProtocol::*;
        match (self, other) {
            (Opaque, _) | (_, Opaque) => Opaque,
            (Http, _) | (_, Http) => Http,
            (Unspecified, Unspecified) => Unspecified,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::AppProtocol::{self, *};

    #[test]
    fn what_a_service_port_declares() {
        let cases: &[(Option<&str>, Option<&str>, AppProtocol)] = &[
            (Some("http"), Some("tcp-x"), Http),
            (Some("HTTP2"), None, Http),
            (Some("kubernetes.io/h2c"), None, Http),
            (Some("grpc"), None, Http),
            (Some("https"), Some("http"), Opaque),
            (Some("mysql"), None, Opaque),
            (Some(""), Some("http-web"), Http),
            (None, Some("http"), Http),
            (None, Some("grpc-api"), Http),
            (None, Some("httpbin"), Unspecified),
            (None, Some("tcp-db"), Opaque),
            (None, Some("https"), Opaque),
            (None, Some("metrics"), Unspecified),
            (None, None, Unspecified),
        ];
        for (app_protocol, name, want) in cases {
            assert_eq!(
                AppProtocol::declared(*app_protocol, *name),
                *want,
                "{app_protocol:?} {name:?}"
            );
        }
        assert_eq!(Http.merge(Opaque), Opaque);
        assert_eq!(Unspecified.merge(Http), Http);
    }
}
