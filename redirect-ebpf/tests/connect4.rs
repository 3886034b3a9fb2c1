//! The connect4 program on the real kernel: an enrolled namespace's TCP connects land on the
//! tunnel's outbound port with their original destination recorded; nothing else changes.
//! Needs root (CI runs as root); fails loudly without it.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

mod common;

use common::{Capture, Netns};
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

/// What `getsockopt(SOL_IP, SO_ORIGINAL_DST)` answers on an accepted socket: the tunnel's call.
fn so_original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    // SAFETY: sockaddr_in is plain data; the kernel (or the program) fills at most `len` bytes.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            80,
            (&mut sa as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let ip = std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
    Ok(SocketAddr::from((ip, u16::from_be(sa.sin_port))))
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
