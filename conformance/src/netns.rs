//! Named network namespaces (`ip netns`), removed when dropped.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs a command and fails with its stderr when it exits non-zero.
pub fn run(args: &[&str]) -> Result<String> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One network namespace under `/run/netns`.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates the namespace with loopback up.
    pub fn create(name: &str) -> Result<Self> {
        run(&["ip", "netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `/run/netns/<name>`, what the tunnel opens.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ])?;
        Ok(())
    }

    /// A command that runs inside the namespace.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, program: S) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs a closure on a thread inside the namespace (sockets it makes live there).
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        self.spawn_in(f)
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
    }

    /// Runs the future `make` returns to completion on a current-thread runtime of a thread
    /// inside the namespace (sockets it opens live there).
    pub fn block_on<F, Fut>(&self, make: F) -> Result<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future,
        Fut::Output: Send + 'static,
    {
        self.run_in(move || -> Result<Fut::Output> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("a runtime")?;
            Ok(runtime.block_on(make()))
        })?
    }

    /// Starts a closure on a thread inside the namespace; join it for its result.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let path = self.path();
        std::thread::spawn(move || -> Result<T> {
            let file =
                std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
