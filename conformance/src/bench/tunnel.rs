//! `weft-bench tunnel`: one bulk stream and small request/response round trips between two
//! pods on two nodes, interleaved: direct; through Weft from its SOCKS entry (`weft`) and from
//! an unmodified client captured by eBPF (`capture`, the path users get); through a stunnel
//! pair held to Weft's cipher suite and peer verification; and one plain relay (`relay`). Each
//! bulk transfer also reads the CPU time of the lane's proxies (both tunnels, or both
//! stunnels) from `schedstat`: CPU seconds per GB moved. Each lane also makes new connections
//! for two seconds (four clients, each connection one round trip): new connections per second.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};

use super::client::{self, Path};
use super::{median, quantile, round2};
use crate::cluster::{Cluster, ClusterSpec, PodSpec, wait_for_port};
use crate::process::Process;

/// What to measure.
#[derive(Clone, Debug, clap::Args)]
pub struct TunnelBench {
    #[command(flatten)]
    pub measure: super::Measure,
    /// Measure only these lanes (for profiling); the JSON line needs all of them.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

const ECHO: u16 = 9000;
const SOURCE: u16 = 9001;

#[derive(Default)]
struct Figures {
    gbps: Vec<f64>,
    rr_p50: Vec<f64>,
    rr_p99: Vec<f64>,
    cpu_s_per_gb: Vec<f64>,
    rr_cpu_us: Vec<f64>,
    conn_per_s: Vec<f64>,
}

/// A lane's medians over the rounds.
#[derive(Clone, Copy)]
struct Medians {
    gbps: f64,
    rr_p50: f64,
    rr_p99: f64,
    cpu_s_per_gb: f64,
    rr_cpu_us: f64,
    conn_per_s: f64,
}

impl Medians {
    fn of(f: &Figures) -> Self {
        Medians {
            gbps: median(&f.gbps),
            rr_p50: median(&f.rr_p50),
            rr_p99: median(&f.rr_p99),
            cpu_s_per_gb: median(&f.cpu_s_per_gb),
            rr_cpu_us: median(&f.rr_cpu_us),
            conn_per_s: median(&f.conn_per_s),
        }
    }
}

/// One way from the client pod to an echo and a source server.
struct Lane {
    name: &'static str,
    echo: (Path, SocketAddr),
    source: (Path, SocketAddr),
    /// The client pod is captured (eBPF) while this lane runs.
    captured: bool,
    /// Who takes every flow event of both tunnels while this lane runs.
    observed: Observer,
    /// The processes that carry the lane's bytes, whose CPU time is read.
    proxies: Vec<u32>,
    figures: Figures,
}

/// A subscriber of every flow event, attached while a lane runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Observer {
    None,
    /// One on each tunnel's admin endpoint (`/flows?follow=true`).
    Tunnels,
    /// One on the controller's relay, which subscribes on both tunnels and merges.
    Relay,
}

/// Clients making new connections at once, and for how long, in the connection-rate measure.
const CONNECTING_CLIENTS: usize = 4;
const CONNECTING_FOR: Duration = Duration::from_secs(2);

/// The crypto of the stunnel lane: the pair is configured to Weft's suite (`stunnel.rs`).
const CRYPTO_STUNNEL: &str = "stunnel4 + OpenSSL 3, TLS_AES_128_GCM_SHA256";

/// Runs the benchmark; prints a table and returns the JSON line.
pub fn run(args: &TunnelBench) -> Result<String> {
    let mut cluster = Cluster::build(ClusterSpec::new(
        2,
        vec![
            PodSpec::new("client", 1),
            PodSpec::new("server", 2),
            PodSpec::new("plain", 2).outside_mesh(),
        ],
    ))?;
    let app = crate::binary("weft-testapp");
    for pod in ["server", "plain"] {
        cluster.spawn_in(pod, &app, &["echo", "--port", &ECHO.to_string()])?;
        cluster.spawn_in(pod, &app, &["source", "--port", &SOURCE.to_string()])?;
        let p = cluster.pod(pod);
        for port in [ECHO, SOURCE] {
            wait_for_port(&p.netns, p.ip, port, Duration::from_secs(10))?;
        }
    }
    cluster.start_tunnels()?;
    // The connection-rate measure makes tens of thousands of connections a round. The side
    // that closes first keeps each in TIME_WAIT for 60 s: the client (its own connections) and,
    // on Weft's and stunnel's paths, the server-side proxy's connection to the application in
    // the server's namespace. Without reuse, the next lane to the same address searches a port
    // range full of them and measures that search: lanes after a fast one were 5 to 35 times
    // slower, by the time since that lane, not by what they carried.
    for pod in ["client", "server", "plain"] {
        cluster
            .pod(pod)
            .netns
            .sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    }
    let server = cluster.pod("server").ip;
    let plain = cluster.pod("plain").ip;
    let stunnel = super::stunnel::start(&mut cluster, "client", "server", server, &[ECHO, SOURCE])?;
    let at = |ip, port| SocketAddr::from((ip, port));
    let tunnels: Vec<u32> = cluster
        .nodes
        .iter()
        .filter_map(|n| n.tunnel.as_ref()?.pid())
        .collect();
    let stunnels: Vec<u32> = cluster
        .apps
        .iter()
        .filter(|p| p.name.ends_with("stunnel4"))
        .filter_map(|p| p.pid())
        .collect();
    anyhow::ensure!(
        tunnels.len() == 2 && stunnels.len() == 2,
        "two tunnels and two stunnels to measure: {tunnels:?} {stunnels:?}"
    );
    let lane = |name, echo, source, proxies: &[u32]| Lane {
        name,
        echo,
        source,
        captured: false,
        observed: Observer::None,
        proxies: proxies.to_vec(),
        figures: Figures::default(),
    };
    let mut lanes = [
        lane(
            "direct",
            (Path::Direct, at(server, ECHO)),
            (Path::Direct, at(server, SOURCE)),
            &[],
        ),
        lane(
            "weft",
            (Path::Weft, at(server, ECHO)),
            (Path::Weft, at(server, SOURCE)),
            &tunnels,
        ),
        // Weft again, with a subscriber of every flow event on each tunnel.
        Lane {
            observed: Observer::Tunnels,
            ..lane(
                "observed",
                (Path::Weft, at(server, ECHO)),
                (Path::Weft, at(server, SOURCE)),
                &tunnels,
            )
        },
        // Weft again, with a subscriber of every flow event through the controller's relay
        // (both tunnels stream to the controller, which merges): the cluster's way.
        Lane {
            observed: Observer::Relay,
            ..lane(
                "relayed",
                (Path::Weft, at(server, ECHO)),
                (Path::Weft, at(server, SOURCE)),
                &tunnels,
            )
        },
        // The client connects straight to the server's address, as any application does;
        // capture takes it to its node's tunnel.
        Lane {
            captured: true,
            ..lane(
                "capture",
                (Path::Direct, at(server, ECHO)),
                (Path::Direct, at(server, SOURCE)),
                &tunnels,
            )
        },
        lane(
            "stunnel",
            (
                Path::Stunnel {
                    local_port: stunnel.local_ports[0],
                },
                at(server, ECHO),
            ),
            (
                Path::Stunnel {
                    local_port: stunnel.local_ports[1],
                },
                at(server, SOURCE),
            ),
            &stunnels,
        ),
        // Diagnostic: Weft's SOCKS entry to a pod outside the mesh, i.e. one userspace relay
        // (the client node's tunnel) with no TLS and no HTTP/2.
        lane(
            "relay",
            (Path::Weft, at(plain, ECHO)),
            (Path::Weft, at(plain, SOURCE)),
            &tunnels[..1],
        ),
    ];
    eprintln!(
        "tunnel bench: {} rounds, {} MiB download, {} round trips of {} B; lanes interleaved: {}",
        args.measure.rounds,
        args.measure.bytes >> 20,
        args.measure.round_trips,
        args.measure.message,
        lanes.iter().map(|l| l.name).collect::<Vec<_>>().join(", ")
    );
    for round in 0..args.measure.rounds {
        for lane in lanes.iter_mut() {
            if !args.only.is_empty() && !args.only.iter().any(|o| o == lane.name) {
                continue;
            }
            let (bytes, iters, size) = (
                args.measure.bytes,
                args.measure.round_trips,
                args.measure.message,
            );
            let (echo, source) = (lane.echo, lane.source);
            let capture = match lane.captured {
                true => Some(cluster.spawn_capture(&["client"], false)?),
                false => None,
            };
            let observers = match lane.observed {
                Observer::None => None,
                Observer::Tunnels => Some(observe_all(&cluster, round)?),
                Observer::Relay => Some(observe_through_relay(&cluster, round)?),
            };
            let meshed_before = meshed_from_client(&cluster)?;
            let proxies = lane.proxies.clone();
            let client_ns = &cluster.pod("client").netns;
            let (gbps, cpu_ns, rr, rr_cpu_ns) =
                client_ns.run_in(move || -> Result<(f64, u64, Vec<f64>, u64)> {
                    let cpu = || {
                        proxies
                            .iter()
                            .map(|pid| super::process_cpu_ns(*pid))
                            .sum::<u64>()
                    };
                    let before = cpu();
                    let gbps = client::throughput(source.0, source.1, bytes)?;
                    let cpu_ns = cpu().saturating_sub(before);
                    let before = cpu();
                    let rr = client::request_response(echo.0, echo.1, size, iters, iters / 10)?;
                    let rr_cpu_ns = cpu().saturating_sub(before);
                    Ok((gbps, cpu_ns, rr, rr_cpu_ns))
                })??;
            if lane.captured {
                // The lane must really have gone through both tunnels (two connections).
                let meshed = meshed_from_client(&cluster)? - meshed_before;
                anyhow::ensure!(
                    meshed == 2.0,
                    "capture lane: {meshed} meshed connections from the client, not 2: capture did not take it"
                );
            }
            // New connections, each a new TCP connection from the application (Weft's pool
            // absorbs the TLS handshakes; stunnel makes one per connection).
            let conn_per_s = client_ns.run_in(move || {
                client::connection_rate(echo.0, echo.1, CONNECTING_CLIENTS, CONNECTING_FOR)
            })??;
            drop(capture);
            if let Some(observers) = observers {
                let (events, lost) = stop_observers(observers)?;
                anyhow::ensure!(
                    events > 0,
                    "{} lane: the subscribers received no event",
                    lane.name
                );
                eprintln!(
                    "  round {round} {}: the subscribers received {events} events, lost {lost}",
                    lane.name
                );
            }
            let cpu_s_per_gb = cpu_ns as f64 / 1e9 / (bytes as f64 / 1e9);
            // Warm-up round trips included: the CPU was read around all of them.
            let rr_cpu_us = rr_cpu_ns as f64 / 1e3 / (iters + iters / 10) as f64;
            let (p50, p99) = (quantile(&rr, 0.5), quantile(&rr, 0.99));
            eprintln!(
                "  round {round} {:8} {gbps:7.2} Gbit/s   rr p50 {p50:7.1} us  p99 {p99:7.1} us   proxies' CPU {cpu_s_per_gb:5.2} s/GB, {rr_cpu_us:6.1} us per round trip   {conn_per_s:7.0} new connections/s",
                lane.name
            );
            lane.figures.conn_per_s.push(conn_per_s);
            lane.figures.rr_cpu_us.push(rr_cpu_us);
            lane.figures.gbps.push(gbps);
            lane.figures.rr_p50.push(p50);
            lane.figures.rr_p99.push(p99);
            lane.figures.cpu_s_per_gb.push(cpu_s_per_gb);
        }
    }
    if !args.only.is_empty() {
        anyhow::bail!("--only measures a subset of lanes: no medians or JSON line");
    }
    let medians: Vec<Medians> = lanes.iter().map(|l| Medians::of(&l.figures)).collect();
    println!("medians over {} rounds:", args.measure.rounds);
    println!(
        "  lane      throughput      rr p50      rr p99    proxies' CPU (bulk, round trips)   new connections"
    );
    for (lane, m) in lanes.iter().zip(&medians) {
        println!(
            "  {:8}{:8.2} Gbit/s {:8.1} us {:8.1} us {:8.2} s/GB {:8.1} us/round trip {:8.0}/s",
            lane.name, m.gbps, m.rr_p50, m.rr_p99, m.cpu_s_per_gb, m.rr_cpu_us, m.conn_per_s
        );
    }
    let [direct, weft, observed, relayed, capture, stunnel, relay] =
        [0, 1, 2, 3, 4, 5, 6].map(|i| medians[i]);
    let weft_added = weft.rr_p50 - direct.rr_p50;
    let stunnel_added = stunnel.rr_p50 - direct.rr_p50;
    let crypto_weft = weft_crypto(&cluster);
    println!("ratios:");
    println!(
        "  weft / stunnel throughput  {:.2}x   (target >= 1.1x)",
        weft.gbps / stunnel.gbps
    );
    println!(
        "  weft / direct throughput   {:.1}%   (target >= 40%)",
        100.0 * weft.gbps / direct.gbps
    );
    println!(
        "  added p50 latency: weft {weft_added:.1} us, stunnel {stunnel_added:.1} us, ratio {:.2} (target <= 0.8)",
        weft_added / stunnel_added
    );
    println!(
        "  added p50 latency of one plain userspace relay (no TLS): {:.1} us",
        relay.rr_p50 - direct.rr_p50
    );
    println!(
        "  capture lane: added p50 {:.1} us ({:.2}x stunnel's; target <= 0.8), {:.2} Gbit/s",
        capture.rr_p50 - direct.rr_p50,
        (capture.rr_p50 - direct.rr_p50) / stunnel_added,
        capture.gbps
    );
    println!(
        "  CPU per GB: weft {:.2} s, stunnel {:.2} s, ratio {:.2} (target <= 0.8)",
        weft.cpu_s_per_gb,
        stunnel.cpu_s_per_gb,
        weft.cpu_s_per_gb / stunnel.cpu_s_per_gb
    );
    println!(
        "  CPU per round trip: weft {:.1} us, stunnel {:.1} us (both proxies of the lane together)",
        weft.rr_cpu_us, stunnel.rr_cpu_us
    );
    println!(
        "  new connections: weft {:.0}/s, stunnel {:.0}/s, ratio {:.2} (target > 1), direct {:.0}/s",
        weft.conn_per_s,
        stunnel.conn_per_s,
        weft.conn_per_s / stunnel.conn_per_s,
        direct.conn_per_s
    );
    println!(
        "  observed (a subscriber of every flow event on each tunnel): throughput {:.1}% of weft's (target >= 97%), added p50 {:+.1} us over weft's (target <= 2 us)",
        100.0 * observed.gbps / weft.gbps,
        observed.rr_p50 - weft.rr_p50
    );
    println!(
        "  relayed (a subscriber of every flow event through the controller's relay): throughput {:.1}% of weft's, added p50 {:+.1} us over weft's",
        100.0 * relayed.gbps / weft.gbps,
        relayed.rr_p50 - weft.rr_p50
    );
    println!("  crypto: weft {crypto_weft}; stunnel {CRYPTO_STUNNEL}");
    let json = serde_json::json!({
        "bench": "tunnel",
        "direct_gbps": round2(direct.gbps),
        "weft_gbps": round2(weft.gbps),
        "stunnel_gbps": round2(stunnel.gbps),
        "weft_conn_per_s": round2(weft.conn_per_s),
        "stunnel_conn_per_s": round2(stunnel.conn_per_s),
        "direct_conn_per_s": round2(direct.conn_per_s),
        "capture_conn_per_s": round2(capture.conn_per_s),
        "direct_rr_p50_us": round2(direct.rr_p50),
        "weft_rr_p50_us": round2(weft.rr_p50),
        "stunnel_rr_p50_us": round2(stunnel.rr_p50),
        "weft_rr_p99_us": round2(weft.rr_p99),
        "direct_rr_p99_us": round2(direct.rr_p99),
        "stunnel_rr_p99_us": round2(stunnel.rr_p99),
        "relay_gbps": round2(relay.gbps),
        "relay_rr_p50_us": round2(relay.rr_p50),
        "capture_gbps": round2(capture.gbps),
        "observed_gbps": round2(observed.gbps),
        "observed_rr_p50_us": round2(observed.rr_p50),
        "observed_conn_per_s": round2(observed.conn_per_s),
        "relayed_gbps": round2(relayed.gbps),
        "relayed_rr_p50_us": round2(relayed.rr_p50),
        "capture_rr_p50_us": round2(capture.rr_p50),
        "weft_cpu_s_per_gb": round2(weft.cpu_s_per_gb),
        "stunnel_cpu_s_per_gb": round2(stunnel.cpu_s_per_gb),
        "capture_cpu_s_per_gb": round2(capture.cpu_s_per_gb),
        "weft_rr_cpu_us": round2(weft.rr_cpu_us),
        "capture_rr_cpu_us": round2(capture.rr_cpu_us),
        "stunnel_rr_cpu_us": round2(stunnel.rr_cpu_us),
        "crypto": {"weft": crypto_weft, "observed": crypto_weft, "relayed": crypto_weft, "capture": crypto_weft, "stunnel": CRYPTO_STUNNEL},
    });
    drop(cluster);
    serde_json::to_string(&json).context("JSON")
}

/// Attaches a subscriber of every flow event to each node's tunnel (`curl -sN` of its
/// admin `/flows?follow=true&last=0`, written to a file).
fn observe_all(cluster: &Cluster, round: usize) -> Result<Vec<(Process, std::path::PathBuf)>> {
    let mut observers = Vec::new();
    for node in &cluster.nodes {
        let file = cluster
            .dir
            .path()
            .join(format!("flows-{}-{round}.jsonl", node.name));
        let mut cmd = node.netns.command("curl");
        cmd.args(["-sN", "-o"])
            .arg(&file)
            .arg("http://127.0.0.1:15000/flows?follow=true&last=0");
        let log = cluster
            .dir
            .path()
            .join(format!("flows-{}-{round}.log", node.name));
        observers.push((Process::spawn("flows", cmd, log)?, file));
    }
    // Subscribed before the lane starts.
    std::thread::sleep(Duration::from_millis(300));
    Ok(observers)
}

/// Attaches one subscriber of every flow event to the controller's relay (`curl -sN` of its
/// `/flows?follow=true&last=0` on the router's loopback), once both nodes offer their flows.
fn observe_through_relay(
    cluster: &Cluster,
    round: usize,
) -> Result<Vec<(Process, std::path::PathBuf)>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let nodes = cluster
            .router
            .command("curl")
            .args(["-sS", "http://127.0.0.1:15010/nodes"])
            .output()?;
        if String::from_utf8_lossy(&nodes.stdout).lines().count() == cluster.nodes.len() {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the nodes do not all offer their flows to the relay: {}",
            String::from_utf8_lossy(&nodes.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let file = cluster
        .dir
        .path()
        .join(format!("flows-relay-{round}.jsonl"));
    let mut cmd = cluster.router.command("curl");
    cmd.args(["-sN", "-o"])
        .arg(&file)
        .arg("http://127.0.0.1:15010/flows?follow=true&last=0");
    let log = cluster.dir.path().join(format!("flows-relay-{round}.log"));
    let process = Process::spawn("flows-relay", cmd, log)?;
    // Subscribed on both tunnels before the lane starts.
    std::thread::sleep(Duration::from_millis(300));
    Ok(vec![(process, file)])
}

/// Stops the subscribers: the events they received, and the events they were told they lost.
fn stop_observers(observers: Vec<(Process, std::path::PathBuf)>) -> Result<(usize, u64)> {
    let (mut events, mut lost) = (0, 0);
    for (mut process, file) in observers {
        process.stop(Duration::from_secs(2));
        for line in std::fs::read_to_string(&file).unwrap_or_default().lines() {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v) if v["lost"].is_u64() => lost += v["lost"].as_u64().unwrap_or(0),
                Ok(v) if v["time_ms"].is_u64() => events += 1,
                _ => {}
            }
        }
    }
    Ok((events, lost))
}

/// The crypto of Weft's lanes: the provider node 1's tunnel chose at start-up (it logs the
/// choice; both tunnels run on the same CPU), and the suite both tunnels put first.
fn weft_crypto(cluster: &Cluster) -> String {
    let log = cluster.node(1).wait_for_log("crypto provider ");
    let backend = log
        .split("crypto provider ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or("unknown");
    format!("rustls 0.23 + {backend}, TLS13_AES_128_GCM_SHA256")
}

/// Connections node 2's tunnel took from the client pod over mutual TLS so far.
fn meshed_from_client(cluster: &Cluster) -> Result<f64> {
    let metrics = cluster.node(2).metrics()?;
    Ok(crate::metrics::sum(
        &metrics,
        "weft_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_workload", "client"),
            ("connection_security_policy", "mutual_tls"),
        ],
    ))
}
