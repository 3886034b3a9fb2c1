//! `weft-bench enroll`: a node with many enrolled pods in a larger cluster (pods of other,
//! simulated nodes only exist in the manifests and the tunnel's tables); the namespace label
//! is flipped again and again and the time until a pod's next connection follows it is
//! measured, then the resident memory of the agent and the tunnel.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{quantile, round2};
use crate::agents::Manifests;
use crate::cluster::{Cluster, ClusterSpec, PodSpec};

/// What to measure.
#[derive(Clone, Debug, clap::Args)]
pub struct EnrollBench {
    /// Pods in the cluster's state.
    #[arg(long, default_value_t = 1000)]
    pub pods: usize,
    /// Of which enrolled on the measured node (real pods with their own namespace).
    #[arg(long, default_value_t = 100)]
    pub enrolled: usize,
    /// Label flips measured.
    #[arg(long, default_value_t = 40)]
    pub flips: usize,
    /// How often the agent reads the manifest folder besides on inotify events, ms (the
    /// agent's default: the events are what the figures measure).
    #[arg(long, default_value_t = 200)]
    pub poll_ms: u64,
}

/// Runs the benchmark; prints a table and returns the JSON line.
pub fn run(args: &EnrollBench) -> Result<String> {
    anyhow::ensure!(
        args.enrolled <= 200 && args.enrolled <= args.pods,
        "--enrolled is at most 200 and at most --pods"
    );
    let pods: Vec<PodSpec> = (0..args.enrolled)
        .map(|i| PodSpec {
            name: format!("p{i:03}"),
            namespace: "bench".into(),
            service_account: format!("p{i:03}"),
            node: 1,
            mesh: true,
        })
        .collect();
    let spec = ClusterSpec {
        agents: true,
        agent_poll_ms: args.poll_ms,
        ..ClusterSpec::new(1, pods)
    };
    eprintln!(
        "enroll bench: {} pods in the state, {} enrolled on node1, {} label flips, agent poll {} ms",
        args.pods, args.enrolled, args.flips, args.poll_ms
    );
    let started = Instant::now();
    let mut cluster = Cluster::build(spec)?;
    let others = other_pods(args.pods - args.enrolled);
    let labelled = cluster.manifests_yaml(&Manifests {
        labelled: &["bench"],
        extra: &others,
        ..Manifests::default()
    });
    let unlabelled = cluster.manifests_yaml(&Manifests {
        extra: &others,
        ..Manifests::default()
    });
    // The probe pod alone opting out (its own label), the namespace staying labelled.
    let probe = format!("p{:03}", args.enrolled - 1);
    let probe_out = cluster.manifests_yaml(&Manifests {
        labelled: &["bench"],
        opted_out: &[probe.as_str()],
        extra: &others,
        ..Manifests::default()
    });
    cluster.replace_manifests(&labelled)?;
    cluster.start_agents()?;
    cluster.start_tunnels()?;
    eprintln!("  cluster up in {:.1} s", started.elapsed().as_secs_f64());

    // The probe is the pod enrolled last in the agent's order: the slowest to follow. First
    // the namespace label flips (all pods switch), then the probe's own label (one pod).
    let file = cluster.manifest_dir().join("cluster.yaml");
    let flips = args.flips;
    let (samples, one_pod) =
        cluster
            .pod(&probe)
            .netns
            .run_in(move || -> Result<(Vec<f64>, Vec<f64>)> {
                wait_until_captured(true, Duration::from_secs(60)).context("first enrollment")?;
                let flip_between = |on: &str, off: &str| -> Result<Vec<f64>> {
                    let mut samples = Vec::new();
                    for flip in 0..flips {
                        let enrolled = flip % 2 == 1;
                        let text = if enrolled { on } else { off };
                        let tmp = file.with_extension("tmp");
                        let start = Instant::now();
                        std::fs::write(&tmp, text)?;
                        std::fs::rename(&tmp, &file)?;
                        wait_until_captured(enrolled, Duration::from_secs(10))
                            .with_context(|| format!("flip {flip} to enrolled={enrolled}"))?;
                        samples.push(start.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok(samples)
                };
                let namespace = flip_between(&labelled, &unlabelled)?;
                let one_pod = flip_between(&labelled, &probe_out)?;
                Ok((namespace, one_pod))
            })??;
    let rss = |pid: Option<u32>| -> Result<f64> {
        let pid = pid.context("process gone")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")?;
        Ok(kb / 1024.0)
    };
    let agent_rss = rss(cluster.agents[0].pid())?;
    let tunnel_rss = rss(cluster.nodes[0].tunnel.as_ref().and_then(|t| t.pid()))?;
    let (p50, p99, max) = (
        quantile(&samples, 0.5),
        quantile(&samples, 0.99),
        quantile(&samples, 1.0),
    );
    println!(
        "label flip to effect on the slowest pod ({} flips, each switching {} pods): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms (goal p99 < 100 ms; the agent wakes on the folder's inotify event, its {} ms poll is the fallback)",
        samples.len(),
        args.enrolled,
        args.poll_ms
    );
    println!(
        "one pod's own label flipped ({} flips): p50 {:.1} ms, p99 {:.1} ms",
        one_pod.len(),
        quantile(&one_pod, 0.5),
        quantile(&one_pod, 0.99)
    );
    println!(
        "resident memory with {} pods in the state: agent {agent_rss:.1} MB, tunnel {tunnel_rss:.1} MB (goal < 40 MB each)",
        args.pods
    );
    let json = serde_json::json!({
        "bench": "enroll",
        "pods": args.pods,
        "enrolled": args.enrolled,
        "label_to_effect_p50_ms": round2(p50),
        "label_to_effect_p99_ms": round2(p99),
        "one_pod_label_to_effect_p50_ms": round2(quantile(&one_pod, 0.5)),
        "one_pod_label_to_effect_p99_ms": round2(quantile(&one_pod, 0.99)),
        "agent_rss_mb": round2(agent_rss),
        "tunnel_rss_mb": round2(tunnel_rss),
    });
    drop(cluster);
    serde_json::to_string(&json).context("JSON")
}

/// Whether this namespace's connects are captured now: a connect to a closed port of the
/// node (refused at once) succeeds only when capture takes it to the tunnel.
fn captured() -> bool {
    let dst: SocketAddr = "10.255.1.2:9".parse().unwrap_or_else(|_| unreachable!());
    std::net::TcpStream::connect_timeout(&dst, Duration::from_millis(50)).is_ok()
}

fn wait_until_captured(wanted: bool, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while captured() != wanted {
        if Instant::now() > deadline {
            bail!("capture did not become {wanted} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}

/// Pods of other nodes, known only from the manifests: `n` of them, ten namespaces.
fn other_pods(n: usize) -> String {
    let mut out = String::new();
    for ns in 0..10 {
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: far{ns}, labels: {{weft.dev/mesh: enabled}}}}\n---\n"
        );
    }
    for i in 0..n {
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: far-{i}, namespace: far{}, labels: {{app: far}}}}\nspec: {{nodeName: far-node{}, serviceAccountName: far, containers: [{{name: app, image: app}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.20.{}.{}}}]}}\n---\n",
            i % 10,
            i % 20,
            i / 250,
            i % 250 + 1,
        );
    }
    out
}
