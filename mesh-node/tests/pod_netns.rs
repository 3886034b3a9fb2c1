//! Finding a pod's network namespace by its UID on the real kernel: a real process in a real
//! network namespace, placed in a cgroup named as the kubelet names pod cgroups.

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use mesh_node::pod_netns::find_pod_netns;

#[test]
fn a_process_in_the_pods_cgroup_leads_to_the_pods_namespace() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (namespaces, cgroups)"
    );
    let uid = format!(
        "0000{:04x}-8a9b-4c7d-9e0f-123456789abc",
        std::process::id() % 0xffff
    );
    let netns = format!("wfpod{}", std::process::id());
    let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
    ok(Command::new("ip").args(["netns", "add", &netns]));
    let root = redirect_ebpf::cgroup2_mount().unwrap();
    let cgroup = root.join(format!("kubepods-test-{}/pod{uid}", std::process::id()));
    std::fs::create_dir_all(&cgroup).unwrap();

    assert_eq!(
        find_pod_netns(std::path::Path::new("/proc"), &uid),
        None,
        "no process yet"
    );
    // The pod's "container": joins the pod cgroup, then runs inside the namespace.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {netns} sleep 30",
            cgroup.display()
        ))
        .spawn()
        .unwrap();
    let found = (0..100).find_map(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let path = find_pod_netns(std::path::Path::new("/proc"), &uid)?;
        let ino = std::fs::metadata(&path).ok()?.ino();
        (ino == std::fs::metadata(format!("/run/netns/{netns}")).ok()?.ino()).then_some(path)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir(&cgroup);
    let _ = std::fs::remove_dir(cgroup.parent().unwrap());
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    let found = found.expect("the pod's namespace is found by its UID");
    assert!(found.ends_with("ns/net"), "{}", found.display());
}
