//! Finding a pod's network namespace on a real node, by its UID, as CNI node agents do: the
//! kubelet puts every container of the pod in a cgroup named after the pod UID
//! (`.../kubepods-besteffort-pod<uid with underscores>.slice/...` with the systemd driver,
//! `.../kubepods/besteffort/pod<uid>/...` with cgroupfs), so any process whose
//! `/proc/<pid>/cgroup` names it lives in the pod, and `/proc/<pid>/ns/net` is the pod's
//! namespace.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `/proc/<pid>/ns/net` of a process of the pod with `uid`, under `proc_root` (normally
/// `/proc`); none while the pod has no running process.
pub fn find_pod_netns(proc_root: &Path, uid: &str) -> Option<PathBuf> {
    PodNamespaces::scan(proc_root).get(uid).cloned()
}

/// One scan of `/proc`: pod UID -> the namespace of its first (lowest pid) process.
#[derive(Debug, Default)]
pub struct PodNamespaces(HashMap<String, PathBuf>);

impl PodNamespaces {
    pub fn scan(proc_root: &Path) -> Self {
        let mut pids: Vec<u32> = std::fs::read_dir(proc_root)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        let mut found = HashMap::new();
        for pid in pids {
            let dir = proc_root.join(pid.to_string());
            let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
                continue;
            };
            if let Some(uid) = cgroup.lines().find_map(pod_uid) {
                found.entry(uid).or_insert_with(|| dir.join("ns/net"));
            }
        }
        PodNamespaces(found)
    }

    pub fn get(&self, uid: &str) -> Option<&PathBuf> {
        self.0.get(uid)
    }
}

/// The pod UID a `/proc/<pid>/cgroup` line names, with either kubelet cgroup driver.
fn pod_uid(line: &str) -> Option<String> {
    line.split('/').find_map(|part| {
        if let Some(slice) = part.strip_suffix(".slice") {
            // systemd: kubepods-<qos>-pod<uid_with_underscores>.slice or kubepods-pod<uid>.slice
            let (_, uid) = slice.rsplit_once("-pod")?;
            return (uid.len() == 36).then(|| uid.replace('_', "-"));
        }
        // cgroupfs: pod<uid>
        let uid = part.strip_prefix("pod")?;
        (uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
            .then(|| uid.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_both_kubelet_cgroup_drivers() {
        let uid = "5f1c3c2e-8a9b-4c7d-9e0f-123456789abc";
        let found = |line: &str| pod_uid(line);
        assert_eq!(
            found("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5f1c3c2e_8a9b_4c7d_9e0f_123456789abc.slice/cri-containerd-ab12.scope").as_deref(),
            Some(uid)
        );
        assert_eq!(
            found("0::/kubepods.slice/kubepods-pod5f1c3c2e_8a9b_4c7d_9e0f_123456789abc.slice/cri-containerd-ab12.scope").as_deref(),
            Some(uid)
        );
        assert_eq!(
            found("0::/kubepods/burstable/pod5f1c3c2e-8a9b-4c7d-9e0f-123456789abc/ab12").as_deref(),
            Some(uid)
        );
        assert_eq!(found("0::/system.slice/containerd.service"), None);
        assert_eq!(found("0::/kubepods.slice/kubepods-besteffort.slice"), None);
    }
}
