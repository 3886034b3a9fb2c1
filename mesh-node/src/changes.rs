//! A source's signal that the cluster may have changed: raised by its background watcher (a
//! Kubernetes watch event, an inotify event on the manifest folder), taken by the agent's loop,
//! which then acts at once instead of at its next poll.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

#[derive(Debug)]
pub struct Changes {
    pending: AtomicBool,
    wake: Notify,
}

impl Default for Changes {
    /// Starts raised: the first look always reads everything.
    fn default() -> Self {
        Changes {
            pending: AtomicBool::new(true),
            wake: Notify::new(),
        }
    }
}

impl Changes {
    /// Something may have changed; wakes the waiter (or the next one: a wake-up is kept).
    pub fn raise(&self) {
        self.pending.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether anything was raised since the last take (and clears it).
    pub fn take(&self) -> bool {
        self.pending.swap(false, Ordering::AcqRel)
    }

    /// Waits for the next raise (returns at once if one came while nobody waited).
    pub async fn raised(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_raise_wakes_a_waiter_once_even_before_it_waits() {
        let changes = std::sync::Arc::new(Changes::default());
        assert!(changes.take(), "raised at first");
        assert!(!changes.take());
        changes.raise();
        tokio::time::timeout(Duration::from_secs(1), changes.raised())
            .await
            .expect("the raise before waiting is kept");
        assert!(changes.take());
        let waiter = tokio::spawn({
            let changes = changes.clone();
            async move { changes.raised().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "nothing raised yet");
        changes.raise();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
