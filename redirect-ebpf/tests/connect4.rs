//! The connect4 program on the real kernel: an enrolled namespace's TCP connects land on the
//! tunnel's outbound port with their original destination recorded; nothing else changes.
//! Needs root (CI runs as root); fails loudly without it.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use std::time::Duration;

mod common;

use common::{Capture, Netns, so_original_dst};
use redirect_ebpf::{Exclusions, OUTBOUND_PORT, Options, cgroup2_mount, netns_cookie};

/// Connects to a destination with no route; the client's local address when captured.
fn connect(marked: bool) -> Result<SocketAddr, ErrorKind> {
    let dst: SocketAddr = "10.99.0.1:80".parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if marked {
        socket.set_mark(0x539).unwrap();
    }
    socket
        .connect_timeout(&dst.into(), Duration::from_secs(2))
        .map_err(|e| e.kind())?;
    let stream: TcpStream = socket.into();
    Ok(stream.local_addr().unwrap())
}

#[test]
fn captures_enrolled_namespaces_only_and_records_the_original_destination() {
    let enrolled = Netns::new("e");
    let plain = Netns::new("p");
    let mut redirect = Capture::install(Options::default());
    redirect
        .enroll(enrolled.file(), &Exclusions::default())
        .unwrap();

    // The tunnel's outbound listener inside the enrolled pod.
    let listener = enrolled.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    let client = enrolled
        .run(|| connect(false))
        .expect("an enrolled connect is captured");
    let (accepted, peer) = listener.accept().unwrap();
    assert_eq!(accepted.local_addr().unwrap().port(), OUTBOUND_PORT);
    assert_eq!(peer, client);
    let netns = netns_cookie(&enrolled.path()).unwrap();
    let other = netns_cookie(&plain.path()).unwrap();
    let want: SocketAddr = "10.99.0.1:80".parse().unwrap();
    assert_eq!(
        redirect.original_destination(netns, peer).unwrap(),
        Some(want)
    );
    assert_eq!(
        redirect.original_destination(other, peer).unwrap(),
        None,
        "keyed by namespace too"
    );
    assert_eq!(
        redirect.fast_path_sockets(netns),
        0,
        "the fast path is off unless asked for"
    );

    // The tunnel's own (marked) sockets, other namespaces, and unenrolled pods are untouched:
    // with no route to 10.99.0.1 their connects fail at once.
    assert_eq!(
        enrolled.run(|| connect(true)),
        Err(ErrorKind::NetworkUnreachable)
    );
    assert_eq!(
        plain.run(|| connect(false)),
        Err(ErrorKind::NetworkUnreachable)
    );
    redirect
        .unenroll(netns_cookie(&enrolled.path()).unwrap())
        .unwrap();
    assert_eq!(
        enrolled.run(|| connect(false)),
        Err(ErrorKind::NetworkUnreachable)
    );
}

#[test]
fn the_accepted_socket_answers_so_original_dst_per_pod() {
    // Two enrolled pods whose clients may use the same 127.0.0.1 address and port: each
    // accepted socket must get its own pod's original destination.
    let a = Netns::new("a");
    let b = Netns::new("b");
    let mut redirect = Capture::install(Options::default());
    for ns in [&a, &b] {
        redirect.enroll(ns.file(), &Exclusions::default()).unwrap();
    }
    let listener_a = a.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    let listener_b = b.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    let dial = |dst: &'static str| {
        move || {
            let dst: SocketAddr = dst.parse().unwrap();
            TcpStream::connect_timeout(&dst, Duration::from_secs(2)).unwrap()
        }
    };
    let _client_a = a.run(dial("10.99.0.1:80"));
    let _client_b = b.run(dial("10.98.0.7:8443"));
    let (accepted_a, _) = listener_a.accept().unwrap();
    let (accepted_b, _) = listener_b.accept().unwrap();
    assert_eq!(
        so_original_dst(&accepted_a).unwrap(),
        "10.99.0.1:80".parse().unwrap()
    );
    assert_eq!(
        so_original_dst(&accepted_b).unwrap(),
        "10.98.0.7:8443".parse().unwrap()
    );

    // A connection that was not captured has no original destination: the kernel's own error.
    let direct = a.run(|| TcpStream::connect(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    let (accepted, _) = listener_a.accept().unwrap();
    assert!(so_original_dst(&accepted).is_err());
    drop(direct);
}

fn so_original_dst6(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    // SAFETY: sockaddr_in6 is plain data; the kernel (or the program) fills at most `len` bytes.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IPV6,
            80,
            (&mut sa as *mut libc::sockaddr_in6).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(SocketAddr::from((
        std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr),
        u16::from_be(sa.sin6_port),
    )))
}

#[test]
fn ipv6_connects_are_captured_to_the_ipv6_loopback_listener() {
    let enrolled = Netns::new("6");
    let mut redirect = Capture::install(Options::default());
    redirect
        .enroll(enrolled.file(), &Exclusions::default())
        .unwrap();
    let listener = enrolled.run(|| TcpListener::bind(("::1", OUTBOUND_PORT)).unwrap());
    let client = enrolled.run(|| {
        let dst: SocketAddr = "[fd00:99::1]:8443".parse().unwrap();
        TcpStream::connect_timeout(&dst, Duration::from_secs(2)).map(|s| s.local_addr().unwrap())
    });
    let client = client.expect("an enrolled IPv6 connect is captured");
    let (accepted, peer) = listener.accept().unwrap();
    assert_eq!(peer, client);
    let want: SocketAddr = "[fd00:99::1]:8443".parse().unwrap();
    assert_eq!(so_original_dst6(&accepted).unwrap(), want);
    let netns = netns_cookie(&enrolled.path()).unwrap();
    assert_eq!(
        redirect.original_destination(netns, peer).unwrap(),
        Some(want)
    );
}

/// A read on a blocking socket that retries `EAGAIN`: with the fast path, this kernel's
/// `tcp_bpf_recvmsg` sometimes returns `EAGAIN` on a *blocking* socket (seen about one run in
/// five under load). Non-blocking sockets (the tunnel) just wait for readiness; blocking
/// applications would see the error, which is one reason the fast path is off by default.
fn read_retrying(s: &mut TcpStream, buf: &mut [u8]) -> usize {
    use std::io::Read;
    loop {
        match s.read(buf) {
            Ok(n) => return n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

#[test]
fn with_the_fast_path_bytes_flow_both_ways_intact() {
    use std::io::Write;
    let enrolled = Netns::new("f");
    let options = Options {
        fast_path: true,
        ..Options::default()
    };
    let mut redirect = Capture::install(options);
    redirect
        .enroll(enrolled.file(), &Exclusions::default())
        .unwrap();
    let listener = enrolled.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    // The "tunnel": echoes everything back, in 64 KiB reads.
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            let n = read_retrying(&mut s, &mut buf);
            if n == 0 {
                return total;
            }
            s.write_all(&buf[..n]).unwrap();
            total += n;
        }
    });
    let sent: Vec<u8> = (0..(32u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let expected = sent.clone();
    let mut s = enrolled.run(|| {
        let dst: SocketAddr = "10.99.0.1:80".parse().unwrap();
        TcpStream::connect_timeout(&dst, Duration::from_secs(2)).unwrap()
    });
    std::thread::sleep(Duration::from_millis(100));
    let netns = netns_cookie(&enrolled.path()).unwrap();
    assert_eq!(
        redirect.fast_path_sockets(netns),
        2,
        "both ends of the leg are on the fast path"
    );
    let received = {
        let mut reader = s.try_clone().unwrap();
        let reading = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match read_retrying(&mut reader, &mut buf) {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        s.write_all(&sent).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        reading.join().unwrap()
    };
    assert_eq!(echo.join().unwrap(), expected.len());
    assert!(
        received == expected,
        "32 MiB echoed through the fast path arrived altered"
    );
}

#[test]
fn excluded_ports_and_ranges_are_left_alone() {
    let enrolled = Netns::new("x");
    let mut redirect = Capture::install(Options::default());
    let exclusions = redirect_ebpf::Exclusions {
        ports: vec![5432],
        cidrs: vec![
            ("10.77.0.0".parse().unwrap(), 16),
            ("fd99:77::".parse().unwrap(), 32),
        ],
    };
    redirect.enroll(enrolled.file(), &exclusions).unwrap();
    let _listener = enrolled.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    let _listener6 = enrolled.run(|| TcpListener::bind(("::1", OUTBOUND_PORT)).unwrap());
    let dial = |dst: &'static str| {
        move || {
            let dst: SocketAddr = dst.parse().unwrap();
            TcpStream::connect_timeout(&dst, Duration::from_secs(2))
                .map(|_| ())
                .map_err(|e| e.kind())
        }
    };
    assert_eq!(enrolled.run(dial("10.99.0.1:80")), Ok(()), "captured");
    assert_eq!(
        enrolled.run(dial("10.99.0.1:5432")),
        Err(ErrorKind::NetworkUnreachable),
        "excluded port"
    );
    assert_eq!(
        enrolled.run(dial("10.77.3.4:80")),
        Err(ErrorKind::NetworkUnreachable),
        "excluded range"
    );
    assert_eq!(
        enrolled.run(dial("10.78.0.1:80")),
        Ok(()),
        "just outside the range: captured"
    );
    assert_eq!(
        enrolled.run(dial("[fd99:77:1::5]:80")),
        Err(ErrorKind::NetworkUnreachable),
        "excluded IPv6 range"
    );
    assert_eq!(
        enrolled.run(dial("[fd99:78::5]:80")),
        Ok(()),
        "outside the IPv6 range: captured"
    );
}

/// Runs `bash -c 'exec 3<>/dev/tcp/10.99.0.1/80'` (an unmarked connect) in `ns`, from a process
/// placed first in `cgroup` if given; true if the connect succeeded (it can only by capture:
/// 10.99.0.1 has no route).
fn connects_from(ns: &Netns, cgroup: Option<&std::path::Path>) -> bool {
    let enter = match cgroup {
        Some(dir) => format!("echo $$ > {}/cgroup.procs && ", dir.display()),
        None => String::new(),
    };
    let script = format!(
        "{enter}exec nsenter --net={} bash -c 'exec 3<>/dev/tcp/10.99.0.1/80'",
        ns.path().display()
    );
    std::process::Command::new("sh")
        .args(["-c", &script])
        .status()
        .unwrap()
        .success()
}

#[test]
fn processes_in_an_excluded_cgroup_are_never_captured() {
    let enrolled = Netns::new("c");
    let mut redirect = Capture::install(Options::default());
    redirect
        .enroll(enrolled.file(), &Exclusions::default())
        .unwrap();
    let _listener = enrolled.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    let tunnel_cgroup = cgroup2_mount()
        .unwrap()
        .join(format!("weft-test-{}", std::process::id()));
    std::fs::create_dir_all(&tunnel_cgroup).unwrap();

    assert!(connects_from(&enrolled, None), "captured: lands on 15001");
    assert!(
        connects_from(&enrolled, Some(&tunnel_cgroup)),
        "not excluded yet: captured"
    );
    redirect.exclude_cgroup(&tunnel_cgroup).unwrap();
    assert!(
        !connects_from(&enrolled, Some(&tunnel_cgroup)),
        "the tunnel's cgroup: left alone, so unreachable"
    );
    assert!(
        connects_from(&enrolled, None),
        "other processes still captured"
    );
    std::fs::remove_dir(&tunnel_cgroup).unwrap();
}

/// The pinned map of original destinations by socket cookie, as the programs see it.
fn original_dst_map(
    capture: &Capture,
) -> aya::maps::HashMap<aya::maps::MapData, u64, redirect_common::OriginalDst> {
    let data = aya::maps::MapData::from_pin(capture.dir().join("maps/ORIGINAL_DST")).unwrap();
    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap()
}

/// Capture fails closed: when the original destination cannot be recorded (every entry
/// taken), the connect is refused with EPERM and counted, never let out unchanged; once an
/// entry is free, connects are captured again.
#[test]
fn a_connect_whose_destination_cannot_be_recorded_is_refused_and_counted() {
    let pod = Netns::new("full");
    let mut redirect = Capture::install(Options::default());
    redirect.enroll(pod.file(), &Exclusions::default()).unwrap();
    let listener = pod.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    let mut map = original_dst_map(&redirect);
    let filler = redirect_common::OriginalDst {
        addr: [0; 16],
        port: 1,
        _pad: [0; 6],
    };
    // Cookies no socket has: the kernel counts up from 1.
    let first = 1u64 << 62;
    let mut filled = 0u64;
    while map.insert(first + filled, filler, 0).is_ok() {
        filled += 1;
    }
    assert_eq!(filled, 65536, "the map holds 65,536 records");
    assert_eq!(redirect.capture_counts().unwrap().refused_unrecorded, 0);

    assert_eq!(
        pod.run(|| connect(false)),
        Err(ErrorKind::PermissionDenied),
        "refused, not sent out unchanged"
    );
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "nothing reached the tunnel");
    assert_eq!(redirect.capture_counts().unwrap().refused_unrecorded, 1);

    map.remove(&first).unwrap();
    let client = pod.run(|| connect(false)).expect("captured again");
    listener.set_nonblocking(false).unwrap();
    let (_, peer) = listener.accept().unwrap();
    assert_eq!(peer, client);
    assert_eq!(redirect.capture_counts().unwrap().refused_unrecorded, 1);
}

/// A captured connect that fails before its first SYN (here: no local port left) keeps its
/// record only while its socket lives: the socket's release takes it, so failed connects
/// cannot fill the map.
#[test]
fn the_record_of_a_connect_that_failed_early_goes_with_its_socket() {
    let pod = Netns::new("noport");
    let mut redirect = Capture::install(Options::default());
    redirect.enroll(pod.file(), &Exclusions::default()).unwrap();
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.0, "sysctl", "-qw"])
        .arg("net.ipv4.ip_local_port_range=40000 40001")
        .status()
        .unwrap();
    assert!(status.success());
    let listener = pod.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    let map = original_dst_map(&redirect);
    // Two connections take both local ports; the third connect finds none.
    let held: Vec<SocketAddr> = (0..2)
        .map(|_| pod.run(|| connect(false)).expect("captured"))
        .collect();
    let accepted: Vec<_> = held.iter().map(|_| listener.accept().unwrap()).collect();
    assert_eq!(map.keys().count(), 0, "moved on at the first SYN");
    let (socket, error) = pod.run(|| {
        let dst: SocketAddr = "10.99.0.1:80".parse().unwrap();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let error = socket.connect(&dst.into()).unwrap_err().kind();
        (socket, error)
    });
    assert_eq!(error, ErrorKind::AddrNotAvailable);
    assert_eq!(map.keys().count(), 1, "recorded while the socket lives");
    drop(socket);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while map.keys().count() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the record outlived its socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(accepted);
}

/// The programs leave alone the mark they were installed with, and only it; with mark 0 only
/// the cgroup exclusion protects the tunnel.
#[test]
fn the_tunnel_mark_is_the_one_capture_was_installed_with() {
    let pod = Netns::new("mark");
    let mut redirect = Capture::install(Options {
        tunnel_mark: 0x77,
        ..Options::default()
    });
    redirect.enroll(pod.file(), &Exclusions::default()).unwrap();
    let _listener = pod.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    let dial = |mark: Option<u32>| {
        pod.run(move || {
            let dst: SocketAddr = "10.99.0.1:80".parse().unwrap();
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            if let Some(mark) = mark {
                socket.set_mark(mark).unwrap();
            }
            socket
                .connect_timeout(&dst.into(), Duration::from_secs(2))
                .map_err(|e| e.kind())
        })
    };
    assert_eq!(
        dial(Some(0x77)),
        Err(ErrorKind::NetworkUnreachable),
        "left alone"
    );
    assert_eq!(dial(Some(0x539)), Ok(()), "another mark is captured");
    assert_eq!(dial(None), Ok(()));
    drop(redirect);

    let pod = Netns::new("nomark");
    let mut redirect = Capture::install(Options {
        tunnel_mark: 0,
        ..Options::default()
    });
    redirect.enroll(pod.file(), &Exclusions::default()).unwrap();
    let _listener = pod.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    let unmarked = pod.run(|| {
        let dst: SocketAddr = "10.99.0.1:80".parse().unwrap();
        TcpStream::connect_timeout(&dst, Duration::from_secs(2)).map(drop)
    });
    assert!(unmarked.is_ok(), "mark 0 does not exempt unmarked sockets");
}
