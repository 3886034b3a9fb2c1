//! The application's side of a parsed connection: one TCP connection to the application per
//! client connection (as with copied bytes: the application sees one connection for one), on
//! which HTTP is spoken in the version of the client's first request. The HTTP connection to
//! the application is not a task of its own: `serve` drives it on the client connection's task
//! ([`Upstream::take_driver`]), so an HTTP/1.1 request and its response cross no task (each
//! crossing is a wake-up, on another thread as often as not).

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Notify};
use tracing::debug;

/// A body as the proxy forwards it either way.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The HTTP connection to the application: runs until it closes, or every sender is gone.
pub type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Why a request did not reach the application.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("HTTP exchange with the application failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the HTTP handshake with the application failed on an earlier request")]
    Failed,
}

/// The connection to the application, opened (TCP) before the first request and spoken to
/// once that request says which HTTP version.
pub struct Upstream {
    state: Mutex<State>,
    /// The connection's driver, made by the first request, until `serve` takes it.
    driver: std::sync::Mutex<Option<Driver>>,
    driver_made: Notify,
}

enum State {
    /// Connected, no request yet.
    Connected(TcpStream),
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
    /// The first handshake failed.
    Failed,
}

impl Upstream {
    pub fn new(app: TcpStream) -> Self {
        Upstream {
            state: Mutex::new(State::Connected(app)),
            driver: std::sync::Mutex::new(None),
            driver_made: Notify::new(),
        }
    }

    /// Waits until the first request made the connection's driver.
    pub async fn driver_made(&self) {
        self.driver_made.notified().await;
    }

    /// The connection's driver, for the caller to run (once).
    pub fn take_driver(&self) -> Option<Driver> {
        self.driver.lock().ok()?.take()
    }

    /// Lets the connection to the application end once idle: its senders are dropped.
    pub fn close(&self) {
        if let Ok(mut state) = self.state.try_lock() {
            *state = State::Failed;
        }
    }

    fn hand_over(&self, driver: Driver) {
        if let Ok(mut slot) = self.driver.lock() {
            *slot = Some(driver);
        }
        self.driver_made.notify_one();
    }

    /// Sends `request` to the application and waits for its response head. Requests of an
    /// HTTP/1.1 client come one at a time (the client's connection serves them in order);
    /// HTTP/2 ones are multiplexed.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        let mut state = self.state.lock().await;
        if let State::Connected(_) = &*state {
            let State::Connected(app) = std::mem::replace(&mut *state, State::Failed) else {
                unreachable!("matched just above")
            };
            *state = self.handshake(app, request.version()).await?;
        }
        match &mut *state {
            State::Http1(sender) => {
                sender.ready().await?;
                let response = sender.send_request(request);
                drop(state);
                Ok(response.await?)
            }
            State::Http2(sender) => {
                let mut sender = sender.clone();
                drop(state);
                sender.ready().await?;
                Ok(sender.send_request(request).await?)
            }
            // A handshake that failed was answered to the request that made it; the client's
            // next request on the same connection gets the same answer.
            State::Connected(_) | State::Failed => Err(UpstreamError::Failed),
        }
    }

    async fn handshake(&self, app: TcpStream, version: Version) -> hyper::Result<State> {
        let io = TokioIo::new(app);
        if version == Version::HTTP_2 {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), io).await?;
            self.hand_over(Box::pin(async move {
                if let Err(error) = connection.await {
                    debug!(%error, "HTTP/2 connection to the application ended");
                }
            }));
            Ok(State::Http2(sender))
        } else {
            let (sender, connection) = http1::Builder::new()
                .preserve_header_case(true)
                .handshake(io)
                .await?;
            self.hand_over(Box::pin(async move {
                // Upgrades (WebSocket, CONNECT) hand the socket to the proxy's copy.
                if let Err(error) = connection.with_upgrades().await {
                    debug!(%error, "HTTP/1.1 connection to the application ended");
                }
            }));
            Ok(State::Http1(sender))
        }
    }
}
