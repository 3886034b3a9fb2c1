//! The tunnel's side of inbound capture: it registers each local pod's plaintext inbound
//! listener (15006) under the pod's addresses in the pinned map the `sk_lookup` program reads.
//! A closed listener leaves the map by itself (the kernel drops closed sockets from socket
//! maps), so a stopped tunnel means refused connections, never unseen ones.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

use aya::maps::{Map, MapData, MapInfo, SockHash};
use redirect_common::InboundKey;

use crate::RedirectError;
use crate::pins::PinLayout;

/// Name of the pinned map (and of the kernel program's map).
pub(crate) const INBOUND_MAP: &str = "INBOUND";

/// An address as the map's key: IPv4 as IPv4-mapped IPv6.
pub(crate) fn address_key(ip: IpAddr) -> InboundKey {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The pinned inbound listener map of an installed capture.
pub struct InboundListeners {
    map: SockHash<MapData, InboundKey>,
    id: u32,
}

impl InboundListeners {
    /// Opens the map pinned under the capture pin directory `pin_dir`; fails until capture is
    /// installed there.
    pub fn open(pin_dir: &Path) -> Result<Self, RedirectError> {
        let path = PinLayout::at(pin_dir).map(INBOUND_MAP);
        let data = MapData::from_pin(&path).map_err(RedirectError::Map)?;
        let id = data.info().map_err(RedirectError::Map)?.id();
        let map = SockHash::try_from(Map::SockHash(data)).map_err(RedirectError::Map)?;
        Ok(InboundListeners { map, id })
    }

    /// The kernel id of the map pinned under `pin_dir`, if capture is installed there; a new
    /// id means capture was reinstalled and listeners must be registered again.
    pub fn pinned_id(pin_dir: &Path) -> Option<u32> {
        let path = PinLayout::at(pin_dir).map(INBOUND_MAP);
        MapInfo::from_pin(path).ok().map(|info| info.id())
    }

    /// The kernel id of this map.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Steers inbound plaintext connections to `ip` (a local pod's address) to `listener`,
    /// which must listen in that pod's network namespace with the address's family.
    pub fn register(&mut self, ip: IpAddr, listener: &impl AsRawFd) -> Result<(), RedirectError> {
        self.map
            .insert(address_key(ip), listener.as_raw_fd(), 0)
            .map_err(RedirectError::Map)
    }

    /// Forgets the listener of `ip`; its inbound connections are refused from now on.
    pub fn unregister(&mut self, ip: IpAddr) -> Result<(), RedirectError> {
        match self.map.remove(&address_key(ip)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(RedirectError::Map(e)),
        }
    }

    /// Whether a listener is registered for `ip`.
    pub fn is_registered(&self, ip: IpAddr) -> bool {
        self.map
            .keys()
            .filter_map(Result::ok)
            .any(|key| key == address_key(ip))
    }
}
