//! Flow events of several sources in time order (`weft observe` over several tunnels, the
//! controller's relay over every node). Each source's stream is in its own order; a short
//! window (events are held until they are this old) lets a slower source's earlier event come
//! out before a faster one's later event.

use std::collections::BTreeMap;

/// Events held, ordered by (time, arrival).
#[derive(Debug)]
pub struct Merger<T> {
    window_ms: u64,
    held: BTreeMap<(u64, u64), T>,
    arrivals: u64,
}

impl<T> Merger<T> {
    pub fn new(window_ms: u64) -> Self {
        Merger {
            window_ms,
            held: BTreeMap::new(),
            arrivals: 0,
        }
    }

    /// Holds `event`, which happened at `time_ms` (milliseconds since the epoch).
    pub fn push(&mut self, time_ms: u64, event: T) {
        self.arrivals += 1;
        self.held.insert((time_ms, self.arrivals), event);
    }

    /// How many events are held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The events old enough at `now_ms` to be printed, in time order.
    pub fn ready(&mut self, now_ms: u64) -> Vec<T> {
        let horizon = now_ms.saturating_sub(self.window_ms);
        let later = self.held.split_off(&(horizon + 1, 0));
        let ready = std::mem::replace(&mut self.held, later);
        ready.into_values().collect()
    }

    /// The oldest events past the `max` newest, in time order: let out before their window
    /// has passed (a reader's memory is bounded), or dropped by a reader that wants only the
    /// newest `max` (the result is exact: an event older than all `max` kept never makes it).
    pub fn beyond(&mut self, max: usize) -> Vec<T> {
        let mut out = Vec::new();
        while self.held.len() > max {
            match self.held.pop_first() {
                Some((_, event)) => out.push(event),
                None => break,
            }
        }
        out
    }

    /// Every event held, in time order; at most the last `last`.
    pub fn drain(&mut self, last: Option<usize>) -> Vec<T> {
        let all: Vec<T> = std::mem::take(&mut self.held).into_values().collect();
        let skip = last.map_or(0, |n| all.len().saturating_sub(n));
        all.into_iter().skip(skip).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_in_time_order_once_the_window_has_passed() {
        let mut merger = Merger::new(250);
        merger.push(1000, "node2");
        merger.push(900, "node1");
        merger.push(1200, "node1 later");
        assert_eq!(merger.ready(1100), [] as [&str; 0]);
        assert_eq!(merger.ready(1300), ["node1", "node2"]);
        merger.push(1100, "node2 later");
        assert_eq!(merger.ready(1500), ["node2 later", "node1 later"]);
        for (t, e) in [(5, "c"), (3, "a"), (4, "b")] {
            merger.push(t, e);
        }
        assert_eq!(merger.drain(Some(2)), ["b", "c"]);
    }

    #[test]
    fn past_a_bound_the_oldest_come_out_and_the_newest_stay() {
        let mut merger = Merger::new(250);
        for (t, e) in [(30, "c"), (10, "a"), (40, "d"), (20, "b")] {
            merger.push(t, e);
            merger.beyond(2);
        }
        assert_eq!(merger.len(), 2);
        assert_eq!(merger.drain(None), ["c", "d"]);
    }
}
