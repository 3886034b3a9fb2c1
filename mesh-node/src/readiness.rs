//! The readiness endpoints (`--readiness-addr`). The agent's (default 127.0.0.1:15022): 200
//! once the source had the whole cluster and a pass was applied, with any per-pod problems,
//! source errors, refused policy objects and rules enforced more strictly than written in the
//! body (the agent keeps serving its last good state through them); 503 before. The
//! controller's (default 127.0.0.1:15023): 200 once it listed the cluster, leading or
//! following, with its last problem.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};

use crate::agent::AgentStatus;
use crate::controller::ControllerStatus;

/// What readiness answers: ready or not, and the body.
pub struct Report {
    pub ready: bool,
    pub body: String,
}

/// Serves the agent's readiness on `addr` in the background; returns the address bound (port
/// 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    status: Arc<Mutex<AgentStatus>>,
) -> std::io::Result<SocketAddr> {
    serve_report(addr, move || agent_report(&status)).await
}

/// Serves the controller's readiness on `addr` in the background.
pub async fn serve_controller(
    addr: SocketAddr,
    status: Arc<Mutex<ControllerStatus>>,
) -> std::io::Result<SocketAddr> {
    serve_report(addr, move || {
        let s = status.lock().map(|s| s.clone()).unwrap_or_default();
        let mut body = match (s.synced, s.leading) {
            (false, _) => "not ready: no complete view of the cluster yet\n".to_owned(),
            (true, true) => "ready: leading (writing the status of policy objects)\n".to_owned(),
            (true, false) => "ready: following (another replica leads)\n".to_owned(),
        };
        if let Some(problem) = &s.problem {
            let _ = writeln!(body, "problem: {problem}");
        }
        Report {
            ready: s.synced,
            body,
        }
    })
    .await
}

async fn serve_report(
    addr: SocketAddr,
    report: impl Fn() -> Report + Clone + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let report = report.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    let Report { ready, body } = report();
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    if !ready {
                        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    }
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn agent_report(status: &Mutex<AgentStatus>) -> Report {
    let s = status.lock().map(|s| s.clone()).unwrap_or_default();
    let mut body = if s.synced {
        "ready\n".to_owned()
    } else {
        "not ready: no complete view of the cluster yet\n".to_owned()
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
    Report {
        ready: s.synced,
        body,
    }
}
