//! Polls a future again at once when it wakes itself while being polled, instead of handing
//! the wake-up to the runtime. A parsed connection is one task holding the client's HTTP
//! server, the application's HTTP client and the channels between them: a request passed from
//! one to the other wakes the task from inside its own poll. Tokio's multi-threaded scheduler
//! treats such a wake-up as a yield and rouses an idle worker thread to share the work: a
//! futex wake and a context switch or two per hand-off, for a task that was running anyway.
//! Measured with `weft-bench policy` on 2 cores: the parsed lane cost the server's tunnel about
//! 100 us of CPU per request against 56 for copied bytes; with one worker thread, 71.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// Re-polls in one go before yielding to the runtime anyway (fairness to other tasks).
const MAX_POLLS: usize = 16;

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const POLLING_WOKEN: u8 = 2;

/// The waker the inner future sees.
struct Wakes {
    state: AtomicU8,
    /// The task's own waker, for wake-ups between polls.
    task: Mutex<Option<Waker>>,
}

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self.state.compare_exchange(
            POLLING,
            POLLING_WOKEN,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // Being polled (on this thread or another's behalf): polled again before it ends.
            Ok(_) | Err(POLLING_WOKEN) => {}
            Err(_) => {
                let task = self.task.lock().ok().and_then(|t| t.clone());
                if let Some(task) = task {
                    task.wake();
                }
            }
        }
    }
}

/// `future`, with its own wake-ups during a poll turned into another poll.
pub struct Coalesced<F> {
    future: F,
    wakes: Arc<Wakes>,
    waker: Waker,
}

impl<F> Coalesced<F> {
    pub fn new(future: F) -> Self {
        let wakes = Arc::new(Wakes {
            state: AtomicU8::new(IDLE),
            task: Mutex::new(None),
        });
        Coalesced {
            future,
            waker: Waker::from(wakes.clone()),
            wakes,
        }
    }
}

impl<F: Future + Unpin> Future for Coalesced<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if let Ok(mut task) = self.wakes.task.lock()
            && !task.as_ref().is_some_and(|t| t.will_wake(cx.waker()))
        {
            *task = Some(cx.waker().clone());
        }
        let this = &mut *self;
        for _ in 0..MAX_POLLS {
            this.wakes.state.store(POLLING, Ordering::Release);
            let mut inner = Context::from_waker(&this.waker);
            if let Poll::Ready(output) = Pin::new(&mut this.future).poll(&mut inner) {
                this.wakes.state.store(IDLE, Ordering::Release);
                return Poll::Ready(output);
            }
            let settled = this.wakes.state.compare_exchange(
                POLLING,
                IDLE,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            if settled.is_ok() {
                return Poll::Pending;
            }
            // Woken meanwhile: poll again now.
        }
        this.wakes.state.store(IDLE, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wakes itself `times` times, one per poll, then is ready.
    struct SelfWaking {
        times: usize,
        polls: usize,
    }

    impl Future for SelfWaking {
        type Output = usize;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            self.polls += 1;
            if self.polls > self.times {
                return Poll::Ready(self.polls);
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// Counts the wake-ups the task itself gets.
    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn wake_ups_inside_a_poll_become_polls_and_others_reach_the_task() {
        let count = Arc::new(Count(Default::default()));
        let task = Waker::from(count.clone());
        let mut cx = Context::from_waker(&task);
        let mut coalesced = Coalesced::new(SelfWaking { times: 3, polls: 0 });
        assert_eq!(Pin::new(&mut coalesced).poll(&mut cx), Poll::Ready(4));
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            0,
            "no wake-up reached the task"
        );

        // More self wake-ups than one poll may absorb: the task is woken to come back.
        let mut busy = Coalesced::new(SelfWaking {
            times: 100,
            polls: 0,
        });
        assert_eq!(Pin::new(&mut busy).poll(&mut cx), Poll::Pending);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);

        // A wake-up between polls reaches the task.
        busy.waker.wake_by_ref();
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
    }
}
