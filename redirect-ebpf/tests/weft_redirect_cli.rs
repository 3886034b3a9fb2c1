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
        .args(["--enroll", "/run/netns/none"])
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
        .args(["--enroll", "/run/netns/weft-no-such-pod"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/run/netns/weft-no-such-pod"), "{stderr}");
}
