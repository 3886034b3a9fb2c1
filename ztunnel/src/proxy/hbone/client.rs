//! Opening one CONNECT stream to a destination tunnel over a pooled connection.

use std::net::SocketAddr;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};

use super::ERROR_HEADER;
use super::pool::{Checkout, Pool, PoolKey};
use crate::netns::SocketFactory;
use crate::proxy::ProxyError;

/// An established CONNECT stream; holds its pool slot until dropped.
pub struct HboneStream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub _slot: Checkout,
}

/// Sends `CONNECT target` to the tunnel at `key.destination` and waits for its 200.
pub async fn connect(
    pool: &Pool,
    key: &PoolKey,
    sockets: &SocketFactory,
    target: SocketAddr,
) -> Result<HboneStream, ProxyError> {
    let slot = pool.checkout(key, sockets).await?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .map_err(|e| ProxyError::BadTarget(format!("{target}: {e}")))?;
    let mut sender = slot.sender.clone().ready().await?;
    let (response, send) = sender.send_request(request, false)?;
    let response = response.await?;
    if response.status() != StatusCode::OK {
        let reason = response
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        return Err(ProxyError::ConnectRefused {
            target,
            status: response.status(),
            reason,
        });
    }
    Ok(HboneStream {
        send,
        recv: response.into_body(),
        _slot: slot,
    })
}
