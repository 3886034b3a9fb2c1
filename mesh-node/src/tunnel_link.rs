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

use std::os::unix::fs::PermissionsExt;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{info, warn};
use tunnel_proto::StateSpec;
use tunnel_proto::peer::{PeerError, check_peer, current_uid, private_socket_folder};
use tunnel_proto::protocol::{
    AgentMessage, PROTOCOL_VERSION, ProtocolError, TunnelMessage, handshake, recv, send,
};

/// How long the tunnel may take to answer one frame before the connection is dropped.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connecting tunnel may take to say hello before it is dropped.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

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
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("the tunnel did not answer frame {seq} within {ANSWER_TIMEOUT:?}")]
    Timeout { seq: u64 },
    #[error("the tunnel answered frame {got} where {want} was expected")]
    OutOfOrder { want: u64, got: u64 },
}

/// A plaintext inbound listener the tunnel handed over for capture to register.
#[derive(Debug)]
pub struct InboundOffer {
    /// The pod (`namespace/name`) it claims to serve.
    pub pod: String,
    /// The addresses it claims for it.
    pub ips: Vec<std::net::IpAddr>,
    pub fd: std::os::fd::OwnedFd,
}

/// What the tunnel was last told, on the live connection.
#[derive(Default)]
struct Sent {
    pods: BTreeMap<String, PathBuf>,
    state: Option<StateSpec>,
}

pub struct TunnelLink {
    /// Tunnels that connected, passed the credential check and said hello.
    greeted: mpsc::Receiver<UnixStream>,
    /// Accepts and greets connections apart from the agent's loop, so that a peer that
    /// connects and stays silent stalls nothing.
    intake: AbortOnDrop,
    conn: Option<(UnixStream, Sent)>,
    seq: u64,
}

/// Aborts the intake task with the link.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TunnelLink {
    /// Listens at `path` (in a private folder, replacing a stale socket file of an earlier
    /// run) for a tunnel running as `tunnel_uid`; tells it the socket mark capture leaves
    /// alone, if capture is driven.
    pub fn bind(path: &Path, tunnel_uid: u32, socket_mark: Option<u32>) -> Result<Self, LinkError> {
        let fail = |source| LinkError::Bind {
            path: path.to_owned(),
            source,
        };
        private_socket_folder(path, tunnel_uid)?;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e)),
        }
        let listener = UnixListener::bind(path).map_err(fail)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        if tunnel_uid != current_uid() {
            std::os::unix::fs::chown(path, Some(tunnel_uid), None).map_err(fail)?;
        }
        let (tx, greeted) = mpsc::channel(1);
        let hello = AgentMessage::Hello {
            version: PROTOCOL_VERSION,
            socket_mark,
        };
        let intake = AbortOnDrop(tokio::spawn(intake(listener, tunnel_uid, hello, tx)));
        Ok(TunnelLink {
            greeted,
            intake,
            conn: None,
            seq: 0,
        })
    }

    /// Waits for a tunnel that connected and said hello (cancel-safe: nothing is lost if
    /// dropped).
    pub async fn next_connection(&mut self) -> Option<UnixStream> {
        if self.intake.0.is_finished() {
            return std::future::pending().await;
        }
        self.greeted.recv().await
    }

    /// Takes a greeted tunnel connection; the next `sync` sends it a snapshot. A newer
    /// connection replaces the old one (the old tunnel is gone or going).
    pub fn adopt(&mut self, stream: UnixStream) {
        self.conn = Some((stream, Sent::default()));
    }

    /// Whether a tunnel is connected.
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Brings the connected tunnel (if any) to `pods` (key -> network namespace path) and
    /// `state`: a snapshot on a new connection, the changes otherwise. Returns the inbound
    /// listeners the tunnel handed over meanwhile (its pods that started). On any failure the
    /// connection is dropped and the error returned.
    pub async fn sync(
        &mut self,
        pods: &BTreeMap<String, PathBuf>,
        state: &StateSpec,
    ) -> Result<Vec<InboundOffer>, LinkError> {
        let Some((stream, sent)) = self.conn.take() else {
            return Ok(Vec::new());
        };
        let mut sent = sent;
        let mut offers = Vec::new();
        let result =
            Self::update(&stream, &mut self.seq, &mut sent, pods, state, &mut offers).await;
        if result.is_ok() {
            self.conn = Some((stream, sent));
        }
        result.map(|()| offers)
    }

    async fn update(
        stream: &UnixStream,
        seq: &mut u64,
        sent: &mut Sent,
        pods: &BTreeMap<String, PathBuf>,
        state: &StateSpec,
        offers: &mut Vec<InboundOffer>,
    ) -> Result<(), LinkError> {
        let snapshot = sent.state.is_none();
        let mut frames = Pipeline {
            stream,
            seq,
            waiting: VecDeque::new(),
            offers,
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

/// Accepts tunnels: refuses other users, greets each within [`HELLO_TIMEOUT`] on its own
/// task, and hands the greeted ones to the agent's loop.
async fn intake(
    listener: UnixListener,
    tunnel_uid: u32,
    hello: AgentMessage,
    greeted: mpsc::Sender<UnixStream>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("tunnel socket: {e}");
                // EMFILE and the like: give the node a moment instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = check_peer(&stream, tunnel_uid) {
            warn!("{e}");
            continue;
        }
        let greeted = greeted.clone();
        let hello = hello.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HELLO_TIMEOUT, handshake(&stream, hello)).await {
                Ok(Ok(_)) => {
                    info!("tunnel connected");
                    let _ = greeted.send(stream).await;
                }
                Ok(Err(e)) => warn!("tunnel socket: a connection failed its hello: {e}"),
                Err(_) => warn!(
                    "tunnel socket: a connection said no hello within {HELLO_TIMEOUT:?}; closed"
                ),
            }
        });
    }
}

/// Frames on their way to the tunnel, answered in the order they were sent.
struct Pipeline<'a> {
    stream: &'a UnixStream,
    seq: &'a mut u64,
    /// Sequence numbers sent and not answered yet, oldest first.
    waiting: VecDeque<u64>,
    /// Inbound listeners the tunnel handed over between its answers.
    offers: &'a mut Vec<InboundOffer>,
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
        loop {
            let answer = tokio::time::timeout(ANSWER_TIMEOUT, recv::<TunnelMessage>(self.stream))
                .await
                .map_err(|_| LinkError::Timeout { seq: want })??;
            let Some(frame) = answer else {
                return Err(ProtocolError::Io(std::io::ErrorKind::UnexpectedEof.into()).into());
            };
            return match frame.message {
                TunnelMessage::Ack { seq } if seq == want => Ok(()),
                TunnelMessage::Nack { seq, reason } if seq == want => {
                    warn!(seq, "the tunnel refused an update: {reason}");
                    Ok(())
                }
                TunnelMessage::InboundListener { pod, ips } => {
                    match frame.fd {
                        Some(fd) => self.offers.push(InboundOffer { pod, ips, fd }),
                        None => {
                            warn!(pod = %pod, "the tunnel offered an inbound listener without its descriptor")
                        }
                    }
                    continue;
                }
                TunnelMessage::Ack { seq } | TunnelMessage::Nack { seq, .. } => {
                    Err(LinkError::OutOfOrder { want, got: seq })
                }
                TunnelMessage::Hello { .. } => Err(LinkError::OutOfOrder { want, got: 0 }),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel_proto::protocol::{recv, send};

    /// Connects as a tunnel and reads the agent's first frame (its hello), if any.
    async fn connect(path: &Path) -> (UnixStream, Option<AgentMessage>) {
        let stream = UnixStream::connect(path).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), recv::<AgentMessage>(&stream))
            .await
            .expect("the agent answers or closes");
        let message = first.ok().flatten().map(|f| f.message);
        (stream, message)
    }

    #[tokio::test]
    async fn a_silent_peer_stalls_nothing_and_is_dropped_at_the_hello_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent.sock");
        let mut link = TunnelLink::bind(&path, current_uid(), Some(0x539)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let started = std::time::Instant::now();
        let (silent, hello) = connect(&path).await;
        assert_eq!(
            hello,
            Some(AgentMessage::Hello {
                version: PROTOCOL_VERSION,
                socket_mark: Some(0x539)
            })
        );
        // A real tunnel connecting after it is taken at once.
        let (tunnel, _) = connect(&path).await;
        send(
            &tunnel,
            0,
            &TunnelMessage::Hello {
                version: PROTOCOL_VERSION,
            },
            None,
        )
        .await
        .unwrap();
        let adopted = tokio::time::timeout(Duration::from_secs(2), link.next_connection())
            .await
            .expect("the greeted tunnel is handed over while the silent peer waits");
        assert!(adopted.is_some());
        // The silent one is closed at the deadline.
        let end = tokio::time::timeout(Duration::from_secs(10), recv::<AgentMessage>(&silent))
            .await
            .unwrap();
        assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
        let waited = started.elapsed();
        assert!(
            waited >= HELLO_TIMEOUT && waited < HELLO_TIMEOUT + Duration::from_secs(3),
            "closed after {waited:?}"
        );
    }

    #[tokio::test]
    async fn a_peer_of_another_user_gets_no_hello() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let expected = current_uid() + 4242;
        let mut link = TunnelLink::bind(&path, expected, None).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), expected);
        let (stream, hello) = connect(&path).await;
        assert_eq!(hello, None, "closed without a word");
        drop(stream);
        let none = tokio::time::timeout(Duration::from_millis(300), link.next_connection()).await;
        assert!(none.is_err(), "nothing handed to the agent");
    }
}
