//! Why capture could not be set up or changed.

use std::path::PathBuf;

/// Errors of the capture loader, each saying what to fix.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(
        "a pod can exclude at most 8 ports and 4 address ranges from capture; got {ports} ports and {cidrs} ranges"
    )]
    TooManyExclusions { ports: usize, cidrs: usize },
    #[error("{0} is not an address range (prefix length 0 to 32 for IPv4, 0 to 128 for IPv6)")]
    BadCidr(String),
    #[error(
        "capture needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN): run the agent as root or grant the capabilities"
    )]
    Privileges,
    #[error(
        "kernel {release} is too old for capture: Weft needs Linux 5.15 or newer (netns cookies in sockops and sk_msg)"
    )]
    Kernel { release: String },
    #[error(
        "cannot load the capture programs (needs root or CAP_BPF + CAP_NET_ADMIN, and a 5.15+ kernel): {0}"
    )]
    Load(#[source] aya::EbpfError),
    #[error("capture program or map {0} is missing from the embedded object (a build problem)")]
    Missing(&'static str),
    #[error("cannot load or attach a capture program: {0}")]
    Program(#[source] aya::programs::ProgramError),
    #[error("cannot use a capture map: {0}")]
    Map(#[source] aya::maps::MapError),
    #[error(
        "cannot open the cgroup {path}: {source}; is cgroup v2 mounted (look for a cgroup2 line in /proc/self/mountinfo)?"
    )]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no cgroup v2 hierarchy is mounted; Weft needs cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup/unified)"
    )]
    NoCgroup2,
    #[error("refused an inbound listener for {ip}: {reason}")]
    BadListener {
        ip: std::net::IpAddr,
        reason: String,
    },
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no BPF file system is mounted; capture pins its programs there (mount -t bpf bpf /sys/fs/bpf)"
    )]
    NoBpffs,
    #[error(
        "{path} is not on a BPF file system; pin capture under a bpffs mount such as /sys/fs/bpf/weft (mount -t bpf bpf /sys/fs/bpf)"
    )]
    NotBpffs { path: PathBuf },
    #[error(
        "{path} is not a Weft capture pin directory (no maps/ or links/ in it); refusing to remove it"
    )]
    NotAPinDir { path: PathBuf },
    #[error("cannot pin or unpin {path}: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {action} the {what} link: {source}")]
    Link {
        action: &'static str,
        what: String,
        source: std::io::Error,
    },
    #[error(
        "the map pinned at {path} has another layout than this build's {name} ({found} vs {wanted}: type, key, value, entries): it was pinned by an incompatible Weft; remove it with `weft-redirect uninstall` (capture stops until the next install)"
    )]
    IncompatiblePin {
        path: PathBuf,
        name: &'static str,
        found: String,
        wanted: String,
    },
    #[error("the embedded capture object does not parse (a build problem): {0}")]
    Object(String),
}
