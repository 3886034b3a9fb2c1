//! The plaintext inbound listener of a local pod (15006): connections from outside the mesh,
//! steered here with their original destination as the local address.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::debug;

use super::authorize::{Inbound, authorize, revoked};
use super::context::{Pod, Tunnel};
use super::http::{HttpConnection, serve_until_revoked};
use super::{copy, fail, finish};
use crate::state::PortHandling;
use crate::telemetry::{Peer, Reporter};

/// Port of the plaintext inbound listener.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;

/// Proxies one plaintext connection to the pod's application.
pub async fn serve_inbound_plaintext(
    client: TcpStream,
    client_addr: SocketAddr,
    pod: Arc<Pod>,
    tunnel: Arc<Tunnel>,
) {
    let _ = client.set_nodelay(true);
    let target = match client.local_addr() {
        Ok(addr) if addr.port() != INBOUND_PLAINTEXT_PORT => addr,
        _ => {
            debug!(client = %client_addr, "refused a direct connection to the plaintext inbound port");
            return;
        }
    };
    let source = {
        let state = tunnel.state.borrow().clone();
        match state.workload_by_ip(client_addr.ip()) {
            // Without TLS the peer's identity is unproven: keep only where it comes from.
            Some(w) => Peer {
                addr: Some(client_addr),
                workload: Some(w.name.clone()),
                namespace: Some(w.namespace.clone()),
                identity: None,
            },
            None => Peer {
                addr: Some(client_addr),
                ..Peer::default()
            },
        }
    };
    let destination = Peer {
        addr: Some(target),
        ..tunnel.peer_of(&pod.workload, None)
    };
    let recorder = tunnel.record(Reporter::destination, source, destination, None, false);
    let inbound = Inbound {
        identity: None,
        ip: client_addr.ip(),
        target,
    };
    let handling = match authorize(&tunnel, &pod, &inbound) {
        Ok(handling) => handling,
        // Closed before a byte reaches the application.
        Err(error) => return fail(recorder, &error),
    };
    match Box::pin(pod.connect(target, tunnel.deadlines.connect)).await {
        Ok(app) => {
            let (received, sent) = ([recorder.received.clone()], [recorder.sent.clone()]);
            let result = match handling {
                PortHandling::Tcp => tokio::select! {
                    result = copy::copy_tcp(client, app, &received, &sent) => result,
                    refused = revoked(&tunnel, &pod, &inbound, handling) => Err(refused),
                },
                PortHandling::Http => {
                    let connection = HttpConnection {
                        tunnel: tunnel.clone(),
                        pod: pod.clone(),
                        inbound,
                        labels: recorder.labels().clone(),
                    };
                    let (read, written) = (received.to_vec(), sent.to_vec());
                    Box::pin(serve_until_revoked(client, app, connection, read, written)).await
                }
            };
            finish(recorder, result);
        }
        Err(error) => fail(recorder, &error),
    }
}
