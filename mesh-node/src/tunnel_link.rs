//! The agent's end of the tunnel protocol (`tunnel_proto::protocol`): it listens on a Unix
//! socket, the node's tunnel connects (again after any restart of either side), gets a full
//! snapshot of the local pods (each with its network namespace descriptor) and the tables,
//! then only the changes. Every frame waits for the tunnel's answer, so when `sync` returns
//! the tunnel's listeners follow what was sent.

use std::collections::BTreeMap;
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
        handshake::<_, TunnelMessage>(
            &stream,
            AgentMessage::Hello {
                version: PROTOCOL_VERSION,
            },
            |m| match m {
                TunnelMessage::Hello { version } => Some(*version),
                _ => None,
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
        if snapshot {
            exchange(stream, seq, &AgentMessage::SnapshotStart, None).await?;
        }
        let mut changed = snapshot;
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
            exchange(
                stream,
                seq,
                &AgentMessage::AddPod { key: key.clone() },
                Some(file.as_fd()),
            )
            .await?;
            sent.pods.insert(key.clone(), netns.clone());
            changed = true;
        }
        let gone: Vec<String> = sent
            .pods
            .keys()
            .filter(|k| !pods.contains_key(*k))
            .cloned()
            .collect();
        if changed || !gone.is_empty() || sent.state.as_ref() != Some(state) {
            exchange(
                stream,
                seq,
                &AgentMessage::State {
                    state: state.clone(),
                },
                None,
            )
            .await?;
            sent.state = Some(state.clone());
        }
        for key in gone {
            if !snapshot {
                exchange(
                    stream,
                    seq,
                    &AgentMessage::RemovePod { key: key.clone() },
                    None,
                )
                .await?;
            }
            sent.pods.remove(&key);
        }
        if snapshot {
            exchange(stream, seq, &AgentMessage::SnapshotEnd, None).await?;
            info!(pods = pods.len(), "snapshot sent to the tunnel");
        }
        Ok(())
    }
}

/// Sends one frame and waits for its answer; a refusal is logged (the tunnel keeps what it
/// had), a missing or mismatched answer fails.
async fn exchange(
    stream: &UnixStream,
    seq: &mut u64,
    message: &AgentMessage,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(), LinkError> {
    *seq += 1;
    let want = *seq;
    send(stream, want, message, fd).await?;
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, recv::<TunnelMessage>(stream))
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
