//! The README's first command: a simulated two-node cluster built from the Kubernetes
//! manifests in `examples/`, one `mesh-node` and one tunnel per node, and a real Prometheus
//! scraping both tunnels. It sends traffic, shows which connections were meshed and with which
//! identities, and stays up to look around until `scripts/demo.sh down` (or Ctrl-C).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use conformance::Cluster;
use conformance::examples::{read_examples, spec_for};
use conformance::prometheus::Prometheus;
use conformance::tour::tour;

/// Weft on a simulated two-node cluster, from manifests.
#[derive(Parser)]
struct Args {
    /// Folder of the cluster's manifests.
    #[arg(long, default_value = "examples")]
    examples: PathBuf,
    /// Tear down right after showing what happened (instead of staying up).
    #[arg(long)]
    exit: bool,
    /// Where the process id is written for `scripts/demo.sh down`.
    #[arg(long, default_value = "/run/weft-demo.pid")]
    pid_file: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    conformance::require_root();
    let objects = read_examples(&args.examples)?;
    let spec = spec_for(&objects)?;
    println!(
        "== building {} nodes and {} pods from {} (namespaces: {})",
        spec.nodes,
        spec.pods.len(),
        args.examples.display(),
        objects
            .namespaces
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut cluster = Cluster::build(spec)?;
    cluster.start_example_apps(&objects)?;
    cluster.write_live_manifests(&objects)?;
    println!("== starting one mesh-node and one tunnel per node");
    cluster.start_agents()?;
    cluster.start_tunnels()?;
    let logs = log_locations(&cluster);
    println!("== what the agents and tunnels say is logged to:\n{logs}");
    let _host = cluster.link_host()?;
    let targets: Vec<String> = (1..=cluster.nodes.len())
        .map(|i| format!("10.255.{i}.2:15020"))
        .collect();
    let prometheus = Prometheus::start(&targets, "127.0.0.1:9090", cluster.dir.path())?;
    println!(
        "== Prometheus on http://localhost:9090 scrapes {}",
        targets.join(", ")
    );

    let calls = tour(&objects, |name| {
        cluster.find_pod(name).map(|p| IpAddr::V4(p.ip))
    });
    if calls.is_empty() {
        println!("== no calls to make: no pod runs `weft-testapp http` (see examples/shop.yaml)");
    }
    for call in &calls {
        let out = cluster.run_in(&call.from, "curl", &["-sS", "--max-time", "10", &call.url])?;
        println!(
            "== in pod {}: curl {}\n   {}{}",
            call.from,
            call.url,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if let Some(call) = calls.first() {
        // The same server, with a method the demo's MeshPolicy (shop/web-read-only) does not
        // allow: refused with 403 by the server's tunnel, per request.
        let out = cluster.run_in(
            &call.from,
            "curl",
            &[
                "-sS",
                "--max-time",
                "10",
                "-w",
                " (HTTP %{http_code})",
                "-X",
                "POST",
                &call.url,
            ],
        )?;
        println!(
            "== in pod {}: curl -X POST {}   (the policies decide each request)\n   {}{}",
            call.from,
            call.url,
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .replace('\n', " "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    println!("== what the tunnels saw (access logs)");
    for node in &cluster.nodes {
        for entry in node.access_logs() {
            if entry["message"] == "request complete" {
                println!(
                    "   {} [request] {} ({}) -> {}: {} {} {} {}{}",
                    node.name,
                    entry["src.workload"].as_str().unwrap_or("?"),
                    entry["src.identity"].as_str().unwrap_or("?"),
                    entry["dst.workload"].as_str().unwrap_or("?"),
                    entry["method"].as_str().unwrap_or("?"),
                    entry["path"].as_str().unwrap_or("?"),
                    entry["status"],
                    entry["verdict"].as_str().unwrap_or("?"),
                    match (entry["policy"].as_str(), entry["verdict"].as_str()) {
                        (Some("-") | None, Some("deny")) => " (no Allow policy matches)".to_owned(),
                        (Some("-") | None, _) => String::new(),
                        (Some(policy), _) => format!(" by {policy}"),
                    },
                );
                continue;
            }
            println!(
                "   {} [{}] {} ({}) -> {} ({}) security={} {} B up, {} B down",
                node.name,
                entry["reporter"].as_str().unwrap_or("?"),
                entry["src.workload"].as_str().unwrap_or("?"),
                entry["src.identity"].as_str().unwrap_or("?"),
                entry["dst.workload"].as_str().unwrap_or("?"),
                entry["dst.identity"].as_str().unwrap_or("?"),
                entry["security"].as_str().unwrap_or("?"),
                entry["bytes_received"],
                entry["bytes_sent"],
            );
        }
    }
    println!(
        "== Prometheus: sum by (reporter, source, destination, security) (weft_tcp_connections_opened_total)"
    );
    let query = "sum by (reporter, source_workload, destination_workload, connection_security_policy) (weft_tcp_connections_opened_total)";
    // Wait for the scrape after the traffic: at least one record per call (a meshed one has
    // two, its two sides).
    let mut result = serde_json::Value::Null;
    for _ in 0..50 {
        result = prometheus.query(query)?;
        let total: f64 = result
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .sum();
        if total >= calls.len() as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for series in result.as_array().into_iter().flatten() {
        let m = &series["metric"];
        println!(
            "   {} {} -> {} {}: {}",
            m["reporter"].as_str().unwrap_or("?"),
            m["source_workload"].as_str().unwrap_or("?"),
            m["destination_workload"].as_str().unwrap_or("?"),
            m["connection_security_policy"].as_str().unwrap_or("?"),
            series["value"][1].as_str().unwrap_or("?")
        );
    }
    println!("== Prometheus: sum by (destination, response_code) (weft_requests_total)");
    let query = "sum by (destination_workload, response_code) (weft_requests_total)";
    for _ in 0..50 {
        result = prometheus.query(query)?;
        let codes = result.as_array().map_or(0, Vec::len);
        // The tour's allowed requests and the refused POST: two codes once scraped.
        if codes >= 2 || calls.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for series in result.as_array().into_iter().flatten() {
        let m = &series["metric"];
        println!(
            "   {} {}: {}",
            m["destination_workload"].as_str().unwrap_or("?"),
            m["response_code"].as_str().unwrap_or("?"),
            series["value"][1].as_str().unwrap_or("?")
        );
    }
    if args.exit {
        println!("== tearing down");
        return Ok(());
    }
    std::fs::write(&args.pid_file, std::process::id().to_string())
        .with_context(|| format!("write {}", args.pid_file.display()))?;
    let look = calls
        .first()
        .map(|call| {
            format!(
                "\x20  ip netns exec {} curl {}   # as the tour did\n",
                cluster.pod(&call.from).netns.name,
                call.url
            )
        })
        .unwrap_or_default();
    println!(
        "\n== the cluster stays up. Look around (as root):\n\
         {look}\
         \x20  ip netns exec {node1} curl -s localhost:15000/config_dump  # node1's tunnel state\n\
         \x20  {weft} observe {tunnels} --to-pod shop/web --type http --follow\n\
         \x20     # every request to web, live, from both tunnels (curl from a pod again to see it)\n\
         \x20  {weft} observe --relay {relay} --namespace shop --last 20\n\
         \x20     # the same through the controller's relay, as on a cluster: every node at once\n\
         \x20  Prometheus: http://localhost:9090  (try weft_tcp_connections_opened_total, weft_requests_total)\n\
         \x20  Change the cluster live: edit {manifests}/cluster.yaml (e.g. drop the shop label, or\n\
         \x20  edit the MeshPolicy), then read what the agents and tunnels said:\n\
         {logs}\n\
         == tear down: sudo ./scripts/demo.sh down   (or Ctrl-C here)",
        node1 = cluster.node(1).netns.name,
        manifests = cluster.manifest_dir().display(),
        weft = conformance::binary("weft").display(),
        relay = cluster.relay_source(),
        tunnels = cluster
            .nodes
            .iter()
            .map(|n| format!("--tunnel 127.0.0.1:15000@{}", n.netns.path().display()))
            .collect::<Vec<_>>()
            .join(" "),
    );
    wait_for_signal()?;
    println!("== tearing down");
    let _ = std::fs::remove_file(&args.pid_file);
    Ok(())
}

/// One line per agent and tunnel: where its log is.
fn log_locations(cluster: &Cluster) -> String {
    let agents = cluster.agents.iter();
    let tunnels = cluster.nodes.iter().filter_map(|n| n.tunnel.as_ref());
    agents
        .chain(tunnels)
        .map(|p| format!("\x20    {:18} {}", p.name, p.log.display()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Blocks until SIGINT or SIGTERM (handled, not blocked: the cluster's processes must still
/// get their own SIGTERM when torn down).
fn wait_for_signal() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok(())
    })
}
