//! `weft-bench capture`: the same pod pair on one node, direct (not enrolled) and enrolled
//! (transparent capture through the node's tunnel), interleaved; bulk throughput and small
//! request/response latency.

use std::net::SocketAddr;

use anyhow::{Context, Result};

use super::client::{self, Path};
use super::{median, quantile, round2};
use crate::cluster::{Cluster, ClusterSpec, PodSpec};

/// What to measure.
#[derive(Clone, Debug, clap::Args)]
pub struct CaptureBench {
    #[command(flatten)]
    pub measure: super::Measure,
}

const ECHO: u16 = 9000;
const SOURCE: u16 = 9001;

/// Runs the benchmark; prints a table and returns the JSON line.
pub fn run(args: &CaptureBench) -> Result<String> {
    let mut cluster = Cluster::build(ClusterSpec::new(
        1,
        vec![PodSpec::new("client", 1), PodSpec::new("server", 1)],
    ))?;
    cluster.start_app("server", &["echo", "--port", &ECHO.to_string()], ECHO)?;
    cluster.start_app("server", &["source", "--port", &SOURCE.to_string()], SOURCE)?;
    cluster.start_tunnels()?;
    let server = cluster.pod("server").ip;
    // mesh and mesh_nofast take the tunnel's same-node shortcut (its default); mesh_hbone is
    // mesh_nofast with the shortcut off: TLS and HTTP/2 through the pod's own 15008.
    let lanes = ["direct", "mesh", "mesh_nofast", "mesh_hbone"];
    let mut shortcut = true;
    let mut figures: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); lanes.len()];
    eprintln!(
        "capture bench: {} rounds, {} MiB download, {} round trips of {} B, one node; lanes interleaved: {}",
        args.measure.rounds,
        args.measure.bytes >> 20,
        args.measure.round_trips,
        args.measure.message,
        lanes.join(", ")
    );
    for round in 0..args.measure.rounds {
        for (i, lane) in lanes.iter().enumerate() {
            let wanted = *lane != "mesh_hbone";
            if wanted != shortcut {
                cluster.spec.tunnel_args = if wanted {
                    vec![]
                } else {
                    vec!["--same-node-shortcut".into(), "false".into()]
                };
                if let Some(mut tunnel) = cluster.nodes[0].tunnel.take() {
                    tunnel.stop(std::time::Duration::from_secs(10));
                }
                cluster.start_tunnel(1)?;
                shortcut = wanted;
            }
            let meshed_before = meshed(&cluster)?;
            // Enrolled only while its lane is measured: the same pods, the same client code.
            let capture = match *lane {
                "direct" => None,
                "mesh" => Some(cluster.spawn_capture(&["client", "server"], true)?),
                _ => Some(cluster.spawn_capture(&["client", "server"], false)?),
            };
            let (bytes, iters, size) = (
                args.measure.bytes,
                args.measure.round_trips,
                args.measure.message,
            );
            let (gbps, rr) =
                cluster
                    .pod("client")
                    .netns
                    .run_in(move || -> Result<(f64, Vec<f64>)> {
                        let gbps = client::throughput(
                            Path::Direct,
                            SocketAddr::from((server, SOURCE)),
                            bytes,
                        )?;
                        let rr = client::request_response(
                            Path::Direct,
                            SocketAddr::from((server, ECHO)),
                            size,
                            iters,
                            iters / 10,
                        )?;
                        Ok((gbps, rr))
                    })??;
            drop(capture);
            // A mesh lane must really have gone through the tunnel (two connections).
            let meshed_now = meshed(&cluster)? - meshed_before;
            let expected = if *lane == "direct" { 0.0 } else { 2.0 };
            anyhow::ensure!(
                meshed_now == expected,
                "lane {lane}: {meshed_now} meshed connections, not {expected}: capture did not do what the lane says"
            );
            let (p50, p99) = (quantile(&rr, 0.5), quantile(&rr, 0.99));
            eprintln!(
                "  round {round} {lane:12} {gbps:7.2} Gbit/s   rr p50 {p50:7.1} us  p99 {p99:7.1} us"
            );
            figures[i].0.push(gbps);
            figures[i].1.push(p50);
            figures[i].2.push(p99);
        }
    }
    let m: Vec<(f64, f64, f64)> = figures
        .iter()
        .map(|(g, p50, p99)| (median(g), median(p50), median(p99)))
        .collect();
    let (direct, mesh, nofast, hbone) = (m[0], m[1], m[2], m[3]);
    println!(
        "medians over {} rounds (pods on the same node):",
        args.measure.rounds
    );
    println!("  lane          throughput      rr p50      rr p99");
    for (lane, (g, p50, p99)) in lanes.iter().zip(&m) {
        println!("  {lane:12}{g:8.2} Gbit/s {p50:8.1} us {p99:8.1} us");
    }
    println!(
        "  added p50 latency: with the fast path {:.1} us (goal < 30 us), without {:.1} us",
        mesh.1 - direct.1,
        nofast.1 - direct.1
    );
    println!(
        "  fast path / no fast path: throughput {:.2}x, p50 {:.2}x",
        mesh.0 / nofast.0,
        mesh.1 / nofast.1
    );
    println!(
        "  same-node shortcut / HBONE to the pod's own 15008 (both without the fast path): throughput {:.2}x, added p50 {:.1} vs {:.1} us",
        nofast.0 / hbone.0,
        nofast.1 - direct.1,
        hbone.1 - direct.1
    );
    let json = serde_json::json!({
        "bench": "capture",
        "direct_gbps": round2(direct.0),
        "mesh_gbps": round2(mesh.0),
        "mesh_nofast_gbps": round2(nofast.0),
        "direct_rr_p50_us": round2(direct.1),
        "mesh_rr_p50_us": round2(mesh.1),
        "mesh_nofast_rr_p50_us": round2(nofast.1),
        "mesh_hbone_gbps": round2(hbone.0),
        "mesh_hbone_rr_p50_us": round2(hbone.1),
        "direct_rr_p99_us": round2(direct.2),
        "mesh_rr_p99_us": round2(mesh.2),
        "mesh_nofast_rr_p99_us": round2(nofast.2),
    });
    drop(cluster);
    serde_json::to_string(&json).context("JSON")
}

/// Connections node 1's tunnel has accepted into the mesh (as the destination side).
fn meshed(cluster: &Cluster) -> Result<f64> {
    let (status, metrics) = cluster.node(1).http_get(15020, "/metrics")?;
    anyhow::ensure!(status == 200, "metrics: {status}");
    Ok(crate::metrics::sum(
        &crate::metrics::parse(&metrics),
        "weft_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "mutual_tls"),
        ],
    ))
}
