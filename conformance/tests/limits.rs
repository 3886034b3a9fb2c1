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

/// A mesh certificate of the client pod's identity.
fn client_cert(
    cluster: &Cluster,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    TestCa::load(&cluster.ca_dir())
        .unwrap()
        .issue(Some("spiffe://cluster.local/ns/default/sa/client"))
        .unwrap()
}

/// From the client pod, opens mutual TLS (ALPN h2) to the server's 15008 with the client's
/// certificate and runs `then` on it, on a runtime of that thread.
fn over_mesh_tls<T, F, Fut>(cluster: &Cluster, then: F) -> T
where
    T: Send + 'static,
    F: FnOnce(tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let cert = client_cert(cluster);
    let hbone = SocketAddr::from((cluster.pod("server").ip, 15008));
    cluster
        .pod("client")
        .netns
        .block_on(move || async move {
            let tls = conformance::hbone_client::tls(hbone, Some(cert))
                .await
                .unwrap();
            then(tls).await
        })
        .unwrap()
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
    let lasted = over_mesh_tls(&cluster, |tls| async move {
        let (_sender, connection) = h2::client::handshake(tls).await.unwrap();
        let started = Instant::now();
        // Driving the connection ends when the server closes it.
        let _ = tokio::time::timeout(Duration::from_secs(10), connection).await;
        started.elapsed()
    });
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
    cluster
        .node(1)
        .wait_for_log("no complete request within 1s");
}

/// An HTTP/2 frame: length, type, flags, stream, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// A CONNECT request's header block (HPACK literals with indexed names, no Huffman).
fn connect_block(authority: &str) -> Vec<u8> {
    let mut block = vec![0x02, 7];
    block.extend_from_slice(b"CONNECT");
    block.extend_from_slice(&[0x01, authority.len() as u8]);
    block.extend_from_slice(authority.as_bytes());
    block
}

/// Takes the whole frames off the front of `pending`: (type, stream, payload) of each.
fn whole_frames(pending: &mut Vec<u8>) -> Vec<(u8, u32, Vec<u8>)> {
    let mut frames = Vec::new();
    while pending.len() >= 9 {
        let len = (usize::from(pending[0]) << 16)
            | (usize::from(pending[1]) << 8)
            | usize::from(pending[2]);
        if pending.len() < 9 + len {
            break;
        }
        let stream =
            u32::from_be_bytes([pending[5], pending[6], pending[7], pending[8]]) & 0x7fff_ffff;
        frames.push((pending[3], stream, pending[9..9 + len].to_vec()));
        pending.drain(..9 + len);
    }
    frames
}

/// Opens a mesh-authenticated TLS connection to the server's 15008 from the client pod, sends
/// the HTTP/2 preface, a SETTINGS frame and `abuse`, and reads until the tunnel ends the
/// connection: whether it did within 10 s, and whether a GOAWAY came first.
fn abuse(cluster: &Cluster, abuse: Vec<u8>) -> (bool, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    over_mesh_tls(cluster, move |tls| async move {
        let (mut read, mut write) = tokio::io::split(tls);
        let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        start.extend(frame(SETTINGS, 0, 0, &[]));
        start.extend(abuse);
        // The tunnel may close while this is still being written.
        let writer = tokio::spawn(async move {
            let _ = write.write_all(&start).await;
            write
        });
        let mut saw_goaway = false;
        let mut pending = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
                saw_goaway |= whole_frames(&mut pending)
                    .iter()
                    .any(|(kind, _, _)| *kind == GOAWAY);
            }
        })
        .await
        .is_ok();
        writer.abort();
        (ended, saw_goaway)
    })
}

/// HTTP/2 abuse ends the abusing connection and nothing else: PING and SETTINGS floods (cut
/// off below h2), rapid reset and a CONTINUATION flood (bounded by h2's settings). After
/// each, a well-behaved client is served and the tunnel is still running.
#[test]
fn http2_abuse_ends_the_connection_not_the_tunnel() {
    let mut cluster = cluster(&[]);
    let authority = format!("{}:8080", cluster.pod("server").ip);
    let ping_flood = frame(PING, 0, 0, &[0; 8]).repeat(10_000);
    let settings_flood = frame(SETTINGS, 0, 0, &[]).repeat(10_000);
    let rapid_reset: Vec<u8> = (0..2_000u32)
        .flat_map(|i| {
            let stream = 2 * i + 1;
            let mut pair = frame(HEADERS, END_HEADERS, stream, &connect_block(&authority));
            pair.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
            pair
        })
        .collect();
    let mut continuation_flood = frame(HEADERS, 0, 1, &connect_block(&authority));
    continuation_flood.extend(frame(CONTINUATION, 0, 1, &[0x40; 16 * 1024]).repeat(200));
    for (name, bytes) in [
        ("PING flood", ping_flood),
        ("SETTINGS flood", settings_flood),
        ("rapid reset", rapid_reset),
        ("CONTINUATION flood", continuation_flood),
    ] {
        let (ended, goaway) = abuse(&cluster, bytes);
        assert!(ended, "{name}: the connection was not ended");
        eprintln!("{name}: connection ended (GOAWAY first: {goaway})");
        let answer = conformance::hbone_client::connect_from(
            &cluster.pod("client").netns,
            SocketAddr::from((cluster.pod("server").ip, 15008)),
            Some(client_cert(&cluster)),
            &authority,
        )
        .unwrap();
        assert_eq!(answer.status, 200, "{name}: a good client is still served");
    }
    assert_eq!(refused(&cluster, 2, "flood"), 2.0, "both floods counted");
    assert!(
        cluster.nodes[1].tunnel.as_mut().unwrap().exited().is_none(),
        "the tunnel runs"
    );
}

/// The increment of the first connection-level WINDOW_UPDATE the tunnel sends on a fresh
/// HBONE connection (what it grants above HTTP/2's 65,535), or 0 if none comes within 2 s.
/// The connection is kept open (returned) so that its window stays allotted.
async fn granted_window(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (u32, tokio_rustls::client::TlsStream<tokio::net::TcpStream>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls;
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend(frame(SETTINGS, 0, 0, &[]));
    tls.write_all(&start).await.unwrap();
    let mut pending = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(2), async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "the tunnel closed the connection");
            pending.extend_from_slice(&buf[..n]);
            for (kind, stream, payload) in whole_frames(&mut pending) {
                if kind == WINDOW_UPDATE && stream == 0 {
                    let p = &payload[..4];
                    return u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff;
                }
            }
        }
    })
    .await
    .unwrap_or(0);
    (found, tls)
}

const WINDOW_UPDATE: u8 = 0x8;

/// A peer's HTTP/2 receive window comes from its budget: with 20 MiB, its first connection
/// gets the full 16 MiB, the second the 4 MiB left, the third only HTTP/2's 64 KiB; another
/// peer has a budget of its own, and a closed connection gives its window back.
#[test]
fn receive_windows_are_allotted_from_the_peers_budget() {
    let cluster = cluster(&["--hbone-receive-budget-per-peer-mib", "20"]);
    const MIB: u32 = 1 << 20;
    let mut certs: Vec<_> = (0..3).map(|_| client_cert(&cluster)).collect();
    let grants = over_mesh_tls(&cluster, |first| async move {
        let hbone = first.get_ref().0.peer_addr().unwrap();
        let mut open = || conformance::hbone_client::tls(hbone, certs.pop());
        let (a, first) = granted_window(first).await;
        let (b, second) = granted_window(open().await.unwrap()).await;
        let (c, _third) = granted_window(open().await.unwrap()).await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (d, _fourth) = granted_window(open().await.unwrap()).await;
        drop(second);
        [a, b, c, d]
    });
    eprintln!("connection windows granted above 65,535: {grants:?}");
    assert_eq!(
        grants[0],
        16 * MIB - 65_535,
        "the first gets the full window"
    );
    assert_eq!(grants[1], 4 * MIB - 65_535, "the second what is left");
    assert_eq!(grants[2], 0, "the third only HTTP/2's minimum");
    assert_eq!(
        grants[3],
        16 * MIB - 65_535,
        "a closed connection gave its 16 MiB back"
    );
}

/// A peer holds at most `--hbone-max-streams-per-peer` streams over all its connections: past
/// it a CONNECT is answered 503 with the reason, counted, and a place that frees is taken again.
#[test]
fn a_peers_streams_are_held_to_its_limit_over_its_connections() {
    let cluster = cluster(&["--hbone-max-streams-per-peer", "3"]);
    let authority = format!("{}:8080", cluster.pod("server").ip);
    let second_cert = client_cert(&cluster);
    let statuses = over_mesh_tls(&cluster, move |first| async move {
        let hbone = first.get_ref().0.peer_addr().unwrap();
        let second = conformance::hbone_client::tls(hbone, Some(second_cert))
            .await
            .unwrap();
        let mut senders = Vec::new();
        for tls in [first, second] {
            let (sender, connection) = h2::client::handshake(tls).await.unwrap();
            tokio::spawn(connection);
            senders.push(sender);
        }
        let mut held = Vec::new();
        let mut statuses = Vec::new();
        // Two streams on each connection, then one more once a stream closed.
        for i in 0..5 {
            if i == 4 {
                drop(held.remove(0));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(authority.as_str())
                .body(())
                .unwrap();
            let sender = senders[i % 2].clone().ready().await.unwrap();
            let (response, send) = { sender }.send_request(request, false).unwrap();
            let response = response.await.unwrap();
            let reason = response
                .headers()
                .get("weft-error")
                .map(|v| v.to_str().unwrap().to_owned());
            statuses.push((response.status().as_u16(), reason));
            held.push((send, response.into_body()));
        }
        statuses
    });
    eprintln!("{statuses:?}");
    let codes: Vec<u16> = statuses.iter().map(|(code, _)| *code).collect();
    assert_eq!(codes, [200, 200, 200, 503, 200]);
    let reason = statuses[3].1.as_deref().unwrap_or_default();
    assert!(reason.contains("limit of 3 HBONE streams"), "{reason}");
    assert_eq!(refused(&cluster, 2, "streams_per_peer"), 1.0);
}

/// An IO that stops reading on demand: a peer that no longer takes what the tunnel sends.
struct Gate<T> {
    inner: T,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Gate<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.paused.load(std::sync::atomic::Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Gate<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

/// From the client pod, opens `streams` CONNECT streams to the server's HTTP app with windows
/// as large as HTTP/2 allows, stops reading, asks each for a gigabyte, and returns how much
/// the server's tunnel grew (MiB) while the bytes pile up.
fn stalled_reader_growth(tunnel_args: &[&str], streams: usize) -> f64 {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut cluster = cluster(tunnel_args);
    let authority = format!("{}:8080", cluster.pod("server").ip);
    let pid = cluster.nodes[1].tunnel.as_mut().unwrap().pid().unwrap();
    over_mesh_tls(&cluster, move |tls| async move {
        let paused = std::sync::Arc::new(AtomicBool::new(false));
        let gate = Gate {
            inner: tls,
            paused: paused.clone(),
        };
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(i32::MAX as u32)
            .initial_connection_window_size(i32::MAX as u32)
            .handshake::<_, bytes::Bytes>(gate)
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut held = Vec::new();
        for _ in 0..streams {
            let request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(authority.as_str())
                .body(())
                .unwrap();
            let sender = sender.clone().ready().await.unwrap();
            let (response, send) = { sender }.send_request(request, false).unwrap();
            let response = response.await.unwrap();
            assert_eq!(response.status(), 200);
            held.push((send, response.into_body()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_mib(pid);
        paused.store(true, Ordering::Relaxed);
        for (send, _) in &mut held {
            let ask = "GET /bytes/1000000000 HTTP/1.1\r\nHost: server\r\n\r\n";
            send.send_data(bytes::Bytes::from(ask), false).unwrap();
        }
        // Let the tunnel read what it will (the app writes at memory speed).
        let mut peak = before;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            peak = peak.max(rss_mib(pid));
        }
        drop(held);
        peak - before
    })
}

/// A peer that stops reading cannot make the tunnel buffer more than its send budget: 48
/// streams each asking for a gigabyte from an application that writes as fast as it can.
/// Without a budget (baseline, same run) the tunnel holds a read chunk and h2's send buffer
/// per stream, tens of MiB; with 4 MiB it grows by little more than that.
#[test]
fn a_peer_that_stops_reading_pins_no_more_than_its_send_budget() {
    let streams = 48;
    let unbounded = stalled_reader_growth(&["--hbone-send-budget-per-peer-mib", "100000"], streams);
    let bounded = stalled_reader_growth(&["--hbone-send-budget-per-peer-mib", "4"], streams);
    eprintln!(
        "server tunnel growth with {streams} stalled streams: {unbounded:.1} MiB without a budget, {bounded:.1} MiB with 4 MiB"
    );
    assert!(
        unbounded > 40.0,
        "the baseline must pile bytes up for this test to mean anything: {unbounded:.1} MiB"
    );
    assert!(bounded < 16.0, "{bounded:.1} MiB past a 4 MiB budget");
}
