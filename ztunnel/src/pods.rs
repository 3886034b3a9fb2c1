//! Runs the listeners of every local pod in its own network namespace, following the state.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::inbound_capture::{InboundCapture, InboundCaptureStatus, InboundListener};
use crate::netns::{PodNetns, SocketFactory, SocketOptions};
use crate::proxy::context::{Pod, Tunnel};
use crate::proxy::hbone::serve_hbone_connection;
use crate::proxy::inbound_plaintext::{INBOUND_PLAINTEXT_PORT, serve_inbound_plaintext};
use crate::proxy::outbound::{Entry, HBONE_PORT, serve_outbound};
use crate::state::{Protocol, State, Workload, WorkloadIdentity, state_id};
use crate::tls::TlsError;

/// Outbound listener for captured connections.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// Explicit SOCKS5 entry into the mesh.
pub const SOCKS5_PORT: u16 = 15080;

/// Why a local pod's listeners could not start; retried on the next state change.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(
        "pod {pod} is on this node but its network namespace is unknown (no netns in the state, none from the node agent)"
    )]
    NoNetns { pod: String },
    #[error("pod {pod}: {source}")]
    Netns { pod: String, source: io::Error },
    #[error("pod {pod}: cannot listen on {addr} in its network namespace: {source}")]
    Listen {
        pod: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("pod {pod}: {source}")]
    Tls { pod: String, source: TlsError },
}

struct RunningPod {
    workload: Arc<Workload>,
    /// The namespace it runs in (its identity), if it came from the agent.
    netns: Option<u64>,
    stop: CancellationToken,
    /// Duplicates of the plaintext inbound listeners, for capture's registration (by the
    /// agent, or by the tunnel itself without one); closed with the pod.
    inbound: Vec<Arc<InboundListener>>,
    /// The accept loops, which hold the listening sockets until they end.
    accepting: Vec<tokio::task::JoinHandle<()>>,
}

/// Which local pods run and which failed, for readiness and `/config_dump`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PodsStatus {
    /// Set once the first state has been applied.
    pub synced: bool,
    pub running: Vec<String>,
    pub failed: BTreeMap<String, String>,
    /// Registration with the node's eBPF capture, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound_capture: Option<InboundCaptureStatus>,
}

/// Keeps the set of running pods equal to the local HBONE workloads of the state.
/// With `inbound_capture`, also keeps every running pod's plaintext inbound listeners
/// registered with the node's eBPF capture (checked four times a second).
pub async fn run_pods(
    tunnel: Arc<Tunnel>,
    node: String,
    sockets: SocketOptions,
    status: Arc<Mutex<PodsStatus>>,
    mut inbound_capture: Option<InboundCapture>,
    applied: tokio::sync::watch::Sender<usize>,
) {
    let mut running: HashMap<String, RunningPod> = HashMap::new();
    let mut state_rx = tunnel.state.clone();
    let mut capture_tick = tokio::time::interval(CAPTURE_SYNC_INTERVAL);
    capture_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let state = state_rx.borrow_and_update().clone();
        let failed = reconcile(&tunnel, &node, sockets, &state, &mut running).await;
        // Published before the state counts as applied: the agent follower hands new
        // listeners over before it acknowledges.
        publish_inbound(&tunnel, &running);
        applied.send_replace(state_id(&state));
        let in_use = running
            .values()
            .map(|pod| pod.workload.identity(tunnel.trust_domain()))
            .collect();
        tunnel.certs.retain(&in_use).await;
        for identity in &in_use {
            tunnel.certs.prefetch(identity);
        }
        if let Ok(mut s) = status.lock() {
            s.synced = true;
            s.running = running.keys().cloned().collect();
            s.running.sort();
            s.failed = failed;
        }
        loop {
            if let Some(capture) = inbound_capture.as_mut() {
                capture.sync(
                    running
                        .iter()
                        .map(|(key, pod)| (key, pod.inbound.as_slice())),
                );
                if let Ok(mut s) = status.lock() {
                    s.inbound_capture = Some(capture.status());
                }
            }
            tokio::select! {
                changed = state_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                _ = tunnel.shutdown.cancelled() => return,
                _ = capture_tick.tick(), if inbound_capture.is_some() => {}
            }
        }
    }
}

/// Which namespace (from the agent) pod `key` would run in now.
fn netns_id(tunnel: &Tunnel, key: &str) -> Option<u64> {
    tunnel.pod_namespaces.identity(key)
}

/// How long a stopped pod's accept loops may take to close their listeners.
const LISTENERS_CLOSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// How often registration with capture is checked (a reinstalled capture is picked up within).
const CAPTURE_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

async fn reconcile(
    tunnel: &Arc<Tunnel>,
    node: &str,
    sockets: SocketOptions,
    state: &State,
    running: &mut HashMap<String, RunningPod>,
) -> BTreeMap<String, String> {
    let wanted: HashMap<String, Arc<Workload>> = state
        .local_workloads(node)
        .filter(|w| w.protocol == Protocol::Hbone)
        .map(|w| (w.key(), w.clone()))
        .collect();
    let mut stopping = Vec::new();
    running.retain(|key, pod| {
        let keep = wanted
            .get(key)
            .is_some_and(|w| same_listeners(w, &pod.workload))
            && netns_id(tunnel, key) == pod.netns;
        if !keep {
            info!(pod = %key, "stopping pod listeners");
            tunnel.local_pods.remove(key);
            pod.stop.cancel();
            stopping.append(&mut pod.accepting);
        }
        keep
    });
    // A pod that restarts (a new service account, say) listens on the same ports in the same
    // namespace: its old listening sockets must be closed first, or the new ones would not
    // bind. An accept loop ends as soon as it sees the stop; the duplicates of its inbound
    // listeners kept for capture go with it.
    publish_inbound(tunnel, running);
    let closed = futures_util::future::join_all(stopping);
    if tokio::time::timeout(LISTENERS_CLOSE_WITHIN, closed)
        .await
        .is_err()
    {
        warn!("stopped pod listeners still open after {LISTENERS_CLOSE_WITHIN:?}");
    }
    // New pods start together, each on its own task so they spread over the runtime's
    // threads: a start is a few socket calls in the pod's namespace and a certificate.
    let mut starting = tokio::task::JoinSet::new();
    for (key, workload) in wanted {
        if running.contains_key(&key) {
            continue;
        }
        let tunnel = tunnel.clone();
        starting.spawn(async move {
            let started = start_pod(&tunnel, workload.clone(), sockets).await;
            (key, workload, started)
        });
    }
    let mut failed = BTreeMap::new();
    while let Some(joined) = starting.join_next().await {
        let (key, workload, started) = match joined {
            Ok(result) => result,
            Err(e) => {
                error!("a pod's start failed: {e}");
                continue;
            }
        };
        match started {
            Ok((stop, inbound, accepting)) => {
                info!(pod = %key, identity = %workload.identity(tunnel.trust_domain()), "pod listeners running");
                let netns = netns_id(tunnel, &key);
                running.insert(
                    key,
                    RunningPod {
                        netns,
                        workload,
                        stop,
                        inbound,
                        accepting,
                    },
                );
            }
            Err(e) => {
                error!("{e}");
                failed.insert(key, e.to_string());
            }
        }
    }
    failed
}

/// Publishes the running pods' inbound listeners (their duplicates) for capture's registration;
/// a stopped pod's are let go.
fn publish_inbound(tunnel: &Tunnel, running: &HashMap<String, RunningPod>) {
    tunnel.inbound_listeners.replace(
        running
            .iter()
            .map(|(key, pod)| (key.clone(), pod.inbound.clone()))
            .collect(),
    );
}

/// Whether two versions of a workload run the same listeners. Its policies and mTLS mode are
/// not among what matters: each connection reads them from the state, so a policy change
/// restarts nothing and drops no connection.
fn same_listeners(a: &Workload, b: &Workload) -> bool {
    let Workload {
        name,
        namespace,
        service_account,
        ips,
        node,
        netns,
        protocol,
        policies: _,
        mtls: _,
    } = a;
    *name == b.name
        && *namespace == b.namespace
        && *service_account == b.service_account
        && *ips == b.ips
        && *node == b.node
        && *netns == b.netns
        && *protocol == b.protocol
}

/// A pod whose listeners run: their stop, the inbound listeners' duplicates for capture, the
/// accept loops.
type Started = (
    CancellationToken,
    Vec<Arc<InboundListener>>,
    Vec<tokio::task::JoinHandle<()>>,
);

async fn start_pod(
    tunnel: &Arc<Tunnel>,
    workload: Arc<Workload>,
    options: SocketOptions,
) -> Result<Started, PodError> {
    let key = workload.key();
    let netns = match (tunnel.pod_namespaces.get(&key), workload.netns.as_ref()) {
        (Some(fd), _) => PodNetns::from_fd(&fd, &key),
        (None, Some(path)) => PodNetns::open(path),
        (None, None) => return Err(PodError::NoNetns { pod: key }),
    }
    .map_err(|source| PodError::Netns {
        pod: key.clone(),
        source,
    })?;
    let sockets = SocketFactory::pod(netns, options);
    let identity = workload.identity(tunnel.trust_domain());
    // The first certificate is fetched in the background (run_pods): listeners start at once,
    // and connections are refused with flag CERT until it arrives.
    let server_config = tunnel
        .tls
        .server_config(tunnel.certs.clone(), identity.clone())
        .map_err(|source| PodError::Tls {
            pod: key.clone(),
            source,
        })?;
    let has_v6 = workload.ips.iter().any(|ip| ip.is_ipv6());
    let pod = Arc::new(Pod {
        workload,
        identity,
        sockets: sockets.clone(),
    });

    let any4 = Ipv4Addr::UNSPECIFIED.into();
    let any6 = Ipv6Addr::UNSPECIFIED.into();
    let lo4 = Ipv4Addr::LOCALHOST.into();
    let lo6 = Ipv6Addr::LOCALHOST.into();
    let mut listeners = Vec::new();
    for (ip, port, kind) in [
        (any4, HBONE_PORT, Kind::Hbone),
        (any4, INBOUND_PLAINTEXT_PORT, Kind::InboundPlaintext),
        (lo4, OUTBOUND_CAPTURE_PORT, Kind::Outbound(Entry::Captured)),
        (lo4, SOCKS5_PORT, Kind::Outbound(Entry::Socks5)),
        (any6, HBONE_PORT, Kind::Hbone),
        (any6, INBOUND_PLAINTEXT_PORT, Kind::InboundPlaintext),
        (lo6, OUTBOUND_CAPTURE_PORT, Kind::Outbound(Entry::Captured)),
        (lo6, SOCKS5_PORT, Kind::Outbound(Entry::Socks5)),
    ] {
        let addr = SocketAddr::new(ip, port);
        match sockets.listen(addr).await {
            Ok(listener) => listeners.push((listener, kind)),
            // IPv6 listeners are best effort unless the pod has an IPv6 address.
            Err(e) if addr.is_ipv6() && !has_v6 => {
                debug!(pod = %key, %addr, error = %e, "no IPv6 listener")
            }
            Err(source) => {
                return Err(PodError::Listen {
                    pod: key,
                    addr,
                    source,
                });
            }
        }
    }

    let mut inbound = Vec::new();
    for (listener, kind) in &listeners {
        if matches!(kind, Kind::InboundPlaintext) {
            let family_v6 = listener.local_addr().is_ok_and(|a| a.is_ipv6());
            let ips = pod
                .workload
                .ips
                .iter()
                .copied()
                .filter(|ip| ip.is_ipv6() == family_v6)
                .collect();
            let duplicate = listener
                .as_fd()
                .try_clone_to_owned()
                .and_then(|fd| InboundListener::new(ips, fd))
                .map_err(|source| PodError::Netns {
                    pod: key.clone(),
                    source,
                })?;
            inbound.push(Arc::new(duplicate));
        }
    }

    let stop = tunnel.shutdown.child_token();
    let mut accepting = Vec::with_capacity(listeners.len());
    for (listener, kind) in listeners {
        let pod = pod.clone();
        let tunnel_for_conn = tunnel.clone();
        let config = server_config.clone();
        let handler = move |stream: TcpStream, peer: SocketAddr| {
            serve_connection(
                kind,
                stream,
                peer,
                config.clone(),
                pod.clone(),
                tunnel_for_conn.clone(),
            )
        };
        accepting.push(tokio::spawn(accept_loop(
            listener,
            stop.clone(),
            tunnel.clone(),
            handler,
        )));
    }
    tunnel.local_pods.insert(pod);
    Ok((stop, inbound, accepting))
}

/// One accepted connection of a pod's listener, for its whole life (a task of its own).
async fn serve_connection(
    kind: Kind,
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    pod: Arc<Pod>,
    tunnel: Arc<Tunnel>,
) {
    // A task is as large as the largest of these: the HBONE and plaintext inbound connections
    // (few: an HBONE one carries many streams) are boxed so that each held outbound
    // connection carries only its own state.
    match kind {
        Kind::Hbone => Box::pin(serve_hbone_connection(stream, peer, config, pod, tunnel)).await,
        Kind::InboundPlaintext => {
            Box::pin(serve_inbound_plaintext(stream, peer, pod, tunnel)).await
        }
        Kind::Outbound(entry) => serve_outbound(stream, peer, entry, pod, tunnel).await,
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Hbone,
    InboundPlaintext,
    Outbound(Entry),
}

/// Accepts until `stop`, running each connection as a tracked task (drained on shutdown).
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    tunnel: Arc<Tunnel>,
    handler: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tunnel.connections.spawn(handler(stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(listener = ?local, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = stop.cancelled() => {
                debug!(listener = ?local, "listener closed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::size_of_return;

    /// Every held outbound connection is one task of `serve_connection`: it must not be sized
    /// by the HBONE server's connection state (4.8 KiB), which it was before the boxing.
    #[test]
    fn a_held_connections_task_carries_only_the_outbound_path() {
        type Accepted = (
            TcpStream,
            SocketAddr,
            Arc<ServerConfig>,
            Arc<Pod>,
            Arc<Tunnel>,
        );
        let task = size_of_return(|a: Accepted| {
            serve_connection(Kind::Outbound(Entry::Captured), a.0, a.1, a.2, a.3, a.4)
        });
        type Outbound = (TcpStream, SocketAddr, Entry, Arc<Pod>, Arc<Tunnel>);
        let outbound = size_of_return(|a: Outbound| serve_outbound(a.0, a.1, a.2, a.3, a.4));
        let hbone = size_of_return(|a: Accepted| serve_hbone_connection(a.0, a.1, a.2, a.3, a.4));
        eprintln!("task {task} B, outbound path {outbound} B, HBONE server connection {hbone} B");
        assert!(hbone > outbound, "the case this guards against");
        assert!(
            task <= outbound + 128,
            "task {task} B for an outbound path of {outbound} B"
        );
    }
}
