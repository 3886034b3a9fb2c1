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
use crate::telemetry::flows::{FlowEvent, FlowQuery, RING};

pub type Body = BoxBody<Bytes, Infallible>;

/// Most events written in one frame.
const BATCH: usize = 256;

fn line(event: &FlowEvent) -> Bytes {
    let mut text = serde_json::to_vec(event).unwrap_or_default();
    text.push(b'\n');
    Bytes::from(text)
}

/// Answers a `/flows` request with `query`.
pub fn flows(query: &str, metrics: &Arc<Metrics>) -> Response<Body> {
    let query = match FlowQuery::parse(query) {
        Ok(q) => q,
        Err(e) => {
            let mut response = Response::new(Full::new(Bytes::from(format!("{e}\n"))).boxed());
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return response;
        }
    };
    let flows = &metrics.flows;
    // Subscribed before the ring is read, so nothing falls between the two (an event may come
    // twice; the client can tell by its time).
    let subscription = if query.follow {
        match flows.subscribe(query.filter.clone()) {
            Ok(s) => Some(s),
            Err(e) => {
                let mut response = Response::new(Full::new(Bytes::from(format!("{e}\n"))).boxed());
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return response;
            }
        }
    } else {
        None
    };
    let recent: Vec<Bytes> = flows
        .recent(&query.filter, query.last.unwrap_or(RING))
        .iter()
        .map(|e| line(e))
        .collect();
    let head = futures_util::stream::iter(
        recent
            .into_iter()
            .map(|b| Ok::<_, Infallible>(Frame::data(b))),
    );
    let body = match subscription {
        None => StreamBody::new(head).boxed(),
        Some(subscription) => {
            let tail = futures_util::stream::unfold(subscription, |mut s| async move {
                let event = s.events.recv().await?;
                let lost = s.take_lost();
                let mut bytes = Vec::new();
                if lost > 0 {
                    bytes.extend_from_slice(format!("{{\"lost\":{lost}}}\n").as_bytes());
                }
                bytes.extend_from_slice(&line(&event));
                // What else is queued goes in the same frame: one write for a burst, not one
                // per event (a subscriber of a busy tunnel cost it a write and a wake-up each).
                for _ in 1..BATCH {
                    match s.events.try_recv() {
                        Ok(event) => bytes.extend_from_slice(&line(&event)),
                        Err(_) => break,
                    }
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
