//! Wires the tunnel together, runs it, and shuts it down gracefully on SIGTERM.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{self, AdminState, Endpoint};
use crate::config::RunConfig;
use crate::flows_relay::RelaySettings;
use crate::identity::{CaClientSettings, CertificateManager, MeshCaClient};
use crate::inbound_capture::InboundCapture;
use crate::logging::SetLogFilter;
use crate::netns::SocketOptions;
use crate::pods::{PodsStatus, run_pods};
use crate::proxy::admission::{Admission, AdmissionLimits};
use crate::proxy::context::{Deadlines, LocalPods, Tunnel};
use crate::proxy::hbone::{Pool, PoolSettings};
use crate::state::{AgentFollower, PodNamespaces, State, watch_state_file};
use crate::telemetry::Metrics;
use crate::tls::TlsContext;

/// Runs the tunnel until SIGTERM or SIGINT, then drains.
pub async fn run(config: RunConfig, set_log_filter: SetLogFilter) -> anyhow::Result<()> {
    raise_fd_limit();
    start_busy_polling(&config);
    let crypto = Arc::new(choose_crypto(config.crypto));
    let bundle =
        crate::identity::bundle_file::load_when_present(&config.trust_bundle, crypto.clone())
            .await?;
    let ca = MeshCaClient::new(
        CaClientSettings {
            address: config.ca_address.clone(),
            server_name: config.ca_server_name.clone(),
            token_file: config.ca_token_file.clone(),
            lifetime: config.cert_lifetime,
        },
        bundle.clone(),
        crypto.clone(),
    )?;
    let metrics = Metrics::new();
    metrics.flows.set_node(&config.node_name);
    let certs = CertificateManager::new(Arc::new(ca), metrics.clone());
    let tls = TlsContext::new(crypto.clone(), bundle.clone(), &config.trust_domain);
    // The state source: a file (ready once loaded) or the node agent (ready at its first
    // snapshot, followed in the background once the pods loop runs).
    let (source_ready_tx, source_ready) = tokio::sync::watch::channel(false);
    let (state, agent_state_tx, source) = match (&config.state_file, &config.agent_socket) {
        (Some(path), _) => {
            let state = watch_state_file(path.clone(), config.state_poll).await?;
            source_ready_tx.send_replace(true);
            (state, None, format!("the state file {}", path.display()))
        }
        (None, Some(socket)) => {
            let (tx, rx) = tokio::sync::watch::channel(Arc::new(State::default()));
            (
                rx,
                Some(tx),
                format!("the node agent at {}", socket.display()),
            )
        }
        (None, None) => anyhow::bail!("give --state-file or --agent-socket"),
    };
    let pool = Pool::new(
        PoolSettings {
            max_streams_per_connection: config.pool_max_streams,
            idle_timeout: config.pool_idle_timeout,
            connect_timeout: config.connect_timeout,
        },
        tls.clone(),
        certs.clone(),
        metrics.clone(),
    );
    pool.spawn_reaper();
    let tunnel = Arc::new(Tunnel {
        state,
        tls,
        certs,
        pool,
        metrics,
        shutdown: CancellationToken::new(),
        connections: TaskTracker::new(),
        next_endpoint: AtomicUsize::new(0),
        local_pods: LocalPods::default(),
        same_node_shortcut: config.same_node_shortcut,
        pod_namespaces: PodNamespaces::default(),
        inbound_listeners: Default::default(),
        hbone_admission: Admission::new(AdmissionLimits {
            total: config.hbone_max_connections,
            per_peer: config.hbone_max_connections_per_peer,
            streams_per_peer: config.hbone_max_streams_per_peer,
            receive_budget: config
                .hbone_receive_budget_per_peer_mib
                .saturating_mul(1 << 20),
            send_budget: config
                .hbone_send_budget_per_peer_mib
                .saturating_mul(1 << 20),
        }),
        deadlines: Deadlines {
            hbone_handshake: config.hbone_handshake_timeout,
            hbone_idle: config.hbone_idle_timeout,
            socks5_handshake: config.socks5_handshake_timeout,
            connect: config.connect_timeout,
        },
    });

    let pods = Arc::new(Mutex::new(PodsStatus::default()));
    let admin_state = Arc::new(AdminState {
        tunnel: tunnel.clone(),
        node: config.node_name.clone(),
        config: serde_json::to_value(&config).unwrap_or_default(),
        pods: pods.clone(),
        set_log_filter,
        log_filter: Mutex::new(config.log.clone()),
        source_ready,
        source,
    });
    // Admin endpoints outlive the drain, so readiness and metrics stay visible while it runs.
    let admin_stop = CancellationToken::new();
    for (addr, endpoint) in [
        (config.admin_addr, Endpoint::Admin),
        (config.metrics_addr, Endpoint::Metrics),
        (config.readiness_addr, Endpoint::Readiness),
    ] {
        admin::serve(addr, endpoint, admin_state.clone(), admin_stop.clone())
            .await
            .with_context(|| format!("cannot listen on {addr} for {endpoint:?}"))?;
    }
    let (applied_tx, applied) = tokio::sync::watch::channel(0usize);
    let pods_task = tokio::spawn(run_pods(
        tunnel.clone(),
        config.node_name.clone(),
        SocketOptions {
            mark: Some(config.socket_mark),
            keepalive: Some(config.tcp_keepalive),
        },
        pods,
        config.capture_pin_dir.clone().map(InboundCapture::new),
        applied_tx,
    ));
    if let (Some(state), Some(path)) = (agent_state_tx, &config.agent_socket) {
        let follower = AgentFollower {
            path: path.clone(),
            socket_mark: config.socket_mark,
            agent_uid: config
                .agent_uid
                .unwrap_or_else(tunnel_proto::peer::current_uid),
            state,
            pods: tunnel.pod_namespaces.clone(),
            listeners: tunnel.inbound_listeners.clone(),
            applied,
            synced: source_ready_tx,
        };
        tokio::spawn(follower.run(tunnel.shutdown.clone()));
    }
    if let Some(address) = &config.flow_relay {
        // Stopped with the admin endpoints: flows of draining connections are still offered.
        tokio::spawn(crate::flows_relay::offer(
            RelaySettings {
                address: address.clone(),
                server_name: config.ca_server_name.clone(),
                token_file: config.ca_token_file.clone(),
            },
            tunnel.metrics.clone(),
            bundle.clone(),
            crypto.clone(),
            admin_stop.clone(),
        ));
    }
    info!(node = %config.node_name, trust_domain = %config.trust_domain, "tunnel started");

    wait_for_signal().await?;
    info!(deadline = ?config.drain_timeout, live = tunnel.connections.len(), "shutting down: no new connections, draining live ones");
    tunnel.shutdown.cancel();
    tunnel.connections.close();
    let _ = pods_task.await;
    if tokio::time::timeout(config.drain_timeout, tunnel.connections.wait())
        .await
        .is_err()
    {
        warn!(
            left = tunnel.connections.len(),
            "drain deadline passed; closing remaining connections"
        );
    } else {
        info!("all connections drained");
    }
    admin_stop.cancel();
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}

/// Each proxied connection takes two or three descriptors: lift the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(error = %e, soft, "cannot raise the open file limit");
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open file limit"),
    }
}

/// Starts the busy poller when it is asked for and can work (one worker thread), and says so.
fn start_busy_polling(config: &RunConfig) {
    if config.busy_poll.is_zero() {
        tracing::info!("busy polling off (--busy-poll 0s)");
        return;
    }
    if config.worker_threads != 1 {
        tracing::warn!(
            worker_threads = config.worker_threads,
            "busy polling off: it needs one worker thread (with more, the worker that polls seldom holds the event queue)"
        );
        return;
    }
    let poller = crate::busy_poll::BusyPoll::new(config.busy_poll);
    poller.install();
    poller.spawn();
    tracing::info!(
        max_window = ?config.busy_poll,
        "busy polling: after traffic the worker polls its sockets for an adaptive window before sleeping"
    );
}

/// The crypto provider `choice` means on this CPU; logs which, and why.
fn choose_crypto(choice: crate::tls::crypto::CryptoChoice) -> rustls::crypto::CryptoProvider {
    use crate::tls::crypto;
    let features = crypto::CpuFeatures::detect();
    let (backend, why) = crypto::choose(choice, &features);
    tracing::info!(
        crypto = %backend,
        cpu_features = %features.names(),
        "crypto provider {backend}: {why}"
    );
    crypto::provider(backend)
}
