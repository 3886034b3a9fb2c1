//! The state from the node agent (`mesh-node`) over its Unix socket (`tunnel_proto::protocol`):
//! the tables, and each local pod's network namespace as a descriptor. The tunnel connects,
//! takes a full snapshot, then follows changes; when the agent goes away it keeps serving what
//! it has and reconnects, converging on the next snapshot without touching the pods still
//! named in it. A table update is acknowledged once the pods' listeners follow it, so the agent
//! enrolls a pod's capture only when the tunnel is ready for it.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tunnel_proto::protocol::{
    AgentMessage, PROTOCOL_VERSION, ProtocolError, TunnelMessage, handshake, recv, send,
};

use super::State;
use crate::last_failure::LastFailure;

/// Local pods' network namespaces as the agent sent them, by `namespace/name`, with each
/// namespace's identity (its nsfs inode: a new descriptor for the same namespace, as a
/// restarted agent sends, is the same namespace).
#[derive(Clone, Debug, Default)]
pub struct PodNamespaces(Arc<Mutex<HashMap<String, PodNamespace>>>);

/// One pod's namespace descriptor and its identity (nsfs inode).
type PodNamespace = (Arc<OwnedFd>, u64);

impl PodNamespaces {
    pub fn get(&self, key: &str) -> Option<Arc<OwnedFd>> {
        self.0.lock().ok()?.get(key).map(|(fd, _)| fd.clone())
    }

    /// The identity of pod `key`'s namespace.
    pub fn identity(&self, key: &str) -> Option<u64> {
        self.0.lock().ok()?.get(key).map(|(_, id)| *id)
    }

    fn insert(&self, key: String, fd: OwnedFd) {
        let id = nix::sys::stat::fstat(&fd)
            .map(|st| st.st_ino)
            .unwrap_or_default();
        if let Ok(mut map) = self.0.lock() {
            map.insert(key, (Arc::new(fd), id));
        }
    }

    fn remove(&self, key: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(key);
        }
    }

    fn retain(&self, keep: &HashSet<String>) {
        if let Ok(mut map) = self.0.lock() {
            map.retain(|k, _| keep.contains(k));
        }
    }
}

/// The identity of one state value (the address of its `Arc`), which the pods loop publishes
/// once its listeners follow that state.
pub fn state_id(state: &Arc<State>) -> usize {
    Arc::as_ptr(state) as usize
}

/// How long an update waits for the pods' listeners before it is acknowledged anyway (a pod
/// that cannot start is reported by readiness, not here).
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Follows the agent listening at `path`.
pub struct AgentFollower {
    pub path: PathBuf,
    pub state: watch::Sender<Arc<State>>,
    pub pods: PodNamespaces,
    /// The state the pods' listeners follow now.
    pub applied: watch::Receiver<usize>,
    /// Set once the first snapshot is in force (readiness waits for it).
    pub synced: watch::Sender<bool>,
}

impl AgentFollower {
    /// Connects, follows, reconnects with backoff, until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        let mut last_error = LastFailure::default();
        loop {
            match UnixStream::connect(&self.path).await {
                Ok(stream) => {
                    backoff = Duration::from_millis(50);
                    info!(socket = %self.path.display(), "connected to the node agent");
                    match self.session(&stream, &stop).await {
                        Ok(()) => info!("the node agent closed the connection; reconnecting"),
                        Err(e) => warn!("{e}; reconnecting"),
                    }
                    last_error.clear();
                }
                Err(e) => {
                    let error =
                        format!("waiting for the node agent at {}: {e}", self.path.display());
                    if last_error.is_new(&error) {
                        warn!("{error}");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    async fn session(
        &mut self,
        stream: &UnixStream,
        stop: &CancellationToken,
    ) -> Result<(), ProtocolError> {
        handshake(
            stream,
            TunnelMessage::Hello {
                version: PROTOCOL_VERSION,
            },
        )
        .await?;
        let mut snapshot: Option<(HashSet<String>, Option<Arc<State>>)> = None;
        loop {
            let frame = tokio::select! {
                frame = recv::<AgentMessage>(stream) => frame?,
                _ = stop.cancelled() => return Ok(()),
            };
            let Some(frame) = frame else { return Ok(()) };
            let refusal = match frame.message {
                AgentMessage::Hello { .. } => Some("a second hello".to_owned()),
                AgentMessage::SnapshotStart => {
                    snapshot = Some((HashSet::new(), None));
                    None
                }
                AgentMessage::AddPod { key } => match frame.fd {
                    Some(fd) => {
                        if let Some((keys, _)) = snapshot.as_mut() {
                            keys.insert(key.clone());
                        }
                        self.pods.insert(key, fd);
                        None
                    }
                    None => Some(format!(
                        "add_pod {key} came without its network namespace descriptor"
                    )),
                },
                AgentMessage::RemovePod { key } => {
                    self.pods.remove(&key);
                    None
                }
                AgentMessage::State { state } => match State::build(state, "agent") {
                    Ok(state) => {
                        let state = Arc::new(state);
                        match snapshot.as_mut() {
                            Some((_, pending)) => *pending = Some(state),
                            None => {
                                let started = std::time::Instant::now();
                                self.publish(state).await;
                                tracing::debug!(
                                    apply_ms = started.elapsed().as_secs_f64() * 1e3,
                                    "agent state applied"
                                );
                            }
                        }
                        None
                    }
                    Err(e) => Some(format!("{e}; the previous state stays")),
                },
                AgentMessage::SnapshotEnd => match snapshot.take() {
                    Some((keys, pending)) => {
                        self.pods.retain(&keys);
                        if let Some(state) = pending {
                            self.publish(state).await;
                        }
                        self.synced.send_replace(true);
                        info!(pods = keys.len(), "agent snapshot applied");
                        None
                    }
                    None => Some("snapshot_end without snapshot_start".to_owned()),
                },
            };
            let reply = match refusal {
                None => TunnelMessage::Ack { seq: frame.seq },
                Some(reason) => {
                    warn!(seq = frame.seq, "refused an agent update: {reason}");
                    TunnelMessage::Nack {
                        seq: frame.seq,
                        reason,
                    }
                }
            };
            send(stream, frame.seq, &reply, None).await?;
        }
    }

    /// Puts `state` in force and waits (bounded) until the pods' listeners follow it.
    async fn publish(&mut self, state: Arc<State>) {
        let id = state_id(&state);
        self.state.send_replace(state);
        let _ =
            tokio::time::timeout(APPLY_WAIT, self.applied.wait_for(|applied| *applied == id)).await;
    }
}
