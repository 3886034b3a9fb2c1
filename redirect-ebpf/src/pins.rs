//! Where capture keeps its links and maps on the BPF file system so they outlive the loader:
//! `<dir>/maps/<MAP>`, `<dir>/links/<program>` and `<dir>/links/inbound/<netns cookie>` (one
//! sk_lookup link per enrolled pod). The default `<dir>` is `<bpffs>/weft`.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::RedirectError;
use crate::mounts::{bpffs_mount, on_bpffs};

/// The pin directory capture uses unless told otherwise: `weft` on the BPF file system.
pub fn default_pin_dir() -> Result<PathBuf, RedirectError> {
    Ok(bpffs_mount()?.join("weft"))
}

/// Paths of every pin under one pin directory.
#[derive(Clone, Debug)]
pub(crate) struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// The layout under `root`, as it is.
    pub(crate) fn at(root: &Path) -> Self {
        PinLayout {
            root: root.to_owned(),
        }
    }

    /// The layout under `root`, creating its directories; `root` must be on a BPF file system.
    pub(crate) fn prepare(root: &Path) -> Result<Self, RedirectError> {
        let parent = root.parent().unwrap_or(root);
        if !on_bpffs(parent) {
            return Err(RedirectError::NotBpffs {
                path: root.to_owned(),
            });
        }
        let layout = PinLayout::at(root);
        for dir in [layout.root.clone(), layout.maps(), layout.inbound_dir()] {
            std::fs::create_dir_all(&dir).map_err(|source| RedirectError::Pin {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(layout)
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub(crate) fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub(crate) fn link(&self, name: &str) -> PathBuf {
        self.root.join("links").join(name)
    }

    fn inbound_dir(&self) -> PathBuf {
        self.root.join("links").join("inbound")
    }

    pub(crate) fn inbound_link(&self, netns_cookie: u64) -> PathBuf {
        self.inbound_dir().join(netns_cookie.to_string())
    }

    /// The pinned inbound links, by the netns cookie of their pod.
    pub(crate) fn inbound_links(&self) -> Result<Vec<(u64, PathBuf)>, RedirectError> {
        let dir = self.inbound_dir();
        let entries = std::fs::read_dir(&dir).map_err(|source| RedirectError::Pin {
            path: dir.clone(),
            source,
        })?;
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let cookie = entry.file_name().to_str()?.parse().ok()?;
                Some((cookie, entry.path()))
            })
            .collect())
    }
}

/// Removes a pin (detaching its link once no descriptor holds it); absent is fine.
pub(crate) fn remove_pin(path: &Path) -> Result<(), RedirectError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RedirectError::Pin {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Detaches the link pinned at `path` at once, then removes its pin; absent is fine. Removing
/// the pin alone releases the link only after the bpffs inode is freed (an RCU grace period
/// later), and a connection made in between is still steered by it.
pub(crate) fn detach_and_remove_pin(path: &Path) -> Result<(), RedirectError> {
    detach_link(path);
    remove_pin(path)
}

/// [`uninstall`] of `dir`, or of the default pin directory ([`default_pin_dir`]): the
/// directory looked at, and whether anything was pinned there.
pub fn uninstall_from(dir: Option<PathBuf>) -> Result<(PathBuf, bool), RedirectError> {
    let dir = match dir {
        Some(dir) => dir,
        None => default_pin_dir()?,
    };
    let removed = uninstall(&dir)?;
    Ok((dir, removed))
}

/// Removes everything capture pinned under `dir`: every link (detaching its program) and map.
/// Returns false if there was nothing to remove. Refuses a directory that is not on a BPF
/// file system or does not look like a capture pin directory.
pub fn uninstall(dir: &Path) -> Result<bool, RedirectError> {
    if !dir.exists() {
        return Ok(false);
    }
    let looks_like_ours = dir.join("maps").is_dir() || dir.join("links").is_dir();
    if !on_bpffs(dir) || !looks_like_ours {
        return Err(RedirectError::NotAPinDir {
            path: dir.to_owned(),
        });
    }
    // Detached first, at once: removing a link's last pin releases it only after the bpffs
    // inode is freed (an RCU grace period later), and a connection made in between was still
    // captured after `uninstall` returned.
    detach_links_under(&dir.join("links"));
    std::fs::remove_dir_all(dir).map_err(|source| RedirectError::Pin {
        path: dir.to_owned(),
        source,
    })?;
    Ok(true)
}

/// Detaches every link pinned under `dir` (recursively). A link that cannot be opened or
/// detached is left to its pin's removal, which detaches it a little later.
fn detach_links_under(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            detach_links_under(&path);
            continue;
        }
        detach_link(&path);
    }
}

/// Detaches the link pinned at `path`. A link that cannot be opened or detached is left to its
/// pin's removal, which detaches it a little later.
fn detach_link(path: &Path) {
    let detached = crate::sys::obj_get(path).and_then(|link| crate::sys::link_detach(link.as_fd()));
    match detached {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::debug!(path = %path.display(), %error, "link not detached before its pin is removed");
        }
    }
}
