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

/// Reads `SO_NETNS_COOKIE` from a socket made inside the namespace on a short-lived thread.
fn cookie_in(netns: BorrowedFd<'_>) -> std::io::Result<u64> {
    let result = std::thread::scope(|scope| {
        scope
            .spawn(|| -> std::io::Result<u64> {
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
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
            })
            .join()
    });
    match result {
        Ok(cookie) => cookie,
        Err(_) => Err(std::io::Error::other("namespace thread panicked")),
    }
}
