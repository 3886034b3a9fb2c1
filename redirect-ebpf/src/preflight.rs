//! What capture needs from the machine, checked before anything is loaded, so a missing piece
//! gives one message naming it and how to fix it.

use crate::RedirectError;

/// Oldest kernel with everything capture uses (netns cookie in sockops arrived in 5.15).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// Checks privileges and the kernel version.
pub fn preflight() -> Result<(), RedirectError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(RedirectError::Privileges);
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    match kernel_version(&release) {
        Some(version) if version >= MIN_KERNEL => Ok(()),
        _ => Err(RedirectError::Kernel { release }),
    }
}

/// `(major, minor)` of a kernel release string such as `6.18.44-fc-v782`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kernel_releases() {
        assert_eq!(kernel_version("6.18.44-fc-v782"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert!(kernel_version("5.4.0").unwrap() < MIN_KERNEL);
        assert_eq!(kernel_version("garbage"), None);
    }
}
