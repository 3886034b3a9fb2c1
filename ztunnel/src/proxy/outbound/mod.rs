//! The outbound path of a local pod: accept (SOCKS5 or captured) -> decide -> connect
//! (HBONE or passthrough) -> copy -> record.

mod original_dst;
mod route;
pub mod socks5;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::warn;

pub use original_dst::original_destination;
pub use route::{HBONE_PORT, Route, route};

use super::authorize::{Inbound, authorize, revoked};
use super::context::{Pod, Tunnel};
use super::hbone::{self, HboneStream, PoolKey};
use super::http::{HttpConnection, serve_until_revoked};
use super::{ProxyError, copy, fail, finish};
use crate::state::PortHandling;
use crate::telemetry::{Peer, Reporter};
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
        Entry::Socks5 => {
            let deadline = tunnel.deadlines.socks5_handshake;
            tokio::time::timeout(deadline, Box::pin(socks5::handshake(&mut client)))
                .await
                .unwrap_or_else(|_| {
                    Err(ProxyError::Socks(format!(
                        "no complete request within {deadline:?}"
                    )))
                })
        }
        Entry::Captured => original_destination(&client),
    };
    let original = match original {
        Ok(original) => original,
        Err(error) => {
            warn!(pod = %pod.workload.key(), client = %client_addr, %error, "refused outbound connection");
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
    let recorder = match &decision {
        Route::Hbone {
            destination,
            target,
            service,
            ..
        } => {
            let peer = Peer {
                addr: Some(*target),
                ..tunnel.peer_of(destination, None)
            };
            tunnel.record(Reporter::source, source, peer, service.clone(), true)
        }
        Route::Passthrough {
            target,
            destination,
            service,
        } => {
            let known = destination
                .as_ref()
                .map(|w| tunnel.peer_of(w, None))
                .unwrap_or_default();
            let peer = Peer {
                addr: Some(*target),
                ..known
            };
            tunnel.record(Reporter::source, source, peer, service.clone(), false)
        }
        Route::NoEndpoint { service } => tunnel.record(
            Reporter::source,
            source,
            Peer::default(),
            Some(service.clone()),
            false,
        ),
    };
    // The same-node shortcut: when both pods are this tunnel's, the connection is handed from
    // the source pod's namespace to the destination pod's in process instead of leaving
    // through TLS and HTTP/2 to the tunnel's own 15008. Both identities are the tunnel's own
    // and the bytes never cross a network, so nothing is lost against HBONE; both sides report
    // it as HBONE would (a source and a destination record, `mutual_tls`). Like Istio's
    // ztunnel in-memory fast path.
    let local = match &decision {
        Route::Hbone {
            destination,
            target,
            service,
            ..
        } if tunnel.same_node_shortcut => tunnel.local_pods.get(&destination.key()).map(|dest| {
            let source = tunnel.peer_of(&pod.workload, Some(client_addr));
            let peer = Peer {
                addr: Some(*target),
                ..tunnel.peer_of(&dest.workload, None)
            };
            let recorder =
                tunnel.record(Reporter::destination, source, peer, service.clone(), true);
            // Decided (and revoked) as the destination's HBONE listener would, with the
            // source pod's identity.
            let inbound = Inbound {
                identity: Some(Arc::new(pod.identity.clone())),
                ip: client_addr.ip(),
                target: *target,
            };
            (dest, inbound, recorder)
        }),
        _ => None,
    };
    let upstream = match &local {
        Some((dest, inbound, _)) => match authorize(&tunnel, dest, inbound) {
            Ok(handling) => dest
                .connect(inbound.target, tunnel.deadlines.connect)
                .await
                .map(|app| Upstream::Local(app, handling)),
            Err(denied) => Err(denied),
        },
        // Boxed: connecting (a pool checkout, maybe TLS and HTTP/2 handshakes) is a large
        // state that would otherwise stay in every held connection's task for its life.
        None => Box::pin(connect_upstream(decision, &pod, &tunnel)).await,
    };
    let (shortcut, destination_recorder) = match local {
        Some((dest, inbound, recorder)) => (Some((dest, inbound)), Some(recorder)),
        None => (None, None),
    };
    match upstream {
        Ok(upstream) => {
            if let Entry::Socks5 = entry {
                socks5::reply(&mut client, Reply::Succeeded).await;
            }
            let (received, sent) = (recorder.received.clone(), recorder.sent.clone());
            let result = match upstream {
                Upstream::Hbone(stream) => {
                    copy::copy_tcp_h2(client, stream.send, stream.recv, &received, &sent, None)
                        .await
                }
                Upstream::Tcp(stream) => copy::copy_tcp(client, stream, &[received], &[sent]).await,
                Upstream::Local(app, handling) => {
                    let mut forward = vec![received];
                    let mut backward = vec![sent];
                    if let Some(other) = &destination_recorder {
                        forward.push(other.received.clone());
                        backward.push(other.sent.clone());
                    }
                    match (&shortcut, &destination_recorder) {
                        // Parsed as the destination's HBONE listener would.
                        (Some((dest, inbound)), Some(other)) if handling == PortHandling::Http => {
                            let connection = HttpConnection {
                                tunnel: tunnel.clone(),
                                pod: (*dest).clone(),
                                inbound: inbound.clone(),
                                labels: other.labels().clone(),
                            };
                            Box::pin(serve_until_revoked(
                                client, app, connection, forward, backward,
                            ))
                            .await
                        }
                        // Boxed: only shortcut connections carry the wait.
                        (Some((dest, inbound)), _) => {
                            let copy = copy::copy_tcp(client, app, &forward, &backward);
                            Box::pin(async {
                                tokio::select! {
                                    result = copy => result,
                                    refused = revoked(&tunnel, dest, inbound, handling) => Err(refused),
                                }
                            })
                            .await
                        }
                        (None, _) => copy::copy_tcp(client, app, &forward, &backward).await,
                    }
                }
            };
            match (result, destination_recorder) {
                (Ok(totals), Some(other)) => {
                    finish(other, Ok(totals));
                    finish(recorder, Ok(totals));
                }
                (Err(error), Some(other)) => {
                    fail(other, &error);
                    fail(recorder, &error);
                }
                (result, None) => finish(recorder, result),
            }
        }
        Err(error) => {
            if let Entry::Socks5 = entry {
                socks5::reply(&mut client, Reply::for_error(&error)).await;
            }
            if let Some(other) = destination_recorder {
                fail(other, &error);
            }
            fail(recorder, &error);
        }
    }
}

/// An established connection towards the destination.
enum Upstream {
    Hbone(HboneStream),
    /// Outside the mesh.
    Tcp(TcpStream),
    /// A pod of this node (the shortcut), carried as its port's handling says.
    Local(TcpStream, PortHandling),
}

/// Executes the routing decision.
async fn connect_upstream(
    decision: Route,
    pod: &Pod,
    tunnel: &Tunnel,
) -> Result<Upstream, ProxyError> {
    match decision {
        Route::Hbone {
            identity,
            hbone,
            target,
            ..
        } => {
            let key = PoolKey {
                source: pod.workload.key(),
                source_identity: pod.identity.clone(),
                destination_identity: identity,
                destination: hbone,
            };
            Ok(Upstream::Hbone(
                hbone::connect(&tunnel.pool, &key, &pod.sockets, target).await?,
            ))
        }
        Route::Passthrough { target, .. } => pod
            .connect(target, tunnel.deadlines.connect)
            .await
            .map(Upstream::Tcp),
        Route::NoEndpoint { service } => Err(ProxyError::NoHealthyUpstream { service }),
    }
}
