//! Files Weft trusts, checked before they are read: what they say decides which network
//! namespaces the node acts in and which keys it signs with, so another local user who can
//! change them (or, for keys, read them) could take the node over. A key must be its owner's
//! alone; a file or folder of configuration must be writable by its owner alone (this user
//! or root).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How much another local user may do with a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// A private key: no access for group or others.
    Secret,
    /// Configuration (a state file, a manifest folder or file, a trust root): readable by
    /// others, writable by its owner only.
    Trusted,
}

/// Why a file was not trusted.
#[derive(Debug, thiserror::Error)]
pub enum FileTrustError {
    #[error("cannot read {path}: {source}")]
    Metadata { path: PathBuf, source: io::Error },
    #[error(
        "{path} is a private key open to other users (mode {mode:04o}): make it its owner's alone (chmod 600 {path})"
    )]
    OpenSecret { path: PathBuf, mode: u32 },
    #[error(
        "{path} is writable by other users (mode {mode:04o}), who could change what Weft trusts: chmod go-w {path}"
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error(
        "{path} belongs to uid {owner}, neither this process's user ({ours}) nor root: another user could change what Weft trusts"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        ours: u32,
    },
    #[error("{path} is over the limit of {limit} bytes; refused")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{path} is not UTF-8 text")]
    NotText { path: PathBuf },
}

/// Reads a file of configuration after [`check_file`], refusing one over `limit` bytes (read
/// at most that far, so a file growing meanwhile cannot make the reader take more).
pub fn read_trusted(path: &Path, limit: u64) -> Result<String, FileTrustError> {
    use std::io::Read;
    check_file(path, Exposure::Trusted)?;
    let fail = |source| FileTrustError::Metadata {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(fail)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(fail)?;
    if bytes.len() as u64 > limit {
        return Err(FileTrustError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    String::from_utf8(bytes).map_err(|_| FileTrustError::NotText {
        path: path.to_owned(),
    })
}

/// Refuses `path` (a file or a folder) if users other than its owner could change it, or for a
/// secret read it, or if it belongs to a user other than this process's or root.
pub fn check_file(path: &Path, exposure: Exposure) -> Result<(), FileTrustError> {
    let meta = std::fs::metadata(path).map_err(|source| FileTrustError::Metadata {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    let ours = crate::peer::current_uid();
    if meta.uid() != ours && meta.uid() != 0 {
        return Err(FileTrustError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            ours,
        });
    }
    if exposure == Exposure::Secret && mode & 0o077 != 0 {
        return Err(FileTrustError::OpenSecret {
            path: path.to_owned(),
            mode,
        });
    }
    if mode & 0o022 != 0 {
        return Err(FileTrustError::Writable {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Writes a secret (a private key) readable and writable by this user only: the file is
/// created with mode 0600, and an existing one is narrowed to it before it is written.
pub fn write_secret(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.set_len(0)?;
    file.write_all(data)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn secrets_are_written_private_and_open_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ca.key");
        std::fs::write(&key, "old").unwrap();
        chmod(&key, 0o644);
        write_secret(&key, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "new");
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        check_file(&key, Exposure::Secret).unwrap();
        chmod(&key, 0o640);
        let error = check_file(&key, Exposure::Secret).unwrap_err().to_string();
        assert!(
            error.contains("open to other users (mode 0640)") && error.contains("chmod 600"),
            "{error}"
        );
    }

    #[test]
    fn a_file_over_its_limit_is_refused_naming_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, "x".repeat(100)).unwrap();
        chmod(&path, 0o644);
        assert_eq!(read_trusted(&path, 100).unwrap().len(), 100);
        let error = read_trusted(&path, 99).unwrap_err().to_string();
        assert!(error.contains("over the limit of 99 bytes"), "{error}");
    }

    #[test]
    fn configuration_writable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.yaml");
        std::fs::write(&state, "").unwrap();
        chmod(&state, 0o644);
        check_file(&state, Exposure::Trusted).unwrap();
        chmod(&state, 0o664);
        let error = check_file(&state, Exposure::Trusted)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("writable by other users (mode 0664)"),
            "{error}"
        );
        chmod(dir.path(), 0o1777);
        let error = check_file(dir.path(), Exposure::Trusted)
            .unwrap_err()
            .to_string();
        assert!(error.contains("mode 1777"), "{error}");
        std::os::unix::fs::chown(&state, Some(4242), None).unwrap();
        chmod(&state, 0o644);
        let error = check_file(&state, Exposure::Trusted)
            .unwrap_err()
            .to_string();
        assert!(error.contains("belongs to uid 4242"), "{error}");
    }
}
