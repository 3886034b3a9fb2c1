//! Weft's per-node agent: follows the cluster (a local manifest folder or Kubernetes),
//! decides which pods are enrolled, drives the node's eBPF capture and tells the tunnel the
//! workload and service tables.

pub mod agent;
pub mod api_access;
pub mod ca;
pub mod capture;
pub mod changes;
pub mod cli;
pub mod cluster;
pub mod controller;
pub mod enrollment;
pub mod kube_source;
pub mod manifests;
pub mod owner;
pub mod pod_netns;
pub mod policies;
pub mod preflight;
pub mod readiness;
pub mod relay;
pub mod tunnel_link;
pub mod tunnel_state;

/// Makes `ring` the process's default rustls crypto provider, which the Kubernetes client's
/// TLS uses. Needed before the first client is built: the workspace also builds rustls with
/// aws-lc-rs (the tunnel picks between them by CPU), and with both compiled in rustls cannot
/// pick a default by itself (it panics). Calling it again does nothing.
pub fn install_default_crypto_provider() {
    // Err means a provider is installed already: what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
