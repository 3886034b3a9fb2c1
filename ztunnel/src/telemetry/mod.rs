//! Prometheus metrics and access logs, with Istio's names and labels under a `weft_` prefix.

mod connection;
pub mod flows;
mod metrics;

pub use connection::{ConnectionRecorder, Peer};
pub(crate) use connection::{destination_end, reporter_name, source_end};
pub use metrics::{
    ConnectionLabels, IdentityLabels, Metrics, PolicyDecisionLabels, RefusedLabels, RenewalLabels,
    Reporter, RequestLabels,
};
