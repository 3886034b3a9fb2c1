//! The agent's end of the tunnel protocol (`tunnel_proto::protocol`): it listens on a Unix
//! socket, the node's tunnel connects (again after any restart of either side), gets a full
//! snapshot of the local pods (each with its network namespace descriptor) and the tables,
//! then only the changes. Frames go out ahead of their answers (up to [`WINDOW`] unanswered;
//! the tunnel handles them in order), and `sync` returns once every one is answered, so the
//! tunnel's listeners then follow what was sent.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};
use tunnel_proto::StateSpec;
use tunnel_proto::protocol::{
    AgentMessage, PROTOCOL_VERSION, ProtocolError, TunnelMessage, handshake, recv, send,
};

/// How long the tunnel may take to answer one frame before the connection is dropped.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames sent before the first of them must be answered. Sending a hundred pods' `add_pod`
/// one round trip at a time cost ~15 ms of a namespace label's effect; answers are small, so
/// neither side's socket buffer fills while the other is writing.
const WINDOW: usize = 64;

/// Why the tunnel could not be brought up to date (the connection is dropped; the tunnel
/// reconnects and gets a snapshot).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot listen on the tunnel socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the tunnel did not answer frame {seq} within {ANSWER_TIMEOUT:?}")]
    Timeout { seq: u64 },
    #[error("the tunnel answered frame {got} where {want} was expected")]
    OutOfOrder { want: u64, got: u64 },
}

/// What the tunnel was last told, on the live connection.
#[derive(Default)]
struct Sent {
    pods: BTreeMap<String, PathBuf>,
    state: Option<StateSpec>,
}

pub struct TunnelLink {
    listener: UnixListener,
    conn: Option<(UnixStream, Sent)>,
    seq: u64,
}

impl TunnelLink {
    /// Listens at `path`, replacing a stale socket file of an earlier run.
    pub fn bind(path: &Path) -> Result<Self, LinkError> {
        let fail = |source| LinkError::Bind {
            path: path.to_owned(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e)),
        }
        let listener = UnixListener::bind(path).map_err(fail)?;
        Ok(TunnelLink {
            listener,
            conn: None,
            seq: 0,
        })
    }

    /// Waits for a tunnel to connect (cancel-safe: nothing is lost if dropped).
    pub async fn next_connection(&self) -> std::io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }

    /// Greets a connected tunnel; the next `sync` sends it a snapshot.
    pub async fn adopt(&mut self, stream: UnixStream) -> Result<(), LinkError> {
        handshake(
            &stream,
            AgentMessage::Hello {
                version: PROTOCOL_VERSION,
            },
        )
        .await?;
        info!("tunnel connected");
        // A newer tunnel connection replaces the old one (the old tunnel is gone or going).
        self.conn = Some((stream, Sent::default()));
        Ok(())
    }

    /// Whether a tunnel is connected.
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Brings the connected tunnel (if any) to `pods` (key -> network namespace path) and
    /// `state`: a snapshot on a new connection, the changes otherwise. On any failure the
    /// connection is dropped and the error returned.
    pub async fn sync(
        &mut self,
        pods: &BTreeMap<String, PathBuf>,
        state: &StateSpec,
    ) -> Result<(), LinkError> {
        let Some((stream, sent)) = self.conn.take() else {
            return Ok(());
        };
        let mut sent = sent;
        let result = Self::update(&stream, &mut self.seq, &mut sent, pods, state).await;
        if result.is_ok() {
            self.conn = Some((stream, sent));
        }
        result
    }

    async fn update(
        stream: &UnixStream,
        seq: &mut u64,
        sent: &mut Sent,
        pods: &BTreeMap<String, PathBuf>,
        state: &StateSpec,
    ) -> Result<(), LinkError> {
        let snapshot = sent.state.is_none();
        let mut frames = Pipeline {
            stream,
            seq,
            waiting: VecDeque::new(),
        };
        if snapshot {
            frames.push(&AgentMessage::SnapshotStart, None).await?;
        }
        let mut added = Vec::new();
        for (key, netns) in pods {
            if !snapshot && sent.pods.get(key) == Some(netns) {
                continue;
            }
            let file = match std::fs::File::open(netns) {
                Ok(file) => file,
                Err(e) => {
                    warn!(pod = %key, netns = %netns.display(), error = %e, "cannot open the pod's network namespace; not sent to the tunnel");
                    continue;
                }
            };
            frames
                .push(
                    &AgentMessage::AddPod { key: key.clone() },
                    Some(file.as_fd()),
                )
                .await?;
            added.push((key.clone(), netns.clone()));
        }
        let gone: Vec<String> = sent
            .pods
            .keys()
            .filter(|k| !pods.contains_key(*k))
            .cloned()
            .collect();
        let changed = snapshot || !added.is_empty() || !gone.is_empty();
        if changed || sent.state.as_ref() != Some(state) {
            let message = AgentMessage::State {
                state: state.clone(),
            };
            frames.push(&message, None).await?;
        }
        if !snapshot {
            for key in &gone {
                frames
                    .push(&AgentMessage::RemovePod { key: key.clone() }, None)
                    .await?;
            }
        }
        if snapshot {
            frames.push(&AgentMessage::SnapshotEnd, None).await?;
        }
        frames.finish().await?;
        sent.pods.extend(added);
        for key in gone {
            sent.pods.remove(&key);
        }
        sent.state = Some(state.clone());
        if snapshot {
            info!(pods = pods.len(), "snapshot sent to the tunnel");
        }
        Ok(())
    }
}

/// Frames on their way to the tunnel, answered in the order they were sent.
struct Pipeline<'a> {
    stream: &'a UnixStream,
    seq: &'a mut u64,
    /// Sequence numbers sent and not answered yet, oldest first.
    waiting: VecDeque<u64>,
}

impl Pipeline<'_> {
    /// Sends one frame, first taking the oldest answer if [`WINDOW`] frames are unanswered.
    async fn push(
        &mut self,
        message: &AgentMessage,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<(), LinkError> {
        if self.waiting.len() >= WINDOW {
            self.answer().await?;
        }
        *self.seq += 1;
        send(self.stream, *self.seq, message, fd).await?;
        self.waiting.push_back(*self.seq);
        Ok(())
    }

    /// Takes every outstanding answer.
    async fn finish(mut self) -> Result<(), LinkError> {
        while !self.waiting.is_empty() {
            self.answer().await?;
        }
        Ok(())
    }

    /// Takes the oldest outstanding answer; a refusal is logged (the tunnel keeps what it
    /// had), a missing or mismatched answer fails.
    async fn answer(&mut self) -> Result<(), LinkError> {
        let Some(want) = self.waiting.pop_front() else {
            return Ok(());
        };
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, recv::<TunnelMessage>(self.stream))
            .await
            .map_err(|_| LinkError::Timeout { seq: want })??;
        let Some(frame) = answer else {
            return Err(ProtocolError::Io(std::io::ErrorKind::UnexpectedEof.into()).into());
        };
        match frame.message {
            TunnelMessage::Ack { seq } if seq == want => Ok(()),
            TunnelMessage::Nack { seq, reason } if seq == want => {
                warn!(seq, "the tunnel refused an update: {reason}");
                Ok(())
            }
            TunnelMessage::Ack { seq } | TunnelMessage::Nack { seq, .. } => {
                Err(LinkError::OutOfOrder { want, got: seq })
            }
            TunnelMessage::Hello { .. } => Err(LinkError::OutOfOrder { want, got: 0 }),
        }
    }
}
