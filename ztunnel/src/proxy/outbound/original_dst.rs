//! The address a captured connection was originally sent to.

use std::net::SocketAddr;
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

use crate::proxy::ProxyError;

/// Reads `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6) from an accepted socket.
/// Works for connections redirected by iptables/nftables and by Weft's capture programs.
pub fn original_destination(stream: &TcpStream) -> Result<SocketAddr, ProxyError> {
    let local = stream
        .local_addr()
        .map_err(ProxyError::OriginalDestination)?;
    let fd = stream.as_fd();
    let original = if local.is_ipv4() {
        let sa = getsockopt(&fd, sockopt::OriginalDst)
            .map_err(|e| ProxyError::OriginalDestination(e.into()))?;
        SocketAddr::from((
            std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        ))
    } else {
        let sa = getsockopt(&fd, sockopt::Ip6tOriginalDst)
            .map_err(|e| ProxyError::OriginalDestination(e.into()))?;
        // An IPv6 socket may have dialled an IPv4-mapped address: route it as IPv4.
        let ip = std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr).to_canonical();
        SocketAddr::new(ip, u16::from_be(sa.sin6_port))
    };
    if original == local {
        return Err(ProxyError::OriginalDestination(std::io::Error::other(
            "connection was not redirected: its original destination is the tunnel itself",
        )));
    }
    Ok(original)
}
