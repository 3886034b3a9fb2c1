//! `mesh-node run`: the per-node agent; `mesh-node controller`: the cluster's controller.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_node::agent::{AgentScope, AgentStatus, ClusterSource, TunnelOutput, run_agent};
use mesh_node::ca::authenticate::{Authenticator, NodeTokens, TokenReviewer};
use mesh_node::ca::run::{CaSettings, start_ca};
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
    /// the status of MeshPolicies and MeshAuthentications and, with --ca-dir, runs the mesh
    /// CA, until SIGTERM.
    Controller(ControllerArgs),
    /// Rotates the mesh CA's root in three steps, each picked up by a running CA within a
    /// second: `stage` a new root (trusted at once, beside the current one), `promote` it once
    /// every tunnel has the new bundle (it signs; the old stays trusted), `retire` the old
    /// roots once the certificates they signed have expired (a certificate lifetime later).
    CaRoot {
        #[arg(value_enum)]
        step: RotationStep,
        #[arg(long, env = "WEFT_CA_DIR")]
        ca_dir: PathBuf,
        #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Writes a new per-node token for the local mesh CA (`<dir>/<node>.token`, mode 0600)
    /// unless the node has one; prints its path. The CA (--node-tokens) and the node's tunnel
    /// (--ca-token-file) read the same file.
    NodeToken {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: String,
    },
}

/// A step of a root rotation.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RotationStep {
    Stage,
    Promote,
    Retire,
}

/// The mesh CA, run by the controller.
#[derive(clap::Args)]
struct CaArgs {
    /// Run the mesh CA with its key material in this folder (`ca.pem`, `ca.key` mode 0600;
    /// a new root is created there if neither exists).
    #[arg(long, env = "WEFT_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of workload certificates (a request may ask for less).
    #[arg(long, env = "WEFT_CERT_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    cert_lifetime: Duration,
    /// Where the CA serves CreateCertificate (gRPC over TLS).
    #[arg(long, env = "WEFT_CA_LISTEN", default_value = "0.0.0.0:15012")]
    ca_listen: std::net::SocketAddr,
    /// DNS names of the CA's serving certificate (what tunnels verify); repeatable.
    #[arg(long = "ca-server-name", default_value = "weft-ca.weft-system.svc")]
    ca_server_names: Vec<String>,
    /// Write the trust bundle (PEM roots) here for tunnels (--trust-bundle).
    #[arg(long, env = "WEFT_TRUST_BUNDLE_OUT")]
    trust_bundle_out: Option<PathBuf>,
    /// Authenticate nodes by the tokens in this folder (`<node>.token`; `mesh-node
    /// node-token` makes them) instead of by TokenReview.
    #[arg(long, env = "WEFT_NODE_TOKENS")]
    node_tokens: Option<PathBuf>,
    /// On Kubernetes, the service accounts of node agents, whose tokens (audience weft-ca)
    /// the CA accepts; repeatable.
    #[arg(
        long = "node-agent-account",
        default_value = "system:serviceaccount:weft-system:weft-node"
    )]
    node_agent_accounts: Vec<String>,
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
    /// With --manifests: how often the folder is read again, besides on every inotify event.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    poll: Duration,
    #[command(flatten)]
    mesh: MeshArgs,
    #[command(flatten)]
    ca: CaArgs,
    /// Follow this folder of Kubernetes YAML instead of the API (one machine, demos, tests):
    /// only the CA runs, authorizing against its pods (needs --ca-dir and --node-tokens).
    #[arg(long, env = "WEFT_MANIFESTS")]
    manifests: Option<PathBuf>,
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
        Command::CaRoot {
            step,
            ca_dir,
            trust_domain,
        } => match step {
            RotationStep::Stage => mesh_node::ca::stage_root(&ca_dir, &trust_domain).map(|()| {
                println!(
                    "a new root is staged in {}/next: trusted, not signing yet",
                    ca_dir.display()
                )
            }),
            RotationStep::Promote => mesh_node::ca::promote(&ca_dir).map(|()| {
                println!(
                    "the new root signs; the old one stays trusted in {}/retired.pem",
                    ca_dir.display()
                )
            }),
            RotationStep::Retire => mesh_node::ca::retire(&ca_dir).map(|removed| {
                println!(
                    "{}",
                    if removed {
                        "the retired roots are no longer trusted"
                    } else {
                        "no retired roots"
                    }
                )
            }),
        }
        .map_err(anyhow::Error::from),
        Command::NodeToken { dir, node } => {
            mesh_node::ca::authenticate::create_node_token(&dir, &node)
                .map(|path| println!("{}", path.display()))
                .with_context(|| format!("cannot write a token for {node} in {}", dir.display()))
        }
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
    if args.manifests.is_some() {
        anyhow::ensure!(
            args.ca.ca_dir.is_some() && args.ca.node_tokens.is_some(),
            "--manifests runs the mesh CA alone: give --ca-dir and --node-tokens"
        );
    }
    let identity = match args.identity.clone() {
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
        let (objects_tx, objects_rx) = tokio::sync::watch::channel(std::sync::Arc::new(
            mesh_node::cluster::ClusterObjects::default(),
        ));
        let client = match &args.manifests {
            Some(_) => None,
            None => Some(kube::Client::try_default().await.context(
                "cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)",
            )?),
        };
        let ca = match &args.ca.ca_dir {
            Some(dir) => {
                let authenticator = match (&args.ca.node_tokens, &client) {
                    (Some(folder), _) => Authenticator::Tokens(NodeTokens::load(folder)?),
                    (None, Some(client)) => Authenticator::Kubernetes(TokenReviewer::new(
                        client.clone(),
                        args.ca.node_agent_accounts.clone(),
                    )),
                    (None, None) => anyhow::bail!("give --node-tokens"),
                };
                let settings = CaSettings {
                    dir: dir.clone(),
                    trust_domain: args.ca.trust_domain.clone(),
                    lifetime: args.ca.cert_lifetime,
                    listen: args.ca.ca_listen,
                    server_names: args.ca.ca_server_names.clone(),
                    bundle_file: args.ca.trust_bundle_out.clone(),
                };
                Some(start_ca(settings, authenticator, objects_rx).await?)
            }
            None => None,
        };
        let status = std::sync::Arc::new(std::sync::Mutex::new(ControllerStatus::default()));
        let readiness =
            mesh_node::readiness::serve_controller(args.readiness_addr, status.clone())
                .await
                .with_context(|| format!("cannot serve readiness on {}", args.readiness_addr))?;
        // Tells the CA to stop serving once the controller's own loop has ended.
        let stop = std::sync::Arc::new(tokio::sync::Notify::new());
        let ca_task = ca.map(|ca| {
            let stop = stop.clone();
            tokio::spawn(async move { ca.run(async move { stop.notified().await }).await })
        });
        match (client, &args.manifests) {
            (Some(client), _) => {
                let settings = ControllerSettings {
                    lease_namespace: args.lease_namespace,
                    lease_name: args.lease_name,
                    identity,
                    lease_duration: args.lease_duration,
                    root_namespace: args.mesh.root_namespace,
                };
                info!(identity = %settings.identity, lease = %format!("{}/{}", settings.lease_namespace, settings.lease_name), %readiness, "mesh-node controller running");
                run_controller_loop(
                    client,
                    settings,
                    status,
                    Some(objects_tx),
                    shutdown_signal(),
                )
                .await;
            }
            (None, Some(folder)) => {
                info!(folder = %folder.display(), %readiness, "mesh-node controller running the mesh CA from a manifest folder");
                follow_folder(folder, args.poll, objects_tx, status, shutdown_signal()).await;
            }
            (None, None) => unreachable!("a client is made whenever there is no folder"),
        }
        stop.notify_waiters();
        if let Some(task) = ca_task {
            match task.await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(error)) => tracing::warn!(%error, "the mesh CA stopped with an error"),
            }
        }
        info!("SIGTERM: exiting");
        Ok(())
    })
}

/// Reads `folder` again on every change (and every `poll`), handing its objects on, until
/// `stop`. A bad file keeps its last good objects, as the agent does.
async fn follow_folder(
    folder: &std::path::Path,
    poll: Duration,
    objects: tokio::sync::watch::Sender<std::sync::Arc<mesh_node::cluster::ClusterObjects>>,
    status: std::sync::Arc<std::sync::Mutex<ControllerStatus>>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut manifests = ManifestFolder::new(folder);
    if let Err(e) = manifests.watch() {
        tracing::warn!("{e}");
    }
    tokio::pin!(stop);
    let mut first = true;
    loop {
        let (changed, errors) = manifests.reload();
        for error in &errors {
            tracing::warn!("{error}; its last good objects stay");
        }
        if changed || first {
            first = false;
            objects.send_replace(std::sync::Arc::new(manifests.objects()));
        }
        if let Ok(mut s) = status.lock() {
            s.synced = true;
            s.leading = true;
            s.problem = errors.first().map(ToString::to_string);
        }
        tokio::select! {
            () = manifests.changed() => {}
            () = tokio::time::sleep(poll) => {}
            () = &mut stop => break,
        }
    }
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
