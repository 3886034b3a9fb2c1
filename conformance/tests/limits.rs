//! Limits and deadlines on the tunnel's listeners, real binaries: a client that opens
//! thousands of TCP connections to 15008 and never starts TLS is held to its share and dropped
//! at the handshake deadline while a real client's requests go on; an HBONE connection with no
//! stream is closed when idle; a SOCKS5 client that says nothing is closed at its deadline.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use conformance::load::{http_echo, socks_connect};
use conformance::metrics::sum;
use conformance::pki::TestCa;
use conformance::{Cluster, ClusterSpec, PodSpec};

/// client (mesh) and attacker (outside the mesh) on node 1, server on node 2 (HTTP 8080).
fn cluster(tunnel_args: &[&str]) -> Cluster {
    let spec = ClusterSpec {
        tunnel_args: tunnel_args.iter().map(|a| (*a).to_owned()).collect(),
        ..ClusterSpec::new(
            2,
            vec![
                PodSpec::new("client", 1),
                PodSpec::new("attacker", 1).outside_mesh(),
                PodSpec::new("server", 2),
            ],
        )
    };
    Cluster::with_http(spec, &["server"]).expect("build the cluster")
}

/// `n` requests from the client through its tunnel to the server, each on a new connection:
/// the latencies, in order; panics on a failed request.
fn requests(cluster: &Cluster, n: usize) -> Vec<Duration> {
    let server = SocketAddr::from((cluster.pod("server").ip, 8080));
    cluster
        .pod("client")
        .netns
        .run_in(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            (0..n)
                .map(|i| {
                    let started = Instant::now();
                    let stream = runtime.block_on(socks_connect(server)).unwrap();
                    let mut stream = stream.into_std().unwrap();
                    stream.set_nonblocking(false).unwrap();
                    let text = format!("r{i}");
                    let body = http_echo(&mut stream, &text).unwrap();
                    assert_eq!(body, format!("server saw {text}\n"));
                    started.elapsed()
                })
                .collect()
        })
        .unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn refused(cluster: &Cluster, node: usize, reason: &str) -> f64 {
    sum(
        &cluster.node(node).metrics().unwrap(),
        "weft_hbone_connections_refused_total",
        &[("reason", reason)],
    )
}

#[test]
fn silent_connections_to_15008_are_held_to_a_share_and_dropped_at_the_deadline() {
    conformance::load::raise_fd_limit();
    let cluster = cluster(&["--hbone-handshake-timeout", "2s"]);
    let hbone = SocketAddr::from((cluster.pod("server").ip, 15008));
    let before = median(requests(&cluster, 100));

    // 3,000 connections that never say a word (not even a TLS hello).
    const SILENT: usize = 3_000;
    let opened = Instant::now();
    let silent: Vec<TcpStream> = cluster
        .pod("attacker")
        .netns
        .run_in(move || {
            (0..SILENT)
                .map(|_| TcpStream::connect_timeout(&hbone, Duration::from_secs(5)).unwrap())
                .collect()
        })
        .unwrap();
    let during = median(requests(&cluster, 100));

    // Every one is closed by the tunnel: past the per-peer share at once, the rest at the
    // handshake deadline.
    let mut closed_at = Vec::new();
    for mut stream in silent {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a silent connection was not closed: {other:?}"),
        }
        closed_at.push(opened.elapsed());
    }
    let last = *closed_at.iter().max().unwrap();
    assert!(
        last < Duration::from_secs(2) + Duration::from_secs(3),
        "the last silent connection closed after {last:?}"
    );
    let per_peer = refused(&cluster, 2, "per_peer");
    let timed_out = refused(&cluster, 2, "handshake_timeout");
    assert_eq!(per_peer, (SILENT - 512) as f64, "past the share of 512");
    assert_eq!(timed_out, 512.0, "the share, at the deadline");
    let after = median(requests(&cluster, 100));
    eprintln!(
        "real requests p50: {before:?} before, {during:?} with {SILENT} silent connections held, {after:?} after; last silent connection closed {last:?} after opening"
    );
}

#[test]
fn an_hbone_connection_without_streams_is_closed_when_idle() {
    let cluster = cluster(&["--hbone-idle-timeout", "1s"]);
    let ca = TestCa::load(cluster.ca_dir()).unwrap();
    let cert = ca
        .issue(Some("spiffe://cluster.local/ns/default/sa/client"))
        .unwrap();
    let hbone = SocketAddr::from((cluster.pod("server").ip, 15008));
    let lasted = cluster
        .pod("client")
        .netns
        .run_in(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let tls = conformance::hbone_client::tls(hbone, Some(cert))
                    .await
                    .unwrap();
                let (_sender, connection) = h2::client::handshake(tls).await.unwrap();
                let started = Instant::now();
                // Driving the connection ends when the server closes it.
                let _ = tokio::time::timeout(Duration::from_secs(10), connection).await;
                started.elapsed()
            })
        })
        .unwrap();
    assert!(
        lasted >= Duration::from_secs(1) && lasted < Duration::from_secs(4),
        "closed after {lasted:?}"
    );
    assert_eq!(refused(&cluster, 2, "idle"), 1.0);
}

#[test]
fn a_silent_socks5_client_is_closed_at_its_deadline() {
    let cluster = cluster(&["--socks5-handshake-timeout", "1s"]);
    let lasted = cluster
        .pod("client")
        .netns
        .run_in(|| {
            let mut stream = TcpStream::connect("127.0.0.1:15080").unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let started = Instant::now();
            let mut byte = [0u8; 1];
            let n = stream.read(&mut byte).unwrap_or(0);
            (n, started.elapsed())
        })
        .unwrap();
    assert_eq!(lasted.0, 0, "closed without an answer");
    assert!(
        lasted.1 >= Duration::from_secs(1) && lasted.1 < Duration::from_secs(4),
        "closed after {:?}",
        lasted.1
    );
    let log = cluster.node(1).log();
    assert!(
        log.contains("no complete request within 1s"),
        "the reason is logged"
    );
}
