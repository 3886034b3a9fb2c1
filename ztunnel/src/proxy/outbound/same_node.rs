//! The same-node shortcut: a connection between two pods this tunnel serves is handed from the
//! source pod's namespace to the destination pod's in process, instead of leaving through TLS
//! and HTTP/2 to the tunnel's own 15008. Both identities are the tunnel's own and the bytes
//! never cross a network, so nothing is lost against HBONE; both sides report it as HBONE
//! would (a source and a destination record, `mutual_tls`). Like Istio's ztunnel in-memory
//! fast path.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::proxy::ProxyError;
use crate::proxy::context::Pod;

/// Connects to the application of local pod `destination` at `target`, from inside that pod's
/// namespace, as its HBONE server would.
pub async fn connect(destination: &Pod, target: SocketAddr) -> Result<TcpStream, ProxyError> {
    destination
        .sockets
        .connect(target)
        .await
        .map_err(|source| ProxyError::Connect {
            addr: target,
            source,
        })
}
