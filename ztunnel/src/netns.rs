//! Where sockets are made: the tunnel's own namespace, or inside a pod's network namespace.
//!
//! A socket belongs to the namespace it was created in, whatever thread uses it later. So each
//! pod gets one thread that entered its namespace with `setns`; it only creates sockets, which
//! the async proxy code then uses from any thread.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// A thread living inside one network namespace, creating sockets there on request.
#[derive(Debug)]
pub struct NetnsWorker {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl NetnsWorker {
    /// Enters the namespace at `path` (e.g. `/run/netns/pod-a`) on a new thread.
    pub fn spawn(path: &Path) -> io::Result<Arc<Self>> {
        let ns =
            File::open(path).map_err(|e| annotate(e, path, "cannot open network namespace"))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        Self::spawn_in(ns, name, path)
    }

    /// Enters the namespace open as `ns` (a descriptor the node agent sent) on a new thread.
    pub fn spawn_fd(ns: &OwnedFd, pod: &str) -> io::Result<Arc<Self>> {
        let ns = File::from(ns.try_clone()?);
        let label = format!("the network namespace of pod {pod}");
        Self::spawn_in(ns, pod, Path::new(&label))
    }

    fn spawn_in(ns: File, name: &str, path: &Path) -> io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let name = format!("netns-{name}");
        std::thread::Builder::new().name(name).spawn(move || {
            let entered = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if ok {
                for job in rx {
                    job();
                }
            }
        })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("namespace thread exited"))?
            .map_err(|e| {
                annotate(
                    e,
                    path,
                    "cannot enter network namespace (setns needs CAP_SYS_ADMIN)",
                )
            })?;
        Ok(Arc::new(NetnsWorker {
            jobs: Mutex::new(tx),
        }))
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .lock()
            .map_err(|_| io::Error::other("namespace worker lock poisoned"))?
            .send(job)
            .map_err(|_| io::Error::other("namespace thread exited"))?;
        rx.await
            .map_err(|_| io::Error::other("namespace thread dropped a request"))
    }
}

fn annotate(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Makes sockets in the tunnel's own namespace or in a pod's, with the tunnel's socket mark.
#[derive(Clone, Debug)]
pub struct SocketFactory {
    netns: Option<Arc<NetnsWorker>>,
    mark: Option<u32>,
}

impl SocketFactory {
    /// Sockets in the tunnel's own namespace.
    pub fn host(mark: Option<u32>) -> Self {
        SocketFactory { netns: None, mark }
    }

    /// Sockets inside a pod's namespace.
    pub fn pod(netns: Arc<NetnsWorker>, mark: Option<u32>) -> Self {
        SocketFactory {
            netns: Some(netns),
            mark,
        }
    }

    async fn socket(&self, addr: SocketAddr) -> io::Result<Socket> {
        let mark = self.mark;
        let make = move || -> io::Result<Socket> {
            let socket = Socket::new(
                Domain::for_address(addr),
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )?;
            if let Some(mark) = mark {
                socket.set_mark(mark)?;
            }
            Ok(socket)
        };
        match &self.netns {
            None => make(),
            Some(worker) => worker.run(make).await?,
        }
    }

    /// A listener on `addr`, with address reuse so a restarted tunnel binds at once.
    pub async fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = self.socket(addr).await?;
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
        let socket = self.socket(addr).await?;
        let socket = TcpSocket::from_std_stream(socket.into());
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}
