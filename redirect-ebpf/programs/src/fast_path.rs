//! The fast path between an application and the tunnel inside one pod: `sockops` puts both
//! ends of each in-pod connection (the app's socket to :15001 and the tunnel's accepted socket;
//! the tunnel's socket to the app on the pod's own address and the app's accepted socket) in a
//! SOCKHASH; `sk_msg` hands each message straight to the peer
//! socket's receive queue, skipping the loopback TCP stack. A miss is SK_PASS: the normal path.

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::{BPF_ANY, BPF_F_INGRESS, sk_action::SK_PASS};
use aya_ebpf::helpers::bpf_get_netns_cookie;
use aya_ebpf::macros::{map, sk_msg};
use aya_ebpf::maps::{PerCpuArray, SockHash};
use aya_ebpf::programs::{SkMsgContext, SockOpsContext};
use redirect_common::SockKey;

use crate::connect::ENROLLED;

/// Set to 1 by the loader when the fast path is on.
#[unsafe(no_mangle)]
static FAST_PATH: u8 = 0;

#[map]
static SOCKETS: SockHash<SockKey> = SockHash::with_max_entries(65536, 0);

/// Messages the fast path handed over (index 0) and passed on to the normal path (index 1).
#[map]
static FAST_PATH_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

fn count(index: u32) {
    if let Some(counter) = FAST_PATH_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, touched only by this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

/// `remote_port` of sock_ops and sk_msg contexts: network order in the upper 16 bits.
fn remote_port(raw: u32) -> u32 {
    u32::from(u16::from_be((raw >> 16) as u16))
}

/// Called by the sockops program when a connection is established (either side).
pub fn on_established(ctx: &SockOpsContext, outbound_port: u32) {
    // SAFETY: a global written only by the loader before attach.
    if unsafe { core::ptr::read_volatile(&FAST_PATH) } == 0 {
        return;
    }
    let local_port = ctx.local_port();
    let remote = remote_port(ctx.remote_port());
    // Only connections that stay inside the pod: the application's leg to the tunnel's
    // outbound listener (127.0.0.1 both ends) and the tunnel's leg to the application (the
    // pod's own address both ends).
    let (local_ip, remote_ip) = (ctx.local_ip4(), ctx.remote_ip4());
    if local_ip != remote_ip && local_port != outbound_port && remote != outbound_port {
        return;
    }
    // SAFETY: helper valid for sock_ops programs (5.15+).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: lookup with a key on the stack.
    if unsafe { ENROLLED.get(&netns) }.is_none() {
        return;
    }
    let mut key = SockKey {
        netns_cookie: netns,
        local_ip4: local_ip,
        remote_ip4: remote_ip,
        local_port,
        remote_port: remote,
    };
    // SAFETY: the context is a valid bpf_sock_ops for this callback.
    let _ = SOCKETS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY));
}

#[sk_msg]
pub fn fast_path(ctx: SkMsgContext) -> u32 {
    // SAFETY: the kernel hands a valid sk_msg_md to sk_msg programs.
    let msg = unsafe { &*ctx.msg };
    // SAFETY: helper valid for sk_msg programs (5.15+).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // The peer's key: this end's local and remote swapped.
    let mut peer = SockKey {
        netns_cookie: netns,
        local_ip4: msg.remote_ip4,
        remote_ip4: msg.local_ip4,
        local_port: remote_port(msg.remote_port),
        remote_port: msg.local_port,
    };
    // A miss (or any failure) leaves the message on the normal path: never drop.
    let verdict = SOCKETS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS));
    count(if verdict == i64::from(SK_PASS) { 0 } else { 1 });
    SK_PASS
}
