//! The README's first command: two simulated nodes, one tunnel each, and a curl from a pod on
//! node 1 to a pod on node 2 through both tunnels (first via SOCKS5, then unmodified with eBPF
//! capture), showing what each side saw.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use conformance::Cluster;

/// Two-node Weft tunnel demo on network namespaces.
#[derive(Parser)]
struct Args {
    /// Keep the cluster up until Ctrl-C, to look around.
    #[arg(long)]
    keep: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    conformance::require_root();
    println!("== building a two-node cluster: pod 'client' on node1, pod 'server' on node2");
    let mut cluster = Cluster::client_server(&[])?;
    let server_ip = cluster.pod("server").ip;
    println!(
        "== tunnels ready; state file of node1:\n{}",
        std::fs::read_to_string(&cluster.node(1).state_file)?
    );

    let url = format!("http://{server_ip}:8080/echo/hello-from-the-demo");
    println!("== in pod 'client': curl --socks5 127.0.0.1:15080 {url}");
    let out = cluster.curl_socks("client", &url, &["--max-time", "10"])?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    anyhow::ensure!(out.success, "curl failed");

    println!("== transparent capture: weft-redirect enrolls pods 'client' and 'server' (eBPF)");
    cluster.start_capture(&["client", "server"])?;
    let url = format!("http://{server_ip}:8080/echo/hello-without-socks");
    println!("== in pod 'client', an unmodified client: curl {url}");
    let out = cluster.run_in("client", "curl", &["-sS", "--max-time", "10", &url])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "curl failed");
    std::thread::sleep(Duration::from_millis(300));

    for node in &cluster.nodes {
        println!("== {}: access log", node.name);
        for entry in node.access_logs() {
            println!(
                "   reporter={} {} ({}) -> {} ({}) security={} bytes_received={} bytes_sent={} flags={}",
                entry["reporter"].as_str().unwrap_or("?"),
                entry["src.workload"].as_str().unwrap_or("?"),
                entry["src.identity"].as_str().unwrap_or("?"),
                entry["dst.workload"].as_str().unwrap_or("?"),
                entry["dst.identity"].as_str().unwrap_or("?"),
                entry["security"].as_str().unwrap_or("?"),
                entry["bytes_received"],
                entry["bytes_sent"],
                entry["response_flags"].as_str().unwrap_or("?"),
            );
        }
        println!("== {}: metrics (:15020/metrics)", node.name);
        let (_, body) = node.http_get(15020, "/metrics")?;
        for line in body.lines().filter(|l| l.starts_with("weft_")) {
            println!("   {line}");
        }
    }
    if args.keep {
        println!("\n== the cluster stays up until Ctrl-C. Try:");
        println!(
            "   ip netns exec {} curl --socks5 127.0.0.1:15080 {url}",
            cluster.pod("client").netns.name
        );
        println!(
            "   ip netns exec {} curl -s 127.0.0.1:15000/config_dump",
            cluster.node(1).netns.name
        );
        println!(
            "   ip netns exec {} curl -s 127.0.0.1:15020/metrics",
            cluster.node(2).netns.name
        );
        let (tx, rx) = std::sync::mpsc::channel();
        ctrlc_channel(tx)?;
        let _ = rx.recv();
    }
    println!("== tearing down");
    drop(cluster);
    Ok(())
}

/// Waits for SIGINT/SIGTERM on a helper thread.
fn ctrlc_channel(tx: std::sync::mpsc::Sender<()>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
            }
        });
        let _ = tx.send(());
    });
    Ok(())
}
