//! The innermost service of a parsed connection: an allowed request goes to the application
//! (`upstream.rs`), untouched but for an `Upgrade: h2c`; an upgrade the application accepts
//! (`101`, or a CONNECT's `2xx`) turns into copied bytes both ways.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::header::{CONNECTION, UPGRADE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tower::Service;
use tracing::debug;

use super::HttpConnection;
use super::layers::answer;
use super::upstream::{Body, Upstream};

/// Forwards to the application; cloned into each request's call, shared by all of them.
#[derive(Clone)]
pub struct Forward(Arc<Shared>);

struct Shared {
    connection: Arc<HttpConnection>,
    upstream: Upstream,
    /// Upgraded requests' byte copies (WebSocket, CONNECT), ended with the connection.
    upgrades: Mutex<JoinSet<()>>,
}

impl Forward {
    /// Forwards to the application on `app` (connected).
    pub fn new(app: TcpStream, connection: Arc<HttpConnection>) -> Self {
        Forward(Arc::new(Shared {
            connection,
            upstream: Upstream::new(app),
            upgrades: Mutex::new(JoinSet::new()),
        }))
    }

    pub fn upstream(&self) -> &Upstream {
        &self.0.upstream
    }

    /// The copies of upgraded requests so far, for the connection to finish.
    pub fn take_upgrades(&self) -> JoinSet<()> {
        std::mem::take(&mut *lock(&self.0.upgrades))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding it; a poisoned set of tasks is still a set of tasks.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The connection to the application takes requests one at a time (HTTP/1.1) or as
        // many as it may (HTTP/2) itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            refuse_h2c_upgrade(&mut request);
            let upgrade = wants_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
            let is_connect = request.method() == Method::CONNECT;
            match shared.upstream.send(request).await {
                Ok(mut response) => {
                    let status = response.status();
                    let upgraded = status == StatusCode::SWITCHING_PROTOCOLS
                        || (is_connect && status.is_success());
                    if let (Some(client), true) = (upgrade, upgraded) {
                        let app = hyper::upgrade::on(&mut response);
                        lock(&shared.upgrades).spawn(copy_upgraded(client, app));
                    }
                    Ok(response.map(|body| body.boxed()))
                }
                Err(error) => {
                    debug!(pod = %shared.connection.pod.workload.key(), %error, "a request did not reach the application");
                    Ok(answer(
                        StatusCode::BAD_GATEWAY,
                        "the application did not answer\n",
                    ))
                }
            }
        })
    }
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
