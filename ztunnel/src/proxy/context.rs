//! What every proxy path shares: the tunnel-wide context and one local pod's context.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ProxyError;
use super::admission::Admission;
use super::hbone::Pool;
use crate::identity::{CertificateManager, Identity};
use crate::inbound_capture::LocalInboundListeners;
use crate::netns::SocketFactory;
use crate::state::{PodNamespaces, StateHandle, Workload, WorkloadIdentity};
use crate::telemetry::{ConnectionRecorder, Metrics, Peer, Reporter};
use crate::tls::TlsContext;

/// Shared by every listener and connection of the tunnel.
pub struct Tunnel {
    pub state: StateHandle,
    pub tls: TlsContext,
    pub certs: Arc<CertificateManager>,
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    /// Cancelled on SIGTERM: listeners stop accepting, HBONE servers send GOAWAY.
    pub shutdown: CancellationToken,
    /// Every live connection, so shutdown can wait for them to drain.
    pub connections: TaskTracker,
    /// Round-robin cursor for service endpoints.
    pub next_endpoint: AtomicUsize,
    /// The local pods whose listeners run, for the same-node shortcut.
    pub local_pods: LocalPods,
    /// Hand connections between two local pods over in process instead of through HBONE.
    pub same_node_shortcut: bool,
    /// Local pods' network namespaces sent by the node agent (empty with a state file).
    pub pod_namespaces: PodNamespaces,
    /// Local pods' plaintext inbound listeners, handed to the node agent for capture.
    pub inbound_listeners: LocalInboundListeners,
    /// Connections the HBONE listeners hold, in total and by peer address.
    pub hbone_admission: Arc<Admission>,
    /// How long each step that waits on a peer may take.
    pub deadlines: Deadlines,
}

/// How long a peer may keep the tunnel waiting at each step.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// HBONE listener: from accept to the end of the TLS and HTTP/2 handshakes.
    pub hbone_handshake: Duration,
    /// HBONE listener: without any stream open, before the connection is closed (GOAWAY).
    pub hbone_idle: Duration,
    /// SOCKS5 listener: from accept to the end of the client's request.
    pub socks5_handshake: Duration,
    /// Connecting to an application or a passthrough destination.
    pub connect: Duration,
}

/// The local pods this tunnel serves, by `namespace/name`.
#[derive(Default)]
pub struct LocalPods(RwLock<HashMap<String, Arc<Pod>>>);

impl LocalPods {
    pub fn insert(&self, pod: Arc<Pod>) {
        if let Ok(mut pods) = self.0.write() {
            pods.insert(pod.workload.key(), pod);
        }
    }

    pub fn remove(&self, key: &str) {
        if let Ok(mut pods) = self.0.write() {
            pods.remove(key);
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<Pod>> {
        self.0.read().ok()?.get(key).cloned()
    }
}

impl Tunnel {
    /// The trust domain of this mesh.
    pub fn trust_domain(&self) -> &str {
        self.tls.trust_domain()
    }

    /// Starts the record (metrics, access log) of one proxied connection.
    pub fn record(
        &self,
        reporter: Reporter,
        source: Peer,
        destination: Peer,
        service: Option<String>,
        mutual_tls: bool,
    ) -> ConnectionRecorder {
        ConnectionRecorder::open(
            self.metrics.clone(),
            reporter,
            source,
            destination,
            service,
            mutual_tls,
        )
    }

    /// How metrics and logs describe a workload.
    pub fn peer_of(&self, workload: &Workload, addr: Option<std::net::SocketAddr>) -> Peer {
        Peer {
            addr,
            workload: Some(workload.name.clone()),
            namespace: Some(workload.namespace.clone()),
            identity: Some(workload.identity(self.trust_domain())),
        }
    }
}

/// One local pod whose listeners this tunnel runs.
pub struct Pod {
    pub workload: Arc<Workload>,
    pub identity: Identity,
    /// Makes sockets inside the pod's network namespace.
    pub sockets: SocketFactory,
}

impl Pod {
    /// Connects to `target` from inside this pod's namespace (to its application, or for a
    /// passthrough onwards), within `deadline`.
    pub async fn connect(
        &self,
        target: SocketAddr,
        deadline: Duration,
    ) -> Result<TcpStream, ProxyError> {
        tokio::time::timeout(deadline, self.sockets.connect(target))
            .await
            .map_err(|_| ProxyError::ConnectTimeout { addr: target })?
            .map_err(|source| ProxyError::Connect {
                addr: target,
                source,
            })
    }
}
