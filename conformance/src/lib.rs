//! Weft's conformance harness: simulated nodes and pods built from network namespaces and
//! veth pairs on one machine, running the real binaries, plus the helpers end-to-end cases and
//! `weft-bench` share. Everything here needs root.

pub mod agents;
pub mod bench;
pub mod capture;
pub mod cluster;
pub mod examples;
pub mod hbone_client;
pub mod load;
pub mod mesh_ca;
pub mod metrics;
pub mod netns;
pub mod node_pod;
pub mod pattern;
pub mod pcap;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod rehearsal;
pub mod tour;

pub use cluster::{Cluster, ClusterSpec, Node, Pod, PodSpec};

/// Fails loudly (never skips) when not root: the harness creates namespaces and links.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the conformance harness builds network namespaces and must run as root (CI does); try: sudo -E cargo nextest run"
    );
}

/// Folder of the workspace's built binaries (`ztunnel`, `weft-testapp`): `WEFT_BIN_DIR`, or
/// the target folder of the running test or benchmark.
pub fn bin_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("WEFT_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().expect("the path of the running executable");
    let mut dir = exe
        .parent()
        .expect("executable has a parent folder")
        .to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary, with a clear message when it has not been built.
pub fn binary(name: &str) -> std::path::PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}
