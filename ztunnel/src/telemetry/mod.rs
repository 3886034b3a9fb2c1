//! Prometheus metrics and access logs, with Istio's names and labels under a `weft_` prefix.

mod connection;
pub mod flows;
mod metrics;

pub(crate) use connection::record_flow;
pub use connection::{ConnectionRecorder, Peer};
pub use metrics::{
    ConnectionLabels, IdentityLabels, Metrics, PolicyDecisionLabels, RefusedLabels, RenewalLabels,
    Reporter, RequestLabels,
};
