//! The mesh CA of the simulated cluster: one `mesh-node controller --manifests` in the router's
//! namespace (every node reaches it at its uplink's router address), holding the key material
//! under the cluster's `ca/` folder, authenticating each node by its token under
//! `node-tokens/`, and writing the trust bundle the tunnels follow. No tunnel is given the key.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::agents::wait_for_output;
use crate::cluster::Cluster;
use crate::process::Process;

/// The port the CA serves on (istiod's).
pub const CA_PORT: u16 = 15012;

/// The port of the flow relay's endpoint for users (the controller's default).
pub const RELAY_PORT: u16 = 15010;

/// The DNS name of the CA's serving certificate, as tunnels are told to expect it.
pub const CA_SERVER_NAME: &str = "weft-ca.weft-system.svc";

impl Cluster {
    /// The CA's key material (`ca.pem`, `ca.key`), created by the controller on first start.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// The folder of per-node tokens.
    pub fn node_token_dir(&self) -> PathBuf {
        self.dir.path().join("node-tokens")
    }

    /// Node `i`'s token file.
    pub fn node_token(&self, i: usize) -> PathBuf {
        self.node_token_dir().join(format!("node{i}.token"))
    }

    /// The trust bundle the CA writes and the tunnels follow.
    pub fn trust_bundle(&self) -> PathBuf {
        self.dir.path().join("trust-bundle.pem")
    }

    /// Where node `i`'s tunnel reaches the CA.
    pub fn ca_address(&self, i: usize) -> String {
        format!("10.255.{i}.1:{CA_PORT}")
    }

    /// The controller's flow relay endpoint, as `weft observe --relay` takes it (on the
    /// router's loopback, where the controller runs).
    pub fn relay_source(&self) -> String {
        format!("127.0.0.1:{RELAY_PORT}@{}", self.router.path().display())
    }

    /// The manifests the CA authorizes against: with agents, the folder they follow (a pod
    /// the agents do not see, the CA does not sign for either); otherwise one written from the
    /// cluster's pods.
    pub fn ca_manifest_dir(&self) -> PathBuf {
        if self.spec.agents {
            self.manifest_dir()
        } else {
            self.dir.path().join("ca-manifests")
        }
    }

    /// Makes the folders and node tokens and writes the CA's manifests (once, at build).
    pub(crate) fn prepare_ca(&self) -> Result<()> {
        for dir in [self.ca_dir(), self.node_token_dir()] {
            std::fs::create_dir_all(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        std::fs::create_dir_all(self.ca_manifest_dir())?;
        for node in &self.nodes {
            let out = Command::new(crate::binary("mesh-node"))
                .args(["node-token", "--node", &node.name, "--dir"])
                .arg(self.node_token_dir())
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "mesh-node node-token: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if !self.spec.agents {
            // The same Pods the agents would follow (every pod, scheduled on its node).
            let pods = self.manifests_yaml(&crate::agents::Manifests::default());
            std::fs::write(self.ca_manifest_dir().join("pods.yaml"), pods)?;
        }
        Ok(())
    }

    /// Starts the CA and waits until it serves (and the bundle is written).
    pub fn start_ca(&mut self) -> Result<()> {
        let log = self
            .dir
            .path()
            .join(format!("mesh-ca-{}.log", self.ca_starts));
        self.ca_starts += 1;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.router.path().display()))
            .arg("--")
            .arg(crate::binary("mesh-node"))
            .arg("controller")
            .arg("--manifests")
            .arg(self.ca_manifest_dir())
            .args(["--poll", "50ms"])
            .arg("--ca-dir")
            .arg(self.ca_dir())
            .arg("--node-tokens")
            .arg(self.node_token_dir())
            .arg("--trust-bundle-out")
            .arg(self.trust_bundle())
            .args(["--trust-domain", &self.spec.trust_domain])
            .args(["--ca-listen", &format!("0.0.0.0:{CA_PORT}")])
            .args(["--ca-server-name", CA_SERVER_NAME])
            .args(["--readiness-addr", "127.0.0.1:0"])
            .args(&self.spec.ca_args);
        let mut process = Process::spawn("mesh-ca", cmd, log)?;
        wait_for_output(&mut process, "mesh CA serving", Duration::from_secs(20))
            .context("the mesh CA did not start")?;
        self.ca = Some(process);
        Ok(())
    }

    /// Stops the CA (SIGTERM); tunnels keep the certificates they have.
    pub fn stop_ca(&mut self) {
        if let Some(mut ca) = self.ca.take() {
            ca.stop(Duration::from_secs(5));
        }
    }

    /// Everything the CA logged, over all its starts.
    pub fn ca_log(&self) -> String {
        (0..self.ca_starts)
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("mesh-ca-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("")
    }

    /// The flags that point node `i`'s tunnel at the CA and the bundle.
    pub(crate) fn tunnel_ca_args(&self, i: usize) -> Vec<std::ffi::OsString> {
        vec![
            "--trust-bundle".into(),
            self.trust_bundle().into(),
            "--ca-address".into(),
            self.ca_address(i).into(),
            "--ca-server-name".into(),
            CA_SERVER_NAME.into(),
            "--ca-token-file".into(),
            self.node_token(i).into(),
            "--flow-relay".into(),
            self.ca_address(i).into(),
        ]
    }
}
