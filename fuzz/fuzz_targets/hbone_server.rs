//! The HBONE server's request handling (`serve_http2`, what runs after mutual TLS on 15008):
//! an in-memory HTTP/2 client drives the real server code, either with raw bytes after the
//! preface (frame-level abuse) or with a sequence of client operations (CONNECT streams to the
//! pod's echo application, to a closed port, to another address, other methods, data, resets).
//! Whatever the client does, the server answers or ends the connection, without a panic, and
//! every stream task ends once the client is gone.
//!
//! The pod is a loopback address inside a network namespace of the fuzz process's own (root:
//! `unshare`), so a CONNECT the fuzzer invents reaches nothing of the machine's.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ztunnel::identity::{CertificateManager, Identity, LocalCa};
use ztunnel::netns::{SocketFactory, SocketOptions};
use ztunnel::proxy::admission::{Admission, AdmissionLimits};
use ztunnel::proxy::context::{Deadlines, LocalPods, Pod, Tunnel};
use ztunnel::proxy::hbone::{Client, Pool, PoolSettings, serve_http2};
use ztunnel::state::{PodNamespaces, State, Workload};
use ztunnel::telemetry::Metrics;
use ztunnel::tls::{TlsContext, TrustBundle};

#[path = "support/runtime.rs"]
mod support;
use support::runtime;

const TRUST_DOMAIN: &str = "cluster.local";
const POD_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long the fuzzer waits on any one step; the server's own deadlines are this short too.
const STEP: Duration = Duration::from_millis(200);

#[derive(Arbitrary, Debug)]
enum Input {
    /// Bytes written after the client preface.
    Raw(Vec<u8>),
    /// What a client may do with `h2`'s client.
    Client(Vec<Op>),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Open {
        method: Verb,
        target: Target,
        end_of_stream: bool,
    },
    Send {
        stream: u8,
        data: Vec<u8>,
        end_of_stream: bool,
    },
    Reset {
        stream: u8,
        code: u32,
    },
    /// Waits briefly for a stream's response and some of its data.
    Read {
        stream: u8,
    },
    Ping,
}

#[derive(Arbitrary, Debug)]
enum Verb {
    Connect,
    Get,
    Post,
}

#[derive(Arbitrary, Debug)]
enum Target {
    /// The pod's application (an echo server).
    Application,
    /// A port of the pod where nothing listens.
    ClosedPort,
    /// An address that is not the pod's (misdirected).
    Elsewhere,
    /// Any authority text.
    Text(String),
}

/// What every input shares: the pod, its echo application and the tunnel's certificates.
struct Fixture {
    pod: Arc<Pod>,
    application: SocketAddr,
    closed: SocketAddr,
    tls: TlsContext,
    certs: Arc<CertificateManager>,
}

impl Fixture {
    async fn new() -> Fixture {
        isolate_network();
        let dir = std::env::temp_dir().join(format!("weft-fuzz-hbone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        let (cert, key) = LocalCa::create_root(&dir, TRUST_DOMAIN).expect("a root");
        let crypto = Arc::new(ztunnel::tls::crypto::provider(
            ztunnel::tls::crypto::CryptoBackend::Ring,
        ));
        let ca = LocalCa::load(&cert, &key, Duration::from_secs(3600), crypto.clone())
            .expect("the root loads");
        let _ = std::fs::remove_dir_all(&dir);
        let bundle = TrustBundle::new(crypto.clone(), vec![ca.root()]).expect("a bundle");
        let metrics = Metrics::new();
        let certs = CertificateManager::new(Arc::new(ca), metrics.clone());
        let tls = TlsContext::new(crypto, bundle, TRUST_DOMAIN);
        let echo = tokio::net::TcpListener::bind((POD_IP, 0))
            .await
            .expect("an echo port");
        let application = echo.local_addr().expect("its address");
        tokio::spawn(async move {
            while let Ok((stream, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut rd, mut wr) = stream.into_split();
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                });
            }
        });
        let closed = tokio::net::TcpListener::bind((POD_IP, 0))
            .await
            .and_then(|l| l.local_addr())
            .expect("a port to close");
        let workload = Workload {
            name: "server".into(),
            namespace: "apps".into(),
            service_account: "server".into(),
            ips: vec![IpAddr::V4(POD_IP)],
            node: "node".into(),
            netns: None,
            protocol: Default::default(),
            policies: Vec::new(),
            mtls: Default::default(),
        };
        let pod = Arc::new(Pod {
            workload: Arc::new(workload),
            identity: Identity::new(TRUST_DOMAIN, "apps", "server"),
            sockets: SocketFactory::host(SocketOptions::default()),
        });
        Fixture {
            pod,
            application,
            closed,
            tls,
            certs,
        }
    }

    /// A tunnel of its own per input, so its stream tasks can be waited for.
    fn tunnel(&self) -> Arc<Tunnel> {
        let metrics = Metrics::new();
        let pool = Pool::new(
            PoolSettings {
                max_streams_per_connection: 128,
                idle_timeout: STEP,
                connect_timeout: STEP,
            },
            self.tls.clone(),
            self.certs.clone(),
            metrics.clone(),
        );
        let (_, state) = tokio::sync::watch::channel(Arc::new(State::default()));
        Arc::new(Tunnel {
            state,
            tls: self.tls.clone(),
            certs: self.certs.clone(),
            pool,
            metrics,
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            next_endpoint: AtomicUsize::new(0),
            local_pods: LocalPods::default(),
            same_node_shortcut: false,
            pod_namespaces: PodNamespaces::default(),
            inbound_listeners: Default::default(),
            hbone_admission: Admission::new(AdmissionLimits {
                total: 8,
                per_peer: 8,
                streams_per_peer: 16,
                receive_budget: 1 << 20,
                send_budget: 256 << 10,
            }),
            deadlines: Deadlines {
                hbone_handshake: STEP,
                hbone_idle: STEP,
                socks5_handshake: STEP,
                connect: STEP,
            },
        })
    }

    fn authority(&self, target: &Target) -> String {
        match target {
            Target::Application => self.application.to_string(),
            Target::ClosedPort => self.closed.to_string(),
            Target::Elsewhere => "10.9.9.9:80".to_owned(),
            Target::Text(text) => text.clone(),
        }
    }
}

/// A network namespace of this process's own with only loopback up: whatever authority a
/// CONNECT names, the server connects to nothing outside the fuzz process. Without root the
/// host's loopback is used (the targets named above stay the fuzz process's own ports).
fn isolate_network() {
    if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        assert!(
            up.is_ok_and(|s| s.success()),
            "cannot bring loopback up in the fuzz namespace"
        );
    }
}

static FIXTURE: OnceCell<Fixture> = OnceCell::const_new();

fuzz_target!(|input: Input| {
    runtime().block_on(async {
        let fixture = FIXTURE.get_or_init(Fixture::new).await;
        let tunnel = fixture.tunnel();
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let client = Client {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 40000),
            identity: Arc::new(Identity::new(TRUST_DOMAIN, "apps", "client")),
        };
        let peer = client.addr.ip();
        let admitted = tunnel
            .hbone_admission
            .admit(client.addr.ip())
            .expect("one connection per input");
        let send_budget = admitted.send_budget();
        let server = tokio::spawn(serve_http2(
            server_io,
            client,
            admitted,
            Instant::now() + STEP,
            fixture.pod.clone(),
            tunnel.clone(),
        ));
        match input {
            Input::Raw(bytes) => drive_raw(client_io, &bytes).await,
            Input::Client(ops) => drive_client(client_io, fixture, ops).await,
        }
        // The client is gone: the server and every stream it started must end.
        let ended = timeout(STEP * 10, server).await;
        assert!(ended.is_ok(), "the server outlived its client");
        tunnel.connections.close();
        let drained = timeout(STEP * 10, tunnel.connections.wait()).await;
        assert!(drained.is_ok(), "a stream task outlived its connection");
        // Every place and byte the connection held is given back.
        assert_eq!(tunnel.hbone_admission.live(), 0);
        assert_eq!(
            tunnel.hbone_admission.share_of(peer),
            (0, 0, 0),
            "the peer's share is whole again"
        );
        assert_eq!(send_budget.in_flight(), 0, "no byte stays counted as sent");
    });
});

async fn drive_raw(mut io: tokio::io::DuplexStream, bytes: &[u8]) {
    let (mut rd, mut wr) = tokio::io::split(&mut io);
    let write = async {
        let _ = wr.write_all(PREFACE).await;
        let _ = wr.write_all(bytes).await;
        let _ = wr.shutdown().await;
    };
    let read = async {
        let mut sink = [0u8; 16 * 1024];
        while let Ok(Ok(n)) = timeout(STEP, rd.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::join!(write, read);
}

async fn drive_client(io: tokio::io::DuplexStream, fixture: &Fixture, ops: Vec<Op>) {
    let Ok(Ok((mut requests, mut connection))) = timeout(STEP, h2::client::handshake(io)).await
    else {
        return;
    };
    let ping = connection.ping_pong();
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut streams: Vec<Stream> = Vec::new();
    let mut ping = ping;
    for op in ops.into_iter().take(64) {
        match op {
            Op::Open {
                method,
                target,
                end_of_stream,
            } => {
                let method = match method {
                    Verb::Connect => http::Method::CONNECT,
                    Verb::Get => http::Method::GET,
                    Verb::Post => http::Method::POST,
                };
                let authority = fixture.authority(&target);
                let uri = if method == http::Method::CONNECT {
                    authority
                } else {
                    format!("http://{authority}/")
                };
                let Ok(request) = http::Request::builder().method(method).uri(uri).body(()) else {
                    continue;
                };
                let Ok(Ok(ready)) = timeout(STEP, requests.clone().ready()).await else {
                    break;
                };
                requests = ready;
                match requests.send_request(request, end_of_stream) {
                    Ok((response, send)) => streams.push(Stream {
                        response: Some(response),
                        body: None,
                        send: (!end_of_stream).then_some(send),
                    }),
                    Err(_) => break,
                }
            }
            Op::Send {
                stream,
                data,
                end_of_stream,
            } => {
                if let Some(send) = pick(&mut streams, stream).and_then(|s| s.send.as_mut()) {
                    let _ = send.send_data(Bytes::from(data), end_of_stream);
                }
            }
            Op::Reset { stream, code } => {
                if let Some(send) = pick(&mut streams, stream).and_then(|s| s.send.as_mut()) {
                    send.send_reset(h2::Reason::from(code));
                }
            }
            Op::Read { stream } => {
                let Some(stream) = pick(&mut streams, stream) else {
                    continue;
                };
                if let Some(response) = stream.response.take() {
                    if let Ok(Ok(response)) = timeout(STEP, response).await {
                        stream.body = Some(response.into_body());
                    }
                }
                if let Some(body) = stream.body.as_mut() {
                    if let Ok(Some(Ok(data))) = timeout(STEP, body.data()).await {
                        let _ = body.flow_control().release_capacity(data.len());
                    }
                }
            }
            Op::Ping => {
                if let Some(ping) = ping.as_mut() {
                    let _ = timeout(STEP, ping.ping(h2::Ping::opaque())).await;
                }
            }
        }
    }
    drop(streams);
    drop(requests);
    drop(ping);
    connection.abort();
    let _ = connection.await;
}

/// One stream the client opened.
struct Stream {
    /// Until the response was awaited.
    response: Option<h2::client::ResponseFuture>,
    body: Option<h2::RecvStream>,
    /// Until the client ended its side.
    send: Option<h2::SendStream<Bytes>>,
}

fn pick<T>(streams: &mut [T], index: u8) -> Option<&mut T> {
    let len = streams.len();
    if len == 0 {
        return None;
    }
    streams.get_mut(usize::from(index) % len)
}
