//! `weft-bench load`: many long-lived connections held through both tunnels. Client pods on
//! node 1 open connections (through their tunnel's SOCKS5 entry, so through both tunnels over
//! HBONE) to echo servers in pods on node 2; each sends a small message every few seconds and
//! reads it back for the length of the run, then all close. Reported: each tunnel's resident
//! memory idle, at its peak while loaded, and after everything closed; memory per held
//! connection; failures; the tunnels' descriptors before and after.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::round2;
use crate::cluster::{Cluster, ClusterSpec, PodSpec};
use crate::load::socks_connect;

/// What to measure.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadBench {
    /// Connections held at once.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Client pods on node 1, and as many echo server pods on node 2 (client i talks to
    /// server i).
    #[arg(long, default_value_t = 10)]
    pub pods: usize,
    /// How long every connection is held, seconds.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Seconds between one connection's messages.
    #[arg(long, default_value_t = 5)]
    pub interval: u64,
    /// The tunnels' --pool-idle-timeout, seconds: after the connections close, memory is
    /// measured again once the pooled HBONE connections were reaped.
    #[arg(long, default_value_t = 10)]
    pub pool_idle_timeout: u64,
}

const ECHO_PORT: u16 = 7000;

/// A tunnel's resident memory (MB) and open descriptors.
fn usage(pid: u32) -> Result<(f64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((kb / 1024.0, fds))
}

/// Runs the benchmark; prints a table and returns the JSON line.
pub fn run(args: &LoadBench) -> Result<String> {
    anyhow::ensure!(
        args.pods >= 1 && args.connections >= args.pods,
        "--pods at least 1, at most --connections"
    );
    let mut pods = Vec::new();
    for i in 0..args.pods {
        pods.push(PodSpec::new(&format!("c{i:02}"), 1));
        pods.push(PodSpec::new(&format!("s{i:02}"), 2));
    }
    let spec = ClusterSpec {
        tunnel_args: vec![
            "--pool-idle-timeout".into(),
            format!("{}s", args.pool_idle_timeout),
        ],
        ..ClusterSpec::new(2, pods)
    };
    let mut cluster = Cluster::build(spec)?;
    for i in 0..args.pods {
        let port = ECHO_PORT.to_string();
        cluster.start_app(&format!("s{i:02}"), &["echo", "--port", &port], ECHO_PORT)?;
    }
    cluster.start_tunnels()?;
    let pid = |node: usize| -> Result<u32> {
        cluster.nodes[node - 1]
            .tunnel
            .as_ref()
            .and_then(|t| t.pid())
            .context("tunnel not running")
    };
    let (client_pid, server_pid) = (pid(1)?, pid(2)?);
    // Warm up: one connection per pod pair, so certificates and pooled connections exist.
    hold(
        &cluster,
        args.pods,
        args.pods,
        Duration::ZERO,
        Duration::from_secs(1),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let idle = (usage(client_pid)?, usage(server_pid)?);
    eprintln!(
        "idle: client tunnel {:.1} MB, {} fds; server tunnel {:.1} MB, {} fds",
        idle.0.0, idle.0.1, idle.1.0, idle.1.1
    );

    // Hold the connections, sampling both tunnels every second for their peaks.
    let run = Duration::from_secs(args.seconds);
    let interval = Duration::from_secs(args.interval);
    let started = Instant::now();
    let peak = std::thread::scope(|scope| -> Result<_> {
        let holder = scope.spawn(|| hold(&cluster, args.connections, args.pods, run, interval));
        let mut peak = ((0.0f64, 0usize), (0.0f64, 0usize));
        while !holder.is_finished() {
            let (c, s) = (usage(client_pid)?, usage(server_pid)?);
            peak.0 = (peak.0.0.max(c.0), peak.0.1.max(c.1));
            peak.1 = (peak.1.0.max(s.0), peak.1.1.max(s.1));
            std::thread::sleep(Duration::from_millis(500));
        }
        let outcome = holder
            .join()
            .map_err(|_| anyhow::anyhow!("the client threads panicked"))??;
        Ok((peak, outcome))
    })?;
    let ((loaded_client, loaded_server), outcome) = peak;
    eprintln!(
        "held {} connections for {:?} ({} opened, {} failed, {} messages); peak: client tunnel {:.1} MB, {} fds; server tunnel {:.1} MB, {} fds",
        args.connections,
        started.elapsed(),
        outcome.opened,
        outcome.failed,
        outcome.messages,
        loaded_client.0,
        loaded_client.1,
        loaded_server.0,
        loaded_server.1
    );
    // Everything closed: give the tunnels a moment to see the ends.
    std::thread::sleep(Duration::from_secs(3));
    let after = (usage(client_pid)?, usage(server_pid)?);
    let pooled = || -> Result<f64> {
        Ok(crate::metrics::sum(
            &cluster.node(1).metrics()?,
            "weft_hbone_pool_connections",
            &[],
        ))
    };
    let pool = pooled()?;
    eprintln!(
        "after close: client tunnel {:.1} MB, {} fds ({} pooled HBONE connections open); server tunnel {:.1} MB, {} fds",
        after.0.0, after.0.1, pool, after.1.0, after.1.1
    );
    // Then once the pool reaped its idle connections (both ends close them).
    let reap_deadline = Instant::now() + Duration::from_secs(args.pool_idle_timeout + 30);
    while pooled()? > 0.0 && Instant::now() < reap_deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(2));
    let reaped = (usage(client_pid)?, usage(server_pid)?);
    eprintln!(
        "pool reaped: client tunnel {:.1} MB, {} fds; server tunnel {:.1} MB, {} fds",
        reaped.0.0, reaped.0.1, reaped.1.0, reaped.1.1
    );
    let per_connection =
        |loaded: f64, idle: f64| (loaded - idle) * 1024.0 / args.connections as f64;
    eprintln!(
        "per held connection: client tunnel {:.2} KiB, server tunnel {:.2} KiB (goal < 6); RSS/idle with the pool's connections open: {:.2} and {:.2}, once reaped: {:.2} and {:.2} (goal <= 1.5)",
        per_connection(loaded_client.0, idle.0.0),
        per_connection(loaded_server.0, idle.1.0),
        after.0.0 / idle.0.0,
        after.1.0 / idle.1.0,
        reaped.0.0 / idle.0.0,
        reaped.1.0 / idle.1.0
    );
    let json = serde_json::json!({
        "bench": "load",
        "connections": args.connections,
        "failed": outcome.failed,
        "seconds": args.seconds,
        "messages": outcome.messages,
        "tunnel_rss_idle_mb": round2(idle.0.0),
        "tunnel_rss_loaded_mb": round2(loaded_client.0),
        "tunnel_rss_after_mb": round2(after.0.0),
        "kib_per_connection": round2(per_connection(loaded_client.0, idle.0.0)),
        "tunnel_fds_idle": idle.0.1,
        "tunnel_fds_loaded": loaded_client.1,
        "tunnel_fds_after": after.0.1,
        "pooled_connections_after": pool,
        "tunnel_rss_pool_reaped_mb": round2(reaped.0.0),
        "tunnel_fds_pool_reaped": reaped.0.1,
        "server_tunnel_rss_pool_reaped_mb": round2(reaped.1.0),
        "server_tunnel_fds_pool_reaped": reaped.1.1,
        "server_tunnel_rss_idle_mb": round2(idle.1.0),
        "server_tunnel_rss_loaded_mb": round2(loaded_server.0),
        "server_tunnel_rss_after_mb": round2(after.1.0),
        "server_kib_per_connection": round2(per_connection(loaded_server.0, idle.1.0)),
        "server_tunnel_fds_idle": idle.1.1,
        "server_tunnel_fds_after": after.1.1,
    });
    Ok(json.to_string())
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Outcome {
    opened: usize,
    failed: usize,
    messages: usize,
}

/// Opens `connections` spread over the `pods` client pods (each to its server pod), holds
/// each for `run` sending a message every `interval` (the first at once), then closes all.
fn hold(
    cluster: &Cluster,
    connections: usize,
    pods: usize,
    run: Duration,
    interval: Duration,
) -> Result<Outcome> {
    let opened = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let messages = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..pods)
        .map(|i| {
            let count = connections / pods + usize::from(i < connections % pods);
            let server = SocketAddr::from((cluster.pod(&format!("s{i:02}")).ip, ECHO_PORT));
            let (opened, failed, messages) = (opened.clone(), failed.clone(), messages.clone());
            cluster.pod(&format!("c{i:02}")).netns.spawn_in(move || {
                crate::load::raise_fd_limit();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    // Opening is paced so the listeners' backlogs never overflow.
                    let opening = Arc::new(tokio::sync::Semaphore::new(256));
                    let deadline = tokio::time::Instant::now() + run;
                    let tasks: Vec<_> = (0..count)
                        .map(|n| {
                            let (opened, failed, messages) =
                                (opened.clone(), failed.clone(), messages.clone());
                            let opening = opening.clone();
                            tokio::spawn(async move {
                                let result = connection(
                                    server, n, &opening, &opened, &messages, deadline, interval,
                                )
                                .await;
                                if result.is_err() {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        let _ = task.await;
                    }
                });
                anyhow::Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))???;
    }
    Ok(Outcome {
        opened: opened.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        messages: messages.load(Ordering::Relaxed),
    })
}

/// One held connection: opens, then echoes a 16-byte message every `interval` until
/// `deadline`, then closes.
async fn connection(
    server: SocketAddr,
    n: usize,
    opening: &tokio::sync::Semaphore,
    opened: &AtomicUsize,
    messages: &AtomicUsize,
    deadline: tokio::time::Instant,
    interval: Duration,
) -> Result<()> {
    let mut stream = {
        let _permit = opening.acquire().await?;
        socks_connect(server).await?
    };
    opened.fetch_add(1, Ordering::Relaxed);
    // Spread the messages over the interval.
    let offset = interval.mul_f64((n % 97) as f64 / 97.0);
    let mut next = tokio::time::Instant::now() + offset;
    let mut seq = 0u32;
    loop {
        let message = format!("msg {n:06} {seq:04}\n");
        stream.write_all(message.as_bytes()).await?;
        let mut back = vec![0u8; message.len()];
        stream.read_exact(&mut back).await?;
        anyhow::ensure!(back == message.as_bytes(), "echo mismatch");
        messages.fetch_add(1, Ordering::Relaxed);
        seq += 1;
        if interval.is_zero() || next >= deadline {
            break;
        }
        tokio::time::sleep_until(next).await;
        next += interval;
    }
    Ok(())
}
