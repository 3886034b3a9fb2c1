//! A simulated cluster: a router namespace joining node namespaces, each node with pod
//! namespaces behind veth pairs (routed like a Calico node), and one real `ztunnel` per node.
//!
//! Addresses: node i reaches the router over 10.255.i.0/24 and fd00:255:i::/64; its pods are
//! 10.10.i.j/32 and fd00:10:i::j/128 (dual stack), with default routes to 169.254.1.1 (answered
//! by proxy ARP on the node side of their veth) and to fe80::1 (the node side's link-local).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::capture::{Capture, CaptureSpec};
use crate::netns::Netns;
use crate::process::Process;

/// A pod to create.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// 1-based node index.
    pub node: usize,
    /// Enrolled (HBONE) or not (plain TCP).
    pub mesh: bool,
}

impl PodSpec {
    /// An enrolled pod in namespace `default` whose service account is its name.
    pub fn new(name: &str, node: usize) -> Self {
        PodSpec {
            name: name.to_owned(),
            namespace: "default".into(),
            service_account: name.to_owned(),
            node,
            mesh: true,
        }
    }

    /// The same pod, outside the mesh.
    pub fn outside_mesh(mut self) -> Self {
        self.mesh = false;
        self
    }
}

/// A service VIP in front of pods.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<String>,
}

/// What to build.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub pods: Vec<PodSpec>,
    pub services: Vec<ServiceSpec>,
    pub trust_domain: String,
    /// Extra flags for every `ztunnel run`.
    pub tunnel_args: Vec<String>,
    /// `mesh-node` runs each node, as on a real cluster: its own capture pinned under the
    /// node's directory, and the node's tunnel fed over the agent socket (start the agents
    /// before the tunnels). Otherwise tunnels read state files and one capture serves all.
    pub agents: bool,
    /// How often the agents read the manifest folder.
    pub agent_poll_ms: u64,
    /// Extra flags for the mesh CA (`mesh-node controller`).
    pub ca_args: Vec<String>,
}

impl ClusterSpec {
    /// `nodes` nodes with the given pods, trust domain `cluster.local`.
    pub fn new(nodes: usize, pods: Vec<PodSpec>) -> Self {
        ClusterSpec {
            nodes,
            pods,
            services: Vec::new(),
            trust_domain: "cluster.local".into(),
            tunnel_args: Vec::new(),
            agents: false,
            agent_poll_ms: 50,
            ca_args: Vec::new(),
        }
    }
}

/// A pod: its namespace and address.
#[derive(Debug)]
pub struct Pod {
    pub spec: PodSpec,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub netns: Netns,
}

impl Pod {
    /// A command that runs inside the pod.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, program: S) -> Command {
        self.netns.command(program)
    }

    /// The pod's SPIFFE ID in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.spec.namespace, self.spec.service_account
        )
    }
}

/// A node: its namespace, state file and tunnel.
#[derive(Debug)]
pub struct Node {
    pub tunnel: Option<Process>,
    pub name: String,
    pub index: usize,
    pub state_file: PathBuf,
    pub netns: Netns,
}

impl Node {
    /// GET `http://127.0.0.1:<port><path>` from inside the node: (status, body).
    pub fn http_get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        let url = format!("http://127.0.0.1:{port}{path}");
        let output = self
            .netns
            .command("curl")
            .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", &url])
            .output()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
        Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
    }

    /// The tunnel's metrics, parsed.
    pub fn metrics(&self) -> Result<Vec<crate::metrics::Sample>> {
        let (status, body) = self.http_get(15020, "/metrics")?;
        if status != 200 {
            bail!("{} metrics answered {status}: {body}", self.name);
        }
        Ok(crate::metrics::parse(&body))
    }

    /// Connections the tunnel accepted over mutual TLS from `source_principal`.
    pub fn meshed_from(&self, source_principal: &str) -> Result<f64> {
        let labels = [
            ("reporter", "destination"),
            ("source_principal", source_principal),
            ("connection_security_policy", "mutual_tls"),
        ];
        Ok(crate::metrics::sum(
            &self.metrics()?,
            "weft_tcp_connections_opened_total",
            &labels,
        ))
    }

    /// Everything the tunnel logged.
    pub fn log(&self) -> String {
        self.tunnel
            .as_ref()
            .map(Process::output)
            .unwrap_or_default()
    }

    /// The tunnel's log once it holds `needle` (lines reach the file a moment after they are
    /// logged: the tunnel writes them in batches); panics with the log after five seconds.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never logged {needle:?}:\n{log}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The tunnel's JSON access-log events.
    pub fn access_logs(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect()
    }
}

/// What a curl run printed.
#[derive(Debug)]
pub struct Curl {
    pub stdout: String,
    pub stderr: String,
    pub success: bool,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A built cluster; dropping it stops every process and removes every namespace.
pub struct Cluster {
    /// Processes started in pods; stopped first.
    pub apps: Vec<Process>,
    /// Capture loaders owned by the cluster; uninstalled when it is dropped.
    pub captures: Vec<Capture>,
    /// `mesh-node` agents, one per node when started.
    pub agents: Vec<Process>,
    /// The mesh CA (`mesh-node controller`), started with the cluster.
    pub ca: Option<Process>,
    /// How many times the CA was started (each start logs to its own file).
    pub ca_starts: usize,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub router: Netns,
    pub spec: ClusterSpec,
    /// Holds the CA, state files and logs.
    pub dir: tempfile::TempDir,
    pub prefix: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.captures.clear();
        self.agents.clear();
        self.stop_ca();
        crate::capture::uninstall(&self.pin_dir());
        for i in 1..=self.nodes.len() {
            crate::capture::uninstall(&self.node_pin_dir(i));
        }
        for i in 1..=self.nodes.len() {
            if let Some(mut tunnel) = self.nodes[i - 1].tunnel.take() {
                tunnel.stop(Duration::from_secs(5));
            }
            let _ = std::fs::remove_dir(self.tunnel_cgroup(i));
        }
        if std::env::var_os("WEFT_KEEP_LOGS").is_some() {
            let kept =
                std::mem::replace(&mut self.dir, tempfile::TempDir::new().expect("temp dir"))
                    .keep();
            eprintln!("cluster {}: logs kept in {}", self.prefix, kept.display());
        }
    }
}

impl Cluster {
    /// Builds namespaces, links, routes and starts the mesh CA; tunnels are not started yet.
    pub fn build(spec: ClusterSpec) -> Result<Self> {
        crate::require_root();
        let prefix = format!(
            "wf{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()?;
        let router = Netns::create(&format!("{prefix}-router"))?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        router.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let mut nodes = Vec::new();
        for i in 1..=spec.nodes {
            let netns = Netns::create(&format!("{prefix}-node{i}"))?;
            netns.sysctl("net.ipv4.ip_forward", "1")?;
            netns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            netns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            let uplink = format!("n{i}");
            router.ip(&[
                "link",
                "add",
                &uplink,
                "type",
                "veth",
                "peer",
                "name",
                "uplink",
                "netns",
                &netns.name,
            ])?;
            router.ip(&["addr", "add", &format!("10.255.{i}.1/24"), "dev", &uplink])?;
            router.ip(&["link", "set", &uplink, "up"])?;
            router.ip(&[
                "route",
                "add",
                &format!("10.10.{i}.0/24"),
                "via",
                &format!("10.255.{i}.2"),
            ])?;
            netns.ip(&["addr", "add", &format!("10.255.{i}.2/24"), "dev", "uplink"])?;
            netns.ip(&["link", "set", "uplink", "up"])?;
            netns.ip(&["route", "add", "default", "via", &format!("10.255.{i}.1")])?;
            router.ip(&[
                "-6",
                "addr",
                "add",
                &format!("fd00:255:{i}::1/64"),
                "dev",
                &uplink,
                "nodad",
            ])?;
            router.ip(&[
                "-6",
                "route",
                "add",
                &format!("fd00:10:{i}::/64"),
                "via",
                &format!("fd00:255:{i}::2"),
            ])?;
            netns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("fd00:255:{i}::2/64"),
                "dev",
                "uplink",
                "nodad",
            ])?;
            netns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:255:{i}::1"),
            ])?;
            nodes.push(Node {
                tunnel: None,
                name: format!("node{i}"),
                index: i,
                state_file: dir.path().join(format!("state-node{i}.yaml")),
                netns,
            });
        }
        let mut pods = Vec::new();
        let mut per_node = vec![0u8; spec.nodes + 1];
        for pod_spec in &spec.pods {
            let node = nodes.get(pod_spec.node.wrapping_sub(1)).with_context(|| {
                format!(
                    "pod {} is on node {}, which does not exist",
                    pod_spec.name, pod_spec.node
                )
            })?;
            per_node[pod_spec.node] += 1;
            let j = per_node[pod_spec.node];
            let ip = Ipv4Addr::new(10, 10, pod_spec.node as u8, j);
            let ip6 = Ipv6Addr::new(0xfd00, 0x10, pod_spec.node as u16, 0, 0, 0, 0, j as u16);
            let netns = Netns::create(&format!("{prefix}-{}", pod_spec.name))?;
            let host_side = format!("p{j}");
            node.netns.ip(&[
                "link",
                "add",
                &host_side,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns.name,
            ])?;
            node.netns.ip(&["link", "set", &host_side, "up"])?;
            node.netns
                .sysctl(&format!("net.ipv4.conf.{host_side}.proxy_arp"), "1")?;
            node.netns
                .ip(&["route", "add", &format!("{ip}/32"), "dev", &host_side])?;
            netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            netns.ip(&["link", "set", "eth0", "up"])?;
            netns.ip(&[
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            netns.ip(&[
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ])?;
            node.netns.ip(&[
                "-6",
                "addr",
                "add",
                "fe80::1/64",
                "dev",
                &host_side,
                "nodad",
            ])?;
            node.netns.ip(&[
                "-6",
                "route",
                "add",
                &format!("{ip6}/128"),
                "dev",
                &host_side,
            ])?;
            netns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip6}/128"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            netns.ip(&[
                "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ])?;
            pods.push(Pod {
                spec: pod_spec.clone(),
                ip,
                ip6,
                netns,
            });
        }
        let mut cluster = Cluster {
            apps: Vec::new(),
            captures: Vec::new(),
            agents: Vec::new(),
            ca: None,
            ca_starts: 0,
            nodes,
            pods,
            router,
            spec,
            dir,
            prefix,
        };
        let state = cluster.state_yaml(|_| {});
        for node in &cluster.nodes {
            std::fs::write(&node.state_file, &state)?;
        }
        cluster.prepare_ca()?;
        cluster.start_ca()?;
        Ok(cluster)
    }

    /// Builds `spec`, starts an HTTP server on 8080 (`weft-testapp http --name <pod>`) in each
    /// of `http_pods`, and starts the tunnels.
    pub fn with_http(spec: ClusterSpec, http_pods: &[&str]) -> Result<Self> {
        let mut cluster = Cluster::build(spec)?;
        for pod in http_pods {
            cluster.start_app(pod, &["http", "--port", "8080", "--name", pod], 8080)?;
        }
        cluster.start_tunnels()?;
        Ok(cluster)
    }

    /// The common case: pod `client` on node 1, pod `server` on node 2 serving HTTP on 8080,
    /// tunnels started. `tunnel_args` go to every tunnel.
    pub fn client_server(tunnel_args: &[&str]) -> Result<Self> {
        let spec = ClusterSpec {
            tunnel_args: tunnel_args.iter().map(|a| (*a).to_owned()).collect(),
            ..ClusterSpec::new(
                2,
                vec![PodSpec::new("client", 1), PodSpec::new("server", 2)],
            )
        };
        Cluster::with_http(spec, &["server"])
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.find_pod(name)
            .unwrap_or_else(|| panic!("no pod {name} in this cluster"))
    }

    /// Pod `name`, if the cluster has one.
    pub fn find_pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.spec.name == name)
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    /// The state file text for the current pods; `edit` may change each pod's entry first.
    pub fn state_yaml(&self, edit: impl Fn(&mut PodSpec)) -> String {
        let mut out = String::from("workloads:\n");
        for pod in &self.pods {
            let mut spec = pod.spec.clone();
            edit(&mut spec);
            let _ = write!(
                out,
                "  - name: {}\n    namespace: {}\n    serviceAccount: {}\n    ips: [{}, \"{}\"]\n    node: node{}\n    netns: {}\n    protocol: {}\n",
                spec.name,
                spec.namespace,
                spec.service_account,
                pod.ip,
                pod.ip6,
                spec.node,
                pod.netns.path().display(),
                if spec.mesh { "HBONE" } else { "TCP" }
            );
        }
        out.push_str("services:\n");
        for s in &self.spec.services {
            let endpoints: Vec<String> =
                s.endpoints.iter().map(|e| format!("default/{e}")).collect();
            let _ = write!(
                out,
                "  - name: {}\n    namespace: default\n    addresses: [{}]\n    ports: [{{port: {}, targetPort: {}}}]\n    endpoints: [{}]\n",
                s.name,
                s.vip,
                s.port,
                s.target_port,
                endpoints.join(", ")
            );
        }
        if self.spec.services.is_empty() {
            out.push_str("  []\n");
        }
        out
    }

    /// Starts every node's tunnel and waits until each is ready.
    pub fn start_tunnels(&mut self) -> Result<()> {
        for i in 1..=self.nodes.len() {
            self.start_tunnel(i)?;
        }
        Ok(())
    }

    /// Starts node `i`'s tunnel (JSON logs) and waits for `/healthz/ready`.
    pub fn start_tunnel(&mut self, i: usize) -> Result<()> {
        let ztunnel = crate::binary("ztunnel");
        let log = self.dir.path().join(format!("ztunnel-node{i}.log"));
        let cgroup = self.tunnel_cgroup(i);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("create the tunnel's cgroup {}", cgroup.display()))?;
        let node = &self.nodes[i - 1];
        // The tunnel joins its own cgroup before it starts, as a node agent's pod would be, and
        // keeps the host's mounts (`ip netns exec` remounts /sys, hiding capture's pins).
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
            .arg(&cgroup)
            .arg("nsenter")
            .arg(format!("--net={}", node.netns.path().display()))
            .arg("--")
            .arg(&ztunnel);
        cmd.arg("run").args(["--node-name", &node.name]);
        if self.spec.agents {
            cmd.arg("--agent-socket").arg(self.agent_socket(i));
        } else {
            cmd.arg("--state-file")
                .arg(&node.state_file)
                .args(["--state-poll", "100ms"]);
        }
        cmd.args([
            "--log-format",
            "json",
            "--trust-domain",
            &self.spec.trust_domain,
        ])
        .args(self.tunnel_ca_args(i));
        // With an agent, the agent registers the tunnel's inbound listeners with capture; the
        // tunnel touches no BPF map.
        if !self.spec.agents {
            cmd.arg("--capture-pin-dir").arg(self.tunnel_pin_dir(i));
        }
        cmd.args(&self.spec.tunnel_args);
        let process = Process::spawn(&format!("ztunnel-{}", node.name), cmd, log)?;
        self.nodes[i - 1].tunnel = Some(process);
        self.wait_ready(i, Duration::from_secs(20))
    }

    /// Waits for node `i`'s tunnel to answer ready; fails with its log if it exits.
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let node = &mut self.nodes[i - 1];
            if let Some(status) = node.tunnel.as_mut().and_then(Process::exited) {
                bail!(
                    "tunnel of {} exited with {status}:\n{}",
                    node.name,
                    node.log()
                );
            }
            if let Ok((200, _)) = node.http_get(15021, "/healthz/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "tunnel of {} not ready after {timeout:?}:\n{}",
                    node.name,
                    node.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a long-running program in pod `pod`, stopped when the cluster is dropped.
    pub fn spawn_in(&mut self, pod: &str, program: &Path, args: &[&str]) -> Result<()> {
        let log = self
            .dir
            .path()
            .join(format!("{pod}-{}.log", self.apps.len()));
        let mut cmd = self.pod(pod).command(program);
        cmd.args(args);
        let process = Process::spawn(&format!("{pod}:{}", program.display()), cmd, log)?;
        self.apps.push(process);
        Ok(())
    }

    /// Starts `weft-testapp <args>` in pod `pod` and waits until it accepts on `port`.
    pub fn start_app(&mut self, pod: &str, args: &[&str], port: u16) -> Result<()> {
        let app = crate::binary("weft-testapp");
        self.spawn_in(pod, &app, args)?;
        let p = self.pod(pod);
        wait_for_port(&p.netns, p.ip, port, Duration::from_secs(10))
    }

    /// Runs `curl` in pod `pod` through its tunnel's SOCKS5 entry (127.0.0.1:15080).
    pub fn curl_socks(&self, pod: &str, url: &str, extra: &[&str]) -> Result<Curl> {
        let mut args = vec!["-sS", "--max-time", "20", "--socks5", "127.0.0.1:15080"];
        args.extend_from_slice(extra);
        args.push(url);
        let out = self.run_in(pod, "curl", &args)?;
        Ok(Curl {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            success: out.status.success(),
        })
    }

    /// Starts transparent capture (`weft-redirect`, in the host's namespace) for `pods` and waits
    /// until its programs are attached; removed when the cluster is dropped.
    pub fn start_capture(&mut self, pods: &[&str]) -> Result<()> {
        let capture = self.spawn_capture(pods, false)?;
        self.captures.push(capture);
        Ok(())
    }

    /// Like [`Cluster::start_capture`], optionally with the sockops/sk_msg fast path, but the
    /// caller owns the capture: dropping it stops the loader and uninstalls.
    pub fn spawn_capture(&self, pods: &[&str], fast_path: bool) -> Result<Capture> {
        let spec = CaptureSpec {
            netns: pods.iter().map(|p| self.pod(p).netns.path()).collect(),
            exclude_cgroups: (1..=self.nodes.len())
                .map(|i| self.tunnel_cgroup(i))
                .collect(),
            fast_path,
            log_dir: self.dir.path(),
        };
        let capture = Capture::start(&self.pin_dir(), &spec)?;
        self.wait_inbound_registered(pods)?;
        Ok(capture)
    }

    /// Waits until the running tunnels of the mesh pods among `pods` have registered their
    /// plaintext inbound listeners with the capture pinned now (they check four times a second).
    pub fn wait_inbound_registered(&self, pods: &[&str]) -> Result<()> {
        let map = self.pin_dir().join("maps/INBOUND");
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&map)
            .output()?;
        let info: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("bpftool map show pinned {}", map.display()))?;
        let map_id = info["id"].clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        for name in pods {
            let pod = self.pod(name);
            let node = &self.nodes[pod.spec.node - 1];
            if !pod.spec.mesh || node.tunnel.is_none() {
                continue;
            }
            loop {
                let (_, body) = node.http_get(15000, "/config_dump")?;
                let dump: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let status = &dump["pods"]["inbound_capture"];
                let registered = status["registered"].as_array().is_some_and(|r| {
                    r.iter().any(|k| {
                        k == &serde_json::json!(format!("{}/{}", pod.spec.namespace, pod.spec.name))
                    })
                });
                if status["map_id"] == map_id && registered {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{}'s tunnel did not register {name}'s inbound listener with capture map {map_id}: {status}",
                        node.name
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The cgroup node `i`'s tunnel runs in (capture never touches its processes).
    pub fn tunnel_cgroup(&self, i: usize) -> PathBuf {
        let root = redirect_ebpf::cgroup2_mount().unwrap_or_else(|_| "/sys/fs/cgroup".into());
        root.join(format!("{}-node{i}", self.prefix))
    }

    /// Where node `i`'s capture is pinned when each node has its own.
    pub fn node_pin_dir(&self, i: usize) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(format!("{}-node{i}", self.prefix))
    }

    /// Where node `i`'s tunnel registers its inbound listeners.
    pub fn tunnel_pin_dir(&self, i: usize) -> PathBuf {
        if self.spec.agents {
            self.node_pin_dir(i)
        } else {
            self.pin_dir()
        }
    }

    /// Where this cluster's capture is pinned (its own directory on the BPF file system).
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(&self.prefix)
    }

    /// Starts tcpdump on the router's link to node `node` and waits until it captures; stop
    /// the process, then read the returned pcap file.
    pub fn capture_link(&self, node: usize, name: &str) -> Result<(Process, PathBuf)> {
        let pcap = self.dir.path().join(format!("{name}.pcap"));
        let mut cmd = self.router.command("tcpdump");
        cmd.args([
            "-i",
            &format!("n{node}"),
            "-U",
            "--immediate-mode",
            "-n",
            "-s",
            "0",
            "-w",
        ])
        .arg(&pcap)
        .arg("tcp");
        let log = self.dir.path().join(format!("{name}.tcpdump.log"));
        let tcpdump = Process::spawn("tcpdump", cmd, log)?;
        for _ in 0..100 {
            if tcpdump.output().contains("listening on") {
                return Ok((tcpdump, pcap));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("tcpdump did not start: {}", tcpdump.output())
    }

    /// Runs a command in pod `pod` to completion.
    pub fn run_in(&self, pod: &str, program: &str, args: &[&str]) -> Result<Output> {
        Ok(self.pod(pod).command(program).args(args).output()?)
    }
}

/// Waits until something accepts TCP connections on `ip:port` inside `netns`.
pub fn wait_for_port(
    netns: &Netns,
    ip: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<()> {
    let ip = ip.into();
    let addr = std::net::SocketAddr::from((ip, port));
    let deadline = Instant::now() + timeout;
    loop {
        let ok = netns.run_in(move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })?;
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "nothing listens on {addr} in {} after {timeout:?}",
                netns.name
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
