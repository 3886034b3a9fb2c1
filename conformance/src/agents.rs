//! `mesh-node` in the simulated cluster: the pods as Kubernetes manifests in a folder, and one
//! agent per node following it, driving that node's capture and tunnel.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::cluster::Cluster;
use crate::process::Process;

/// How the manifests describe the cluster's pods.
#[derive(Clone, Debug, Default)]
pub struct Manifests<'a> {
    /// Namespaces labelled `weft.dev/mesh=enabled`.
    pub labelled: &'a [&'a str],
    /// Pods labelled `weft.dev/mesh=disabled`.
    pub opted_out: &'a [&'a str],
    /// Pods left out (not created yet).
    pub absent: &'a [&'a str],
    /// More YAML documents appended as they are (objects with no pod namespace behind them).
    pub extra: &'a str,
}

impl Cluster {
    /// The manifest folder the agents follow.
    pub fn manifest_dir(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// Writes the cluster's namespaces and pods as Kubernetes YAML (one file, replaced
    /// atomically) in [`Cluster::manifest_dir`].
    pub fn write_manifests(&self, m: &Manifests<'_>) -> Result<()> {
        self.replace_manifests(&self.manifests_yaml(m))
    }

    /// The cluster's namespaces and pods as Kubernetes YAML.
    pub fn manifests_yaml(&self, m: &Manifests<'_>) -> String {
        let mut namespaces: Vec<&str> = self
            .pods
            .iter()
            .map(|p| p.spec.namespace.as_str())
            .collect();
        namespaces.sort();
        namespaces.dedup();
        let mut out = String::new();
        for ns in namespaces {
            let labels = if m.labelled.contains(&ns) {
                "{weft.dev/mesh: enabled}"
            } else {
                "{}"
            };
            let _ = write!(
                out,
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {labels}}}\n---\n"
            );
        }
        for pod in self
            .pods
            .iter()
            .filter(|p| !m.absent.contains(&p.spec.name.as_str()))
        {
            let spec = &pod.spec;
            let mesh_label = if m.opted_out.contains(&spec.name.as_str()) {
                ", weft.dev/mesh: disabled"
            } else {
                ""
            };
            let _ = write!(
                out,
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  labels: {{app: {}{mesh_label}}}\n  annotations: {{weft.dev/netns: {}}}\nspec:\n  nodeName: node{}\n  serviceAccountName: {}\n  containers: [{{name: app, image: weft-testapp}}]\nstatus:\n  phase: Running\n  podIPs: [{{ip: {}}}, {{ip: \"{}\"}}]\n---\n",
                spec.name,
                spec.namespace,
                spec.name,
                pod.netns.path().display(),
                spec.node,
                spec.service_account,
                pod.ip,
                pod.ip6,
            );
        }
        out.push_str(m.extra);
        out
    }

    /// Replaces the live manifests with `text` at once (a rename), so an agent never reads
    /// half a file.
    pub fn replace_manifests(&self, text: &str) -> Result<()> {
        let dir = self.manifest_dir();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(".cluster.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, dir.join("cluster.yaml"))?;
        Ok(())
    }

    /// Starts one `mesh-node` per node following [`Cluster::manifest_dir`], each pinning its
    /// capture under its node's directory and serving its node's tunnel on
    /// [`Cluster::agent_socket`]; waits until each listens.
    pub fn start_agents(&mut self) -> Result<()> {
        for i in 1..=self.nodes.len() {
            let agent = self.spawn_agent(i)?;
            self.agents.push(agent);
        }
        Ok(())
    }

    /// The socket node `i`'s agent serves its tunnel on.
    pub fn agent_socket(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent-node{i}.sock"))
    }

    /// Starts node `i`'s agent and waits until it listens for its tunnel.
    pub fn spawn_agent(&self, i: usize) -> Result<Process> {
        let node = &self.nodes[i - 1];
        // The tunnel's cgroup exists before either starts, as a DaemonSet pod's would.
        std::fs::create_dir_all(self.tunnel_cgroup(i))?;
        let mut cmd = Command::new(crate::binary("mesh-node"));
        cmd.arg("run")
            .args(["--node-name", &node.name])
            .arg("--poll")
            .arg(format!("{}ms", self.spec.agent_poll_ms))
            .arg("--manifests")
            .arg(self.manifest_dir())
            .arg("--tunnel-socket")
            .arg(self.agent_socket(i))
            .arg("--pin-dir")
            .arg(self.node_pin_dir(i))
            .arg("--exclude-cgroup")
            .arg(self.tunnel_cgroup(i))
            .args(["--readiness-addr", "127.0.0.1:0"]);
        let log =
            self.dir
                .path()
                .join(format!("mesh-node-{}-{}.log", node.name, self.agents.len()));
        let mut agent = Process::spawn(&format!("mesh-node-{}", node.name), cmd, log)?;
        wait_for_output(&mut agent, "mesh-node running", Duration::from_secs(20))?;
        Ok(agent)
    }
}

/// GET the readiness endpoint an agent logged: (status, body).
pub fn agent_readiness(agent: &Process) -> Result<(u16, String)> {
    let log = agent.output();
    let addr = log
        .lines()
        .find_map(|l| l.split("readiness=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(|a| {
            a.trim_matches(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                .to_owned()
        })
        .ok_or_else(|| anyhow::anyhow!("the agent did not log its readiness address:\n{log}"))?;
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            &format!("http://{addr}/"),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

/// Waits until `process` printed `needle`; fails with its output if it exits or times out.
pub fn wait_for_output(process: &mut Process, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !process.output().contains(needle) {
        if let Some(status) = process.exited() {
            bail!(
                "{} exited with {status}:\n{}",
                process.name,
                process.output()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not print {needle:?}:\n{}",
                process.name,
                process.output()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
