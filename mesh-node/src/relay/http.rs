//! The relay's endpoint for users: `GET /flows?<query>` (the tunnels' own query and JSON lines,
//! so `weft observe --relay` reads it as it reads a tunnel) with every node's events merged in
//! time order, and `GET /nodes` (the nodes whose calls are open, one a line).
//!
//! It has no authentication of its own and is bound to loopback only: users reach it with
//! `kubectl port-forward` to the controller, which the API server authenticates and RBAC
//! allows only to who may create `pods/portforward` in the controller's namespace.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use tokio::time::Instant;
use tracing::{debug, warn};
use tunnel_proto::flow_merge::Merger;
use tunnel_proto::flows::{FlowEvent, FlowQuery, event_line, lost_line, now_ms};

use super::{Relay, RelayItem, RelaySubscription};

/// Events are held this long so that a slower node's earlier event comes out first.
pub const WINDOW_MS: u64 = 250;

/// A question without `follow` waits at most this long for every node's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// A question without `follow` or `last` is answered with at most the newest this many of
/// all nodes' events together (one tunnel's ring holds as many).
const ANSWER_AT_MOST: usize = 4096;

/// Most events a follower's merge holds: past it, the oldest are let out before their window.
const MAX_HELD: usize = 16 * 1024;

/// How often held events are let out while following.
const TICK: Duration = Duration::from_millis(50);

type Body = BoxBody<Bytes, Infallible>;

/// Why the endpoint did not start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(
        "--flows-listen {0}: the relay's endpoint has no authentication of its own and must be on a loopback address (users reach it through kubectl port-forward)"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Serves the endpoint on `addr` (a loopback address); returns where it listens.
pub async fn serve(addr: SocketAddr, relay: Arc<Relay>) -> Result<SocketAddr, EndpointError> {
    if !addr.ip().is_loopback() {
        return Err(EndpointError::NotLoopback(addr));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| EndpointError::Listen { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accepting a flow relay reader failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let relay = relay.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let relay = relay.clone();
                    async move { Ok::<_, Infallible>(answer(&request, &relay).await) }
                });
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await
                {
                    debug!(%peer, %error, "flow relay reader's connection ended");
                }
            });
        }
    });
    Ok(bound)
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response
}

async fn answer<B>(request: &Request<B>, relay: &Arc<Relay>) -> Response<Body> {
    if request.method() != hyper::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match request.uri().path() {
        "/nodes" => {
            let nodes: String = relay.nodes().iter().map(|n| format!("{n}\n")).collect();
            text(StatusCode::OK, nodes)
        }
        "/flows" => {
            let query = match FlowQuery::parse(request.uri().query().unwrap_or("")) {
                Ok(query) => query,
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            };
            let subscription = match relay.subscribe(&query) {
                Ok(s) => s,
                Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            };
            let mut response = if query.follow {
                Response::new(following(subscription, query.last))
            } else {
                Response::new(once(subscription, query.last).await)
            };
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/x-ndjson"),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "GET /flows?<filters>&last=N&follow=true, or GET /nodes\n".into(),
        ),
    }
}

/// A line telling the reader about the relay itself (not an event): `weft observe` prints it
/// on standard error.
fn notice(message: &str) -> Vec<u8> {
    let mut text =
        serde_json::to_vec(&serde_json::json!({ "notice": message })).unwrap_or_default();
    text.push(b'\n');
    text
}

fn no_nodes(subscription: &RelaySubscription) -> Option<Vec<u8>> {
    subscription
        .nodes
        .is_empty()
        .then(|| notice("no node's tunnel is connected to this relay"))
}

/// Every node's recent events, merged; the last `last` of them.
async fn once(mut subscription: RelaySubscription, last: Option<usize>) -> Body {
    let mut merger = Merger::new(0);
    let keep = last.unwrap_or(ANSWER_AT_MOST).min(MAX_HELD);
    let mut waiting: std::collections::BTreeSet<String> =
        subscription.nodes.iter().cloned().collect();
    let mut out = no_nodes(&subscription).unwrap_or_default();
    let deadline = Instant::now() + ANSWER_WITHIN;
    while !waiting.is_empty() {
        match tokio::time::timeout_at(deadline, subscription.events.recv()).await {
            Ok(Some(RelayItem::Event(event))) => {
                merger.push(event.time_ms, event);
                // Only the newest are answered: held memory stays bounded with many nodes.
                merger.beyond(keep);
            }
            Ok(Some(RelayItem::NodeEnded { node, error })) => {
                waiting.remove(&node);
                if let Some(error) = error {
                    out.extend(notice(&format!("{node}: {error}")));
                }
            }
            Ok(None) => break,
            Err(_) => {
                let late: Vec<String> = waiting.into_iter().collect();
                out.extend(notice(&format!(
                    "no complete answer within {ANSWER_WITHIN:?} from {}",
                    late.join(", ")
                )));
                break;
            }
        }
    }
    let lost = subscription.take_lost();
    if lost > 0 {
        out.extend(lost_line(lost));
    }
    for event in merger.drain(last) {
        out.extend(event_line(&event));
    }
    Full::new(Bytes::from(out)).boxed()
}

/// Every node's events as they come, merged in time order behind a short window; the first
/// batch (the nodes' recent events) cut to the last `last`.
fn following(subscription: RelaySubscription, last: Option<usize>) -> Body {
    struct Follow {
        subscription: RelaySubscription,
        merger: Merger<Box<FlowEvent>>,
        first: Option<Instant>,
        pending: Vec<u8>,
        tick: tokio::time::Interval,
    }
    let pending = no_nodes(&subscription).unwrap_or_default();
    let state = Follow {
        subscription,
        merger: Merger::new(WINDOW_MS),
        first: Some(Instant::now() + Duration::from_millis(WINDOW_MS)),
        pending,
        tick: tokio::time::interval(TICK),
    };
    let stream = futures_util::stream::unfold(state, move |mut s| async move {
        loop {
            if !s.pending.is_empty() {
                let chunk = std::mem::take(&mut s.pending);
                return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))), s));
            }
            tokio::select! {
                item = s.subscription.events.recv() => match item {
                    Some(RelayItem::Event(event)) => {
                        s.merger.push(event.time_ms, event);
                        for early in s.merger.beyond(MAX_HELD) {
                            s.pending.extend(event_line(&early));
                        }
                    }
                    Some(RelayItem::NodeEnded { node, error }) => {
                        let said = error.unwrap_or_else(|| "ended".into());
                        s.pending.extend(notice(&format!("{node}: {said}")));
                    }
                    None => return None,
                },
                _ = s.tick.tick() => {
                    let ready = match s.first {
                        Some(at) if Instant::now() < at => continue,
                        Some(_) => {
                            s.first = None;
                            s.merger.drain(last)
                        }
                        None => s.merger.ready(now_ms()),
                    };
                    let lost = s.subscription.take_lost();
                    if lost > 0 {
                        s.pending.extend(lost_line(lost));
                    }
                    for event in ready {
                        s.pending.extend(event_line(&event));
                    }
                }
            }
        }
    });
    StreamBody::new(stream).boxed()
}
