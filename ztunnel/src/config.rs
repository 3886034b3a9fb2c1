//! The tunnel's command line: one typed struct, flags with environment fallbacks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Weft's per-node tunnel.
#[derive(Debug, Parser)]
#[command(name = "ztunnel", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the tunnel of one node.
    Run(Box<RunConfig>),
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings of a running tunnel.
#[derive(Debug, clap::Args, serde::Serialize)]
pub struct RunConfig {
    /// The node this tunnel serves: workloads whose `node` matches get listeners.
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node_name: String,
    /// YAML file of workloads and services, reloaded on change (tests, single machines).
    #[arg(
        long,
        env = "WEFT_STATE_FILE",
        conflicts_with = "agent_socket",
        required_unless_present = "agent_socket"
    )]
    pub state_file: Option<PathBuf>,
    /// The node agent's Unix socket: the tables and local pods come from `mesh-node`.
    #[arg(long, env = "WEFT_AGENT_SOCKET")]
    pub agent_socket: Option<PathBuf>,
    /// The user the node agent runs as: an agent socket served by any other user is refused.
    /// Default: this tunnel's own user.
    #[arg(long, env = "WEFT_AGENT_UID")]
    pub agent_uid: Option<u32>,
    /// How often the state file is checked for changes.
    #[arg(long, env = "WEFT_STATE_POLL", default_value = "500ms", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub state_poll: Duration,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The trust bundle: PEM roots of the mesh, as the CA publishes them (a file, or a
    /// ConfigMap's volume). Followed: a new bundle (a root rotation) is used at once.
    #[arg(long, env = "WEFT_TRUST_BUNDLE")]
    pub trust_bundle: PathBuf,
    /// The mesh CA (`host:port`): `mesh-node controller --ca-dir`, or any CA serving Istio's
    /// IstioCertificateService. Workload keys stay here; only CSRs go there.
    #[arg(long, env = "WEFT_CA_ADDRESS")]
    pub ca_address: String,
    /// The DNS name the CA's serving certificate must carry.
    #[arg(
        long,
        env = "WEFT_CA_SERVER_NAME",
        default_value = "weft-ca.weft-system.svc"
    )]
    pub ca_server_name: String,
    /// The node's credential for the CA: its per-node token, or on Kubernetes the agent pod's
    /// projected service account token (audience weft-ca). Read at each request.
    #[arg(long, env = "WEFT_CA_TOKEN_FILE")]
    pub ca_token_file: PathBuf,
    /// The controller's flow relay (`host:port`; every address the name resolves to, one per
    /// controller replica): this tunnel offers its flow events there, authenticated with the
    /// CA token, for `weft observe` through the controller. Unset: flows only on the admin
    /// endpoint.
    #[arg(long, env = "WEFT_FLOW_RELAY")]
    pub flow_relay: Option<String>,
    /// Lifetime of workload certificates asked of the CA (it may give less); they are renewed
    /// at half life.
    #[arg(long, env = "WEFT_CERT_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub cert_lifetime: Duration,
    /// Admin endpoint: /config_dump, /logging.
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus endpoint: /metrics.
    #[arg(long, env = "WEFT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness endpoint: /healthz/ready.
    #[arg(long, env = "WEFT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Log filter, in `RUST_LOG` syntax; changeable at run time on the admin endpoint.
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    pub log: String,
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// On SIGTERM, how long live connections may finish before the tunnel exits.
    #[arg(long, env = "WEFT_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Most streams on one pooled HBONE connection before another is opened.
    #[arg(long, env = "WEFT_POOL_MAX_STREAMS", default_value_t = 128)]
    pub pool_max_streams: usize,
    /// Pooled HBONE connections idle this long are closed.
    #[arg(long, env = "WEFT_POOL_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Timeout for connecting to another tunnel (TCP, then TLS and HTTP/2 handshakes, each),
    /// to an application, or to a passthrough destination.
    #[arg(long, env = "WEFT_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// An HBONE connection (15008) must finish its TLS and HTTP/2 handshakes within this, or
    /// it is closed.
    #[arg(long, env = "WEFT_HBONE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub hbone_handshake_timeout: Duration,
    /// An HBONE connection with no stream open for this long is closed (GOAWAY). Clients'
    /// pools close theirs first (--pool-idle-timeout).
    #[arg(long, env = "WEFT_HBONE_IDLE_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub hbone_idle_timeout: Duration,
    /// Every proxied connection probes an idle peer after this long (TCP keepalive, then every
    /// 10 s; 3 unanswered probes close it), so one whose peer vanished is not held for ever.
    #[arg(long, env = "WEFT_TCP_KEEPALIVE", default_value = "60s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// A SOCKS5 client (15080) must complete its request within this, or it is closed.
    #[arg(long, env = "WEFT_SOCKS5_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub socks5_handshake_timeout: Duration,
    /// Most HBONE connections the tunnel's listeners hold at once, all pods and peers together.
    #[arg(long, env = "WEFT_HBONE_MAX_CONNECTIONS", default_value_t = 8192)]
    pub hbone_max_connections: usize,
    /// Most HBONE connections one peer address may hold at once (a client tunnel opens one
    /// per 128 streams per pair of pods).
    #[arg(
        long,
        env = "WEFT_HBONE_MAX_CONNECTIONS_PER_PEER",
        default_value_t = 512
    )]
    pub hbone_max_connections_per_peer: usize,
    /// Most CONNECT streams one peer address may hold at once over all its HBONE connections;
    /// past it a stream is refused (503, flag `UO`).
    #[arg(
        long,
        env = "WEFT_HBONE_MAX_STREAMS_PER_PEER",
        default_value_t = 10_000
    )]
    pub hbone_max_streams_per_peer: usize,
    /// MiB of HTTP/2 receive window one peer address is given over all its HBONE connections:
    /// the most it can make the tunnel buffer on the way in (each connection takes up to
    /// 16 MiB of it; once it is spent, a connection gets HTTP/2's minimum of 64 KiB).
    #[arg(
        long,
        env = "WEFT_HBONE_RECEIVE_BUDGET_PER_PEER_MIB",
        default_value_t = 64
    )]
    pub hbone_receive_budget_per_peer_mib: u64,
    /// MiB one peer address's streams may have read from applications and not yet written to
    /// it, over all its HBONE connections: what a peer that stops reading can make the tunnel
    /// hold on the way out (past it, streams stop reading from their applications).
    #[arg(
        long,
        env = "WEFT_HBONE_SEND_BUDGET_PER_PEER_MIB",
        default_value_t = 64
    )]
    pub hbone_send_budget_per_peer_mib: u64,
    /// Connections between two pods of this node skip HBONE: the tunnel hands them from one
    /// pod's namespace to the other's in process (both identities are its own; nothing crosses
    /// a network). `false` sends them through TLS and 15008 like any other.
    #[arg(long, env = "WEFT_SAME_NODE_SHORTCUT", default_value_t = true, action = clap::ArgAction::Set)]
    pub same_node_shortcut: bool,
    /// SO_MARK put on every socket the tunnel makes, so capture leaves them alone (decimal
    /// or 0x hex). Must be the node agent's --tunnel-mark: the tunnel refuses to follow an
    /// agent whose capture expects another.
    #[arg(long, env = "WEFT_SOCKET_MARK", default_value_t = redirect_ebpf::DEFAULT_TUNNEL_MARK, value_parser = redirect_ebpf::parse_mark)]
    pub socket_mark: u32,
    /// Without a node agent only (a state file): the pin directory of the node's eBPF capture
    /// (e.g. /sys/fs/bpf/weft), where the tunnel registers each local pod's plaintext inbound
    /// listener itself (re-registered within 250 ms if capture is reinstalled); this needs
    /// write access to the BPF file system. With `--agent-socket` the listeners are handed to
    /// the agent, which owns capture, and the tunnel needs no BPF access.
    #[arg(long, env = "WEFT_CAPTURE_PIN_DIR", conflicts_with = "agent_socket")]
    pub capture_pin_dir: Option<PathBuf>,
    /// The crypto implementation of TLS: `auto` picks the faster on this CPU (logged at
    /// start-up).
    #[arg(long, env = "WEFT_CRYPTO", value_enum, default_value = "auto")]
    pub crypto: crate::tls::crypto::CryptoChoice,
    /// Threads that serve connections. One serves this project's benchmarks (6-9 Gbit/s
    /// through two tunnels on two cores) and is what busy polling needs; more spread a busy
    /// node's connections over more cores, without busy polling.
    #[arg(long, env = "WEFT_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// After traffic, keep polling sockets for up to this long before sleeping, so that a
    /// response finds the tunnel awake (adaptive; an idle tunnel does not poll). `0s` turns
    /// it off. Only with one worker thread.
    #[arg(long, env = "WEFT_BUSY_POLL", default_value = "200us", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub busy_poll: Duration,
}

impl RunConfig {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.pool_max_streams == 0 {
            return Err("--pool-max-streams must be at least 1".into());
        }
        if self.hbone_max_connections == 0
            || self.hbone_max_connections_per_peer == 0
            || self.hbone_max_streams_per_peer == 0
        {
            return Err(
                "--hbone-max-connections, --hbone-max-connections-per-peer and --hbone-max-streams-per-peer must be at least 1"
                    .into(),
            );
        }
        if self.hbone_receive_budget_per_peer_mib == 0 || self.hbone_send_budget_per_peer_mib == 0 {
            return Err(
                "--hbone-receive-budget-per-peer-mib and --hbone-send-budget-per-peer-mib must be at least 1"
                    .into(),
            );
        }
        if self.worker_threads == 0 {
            return Err("--worker-threads must be at least 1".into());
        }
        if self.busy_poll > Duration::from_millis(10) {
            return Err(format!(
                "--busy-poll {:?} is too long: it is the most a worker spins after traffic (at most 10ms; 200us by default)",
                self.busy_poll
            ));
        }
        if self.cert_lifetime < Duration::from_secs(2) {
            return Err("--cert-lifetime must be at least 2s".into());
        }
        if self.trust_domain.is_empty() || self.trust_domain.contains('/') {
            return Err(format!(
                "--trust-domain {:?} is not a trust domain name",
                self.trust_domain
            ));
        }
        Ok(())
    }
}
