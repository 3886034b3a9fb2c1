//! `sk_lookup` on each enrolled pod's network namespace: a TCP connection arriving at the pod
//! from outside (not on loopback) for an application port is handed to the tunnel's plaintext
//! inbound listener (15006) of that pod, found by the destination address. The tunnel's own
//! ports (HBONE 15008 above all), anything arriving on loopback, and connections whose source
//! is the destination address itself (the pod talking to itself, and the tunnel's in-pod
//! connections to the application, which the kernel sources from the pod's own address: they
//! do not arrive on `lo`'s index) take the normal lookup. No listener
//! registered for the destination: the connection is refused (fail closed), never delivered to
//! the application unseen.

use aya_ebpf::bindings::sk_action::{SK_DROP, SK_PASS};
use aya_ebpf::macros::{map, sk_lookup};
use aya_ebpf::maps::SockHash;
use aya_ebpf::programs::SkLookupContext;
use redirect_common::{InboundKey, ipv4_mapped, ipv6_bytes, is_mesh_port};

/// Pod address -> the tunnel's plaintext inbound listener for that pod (filled by the tunnel).
#[map]
static INBOUND: SockHash<InboundKey> = SockHash::with_max_entries(8192, 0);

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
/// Loopback is the first interface of every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn inbound(ctx: SkLookupContext) -> u32 {
    let lookup = ctx.lookup;
    // One 4-byte volatile load per field: the verifier checks each context access as written.
    // SAFETY: the kernel hands a valid bpf_sk_lookup; these fields are readable.
    let (protocol, local_port, ifindex, family) = unsafe {
        (
            core::ptr::read_volatile(&(*lookup).protocol),
            core::ptr::read_volatile(&(*lookup).local_port),
            core::ptr::read_volatile(&(*lookup).ingress_ifindex),
            core::ptr::read_volatile(&(*lookup).family),
        )
    };
    if protocol != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX || is_mesh_port(local_port as u16) {
        return SK_PASS;
    }
    // Both address forms are read before choosing, each at a constant offset: a branch that
    // picked a field would make the compiler load through a computed pointer, which the
    // verifier refuses ("dereference of modified ctx ptr").
    // SAFETY: as above.
    let (local, remote) = unsafe {
        (
            address(
                family,
                core::ptr::read_volatile(&(*lookup).local_ip4),
                [
                    core::ptr::read_volatile(&(*lookup).local_ip6[0]),
                    core::ptr::read_volatile(&(*lookup).local_ip6[1]),
                    core::ptr::read_volatile(&(*lookup).local_ip6[2]),
                    core::ptr::read_volatile(&(*lookup).local_ip6[3]),
                ],
            ),
            address(
                family,
                core::ptr::read_volatile(&(*lookup).remote_ip4),
                [
                    core::ptr::read_volatile(&(*lookup).remote_ip6[0]),
                    core::ptr::read_volatile(&(*lookup).remote_ip6[1]),
                    core::ptr::read_volatile(&(*lookup).remote_ip6[2]),
                    core::ptr::read_volatile(&(*lookup).remote_ip6[3]),
                ],
            ),
        )
    };
    if local == remote {
        return SK_PASS;
    }
    let key: InboundKey = local;
    match INBOUND.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => SK_PASS,
        Err(_) => SK_DROP,
    }
}

/// The address of a lookup in the map's key form.
fn address(family: u32, ip4: u32, ip6: [u32; 4]) -> InboundKey {
    if family == AF_INET {
        ipv4_mapped(ip4)
    } else {
        ipv6_bytes(ip6)
    }
}
