//! The sk_lookup program on the real kernel: connections reaching an enrolled pod from outside
//! land on the tunnel's plaintext inbound listener with their original destination as the local
//! address; HBONE and the pod's own connections take the normal path; with no listener
//! registered the connection is refused. Needs root.

mod common;

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{Capture, Netns};
use redirect_ebpf::{Exclusions, InboundListeners, Options};

const POD: &str = "10.98.7.2";
const OUTSIDE: &str = "10.98.7.1";

fn listen(pod: &Netns, port: u16) -> TcpListener {
    let listener = pod.run(move || TcpListener::bind(("0.0.0.0", port)).unwrap());
    listener.set_nonblocking(true).unwrap();
    listener
}

/// Connects from `from` to the pod at `port`, marked like the tunnel's sockets if `marked`.
fn dial(from: &Netns, port: u16, marked: bool) -> Result<(), ErrorKind> {
    from.run(move || {
        let dst: SocketAddr = format!("{POD}:{port}").parse().unwrap();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if marked {
            socket.set_mark(0x539).unwrap();
        }
        socket
            .connect_timeout(&dst.into(), Duration::from_secs(2))
            .map_err(|e| e.kind())?;
        let _: TcpStream = socket.into();
        Ok(())
    })
}

/// The local address of the connection waiting on `listener`, if one arrives within 50 ms.
fn accepted(listener: &TcpListener) -> Option<SocketAddr> {
    accepted_within(listener, Duration::from_millis(50))
}

/// Like [`accepted`], waiting up to `patience` (for connections known to be on their way).
fn accepted_within(listener: &TcpListener, patience: Duration) -> Option<SocketAddr> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        if let Ok((stream, _)) = listener.accept() {
            return Some(stream.local_addr().unwrap());
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn connections_from_outside_an_enrolled_pod_land_on_the_inbound_listener() {
    let pod = Netns::new("i");
    let outside = Netns::new("o");
    pod.veth_to(&outside, POD, OUTSIDE);
    let app = listen(&pod, 8080);
    let inbound = listen(&pod, 15006);
    let hbone = listen(&pod, 15008);
    let to_app: SocketAddr = format!("{POD}:8080").parse().unwrap();

    // Not enrolled: the application takes it.
    assert_eq!(dial(&outside, 8080, false), Ok(()));
    assert_eq!(accepted_within(&app, Duration::from_secs(2)), Some(to_app));

    let mut capture = Capture::install(Options::default());
    let cookie = capture.enroll(pod.file(), &Exclusions::default()).unwrap();
    // Enrolled but the tunnel has not registered its listener: refused, fail closed.
    assert_eq!(
        dial(&outside, 8080, false),
        Err(ErrorKind::ConnectionRefused)
    );
    assert_eq!(accepted(&app), None, "nothing reached the application");

    let mut listeners = InboundListeners::open(capture.dir()).unwrap();
    let pod_ip: IpAddr = POD.parse().unwrap();
    listeners.register(pod_ip, &inbound).unwrap();
    assert!(listeners.is_registered(pod_ip));
    assert_eq!(dial(&outside, 8080, false), Ok(()));
    assert_eq!(
        accepted_within(&inbound, Duration::from_secs(2)),
        Some(to_app),
        "on 15006, the original destination as the local address"
    );
    assert_eq!(accepted(&app), None);

    // HBONE is never steered.
    assert_eq!(dial(&outside, 15008, false), Ok(()));
    assert!(accepted_within(&hbone, Duration::from_secs(2)).is_some());
    assert_eq!(accepted(&inbound), None);

    // The tunnel's own connection to the application, from inside the pod, goes straight
    // (marked, so connect4 leaves it alone; sourced from the pod's address, so sk_lookup does).
    assert_eq!(dial(&pod, 8080, true), Ok(()));
    assert_eq!(accepted_within(&app, Duration::from_secs(2)), Some(to_app));

    // The tunnel's listener closes: it leaves the map, connections are refused again.
    drop(inbound);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while listeners.is_registered(pod_ip) {
        assert!(
            std::time::Instant::now() < deadline,
            "a closed listener stays in the map"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        dial(&outside, 8080, false),
        Err(ErrorKind::ConnectionRefused)
    );

    // Unenrolled: straight to the application.
    capture.unenroll(cookie).unwrap();
    assert_eq!(dial(&outside, 8080, false), Ok(()));
    assert_eq!(accepted_within(&app, Duration::from_secs(2)), Some(to_app));
}
