//! The SOCKS5 entry: any bytes from a pod's process end in a destination or a refusal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

#[path = "support/runtime.rs"]
mod support;
use support::runtime;

fuzz_target!(|data: &[u8]| {
    if data.len() > 4096 {
        return;
    }
    runtime().block_on(async {
        let (mut client, mut server) = tokio::io::duplex(8192);
        let _ = client.write_all(data).await;
        drop(client);
        let _ = ztunnel::proxy::outbound::socks5::handshake(&mut server).await;
    });
});
