//! `GET /flows` on the admin endpoint: the tunnel's flow events as JSON lines, one event a
//! line. Query: the filters of [`FlowFilter`] (`namespace`, `from_pod`, `to_pod`,
//! `from_identity`, `type`, `verdict`, `since`), `last=N` (the N most recent matching events of
//! the ring first; default all it holds) and `follow=true` (then stay connected and stream new
//! events as they happen). A subscriber that reads too slowly loses events: a line
//! `{"lost": N}` comes before the next event it gets.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;

use crate::telemetry::Metrics;
use crate::telemetry::flows::FlowQuery;
use tunnel_proto::flows::{event_line, lost_line};

pub type Body = BoxBody<Bytes, Infallible>;

/// Most events written in one frame.
const BATCH: usize = 256;

/// Answers a `/flows` request with `query`.
pub fn flows(query: &str, metrics: &Arc<Metrics>) -> Response<Body> {
    let text = |status, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
        *response.status_mut() = status;
        response
    };
    let query = match FlowQuery::parse(query) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let opened = match metrics.flows.open(&query) {
        Ok(opened) => opened,
        Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    };
    let head = futures_util::stream::iter(
        opened
            .recent
            .into_iter()
            .map(|e| Ok::<_, Infallible>(Frame::data(Bytes::from(event_line(&e))))),
    );
    let body = match opened.subscription {
        None => StreamBody::new(head).boxed(),
        Some(subscription) => {
            // What is queued goes in one frame: one write for a burst, not one per event.
            let tail = futures_util::stream::unfold(subscription, |mut s| async move {
                let (events, lost) = s.next_batch(BATCH).await?;
                let mut bytes = if lost > 0 {
                    lost_line(lost)
                } else {
                    Vec::new()
                };
                for event in &events {
                    bytes.extend_from_slice(&event_line(event));
                }
                Some((Ok::<_, Infallible>(Frame::data(Bytes::from(bytes))), s))
            });
            StreamBody::new(futures_util::StreamExt::chain(head, tail)).boxed()
        }
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}
