//! The connect4 program on the real kernel: an enrolled namespace's TCP connects land on the
//! tunnel's outbound port with their original destination recorded; nothing else changes.
//! Needs root (CI runs as root); fails loudly without it.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use redirect_ebpf::{OUTBOUND_PORT, Redirect, cgroup2_mount, netns_cookie};

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test loads eBPF programs and must run as root"
        );
        let name = format!("wfr{}{tag}", std::process::id());
        let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
        ok(Command::new("ip").args(["netns", "add", &name]));
        ok(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Netns(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(self.path()).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn socket_cookie(stream: &TcpStream) -> u64 {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket and buffer.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    cookie
}

/// Connects to a destination with no route; Ok((cookie, local peer seen)) when captured.
fn connect(marked: bool) -> Result<u64, ErrorKind> {
    let dst: SocketAddr = "10.99.0.1:80".parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if marked {
        socket.set_mark(0x539).unwrap();
    }
    socket
        .connect_timeout(&dst.into(), Duration::from_secs(2))
        .map_err(|e| e.kind())?;
    let stream: TcpStream = socket.into();
    Ok(socket_cookie(&stream))
}

#[test]
fn captures_enrolled_namespaces_only_and_records_the_original_destination() {
    let enrolled = Netns::new("e");
    let plain = Netns::new("p");
    let mut redirect = Redirect::install(&cgroup2_mount().unwrap()).unwrap();
    redirect
        .enroll(netns_cookie(&enrolled.path()).unwrap())
        .unwrap();

    // The tunnel's outbound listener inside the enrolled pod.
    let listener = enrolled.run(|| TcpListener::bind(("127.0.0.1", OUTBOUND_PORT)).unwrap());
    let cookie = enrolled
        .run(|| connect(false))
        .expect("an enrolled connect is captured");
    let (accepted, peer) = listener.accept().unwrap();
    assert_eq!(accepted.local_addr().unwrap().port(), OUTBOUND_PORT);
    assert!(peer.ip().is_loopback());
    assert_eq!(
        redirect.original_destination(cookie).unwrap(),
        Some("10.99.0.1:80".parse().unwrap())
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
