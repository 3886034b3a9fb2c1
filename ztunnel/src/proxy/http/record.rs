//! One request's report, made when its response ends (or is abandoned): the request metrics
//! and one access-log event.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tracing::info;

use crate::telemetry::{ConnectionLabels, Metrics, RequestLabels};

/// What the requests of one connection report with: its labels, and the metric series of each
/// response code and protocol met so far (made once per connection, not per request: labels
/// are ten strings, hashed for each lookup).
pub struct ConnectionTelemetry {
    metrics: Arc<Metrics>,
    labels: ConnectionLabels,
    source_addr: std::net::IpAddr,
    series: std::sync::Mutex<Vec<(SeriesKey, Series)>>,
}

/// Response code, protocol, refused.
type SeriesKey = (u16, &'static str, bool);

#[derive(Clone)]
struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl ConnectionTelemetry {
    pub fn new(
        metrics: Arc<Metrics>,
        labels: ConnectionLabels,
        source_addr: std::net::IpAddr,
    ) -> Self {
        ConnectionTelemetry {
            metrics,
            labels,
            source_addr,
            series: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn series(&self, key: SeriesKey) -> Series {
        let mut known = self
            .series
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, series)) = known.iter().find(|(k, _)| *k == key) {
            return series.clone();
        }
        let (code, protocol, refused) = key;
        let mut connection = self.labels.clone();
        if refused {
            connection.response_flags = "DENY".to_owned();
        }
        let labels = RequestLabels {
            connection,
            response_code: code,
            request_protocol: protocol,
        };
        let series = Series {
            requests: self.metrics.requests.get_or_create(&labels).clone(),
            duration: self.metrics.request_duration.get_or_create(&labels).clone(),
            request_bytes: self.metrics.request_bytes.get_or_create(&labels).clone(),
            response_bytes: self.metrics.response_bytes.get_or_create(&labels).clone(),
        };
        known.push((key, series.clone()));
        series
    }
}

/// What is known of a request once its response head is chosen.
pub struct RequestRecord {
    pub telemetry: Arc<ConnectionTelemetry>,
    pub started: Instant,
    pub method: http::Method,
    pub authority: String,
    pub path: String,
    pub status: http::StatusCode,
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// `allow` or `deny`.
    pub verdict: &'static str,
    /// The policy that decided, if one did.
    pub policy: Option<String>,
    /// The Audit policy that matched, if one did.
    pub audit: Option<String>,
    /// The request body's bytes, counted as it is forwarded.
    pub request_bytes: Arc<AtomicU64>,
}

impl RequestRecord {
    /// Reports the request, whose response carried `response_bytes` of body.
    fn finish(self, response_bytes: u64) {
        let t = &self.telemetry;
        let code = self.status.as_u16();
        let series = t.series((code, self.protocol, self.verdict == "deny"));
        let duration = self.started.elapsed();
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        series.requests.inc();
        series.duration.observe(duration.as_secs_f64() * 1000.0);
        series.request_bytes.observe(request_bytes as f64);
        series.response_bytes.observe(response_bytes as f64);
        let c = &t.labels;
        crate::telemetry::record_flow(
            &t.metrics,
            c,
            Some(t.source_addr.to_string()),
            None,
            crate::telemetry::flows::FlowKind::Http {
                method: self.method.to_string(),
                authority: self.authority.clone(),
                path: self.path.clone(),
                status: code,
                duration_ms: duration.as_secs_f64() * 1000.0,
                verdict: self.verdict.to_owned(),
                policy: self.policy.clone(),
                audit: self.audit.clone(),
            },
        );
        info!(
            target: "access",
            status = code,
            src.addr = ?t.source_addr,
            src.workload = c.source_workload,
            src.namespace = c.source_workload_namespace,
            src.identity = c.source_principal,
            dst.workload = c.destination_workload,
            dst.namespace = c.destination_workload_namespace,
            dst.identity = c.destination_principal,
            method = %self.method,
            authority = self.authority,
            path = self.path,
            protocol = self.protocol,
            duration_ms = duration.as_secs_f64() * 1000.0,
            bytes_received = request_bytes,
            bytes_sent = response_bytes,
            verdict = self.verdict,
            policy = self.policy.as_deref().unwrap_or("-"),
            "request complete"
        );
    }
}

/// A body passed on as it comes, its data bytes counted into `bytes`; a response body also
/// carries its request's record, reported when the body ends or is dropped.
pub struct CountedBody<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
    record: Option<RequestRecord>,
}

impl<B> CountedBody<B> {
    /// A request body, counted into `bytes`.
    pub fn request(inner: B, bytes: Arc<AtomicU64>) -> Self {
        CountedBody {
            inner,
            bytes,
            record: None,
        }
    }

    /// A response body, whose end reports `record`.
    pub fn response(inner: B, record: RequestRecord) -> Self {
        CountedBody {
            inner,
            bytes: Arc::default(),
            record: Some(record),
        }
    }
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.finish(self.bytes.load(Ordering::Relaxed));
        }
    }
}

impl<B> Body for CountedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
