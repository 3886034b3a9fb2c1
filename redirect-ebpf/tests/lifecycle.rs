//! Capture outlives its loader: links and maps pinned on the BPF file system, a new loader
//! taking over in place, uninstall leaving nothing, incompatible pins refused. Checked with
//! bpftool on the real kernel. Needs root.

mod common;

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Capture, Netns, bpftool, pinned_link, pins_under, test_pin_dir};
use redirect_ebpf::{Exclusions, OUTBOUND_PORT, Options, Redirect, cgroup2_mount};

/// A captured connect from inside the pod: where it landed, or why it failed.
fn dial() -> Result<SocketAddr, ErrorKind> {
    let dst: SocketAddr = "10.99.0.1:80".parse().unwrap();
    let stream = TcpStream::connect_timeout(&dst, Duration::from_secs(2)).map_err(|e| e.kind())?;
    stream.peer_addr().map_err(|e| e.kind())
}

/// The pinned links under `dir` with their (link id, program id), by pin.
fn links(dir: &std::path::Path) -> Vec<(std::path::PathBuf, (u64, u64))> {
    pins_under(dir)
        .into_iter()
        .filter(|p| p.starts_with(dir.join("links")))
        .map(|p| {
            let ids = pinned_link(&p);
            (p, ids)
        })
        .collect()
}

/// Waits until bpftool no longer finds `kind` `id` (the kernel frees objects asynchronously).
fn gone(kind: &str, id: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if bpftool(&[kind, "show", "id", &id.to_string()]).is_none() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn a_restarted_loader_takes_over_in_place_without_a_gap_or_a_second_attachment() {
    let pod = Netns::new("r");
    let mut first = Capture::install(Options::default());
    let cookie = first.enroll(pod.file(), &Exclusions::default()).unwrap();
    let listener = pod.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let before = links(first.dir());
    assert_eq!(
        before.len(),
        6,
        "five cgroup links and the pod's inbound link: {before:?}"
    );

    // An application connecting all along: every connect must be captured.
    let stop = Arc::new(AtomicBool::new(false));
    let dialer = {
        let stop = stop.clone();
        pod.spawn(move || {
            let (mut captured, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match dial() {
                    Ok(peer) if peer.port() == OUTBOUND_PORT => captured += 1,
                    other => failed.push(other),
                }
            }
            (captured, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    // The loader exits (its descriptors close), stays away a while, and a new one starts.
    let dir = first.exit();
    std::thread::sleep(Duration::from_millis(300));
    let second = Capture::install_in(dir, Options::default());
    assert!(second.adopted(), "the second loader takes over the pins");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (captured, failed) = dialer.join().unwrap();
    assert!(failed.is_empty(), "connects not captured: {failed:?}");
    assert!(captured > 50, "only {captured} connects in 700 ms");
    assert_eq!(
        second.enrolled(),
        vec![cookie],
        "enrollment survives the restart"
    );

    // The same links now run new programs; the old programs are gone, so nothing is attached
    // twice; the cgroup holds exactly one program per capture hook from this pin directory.
    let after = links(second.dir());
    assert_eq!(after.len(), before.len());
    for ((pin, (link, old_prog)), (pin_after, (link_after, new_prog))) in before.iter().zip(&after)
    {
        assert_eq!((pin, link), (pin_after, link_after), "same link, adopted");
        assert_ne!(old_prog, new_prog, "{} runs the new program", pin.display());
        assert!(
            gone("prog", *old_prog),
            "old program {old_prog} still loaded"
        );
    }
    let cgroup = bpftool(&["cgroup", "show", cgroup2_mount().unwrap().to_str().unwrap()]).unwrap();
    let ours: Vec<u64> = after.iter().map(|(_, (_, prog))| *prog).collect();
    let attached = cgroup
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| ours.contains(&entry["id"].as_u64().unwrap()))
        .count();
    assert_eq!(attached, 5, "one attachment per cgroup program: {cgroup}");
}

#[test]
fn uninstall_removes_every_program_link_map_and_pin() {
    let pod = Netns::new("u");
    let mut capture = Capture::install(Options {
        fast_path: true,
        ..Options::default()
    });
    capture.enroll(pod.file(), &Exclusions::default()).unwrap();
    let dir = capture.dir().to_owned();
    let listener = pod.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    assert_eq!(pod.run(dial).map(|p| p.port()), Ok(OUTBOUND_PORT));

    let pinned_links = links(&dir);
    assert_eq!(
        pinned_links.len(),
        7,
        "cgroup links, fast path, inbound: {pinned_links:?}"
    );
    let maps: Vec<u64> = pins_under(&dir.join("maps"))
        .iter()
        .map(|p| {
            bpftool(&["map", "show", "pinned", p.to_str().unwrap()]).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(maps.len(), 8);

    // A socket on the fast path holds its sk_msg program until it closes.
    drop(listener);
    capture.uninstall();
    assert!(!dir.exists(), "pin directory removed");
    for (pin, (link, prog)) in &pinned_links {
        assert!(
            gone("link", *link),
            "link {link} ({}) still exists",
            pin.display()
        );
        assert!(
            gone("prog", *prog),
            "program {prog} ({}) still loaded",
            pin.display()
        );
    }
    for map in &maps {
        assert!(gone("map", *map), "map {map} still exists");
    }
    // Nothing captures the pod any more: the connect goes where it was aimed (no route).
    assert_eq!(pod.run(dial), Err(ErrorKind::NetworkUnreachable));
}

#[test]
fn pinned_maps_of_another_layout_are_refused_and_kept() {
    let dir = test_pin_dir();
    std::fs::create_dir_all(dir.join("maps")).unwrap();
    let map = dir.join("maps/ENROLLED");
    let created = std::process::Command::new("bpftool")
        .args([
            "map",
            "create",
            map.to_str().unwrap(),
            "type",
            "hash",
            "key",
            "8",
            "value",
            "4",
        ])
        .args(["entries", "16", "name", "ENROLLED"])
        .status()
        .unwrap();
    assert!(created.success());
    let options = Options {
        pin_dir: Some(dir.clone()),
        ..Options::default()
    };
    let error = Redirect::install(&cgroup2_mount().unwrap(), &options)
        .err()
        .expect("an incompatible pinned map is refused")
        .to_string();
    assert!(
        error.contains(map.to_str().unwrap()) && error.contains("incompatible Weft"),
        "{error}"
    );
    assert!(map.exists(), "what was found is left alone");
    std::fs::remove_dir_all(&dir).unwrap();
}
