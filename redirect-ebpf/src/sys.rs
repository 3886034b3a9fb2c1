//! The `bpf(2)` link and pin commands capture needs that aya 0.14 does not offer for these
//! program types: creating a cgroup sockopt or sockmap link as a plain fd, pinning any link,
//! opening a pin as a plain fd, and swapping a link's program in place (`BPF_LINK_UPDATE`,
//! how a restarted loader takes over without a gap). Attribute layouts come from aya-obj's
//! generated kernel bindings.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd};

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, zero-initialised bpf_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is plain old data; all zeroes is its documented "unset" value.
    unsafe { std::mem::zeroed() }
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    // An open descriptor is never negative.
    fd.as_raw_fd() as u32
}

fn owned(rc: i64) -> OwnedFd {
    // SAFETY: the command returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Attaches `program` to `target` (a cgroup, a network namespace or a sockmap) as a bpf_link.
pub fn link_create(
    program: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: bpf_attach_type,
) -> io::Result<OwnedFd> {
    let mut attr = zeroed_attr();
    {
        attr.link_create.__bindgen_anon_1.prog_fd = fd_u32(program);
        attr.link_create.__bindgen_anon_2.target_fd = fd_u32(target);
        attr.link_create.attach_type = attach_type as u32;
    }
    sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Replaces the program of `link` with `program` atomically: no moment without one.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = zeroed_attr();
    {
        attr.link_update.link_fd = fd_u32(link);
        attr.link_update.__bindgen_anon_1.new_prog_fd = fd_u32(program);
    }
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches `link` from where it is attached now (`BPF_LINK_DETACH`), whoever else holds it:
/// unlike dropping its last pin, which the kernel finishes some time later.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = zeroed_attr();
    {
        attr.link_detach.link_fd = fd_u32(link);
    }
    sys_bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr).map(drop)
}

/// Pins a link (or any bpf object) at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = zeroed_attr();
    // `path` outlives the call that reads it.
    {
        attr.__bindgen_anon_4.bpf_fd = fd_u32(fd);
        attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    }
    sys_bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens the bpf object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = zeroed_attr();
    {
        attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    }
    sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr).map(owned)
}
