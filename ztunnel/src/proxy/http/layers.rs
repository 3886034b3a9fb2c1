//! The request path of a parsed connection as `tower` layers, outermost first:
//! [`record_layer`] (the path normalized, then the request counted and logged as its response
//! ends), [`authorize_layer`] (the pod's policies decide: refused, `403` from the tunnel
//! itself), then the service that forwards to the application (`forward.rs`).

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use policy::authorize::{Headers, HttpAttributes};
use tower::layer::layer_fn;
use tower::{Layer, Service};
use tracing::debug;

use super::HttpConnection;
use super::path;
use super::record::{ConnectionTelemetry, CountedBody, RequestRecord};
use super::upstream::Body;
use crate::proxy::authorize::authorize_request;

/// How much of a refused request's body is read (and dropped), and for how long.
const DISCARDED_BODY_BYTES: usize = 64 * 1024;
const DISCARD_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
/// The body of a refused request.
const DENIED_BODY: &str = "access denied by mesh policy\n";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the authorize step decided, carried on the response for the record.
#[derive(Clone, Debug)]
struct Ruled {
    /// `allow` or `deny`.
    verdict: &'static str,
    policy: Option<String>,
    /// The Audit policy that matched, if one did.
    audit: Option<String>,
}

/// Normalizes the path, counts the request body, and reports the request once its response
/// ends: `weft_requests_total` and the histograms, one access-log event.
pub fn record_layer<S>(telemetry: Arc<ConnectionTelemetry>) -> impl Layer<S, Service = Record<S>> {
    layer_fn(move |inner| Record {
        inner,
        telemetry: telemetry.clone(),
    })
}

#[derive(Clone)]
pub struct Record<S> {
    inner: S,
    telemetry: Arc<ConnectionTelemetry>,
}

impl<S> Service<Request<Incoming>> for Record<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let started = Instant::now();
        normalize_path(&mut request);
        let request_bytes = Arc::new(AtomicU64::new(0));
        let mut record = RequestRecord {
            telemetry: self.telemetry.clone(),
            started,
            method: request.method().clone(),
            authority: authority(&request).to_owned(),
            path: request.uri().path().to_owned(),
            status: StatusCode::OK,
            protocol: protocol_of(&request),
            verdict: "allow",
            policy: None,
            audit: None,
            request_bytes: request_bytes.clone(),
        };
        let request = request.map(|body| CountedBody::request(body, request_bytes).boxed());
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            record.status = response.status();
            if let Some(ruled) = response.extensions_mut().remove::<Ruled>() {
                record.verdict = ruled.verdict;
                record.policy = ruled.policy;
                record.audit = ruled.audit;
            }
            Ok(response.map(|body| CountedBody::response(body, record).boxed()))
        })
    }
}

/// The pod's policies decide each request with its method, path, authority and headers, with
/// the state of the moment; a refused one is answered `403` here and goes no further.
pub fn authorize_layer<S>(
    connection: Arc<HttpConnection>,
) -> impl Layer<S, Service = Authorize<S>> {
    layer_fn(move |inner| Authorize {
        inner,
        connection: connection.clone(),
    })
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    connection: Arc<HttpConnection>,
}

impl<S> Service<Request<Body>> for Authorize<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let c = &self.connection;
        let ruling = {
            let attributes = HttpAttributes {
                method: request.method().as_str(),
                path: request.uri().path(),
                host: authority(&request),
                header: &HeaderView(request.headers()),
            };
            authorize_request(&c.tunnel, &c.pod, &c.inbound, &attributes)
        };
        let ruled = Ruled {
            verdict: if ruling.refused.is_some() {
                "deny"
            } else {
                "allow"
            },
            policy: ruling.policy,
            audit: ruling.audited,
        };
        if let Some(refused) = &ruling.refused {
            debug!(pod = %c.pod.workload.key(), method = %request.method(), path = request.uri().path(), reason = %refused, "refused a request");
            return Box::pin(async move {
                discard_body(request.into_body()).await;
                let mut response = answer(StatusCode::FORBIDDEN, DENIED_BODY);
                response.extensions_mut().insert(ruled);
                Ok(response)
            });
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            response.extensions_mut().insert(ruled);
            Ok(response)
        })
    }
}

/// Reads and drops a refused request's body, when it is small and comes at once, so that the
/// client's connection stays usable for its next request (HTTP/1.1 closes a connection whose
/// request body was left unread; HTTP/2 resets the stream, which some clients report as an
/// error); a larger or slower body is left, with that cost.
async fn discard_body(body: Body) {
    let limited = http_body_util::Limited::new(body, DISCARDED_BODY_BYTES);
    let _ = tokio::time::timeout(DISCARD_WAIT, limited.collect()).await;
}

/// A short plain-text answer from the tunnel itself.
pub fn answer(status: StatusCode, body: &'static str) -> Response<Body> {
    let body = Full::new(Bytes::from_static(body.as_bytes())).map_err(|never| match never {});
    let mut response = Response::new(body.boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// A request's headers as a policy looks them up.
struct HeaderView<'a>(&'a http::HeaderMap);

impl Headers for HeaderView<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Gives the request the path its decision sees (see `path.rs`).
fn normalize_path<B>(request: &mut Request<B>) {
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
