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

/// Reads `SO_NETNS_COOKIE` from a socket made inside the namespace: this thread enters it
/// with `setns`, makes the socket and goes back at once (~2 µs; a helper thread per lookup
/// cost ~85 µs, most of enrolling a pod).
fn cookie_in(netns: BorrowedFd<'_>) -> std::io::Result<u64> {
    let home = std::fs::File::open("/proc/thread-self/ns/net")?;
    nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let socket = socket_in_current_namespace();
    if let Err(e) = nix::sched::setns(home.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET) {
        // Left in a pod's namespace, this thread would make all later sockets of the process
        // there (the agent's readiness, its API connections): nothing after this is safe.
        tracing::error!(error = %e, "cannot return to the agent's network namespace; aborting");
        std::process::abort();
    }
    let socket = socket?;
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
