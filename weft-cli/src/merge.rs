//! Events of several tunnels in time order. Each tunnel's stream is in its own order; a short
//! window (events are held until they are this old) lets a slower tunnel's earlier event come
//! out before a faster one's later event.

use std::collections::BTreeMap;

use serde_json::Value;

/// Events held, ordered by (time, arrival).
#[derive(Debug, Default)]
pub struct Merger {
    window_ms: u64,
    held: BTreeMap<(u64, u64), Value>,
    arrivals: u64,
}

impl Merger {
    pub fn new(window_ms: u64) -> Self {
        Merger {
            window_ms,
            ..Merger::default()
        }
    }

    pub fn push(&mut self, event: Value) {
        let time = event["time_ms"].as_u64().unwrap_or(0);
        self.arrivals += 1;
        self.held.insert((time, self.arrivals), event);
    }

    /// The events old enough at `now_ms` to be printed, in time order.
    pub fn ready(&mut self, now_ms: u64) -> Vec<Value> {
        let horizon = now_ms.saturating_sub(self.window_ms);
        let later = self.held.split_off(&(horizon + 1, 0));
        let ready = std::mem::replace(&mut self.held, later);
        ready.into_values().collect()
    }

    /// Every event held, in time order; at most the last `last`.
    pub fn drain(&mut self, last: Option<usize>) -> Vec<Value> {
        let all: Vec<Value> = std::mem::take(&mut self.held).into_values().collect();
        let skip = last.map_or(0, |n| all.len().saturating_sub(n));
        all.into_iter().skip(skip).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_come_out_in_time_order_once_the_window_has_passed() {
        let mut merger = Merger::new(250);
        merger.push(json!({"time_ms": 1000, "node": "node2"}));
        merger.push(json!({"time_ms": 900, "node": "node1"}));
        merger.push(json!({"time_ms": 1200, "node": "node1"}));
        let nodes = |v: Vec<Value>| -> Vec<u64> {
            v.iter().map(|e| e["time_ms"].as_u64().unwrap()).collect()
        };
        assert_eq!(nodes(merger.ready(1100)), [] as [u64; 0]);
        assert_eq!(nodes(merger.ready(1300)), [900, 1000]);
        merger.push(json!({"time_ms": 1100, "node": "node2"}));
        assert_eq!(nodes(merger.ready(1500)), [1100, 1200]);
        for t in [5, 3, 4] {
            merger.push(json!({"time_ms": t}));
        }
        assert_eq!(nodes(merger.drain(Some(2))), [4, 5]);
    }
}
