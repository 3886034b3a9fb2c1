//! Weft's per-node agent: follows the cluster (a local manifest folder or Kubernetes),
//! decides which pods are enrolled, drives the node's eBPF capture and tells the tunnel the
//! workload and service tables.

pub mod agent;
pub mod capture;
pub mod changes;
pub mod cluster;
pub mod controller;
pub mod enrollment;
pub mod kube_source;
pub mod manifests;
pub mod pod_netns;
pub mod policies;
pub mod readiness;
pub mod tunnel_link;
pub mod tunnel_state;
