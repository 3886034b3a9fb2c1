//! The cookie the kernel gives a network namespace: the enrollment key, unique and never reused.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use crate::RedirectError;

/// The cookie of the network namespace at `path` (e.g. `/run/netns/pod-a`).
pub fn netns_cookie(path: &Path) -> Result<u64, RedirectError> {
    let fail = |source: std::io::Error| RedirectError::Netns {
        path: path.to_owned(),
        source,
    };
    let ns = std::fs::File::open(path).map_err(fail)?;
    cookie_in(ns.as_fd()).map_err(fail)
}

/// The cookie of the network namespace open as `netns`.
pub fn netns_cookie_of(netns: BorrowedFd<'_>) -> Result<u64, RedirectError> {
    cookie_in(netns).map_err(|source| RedirectError::Netns {
        path: format!("/proc/self/fd/{}", netns.as_raw_fd()).into(),
        source,
    })
}

/// Runs `f` on this thread inside the network namespace `netns`, then returns to the
/// process's own namespace: ~2 µs for the pair of `setns` calls, where a helper thread costs
/// ~85 µs to start. A socket made by `f` stays in `netns` whichever thread uses it later. `f`
/// must not block or yield (the thread may belong to an async runtime). If the thread cannot
/// return, the process aborts: every later socket of that thread would be made in the wrong
/// namespace.
pub fn run_in_netns<T>(
    netns: BorrowedFd<'_>,
    f: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let home = home_netns()?;
    nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let result = f();
    if let Err(e) = nix::sched::setns(home.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET) {
        tracing::error!(error = %e, "cannot return to the process's own network namespace; aborting");
        std::process::abort();
    }
    result
}

/// The process's own network namespace, opened at the first entry into another one (by a
/// thread in its own namespace then: every entry returns before the thread does anything else).
fn home_netns() -> std::io::Result<&'static std::fs::File> {
    static HOME: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    if let Some(home) = HOME.get() {
        return Ok(home);
    }
    let home = std::fs::File::open("/proc/thread-self/ns/net")?;
    Ok(HOME.get_or_init(|| home))
}

/// Reads `SO_NETNS_COOKIE` from a socket made inside the namespace.
fn cookie_in(netns: BorrowedFd<'_>) -> std::io::Result<u64> {
    let socket = run_in_netns(netns, socket_in_current_namespace)?;
    socket_netns_cookie(socket.as_fd())
}

/// The cookie of the network namespace a socket belongs to (`SO_NETNS_COOKIE`).
pub fn socket_netns_cookie(socket: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a u64 buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// A socket of the current namespace (its cookie is the namespace's, wherever it is read).
fn socket_in_current_namespace() -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}
