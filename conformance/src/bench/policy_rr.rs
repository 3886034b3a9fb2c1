//! The request/response half of `weft-bench policy`: small HTTP/1.1 requests on one keep-alive
//! connection from a client pod on node 1 to a server pod on node 2, through capture and both
//! tunnels, to a port whose policy is L4 only (copied bytes) and to a port whose policy names
//! HTTP fields (each request parsed and decided by the server's tunnel). The two lanes
//! interleave, round by round.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{cpu_ns, median, quantile};
use crate::agents::Manifests;
use crate::cluster::{Cluster, ClusterSpec, PodSpec};

const L4_PORT: u16 = 8081;
const L7_PORT: u16 = 8080;

/// The server's policies: the client's principal on the L4 port; GETs of `/echo/*` on the L7
/// port.
const POLICIES: &str = "apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: l4, namespace: default}
spec: {selector: {matchLabels: {app: server}}, rules: [{from: [{source: {principals: [\"*/sa/client\"]}}], to: [{operation: {ports: [\"8081\"]}}]}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: l7, namespace: default}
spec: {selector: {matchLabels: {app: server}}, rules: [{to: [{operation: {ports: [\"8080\"], methods: [GET], paths: [\"/echo/*\"]}}]}]}
---
";

/// Each lane's medians over the rounds.
#[derive(Clone, Copy, Debug)]
pub struct LaneFigures {
    /// p50 round trip, microseconds.
    pub rr_p50_us: f64,
    /// CPU time the server's tunnel spent per request (all its threads), microseconds: the
    /// work a lane adds, without the machine's scheduling noise.
    pub server_cpu_us: f64,
}

/// (L4, L7).
pub fn round_trips(rounds: usize, requests: usize) -> Result<(LaneFigures, LaneFigures)> {
    let spec = ClusterSpec {
        agents: true,
        ..ClusterSpec::new(
            2,
            vec![PodSpec::new("client", 1), PodSpec::new("server", 2)],
        )
    };
    let mut cluster = Cluster::build(spec)?;
    for port in [L4_PORT, L7_PORT] {
        let port = port.to_string();
        cluster.start_app(
            "server",
            &["http", "--port", &port, "--name", "server"],
            port.parse()?,
        )?;
    }
    cluster.write_manifests(&Manifests {
        labelled: &["default"],
        extra: POLICIES,
        ..Manifests::default()
    })?;
    cluster.start_agents()?;
    cluster.start_tunnels()?;
    let server = cluster.pod("server").ip;
    let (l4, l7) = (
        SocketAddr::from((server, L4_PORT)),
        SocketAddr::from((server, L7_PORT)),
    );
    let client = &cluster.pod("client").netns;
    client.run_in(move || wait_for_l7(l7))??;
    let server_tunnel = cluster.nodes[1]
        .tunnel
        .as_ref()
        .and_then(|t| t.pid())
        .context("the server's tunnel")?;
    let mut lanes = [
        ("L4", l4, Vec::new(), Vec::new()),
        ("L7", l7, Vec::new(), Vec::new()),
    ];
    for round in 0..rounds {
        for (lane, addr, p50s, cpus) in lanes.iter_mut() {
            let addr = *addr;
            let before = cpu_ns(server_tunnel);
            let times = client.run_in(move || time_requests(addr, requests))??;
            let cpu_us =
                cpu_ns(server_tunnel).saturating_sub(before) as f64 / 1e3 / times.len() as f64;
            let (p50, p99) = (quantile(&times, 0.5), quantile(&times, 0.99));
            eprintln!(
                "  round {round} {lane}: rr p50 {p50:7.1} us  p99 {p99:7.1} us  server tunnel CPU {cpu_us:5.1} us/request"
            );
            p50s.push(p50);
            cpus.push(cpu_us);
        }
    }
    let [l4, l7] = lanes.map(|(_, _, p50s, cpus)| LaneFigures {
        rr_p50_us: median(&p50s),
        server_cpu_us: median(&cpus),
    });
    Ok((l4, l7))
}

/// Waits until the L7 port's policy is in force: a POST is refused with 403.
fn wait_for_l7(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let refused = request(addr, "POST /echo/x").is_ok_and(|(status, _)| status == 403);
        if refused {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the L7 policy was not in force within 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One request on a new connection: its status and body.
fn request(addr: SocketAddr, line: &str) -> Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    exchange(&mut stream, line)
}

/// Writes `<line> HTTP/1.1` and reads the response (status, body by content length).
fn exchange(stream: &mut std::net::TcpStream, line: &str) -> Result<(u16, String)> {
    use std::io::{BufRead, BufReader, Read, Write};
    write!(stream, "{line} HTTP/1.1\r\nHost: server\r\n\r\n")?;
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    reader.read_line(&mut head)?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("status line {head:?}"))?;
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            bail!("the connection closed in a response head");
        }
        if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse()?;
        }
        if header == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `requests` GETs on one keep-alive connection (a tenth more first, untimed): microseconds
/// each. (The untimed ones count in the CPU figure's division as timed ones: they are a
/// tenth, and the same in both lanes.)
fn time_requests(addr: SocketAddr, requests: usize) -> Result<Vec<f64>> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut times = Vec::with_capacity(requests);
    for i in 0..requests + requests / 10 {
        let started = Instant::now();
        let (status, body) = exchange(&mut stream, "GET /echo/x")?;
        if (status, body.as_str()) != (200, "server saw x\n") {
            bail!("unexpected answer {status} {body:?}");
        }
        if i >= requests / 10 {
            times.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(times)
}
