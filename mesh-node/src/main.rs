//! `mesh-node run`: the per-node agent; `mesh-node controller`: the cluster's controller.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_node::agent::{AgentScope, AgentStatus, ClusterSource, TunnelOutput, run_agent};
use mesh_node::capture::CaptureReconciler;
use mesh_node::controller::{
    ControllerSettings, ControllerStatus, run_controller as run_controller_loop,
};
use mesh_node::kube_source::KubeSource;
use mesh_node::manifests::ManifestFolder;
use mesh_node::tunnel_link::TunnelLink;
use redirect_ebpf::{DEFAULT_TUNNEL_MARK, Options, Redirect, cgroup2_mount, parse_mark};
use tracing::info;

#[derive(Parser)]
#[command(name = "mesh-node", version, about = "Weft's per-node agent")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Follow the cluster and enroll this node's pods until SIGTERM.
    Run(RunArgs),
    /// The cluster's controller (one Deployment, replicas elect a leader with a Lease): writes
    /// the status of MeshPolicies and MeshAuthentications, until SIGTERM.
    Controller(ControllerArgs),
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Namespace of the Lease the replicas elect a leader with.
    #[arg(long, env = "WEFT_CONTROLLER_NAMESPACE", default_value = "weft-system")]
    lease_namespace: String,
    /// Name of that Lease.
    #[arg(long, default_value = "weft-controller")]
    lease_name: String,
    /// This replica's name among the candidates (unique; in a pod, its name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long a leader holds the Lease past each renewal (renewed every third of it).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    #[command(flatten)]
    mesh: MeshArgs,
    /// Where readiness is served (200 once the cluster was listed, leading or not).
    #[arg(
        long,
        env = "WEFT_CONTROLLER_READINESS_ADDR",
        default_value = "127.0.0.1:15023"
    )]
    readiness_addr: std::net::SocketAddr,
}

/// What the agent and the controller read the same way.
#[derive(clap::Args)]
struct MeshArgs {
    /// MeshPolicies and MeshAuthentications of this namespace apply to the whole mesh.
    #[arg(long, env = "WEFT_ROOT_NAMESPACE", default_value = "weft-system")]
    root_namespace: String,
}

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name (the pods' spec.nodeName).
    #[arg(long, env = "WEFT_NODE_NAME")]
    node_name: String,
    #[command(flatten)]
    mesh: MeshArgs,
    /// Folder of Kubernetes YAML (Namespaces, Pods, Services) to follow (one machine, demos,
    /// tests).
    #[arg(
        long,
        env = "WEFT_MANIFESTS",
        conflicts_with = "kubernetes",
        required_unless_present = "kubernetes"
    )]
    manifests: Option<PathBuf>,
    /// Follow the Kubernetes API (in-cluster service account, or KUBECONFIG).
    #[arg(long)]
    kubernetes: bool,
    /// How often the folder is read again, besides at once on every inotify event (and
    /// problems retried).
    #[arg(long, env = "WEFT_MANIFEST_POLL", default_value = "200ms", value_parser = humantime::parse_duration)]
    poll: Duration,
    /// Serve the tunnel protocol on this Unix socket (the tunnel connects with --agent-socket).
    #[arg(
        long,
        env = "WEFT_TUNNEL_SOCKET",
        conflicts_with = "tunnel_state_file",
        required_unless_present = "tunnel_state_file"
    )]
    tunnel_socket: Option<PathBuf>,
    /// The user the tunnel runs as: a process of any other user connecting to the tunnel
    /// socket is refused. Default: this agent's own user.
    #[arg(long, env = "WEFT_TUNNEL_UID")]
    tunnel_uid: Option<u32>,
    /// Or write the tables to this YAML file, which the tunnel polls (--state-file).
    #[arg(long, env = "WEFT_TUNNEL_STATE_FILE")]
    tunnel_state_file: Option<PathBuf>,
    /// Where capture is pinned; default: weft on the BPF file system.
    #[arg(long, env = "WEFT_CAPTURE_PIN_DIR")]
    pin_dir: Option<PathBuf>,
    /// The cgroup capture attaches to; default: the root of the cgroup v2 hierarchy.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// The tunnel's cgroup (never captured); repeatable.
    #[arg(long = "exclude-cgroup")]
    exclude_cgroups: Vec<PathBuf>,
    /// The tunnel's socket mark (its --socket-mark): sockets carrying it are never captured;
    /// 0 for none (the cgroup exclusion alone). The tunnel is told it and refuses to follow
    /// an agent whose mark differs from its own.
    #[arg(long, env = "WEFT_TUNNEL_MARK", default_value_t = DEFAULT_TUNNEL_MARK, value_parser = parse_mark)]
    tunnel_mark: u32,
    /// Move bytes between applications and the tunnel with sockops + sk_msg.
    #[arg(long)]
    fast_path: bool,
    /// Where readiness is served (any `GET`: 200 ready, 503 not yet, reasons in the body).
    #[arg(
        long,
        env = "WEFT_AGENT_READINESS_ADDR",
        default_value = "127.0.0.1:15022"
    )]
    readiness_addr: std::net::SocketAddr,
    /// Do not touch capture (only compute and hand on the tables).
    #[arg(long)]
    no_capture: bool,
}

fn main() -> std::process::ExitCode {
    use std::io::IsTerminal;
    mesh_node::install_default_crypto_provider();
    tracing_subscriber::fmt()
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let result = match Args::parse().command {
        Command::Run(args) => run(args),
        Command::Controller(args) => run_controller(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    if let Some(folder) = args.manifests.as_ref().filter(|f| !f.is_dir()) {
        anyhow::bail!("--manifests {} is not a folder", folder.display());
    }
    let capture = if args.no_capture {
        None
    } else {
        let cgroup = match &args.cgroup {
            Some(path) => path.clone(),
            None => cgroup2_mount()?,
        };
        let options = Options {
            fast_path: args.fast_path,
            pin_dir: args.pin_dir.clone(),
            tunnel_mark: args.tunnel_mark,
        };
        let mut redirect = Redirect::install(&cgroup, &options)?;
        for path in &args.exclude_cgroups {
            redirect.exclude_cgroup(path)?;
        }
        info!(
            pins = %redirect.pin_dir().display(),
            adopted = redirect.adopted(),
            "capture ready"
        );
        Some(CaptureReconciler::new(redirect))
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let output = match (&args.tunnel_socket, &args.tunnel_state_file) {
            (Some(socket), _) => {
                let uid = args
                    .tunnel_uid
                    .unwrap_or_else(tunnel_proto::peer::current_uid);
                let mark = (!args.no_capture).then_some(args.tunnel_mark);
                TunnelOutput::Socket(TunnelLink::bind(socket, uid, mark)?)
            }
            (None, Some(file)) => TunnelOutput::StateFile(file.clone()),
            (None, None) => anyhow::bail!("give --tunnel-socket or --tunnel-state-file"),
        };
        let source = match &args.manifests {
            Some(folder) => {
                let mut folder = ManifestFolder::new(folder);
                if let Err(e) = folder.watch() {
                    tracing::warn!("{e}");
                }
                ClusterSource::Folder(folder)
            }
            None => {
                let client = kube::Client::try_default()
                    .await
                    .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
                ClusterSource::Kubernetes(KubeSource::start(client))
            }
        };
        let from = args
            .manifests
            .as_ref()
            .map_or("the Kubernetes API".to_owned(), |f| f.display().to_string());
        let status = std::sync::Arc::new(std::sync::Mutex::new(AgentStatus::default()));
        let readiness = mesh_node::readiness::serve(args.readiness_addr, status.clone())
            .await
            .with_context(|| format!("cannot serve readiness on {}", args.readiness_addr))?;
        info!(node = %args.node_name, source = %from, %readiness, "mesh-node running");
        let scope = AgentScope {
            node: args.node_name.clone(),
            root_namespace: args.mesh.root_namespace.clone(),
        };
        run_agent(
            source,
            &scope,
            output,
            args.poll,
            capture,
            status,
            shutdown_signal(),
        )
        .await;
        info!("SIGTERM: exiting; capture stays pinned");
        Ok(())
    })
}

fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.lease_duration >= Duration::from_secs(1),
        "--lease-duration {:?}: a Lease holds whole seconds, at least one",
        args.lease_duration
    );
    let identity = match args.identity {
        Some(identity) => identity,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("no --identity, and the host name cannot be read")?
            .trim()
            .to_owned(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
        let status = std::sync::Arc::new(std::sync::Mutex::new(ControllerStatus::default()));
        let readiness =
            mesh_node::readiness::serve_controller(args.readiness_addr, status.clone())
                .await
                .with_context(|| format!("cannot serve readiness on {}", args.readiness_addr))?;
        let settings = ControllerSettings {
            lease_namespace: args.lease_namespace,
            lease_name: args.lease_name,
            identity,
            lease_duration: args.lease_duration,
            root_namespace: args.mesh.root_namespace,
        };
        info!(identity = %settings.identity, lease = %format!("{}/{}", settings.lease_namespace, settings.lease_name), %readiness, "mesh-node controller running");
        run_controller_loop(client, settings, status, shutdown_signal()).await;
        info!("SIGTERM: exiting");
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
