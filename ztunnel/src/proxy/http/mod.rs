//! The HTTP proxy of a port whose traffic is parsed (`PortHandling::Http`): the client's
//! connection is served as HTTP/1.1 or HTTP/2 with prior knowledge (`hyper`), each request is
//! decided by the pod's policies with its method, path, host and headers, answered 403 when
//! refused, and otherwise passed to the application untouched (streaming bodies, trailers,
//! keep-alive, `Expect: 100-continue`, upgrades such as WebSocket); each one is counted and
//! logged. Bytes that are not HTTP are refused (fail closed: a policy on HTTP fields must not
//! be bypassed by speaking something else). The request path is a `tower` stack
//! (`layers.rs`: record, authorize; `forward.rs`).

mod coalesce;
mod forward;
mod layers;
mod path;
mod record;
mod upstream;

use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tower::ServiceBuilder;
use tracing::debug;

use super::ProxyError;
use super::authorize::{Inbound, revoked};
use super::context::{Pod, Tunnel};
use super::copy::Totals;
use super::counted_io::CountedIo;
use crate::state::PortHandling;
use crate::telemetry::ConnectionLabels;
use forward::Forward;
use layers::{authorize_layer, record_layer};
use record::ConnectionTelemetry;
use upstream::Driver;

/// Largest request head (line and headers) a client may send.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent requests on one HTTP/2 client connection.
const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// One client connection to a pod's parsed port, as its requests see it.
pub struct HttpConnection {
    pub tunnel: Arc<Tunnel>,
    pub pod: Arc<Pod>,
    /// Who connects, from where, to where (the connection was allowed).
    pub inbound: Inbound,
    /// The destination record's labels, which its requests' metrics carry.
    pub labels: ConnectionLabels,
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
async fn serve<IO>(
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
    let connection = Arc::new(connection);
    let telemetry = Arc::new(ConnectionTelemetry::new(
        connection.tunnel.metrics.clone(),
        connection.labels.clone(),
        connection.inbound.ip,
    ));
    let forward = Forward::new(app, connection.clone());
    let service = ServiceBuilder::new()
        .layer(record_layer(telemetry))
        .layer(authorize_layer(connection.clone()))
        .service(forward.clone());
    let service = TowerToHyperService::new(service);
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
            () = forward.upstream().driver_made(), if driver.is_none() && !app_closed => {
                driver = forward.upstream().take_driver();
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
    let mut upgrades = forward.take_upgrades();
    forward.upstream().close();
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
        Err(error) => Err(classify(&*error, &connection)),
    }
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
