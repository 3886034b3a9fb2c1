//! The outbound path of a local pod: accept (SOCKS5 or captured) -> decide -> connect
//! (HBONE or passthrough) -> copy -> record.

mod original_dst;
mod route;
pub mod socks5;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::debug;

pub use original_dst::original_destination;
pub use route::{HBONE_PORT, Route, route};

use super::context::{Pod, Tunnel};
use super::hbone::{self, PoolKey};
use super::{ProxyError, copy};
use crate::telemetry::{ConnectionRecorder, Peer, Reporter};
use socks5::Reply;

/// How an outbound connection reached the tunnel.
#[derive(Clone, Copy, Debug)]
pub enum Entry {
    /// Explicitly, through the SOCKS5 listener (15080).
    Socks5,
    /// Transparently, captured to the outbound listener (15001).
    Captured,
}

/// Proxies one outbound connection of `pod` to wherever its application meant it to go.
pub async fn serve_outbound(
    mut client: TcpStream,
    client_addr: SocketAddr,
    entry: Entry,
    pod: Arc<Pod>,
    tunnel: Arc<Tunnel>,
) {
    let _ = client.set_nodelay(true);
    let original = match entry {
        Entry::Socks5 => socks5::handshake(&mut client).await,
        Entry::Captured => original_destination(&client),
    };
    let original = match original {
        Ok(original) => original,
        Err(error) => {
            debug!(pod = %pod.workload.key(), client = %client_addr, %error, "refused outbound connection");
            return;
        }
    };
    let decision = {
        let state = tunnel.state.borrow().clone();
        route(
            &state,
            tunnel.trust_domain(),
            original,
            &tunnel.next_endpoint,
        )
    };
    let source = tunnel.peer_of(&pod.workload, Some(client_addr));
    match decision {
        Route::Hbone {
            destination,
            identity,
            hbone,
            target,
            service,
        } => {
            let peer = Peer {
                addr: Some(target),
                ..tunnel.peer_of(&destination, None)
            };
            let recorder = ConnectionRecorder::open(
                tunnel.metrics.clone(),
                Reporter::source,
                source,
                peer,
                service,
                true,
            );
            let key = PoolKey {
                source: pod.workload.key(),
                source_identity: pod.identity.clone(),
                destination_identity: identity,
                destination: hbone,
            };
            match hbone::connect(&tunnel.pool, &key, &pod.sockets, target).await {
                Ok(stream) => {
                    accepted(&mut client, entry).await;
                    let (received, sent) = (recorder.received.clone(), recorder.sent.clone());
                    let result =
                        copy::copy_tcp_h2(client, stream.send, stream.recv, &received, &sent).await;
                    finish(recorder, result);
                }
                Err(error) => refuse(client, entry, recorder, error).await,
            }
        }
        Route::Passthrough {
            target,
            destination,
            service,
        } => {
            let peer = match &destination {
                Some(w) => Peer {
                    addr: Some(target),
                    ..tunnel.peer_of(w, None)
                },
                None => Peer {
                    addr: Some(target),
                    ..Peer::default()
                },
            };
            let recorder = ConnectionRecorder::open(
                tunnel.metrics.clone(),
                Reporter::source,
                source,
                peer,
                service,
                false,
            );
            match pod.sockets.connect(target).await {
                Ok(upstream) => {
                    accepted(&mut client, entry).await;
                    let (received, sent) = (recorder.received.clone(), recorder.sent.clone());
                    let result = copy::copy_tcp(client, upstream, &received, &sent).await;
                    finish(recorder, result);
                }
                Err(source) => {
                    refuse(
                        client,
                        entry,
                        recorder,
                        ProxyError::Connect {
                            addr: target,
                            source,
                        },
                    )
                    .await
                }
            }
        }
        Route::NoEndpoint { service } => {
            let recorder = ConnectionRecorder::open(
                tunnel.metrics.clone(),
                Reporter::source,
                source,
                Peer::default(),
                Some(service.clone()),
                false,
            );
            refuse(
                client,
                entry,
                recorder,
                ProxyError::NoHealthyUpstream { service },
            )
            .await;
        }
    }
}

async fn accepted(client: &mut TcpStream, entry: Entry) {
    if let Entry::Socks5 = entry {
        socks5::reply(client, Reply::Succeeded).await;
    }
}

async fn refuse(
    mut client: TcpStream,
    entry: Entry,
    recorder: ConnectionRecorder,
    error: ProxyError,
) {
    if let Entry::Socks5 = entry {
        socks5::reply(&mut client, Reply::for_error(&error)).await;
    }
    recorder.close(0, 0, Some(error.response_flags()), Some(&error));
}

fn finish(recorder: ConnectionRecorder, result: Result<copy::Totals, ProxyError>) {
    match result {
        Ok(totals) => recorder.close(totals.forward, totals.backward, None, None),
        Err(error) => recorder.close(0, 0, Some(error.response_flags()), Some(&error)),
    }
}
