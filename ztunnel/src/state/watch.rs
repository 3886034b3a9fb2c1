//! Reloads the state file when it changes; a bad version is logged and the last good one kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info};

use tunnel_proto::file_trust::read_trusted;

use super::{State, StateError, parse_state_file};
use tunnel_proto::last_failure::LastFailure;

/// The current state; cheap to clone, and `changed()` wakes on every accepted update.
pub type StateHandle = watch::Receiver<Arc<State>>;

/// Loads `path` (which must be valid now) and keeps polling it every `interval`.
pub async fn watch_state_file(
    path: PathBuf,
    interval: Duration,
) -> Result<StateHandle, StateError> {
    let (text, state) = load(&path).await?;
    info!(path = %path.display(), workloads = state.spec().workloads.len(), services = state.spec().services.len(), "loaded state file");
    let (tx, rx) = watch::channel(Arc::new(state));
    tokio::spawn(poll(path, interval, text, tx));
    Ok(rx)
}

async fn load(path: &Path) -> Result<(String, State), StateError> {
    let text = read(path).await?;
    let state = parse_state_file(path, &text)?;
    Ok((text, state))
}

/// Largest state file read (a state of tens of thousands of pods fits).
pub const MAX_STATE_FILE: u64 = 64 << 20;

/// The state file's text, if it is Weft's to trust (no other user may change it: it names the
/// namespaces the tunnel opens listeners in) and within [`MAX_STATE_FILE`].
async fn read(path: &Path) -> Result<String, StateError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || read_trusted(&owned, MAX_STATE_FILE))
        .await
        .map_err(|e| StateError::Read {
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?
        .map_err(StateError::from)
}

async fn poll(path: PathBuf, interval: Duration, mut last: String, tx: watch::Sender<Arc<State>>) {
    let mut last_error = LastFailure::default();
    loop {
        tokio::time::sleep(interval).await;
        if tx.is_closed() {
            return;
        }
        let text = match read(&path).await {
            Ok(text) => text,
            Err(e) => {
                report(
                    &mut last_error,
                    format!("state file: {e}; keeping the previous state"),
                );
                continue;
            }
        };
        if text == last {
            continue;
        }
        match parse_state_file(&path, &text) {
            Ok(state) => {
                info!(path = %path.display(), workloads = state.spec().workloads.len(), services = state.spec().services.len(), "reloaded state file");
                last_error.clear();
                tx.send_replace(Arc::new(state));
            }
            Err(e) => report(
                &mut last_error,
                format!("refused state file update: {e}; keeping the previous state"),
            ),
        }
        last = text;
    }
}

/// Logs an error once, not on every poll.
fn report(last_error: &mut LastFailure, message: String) {
    if last_error.is_new(&message) {
        error!("{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "workloads:\n  - {name: a, namespace: default, ips: [10.0.0.1], node: n}\n";
    const BETTER: &str = "workloads:\n  - {name: a, namespace: default, ips: [10.0.0.1], node: n}\n  - {name: b, namespace: default, ips: [10.0.0.2], node: n}\n";

    #[tokio::test]
    async fn reloads_good_updates_and_keeps_state_on_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let mut rx = watch_state_file(path.clone(), Duration::from_millis(20))
            .await
            .unwrap();
        assert_eq!(rx.borrow().spec().workloads.len(), 1);

        std::fs::write(&path, "workloads: [ {name: broken").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !rx.has_changed().unwrap(),
            "a bad file must not replace the state"
        );
        assert_eq!(rx.borrow().spec().workloads.len(), 1);

        std::fs::write(&path, BETTER).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().spec().workloads.len(), 2);
    }

    #[tokio::test]
    async fn a_bad_file_at_start_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, "workloads: 3\n").unwrap();
        let err = watch_state_file(path, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("state.yaml:1:"), "{err}");
    }
}
