//! Finding the cgroup v2 hierarchy (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`) and the BPF
//! file system (`/sys/fs/bpf`) at run time, from `/proc/self/mountinfo`.

use std::path::{Path, PathBuf};

use crate::RedirectError;

/// The mount point of the cgroup v2 hierarchy.
pub fn cgroup2_mount() -> Result<PathBuf, RedirectError> {
    find_mount(&mountinfo()?, "cgroup2").ok_or(RedirectError::NoCgroup2)
}

/// The mount point of the BPF file system, where capture pins its programs and maps.
pub fn bpffs_mount() -> Result<PathBuf, RedirectError> {
    find_mount(&mountinfo()?, "bpf").ok_or(RedirectError::NoBpffs)
}

/// Whether `path` lies on a BPF file system (pins can only live there).
pub(crate) fn on_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

fn mountinfo() -> Result<String, RedirectError> {
    std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| RedirectError::Cgroup {
        path: "/proc/self/mountinfo".into(),
        source,
    })
}

/// The mount point of the first file system of type `fstype` in a mountinfo text.
fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options ... - fstype source options
        let (left, right) = line.split_once(" - ")?;
        let kind = right.split_whitespace().next()?;
        (kind == fstype).then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_hierarchy_and_bpffs_in_a_hybrid_layout() {
        let text = "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n35 30 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n40 25 0:33 / /sys/fs/bpf rw - bpf bpf rw,mode=700\n";
        assert_eq!(
            find_mount(text, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount(text, "bpf"), Some(PathBuf::from("/sys/fs/bpf")));
        assert_eq!(
            find_mount(
                "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n",
                "cgroup2"
            ),
            None
        );
    }
}
