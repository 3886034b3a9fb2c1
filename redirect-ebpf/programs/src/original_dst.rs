//! The original destination of a captured connection, found from the tunnel's side.
//!
//! `sockops` sees the client socket once its local port is chosen and files its original
//! destination under (netns cookie, client address, client port). `cgroup/getsockopt` answers
//! the tunnel's `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on the accepted socket from that entry,
//! exactly as conntrack would, so the tunnel does not care how the connection was captured.

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::BPF_SOCK_OPS_TCP_CONNECT_CB;
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie};
use aya_ebpf::macros::{cgroup_sockopt, map, sock_ops};
use aya_ebpf::maps::LruHashMap;
use aya_ebpf::programs::{SockOpsContext, SockoptContext};
use redirect_common::{ClientKey, OriginalDst, SO_ORIGINAL_DST, SOL_IP};

use crate::connect::ORIGINAL_DST;

/// (client netns, address, port) -> original destination.
#[map]
static BY_CLIENT: LruHashMap<ClientKey, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

const AF_INET: u16 = 2;
/// sockops and getsockopt verdict: go on as usual.
const PASS: i32 = 1;

fn mapped(ip4_network_order: u32) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..].copy_from_slice(&ip4_network_order.to_ne_bytes());
    addr
}

#[sock_ops]
pub fn file_original_dst(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return PASS as u32;
    }
    // SAFETY: helpers valid for sock_ops programs (netns cookie since 5.15).
    let (cookie, netns) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    // SAFETY: lookup with a key on the stack; the value is copied out at once.
    let Some(original) = (unsafe { ORIGINAL_DST.get(&cookie) }).copied() else {
        return PASS as u32;
    };
    let key = ClientKey {
        netns_cookie: netns,
        addr: mapped(ctx.local_ip4()),
        port: ctx.local_port() as u16,
        _pad: [0; 6],
    };
    let _ = BY_CLIENT.insert(&key, &original, 0);
    let _ = ORIGINAL_DST.remove(&cookie);
    PASS as u32
}

#[cgroup_sockopt(getsockopt)]
pub fn answer_original_dst(ctx: SockoptContext) -> i32 {
    match try_answer(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_answer(ctx: &SockoptContext) -> Result<i32, i32> {
    // SAFETY: the kernel hands a valid bpf_sockopt to getsockopt programs.
    let opt = unsafe { &mut *ctx.sockopt };
    if opt.level != SOL_IP || opt.optname != SO_ORIGINAL_DST {
        return Ok(PASS);
    }
    // SAFETY: `sk` is always set for sockopt programs.
    let sk = unsafe { opt.__bindgen_anon_1.sk };
    if sk.is_null() {
        return Ok(PASS);
    }
    // SAFETY: helper valid for sockopt programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // The accepted socket's peer is the captured client.
    let (peer_ip, peer_port) = unsafe { ((*sk).dst_ip4, u16::from_be((*sk).dst_port)) };
    let key = ClientKey {
        netns_cookie: netns,
        addr: mapped(peer_ip),
        port: peer_port,
        _pad: [0; 6],
    };
    // SAFETY: lookup with a key on the stack.
    let Some(original) = (unsafe { BY_CLIENT.get(&key) }).copied() else {
        return Ok(PASS);
    };
    // struct sockaddr_in: family, port (network order), address (network order), zero[8].
    let optval = unsafe { opt.__bindgen_anon_2.optval } as *mut u8;
    let optval_end = unsafe { opt.__bindgen_anon_3.optval_end } as *mut u8;
    // SAFETY: bounds checked against optval_end before every write, as the verifier demands.
    unsafe {
        if optval.add(16) > optval_end {
            return Ok(PASS);
        }
        let mut ip = [0u8; 4];
        ip.copy_from_slice(&original.addr[12..]);
        core::ptr::write_unaligned(optval as *mut u16, AF_INET);
        core::ptr::write_unaligned(optval.add(2) as *mut u16, original.port.to_be());
        core::ptr::write_unaligned(optval.add(4) as *mut [u8; 4], ip);
        core::ptr::write_unaligned(optval.add(8) as *mut [u8; 8], [0; 8]);
    }
    // Two separate 4-byte stores: the verifier refuses the 8-byte store the compiler would
    // otherwise merge them into ("invalid bpf_context access off=32 size=8").
    // SAFETY: fields of the context the kernel allows this program to write.
    unsafe {
        core::ptr::write_volatile(&mut opt.optlen, 16);
        core::ptr::write_volatile(&mut opt.retval, 0);
    }
    Ok(PASS)
}
