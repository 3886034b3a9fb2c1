//! Who may be at the other end of the agent-to-tunnel socket. The agent hands the tunnel
//! network namespace descriptors and the mesh's tables; the tunnel takes from the agent
//! where to open listeners. Each side checks the other's credentials (`SO_PEERCRED`) against
//! the user it expects, and the socket lives in a folder no one else can write to, so that no
//! other local process can pose as either.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixStream;

/// Why a peer or the socket's folder was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("agent socket: cannot read the peer's credentials: {0}")]
    Credentials(io::Error),
    #[error(
        "agent socket: refused a peer running as uid {uid} (pid {pid}); only uid {expected} may connect"
    )]
    WrongUser {
        uid: u32,
        pid: String,
        expected: u32,
    },
    #[error("agent socket: the folder {path} cannot be created or read: {source}")]
    Folder { path: PathBuf, source: io::Error },
    #[error(
        "agent socket: the folder {path} is {problem}, so another local user could replace the socket; use a folder owned by uid {uid} that only it can write (mode 0700 or 0711)"
    )]
    OpenFolder {
        path: PathBuf,
        problem: String,
        uid: u32,
    },
}

/// The effective user id of this process: the default peer on both sides (the agent and the
/// tunnel of one node run as the same user unless told otherwise).
pub fn current_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Refuses `stream` unless its peer runs as `expected`.
pub fn check_peer(stream: &UnixStream, expected: u32) -> Result<(), PeerError> {
    let cred = stream.peer_cred().map_err(PeerError::Credentials)?;
    if cred.uid() == expected {
        return Ok(());
    }
    Err(PeerError::WrongUser {
        uid: cred.uid(),
        pid: cred.pid().map_or("unknown".to_owned(), |p| p.to_string()),
        expected,
    })
}

/// Makes sure the folder of the socket at `socket` exists and is private: created mode 0700
/// (0711 when `peer_uid` is another user, who must reach the socket inside it); an existing
/// folder must belong to this user (or root) and be writable by no one else.
pub fn private_socket_folder(socket: &Path, peer_uid: u32) -> Result<(), PeerError> {
    let folder = match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let fail = |source| PeerError::Folder {
        path: folder.clone(),
        source,
    };
    let us = current_uid();
    let mode = if peer_uid == us { 0o700 } else { 0o711 };
    match std::fs::metadata(&folder) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&folder).map_err(fail)?;
            std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(mode))
                .map_err(fail)?;
            Ok(())
        }
        Err(e) => Err(fail(e)),
        Ok(meta) => {
            let open = |problem: String| PeerError::OpenFolder {
                path: folder.clone(),
                problem,
                uid: us,
            };
            if meta.uid() != us && meta.uid() != 0 {
                return Err(open(format!("owned by uid {}", meta.uid())));
            }
            if meta.mode() & 0o022 != 0 {
                return Err(open(format!(
                    "writable by others (mode {:04o})",
                    meta.mode() & 0o7777
                )));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_of_another_user_is_refused_with_both_ids() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(check_peer(&a, current_uid()).is_ok());
        let error = check_peer(&a, current_uid() + 4242)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&format!("uid {}", current_uid()))
                && error.contains(&format!("only uid {} may connect", current_uid() + 4242)),
            "{error}"
        );
    }

    #[test]
    fn the_socket_folder_is_made_private_and_an_open_one_is_refused() {
        let top = tempfile::tempdir().unwrap();
        let socket = top.path().join("run/weft/agent.sock");
        private_socket_folder(&socket, current_uid()).unwrap();
        let mode = std::fs::metadata(socket.parent().unwrap()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let other = top.path().join("other/agent.sock");
        private_socket_folder(&other, current_uid() + 1).unwrap();
        let mode = std::fs::metadata(other.parent().unwrap()).unwrap().mode() & 0o777;
        assert_eq!(
            mode, 0o711,
            "another user's tunnel may reach the socket, not list"
        );

        let open = top.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let error = private_socket_folder(&open.join("agent.sock"), current_uid())
            .unwrap_err()
            .to_string();
        assert!(error.contains("writable by others (mode 1777)"), "{error}");
    }
}
