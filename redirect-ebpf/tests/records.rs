//! How many captured connections can wait for the tunnel to ask their original destination
//! before a record is lost, on the real kernel. The records by client address live in an LRU
//! map of 65,536 entries that are not removed when read: after a busy spell that filled it,
//! the kernel's LRU still evicts the records already asked before those waiting, so 64,000
//! connections (all the local ports one client address has) wait without a loss.

use std::net::{SocketAddr, TcpListener, TcpStream};

use std::time::{Duration, Instant};

mod common;

use common::{Capture, Netns, so_original_dst};
use redirect_ebpf::{Exclusions, OUTBOUND_PORT, Options};

/// Opens `n` captured connections from the pod in batches, accepts each, asks its original
/// destination if `ask`, and closes both ends with a reset (no TIME_WAIT, so local ports are
/// reused); returns the clients' addresses in the order they connected.
fn connections(pod: &Netns, listener: &TcpListener, n: usize, ask: bool) -> Vec<SocketAddr> {
    // Within the listen backlog: nothing accepts while a batch connects.
    const BATCH: usize = 100;
    let dst: SocketAddr = "10.99.0.1:80".parse().unwrap();
    let mut clients_seen = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let batch = left.min(BATCH);
        left -= batch;
        let clients = pod.run(move || {
            (0..batch)
                .map(|_| TcpStream::connect_timeout(&dst, Duration::from_secs(2)).unwrap())
                .collect::<Vec<_>>()
        });
        for client in clients {
            let (accepted, peer) = listener.accept().unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            if ask {
                assert!(
                    so_original_dst(&accepted).is_ok(),
                    "an asked connection was answered"
                );
            }
            for stream in [client, accepted] {
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
            clients_seen.push(peer);
        }
    }
    clients_seen
}

#[test]
fn sixty_four_thousand_connections_wait_for_their_destination_after_more_were_asked() {
    let pod = Netns::new("rec");
    let mut redirect = Capture::install(Options::default());
    redirect.enroll(pod.file(), &Exclusions::default()).unwrap();
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.0, "sysctl", "-qw"])
        .arg("net.ipv4.ip_local_port_range=1024 65535")
        .status()
        .unwrap();
    assert!(status.success());
    let listener = pod.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    let netns = redirect_ebpf::netns_cookie(&pod.path()).unwrap();

    // A busy node: 70,000 connections, each asked once by the tunnel (more than the map holds:
    // records not removed when read would fill it and make room by eviction).
    let started = Instant::now();
    connections(&pod, &listener, 70_000, true);
    let churn = started.elapsed();

    // Then 64,000 connections accepted and not asked yet (the tunnel is slow; as many as one
    // client address has ports for): every record is still there, the oldest included.
    let n = 64_000;
    let waiting = connections(&pod, &listener, n, false);
    let lost: Vec<usize> = waiting
        .iter()
        .enumerate()
        .filter(|(_, client)| {
            redirect
                .original_destination(netns, **client)
                .unwrap()
                .is_none()
        })
        .map(|(i, _)| i)
        .collect();
    eprintln!(
        "70,000 connections asked in {churn:?}; of {n} waiting, {} lost their record (first: {:?})",
        lost.len(),
        lost.first()
    );
    assert!(
        lost.is_empty(),
        "records of waiting connections were evicted"
    );
}
