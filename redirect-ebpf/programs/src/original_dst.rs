//! The original destination of a captured connection, found from the tunnel's side.
//!
//! `sockops` sees the client socket once its local port is chosen and files its original
//! destination under (netns cookie, client address, client port). `cgroup/getsockopt` answers
//! the tunnel's `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on the accepted socket from that entry,
//! exactly as conntrack would, so the tunnel does not care how the connection was captured.

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::{
    BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    BPF_SOCK_OPS_TCP_CONNECT_CB,
};
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie};
use aya_ebpf::macros::{cgroup_sockopt, map, sock_ops};
use aya_ebpf::maps::LruHashMap;
use aya_ebpf::programs::{SockOpsContext, SockoptContext};
use redirect_common::{
    ClientKey, OUTBOUND_PORT, OriginalDst, SO_ORIGINAL_DST, SOL_IP, STAT_LOST, STAT_UNFILED,
    ipv4_mapped, ipv6_bytes,
};

use crate::connect::{ENROLLED, ORIGINAL_DST, count};

/// (client netns, address, port) -> original destination. An LRU: entries are not removed
/// when read (the tunnel may ask again), so the oldest make room; see ARCHITECTURE.md for
/// when a record still awaited can be evicted.
#[map]
static BY_CLIENT: LruHashMap<ClientKey, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

const AF_INET: u16 = 2;
const AF_INET6: u32 = 10;
const SOL_IPV6: i32 = 41;
/// sockops and getsockopt verdict: go on as usual.
const PASS: i32 = 1;

#[sock_ops]
pub fn file_original_dst(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        crate::fast_path::on_established(&ctx, u32::from(redirect_common::OUTBOUND_PORT));
        return PASS as u32;
    }
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB {
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
    let addr = if ctx.family() == AF_INET6 {
        // Word by word, each a load at a constant offset from the context: the verifier refuses
        // loads through a computed pointer ("dereference of modified ctx ptr").
        // SAFETY: fields of the sock_ops context, readable by this program.
        let words = unsafe {
            let ops = ctx.ops;
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ]
        };
        ipv6_bytes(words)
    } else {
        ipv4_mapped(ctx.local_ip4())
    };
    let key = ClientKey {
        netns_cookie: netns,
        addr,
        port: ctx.local_port() as u16,
        _pad: [0; 6],
    };
    if BY_CLIENT.insert(&key, &original, 0).is_err() {
        count(STAT_UNFILED);
    }
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
    let v6 = opt.level == SOL_IPV6;
    if !(opt.level == SOL_IP || v6) || opt.optname != SO_ORIGINAL_DST {
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
    // SAFETY: fields of a full socket, readable by sockopt programs.
    let (addr, peer_port, local_port) = unsafe {
        let addr = if v6 {
            // Word by word at constant offsets, as the verifier demands.
            ipv6_bytes([
                core::ptr::read_volatile(&(*sk).dst_ip6[0]),
                core::ptr::read_volatile(&(*sk).dst_ip6[1]),
                core::ptr::read_volatile(&(*sk).dst_ip6[2]),
                core::ptr::read_volatile(&(*sk).dst_ip6[3]),
            ])
        } else {
            ipv4_mapped((*sk).dst_ip4)
        };
        (addr, u16::from_be((*sk).dst_port), (*sk).src_port)
    };
    let key = ClientKey {
        netns_cookie: netns,
        addr,
        port: peer_port,
        _pad: [0; 6],
    };
    // SAFETY: lookup with a key on the stack.
    let Some(original) = (unsafe { BY_CLIENT.get(&key) }).copied() else {
        // A connection on the tunnel's outbound port of an enrolled pod has no record: it was
        // evicted, or never filed. The tunnel gets the kernel's answer (an error) and closes it.
        // SAFETY: lookup with a key on the stack.
        if local_port == u32::from(OUTBOUND_PORT) && unsafe { ENROLLED.get(&netns) }.is_some() {
            count(STAT_LOST);
        }
        return Ok(PASS);
    };
    let optval = unsafe { opt.__bindgen_anon_2.optval } as *mut u8;
    let optval_end = unsafe { opt.__bindgen_anon_3.optval_end } as *mut u8;
    let len = if v6 { 28 } else { 16 };
    // SAFETY: bounds checked against optval_end before the writes, as the verifier demands.
    unsafe {
        if v6 {
            if optval.add(28) > optval_end {
                return Ok(PASS);
            }
            // struct sockaddr_in6: family, port, flowinfo, address[16], scope_id.
            core::ptr::write_unaligned(optval as *mut u16, AF_INET6 as u16);
            core::ptr::write_unaligned(optval.add(2) as *mut u16, original.port.to_be());
            core::ptr::write_unaligned(optval.add(4) as *mut u32, 0);
            core::ptr::write_unaligned(optval.add(8) as *mut [u8; 16], original.addr);
            core::ptr::write_unaligned(optval.add(24) as *mut u32, 0);
        } else {
            if optval.add(16) > optval_end {
                return Ok(PASS);
            }
            // struct sockaddr_in: family, port, address, zero[8], all in network order.
            let mut ip = [0u8; 4];
            ip.copy_from_slice(&original.addr[12..]);
            core::ptr::write_unaligned(optval as *mut u16, AF_INET);
            core::ptr::write_unaligned(optval.add(2) as *mut u16, original.port.to_be());
            core::ptr::write_unaligned(optval.add(4) as *mut [u8; 4], ip);
            core::ptr::write_unaligned(optval.add(8) as *mut [u8; 8], [0; 8]);
        }
    }
    // Two separate 4-byte stores: the verifier refuses the 8-byte store the compiler would
    // otherwise merge them into ("invalid bpf_context access off=32 size=8").
    // SAFETY: fields of the context the kernel allows this program to write.
    unsafe {
        core::ptr::write_volatile(&mut opt.optlen, len);
        core::ptr::write_volatile(&mut opt.retval, 0);
    }
    Ok(PASS)
}
