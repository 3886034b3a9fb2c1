//! Finding the cgroup v2 hierarchy at run time (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).

use std::path::PathBuf;

use crate::RedirectError;

/// The mount point of the cgroup v2 hierarchy, read from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, RedirectError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
        RedirectError::Cgroup {
            path: "/proc/self/mountinfo".into(),
            source,
        }
    })?;
    find_cgroup2(&mountinfo).ok_or(RedirectError::NoCgroup2)
}

/// The mount point of the first `cgroup2` file system in a mountinfo text.
fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options ... - fstype source options
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_hierarchy_in_a_hybrid_layout() {
        let text = "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n35 30 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_cgroup2("30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
            None
        );
    }
}
