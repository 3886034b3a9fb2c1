//! `cgroup/connect4` and `connect6`: a TCP connect from an enrolled pod's namespace goes to
//! the tunnel's outbound listener on 127.0.0.1 (or ::1) in that same namespace; the original
//! destination is recorded under the socket's cookie. A connect whose destination cannot be
//! recorded is refused (the tunnel could not route it, and letting it out would send it in
//! clear): capture fails closed.

use aya_ebpf::EbpfContext;
use aya_ebpf::helpers::{
    bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
};
use aya_ebpf::macros::{cgroup_sock, cgroup_sock_addr, map};
use aya_ebpf::maps::{HashMap, PerCpuArray};
use aya_ebpf::programs::{SockAddrContext, SockContext};
use redirect_common::{
    CAPTURE_STATS_LEN, DEFAULT_TUNNEL_MARK, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, OriginalDst,
    PodSettings, STAT_REFUSED_UNRECORDED, ipv4_mapped, is_mesh_port,
};

/// Enrolled pods: netns cookie -> settings.
#[map]
pub(crate) static ENROLLED: HashMap<u64, PodSettings> = HashMap::with_max_entries(4096, 0);

/// Captured connections: socket cookie -> original destination, from the connect until
/// `sockops` moves it under the client's address as the first SYN leaves (in the same
/// `connect` call) or, for a connect that failed before that, until the socket is released.
/// A plain hash, not an LRU: a record is never evicted while its connection is being set up;
/// when all entries are taken, connects are refused.
#[map]
pub(crate) static ORIGINAL_DST: HashMap<u64, OriginalDst> = HashMap::with_max_entries(65536, 0);

/// Per-CPU counters (slots in `redirect_common`: `STAT_*`).
#[map]
static CAPTURE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CAPTURE_STATS_LEN, 0);

/// Adds one to counter `slot`.
pub(crate) fn count(slot: u32) {
    if let Some(counter) = CAPTURE_STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot, touched only by this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

/// The tunnel's socket mark, set by the loader; 0: none (the cgroup exclusion alone).
#[unsafe(no_mangle)]
static TUNNEL_MARK: u32 = DEFAULT_TUNNEL_MARK;

/// Let the connect go on (rewritten or not).
const ALLOW: i32 = 1;
/// Refuse the connect: the application gets `EPERM`.
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const LOOPBACK_NET: u32 = 127;
/// Deepest cgroup level searched for an excluded ancestor (Kubernetes containers sit at 4 to 7).
const MAX_CGROUP_DEPTH: i32 = 16;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// Cgroups whose processes are never captured (the tunnel's): cgroup id -> unused.
#[map]
static EXCLUDED_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(64, 0);

/// Whether the calling process lives in an excluded cgroup or below one.
fn in_excluded_cgroup() -> bool {
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: helper valid for cgroup sock_addr programs; 0 past the process's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        // SAFETY: map lookup with a key on the stack.
        if unsafe { EXCLUDED_CGROUPS.get(&id) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// The settings of the enrolled pod making this TCP connect, unless it must be left alone
/// (not TCP, not enrolled, or the tunnel's own socket: marked, or made by a process in the
/// tunnel's cgroup).
fn capturable(ctx: &SockAddrContext) -> Option<PodSettings> {
    // SAFETY: the kernel hands a valid bpf_sock_addr to connect programs.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return None;
    }
    // SAFETY: helper valid for sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: map lookup with a key on the stack; the value is copied out.
    let settings = unsafe { ENROLLED.get(&netns) }.copied()?;
    // SAFETY: `sk` is always set for connect programs.
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    // SAFETY: a global written only by the loader before attach.
    let tunnel_mark = unsafe { core::ptr::read_volatile(&TUNNEL_MARK) };
    if tunnel_mark != 0 && !sk.is_null() && unsafe { (*sk).mark } == tunnel_mark {
        return None;
    }
    if in_excluded_cgroup() {
        return None;
    }
    Some(settings)
}

/// Whether the pod excludes this destination port from capture.
fn port_excluded(settings: &PodSettings, port: u16) -> bool {
    let count = settings.excluded_port_count as usize;
    let mut i = 0;
    while i < MAX_EXCLUDED_PORTS {
        if i < count && settings.excluded_ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether the pod excludes this destination (IPv6 bytes, IPv4 as IPv4-mapped) from capture.
fn cidr_excluded(settings: &PodSettings, addr: &[u8; 16]) -> bool {
    let count = settings.excluded_cidr_count as usize;
    let mut i = 0;
    while i < MAX_EXCLUDED_CIDRS {
        if i < count && settings.excluded_cidrs[i].contains(addr) {
            return true;
        }
        i += 1;
    }
    false
}

/// Files the original destination under the socket cookie; false if it could not be filed
/// (the map is full): the connect is then refused and counted.
fn record(ctx: &SockAddrContext, addr: [u8; 16], port: u16) -> bool {
    let original = OriginalDst {
        addr,
        port,
        _pad: [0; 6],
    };
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let recorded = ORIGINAL_DST.insert(&cookie, &original, 0).is_ok();
    if !recorded {
        count(STAT_REFUSED_UNRECORDED);
    }
    recorded
}

/// `cgroup/sock_release`: a socket whose connect was captured but failed before its first SYN
/// (no route, no local port) still has its record; it goes with the socket.
#[cgroup_sock(sock_release)]
pub fn forget_original_dst(ctx: SockContext) -> i32 {
    // SAFETY: helper valid for cgroup sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ORIGINAL_DST.remove(&cookie);
    ALLOW
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(settings) = capturable(ctx) else {
        return Ok(ALLOW);
    };
    // SAFETY: the kernel hands a valid bpf_sock_addr to connect programs.
    let sa = unsafe { &mut *ctx.sock_addr };
    if u32::from_be(sa.user_ip4) >> 24 == LOOPBACK_NET {
        return Ok(ALLOW);
    }
    let port = u16::from_be(sa.user_port as u16);
    let addr = ipv4_mapped(sa.user_ip4);
    if is_mesh_port(port) || port_excluded(&settings, port) || cidr_excluded(&settings, &addr) {
        return Ok(ALLOW);
    }
    if !record(ctx, addr, port) {
        return Err(REFUSE);
    }
    sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    sa.user_port = u32::from(settings.outbound_port.to_be());
    Ok(ALLOW)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(settings) = capturable(ctx) else {
        return Ok(ALLOW);
    };
    // SAFETY: the kernel hands a valid bpf_sock_addr to connect programs.
    let sa = unsafe { &mut *ctx.sock_addr };
    let mut addr = [0u8; 16];
    for (i, word) in sa.user_ip6.iter().enumerate() {
        addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let loopback6 = addr == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let loopback4_mapped =
        addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] && addr[12] == 127;
    if loopback6 || loopback4_mapped {
        return Ok(ALLOW);
    }
    let port = u16::from_be(sa.user_port as u16);
    if is_mesh_port(port) || port_excluded(&settings, port) || cidr_excluded(&settings, &addr) {
        return Ok(ALLOW);
    }
    if !record(ctx, addr, port) {
        return Err(REFUSE);
    }
    // One 4-byte store per word: the verifier refuses wider stores into user_ip6.
    // SAFETY: fields of the context this program may write.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip6[0], 0);
        core::ptr::write_volatile(&mut sa.user_ip6[1], 0);
        core::ptr::write_volatile(&mut sa.user_ip6[2], 0);
        core::ptr::write_volatile(&mut sa.user_ip6[3], u32::from_ne_bytes([0, 0, 0, 1]));
        core::ptr::write_volatile(&mut sa.user_port, u32::from(settings.outbound_port.to_be()));
    }
    Ok(ALLOW)
}
