//! The SOCKS5 entry: any bytes from a pod's process end in a destination or a refusal.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

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
