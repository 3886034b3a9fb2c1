//! The capture binary's refusals: one message naming what is missing.

use std::process::Command;

#[test]
fn without_root_it_stops_with_one_message_naming_what_is_missing() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test drops privileges with setpriv and must start as root"
    );
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_weft-redirect"))
        .args(["run", "--enroll", "/run/netns/none"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("capture needs root"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one message: {stderr}");
}

#[test]
fn a_namespace_that_does_not_exist_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_weft-redirect"))
        .args(["run", "--enroll", "/run/netns/weft-no-such-pod"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/run/netns/weft-no-such-pod"), "{stderr}");
}

#[test]
fn a_pin_directory_off_the_bpf_file_system_is_refused_before_anything_is_loaded() {
    let dir = std::env::temp_dir().join(format!("weft-pins-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_weft-redirect"))
        .args(["run", "--enroll", "/proc/self/ns/net", "--pin-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not on a BPF file system") && stderr.contains("mount -t bpf"),
        "{stderr}"
    );
    assert!(!dir.exists(), "nothing created off bpffs");
}

#[test]
fn uninstall_refuses_a_directory_that_is_not_a_pin_directory() {
    let out = Command::new(env!("CARGO_BIN_EXE_weft-redirect"))
        .args(["uninstall", "--pin-dir", "/tmp"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not a Weft capture pin directory"),
        "{stderr}"
    );
    assert!(std::path::Path::new("/tmp").is_dir());
}
