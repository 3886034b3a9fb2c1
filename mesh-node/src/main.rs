//! `mesh-node run`: the per-node agent; `mesh-node controller`: the cluster's controller.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mesh_node::agent::{AgentScope, AgentStatus, ClusterSource, TunnelOutput, run_agent};
use mesh_node::ca::authenticate::{Authenticator, NodeTokens, TokenReviewer};
use mesh_node::ca::run::{CaSettings, start_ca};
use mesh_node::capture::CaptureReconciler;
use mesh_node::cli::{Args, Command, ControllerArgs, PreflightArgs, RotationStep, RunArgs};
use mesh_node::controller::{
    ControllerSettings, ControllerStatus, run_controller as run_controller_loop,
};
use mesh_node::kube_source::KubeSource;
use mesh_node::manifests::ManifestFolder;
use mesh_node::tunnel_link::TunnelLink;
use redirect_ebpf::{Options, Redirect, cgroup2_mount};
use tracing::info;

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
        } => ca_root(step, &ca_dir, &trust_domain),
        Command::Preflight(args) => return preflight(&args),
        Command::Uninstall { pin_dir } => uninstall(pin_dir),
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

/// `mesh-node ca-root <step>`.
fn ca_root(step: RotationStep, ca_dir: &std::path::Path, trust_domain: &str) -> anyhow::Result<()> {
    let dir = ca_dir.display();
    match step {
        RotationStep::Init => {
            private_folder(ca_dir)?;
            let lifetime = Duration::from_secs(24 * 3600);
            let (_, created) =
                mesh_node::ca::MeshCa::load_or_create(ca_dir, trust_domain, lifetime)?;
            match created {
                mesh_node::ca::Created::NewRoot => println!(
                    "a new mesh root is in {dir}: ca.pem (the certificate) and ca.key (its key, mode 0600)"
                ),
                mesh_node::ca::Created::Loaded => println!("{dir} holds a root already; unchanged"),
            }
        }
        RotationStep::Stage => {
            mesh_node::ca::stage_root(ca_dir, trust_domain)?;
            println!("a new root is staged in {dir}/next: trusted, not signing yet");
        }
        RotationStep::Promote => {
            mesh_node::ca::promote(ca_dir)?;
            println!("the new root signs; the old one stays trusted in {dir}/retired.pem");
        }
        RotationStep::Retire => {
            if mesh_node::ca::retire(ca_dir)? {
                println!("the retired roots are no longer trusted");
            } else {
                println!("no retired roots");
            }
        }
    }
    Ok(())
}

/// Creates `dir` (mode 0700) unless it exists.
fn private_folder(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Prints every finding; on a blocking one, also writes them where Kubernetes shows them in
/// the pod's status, and fails.
fn preflight(args: &PreflightArgs) -> std::process::ExitCode {
    let facts = mesh_node::preflight::NodeFacts::read(&args.cgroup, &args.bpffs, &args.btf);
    let findings = mesh_node::preflight::check(&facts);
    let report: String = findings.iter().map(|f| format!("{f}\n")).collect();
    print!("{report}");
    if !findings.iter().any(|f| f.blocking) {
        return std::process::ExitCode::SUCCESS;
    }
    let problems: String = findings
        .iter()
        .filter(|f| f.blocking)
        .map(|f| format!("{}\n", f.text))
        .collect();
    let message = format!("this node cannot run Weft's capture:\n{problems}");
    if let Err(e) = std::fs::write(&args.termination_log, &message) {
        eprintln!(
            "mesh-node: cannot write {}: {e}",
            args.termination_log.display()
        );
    }
    eprint!("mesh-node: {message}");
    std::process::ExitCode::FAILURE
}

fn uninstall(pin_dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let (dir, removed) = redirect_ebpf::uninstall_from(pin_dir)?;
    if removed {
        println!("capture removed from this node ({})", dir.display());
    } else {
        println!("no capture pinned at {}", dir.display());
    }
    Ok(())
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
    let pin_dir = capture.as_ref().map(|c| c.pin_dir().to_owned());
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
        let mut client = None;
        let source = match &args.manifests {
            Some(folder) => {
                let mut folder = ManifestFolder::new(folder);
                if let Err(e) = folder.watch() {
                    tracing::warn!("{e}");
                }
                ClusterSource::Folder(folder)
            }
            None => {
                let kube = kube::Client::try_default()
                    .await
                    .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
                client = Some(kube.clone());
                ClusterSource::Kubernetes(KubeSource::start(kube))
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
        match (&client, &args.owner_daemonset, &pin_dir) {
            (Some(client), Some(daemon_set), Some(pins)) => {
                leave(client, &args.pod_namespace, daemon_set, pins).await
            }
            _ => info!("SIGTERM: exiting; capture stays pinned"),
        }
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
                let ca = start_ca(settings, authenticator, objects_rx).await?;
                match (&args.ca.trust_bundle_configmap, &client) {
                    (Some(name), Some(client)) => {
                        Some(ca.publish_to(mesh_node::ca::publish::BundleConfigMap {
                            client: client.clone(),
                            namespace: args.lease_namespace.clone(),
                            name: name.clone(),
                        }))
                    }
                    (Some(_), None) => anyhow::bail!(
                        "--trust-bundle-configmap publishes through the Kubernetes API: not with --manifests (use --trust-bundle-out)"
                    ),
                    (None, _) => Some(ca),
                }
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
        if let Some(ca) = &ca {
            let flows =
                mesh_node::relay::http::serve(args.ca.flows_listen, ca.relay.clone()).await?;
            info!(endpoint = %flows, "flow relay answering on GET /flows and /nodes");
        }
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

/// On SIGTERM on Kubernetes: removes capture when Weft is being uninstalled, keeps it for an
/// update.
async fn leave(client: &kube::Client, namespace: &str, daemon_set: &str, pins: &std::path::Path) {
    use mesh_node::owner::{Shutdown, at_shutdown};
    match at_shutdown(client, namespace, daemon_set).await {
        Shutdown::Update => info!(
            daemon_set = %format!("{namespace}/{daemon_set}"),
            "SIGTERM: exiting; the DaemonSet stays, so capture stays pinned for the next agent"
        ),
        Shutdown::Uninstall(reason) => match redirect_ebpf::uninstall(pins) {
            Ok(_) => {
                info!(%reason, pins = %pins.display(), "SIGTERM: Weft is being uninstalled: capture removed from this node")
            }
            Err(error) => {
                tracing::error!(%reason, %error, "SIGTERM: Weft is being uninstalled, and removing capture failed: run `mesh-node uninstall` on this node")
            }
        },
        Shutdown::Unknown(reason) => tracing::warn!(
            %reason,
            "SIGTERM: cannot tell an update from an uninstall; capture stays pinned (fail closed). If Weft is being uninstalled, run `mesh-node uninstall` on this node"
        ),
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
