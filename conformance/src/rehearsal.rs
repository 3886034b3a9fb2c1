//! The install rehearsed on the simulated cluster: the controller Deployment and the node
//! DaemonSet `weft-node` as `kubectl kustomize install/` renders them, run under podman
//! ([`crate::node_pod`]) from the image `scripts/image.sh` builds, following a Kubernetes API
//! (the test API server, over TLS, in the router's namespace, as the pods' in-cluster
//! configuration finds it), and meshing the cluster's pods. The controller's CA (its root in
//! the Secret `weft-ca`) authenticates each node pod by its projected token (TokenReview) and
//! publishes the trust bundle in the ConfigMap the node pods mount. What a simulated node
//! provides in place of a real one: its own BPF file system (a separate bpffs instance per
//! node, so two nodes on one machine do not share pins), the machine's cgroup v2 hierarchy, a
//! pod network namespace for each of Weft's pods, the Service `weft-ca` as a host name for the
//! controller pod's address, and app pods whose processes sit in kubelet-style cgroups named
//! after their UIDs.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::PodSpec as K8sPodSpec;
use test_apiserver::ApiServer;

use crate::cluster::{Cluster, ClusterSpec, PodSpec};
use crate::node_pod::{Edit, Kubelet, NodePod};
use crate::process::Process;

/// The port the test API server listens on in the router's namespace.
pub const API_PORT: u16 = 6443;

pub struct Rehearsal {
    pub cluster: Cluster,
    pub api: ApiServer,
    /// The node pod as rendered.
    pub pod: K8sPodSpec,
    kubelets: Vec<Kubelet>,
    pub running: Vec<NodePod>,
    /// The controller's pod as rendered, and running.
    pub controller_pod: K8sPodSpec,
    pub controller: Option<NodePod>,
    bpffs: Vec<PathBuf>,
    kubepods: PathBuf,
    pod_processes: Vec<Process>,
    api_stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The app pods: a client on node 1 and an HTTP server on node 2, in namespace `default`
/// (labelled `weft.dev/mesh=enabled` in the API).
const APPS: [(&str, usize); 2] = [("client", 1), ("server", 2)];

fn uid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

impl Rehearsal {
    /// Renders the install, builds the image from the debug binaries, builds the cluster and
    /// its API; no node pod runs yet.
    pub fn build() -> Result<Rehearsal> {
        crate::require_root();
        let objects = weft_install::load(&weft_install::install_dir())?;
        let daemon_set = objects
            .iter()
            .find_map(|o| match o {
                weft_install::Object::DaemonSet(d) => Some(d.clone()),
                _ => None,
            })
            .context("the install has no DaemonSet")?;
        let controller_pod = objects
            .iter()
            .find_map(|o| match o {
                weft_install::Object::Deployment(d) => d.spec.template.spec.clone(),
                _ => None,
            })
            .context("the install has no controller Deployment")?;
        let bundle_map = objects
            .iter()
            .find_map(|o| match o {
                weft_install::Object::ConfigMap(c) => Some(serde_json::to_string(c)),
                _ => None,
            })
            .context("the install has no trust bundle ConfigMap")??;
        let daemon_set_json = serde_json::to_string(&daemon_set)?;
        let pod = daemon_set
            .spec
            .template
            .spec
            .clone()
            .context("the DaemonSet has no pod template")?;
        let image = pod.containers[0]
            .image
            .clone()
            .context("the node pod's first container has no image")?;
        build_image(&image)?;

        let mut pods: Vec<PodSpec> = APPS.iter().map(|(n, i)| PodSpec::new(n, *i)).collect();
        for i in 1..=2 {
            let mut node_pod = PodSpec::new(&format!("weft-node-{i}"), i).outside_mesh();
            node_pod.namespace = "weft-system".into();
            node_pod.service_account = "weft-node".into();
            pods.push(node_pod);
        }
        let mut controller_netns = PodSpec::new("weft-controller-1", 1).outside_mesh();
        controller_netns.namespace = "weft-system".into();
        controller_netns.service_account = "weft-controller".into();
        pods.push(controller_netns);
        let mut cluster = Cluster::build(ClusterSpec::new(2, pods))?;
        cluster.start_app(
            "server",
            &["http", "--port", "8080", "--name", "server"],
            8080,
        )?;

        // The API server, over TLS, on every node's router address.
        let api_ca = crate::pki::TestCa::generate()?;
        let ips: Vec<IpAddr> = (1..=2)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 255, i, 1)))
            .collect();
        let (cert, key) = api_ca.issue_server_pem(&ips)?;
        let (api, api_stop) = serve_api(&cluster, &cert, &key)?;
        api.apply(&cluster_objects(&cluster));
        // The DaemonSet itself: the agents read it at shutdown to tell an update from an
        // uninstall. The bundle's ConfigMap, empty, as the install creates it.
        api.apply(&daemon_set_json);
        api.apply(&bundle_map);
        // Each node pod's projected token, as the API server would review it: the node agent's
        // service account, for the CA's audience, bound to a pod on that node.
        for i in 1..=2 {
            api.issue_token(
                &node_ca_token(i),
                test_apiserver::IssuedToken {
                    user: "system:serviceaccount:weft-system:weft-node".into(),
                    audiences: vec!["weft-ca".into()],
                    node: Some(format!("node{i}")),
                    expired: false,
                },
            );
        }

        // The controller, with its root in the Secret weft-ca.
        let secret = cluster.dir.path().join("secret-weft-ca");
        let init = Command::new(crate::binary("mesh-node"))
            .args(["ca-root", "init", "--ca-dir"])
            .arg(&secret)
            .output()?;
        ensure!(
            init.status.success(),
            "mesh-node ca-root init: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let controller_ip = IpAddr::V4(cluster.pod("weft-controller-1").ip);
        let controller_kubelet = Kubelet {
            node_name: "node1".into(),
            pod_name: "weft-controller-1".into(),
            pod_namespace: "weft-system".into(),
            pod_netns: cluster.pod("weft-controller-1").netns.path(),
            host_paths: BTreeMap::new(),
            config_maps: BTreeMap::new(),
            secrets: BTreeMap::from([("weft-ca".to_owned(), secret)]),
            projected_token: String::new(),
            api_server: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 255, 1, 1)), API_PORT),
            api_ca_pem: api_ca.pem.clone(),
            api_token: CONTROLLER_TOKEN.into(),
            hosts: Vec::new(),
            state_dir: cluster.dir.path().join("kubelet-controller"),
        };
        let controller = NodePod::start(&controller_pod, &controller_kubelet, &Edit::default())
            .context("the controller pod")?;
        // What the kubelet would bring to the node pods: the ConfigMap, once the CA filled it.
        let roots = wait_for_bundle(&api, &controller)?;

        // Each app pod's process in a kubelet-style cgroup named after its UID: how the agent
        // finds the pod's network namespace on a real node.
        let cgroup2 = redirect_ebpf::cgroup2_mount()?;
        let kubepods = cgroup2.join(format!("{}-kubepods", cluster.prefix));
        let mut pod_processes = Vec::new();
        for (j, (name, _)) in APPS.iter().enumerate() {
            let cgroup = kubepods.join(format!("pod{}", uid(j + 1)));
            std::fs::create_dir_all(&cgroup)?;
            let mut cmd = cluster.pod(name).command("sleep");
            cmd.arg("3600");
            let log = cluster.dir.path().join(format!("{name}-pause.log"));
            let process = Process::spawn(&format!("{name}-pause"), cmd, log)?;
            let pid = process.pid().context("the pod's process has a pid")?;
            std::fs::write(cgroup.join("cgroup.procs"), pid.to_string())
                .with_context(|| format!("move {name}'s process into {}", cgroup.display()))?;
            pod_processes.push(process);
        }

        let mut bpffs = Vec::new();
        let mut kubelets = Vec::new();
        for i in 1..=2usize {
            let fs = PathBuf::from("/sys/fs/bpf").join(format!("{}-node{i}", cluster.prefix));
            std::fs::create_dir_all(&fs)?;
            crate::netns::run(&["mount", "-t", "bpf", "bpf", &fs.to_string_lossy()])
                .context("mount a BPF file system for the simulated node")?;
            bpffs.push(fs.clone());
            let state_dir = cluster.dir.path().join(format!("kubelet-node{i}"));
            let trust = state_dir.join("configmap-weft-trust-bundle");
            std::fs::create_dir_all(&trust)?;
            std::fs::write(trust.join(mesh_node::ca::publish::BUNDLE_KEY), &roots)?;
            let router = IpAddr::V4(Ipv4Addr::new(10, 255, i as u8, 1));
            let node_pod = cluster.pod(&format!("weft-node-{i}"));
            kubelets.push(Kubelet {
                node_name: format!("node{i}"),
                pod_name: format!("weft-node-{i}"),
                pod_namespace: "weft-system".into(),
                pod_netns: node_pod.netns.path(),
                host_paths: BTreeMap::from([
                    ("/sys/fs/bpf".to_owned(), fs),
                    ("/sys/fs/cgroup".to_owned(), cgroup2.clone()),
                ]),
                config_maps: BTreeMap::from([("weft-trust-bundle".to_owned(), trust)]),
                secrets: BTreeMap::new(),
                projected_token: node_ca_token(i),
                api_server: SocketAddr::new(router, API_PORT),
                api_ca_pem: api_ca.pem.clone(),
                api_token: node_api_token(i),
                // The Service weft-ca, as cluster DNS and kube-proxy would take the tunnel to
                // the controller's pod, and the relay's headless Service, as DNS answers it.
                hosts: vec![
                    ("weft-ca.weft-system.svc".into(), controller_ip),
                    // The headless Service weft-relay: its one replica.
                    ("weft-relay.weft-system.svc".into(), controller_ip),
                ],
                state_dir,
            });
        }
        Ok(Rehearsal {
            cluster,
            api,
            pod,
            kubelets,
            running: Vec::new(),
            controller_pod,
            controller: Some(controller),
            bpffs,
            kubepods,
            pod_processes,
            api_stop: Some(api_stop),
        })
    }

    /// Starts the node pod, as written but for `edit`, on both nodes.
    pub fn start_node_pods(&mut self, edit: &Edit) -> Result<()> {
        for kubelet in &self.kubelets {
            let pod = NodePod::start(&self.pod, kubelet, edit)
                .with_context(|| format!("the node pod on {}", kubelet.node_name))?;
            self.running.push(pod);
        }
        Ok(())
    }

    /// Starts the node pod on node `i` with some host paths of that node replaced (a node
    /// without cgroup v2 or a BPF file system): the error, carrying the termination message,
    /// or the running pod.
    pub fn start_node_pod_with_host_paths(
        &self,
        i: usize,
        host_paths: &[(&str, PathBuf)],
    ) -> Result<NodePod> {
        let mut kubelet = self.kubelets[i - 1].clone();
        for (path, replacement) in host_paths {
            kubelet
                .host_paths
                .insert((*path).to_owned(), replacement.clone());
        }
        NodePod::start(&self.pod, &kubelet, &Edit::default())
    }

    /// Stops the node pods as a rolling update or a deletion does (SIGTERM, grace period).
    pub fn stop_node_pods(&mut self) {
        for mut pod in self.running.drain(..) {
            pod.stop();
        }
    }

    /// GET `path` on `port` of node `i`'s node pod, from the node (as the kubelet probes).
    pub fn get(&self, i: usize, port: u16, path: &str) -> Result<(u16, String)> {
        self.get_from_pod(&format!("weft-node-{i}"), port, path)
    }

    /// GET `path` on `port` of the simulated pod `pod`, from its node.
    pub fn get_from_pod(&self, pod: &str, port: u16, path: &str) -> Result<(u16, String)> {
        let pod = self.cluster.pod(pod);
        let ip = pod.ip;
        let out = self.cluster.nodes[pod.spec.node - 1]
            .netns
            .command("curl")
            .args([
                "-s",
                "--max-time",
                "3",
                "-w",
                "\n%{http_code}",
                &format!("http://{ip}:{port}{path}"),
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
    }

    /// Waits until every readiness probe of the node pods and of the controller, as the
    /// manifests write them, answers 200.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pods: Vec<(String, &K8sPodSpec)> = (1..=self.kubelets.len())
            .map(|i| (format!("weft-node-{i}"), &self.pod))
            .collect();
        pods.push(("weft-controller-1".into(), &self.controller_pod));
        for (name, spec) in pods {
            let probes = http_probes(spec);
            ensure!(!probes.is_empty(), "{name} has no HTTP readiness probe");
            for (container, port, path) in &probes {
                loop {
                    let (status, body) = self.get_from_pod(&name, *port, path)?;
                    if status == 200 {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "{name}'s {container} not ready on {port}{path} ({status}: {body}):\n{}\ncontroller:\n{}",
                            self.logs(1) + &self.logs(2),
                            self.controller_log()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Ok(())
    }

    /// The controller's log.
    pub fn controller_log(&self) -> String {
        self.controller
            .as_ref()
            .map(|c| c.logs("controller"))
            .unwrap_or_default()
    }

    /// The controller's flow relay endpoint as `weft observe --relay` takes it: its pod's
    /// loopback, where `kubectl port-forward` would reach it.
    pub fn relay_source(&self) -> String {
        format!(
            "127.0.0.1:15010@{}",
            self.cluster.pod("weft-controller-1").netns.path().display()
        )
    }

    /// The nodes whose tunnels offer their flows to the controller's relay (`GET /nodes`).
    pub fn relay_nodes(&self) -> String {
        self.cluster
            .pod("weft-controller-1")
            .command("curl")
            .args(["-sS", "--max-time", "3", "http://127.0.0.1:15010/nodes"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Every container's log on node `i`.
    pub fn logs(&self, i: usize) -> String {
        let Some(pod) = self.running.get(i - 1) else {
            return String::new();
        };
        self.pod
            .containers
            .iter()
            .map(|c| format!("--- {} ---\n{}", c.name, pod.logs(&c.name)))
            .collect()
    }

    /// The server node's tunnel metrics: connections it accepted over mutual TLS from the
    /// client's identity.
    pub fn meshed_from_client(&self) -> Result<f64> {
        let (status, body) = self.get(2, 15020, "/metrics")?;
        ensure!(status == 200, "node2's tunnel metrics: {status}");
        Ok(crate::metrics::sum(
            &crate::metrics::parse(&body),
            "weft_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/default/sa/client",
                ),
                ("connection_security_policy", "mutual_tls"),
            ],
        ))
    }

    /// A plain `curl` from the client pod to the server: whether it answered.
    pub fn echo(&self, text: &str) -> bool {
        let url = format!("http://{}:8080/echo/{text}", self.cluster.pod("server").ip);
        self.cluster
            .run_in("client", "curl", &["-sS", "--max-time", "3", &url])
            .map(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stdout) == format!("server saw {text}\n")
            })
            .unwrap_or(false)
    }

    /// Whether a request from the client reaches the server through both tunnels within
    /// `timeout` (answered, and counted as mutual TLS by the server's tunnel).
    pub fn meshes_within(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(before) = self.meshed_from_client()
                && self.echo("meshed")
                && self.meshed_from_client().is_ok_and(|after| after > before)
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Node `i`'s capture pins, as the node's BPF file system holds them.
    pub fn pin_dir(&self, i: usize) -> PathBuf {
        self.bpffs[i - 1].join("weft")
    }

    /// Runs `mesh-node <args>` from the image with node `i`'s BPF file system mounted, as the
    /// README's cleanup command does on a node.
    pub fn run_image(&self, i: usize, args: &[&str]) -> Result<String> {
        let image = self.pod.containers[0].image.clone().unwrap_or_default();
        let out = Command::new("podman")
            .args(["run", "--rm", "--cap-drop", "all", "--cap-add", "CAP_BPF"])
            .args([
                "--cap-add",
                "CAP_NET_ADMIN",
                "--security-opt",
                "seccomp=unconfined",
            ])
            .arg("--volume")
            .arg(format!("{}:/sys/fs/bpf", self.bpffs[i - 1].display()))
            .args(["--entrypoint", "mesh-node", &image])
            .args(args)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success(),
            "mesh-node {args:?} in the image: {text}"
        );
        Ok(text)
    }
}

impl Drop for Rehearsal {
    fn drop(&mut self) {
        self.stop_node_pods();
        if let Some(mut controller) = self.controller.take() {
            controller.stop();
        }
        for fs in &self.bpffs {
            // Unmounting the node's BPF file system releases its pins: links detach.
            let _ = redirect_ebpf::uninstall(&fs.join("weft"));
            let _ = Command::new("umount").arg(fs).output();
            let _ = std::fs::remove_dir(fs);
        }
        for process in &mut self.pod_processes {
            process.kill();
        }
        if let Ok(entries) = std::fs::read_dir(&self.kubepods) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&self.kubepods);
        if let Some(stop) = self.api_stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Builds `image` from target/debug's binaries with `scripts/image.sh`.
fn build_image(image: &str) -> Result<()> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(["--debug", "--tag", image])
        .output()
        .context("run scripts/image.sh")?;
    ensure!(
        out.status.success(),
        "scripts/image.sh --debug --tag {image}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Serves the test API server over TLS on 0.0.0.0:6443 in the router's namespace, from a
/// thread of its own; the sender stops it.
fn serve_api(
    cluster: &Cluster,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(ApiServer, tokio::sync::oneshot::Sender<()>)> {
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())?.context("a key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = Arc::new(tls);
    let netns = cluster.router.path();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let failed = ready_tx.clone();
        let run = || -> Result<()> {
            let file = std::fs::File::open(&netns)?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(("0.0.0.0", API_PORT)).await?;
                let _ = ready_tx.send(Ok(ApiServer::serve(listener, Some(tls))));
                let _ = stop_rx.await;
                Ok::<_, anyhow::Error>(())
            })
        };
        if let Err(e) = run() {
            let _ = failed.send(Err(e));
        }
    });
    let api = ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the API server did not start")??;
    Ok((api, stop_tx))
}

/// The cluster's namespaces and app pods as the API serves them, with the UIDs their
/// processes' cgroups carry.
fn cluster_objects(cluster: &Cluster) -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {weft.dev/mesh: enabled}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: weft-system, labels: {weft.dev/mesh: disabled}}\n",
    );
    for (j, (name, node)) in APPS.iter().enumerate() {
        let pod = cluster.pod(name);
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, uid: {uid}, labels: {{app: {name}}}}}\nspec:\n  nodeName: node{node}\n  serviceAccountName: {name}\n  containers: [{{name: app, image: weft-testapp}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n  podIPs: [{{ip: {ip}}}, {{ip: \"{ip6}\"}}]\n",
            uid = uid(j + 1),
            ip = pod.ip,
            ip6 = pod.ip6,
        ));
    }
    out
}

/// The bearer token the controller's pod calls the API with.
pub const CONTROLLER_TOKEN: &str = "token-of-weft-controller";

/// The bearer token node `i`'s pod calls the API with.
pub fn node_api_token(i: usize) -> String {
    format!("token-of-weft-node-{i}")
}

/// Node `i`'s projected token for the CA (audience weft-ca).
fn node_ca_token(i: usize) -> String {
    format!("projected-weft-ca-token-of-node{i}")
}

/// The HTTP readiness probes of `pod`: (container, port, path).
fn http_probes(pod: &K8sPodSpec) -> Vec<(String, u16, String)> {
    pod.containers
        .iter()
        .filter_map(|c| {
            let (port, path) = weft_install::readiness_probe(c)?;
            Some((c.name.clone(), port, path))
        })
        .collect()
}

/// Waits until the controller published the trust bundle in its ConfigMap; the roots.
fn wait_for_bundle(api: &ApiServer, controller: &NodePod) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(roots) = api
            .get("ConfigMap", "weft-system", "weft-trust-bundle")
            .and_then(|c| {
                c["data"][mesh_node::ca::publish::BUNDLE_KEY]
                    .as_str()
                    .map(str::to_owned)
            })
        {
            return Ok(roots);
        }
        if Instant::now() > deadline {
            bail!(
                "the controller did not publish the trust bundle:\n{}",
                controller.logs("controller")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
