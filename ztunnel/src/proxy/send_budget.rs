//! The bytes one HBONE peer's streams have read from applications and not yet written to that
//! peer's connections. A peer that stops reading would otherwise make the tunnel buffer up to
//! a read chunk and h2's send buffer (2 MiB) for each of its streams; with a budget, a stream
//! reads from its application only while the peer's bytes in flight fit, and waits otherwise
//! (the application sees back-pressure, as from any slow reader).
//!
//! Bytes count from the read ([`SendBudget::reserve`]) to the moment their DATA frame is
//! written into the peer's TLS session, seen below h2 by the connection's [`SendLedger`], so
//! h2's own buffers are inside the budget. The ledger keeps what each stream handed h2 and not
//! yet written: a stream reset either way (h2 drops its buffered data) or a closed connection
//! gives its bytes back, so nothing stays counted after it is gone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

#[derive(Debug)]
pub struct SendBudget {
    limit: u64,
    in_flight: AtomicU64,
    /// Streams waiting for room; writes wake them only when there are any.
    waiting: AtomicUsize,
    freed: Notify,
}

impl SendBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(SendBudget {
            limit,
            in_flight: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
        })
    }

    /// Waits until `n` more bytes fit (a chunk larger than the whole budget fits once nothing
    /// else is in flight), then counts them.
    pub async fn reserve(&self, n: u64) {
        if !self.try_reserve(n) {
            // Boxed: the waiting state is rare, and every stream's task would carry it.
            Box::pin(self.wait_to_reserve(n)).await;
        }
    }

    async fn wait_to_reserve(&self, n: u64) {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a write between the two still wakes this one.
            freed.as_mut().enable();
            if self.try_reserve(n) {
                return;
            }
            freed.await;
        }
    }

    fn try_reserve(&self, n: u64) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now == 0 || now.saturating_add(n) <= self.limit).then_some(now.saturating_add(n))
            })
            .is_ok()
    }

    /// Reserved bytes that were not read after all.
    pub fn give_back(&self, n: u64) {
        self.release(n);
    }

    /// `n` bytes went out to the peer.
    pub fn written(&self, n: u64) {
        self.release(n);
    }

    /// Bytes counted now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                Some(now.saturating_sub(n))
            });
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }
}

/// What the streams of one connection handed h2 and h2 has not yet written, by stream id.
#[derive(Debug)]
pub struct SendLedger {
    budget: Arc<SendBudget>,
    streams: Mutex<HashMap<u32, u64>>,
}

impl SendLedger {
    pub fn new(budget: Arc<SendBudget>) -> Arc<Self> {
        Arc::new(SendLedger {
            budget,
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// The peer's budget, which streams reserve from before they read.
    pub fn budget(&self) -> &Arc<SendBudget> {
        &self.budget
    }

    /// `n` reserved bytes of `stream` are about to go to h2 (before `send_data`, so the write
    /// cannot come first).
    pub fn charge(&self, stream: u32, n: u64) {
        *self.lock().entry(stream).or_default() += n;
    }

    /// h2 refused `n` bytes just charged to `stream`.
    pub fn uncharge(&self, stream: u32, n: u64) {
        let given = self.take(stream, n);
        self.budget.give_back(given);
    }

    /// `n` bytes of `stream`'s DATA were written to the peer.
    pub fn written(&self, stream: u32, n: u64) {
        let taken = self.take(stream, n);
        self.budget.written(taken);
    }

    /// `stream` was reset: h2 drops what it held of it.
    pub fn forget(&self, stream: u32) {
        let held = self.lock().remove(&stream).unwrap_or_default();
        self.budget.give_back(held);
    }

    /// Bytes held for `stream` now.
    pub fn held(&self, stream: u32) -> u64 {
        self.lock().get(&stream).copied().unwrap_or_default()
    }

    fn take(&self, stream: u32, n: u64) -> u64 {
        let mut streams = self.lock();
        let Some(held) = streams.get_mut(&stream) else {
            return 0;
        };
        let taken = n.min(*held);
        *held -= taken;
        if *held == 0 {
            streams.remove(&stream);
        }
        taken
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, u64>> {
        // A map of counters: consistent after any panic.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for SendLedger {
    /// The connection is gone, and with it whatever h2 still held.
    fn drop(&mut self) {
        let held: u64 = self.lock().values().sum();
        self.budget.give_back(held);
    }
}

/// Counts one waiting stream until it stops waiting (done or cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_reservation_waits_for_room_and_a_write_makes_it() {
        let budget = SendBudget::new(100);
        budget.reserve(60).await;
        budget.reserve(40).await;
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(30).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "100 of 100 in flight: 30 more must wait"
        );
        budget.written(20);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "80 + 30 is still past the budget");
        budget.written(20);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("60 + 30 fits")
            .unwrap();
        assert_eq!(budget.in_flight(), 90);
        budget.give_back(1_000);
        assert_eq!(budget.in_flight(), 0, "never below zero");
        budget.reserve(500).await;
        assert_eq!(
            budget.in_flight(),
            500,
            "a chunk past the budget fits alone"
        );
    }

    #[test]
    fn a_ledger_gives_back_what_was_written_reset_or_left_at_close() {
        let budget = SendBudget::new(1 << 20);
        let ledger = SendLedger::new(budget.clone());
        for (stream, n) in [(1, 1000), (3, 500), (5, 200)] {
            futures_util::FutureExt::now_or_never(budget.reserve(n)).unwrap();
            ledger.charge(stream, n);
        }
        assert_eq!(budget.in_flight(), 1700);
        ledger.written(1, 400);
        ledger.written(1, 10_000); // more than it held: frames of another stream's making
        assert_eq!((ledger.held(1), budget.in_flight()), (0, 700));
        ledger.forget(3);
        ledger.written(3, 500); // written after the reset was seen: nothing left to give
        assert_eq!(budget.in_flight(), 200);
        ledger.uncharge(5, 50);
        assert_eq!(budget.in_flight(), 150);
        drop(ledger);
        assert_eq!(budget.in_flight(), 0, "a closed connection holds nothing");
    }
}
