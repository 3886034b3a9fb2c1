//! A real Prometheus server (the Debian package) scraping the simulated nodes' tunnels, from
//! the host: a veth pair joins the host to the router namespace, so Prometheus runs on the
//! host and answers on its `localhost:9090`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cluster::Cluster;
use crate::netns::run;
use crate::process::Process;

/// Host side of the link to the router; removed when dropped.
pub struct HostLink {
    name: String,
}

const HOST_LINK: &str = "weft-demo-host";

impl Cluster {
    /// Joins the host to the router (10.254.0.1/30 on the host, .2 in the router) and routes
    /// the nodes' network (10.255.0.0/16) through it.
    pub fn link_host(&self) -> Result<HostLink> {
        if Path::new("/sys/class/net").join(HOST_LINK).exists() {
            bail!(
                "{HOST_LINK} exists already: another demo is running (tear it down first, or `ip link del {HOST_LINK}`)"
            );
        }
        run(&[
            "ip",
            "link",
            "add",
            HOST_LINK,
            "type",
            "veth",
            "peer",
            "name",
            "host",
            "netns",
            &self.router.name,
        ])?;
        let link = HostLink {
            name: HOST_LINK.to_owned(),
        };
        run(&["ip", "addr", "add", "10.254.0.1/30", "dev", HOST_LINK])?;
        run(&["ip", "link", "set", HOST_LINK, "up"])?;
        self.router
            .ip(&["addr", "add", "10.254.0.2/30", "dev", "host"])?;
        self.router.ip(&["link", "set", "host", "up"])?;
        run(&["ip", "route", "add", "10.255.0.0/16", "via", "10.254.0.2"])?;
        Ok(link)
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

/// A running Prometheus; stopped when dropped.
pub struct Prometheus {
    _process: Process,
    pub listen: String,
}

impl Prometheus {
    /// Starts Prometheus on `listen` scraping `targets` (host:port of `/metrics`) every 2 s,
    /// keeping its data under `dir`; waits until it is ready.
    pub fn start(targets: &[String], listen: &str, dir: &Path) -> Result<Self> {
        let binary = which("prometheus").context(
            "prometheus is not installed: apt-get install prometheus (scripts/setup.sh --demo does)",
        )?;
        let quoted: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 2s\nscrape_configs:\n  - job_name: weft-tunnels\n    static_configs:\n      - targets: [{}]\n",
                quoted.join(", ")
            ),
        )?;
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address={listen}"));
        let mut process = Process::spawn("prometheus", cmd, dir.join("prometheus.log"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new("curl")
                .args(["-sf", &format!("http://{listen}/-/ready")])
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                break;
            }
            if let Some(status) = process.exited() {
                bail!("prometheus exited with {status}:\n{}", process.output());
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after 30 s:\n{}", process.output());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(Prometheus {
            _process: process,
            listen: listen.to_owned(),
        })
    }

    /// Runs an instant PromQL query: the `data.result` array.
    pub fn query(&self, promql: &str) -> Result<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://{}/api/v1/query", self.listen)])
            .args(["--data-urlencode", &format!("query={promql}")])
            .output()?;
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "prometheus answered: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        Ok(body["data"]["result"].clone())
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.exists())
}
