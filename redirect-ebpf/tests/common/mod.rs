//! Test helpers: throwaway network namespaces and a capture installed under its own pin
//! directory (so tests run side by side), removed when dropped.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use redirect_ebpf::{Options, Redirect, bpffs_mount, cgroup2_mount};

pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test loads eBPF programs and must run as root"
        );
        let name = format!("wfr{}{tag}", std::process::id());
        let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
        ok(Command::new("ip").args(["netns", "add", &name]));
        ok(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Netns(name)
    }

    /// Runs `f` on a thread inside the namespace without waiting for it.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let file = std::fs::File::open(self.path()).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }

    /// Joins this namespace and `other` with a veth pair on a /24: `ip` here, `other_ip` there.
    pub fn veth_to(&self, other: &Netns, ip: &str, other_ip: &str) {
        let ok = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().unwrap();
            assert!(status.success(), "ip {args:?}");
        };
        let (here, there) = (format!("{}a", self.0), format!("{}b", self.0));
        ok(&[
            "-n", &self.0, "link", "add", &here, "type", "veth", "peer", "name", &there, "netns",
            &other.0,
        ]);
        ok(&[
            "-n",
            &self.0,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &here,
        ]);
        ok(&[
            "-n",
            &other.0,
            "addr",
            "add",
            &format!("{other_ip}/24"),
            "dev",
            &there,
        ]);
        ok(&["-n", &self.0, "link", "set", &here, "up"]);
        ok(&["-n", &other.0, "link", "set", &there, "up"]);
    }

    pub fn file(&self) -> std::fs::File {
        std::fs::File::open(self.path()).unwrap()
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(self.path()).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A unique pin directory on the BPF file system for one test.
pub fn test_pin_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    bpffs_mount()
        .unwrap()
        .join(format!("weft-test-{}-{n}", std::process::id()))
}

/// Capture installed on the root cgroup under a test's own pin directory; uninstalled on drop.
pub struct Capture(Option<Redirect>, PathBuf);

impl Capture {
    pub fn install(mut options: Options) -> Capture {
        let dir = options.pin_dir.get_or_insert_with(test_pin_dir).clone();
        Capture::install_in(dir, options)
    }

    pub fn install_in(dir: PathBuf, options: Options) -> Capture {
        let options = Options {
            pin_dir: Some(dir.clone()),
            ..options
        };
        let redirect = Redirect::install(&cgroup2_mount().unwrap(), &options).unwrap();
        Capture(Some(redirect), dir)
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.1
    }

    /// Removes everything through the library's own uninstall.
    pub fn uninstall(mut self) {
        self.0.take().unwrap().uninstall().unwrap();
        self.1 = PathBuf::new();
    }

    /// Drops the loader's handles without removing anything (a loader that exits).
    pub fn exit(mut self) -> PathBuf {
        drop(self.0.take());
        std::mem::replace(&mut self.1, PathBuf::new())
    }
}

impl Deref for Capture {
    type Target = Redirect;
    fn deref(&self) -> &Redirect {
        self.0.as_ref().unwrap()
    }
}

impl DerefMut for Capture {
    fn deref_mut(&mut self) -> &mut Redirect {
        self.0.as_mut().unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        drop(self.0.take());
        if !self.1.as_os_str().is_empty() {
            let _ = redirect_ebpf::uninstall(&self.1);
        }
    }
}

/// `bpftool -j <args>` as JSON; None if bpftool fails (e.g. no object with that id).
pub fn bpftool(args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The (link id, program id) of the link pinned at `pin`.
pub fn pinned_link(pin: &std::path::Path) -> (u64, u64) {
    let link = bpftool(&["link", "show", "pinned", pin.to_str().unwrap()])
        .unwrap_or_else(|| panic!("no link pinned at {}", pin.display()));
    (
        link["id"].as_u64().unwrap(),
        link["prog_id"].as_u64().unwrap(),
    )
}

/// Every pinned file under `dir`, recursively.
pub fn pins_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// What `getsockopt(SOL_IP, SO_ORIGINAL_DST)` answers on an accepted socket: the tunnel's call.
pub fn so_original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    // SAFETY: sockaddr_in is plain data; the kernel (or the program) fills at most `len` bytes.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            80,
            (&mut sa as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let ip = std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
    Ok(SocketAddr::from((ip, u16::from_be(sa.sin_port))))
}
