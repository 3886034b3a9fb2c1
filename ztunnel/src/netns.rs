//! Where sockets are made: the tunnel's own namespace, or inside a pod's network namespace.
//!
//! A socket belongs to the namespace it was created in, whatever thread uses it later. So a
//! pod's sockets are made by entering its namespace with `setns` on the calling thread, making
//! the socket, and going back at once (`redirect_ebpf::run_in_netns`, shared with capture:
//! about 2 µs for the pair, measured here; a thread per pod costs ~85 µs to start, a stack, and
//! a hop per socket). Istio's ztunnel does the same.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// One pod's network namespace, entered briefly by whichever thread needs a socket there.
#[derive(Debug)]
pub struct PodNetns {
    ns: File,
}

impl PodNetns {
    /// The namespace at `path` (e.g. `/run/netns/pod-a`); checks it can be entered.
    pub fn open(path: &Path) -> io::Result<Arc<Self>> {
        let ns =
            File::open(path).map_err(|e| annotate(e, path, "cannot open network namespace"))?;
        Self::checked(ns, path)
    }

    /// The namespace open as `ns` (a descriptor the node agent sent); checks it can be entered.
    pub fn from_fd(ns: &OwnedFd, pod: &str) -> io::Result<Arc<Self>> {
        let ns = File::from(ns.try_clone()?);
        let label = format!("the network namespace of pod {pod}");
        Self::checked(ns, Path::new(&label))
    }

    fn checked(ns: File, path: &Path) -> io::Result<Arc<Self>> {
        let netns = PodNetns { ns };
        netns.run(|| Ok(())).map_err(|e| {
            annotate(
                e,
                path,
                "cannot enter network namespace (setns needs CAP_SYS_ADMIN)",
            )
        })?;
        Ok(Arc::new(netns))
    }

    /// Runs `f` on this thread inside the namespace, then returns to the tunnel's own.
    /// `f` must not block or yield: the thread belongs to the runtime.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        redirect_ebpf::run_in_netns(self.ns.as_fd(), f)
    }
}

fn annotate(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// What every socket the tunnel makes carries.
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketOptions {
    /// `SO_MARK`, so capture leaves the tunnel's own sockets alone.
    pub mark: Option<u32>,
    /// TCP keepalive: idle time before the first probe (then every 10 s, 3 unanswered probes
    /// end the connection), so a peer that vanished without a FIN does not leave a proxied
    /// connection half-open for ever. Accepted sockets inherit it from their listener.
    pub keepalive: Option<std::time::Duration>,
}

/// Makes sockets in the tunnel's own namespace or in a pod's, with the tunnel's options.
#[derive(Clone, Debug)]
pub struct SocketFactory {
    netns: Option<Arc<PodNetns>>,
    options: SocketOptions,
}

impl SocketFactory {
    /// Sockets in the tunnel's own namespace.
    pub fn host(options: SocketOptions) -> Self {
        SocketFactory {
            netns: None,
            options,
        }
    }

    /// Sockets inside a pod's namespace.
    pub fn pod(netns: Arc<PodNetns>, options: SocketOptions) -> Self {
        SocketFactory {
            netns: Some(netns),
            options,
        }
    }

    fn socket(&self, addr: SocketAddr) -> io::Result<Socket> {
        let options = self.options;
        let make = move || -> io::Result<Socket> {
            let socket = Socket::new(
                Domain::for_address(addr),
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )?;
            if let Some(mark) = options.mark {
                socket.set_mark(mark)?;
            }
            if let Some(idle) = options.keepalive {
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(idle)
                    .with_interval(std::time::Duration::from_secs(10))
                    .with_retries(3);
                socket.set_tcp_keepalive(&keepalive)?;
            }
            Ok(socket)
        };
        match &self.netns {
            None => make(),
            Some(netns) => netns.run(make),
        }
    }

    /// A listener on `addr`, with address reuse so a restarted tunnel binds at once.
    pub async fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = self.socket(addr)?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    }

    /// A TCP connection to `addr` made from this namespace.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = self.socket(addr)?;
        let socket = TcpSocket::from_std_stream(socket.into());
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn connected_and_accepted_sockets_probe_an_idle_peer() {
        let sockets = SocketFactory::host(SocketOptions {
            mark: None,
            keepalive: Some(Duration::from_secs(42)),
        });
        let listener = sockets
            .listen("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(sockets.connect(addr), listener.accept());
        let (accepted, _) = accepted.unwrap();
        for (side, stream) in [("connected", &connected.unwrap()), ("accepted", &accepted)] {
            let socket = socket2::SockRef::from(stream);
            assert!(socket.keepalive().unwrap(), "{side}: keepalive on");
            assert_eq!(
                socket.tcp_keepalive_time().unwrap(),
                Duration::from_secs(42),
                "{side}"
            );
            assert_eq!(
                socket.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(10),
                "{side}"
            );
            assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3, "{side}");
        }
    }
}
