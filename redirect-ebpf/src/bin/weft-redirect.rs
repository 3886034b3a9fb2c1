//! Weft's capture from the command line: `run` installs the programs (or takes over what an
//! earlier run pinned) and enrolls the given network namespaces, then waits for SIGTERM;
//! capture stays pinned after it exits, so restarting it changes nothing for live traffic.
//! `uninstall` removes every program, link and map. A stepping stone and a test tool:
//! `mesh-node` drives the same library from cluster state.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use redirect_ebpf::{
    DEFAULT_TUNNEL_MARK, Exclusions, Options, Redirect, cgroup2_mount, parse_mark, preflight,
    uninstall_from,
};

#[derive(Parser)]
#[command(
    name = "weft-redirect",
    version,
    about = "Weft's transparent capture (eBPF)"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install capture (or take over a pinned one) for the given pods and hold until SIGTERM.
    Run(RunArgs),
    /// Remove every capture program, link and map pinned under the pin directory.
    Uninstall {
        /// Where capture is pinned; default: weft on the BPF file system (/sys/fs/bpf/weft).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// A pod's network namespace to enroll (e.g. /run/netns/pod-a); repeat for more.
    #[arg(long = "enroll", required = true)]
    enroll: Vec<PathBuf>,
    /// The cgroup to attach to; default: the root of the cgroup v2 hierarchy.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Where links and maps are pinned; default: weft on the BPF file system (/sys/fs/bpf/weft).
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Move bytes between applications and the tunnel with sockops + sk_msg.
    #[arg(long)]
    fast_path: bool,
    /// The tunnel's socket mark (its --socket-mark): sockets carrying it are never captured;
    /// 0 for none (the cgroup exclusion alone).
    #[arg(long, default_value_t = DEFAULT_TUNNEL_MARK, value_parser = parse_mark)]
    tunnel_mark: u32,
    /// A cgroup v2 directory whose processes are never captured (the tunnel's); repeatable.
    #[arg(long = "exclude-cgroup")]
    exclude_cgroups: Vec<PathBuf>,
    /// A destination port every enrolled pod leaves out of capture (at most 8).
    #[arg(long = "exclude-port")]
    exclude_ports: Vec<u16>,
    /// An address range (a.b.c.d/n or x:y::/n) every enrolled pod leaves out of capture (at
    /// most 4).
    #[arg(long = "exclude-cidr", value_parser = parse_cidr)]
    exclude_cidrs: Vec<(IpAddr, u8)>,
}

fn main() -> std::process::ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let result = match Args::parse().command {
        Command::Run(args) => run(args),
        Command::Uninstall { pin_dir } => remove(pin_dir),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-redirect: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // Block the signals first, so none is lost between install and wait.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .context("cannot block SIGTERM/SIGINT")?;

    preflight()?;
    let cgroup = match args.cgroup {
        Some(path) => path,
        None => cgroup2_mount()?,
    };
    let options = Options {
        fast_path: args.fast_path,
        pin_dir: args.pin_dir,
        tunnel_mark: args.tunnel_mark,
    };
    let exclusions = Exclusions {
        ports: args.exclude_ports,
        cidrs: args.exclude_cidrs,
    };
    // Open every namespace first: a wrong path stops here, before anything is installed.
    let namespaces = args
        .enroll
        .iter()
        .map(|path| {
            std::fs::File::open(path)
                .map(|file| (path, file))
                .with_context(|| format!("cannot open the network namespace {}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut redirect = Redirect::install(&cgroup, &options)?;
    for path in &args.exclude_cgroups {
        let id = redirect.exclude_cgroup(path)?;
        println!("never capturing cgroup {} (id {id})", path.display());
    }
    for (path, netns) in &namespaces {
        let cookie = redirect.enroll(netns, &exclusions)?;
        println!("enrolled {} (netns cookie {cookie})", path.display());
    }
    let verb = if redirect.adopted() {
        "taken over"
    } else {
        "installed"
    };
    println!(
        "capture {verb} on {}, pinned under {}; SIGTERM stops this process and leaves capture in place (`weft-redirect uninstall` removes it)",
        cgroup.display(),
        redirect.pin_dir().display()
    );
    let signal = signals.wait().context("waiting for a signal")?;
    println!("{signal:?}: exiting; capture stays pinned");
    Ok(())
}

fn remove(pin_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let (dir, removed) = uninstall_from(pin_dir)?;
    if removed {
        println!("capture removed from {}", dir.display());
    } else {
        println!("nothing pinned under {}", dir.display());
    }
    Ok(())
}

/// `a.b.c.d/n` or `x:y::/n`.
fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not address/prefix-length"))?;
    let addr: IpAddr = addr.parse().map_err(|e| format!("{text:?}: {e}"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = len
        .parse::<u8>()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?;
    Ok((addr, len))
}
