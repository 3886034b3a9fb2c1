//! The agent-to-tunnel protocol: any bytes from the peer are read as frames by both sides'
//! readers; each ends in a frame, a clean end or an error, never a panic or a hang.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use tunnel_proto::protocol::{AgentMessage, TunnelMessage, recv};

#[path = "support/runtime.rs"]
mod support;
use support::runtime;

/// Feeds `bytes` to a reader of `M` frames until it stops.
fn read_all<M: serde::de::DeserializeOwned>(bytes: &[u8]) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
    let mut theirs = theirs;
    // The kernel buffers what a fuzz input holds (they are kept small); then the peer closes.
    let _ = theirs.write_all(bytes);
    drop(theirs);
    ours.set_nonblocking(true).expect("non-blocking");
    runtime().block_on(async move {
        let ours = tokio::net::UnixStream::from_std(ours).expect("registered");
        while let Ok(Some(_)) = recv::<M>(&ours).await {}
    });
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 64 * 1024 {
        return;
    }
    read_all::<AgentMessage>(data);
    read_all::<TunnelMessage>(data);
});
