//! The tunnel's HTTP endpoints in its own namespace: admin (15000: `/config_dump`, `/flows`,
//! `/logging`), metrics (15020), readiness (15021).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::logging::SetLogFilter;
use crate::pods::PodsStatus;
use crate::proxy::context::Tunnel;

/// What the endpoints report on.
pub struct AdminState {
    pub tunnel: Arc<Tunnel>,
    pub node: String,
    pub config: serde_json::Value,
    pub pods: Arc<Mutex<PodsStatus>>,
    pub set_log_filter: SetLogFilter,
    pub log_filter: Mutex<String>,
    /// Whether the state source has delivered (the agent's first snapshot), and what it is.
    pub source_ready: tokio::sync::watch::Receiver<bool>,
    pub source: String,
}

/// Which endpoint a listener serves.
#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

/// Binds `addr` now (so a bad address fails start-up) and serves it until `stop`.
pub async fn serve(
    addr: SocketAddr,
    endpoint: Endpoint,
    state: Arc<AdminState>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, ?endpoint, "serving");
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => { warn!(%addr, error = %e, "accept failed"); continue; }
                },
                _ = stop.cancelled() => return,
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move {
                        let flows = matches!(endpoint, Endpoint::Admin)
                            && req.method() == Method::GET
                            && req.uri().path() == "/flows";
                        let response = if flows {
                            crate::flows_http::flows(
                                req.uri().query().unwrap_or(""),
                                &state.tunnel.metrics,
                            )
                        } else {
                            route(endpoint, req, &state).await.map(BodyExt::boxed)
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(error = %e, "admin connection ended");
                }
            });
        }
    });
    Ok(())
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::OK,
        serde_json::to_vec_pretty(value).unwrap_or_default(),
    );
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

async fn route(
    endpoint: Endpoint,
    req: Request<Incoming>,
    state: &AdminState,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    match (endpoint, req.method().clone(), path.as_str()) {
        (_, Method::GET, "/healthz/ready") => readiness(state),
        (Endpoint::Metrics, Method::GET, "/metrics") => {
            let mut response = text(StatusCode::OK, state.tunnel.metrics.encode());
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        (Endpoint::Admin, Method::GET, "/config_dump") => json(&config_dump(state)),
        (Endpoint::Admin, Method::GET, "/logging") => text(
            StatusCode::OK,
            format!(
                "{}\n",
                state
                    .log_filter
                    .lock()
                    .map(|f| f.clone())
                    .unwrap_or_default()
            ),
        ),
        (Endpoint::Admin, Method::POST, "/logging") => set_logging(req, state).await,
        (Endpoint::Admin, _, _) => text(
            StatusCode::NOT_FOUND,
            "endpoints: GET /config_dump, GET /flows?<filters>&last=N&follow=true, GET /healthz/ready, GET /logging, POST /logging?level=<filter>\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn readiness(state: &AdminState) -> Response<Full<Bytes>> {
    if !*state.source_ready.borrow() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: no state yet from {}\n", state.source),
        );
    }
    let pods = state.pods.lock().map(|p| p.clone()).unwrap_or_default();
    if !pods.synced {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: local pods not started yet\n",
        );
    }
    if !pods.failed.is_empty() {
        let reasons: Vec<String> = pods.failed.values().cloned().collect();
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("; ")),
        );
    }
    // Serving, while some pods' first certificates are on their way (their connections are
    // refused with flag CERT meanwhile): ready, and said.
    let waiting = state.tunnel.certs.waiting();
    if waiting.is_empty() {
        return text(StatusCode::OK, "ready\n");
    }
    let mut body = String::from("ready; waiting for the certificates of:\n");
    for (identity, reason) in waiting {
        body.push_str(&format!("  {identity}: {reason}\n"));
    }
    text(StatusCode::OK, body)
}

fn config_dump(state: &AdminState) -> serde_json::Value {
    let cluster = state.tunnel.state.borrow().clone();
    let pods = state.pods.lock().map(|p| p.clone()).unwrap_or_default();
    // Per local workload, the MeshPolicies in force and its mTLS mode.
    let policies: serde_json::Map<String, serde_json::Value> = cluster
        .local_workloads(&state.node)
        .map(|w| {
            let in_force = serde_json::json!({ "mtls": w.mtls, "policies": w.policies });
            (w.key(), in_force)
        })
        .collect();
    serde_json::json!({
        "node": state.node,
        "trustDomain": state.tunnel.trust_domain(),
        "config": state.config,
        "pods": pods,
        "certificates": {
            "waiting": state.tunnel.certs.waiting(),
        },
        "policies": policies,
        "state": cluster.spec(),
    })
}

async fn set_logging(req: Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let from_query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")))
        .map(str::to_owned);
    let level = match from_query {
        Some(level) => level,
        None => match req.into_body().collect().await {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).trim().to_owned(),
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("cannot read body: {e}\n")),
        },
    };
    if level.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "give the filter as ?level=<filter> or as the body, e.g. level=debug\n",
        );
    }
    match (state.set_log_filter)(&level) {
        Ok(()) => {
            if let Ok(mut f) = state.log_filter.lock() {
                *f = level.clone();
            }
            info!(filter = %level, "log filter changed");
            text(StatusCode::OK, format!("{level}\n"))
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}
