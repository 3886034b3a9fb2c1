//! `weft-bench tunnel`: one bulk stream and small request/response round trips between two
//! pods on two nodes, direct, through Weft, and through a stunnel pair, interleaved.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};

use super::client::{self, Path};
use super::{median, quantile, round2};
use crate::cluster::{Cluster, ClusterSpec, PodSpec, wait_for_port};

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
}

/// One way from the client pod to an echo and a source server.
struct Lane {
    name: &'static str,
    echo: (Path, SocketAddr),
    source: (Path, SocketAddr),
    figures: Figures,
}

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
    let server = cluster.pod("server").ip;
    let plain = cluster.pod("plain").ip;
    let stunnel = super::stunnel::start(&mut cluster, "client", "server", server, &[ECHO, SOURCE])?;
    let at = |ip, port| SocketAddr::from((ip, port));
    let lane = |name, echo, source| Lane {
        name,
        echo,
        source,
        figures: Figures::default(),
    };
    let mut lanes = [
        lane(
            "direct",
            (Path::Direct, at(server, ECHO)),
            (Path::Direct, at(server, SOURCE)),
        ),
        lane(
            "weft",
            (Path::Weft, at(server, ECHO)),
            (Path::Weft, at(server, SOURCE)),
        ),
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
        ),
        // Diagnostic: Weft's SOCKS entry to a pod outside the mesh, i.e. one userspace relay
        // (the client node's tunnel) with no TLS and no HTTP/2.
        lane(
            "relay",
            (Path::Weft, at(plain, ECHO)),
            (Path::Weft, at(plain, SOURCE)),
        ),
    ];
    let client_ns = &cluster.pod("client").netns;
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
            let (gbps, rr) = client_ns.run_in(move || -> Result<(f64, Vec<f64>)> {
                let gbps = client::throughput(source.0, source.1, bytes)?;
                let rr = client::request_response(echo.0, echo.1, size, iters, iters / 10)?;
                Ok((gbps, rr))
            })??;
            let (p50, p99) = (quantile(&rr, 0.5), quantile(&rr, 0.99));
            eprintln!(
                "  round {round} {:8} {gbps:7.2} Gbit/s   rr p50 {p50:7.1} us  p99 {p99:7.1} us",
                lane.name
            );
            lane.figures.gbps.push(gbps);
            lane.figures.rr_p50.push(p50);
            lane.figures.rr_p99.push(p99);
        }
    }
    if !args.only.is_empty() {
        anyhow::bail!("--only measures a subset of lanes: no medians or JSON line");
    }
    let medians: Vec<(f64, f64, f64)> = lanes
        .iter()
        .map(|l| {
            (
                median(&l.figures.gbps),
                median(&l.figures.rr_p50),
                median(&l.figures.rr_p99),
            )
        })
        .collect();
    println!("medians over {} rounds:", args.measure.rounds);
    println!("  lane      throughput      rr p50      rr p99");
    for (lane, (gbps, p50, p99)) in lanes.iter().zip(&medians) {
        println!(
            "  {:8}{gbps:8.2} Gbit/s {p50:8.1} us {p99:8.1} us",
            lane.name
        );
    }
    let [direct, weft, stunnel, relay] = [medians[0], medians[1], medians[2], medians[3]];
    let weft_added = weft.1 - direct.1;
    let stunnel_added = stunnel.1 - direct.1;
    println!("ratios:");
    println!(
        "  weft / stunnel throughput  {:.2}x   (target >= 2.5x)",
        weft.0 / stunnel.0
    );
    println!(
        "  weft / direct throughput   {:.1}%   (target >= 25%)",
        100.0 * weft.0 / direct.0
    );
    println!(
        "  added p50 latency: weft {weft_added:.1} us, stunnel {stunnel_added:.1} us, ratio {:.2} (target <= 0.5)",
        weft_added / stunnel_added
    );
    println!(
        "  added p50 latency of one plain userspace relay (no TLS): {:.1} us",
        relay.1 - direct.1
    );
    let json = serde_json::json!({
        "bench": "tunnel",
        "direct_gbps": round2(direct.0),
        "weft_gbps": round2(weft.0),
        "stunnel_gbps": round2(stunnel.0),
        "direct_rr_p50_us": round2(direct.1),
        "weft_rr_p50_us": round2(weft.1),
        "stunnel_rr_p50_us": round2(stunnel.1),
        "weft_rr_p99_us": round2(weft.2),
        "direct_rr_p99_us": round2(direct.2),
        "stunnel_rr_p99_us": round2(stunnel.2),
        "relay_gbps": round2(relay.0),
        "relay_rr_p50_us": round2(relay.1),
    });
    drop(cluster);
    serde_json::to_string(&json).context("JSON")
}
