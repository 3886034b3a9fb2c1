//! One proxied connection's record: counted when opened, bytes as they flow, logged when closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use tracing::info;

use super::flows::{FlowEnd, FlowKind};
use super::{ConnectionLabels, Metrics, Reporter};
use crate::identity::Identity;

/// One end of a connection as the metrics and access log describe it.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    pub workload: Option<String>,
    pub namespace: Option<String>,
    pub identity: Option<Identity>,
}

/// Counts a connection's bytes and reports its end; create one per proxied connection.
pub struct ConnectionRecorder {
    metrics: Arc<Metrics>,
    labels: ConnectionLabels,
    /// The ends' addresses, for the access log (the rest of each end is in the labels; a
    /// held connection keeps only what it needs).
    source_addr: Option<SocketAddr>,
    destination_addr: Option<SocketAddr>,
    /// Destination to source.
    pub sent: Counter,
    /// Source to destination.
    pub received: Counter,
    started: Instant,
}

fn or_unknown(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "unknown".into())
}

impl ConnectionRecorder {
    /// Counts the connection as opened.
    pub fn open(
        metrics: Arc<Metrics>,
        reporter: Reporter,
        source: Peer,
        destination: Peer,
        destination_service: Option<String>,
        mutual_tls: bool,
    ) -> Self {
        let labels = ConnectionLabels {
            reporter,
            source_workload: or_unknown(&source.workload),
            source_workload_namespace: or_unknown(&source.namespace),
            source_principal: source
                .identity
                .as_ref()
                .map_or("unknown".into(), ToString::to_string),
            destination_workload: or_unknown(&destination.workload),
            destination_workload_namespace: or_unknown(&destination.namespace),
            destination_principal: destination
                .identity
                .as_ref()
                .map_or("unknown".into(), ToString::to_string),
            destination_service: destination_service.unwrap_or_else(|| "unknown".into()),
            connection_security_policy: if mutual_tls { "mutual_tls" } else { "none" }.into(),
            response_flags: "-".into(),
        };
        metrics.opened.get_or_create(&labels).inc();
        record_flow(
            &metrics,
            &labels,
            source.addr.map(|a| a.to_string()),
            destination.addr.map(|a| a.to_string()),
            FlowKind::TcpOpen {
                security: labels.connection_security_policy.clone(),
            },
        );
        let sent = metrics.sent_bytes.get_or_create(&labels).clone();
        let received = metrics.received_bytes.get_or_create(&labels).clone();
        ConnectionRecorder {
            metrics,
            labels,
            source_addr: source.addr,
            destination_addr: destination.addr,
            sent,
            received,
            started: Instant::now(),
        }
    }

    /// The connection's metric labels (its requests' carry them too).
    pub fn labels(&self) -> &ConnectionLabels {
        &self.labels
    }

    /// Counts the connection as closed and writes its access-log event. `received` and `sent`
    /// are this connection's bytes towards the destination and back; `response_flags` is
    /// `None` for a clean close.
    pub fn close(
        mut self,
        received: u64,
        sent: u64,
        response_flags: Option<&str>,
        error: Option<&dyn std::fmt::Display>,
        policy: Option<&str>,
    ) {
        let flags = response_flags.unwrap_or("-");
        self.labels.response_flags = flags.to_owned();
        self.metrics.closed.get_or_create(&self.labels).inc();
        let error = error.map(|e| e.to_string());
        let duration_ms = self.started.elapsed().as_millis() as u64;
        record_flow(
            &self.metrics,
            &self.labels,
            self.source_addr.map(|a| a.to_string()),
            self.destination_addr.map(|a| a.to_string()),
            FlowKind::TcpClose {
                security: self.labels.connection_security_policy.clone(),
                bytes_sent: sent,
                bytes_received: received,
                duration_ms,
                flags: flags.to_owned(),
                error: error.clone(),
                policy: policy.map(str::to_owned),
            },
        );
        info!(
            target: "access",
            reporter = ?self.labels.reporter,
            src.addr = ?self.source_addr,
            src.workload = self.labels.source_workload,
            src.namespace = self.labels.source_workload_namespace,
            src.identity = self.labels.source_principal,
            dst.addr = ?self.destination_addr,
            dst.workload = self.labels.destination_workload,
            dst.namespace = self.labels.destination_workload_namespace,
            dst.identity = self.labels.destination_principal,
            dst.service = self.labels.destination_service,
            security = self.labels.connection_security_policy,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms,
            response_flags = flags,
            error,
            "connection complete"
        );
    }
}

/// Records a flow event of the connection with `labels` (both ends from them, with the
/// addresses given) in the tunnel's flows.
pub(crate) fn record_flow(
    metrics: &Metrics,
    labels: &ConnectionLabels,
    source_addr: Option<String>,
    destination_addr: Option<String>,
    kind: FlowKind,
) {
    let reporter = match labels.reporter {
        Reporter::source => "source",
        Reporter::destination => "destination",
    };
    let source = FlowEnd {
        namespace: labels.source_workload_namespace.clone(),
        workload: labels.source_workload.clone(),
        identity: labels.source_principal.clone(),
        addr: source_addr,
    };
    let destination = FlowEnd {
        namespace: labels.destination_workload_namespace.clone(),
        workload: labels.destination_workload.clone(),
        identity: labels.destination_principal.clone(),
        addr: destination_addr,
    };
    metrics.flows.record(reporter, source, destination, kind);
}
