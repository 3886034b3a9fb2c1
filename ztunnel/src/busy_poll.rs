//! Busy polling: after traffic, the tunnel's worker thread goes on polling its sockets for a
//! short, adaptive window before it sleeps, so that the next message of a conversation (the
//! response to the request it just forwarded) finds it awake.
//!
//! Why: on the machines we measure (virtual CPUs), a process woken from sleep costs more than
//! anything it then does with a small message. A round trip through two tunnels wakes each
//! tunnel twice; without busy polling the tunnels spent ~110 µs of CPU per round trip (mostly
//! in waking and being woken) and added ~52 µs, as much as a stunnel pair. Polling through
//! the window, the tunnels' CPU per round trip is 1.1-1.3x stunnel's and Weft's round trips
//! measure faster than direct ones on these machines (ARCHITECTURE.md, "Where a round trip's
//! time goes", for why that is partly the virtual CPUs kept out of idle).
//!
//! How: a task of its own ([`BusyPoll::spawn`]) yields while traffic is recent. A yielding
//! task makes tokio's worker poll the event queue without blocking (`epoll_wait` with a zero
//! timeout) between its turns, so a socket that becomes readable is served at once. When the
//! window passes with no traffic, the task sleeps until the data path reports traffic again
//! ([`activity`]: one atomic add per chunk moved). The window adapts like Linux's `haltpoll`
//! idle governor: traffic that came back soon after the poller gave up doubles it (up to the
//! configured maximum); a spin that was wasted halves it. An idle tunnel does not spin at
//! all, and a sparse one spins little.
//!
//! It needs the runtime to have one worker thread: with more, the event queue belongs to
//! whichever idle worker blocks on it first, the poller's worker seldom gets it, and two
//! pollers compete (measured: 168 µs added instead of 52). `app.rs` turns it off otherwise.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The poller the data path reports to; set once, by [`BusyPoll::install`].
static INSTALLED: OnceLock<Arc<BusyPoll>> = OnceLock::new();

/// Tells the installed poller that bytes moved. Called by the data path per chunk; a no-op
/// when busy polling is off.
pub fn activity() {
    if let Some(poller) = INSTALLED.get() {
        poller.record_activity();
    }
}

/// Shared between the data path and the polling task.
#[derive(Debug)]
pub struct BusyPoll {
    /// Chunks moved so far: the poller sees traffic as this number changing.
    moved: AtomicU64,
    /// Set while the poller sleeps: the data path then wakes it.
    sleeping: AtomicBool,
    wake: Notify,
    max_window: Duration,
}

impl BusyPoll {
    pub fn new(max_window: Duration) -> Arc<Self> {
        Arc::new(BusyPoll {
            moved: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
            wake: Notify::new(),
            max_window,
        })
    }

    /// Makes this the poller [`activity`] reports to (the first one installed stays).
    pub fn install(self: &Arc<Self>) {
        let _ = INSTALLED.set(self.clone());
    }

    fn record_activity(&self) {
        // SeqCst pairs with the poller's store of `sleeping` then load of `moved`: either it
        // sees this chunk, or this sees it asleep and wakes it.
        self.moved.fetch_add(1, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// Whether the poller is asleep (no traffic within its window).
    pub fn is_sleeping(&self) -> bool {
        self.sleeping.load(Ordering::SeqCst)
    }

    /// Starts the polling task on the current runtime; it runs until the runtime stops.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let poller = self.clone();
        tokio::spawn(async move { poller.run().await })
    }

    async fn run(&self) {
        let mut window = Window::new(self.max_window);
        let mut seen = self.moved.load(Ordering::SeqCst);
        let mut last_traffic = Instant::now();
        loop {
            let now = Instant::now();
            let moved = self.moved.load(Ordering::SeqCst);
            let traffic_since_last_turn = moved != seen;
            if traffic_since_last_turn {
                seen = moved;
                last_traffic = now;
            }
            if now.duration_since(last_traffic) < window.current() {
                if !traffic_since_last_turn {
                    // Only waiting: let any other process runnable on this CPU go first (the
                    // applications share the cores; a poller that kept its CPU made their
                    // round trips' p99 309 µs instead of 102). Not while bytes are moving:
                    // yielding between the chunks of a bulk transfer cut the same-node fast
                    // path's throughput from ~40 to ~16 Gbit/s.
                    std::thread::yield_now();
                }
                // Lets the worker poll its sockets (without blocking) before this runs again.
                tokio::task::yield_now().await;
                continue;
            }
            self.sleeping.store(true, Ordering::SeqCst);
            if self.moved.load(Ordering::SeqCst) == seen {
                let slept_from = Instant::now();
                self.wake.notified().await;
                window.after_sleep(slept_from.elapsed());
            }
            self.sleeping.store(false, Ordering::SeqCst);
            last_traffic = Instant::now();
            seen = self.moved.load(Ordering::SeqCst);
        }
    }
}

/// How long to poll after traffic; adapted after each sleep from how long it lasted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    current: Duration,
    max: Duration,
}

/// Where a window that shrank to nothing starts again when it grows.
const SMALLEST_GROWN: Duration = Duration::from_micros(10);

impl Window {
    /// Starts at a quarter of the maximum.
    fn new(max: Duration) -> Self {
        Window {
            current: max / 4,
            max,
        }
    }

    fn current(&self) -> Duration {
        self.current
    }

    /// Traffic woke the poller after `slept`: had it polled that much longer (and no longer
    /// than the maximum), it would have been awake, so the window doubles; traffic that came
    /// later still means the window was polled for nothing, so it halves.
    fn after_sleep(&mut self, slept: Duration) {
        if slept + self.current <= self.max {
            self.current = (self.current * 2).max(SMALLEST_GROWN).min(self.max);
        } else {
            self.current /= 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_grows_when_traffic_came_back_soon_and_shrinks_when_polling_was_wasted() {
        let max = Duration::from_micros(200);
        let mut w = Window::new(max);
        assert_eq!(w.current(), Duration::from_micros(50));
        w.after_sleep(Duration::from_micros(30));
        assert_eq!(
            w.current(),
            Duration::from_micros(100),
            "came back soon: doubled"
        );
        w.after_sleep(Duration::from_micros(30));
        assert_eq!(w.current(), max, "never past the maximum");
        w.after_sleep(Duration::from_millis(5));
        assert_eq!(w.current(), Duration::from_micros(100), "wasted: halved");
        for _ in 0..40 {
            w.after_sleep(Duration::from_secs(1));
        }
        assert_eq!(w.current(), Duration::ZERO, "an idle tunnel stops polling");
        w.after_sleep(Duration::from_micros(20));
        assert_eq!(
            w.current(),
            SMALLEST_GROWN,
            "and starts again from a small window"
        );
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let mut w = Window::new(Duration::ZERO);
        assert_eq!(w.current(), Duration::ZERO);
        w.after_sleep(Duration::ZERO);
        assert_eq!(w.current(), Duration::ZERO);
    }

    /// The poller polls while traffic is recent, sleeps once it stops (an idle tunnel uses no
    /// CPU), and traffic wakes it again.
    #[tokio::test(flavor = "current_thread")]
    async fn the_poller_sleeps_when_traffic_stops_and_wakes_with_it() {
        let poller = BusyPoll::new(Duration::from_millis(20));
        let task = poller.spawn();
        poller.record_activity();
        tokio::task::yield_now().await;
        assert!(!poller.is_sleeping(), "traffic just moved: polling");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(
            poller.is_sleeping(),
            "no traffic for longer than the window"
        );
        // Its thread is idle now: a sleep here is served without the poller running.
        poller.record_activity();
        tokio::task::yield_now().await;
        assert!(!poller.is_sleeping(), "traffic woke it");
        task.abort();
    }
}
