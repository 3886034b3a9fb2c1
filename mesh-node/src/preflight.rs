//! `mesh-node preflight`: what a node must have before capture can run, checked from plain
//! facts (the kernel release, what file system is mounted where capture will look, whether BPF
//! type information exists) so that a node that cannot run Weft says so in one line per
//! problem instead of failing later with a loader error.

use std::path::{Path, PathBuf};

use redirect_ebpf::{MIN_KERNEL, kernel_version};

/// What preflight reads off the node.
#[derive(Clone, Debug)]
pub struct NodeFacts {
    /// `uname -r`.
    pub kernel_release: String,
    /// The cgroup capture attaches to, and whether a cgroup v2 hierarchy is mounted there.
    pub cgroup: (PathBuf, bool),
    /// Where capture pins, and whether a BPF file system is mounted there.
    pub bpffs: (PathBuf, bool),
    /// Whether the kernel's BPF type information (`/sys/kernel/btf/vmlinux`) exists.
    pub btf: bool,
}

impl NodeFacts {
    /// Reads the facts of this machine for capture attached at `cgroup` and pinned under
    /// `bpffs`.
    pub fn read(cgroup: &Path, bpffs: &Path, btf: &Path) -> NodeFacts {
        use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, statfs};
        let is = |path: &Path, magic| {
            statfs(path)
                .map(|fs| fs.filesystem_type() == magic)
                .unwrap_or(false)
        };
        NodeFacts {
            kernel_release: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            cgroup: (cgroup.to_owned(), is(cgroup, CGROUP2_SUPER_MAGIC)),
            bpffs: (bpffs.to_owned(), is(bpffs, BPF_FS_MAGIC)),
            btf: btf.exists(),
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// True when capture cannot run on this node.
    pub blocking: bool,
    pub text: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = if self.blocking { "problem" } else { "ok" };
        write!(f, "{tag}: {}", self.text)
    }
}

/// Every check, in order; the node can run capture when none is blocking.
pub fn check(facts: &NodeFacts) -> Vec<Finding> {
    let (major, minor) = MIN_KERNEL;
    let kernel = match kernel_version(&facts.kernel_release) {
        Some(version) if version >= MIN_KERNEL => Finding {
            blocking: false,
            text: format!("kernel {}", facts.kernel_release),
        },
        _ => Finding {
            blocking: true,
            text: format!(
                "kernel {:?} is too old: capture needs Linux {major}.{minor} or newer (netns cookies in sockops and sk_msg)",
                facts.kernel_release
            ),
        },
    };
    let (cgroup_path, cgroup_v2) = &facts.cgroup;
    let cgroup = if *cgroup_v2 {
        Finding {
            blocking: false,
            text: format!("cgroup v2 at {}", cgroup_path.display()),
        }
    } else {
        Finding {
            blocking: true,
            text: format!(
                "{} is not a cgroup v2 hierarchy: capture attaches to cgroup v2 (boot the node with systemd.unified_cgroup_hierarchy=1, and mount the host's /sys/fs/cgroup there)",
                cgroup_path.display()
            ),
        }
    };
    let (bpffs_path, bpffs_mounted) = &facts.bpffs;
    let bpffs = if *bpffs_mounted {
        Finding {
            blocking: false,
            text: format!("BPF file system at {}", bpffs_path.display()),
        }
    } else {
        Finding {
            blocking: true,
            text: format!(
                "no BPF file system at {}: capture pins its programs there so that they outlive the agent (mount -t bpf bpf /sys/fs/bpf on the node, and mount it into the pod)",
                bpffs_path.display()
            ),
        }
    };
    let btf = if facts.btf {
        Finding {
            blocking: false,
            text: "BPF type information at /sys/kernel/btf/vmlinux".to_owned(),
        }
    } else {
        // Capture's programs read only their context and helpers' results: no CO-RE
        // relocation needs the kernel's types. Said, so that a later program that does need
        // them is not a surprise on such a node.
        Finding {
            blocking: false,
            text: "no BPF type information (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF): today's capture programs do not need it".to_owned(),
        }
    };
    vec![kernel, cgroup, bpffs, btf]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(kernel: &str, cgroup_v2: bool, bpffs: bool, btf: bool) -> NodeFacts {
        NodeFacts {
            kernel_release: kernel.to_owned(),
            cgroup: ("/host/sys/fs/cgroup".into(), cgroup_v2),
            bpffs: ("/sys/fs/bpf".into(), bpffs),
            btf,
        }
    }

    fn blocking(findings: &[Finding]) -> Vec<&str> {
        findings
            .iter()
            .filter(|f| f.blocking)
            .map(|f| f.text.as_str())
            .collect()
    }

    #[test]
    fn a_node_with_everything_passes_and_says_what_it_found() {
        let found = check(&facts("6.1.0-18-amd64", true, true, true));
        assert!(blocking(&found).is_empty(), "{found:?}");
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert!(text.contains(&"ok: cgroup v2 at /host/sys/fs/cgroup".to_owned()));
        assert!(text.contains(&"ok: BPF file system at /sys/fs/bpf".to_owned()));
    }

    #[test]
    fn each_missing_piece_is_named() {
        let found = check(&facts("6.1.0", false, true, true));
        assert_eq!(blocking(&found).len(), 1);
        assert!(blocking(&found)[0].starts_with("/host/sys/fs/cgroup is not a cgroup v2"));

        let found = check(&facts("6.1.0", true, false, true));
        assert_eq!(blocking(&found).len(), 1);
        assert!(blocking(&found)[0].starts_with("no BPF file system at /sys/fs/bpf"));

        let found = check(&facts("5.10.0-28-amd64", true, true, true));
        assert_eq!(blocking(&found).len(), 1);
        assert!(blocking(&found)[0].contains("5.10.0-28-amd64"));
        assert!(blocking(&found)[0].contains("5.15"));
    }

    #[test]
    fn missing_type_information_is_reported_without_blocking() {
        let found = check(&facts("6.1.0", true, true, false));
        assert!(blocking(&found).is_empty());
        assert!(
            found
                .iter()
                .any(|f| f.text.starts_with("no BPF type information"))
        );
    }

    #[test]
    fn reads_this_machine() {
        // Whatever this machine has, a plain folder is neither a cgroup nor a BPF file system.
        let dir = std::env::temp_dir();
        let facts = NodeFacts::read(&dir, &dir, Path::new("/nonexistent"));
        assert!(!facts.cgroup.1 && !facts.bpffs.1 && !facts.btf);
        assert_eq!(blocking(&check(&facts)).len(), 2);
    }
}
