//! The state from the node agent (`mesh-node`) over its Unix socket (`tunnel_proto::protocol`):
//! the tables, and each local pod's network namespace as a descriptor. The tunnel connects,
//! takes a full snapshot, then follows changes; when the agent goes away it keeps serving what
//! it has and reconnects, converging on the next snapshot without touching the pods still
//! named in it. A table update is acknowledged once the pods' listeners follow it, so the agent
//! enrolls a pod's capture only when the tunnel is ready for it.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tunnel_proto::peer::{PeerError, check_peer};
use tunnel_proto::protocol::{
    AgentMessage, PROTOCOL_VERSION, ProtocolError, TunnelMessage, handshake, recv, send,
};

use super::State;
use crate::inbound_capture::LocalInboundListeners;
use tunnel_proto::last_failure::LastFailure;

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

/// Why a connection to the agent was not followed.
#[derive(Debug, thiserror::Error)]
enum GreetError {
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// A pod's namespace reaches the tunnel from the agent only as a descriptor the agent opened:
/// a path in the tables would let whoever wrote it choose where the tunnel opens listeners.
const NETNS_PATH_REFUSED: &str =
    "the state names network namespace paths; from the node agent they come only as descriptors";

/// How long an update waits for the pods' listeners before it is acknowledged anyway (a pod
/// that cannot start is reported by readiness, not here).
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Follows the agent listening at `path`.
pub struct AgentFollower {
    pub path: PathBuf,
    /// The mark this tunnel puts on its sockets: it must be the one the agent's capture
    /// leaves alone.
    pub socket_mark: u32,
    /// The only user whose agent socket is followed.
    pub agent_uid: u32,
    pub state: watch::Sender<Arc<State>>,
    pub pods: PodNamespaces,
    /// The running pods' plaintext inbound listeners, handed to the agent for capture.
    pub listeners: LocalInboundListeners,
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
                Ok(stream) => match self.greet(&stream).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(50);
                        last_error.clear();
                        info!(socket = %self.path.display(), "connected to the node agent");
                        match self.session(&stream, &stop).await {
                            Ok(()) => info!("the node agent closed the connection; reconnecting"),
                            Err(e) => warn!("{e}; reconnecting"),
                        }
                    }
                    // Logged once while it repeats (a refused peer or mark would otherwise
                    // be logged on every retry).
                    Err(e) => {
                        if last_error.is_new(&e.to_string()) {
                            warn!("{e}");
                        }
                    }
                },
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

    /// Checks who the agent is and says hello: the agent must run as the expected user and
    /// leave this tunnel's socket mark out of capture.
    async fn greet(&self, stream: &UnixStream) -> Result<(), GreetError> {
        check_peer(stream, self.agent_uid)?;
        let hello = handshake(
            stream,
            TunnelMessage::Hello {
                version: PROTOCOL_VERSION,
            },
        )
        .await?;
        let agent_mark = hello
            .pointer("/body/socket_mark")
            .and_then(serde_json::Value::as_u64);
        match agent_mark {
            Some(agent) if agent != u64::from(self.socket_mark) => Err(ProtocolError::SocketMark {
                agent: u32::try_from(agent).unwrap_or(u32::MAX),
                tunnel: self.socket_mark,
            }
            .into()),
            _ => Ok(()),
        }
    }

    async fn session(
        &mut self,
        stream: &UnixStream,
        stop: &CancellationToken,
    ) -> Result<(), ProtocolError> {
        let mut snapshot: Option<(HashSet<String>, Option<Arc<State>>)> = None;
        // Listeners (by socket identity) handed to the agent on this connection.
        let mut offered: HashSet<u64> = HashSet::new();
        loop {
            let frame = tokio::select! {
                frame = recv::<AgentMessage>(stream) => frame?,
                _ = stop.cancelled() => return Ok(()),
            };
            let Some(frame) = frame else { return Ok(()) };
            let publishes = matches!(
                frame.message,
                AgentMessage::State { .. } | AgentMessage::SnapshotEnd
            );
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
                AgentMessage::State { state }
                    if state.workloads.iter().any(|w| w.netns.is_some()) =>
                {
                    Some(NETNS_PATH_REFUSED.to_owned())
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
            // Pods a state or snapshot started: their inbound listeners reach the agent before
            // the answer, so it registers them before it enrolls those pods in capture.
            if publishes {
                self.offer_listeners(stream, &mut offered).await?;
            }
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

    /// Sends the agent every running pod's inbound listener not yet sent on this connection
    /// (each with its descriptor); forgets those that closed.
    async fn offer_listeners(
        &self,
        stream: &UnixStream,
        offered: &mut HashSet<u64>,
    ) -> Result<(), ProtocolError> {
        let listeners = self.listeners.all();
        let mut present = HashSet::new();
        for (pod, listener) in listeners {
            let id = listener.id;
            present.insert(id);
            if offered.contains(&id) {
                continue;
            }
            let message = TunnelMessage::InboundListener {
                pod,
                ips: listener.ips.clone(),
            };
            send(stream, 0, &message, Some(listener.fd.as_fd())).await?;
            offered.insert(id);
        }
        offered.retain(|id| present.contains(id));
        Ok(())
    }

    /// Puts `state` in force and waits (bounded) until the pods' listeners follow it.
    async fn publish(&mut self, state: Arc<State>) {
        let id = state_id(&state);
        self.state.send_replace(state);
        let _ =
            tokio::time::timeout(APPLY_WAIT, self.applied.wait_for(|applied| *applied == id)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel_proto::{Protocol, StateSpec, Workload};

    fn follower() -> (AgentFollower, watch::Receiver<Arc<State>>) {
        let (state, state_rx) = watch::channel(Arc::new(State::default()));
        // Nothing applies states in this test: the follower's bounded wait for it ends.
        let (_applied_tx, applied) = watch::channel(0usize);
        let (synced, _) = watch::channel(false);
        let follower = AgentFollower {
            path: PathBuf::new(),
            socket_mark: 0x539,
            agent_uid: 0,
            state,
            pods: PodNamespaces::default(),
            listeners: LocalInboundListeners::default(),
            applied,
            synced,
        };
        (follower, state_rx)
    }

    fn workload(netns: Option<&str>) -> Workload {
        Workload {
            name: "web".into(),
            namespace: "apps".into(),
            service_account: "web".into(),
            ips: vec!["10.1.1.2".parse().unwrap()],
            node: "node1".into(),
            netns: netns.map(PathBuf::from),
            protocol: Protocol::Hbone,
            policies: Vec::new(),
            mtls: Default::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_state_naming_namespace_paths_is_refused_and_the_previous_one_stays() {
        let (tunnel_end, agent_end) = UnixStream::pair().unwrap();
        let (mut follower, state_rx) = follower();
        let stop = CancellationToken::new();
        let session = tokio::spawn(async move {
            follower.greet(&tunnel_end).await.unwrap();
            let result = follower.session(&tunnel_end, &stop).await;
            (result, follower)
        });
        handshake(
            &agent_end,
            AgentMessage::Hello {
                version: PROTOCOL_VERSION,
                socket_mark: Some(0x539),
            },
        )
        .await
        .unwrap();
        let state = |netns| AgentMessage::State {
            state: StateSpec {
                workloads: vec![workload(netns)],
                services: vec![],
                policies: vec![],
            },
        };
        send(&agent_end, 1, &state(None), None).await.unwrap();
        let answer = recv::<TunnelMessage>(&agent_end).await.unwrap().unwrap();
        assert_eq!(answer.message, TunnelMessage::Ack { seq: 1 });
        assert_eq!(state_rx.borrow().spec().workloads.len(), 1);

        send(&agent_end, 2, &state(Some("/proc/1/ns/net")), None)
            .await
            .unwrap();
        let answer = recv::<TunnelMessage>(&agent_end).await.unwrap().unwrap();
        assert_eq!(
            answer.message,
            TunnelMessage::Nack {
                seq: 2,
                reason: NETNS_PATH_REFUSED.into()
            }
        );
        let kept = state_rx.borrow().clone();
        assert_eq!(
            kept.spec().workloads,
            vec![workload(None)],
            "the previous state stays"
        );
        drop(agent_end);
        let (result, _) = session.await.unwrap();
        assert!(result.is_ok(), "a clean end: {result:?}");
    }

    #[tokio::test]
    async fn an_agent_socket_of_another_user_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (mut follower, _state) = follower();
        follower.path = path;
        follower.agent_uid = tunnel_proto::peer::current_uid() + 4242;
        let stop = CancellationToken::new();
        let run = tokio::spawn(follower.run(stop.clone()));
        // The tunnel connects, sees the wrong user and closes without a hello.
        for _ in 0..2 {
            let (stream, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
                .await
                .unwrap()
                .unwrap();
            let first =
                tokio::time::timeout(Duration::from_secs(5), recv::<TunnelMessage>(&stream))
                    .await
                    .unwrap();
            assert!(matches!(first, Ok(None)), "{first:?}");
        }
        stop.cancel();
        run.await.unwrap();
    }

    #[tokio::test]
    async fn an_agent_whose_capture_expects_another_mark_is_refused() {
        let (tunnel_end, agent_end) = UnixStream::pair().unwrap();
        let (follower, _state) = follower();
        let agent = tokio::spawn(async move {
            let hello = AgentMessage::Hello {
                version: PROTOCOL_VERSION,
                socket_mark: Some(0x100),
            };
            let _ = handshake(&agent_end, hello).await;
            agent_end
        });
        let error = follower.greet(&tunnel_end).await.unwrap_err().to_string();
        let _agent = agent.await.unwrap();
        assert!(
            error.contains("sockets marked 0x100 alone, but this tunnel marks its sockets 0x539"),
            "{error}"
        );
    }
}
