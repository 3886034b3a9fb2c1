//! The agent-to-tunnel protocol (version [`PROTOCOL_VERSION`]) over a Unix stream socket the
//! agent listens on and the tunnel connects to. Each frame is a little-endian `u32` length and
//! that many bytes of JSON (`{"seq": n, "message": {...}}`); a frame that adds a pod carries the
//! pod's network namespace as a file descriptor (`SCM_RIGHTS`) on its first byte, and one that
//! offers a pod's plaintext inbound listener carries that socket.
//!
//! On every connection: both sides say `hello` with their version (a different version ends
//! the connection with a message naming both); then the agent sends a full snapshot
//! (`snapshot_start`, one `add_pod` per local pod, `state`, `snapshot_end`), and changes after
//! it. The tunnel answers each frame with `ack` (or `nack` with the reason) carrying its
//! `seq`; at `snapshot_end` it stops the pods the snapshot did not name and keeps the others
//! running, so either side can restart without dropping live connections of pods still
//! enrolled. Before answering a frame that started pods (and at every `snapshot_end`, for all
//! of them) the tunnel sends `inbound_listener` frames; the agent registers them with capture
//! before it enrolls those pods.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::StateSpec;

/// The protocol version this build speaks.
/// 2: messages are adjacently tagged (`{"type", "body"}`), so a large `state` is read straight
/// into its types instead of through serde's buffered form (version 1's internal tag).
/// 3: the tunnel hands each local pod's plaintext inbound listener to the agent
/// (`inbound_listener`), which registers it with capture: the tunnel needs no BPF access.
/// 4: the state carries the MeshPolicies of the node's workloads and each one's mTLS mode.
/// 5: service ports carry what they speak (`appProtocol`), which decides what is parsed.
pub const PROTOCOL_VERSION: u32 = 5;
/// Largest frame accepted (a state of tens of thousands of pods fits).
pub const MAX_FRAME: usize = 64 << 20;
/// A frame's body is read (and its memory taken) this much at a time.
const RECV_CHUNK: usize = 64 << 10;

/// What the agent sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "body", rename_all = "snake_case")]
pub enum AgentMessage {
    Hello {
        version: u32,
        /// The socket mark capture leaves alone (the tunnel must mark its sockets so); absent
        /// when the agent drives no capture.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        socket_mark: Option<u32>,
    },
    /// A full snapshot follows: pods not added before `SnapshotEnd` are to be stopped.
    SnapshotStart,
    /// A local pod to serve; its network namespace descriptor travels with this frame.
    AddPod {
        key: String,
    },
    /// A local pod no longer to serve.
    RemovePod {
        key: String,
    },
    /// The workload and service tables.
    State {
        state: StateSpec,
    },
    SnapshotEnd,
}

/// What the tunnel answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "body", rename_all = "snake_case")]
pub enum TunnelMessage {
    Hello {
        version: u32,
    },
    /// Frame `seq` was applied.
    Ack {
        seq: u64,
    },
    /// Frame `seq` was refused; the tunnel keeps what it had.
    Nack {
        seq: u64,
        reason: String,
    },
    /// A local pod's plaintext inbound listener (15006), whose descriptor travels with this
    /// frame, for capture to steer connections to `ips` (the pod's addresses of the
    /// listener's family) to it. Sent before the answer to the frame that started the pod,
    /// and again for every running pod on each new connection.
    InboundListener {
        pod: String,
        ips: Vec<std::net::IpAddr>,
    },
}

/// Why a frame could not be sent or read.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("agent socket: {0}")]
    Io(#[from] io::Error),
    #[error("agent socket: a frame of {0} bytes is over the limit of {MAX_FRAME} bytes")]
    TooLarge(usize),
    #[error("agent socket: malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("agent socket: a frame carried {0} descriptors; at most one is allowed")]
    TooManyDescriptors(usize),
    #[error("agent socket: the peer speaks protocol version {peer}, this build {ours}")]
    Version { peer: u32, ours: u32 },
    #[error(
        "agent socket: the node agent's capture leaves sockets marked {agent:#x} alone, but this tunnel marks its sockets {tunnel:#x}: its own connections would be captured; give both the same mark (mesh-node --tunnel-mark, ztunnel --socket-mark)"
    )]
    SocketMark { agent: u32, tunnel: u32 },
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    seq: u64,
    message: T,
}

/// One received frame.
#[derive(Debug)]
pub struct Frame<T> {
    pub seq: u64,
    pub message: T,
    /// The descriptor that came with it (a network namespace for `add_pod`).
    pub fd: Option<OwnedFd>,
}

/// Sends one frame, with `fd` attached if given.
pub async fn send<T: Serialize>(
    stream: &UnixStream,
    seq: u64,
    message: &T,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(&Envelope { seq, message })?;
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let mut sent = 0;
    while sent < frame.len() {
        let rest = &frame[sent..];
        let attach = (sent == 0).then_some(fd).flatten();
        let n = stream
            .async_io(Interest::WRITABLE, || {
                let fds: Vec<RawFd> = attach.iter().map(|fd| fd.as_raw_fd()).collect();
                let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
                    Vec::new()
                } else {
                    vec![ControlMessage::ScmRights(&fds)]
                };
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(rest)],
                    &cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            })
            .await?;
        sent += n;
    }
    Ok(())
}

/// Reads one frame; `None` when the peer closed the connection between frames.
pub async fn recv<T: DeserializeOwned>(
    stream: &UnixStream,
) -> Result<Option<Frame<T>>, ProtocolError> {
    let mut fds = Vec::new();
    let mut header = [0u8; 4];
    if !recv_exact(stream, &mut header, &mut fds, true).await? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    // Memory is taken as bytes arrive, not as the header claims: a peer that announces
    // 64 MiB and sends nothing holds one chunk.
    let mut body = Vec::new();
    while body.len() < len {
        let start = body.len();
        body.resize(start + (len - start).min(RECV_CHUNK), 0);
        recv_exact(stream, &mut body[start..], &mut fds, false).await?;
    }
    if fds.len() > 1 {
        return Err(ProtocolError::TooManyDescriptors(fds.len()));
    }
    let envelope: Envelope<T> = serde_json::from_slice(&body)?;
    Ok(Some(Frame {
        seq: envelope.seq,
        message: envelope.message,
        fd: fds.pop(),
    }))
}

/// Fills `buf`, collecting descriptors; false on a clean end before the first byte when
/// `eof_ok`.
async fn recv_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    eof_ok: bool,
) -> Result<bool, ProtocolError> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        let n = stream
            .async_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut *rest)];
                let mut space = nix::cmsg_space!([RawFd; 4]);
                let msg = recvmsg::<()>(
                    stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        for raw in received {
                            // SAFETY: the kernel just installed this descriptor for us.
                            fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                        }
                    }
                }
                Ok(msg.bytes)
            })
            .await?;
        if n == 0 {
            if filled == 0 && eof_ok {
                return Ok(false);
            }
            return Err(ProtocolError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        filled += n;
    }
    Ok(true)
}

/// Sends our hello and checks the peer's version; returns the peer's hello. It is read
/// without this build's types, so a peer of any version (version 1 put the version beside the
/// type, later ones in the body) is told apart from a malformed one and named.
pub async fn handshake<Ours: Serialize>(
    stream: &UnixStream,
    hello: Ours,
) -> Result<serde_json::Value, ProtocolError> {
    send(stream, 0, &hello, None).await?;
    let Some(frame) = recv::<serde_json::Value>(stream).await? else {
        return Err(ProtocolError::Io(io::ErrorKind::UnexpectedEof.into()));
    };
    let message = &frame.message;
    let version = (message.get("type").and_then(|t| t.as_str()) == Some("hello"))
        .then(|| {
            message
                .pointer("/body/version")
                .or_else(|| message.get("version"))
                .and_then(serde_json::Value::as_u64)
        })
        .flatten();
    match version.map(u32::try_from) {
        Some(Ok(PROTOCOL_VERSION)) => Ok(frame.message),
        Some(Ok(peer)) => Err(ProtocolError::Version {
            peer,
            ours: PROTOCOL_VERSION,
        }),
        _ => Err(ProtocolError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            "the first frame is not a hello",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_carry_messages_and_a_descriptor() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        let inode = std::fs::metadata("/proc/self/ns/net").map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        });
        send(
            &a,
            7,
            &AgentMessage::AddPod {
                key: "apps/web".into(),
            },
            Some(std::os::fd::AsFd::as_fd(&file)),
        )
        .await
        .unwrap();
        let big = AgentMessage::State {
            state: StateSpec {
                workloads: (0..3000)
                    .map(|i| crate::Workload {
                        name: format!("pod-{i}"),
                        namespace: "apps".into(),
                        service_account: "default".into(),
                        ips: vec![std::net::IpAddr::from([
                            10,
                            1,
                            (i / 250) as u8,
                            (i % 250) as u8,
                        ])],
                        node: "node1".into(),
                        netns: None,
                        protocol: crate::Protocol::Hbone,
                        policies: Vec::new(),
                        mtls: Default::default(),
                    })
                    .collect(),
                services: vec![],
                policies: vec![],
            },
        };
        let sender = tokio::spawn(async move {
            send(&a, 8, &big, None).await.unwrap();
            a
        });
        let first: Frame<AgentMessage> = recv(&b).await.unwrap().unwrap();
        assert_eq!(first.seq, 7);
        assert_eq!(
            first.message,
            AgentMessage::AddPod {
                key: "apps/web".into()
            }
        );
        let fd = first.fd.expect("the namespace descriptor arrives");
        let got = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        });
        assert_eq!(got.unwrap(), inode.unwrap(), "the same namespace");
        let second: Frame<AgentMessage> = recv(&b).await.unwrap().unwrap();
        let a = sender.await.unwrap();
        assert!(
            matches!(second.message, AgentMessage::State { ref state } if state.workloads.len() == 3000)
        );
        assert!(second.fd.is_none());
        drop(a);
        assert!(
            recv::<AgentMessage>(&b).await.unwrap().is_none(),
            "clean end"
        );
    }

    #[tokio::test]
    async fn malformed_frames_and_other_versions_are_refused_with_a_reason() {
        let (a, b) = UnixStream::pair().unwrap();
        let garbage = b"{not json";
        let mut frame = (garbage.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(garbage);
        a.writable().await.unwrap();
        a.try_write(&frame).unwrap();
        let error = recv::<AgentMessage>(&b).await.unwrap_err().to_string();
        assert!(error.contains("malformed frame"), "{error}");

        let (a, b) = UnixStream::pair().unwrap();
        let peer = tokio::spawn(async move {
            send(&b, 0, &TunnelMessage::Hello { version: 9 }, None)
                .await
                .unwrap();
            b
        });
        let error = handshake(
            &a,
            AgentMessage::Hello {
                version: PROTOCOL_VERSION,
                socket_mark: None,
            },
        )
        .await
        .unwrap_err()
        .to_string();
        let _b = peer.await.unwrap();
        assert!(
            error.contains("version 9")
                && error.contains(&format!("this build {PROTOCOL_VERSION}")),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_version_1_peer_is_named_not_called_malformed() {
        let (a, b) = UnixStream::pair().unwrap();
        // Version 1's hello: the version beside the type.
        let old = br#"{"seq":0,"message":{"type":"hello","version":1}}"#;
        let mut frame = (old.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(old);
        b.writable().await.unwrap();
        b.try_write(&frame).unwrap();
        let error = handshake(
            &a,
            TunnelMessage::Hello {
                version: PROTOCOL_VERSION,
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(
            error,
            format!(
                "agent socket: the peer speaks protocol version 1, this build {PROTOCOL_VERSION}"
            )
        );
        let ours: serde_json::Value = serde_json::from_slice(
            &serde_json::to_vec(&AgentMessage::State {
                state: StateSpec::default(),
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(ours["type"], "state", "{ours}");
        assert!(ours["body"]["state"].is_object(), "{ours}");
    }
}
