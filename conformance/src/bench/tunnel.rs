//! `weft-bench tunnel`: one bulk stream and small request/response round trips between two
//! pods on two nodes, direct, through Weft, and through a stunnel pair, interleaved.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};

use super::client::{self, Path};
use super::{median, quantile};
use crate::cluster::{Cluster, ClusterSpec, PodSpec, wait_for_port};

/// What to measure.
#[derive(Clone, Debug, clap::Args)]
pub struct TunnelBench {
    /// Rounds; each measures every path once, in turn.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Bytes of the bulk download per measurement.
    #[arg(long, default_value_t = 512 << 20)]
    pub bytes: u64,
    /// Round trips per latency measurement.
    #[arg(long, default_value_t = 5000)]
    pub round_trips: usize,
    /// Size of each request and response, bytes.
    #[arg(long, default_value_t = 64)]
    pub message: usize,
}

const ECHO: u16 = 9000;
const SOURCE: u16 = 9001;

#[derive(Default)]
struct Figures {
    gbps: Vec<f64>,
    rr_p50: Vec<f64>,
    rr_p99: Vec<f64>,
}

/// Runs the benchmark; prints a table and returns the JSON line.
pub fn run(args: &TunnelBench) -> Result<String> {
    let mut cluster = Cluster::build(ClusterSpec::new(
        2,
        vec![PodSpec::new("client", 1), PodSpec::new("server", 2)],
    ))?;
    let app = crate::binary("weft-testapp");
    cluster.spawn_in("server", &app, &["echo", "--port", &ECHO.to_string()])?;
    cluster.spawn_in("server", &app, &["source", "--port", &SOURCE.to_string()])?;
    let server_ip = cluster.pod("server").ip;
    for port in [ECHO, SOURCE] {
        wait_for_port(
            &cluster.pod("server").netns,
            server_ip,
            port,
            Duration::from_secs(10),
        )?;
    }
    cluster.start_tunnels()?;
    let stunnel =
        super::stunnel::start(&mut cluster, "client", "server", server_ip, &[ECHO, SOURCE])?;
    let paths = [
        ("direct", Path::Direct),
        ("weft", Path::Weft),
        (
            "stunnel",
            Path::Stunnel {
                local_port: stunnel.local_ports[0],
            },
        ),
    ];
    let mut figures: Vec<Figures> = paths.iter().map(|_| Figures::default()).collect();
    let client_ns = &cluster.pod("client").netns;
    eprintln!(
        "tunnel bench: {} rounds, {} MiB download, {} round trips of {} B, paths direct / weft / stunnel interleaved",
        args.rounds,
        args.bytes >> 20,
        args.round_trips,
        args.message
    );
    for round in 0..args.rounds {
        for (i, (name, path)) in paths.iter().enumerate() {
            let (path, source_path) = match *path {
                Path::Stunnel { .. } => (
                    Path::Stunnel {
                        local_port: stunnel.local_ports[0],
                    },
                    Path::Stunnel {
                        local_port: stunnel.local_ports[1],
                    },
                ),
                p => (p, p),
            };
            let bytes = args.bytes;
            let (iters, size) = (args.round_trips, args.message);
            let (gbps, rr) = client_ns.run_in(move || -> Result<(f64, Vec<f64>)> {
                let gbps =
                    client::throughput(source_path, SocketAddr::from((server_ip, SOURCE)), bytes)?;
                let rr = client::request_response(
                    path,
                    SocketAddr::from((server_ip, ECHO)),
                    size,
                    iters,
                    iters / 10,
                )?;
                Ok((gbps, rr))
            })??;
            let (p50, p99) = (quantile(&rr, 0.5), quantile(&rr, 0.99));
            eprintln!(
                "  round {round} {name:8} {gbps:7.2} Gbit/s   rr p50 {p50:7.1} us  p99 {p99:7.1} us"
            );
            figures[i].gbps.push(gbps);
            figures[i].rr_p50.push(p50);
            figures[i].rr_p99.push(p99);
        }
    }
    let m = |i: usize, f: fn(&Figures) -> &Vec<f64>| median(f(&figures[i]));
    let (direct_gbps, weft_gbps, stunnel_gbps) =
        (m(0, |f| &f.gbps), m(1, |f| &f.gbps), m(2, |f| &f.gbps));
    let (direct_p50, weft_p50, stunnel_p50) = (
        m(0, |f| &f.rr_p50),
        m(1, |f| &f.rr_p50),
        m(2, |f| &f.rr_p50),
    );
    let (direct_p99, weft_p99, stunnel_p99) = (
        m(0, |f| &f.rr_p99),
        m(1, |f| &f.rr_p99),
        m(2, |f| &f.rr_p99),
    );
    println!("medians over {} rounds:", args.rounds);
    println!("  path      throughput      rr p50      rr p99");
    println!("  direct  {direct_gbps:8.2} Gbit/s {direct_p50:8.1} us {direct_p99:8.1} us");
    println!("  weft    {weft_gbps:8.2} Gbit/s {weft_p50:8.1} us {weft_p99:8.1} us");
    println!("  stunnel {stunnel_gbps:8.2} Gbit/s {stunnel_p50:8.1} us {stunnel_p99:8.1} us");
    let weft_added = weft_p50 - direct_p50;
    let stunnel_added = stunnel_p50 - direct_p50;
    println!("ratios:");
    println!(
        "  weft / stunnel throughput  {:.2}x   (target >= 2.5x)",
        weft_gbps / stunnel_gbps
    );
    println!(
        "  weft / direct throughput   {:.1}%   (target >= 25%)",
        100.0 * weft_gbps / direct_gbps
    );
    println!(
        "  added p50 latency: weft {weft_added:.1} us, stunnel {stunnel_added:.1} us, ratio {:.2} (target <= 0.5)",
        weft_added / stunnel_added
    );
    let json = serde_json::json!({
        "bench": "tunnel",
        "direct_gbps": round2(direct_gbps),
        "weft_gbps": round2(weft_gbps),
        "stunnel_gbps": round2(stunnel_gbps),
        "direct_rr_p50_us": round2(direct_p50),
        "weft_rr_p50_us": round2(weft_p50),
        "stunnel_rr_p50_us": round2(stunnel_p50),
        "weft_rr_p99_us": round2(weft_p99),
        "direct_rr_p99_us": round2(direct_p99),
        "stunnel_rr_p99_us": round2(stunnel_p99),
    });
    drop(cluster);
    serde_json::to_string(&json).context("JSON")
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
