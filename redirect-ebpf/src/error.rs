//! Why capture could not be set up or changed.

use std::path::PathBuf;

/// Errors of the capture loader, each saying what to fix.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(
        "a pod can exclude at most 8 ports and 4 IPv4 ranges from capture; got {ports} ports and {cidrs} ranges"
    )]
    TooManyExclusions { ports: usize, cidrs: usize },
    #[error("{0} is not an IPv4 range (prefix length 0 to 32)")]
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
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
}
