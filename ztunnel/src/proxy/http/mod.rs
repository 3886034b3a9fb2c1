//! The HTTP proxy of a port whose traffic is parsed (`PortHandling::Http`): the client's
//! connection is served as HTTP/1.1 or HTTP/2 with prior knowledge (`hyper`), each request is
//! decided by the pod's policies with its method, path, host and headers, answered 403 when
//! refused, and otherwise passed to the application untouched (streaming bodies, trailers,
//! keep-alive, `Expect: 100-continue`, upgrades such as WebSocket); each one is counted and
//! logged. Bytes that are not HTTP are refused (fail closed: a policy on HTTP fields must not
//! be bypassed by speaking something else).

mod coalesce;
mod path;
mod record;
mod upstream;

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use policy::authorize::{Headers, HttpAttributes};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tracing::debug;

use super::ProxyError;
use super::authorize::{Inbound, authorize_request, revoked};
use super::context::{Pod, Tunnel};
use super::copy::Totals;
use super::counted_io::CountedIo;
use crate::state::PortHandling;
use crate::telemetry::ConnectionLabels;
use record::{ConnectionTelemetry, CountedBody, RequestRecord};
use upstream::{Body, Driver, Upstream};

/// Largest request head (line and headers) a client may send.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent requests on one HTTP/2 client connection.
const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// How much of a refused request's body is read (and dropped), and for how long.
const DISCARDED_BODY_BYTES: usize = 64 * 1024;
const DISCARD_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
/// The body of a refused request.
const DENIED_BODY: &str = "access denied by mesh policy\n";

/// One client connection to a pod's parsed port, as its requests see it.
pub struct HttpConnection {
    pub tunnel: Arc<Tunnel>,
    pub pod: Arc<Pod>,
    /// Who connects, from where, to where (the connection was allowed).
    pub inbound: Inbound,
    /// The destination record's labels, which its requests' metrics carry.
    pub labels: ConnectionLabels,
}

/// What the requests of a connection share.
struct Shared {
    connection: HttpConnection,
    telemetry: Arc<ConnectionTelemetry>,
    upstream: Upstream,
    /// Upgraded requests' byte copies (WebSocket, CONNECT), ended with the connection.
    upgrades: Mutex<JoinSet<()>>,
}

/// [`serve`], until a policy change no longer allows the connection (its requests are each
/// decided with the policies of the moment anyway).
pub async fn serve_until_revoked<IO>(
    client: IO,
    app: TcpStream,
    connection: HttpConnection,
    read: Vec<Counter>,
    written: Vec<Counter>,
) -> Result<Totals, ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tunnel, pod, inbound) = (
        connection.tunnel.clone(),
        connection.pod.clone(),
        connection.inbound.clone(),
    );
    coalesce::Coalesced::new(Box::pin(async move {
        tokio::select! {
            result = serve(client, app, connection, read, written) => result,
            refused = revoked(&tunnel, &pod, &inbound, PortHandling::Http) => Err(refused),
        }
    }))
    .await
}

/// Serves `client` as HTTP until it closes, passing allowed requests to the application on
/// `app` (already connected). Bytes read from the client are counted into `read`, bytes
/// written to it into `written`; the totals are the client side's.
pub async fn serve<IO>(
    client: IO,
    app: TcpStream,
    connection: HttpConnection,
    read: Vec<Counter>,
    written: Vec<Counter>,
) -> Result<Totals, ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (client, tally) = CountedIo::new(client, read, written);
    let telemetry = Arc::new(ConnectionTelemetry::new(
        connection.tunnel.metrics.clone(),
        connection.labels.clone(),
        connection.inbound.ip,
    ));
    let shared = Arc::new(Shared {
        connection,
        telemetry,
        upstream: Upstream::new(app),
        upgrades: Mutex::new(JoinSet::new()),
    });
    let service = {
        let shared = shared.clone();
        hyper::service::service_fn(move |request| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(&shared, request).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // The application decides how long an idle connection lives (its close is passed on).
        .header_read_timeout(None)
        .preserve_header_case(true)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let served = builder.serve_connection_with_upgrades(TokioIo::new(client), service);
    tokio::pin!(served);
    // The connection to the application, driven here beside the client's (see `upstream.rs`).
    let mut driver: Option<Driver> = None;
    let mut app_closed = false;
    let result = loop {
        tokio::select! {
            result = served.as_mut() => break result,
            () = shared.upstream.driver_made(), if driver.is_none() && !app_closed => {
                driver = shared.upstream.take_driver();
            }
            () = async { if let Some(d) = driver.as_mut() { d.await } }, if driver.is_some() => {
                // The application closed its side: close the client's once its requests are
                // answered, as a copied connection would pass the close on.
                driver = None;
                app_closed = true;
                served.as_mut().graceful_shutdown();
            }
        }
    };
    // Upgraded requests go on as copies: the driver hands the application's socket over as
    // it ends. Without any, the connection to the application just closes.
    let mut upgrades = std::mem::take(&mut *lock(&shared.upgrades));
    shared.upstream.close();
    if !upgrades.is_empty() {
        let driven = async {
            if let Some(driver) = driver {
                driver.await;
            }
        };
        let copied = async { while upgrades.join_next().await.is_some() {} };
        tokio::join!(driven, copied);
    }
    match result {
        Ok(()) => Ok(tally.totals()),
        Err(error) => Err(classify(&*error, &shared.connection)),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding it; a poisoned set of tasks is still a set of tasks.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a connection's serving error says to the user.
fn classify(
    error: &(dyn std::error::Error + Send + Sync + 'static),
    connection: &HttpConnection,
) -> ProxyError {
    let not_http = error
        .downcast_ref::<hyper::Error>()
        .is_some_and(|e| e.is_parse() || e.is_parse_too_large());
    if not_http {
        let port = connection.inbound.target.port();
        debug!(pod = %connection.pod.workload.key(), client = %connection.inbound.ip, port, %error, "refused bytes that are not HTTP on an HTTP port");
        ProxyError::NotHttp {
            port,
            reason: error.to_string(),
        }
    } else {
        ProxyError::HttpConnection(error.to_string())
    }
}

/// Decides one request, then answers it (403) or passes it on.
async fn handle(shared: &Shared, mut request: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let connection = &shared.connection;
    normalize_path(&mut request);
    let ruling = {
        let attributes = HttpAttributes {
            method: request.method().as_str(),
            path: request.uri().path(),
            host: authority(&request),
            header: &HeaderView(request.headers()),
        };
        authorize_request(
            &connection.tunnel,
            &connection.pod,
            &connection.inbound,
            &attributes,
        )
    };
    let mut record = RequestRecord {
        telemetry: shared.telemetry.clone(),
        started,
        method: request.method().clone(),
        authority: authority(&request).to_owned(),
        path: request.uri().path().to_owned(),
        status: StatusCode::FORBIDDEN,
        protocol: protocol_of(&request),
        verdict: if ruling.refused.is_some() {
            "deny"
        } else {
            "allow"
        },
        policy: ruling.policy,
        request_bytes: Arc::default(),
    };
    if let Some(refused) = &ruling.refused {
        debug!(pod = %connection.pod.workload.key(), method = %request.method(), path = request.uri().path(), reason = %refused, "refused a request");
        discard_body(request.into_body()).await;
        return answer(StatusCode::FORBIDDEN, DENIED_BODY, record);
    }
    refuse_h2c_upgrade(&mut request);
    let upgrade = wants_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
    let is_connect = request.method() == Method::CONNECT;
    let request_bytes = record.request_bytes.clone();
    let request = request.map(|body| CountedBody::request(body, request_bytes).boxed());
    match shared.upstream.send(request).await {
        Ok(mut response) => {
            let status = response.status();
            let upgraded =
                status == StatusCode::SWITCHING_PROTOCOLS || (is_connect && status.is_success());
            if let (Some(client), true) = (upgrade, upgraded) {
                let app = hyper::upgrade::on(&mut response);
                lock(&shared.upgrades).spawn(copy_upgraded(client, app));
            }
            record.status = status;
            response.map(|body| CountedBody::response(body, record).boxed())
        }
        Err(error) => {
            debug!(pod = %connection.pod.workload.key(), %error, "a request did not reach the application");
            record.status = StatusCode::BAD_GATEWAY;
            answer(
                StatusCode::BAD_GATEWAY,
                "the application did not answer\n",
                record,
            )
        }
    }
}

/// A request's headers as a policy looks them up.
struct HeaderView<'a>(&'a http::HeaderMap);

impl Headers for HeaderView<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Reads and drops a refused request's body, when it is small and comes at once, so that the
/// client's connection stays usable for its next request (HTTP/1.1 closes a connection whose
/// request body was left unread; HTTP/2 resets the stream, which some clients report as an
/// error); a larger or slower body is left, with that cost.
async fn discard_body(body: Incoming) {
    let limited = http_body_util::Limited::new(body, DISCARDED_BODY_BYTES);
    let _ = tokio::time::timeout(DISCARD_WAIT, limited.collect()).await;
}

/// A short plain-text answer from the tunnel itself.
fn answer(status: StatusCode, body: &'static str, record: RequestRecord) -> Response<Body> {
    let body = Full::new(Bytes::from_static(body.as_bytes())).map_err(|never| match never {});
    let mut response = Response::new(CountedBody::response(body, record).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// Gives the request the path its decision saw (see `path.rs`).
fn normalize_path(request: &mut Request<Incoming>) {
    let uri = request.uri();
    let Cow::Owned(normal) = path::normalize(uri.path()) else {
        return;
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    let mut parts = uri.clone().into_parts();
    match path_and_query.parse() {
        Ok(path_and_query) => parts.path_and_query = Some(path_and_query),
        // Made only of characters of the original path: parses as it did.
        Err(_) => return,
    }
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

/// The request's authority: the URI's (HTTP/2, absolute form), else the `Host` header.
fn authority<B>(request: &Request<B>) -> &str {
    request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers().get(HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or_default()
}

/// `grpc` for gRPC requests (by content type), else `http`.
fn protocol_of<B>(request: &Request<B>) -> &'static str {
    let grpc = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc { "grpc" } else { "http" }
}

/// Whether the request asks to turn the connection into something else (`Upgrade`, or
/// CONNECT): allowed, its bytes are then copied as they come.
fn wants_upgrade<B>(request: &Request<B>) -> bool {
    request.method() == Method::CONNECT
        || (request.headers().contains_key(UPGRADE)
            && request
                .headers()
                .get_all(CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|token| token.trim().eq_ignore_ascii_case("upgrade")))
}

/// An upgrade to HTTP/2 (`Upgrade: h2c`) would carry requests the tunnel no longer decides:
/// the header is removed, so the application answers in HTTP/1.1 (as Envoy does).
fn refuse_h2c_upgrade<B>(request: &mut Request<B>) {
    let h2c = request
        .headers()
        .get_all(UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("h2c"));
    if h2c {
        request.headers_mut().remove(UPGRADE);
        request.headers_mut().remove("http2-settings");
    }
}

/// Copies an upgraded connection's bytes both ways until both ends close.
async fn copy_upgraded(client: hyper::upgrade::OnUpgrade, app: hyper::upgrade::OnUpgrade) {
    let (client, app) = match tokio::try_join!(client, app) {
        Ok(both) => both,
        Err(error) => {
            debug!(%error, "an upgrade did not complete");
            return;
        }
    };
    let (mut client, mut app) = (TokioIo::new(client), TokioIo::new(app));
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut app).await {
        debug!(%error, "an upgraded connection ended");
    }
}
