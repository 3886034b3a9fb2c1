//! Every map key and value of the capture programs, defined once for the kernel and user space.
//! All `#[repr(C)]` with explicit padding, never packed.
#![no_std]

/// Port of the tunnel's outbound listener inside each enrolled pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the tunnel's plaintext inbound listener inside each enrolled pod.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Port of the tunnel's HBONE (mTLS) listener inside each enrolled pod.
pub const HBONE_PORT: u16 = 15008;
/// Port of the tunnel's explicit SOCKS5 entry inside each enrolled pod.
pub const SOCKS5_PORT: u16 = 15080;
/// The `SO_MARK` the tunnel puts on its own sockets by default, so capture leaves them alone
/// (Istio's ztunnel uses the same value). The loader tells the programs the mark in force.
pub const DEFAULT_TUNNEL_MARK: u32 = 0x539;

/// Slots of the capture programs' per-CPU counters (`CAPTURE_STATS`).
/// Connects refused because their original destination could not be recorded (capture
/// fails closed: the application gets `EPERM`, nothing leaves in clear).
pub const STAT_REFUSED_UNRECORDED: u32 = 0;
/// Captured connections whose original destination could not be filed under the client's
/// address when they were set up: the tunnel cannot route them and closes them.
pub const STAT_UNFILED: u32 = 1;
/// The tunnel asked for the original destination of a connection accepted on its outbound
/// port in an enrolled pod and none was found (its record was evicted or never filed).
pub const STAT_LOST: u32 = 2;
/// Number of counter slots.
pub const CAPTURE_STATS_LEN: u32 = 3;

/// Whether `port` (host byte order) is one of the tunnel's own in-pod ports: connections to
/// them are never captured, either way.
pub const fn is_mesh_port(port: u16) -> bool {
    port == OUTBOUND_PORT
        || port == INBOUND_PLAINTEXT_PORT
        || port == HBONE_PORT
        || port == SOCKS5_PORT
}

/// An IPv6 address as the kernel's four network-order words, as bytes.
pub fn ipv6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    addr
}

/// Key of the inbound listener map: a local pod address, IPv4 as IPv4-mapped IPv6, network
/// byte order. The value is the tunnel's plaintext inbound listener of that pod.
pub type InboundKey = [u8; 16];

/// An IPv4 address (network byte order, as the kernel stores it) as IPv4-mapped IPv6 bytes.
pub const fn ipv4_mapped(ip_network_order: u32) -> [u8; 16] {
    let b = ip_network_order.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

/// Most destination ports one pod can exclude from capture.
pub const MAX_EXCLUDED_PORTS: usize = 8;
/// Most destination ranges (IPv4 or IPv6) one pod can exclude from capture.
pub const MAX_EXCLUDED_CIDRS: usize = 4;

/// An address range of either family in one form: the network address as IPv6 bytes (IPv4 as
/// IPv4-mapped), and the prefix length over those 128 bits (an IPv4 /n is 96 + n).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cidr {
    pub addr: [u8; 16],
    pub prefix_len: u8,
    pub _pad: [u8; 7],
}

impl Cidr {
    /// Whether `addr` (IPv6 bytes, IPv4 as IPv4-mapped) lies in this range.
    pub fn contains(&self, addr: &[u8; 16]) -> bool {
        let prefix = self.prefix_len as usize;
        let mut i = 0;
        while i < 16 {
            if prefix <= i * 8 {
                return true;
            }
            let bits = prefix - i * 8;
            let mask: u8 = if bits >= 8 { 0xff } else { 0xff << (8 - bits) };
            if self.addr[i] & mask != addr[i] & mask {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// Value of the enrollment map, keyed by the pod's network namespace cookie (`u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodSettings {
    /// Where captured connections go, host byte order (normally [`OUTBOUND_PORT`]).
    pub outbound_port: u16,
    /// How many of `excluded_ports` and `excluded_cidrs` are in use.
    pub excluded_port_count: u8,
    pub excluded_cidr_count: u8,
    pub _pad: [u8; 4],
    /// Destination ports (host byte order) left alone for this pod.
    pub excluded_ports: [u16; MAX_EXCLUDED_PORTS],
    /// Destination ranges left alone for this pod.
    pub excluded_cidrs: [Cidr; MAX_EXCLUDED_CIDRS],
}

/// The destination an application asked for, recorded when its connect was captured.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    /// IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`), network byte order.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Key of the lookup the tunnel makes for an accepted captured connection: the client's
/// namespace and address, unique across pods even though every pod uses 127.0.0.1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientKey {
    pub netns_cookie: u64,
    /// IPv4 as IPv4-mapped IPv6, network byte order.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Key of the fast-path socket hash: one end of a loopback connection between an application
/// and the tunnel's outbound listener, seen from that end. The peer's key swaps local and
/// remote. Ports in host byte order, addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockKey {
    pub netns_cookie: u64,
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_port: u32,
    pub remote_port: u32,
}

/// `SO_ORIGINAL_DST` (and `IP6T_SO_ORIGINAL_DST`), the option the tunnel reads.
pub const SO_ORIGINAL_DST: i32 = 80;
/// `SOL_IP`.
pub const SOL_IP: i32 = 0;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `repr(C)` data with explicit padding and no pointers.
    unsafe impl aya::Pod for super::PodSettings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OriginalDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClientKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockKey {}
}
