//! The SOCKS5 handshake (RFC 1928), CONNECT with no authentication: an explicit way into the
//! mesh for clients that are not captured.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proxy::ProxyError;

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

/// SOCKS5 reply codes.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

impl Reply {
    /// The reply that best tells the client why its connection failed.
    pub fn for_error(error: &ProxyError) -> Reply {
        match error {
            ProxyError::Connect { .. } | ProxyError::ConnectRefused { .. } => {
                Reply::ConnectionRefused
            }
            ProxyError::HboneConnect { .. } | ProxyError::ConnectTimeout { .. } => {
                Reply::HostUnreachable
            }
            ProxyError::NoHealthyUpstream { .. } => Reply::NetworkUnreachable,
            _ => Reply::GeneralFailure,
        }
    }
}

async fn io<T>(result: std::io::Result<T>) -> Result<T, ProxyError> {
    result.map_err(|e| ProxyError::Socks(format!("client went away: {e}")))
}

/// Reads the greeting and the CONNECT request; returns the requested destination. The caller
/// answers with [`reply`] once it knows whether the destination is reachable.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<SocketAddr, ProxyError> {
    let mut head = [0u8; 2];
    io(stream.read_exact(&mut head).await).await?;
    if head[0] != VERSION {
        return Err(ProxyError::Socks(format!(
            "version {} is not SOCKS5",
            head[0]
        )));
    }
    let mut methods = vec![0u8; head[1] as usize];
    io(stream.read_exact(&mut methods).await).await?;
    if !methods.contains(&NO_AUTH) {
        io(stream.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await).await?;
        return Err(ProxyError::Socks(
            "client offers no 'no authentication' method".into(),
        ));
    }
    io(stream.write_all(&[VERSION, NO_AUTH]).await).await?;

    let mut request = [0u8; 4];
    io(stream.read_exact(&mut request).await).await?;
    if request[0] != VERSION {
        return Err(ProxyError::Socks(format!(
            "request version {} is not SOCKS5",
            request[0]
        )));
    }
    if request[1] != CMD_CONNECT {
        reply(stream, Reply::CommandNotSupported).await;
        return Err(ProxyError::Socks(format!(
            "command {} is not supported; only CONNECT",
            request[1]
        )));
    }
    let ip = match request[3] {
        ATYP_V4 => {
            let mut b = [0u8; 4];
            io(stream.read_exact(&mut b).await).await?;
            Ipv4Addr::from(b).into()
        }
        ATYP_V6 => {
            let mut b = [0u8; 16];
            io(stream.read_exact(&mut b).await).await?;
            Ipv6Addr::from(b).into()
        }
        ATYP_DOMAIN => {
            reply(stream, Reply::AddressTypeNotSupported).await;
            return Err(ProxyError::Socks("domain names are not resolved by the tunnel; resolve on the client (curl --socks5, not --socks5-hostname)".into()));
        }
        other => {
            reply(stream, Reply::AddressTypeNotSupported).await;
            return Err(ProxyError::Socks(format!("unknown address type {other}")));
        }
    };
    let mut port = [0u8; 2];
    io(stream.read_exact(&mut port).await).await?;
    Ok(SocketAddr::new(ip, u16::from_be_bytes(port)))
}

/// Sends the reply to the CONNECT request; errors are ignored since the client may be gone.
pub async fn reply<S: AsyncWrite + Unpin>(stream: &mut S, code: Reply) {
    // Bound address: zeros, as most proxies answer.
    let msg = [VERSION, code as u8, 0, ATYP_V4, 0, 0, 0, 0, 0, 0];
    let _ = stream.write_all(&msg).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_an_ipv6_connect_request() {
        let (mut client, mut server) = crate::test_support::tcp_pair().await;
        let mut req = vec![5, 1, 0, 5, 1, 0, 4];
        req.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        req.extend_from_slice(&8080u16.to_be_bytes());
        client.write_all(&req).await.unwrap();
        let dst = handshake(&mut server).await.unwrap();
        assert_eq!(dst, "[fd00::2]:8080".parse().unwrap());
        reply(&mut server, Reply::Succeeded).await;
        let mut answer = [0u8; 12];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer[..4], &[5, 0, 5, 0]);
    }

    #[tokio::test]
    async fn refuses_domain_names_with_a_reason() {
        let (mut client, mut server) = crate::test_support::tcp_pair().await;
        client
            .write_all(&[5, 1, 0, 5, 1, 0, 3, 3, b'f', b'o', b'o', 0, 80])
            .await
            .unwrap();
        let err = handshake(&mut server).await.unwrap_err();
        assert!(err.to_string().contains("--socks5-hostname"), "{err}");
        let mut answer = [0u8; 4];
        client.read_exact(&mut answer[..2]).await.unwrap();
        client.read_exact(&mut answer[2..4]).await.unwrap();
        assert_eq!(answer[3], Reply::AddressTypeNotSupported as u8);
    }
}
