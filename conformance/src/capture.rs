//! Transparent capture in the simulated cluster: `weft-redirect run` in the host's namespace,
//! pinned under the cluster's own directory on the BPF file system (clusters of parallel tests
//! never share pins), and `weft-redirect uninstall` when the handle is dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::process::Process;

/// A running capture loader; dropping it stops the loader and removes everything it pinned.
pub struct Capture {
    pub process: Process,
    pub pin_dir: PathBuf,
}

impl Capture {
    /// Starts `weft-redirect run` enrolling `netns` paths, pinned under `pin_dir`, and waits
    /// until its programs are attached.
    pub fn start(
        pin_dir: &Path,
        netns: &[PathBuf],
        fast_path: bool,
        log_dir: &Path,
    ) -> Result<Self> {
        let process = spawn_loader(pin_dir, netns, fast_path, log_dir)?;
        Ok(Capture {
            process,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Stops the loader (capture stays pinned) and starts a new one that takes it over.
    pub fn restart(&mut self, netns: &[PathBuf], fast_path: bool, log_dir: &Path) -> Result<()> {
        self.process.stop(Duration::from_secs(2));
        self.process = spawn_loader(&self.pin_dir, netns, fast_path, log_dir)?;
        if !self.process.output().contains("capture taken over") {
            bail!(
                "the restarted loader did not take over:\n{}",
                self.process.output()
            );
        }
        Ok(())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.process.stop(Duration::from_secs(2));
        uninstall(&self.pin_dir);
    }
}

/// Removes whatever capture is pinned under `pin_dir` (nothing if absent).
pub fn uninstall(pin_dir: &Path) {
    let _ = Command::new(crate::binary("weft-redirect"))
        .arg("uninstall")
        .arg("--pin-dir")
        .arg(pin_dir)
        .output();
}

fn spawn_loader(
    pin_dir: &Path,
    netns: &[PathBuf],
    fast_path: bool,
    log_dir: &Path,
) -> Result<Process> {
    let mut cmd = Command::new(crate::binary("weft-redirect"));
    cmd.arg("run").arg("--pin-dir").arg(pin_dir);
    if fast_path {
        cmd.arg("--fast-path");
    }
    for path in netns {
        cmd.arg("--enroll").arg(path);
    }
    static LOADERS: AtomicUsize = AtomicUsize::new(0);
    let n = LOADERS.fetch_add(1, Ordering::Relaxed);
    let log = log_dir.join(format!("weft-redirect-{n}.log"));
    let mut process = Process::spawn("weft-redirect", cmd, log)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !process.output().contains("pinned under") {
        if let Some(status) = process.exited() {
            bail!("weft-redirect exited with {status}:\n{}", process.output());
        }
        if Instant::now() > deadline {
            bail!("weft-redirect not ready after 20 s:\n{}", process.output());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(process)
}
