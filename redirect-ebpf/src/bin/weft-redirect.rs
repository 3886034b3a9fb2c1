//! Runs Weft's capture for a fixed set of pods until SIGTERM: installs the programs, enrolls
//! each given network namespace, and detaches everything on exit. A stepping stone and a test
//! tool: `mesh-node` will drive the same library from cluster state.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use redirect_ebpf::{Exclusions, Options, Redirect, cgroup2_mount, netns_cookie};

/// Transparent capture for the pods whose network namespaces are given.
#[derive(Parser)]
#[command(name = "weft-redirect", version)]
struct Args {
    /// A pod's network namespace to enroll (e.g. /run/netns/pod-a); repeat for more.
    #[arg(long = "enroll", required = true)]
    enroll: Vec<PathBuf>,
    /// The cgroup to attach to; default: the root of the cgroup v2 hierarchy.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Move bytes between applications and the tunnel with sockops + sk_msg.
    #[arg(long)]
    fast_path: bool,
    /// A destination port every enrolled pod leaves out of capture (at most 8).
    #[arg(long = "exclude-port")]
    exclude_ports: Vec<u16>,
    /// An IPv4 range (a.b.c.d/n) every enrolled pod leaves out of capture (at most 4).
    #[arg(long = "exclude-cidr", value_parser = parse_cidr)]
    exclude_cidrs: Vec<(Ipv4Addr, u8)>,
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-redirect: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Block the signals first, so none is lost between install and wait.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .context("cannot block SIGTERM/SIGINT")?;

    let cgroup = match args.cgroup {
        Some(path) => path,
        None => cgroup2_mount()?,
    };
    let options = Options {
        fast_path: args.fast_path,
    };
    let exclusions = Exclusions {
        ports: args.exclude_ports,
        cidrs_v4: args.exclude_cidrs,
    };
    let mut redirect = Redirect::install(&cgroup, &options)?;
    for path in &args.enroll {
        let cookie = netns_cookie(path)?;
        redirect.enroll_with(cookie, &exclusions)?;
        println!("enrolled {} (netns cookie {cookie})", path.display());
    }
    println!(
        "capture installed on {}; SIGTERM to remove it",
        cgroup.display()
    );
    let signal = signals.wait().context("waiting for a signal")?;
    println!("{signal:?}: removing capture");
    drop(redirect);
    Ok(())
}

/// `a.b.c.d/n`.
fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a.b.c.d/n"))?;
    let addr = addr.parse().map_err(|e| format!("{text:?}: {e}"))?;
    let len = len
        .parse::<u8>()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to 32"))?;
    Ok((addr, len))
}
