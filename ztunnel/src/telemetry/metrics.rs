//! The metric families the tunnel exports on `:15020/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Which side of the connection reports: Istio's `reporter` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // The variant names are the label values.
pub enum Reporter {
    source,
    destination,
}

/// Labels of the TCP metrics, as Istio names them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: String,
    /// `-` when nothing went wrong.
    pub response_flags: String,
}

/// Every metric the tunnel exports.
pub struct Metrics {
    pub registry: Registry,
    pub opened: Family<ConnectionLabels, Counter>,
    pub closed: Family<ConnectionLabels, Counter>,
    /// Bytes from destination to source (Istio: "sent during response").
    pub sent_bytes: Family<ConnectionLabels, Counter>,
    /// Bytes from source to destination (Istio: "received during request").
    pub received_bytes: Family<ConnectionLabels, Counter>,
    /// Open pooled HBONE connections (TLS + HTTP/2) to other tunnels.
    pub hbone_pool_connections: Gauge,
    /// Connections to the HBONE listeners closed before or instead of serving them, by reason.
    pub hbone_refused: Family<RefusedLabels, Counter>,
    /// Decisions a MeshPolicy took (allow, deny) or audited, by policy.
    pub policy_decisions: Family<PolicyDecisionLabels, Counter>,
    /// HTTP requests on parsed ports, reported by the destination's tunnel.
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub request_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub response_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// When each workload certificate in use expires (Unix seconds).
    pub certificate_expiration: Family<IdentityLabels, Gauge>,
    /// Certificate renewals, by `result` (`success`, `failure`).
    pub certificate_renewals: Family<RenewalLabels, Counter>,
    /// Not a metric: the flow events of the same connections and requests, for `/flows`.
    pub flows: super::flows::Flows,
}

/// The SPIFFE ID a certificate proves.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

/// How a renewal went: `success` or `failure`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RenewalLabels {
    pub result: &'static str,
}

/// Labels of the request metrics, as Istio names them: the connection's, then the response
/// code and the protocol (`http` or `grpc`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub connection: ConnectionLabels,
    pub response_code: u16,
    pub request_protocol: &'static str,
}

/// Istio's request duration buckets, in milliseconds.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

/// 1 B to 1 GB by powers of ten, as Istio's size buckets.
fn size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 10.0, 10))
}

/// A policy that decided (`namespace/name`) and what: `allow`, `deny` or `audit`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyDecisionLabels {
    pub policy: String,
    pub decision: &'static str,
}

/// Why an HBONE connection was turned away (`reason`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `total`, `per_peer` (connection limits), `handshake_timeout`, `tls`, `h2`, `idle`,
    /// `flood` (PING/SETTINGS flood).
    pub reason: &'static str,
}

impl Metrics {
    /// Registers every family under the `weft` prefix.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("weft");
        let opened = Family::default();
        let closed = Family::default();
        let sent_bytes = Family::default();
        let received_bytes = Family::default();
        let hbone_pool_connections = Gauge::default();
        let hbone_refused = Family::default();
        let policy_decisions = Family::default();
        let requests = Family::default();
        let request_duration: Family<RequestLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        let request_bytes: Family<RequestLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(size_histogram);
        let response_bytes: Family<RequestLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(size_histogram);
        let certificate_expiration = Family::default();
        let certificate_renewals = Family::default();
        registry.register(
            "certificate_expiration_timestamp_seconds",
            "When the workload certificate of each identity in use expires (Unix time)",
            certificate_expiration.clone(),
        );
        registry.register(
            "certificate_renewals",
            "Workload certificate renewals, by result (success, failure: retried with backoff while the current certificate stays in use)",
            certificate_renewals.clone(),
        );
        registry.register(
            "tcp_connections_opened",
            "TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "Bytes sent from destination to source (response direction)",
            sent_bytes.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "Bytes received from source for destination (request direction)",
            received_bytes.clone(),
        );
        registry.register(
            "hbone_pool_connections",
            "Open pooled HBONE connections to other tunnels",
            hbone_pool_connections.clone(),
        );
        registry.register(
            "hbone_connections_refused",
            "Connections to HBONE listeners closed without being served: over a limit (total, per_peer), handshake not finished in time (handshake_timeout), failed handshakes (tls, h2), idle with no stream (idle), or ended for a control-frame flood (flood)",
            hbone_refused.clone(),
        );
        registry.register(
            "policy_decisions",
            "Connections a MeshPolicy allowed or denied (the policy that decided), or matched as an Audit policy",
            policy_decisions.clone(),
        );
        registry.register(
            "requests",
            "HTTP requests on ports the tunnel parses, by response code (403: refused by a policy)",
            requests.clone(),
        );
        registry.register(
            "request_duration_milliseconds",
            "Time from a request's head to the end of its response",
            request_duration.clone(),
        );
        registry.register(
            "request_bytes",
            "Size of HTTP request bodies",
            request_bytes.clone(),
        );
        registry.register(
            "response_bytes",
            "Size of HTTP response bodies",
            response_bytes.clone(),
        );
        Arc::new(Metrics {
            registry,
            opened,
            closed,
            sent_bytes,
            received_bytes,
            hbone_pool_connections,
            hbone_refused,
            policy_decisions,
            requests,
            request_duration,
            request_bytes,
            response_bytes,
            certificate_expiration,
            certificate_renewals,
            flows: super::flows::Flows::new(),
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
