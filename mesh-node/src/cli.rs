//! `mesh-node`'s command line: one typed parser shared by the binary and by the tests that
//! check the install manifests' arguments against it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use redirect_ebpf::{DEFAULT_TUNNEL_MARK, parse_mark};

#[derive(Parser)]
#[command(name = "mesh-node", version, about = "Weft's per-node agent")]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start-up
pub enum Command {
    /// Follow the cluster and enroll this node's pods until SIGTERM.
    Run(RunArgs),
    /// The cluster's controller (one Deployment, replicas elect a leader with a Lease): writes
    /// the status of MeshPolicies and MeshAuthentications and, with --ca-dir, runs the mesh
    /// CA, until SIGTERM.
    Controller(ControllerArgs),
    /// Makes the mesh CA's first root (`init`), and rotates it in three steps, each picked up
    /// by a running CA within a second: `stage` a new root (trusted at once, beside the current one), `promote` it once
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
    /// Checks that this node can run capture (kernel, cgroup v2, the BPF file system, BPF
    /// type information) and prints what it found. On a problem it exits 1 and writes the
    /// reason where Kubernetes shows it in the pod's status (--termination-log): the node
    /// DaemonSet runs it as an init container.
    Preflight(PreflightArgs),
    /// Removes this node's capture (every pinned program, link and map): what uninstalling
    /// Weft from a node means. Enrolled pods' connections are no longer captured.
    Uninstall {
        /// Where capture is pinned; default: weft on the BPF file system.
        #[arg(long, env = "WEFT_CAPTURE_PIN_DIR")]
        pin_dir: Option<PathBuf>,
    },
}

/// What `mesh-node preflight` looks at.
#[derive(clap::Args)]
pub struct PreflightArgs {
    /// Where the reason for a failure is written for Kubernetes to show in the pod's status
    /// (`terminationMessagePath`); skipped when it cannot be written.
    #[arg(long, default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
    /// The cgroup capture will attach to (`mesh-node run --cgroup`).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup: PathBuf,
    /// The BPF file system capture will pin under.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// The kernel's BPF type information.
    #[arg(long, default_value = "/sys/kernel/btf/vmlinux")]
    pub btf: PathBuf,
}

/// A step of a root rotation.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum RotationStep {
    /// Create the first root (`ca.pem`, `ca.key`) in an empty folder: for a cluster, to put
    /// in the Secret weft-ca.
    Init,
    Stage,
    Promote,
    Retire,
}

/// The mesh CA, run by the controller.
#[derive(clap::Args)]
pub struct CaArgs {
    /// Run the mesh CA with its key material in this folder (`ca.pem`, `ca.key` mode 0600;
    /// a new root is created there if neither exists).
    #[arg(long, env = "WEFT_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime of workload certificates (a request may ask for less).
    #[arg(long, env = "WEFT_CERT_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_lifetime: Duration,
    /// Where the CA serves CreateCertificate (gRPC over TLS).
    #[arg(long, env = "WEFT_CA_LISTEN", default_value = "0.0.0.0:15012")]
    pub ca_listen: std::net::SocketAddr,
    /// DNS names of the CA's serving certificate (what tunnels verify); repeatable.
    #[arg(long = "ca-server-name", default_value = "weft-ca.weft-system.svc")]
    pub ca_server_names: Vec<String>,
    /// Write the trust bundle (PEM roots) here for tunnels (--trust-bundle).
    #[arg(long, env = "WEFT_TRUST_BUNDLE_OUT")]
    pub trust_bundle_out: Option<PathBuf>,
    /// On Kubernetes: publish the trust bundle (key roots.pem) in this ConfigMap of the
    /// controller's namespace, which every node's tunnel mounts. The install creates it.
    #[arg(long, env = "WEFT_TRUST_BUNDLE_CONFIGMAP")]
    pub trust_bundle_configmap: Option<String>,
    /// Authenticate nodes by the tokens in this folder (`<node>.token`; `mesh-node
    /// node-token` makes them) instead of by TokenReview.
    #[arg(long, env = "WEFT_NODE_TOKENS")]
    pub node_tokens: Option<PathBuf>,
    /// On Kubernetes, the service accounts of node agents, whose tokens (audience weft-ca)
    /// the CA accepts; repeatable.
    #[arg(
        long = "node-agent-account",
        default_value = "system:serviceaccount:weft-system:weft-node"
    )]
    pub node_agent_accounts: Vec<String>,
    /// Where the flow relay answers users (`GET /flows`, `GET /nodes`): a loopback address,
    /// reached with `kubectl port-forward` (the endpoint has no authentication of its own).
    /// The nodes' tunnels offer their flows on the CA's port.
    #[arg(long, env = "WEFT_FLOWS_LISTEN", default_value = "127.0.0.1:15010")]
    pub flows_listen: std::net::SocketAddr,
}

#[derive(clap::Args)]
pub struct ControllerArgs {
    /// Namespace of the Lease the replicas elect a leader with.
    #[arg(long, env = "WEFT_CONTROLLER_NAMESPACE", default_value = "weft-system")]
    pub lease_namespace: String,
    /// Name of that Lease.
    #[arg(long, default_value = "weft-controller")]
    pub lease_name: String,
    /// This replica's name among the candidates (unique; in a pod, its name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long a leader holds the Lease past each renewal (renewed every third of it).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// With --manifests: how often the folder is read again, besides on every inotify event.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub poll: Duration,
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(flatten)]
    pub ca: CaArgs,
    /// Follow this folder of Kubernetes YAML instead of the API (one machine, demos, tests):
    /// only the CA runs, authorizing against its pods (needs --ca-dir and --node-tokens).
    #[arg(long, env = "WEFT_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Where readiness is served (200 once the cluster was listed, leading or not).
    #[arg(
        long,
        env = "WEFT_CONTROLLER_READINESS_ADDR",
        default_value = "127.0.0.1:15023"
    )]
    pub readiness_addr: std::net::SocketAddr,
}

/// What the agent and the controller read the same way.
#[derive(clap::Args)]
pub struct MeshArgs {
    /// MeshPolicies and MeshAuthentications of this namespace apply to the whole mesh.
    #[arg(long, env = "WEFT_ROOT_NAMESPACE", default_value = "weft-system")]
    pub root_namespace: String,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// This node's name (the pods' spec.nodeName).
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node_name: String,
    #[command(flatten)]
    pub mesh: MeshArgs,
    /// Folder of Kubernetes YAML (Namespaces, Pods, Services) to follow (one machine, demos,
    /// tests).
    #[arg(
        long,
        env = "WEFT_MANIFESTS",
        conflicts_with = "kubernetes",
        required_unless_present = "kubernetes"
    )]
    pub manifests: Option<PathBuf>,
    /// Follow the Kubernetes API (in-cluster service account, or KUBECONFIG).
    #[arg(long)]
    pub kubernetes: bool,
    /// How often the folder is read again, besides at once on every inotify event (and
    /// problems retried).
    #[arg(long, env = "WEFT_MANIFEST_POLL", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub poll: Duration,
    /// Serve the tunnel protocol on this Unix socket (the tunnel connects with --agent-socket).
    #[arg(
        long,
        env = "WEFT_TUNNEL_SOCKET",
        conflicts_with = "tunnel_state_file",
        required_unless_present = "tunnel_state_file"
    )]
    pub tunnel_socket: Option<PathBuf>,
    /// The user the tunnel runs as: a process of any other user connecting to the tunnel
    /// socket is refused. Default: this agent's own user.
    #[arg(long, env = "WEFT_TUNNEL_UID")]
    pub tunnel_uid: Option<u32>,
    /// Or write the tables to this YAML file, which the tunnel polls (--state-file).
    #[arg(long, env = "WEFT_TUNNEL_STATE_FILE")]
    pub tunnel_state_file: Option<PathBuf>,
    /// Where capture is pinned; default: weft on the BPF file system.
    #[arg(long, env = "WEFT_CAPTURE_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// The cgroup capture attaches to; default: the root of the cgroup v2 hierarchy.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// The tunnel's cgroup (never captured); repeatable.
    #[arg(long = "exclude-cgroup")]
    pub exclude_cgroups: Vec<PathBuf>,
    /// The tunnel's socket mark (its --socket-mark): sockets carrying it are never captured;
    /// 0 for none (the cgroup exclusion alone). The tunnel is told it and refuses to follow
    /// an agent whose mark differs from its own.
    #[arg(long, env = "WEFT_TUNNEL_MARK", default_value_t = DEFAULT_TUNNEL_MARK, value_parser = parse_mark)]
    pub tunnel_mark: u32,
    /// Move bytes between applications and the tunnel with sockops + sk_msg.
    #[arg(long)]
    pub fast_path: bool,
    /// Where readiness is served (any `GET`: 200 ready, 503 not yet, reasons in the body).
    #[arg(
        long,
        env = "WEFT_AGENT_READINESS_ADDR",
        default_value = "127.0.0.1:15022"
    )]
    pub readiness_addr: std::net::SocketAddr,
    /// Do not touch capture (only compute and hand on the tables).
    #[arg(long)]
    pub no_capture: bool,
    /// With --kubernetes: the DaemonSet that runs this agent (in --pod-namespace). On SIGTERM,
    /// if it is gone, being deleted, or no longer readable by this agent, Weft is being
    /// uninstalled and capture is removed from the node; otherwise (a rolling update) capture
    /// stays pinned.
    #[arg(long, env = "WEFT_OWNER_DAEMONSET", requires = "kubernetes")]
    pub owner_daemonset: Option<String>,
    /// The namespace this agent's pod runs in.
    #[arg(long, env = "POD_NAMESPACE", default_value = "weft-system")]
    pub pod_namespace: String,
}
