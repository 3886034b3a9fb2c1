//! Transparent capture in the simulated cluster: `weft-redirect run` in the host's namespace,
//! pinned under the cluster's own directory on the BPF file system (clusters of parallel tests
//! never share pins), and `weft-redirect uninstall` when the handle is dropped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::agents::wait_for_output;
use crate::process::Process;

/// A running capture loader; dropping it stops the loader and removes everything it pinned.
pub struct Capture {
    pub process: Process,
    pub pin_dir: PathBuf,
    /// The loader's `run` arguments after the pin directory, for a restart.
    args: Vec<OsString>,
    log_dir: PathBuf,
}

/// What a loader captures.
pub struct CaptureSpec<'a> {
    /// Network namespaces of the pods to enroll.
    pub netns: Vec<PathBuf>,
    /// Cgroups never captured (the tunnels').
    pub exclude_cgroups: Vec<PathBuf>,
    pub fast_path: bool,
    /// Where loader logs go.
    pub log_dir: &'a Path,
}

impl Capture {
    /// Starts `weft-redirect run` pinned under `pin_dir` and waits until its programs are
    /// attached.
    pub fn start(pin_dir: &Path, spec: &CaptureSpec<'_>) -> Result<Self> {
        let mut args: Vec<OsString> = Vec::new();
        if spec.fast_path {
            args.push("--fast-path".into());
        }
        for path in &spec.netns {
            args.extend(["--enroll".into(), path.into()]);
        }
        for path in &spec.exclude_cgroups {
            args.extend(["--exclude-cgroup".into(), path.into()]);
        }
        let process = spawn_loader(pin_dir, &args, spec.log_dir)?;
        Ok(Capture {
            process,
            pin_dir: pin_dir.to_owned(),
            args,
            log_dir: spec.log_dir.to_owned(),
        })
    }

    /// Stops the loader (capture stays pinned) and starts a new one with the same arguments,
    /// which must take capture over.
    pub fn restart(&mut self) -> Result<()> {
        self.process.stop(Duration::from_secs(2));
        self.process = spawn_loader(&self.pin_dir, &self.args, &self.log_dir)?;
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

fn spawn_loader(pin_dir: &Path, args: &[OsString], log_dir: &Path) -> Result<Process> {
    let mut cmd = Command::new(crate::binary("weft-redirect"));
    cmd.arg("run").arg("--pin-dir").arg(pin_dir).args(args);
    static LOADERS: AtomicUsize = AtomicUsize::new(0);
    let n = LOADERS.fetch_add(1, Ordering::Relaxed);
    let log = log_dir.join(format!("weft-redirect-{n}.log"));
    let mut process = Process::spawn("weft-redirect", cmd, log)?;
    wait_for_output(&mut process, "pinned under", Duration::from_secs(20))?;
    Ok(process)
}
