//! Weft's whole-system benchmarks. Each subcommand measures baselines in the same run,
//! interleaved, prints medians and ratios, and ends with one JSON line of its figures.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use conformance::bench::capture::{self, CaptureBench};
use conformance::bench::enroll::{self, EnrollBench};
use conformance::bench::load::{self, LoadBench};
use conformance::bench::policy::{self, PolicyBench};
use conformance::bench::tunnel::{self, TunnelBench};

#[derive(Parser)]
#[command(name = "weft-bench")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Two pods on two nodes: direct TCP vs Weft (HBONE) vs a stunnel4 TLS 1.3 pair.
    Tunnel(TunnelBench),
    /// Two pods on one node: not enrolled vs enrolled (transparent capture through the tunnel).
    Capture(CaptureBench),
    /// Many pods: label flip to effect, and the agent's and tunnel's memory.
    Enroll(EnrollBench),
    /// 10,000 long-lived connections through both tunnels: memory idle, loaded and after.
    Load(LoadBench),
    /// Policy decisions with 10,000 MeshPolicies in the mesh against only the workload's own.
    Policy(PolicyBench),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    conformance::require_root();
    build_tunnel()?;
    let line = match cli.bench {
        Bench::Tunnel(args) => tunnel::run(&args)?,
        Bench::Capture(args) => capture::run(&args)?,
        Bench::Enroll(args) => enroll::run(&args)?,
        Bench::Load(args) => load::run(&args)?,
        Bench::Policy(args) => policy::run(&args)?,
    };
    println!("{line}");
    Ok(())
}

/// Under `cargo run`, builds `ztunnel` and `weft-redirect` with the same profile first, so
/// the benchmark never measures a stale binary.
fn build_tunnel() -> Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    let release = conformance::bin_dir().ends_with("release");
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--locked",
        "-p",
        "ztunnel",
        "-p",
        "redirect-ebpf",
        "-p",
        "mesh-node",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("cannot run cargo to build ztunnel")?;
    anyhow::ensure!(status.success(), "building ztunnel failed");
    Ok(())
}
