//! The agent's readiness endpoint (`--readiness-addr`, default 127.0.0.1:15022): 200 once the
//! source had the whole cluster and a pass was applied, with any per-pod problems, source
//! errors, refused policy objects and rules enforced more strictly than written in the body
//! (the agent keeps serving its last good state through them); 503 before.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};

use crate::agent::AgentStatus;

/// Serves readiness on `addr` in the background; returns the address bound (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    status: Arc<Mutex<AgentStatus>>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let status = status.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    let answer = answer(&status);
                    async move { Ok::<_, Infallible>(answer) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn answer(status: &Mutex<AgentStatus>) -> Response<Full<Bytes>> {
    let s = status.lock().map(|s| s.clone()).unwrap_or_default();
    let (code, mut body) = if s.synced {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no complete view of the cluster yet\n".to_owned(),
        )
    };
    for e in &s.source_errors {
        let _ = writeln!(body, "source: {e}");
    }
    for p in &s.problems {
        let _ = writeln!(body, "pod: {p}");
    }
    for p in &s.policies {
        let _ = writeln!(body, "policy: {p}");
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response
}
