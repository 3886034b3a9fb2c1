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
use crate::telemetry::flows::{FlowEvent, FlowFilter, RING};

pub type Body = BoxBody<Bytes, Infallible>;

/// What a `/flows` query asks.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FlowQuery {
    pub filter: FlowFilter,
    pub last: usize,
    pub follow: bool,
}

/// Reads a query string (values percent-decoded).
pub fn parse_query(query: &str) -> Result<FlowQuery, String> {
    let mut out = FlowQuery {
        last: RING,
        ..FlowQuery::default()
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value).ok_or_else(|| format!("{name}: bad percent-encoding"))?;
        match name {
            "last" => {
                out.last = value
                    .parse()
                    .map_err(|_| format!("last={value}: a number of events"))?
            }
            "follow" => {
                out.follow = match value.as_str() {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(format!("follow={value}: true or false")),
                }
            }
            _ => out.filter.set(name, &value).map_err(|e| e.to_string())?,
        }
    }
    Ok(out)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn line(event: &FlowEvent) -> Bytes {
    let mut text = serde_json::to_vec(event).unwrap_or_default();
    text.push(b'\n');
    Bytes::from(text)
}

/// Answers a `/flows` request with `query`.
pub fn flows(query: &str, metrics: &Arc<Metrics>) -> Response<Body> {
    let query = match parse_query(query) {
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
        .recent(&query.filter, query.last)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_read_filters_last_and_follow_and_refuse_nonsense() {
        let q = parse_query("to_pod=shop%2Fweb&type=http&follow=true&last=5").unwrap();
        assert_eq!(q.filter.to_pod.as_deref(), Some("shop/web"));
        assert_eq!(q.filter.protocol.as_deref(), Some("http"));
        assert!(q.follow);
        assert_eq!(q.last, 5);
        assert_eq!(parse_query("").unwrap().last, RING);
        assert!(parse_query("last=many").unwrap_err().contains("last=many"));
        assert!(
            parse_query("verdict=maybe")
                .unwrap_err()
                .contains("allowed or denied")
        );
        assert!(
            parse_query("colour=red")
                .unwrap_err()
                .contains("unknown filter")
        );
        assert!(parse_query("to_pod=%zz").is_err());
    }
}
