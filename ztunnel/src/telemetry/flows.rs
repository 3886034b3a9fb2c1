//! Flow events at the source: each connection the tunnel opens and closes and each HTTP request
//! it decides, with both workloads, namespaces and SPIFFE IDs, kept in a bounded ring of recent
//! events and handed to live subscribers (the admin endpoint's `/flows`, which `weft observe`
//! reads). Filters are applied here, where the events are made, so a narrow question costs a
//! comparison per event. Each subscriber has a bounded queue: when it is full, the event is
//! dropped for that subscriber only and counted, and the subscriber is told how many it lost
//! before its next event; the data path never waits for a reader.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

pub use tunnel_proto::flows::{
    FilterError, FlowEnd, FlowEvent, FlowFilter, FlowKind, FlowQuery, now_ms,
};

/// Events kept for `--last` and `--since` questions.
pub const RING: usize = 4096;

/// Events queued for one subscriber before it starts losing them.
pub const QUEUE: usize = 1024;

/// Most subscribers at once (each is an admin connection).
pub const MAX_SUBSCRIBERS: usize = 16;

/// What a subscriber reads: events, and how many it lost before the next one.
#[derive(Debug)]
pub struct Subscription {
    pub events: mpsc::Receiver<Arc<FlowEvent>>,
    lost: Arc<AtomicU64>,
}

impl Subscription {
    /// Events dropped for this subscriber since the last call (its queue was full).
    pub fn take_lost(&self) -> u64 {
        self.lost.swap(0, Ordering::Relaxed)
    }

    /// The next event, waited for, with what else is queued behind it (at most `max` in
    /// all), and the events lost before them; `None` once the tunnel is gone.
    pub async fn next_batch(&mut self, max: usize) -> Option<(Vec<Arc<FlowEvent>>, u64)> {
        let first = self.events.recv().await?;
        let lost = self.take_lost();
        let mut batch = vec![first];
        while batch.len() < max {
            match self.events.try_recv() {
                Ok(event) => batch.push(event),
                Err(_) => break,
            }
        }
        Some((batch, lost))
    }
}

/// What a reader of `query` gets at once: the ring's matching events, and the subscription to
/// the new ones when it follows.
pub struct Opened {
    pub recent: Vec<Arc<FlowEvent>>,
    pub subscription: Option<Subscription>,
}

struct Subscriber {
    filter: FlowFilter,
    queue: mpsc::Sender<Arc<FlowEvent>>,
    lost: Arc<AtomicU64>,
}

/// The ring and the subscribers of one tunnel.
pub struct Flows {
    /// This tunnel's node, put on every event (set once at start).
    node: std::sync::OnceLock<String>,
    ring: Mutex<VecDeque<Arc<FlowEvent>>>,
    subscribers: Mutex<Vec<Subscriber>>,
    /// Whether anyone listens: spares the subscribers' lock on the data path when no one does.
    watched: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
#[error("{MAX_SUBSCRIBERS} flow subscribers already: try again when one has left")]
pub struct TooManySubscribers;

impl Default for Flows {
    fn default() -> Self {
        Self::new()
    }
}

impl Flows {
    pub fn new() -> Self {
        Flows {
            node: std::sync::OnceLock::new(),
            ring: Mutex::new(VecDeque::with_capacity(RING)),
            subscribers: Mutex::new(Vec::new()),
            watched: AtomicBool::new(false),
        }
    }

    /// Names this tunnel's node on the events from now on (the first call wins).
    pub fn set_node(&self, node: &str) {
        let _ = self.node.set(node.to_owned());
    }

    /// Records an event seen now by the tunnel serving `reporter`'s end.
    pub fn record(&self, reporter: &str, source: FlowEnd, destination: FlowEnd, kind: FlowKind) {
        self.publish(FlowEvent {
            time_ms: now_ms(),
            node: self.node.get().cloned().unwrap_or_default(),
            reporter: reporter.to_owned(),
            source,
            destination,
            kind,
        });
    }

    /// Records `event`: into the ring, and to each subscriber it matches that has room.
    pub fn publish(&self, event: FlowEvent) {
        let event = Arc::new(event);
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            if ring.len() == RING {
                ring.pop_front();
            }
            ring.push_back(event.clone());
        }
        if !self.watched.load(Ordering::Relaxed) {
            return;
        }
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers.retain(|s| !s.queue.is_closed());
        for subscriber in subscribers.iter() {
            if !subscriber.filter.matches(&event) {
                continue;
            }
            if subscriber.queue.try_send(event.clone()).is_err() {
                subscriber.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.watched
            .store(!subscribers.is_empty(), Ordering::Relaxed);
    }

    /// The last `last` events of the ring that match `filter`, oldest first.
    pub fn recent(&self, filter: &FlowFilter, last: usize) -> Vec<Arc<FlowEvent>> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut found: Vec<Arc<FlowEvent>> = ring
            .iter()
            .rev()
            .filter(|e| filter.matches(e))
            .take(last)
            .cloned()
            .collect();
        found.reverse();
        found
    }

    /// Subscribes to the events that match `filter` from now on.
    pub fn subscribe(&self, filter: FlowFilter) -> Result<Subscription, TooManySubscribers> {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers.retain(|s| !s.queue.is_closed());
        if subscribers.len() >= MAX_SUBSCRIBERS {
            return Err(TooManySubscribers);
        }
        let (queue, events) = mpsc::channel(QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        subscribers.push(Subscriber {
            filter,
            queue,
            lost: lost.clone(),
        });
        self.watched.store(true, Ordering::Relaxed);
        Ok(Subscription { events, lost })
    }

    /// Answers `query`: subscribed first when it follows, then the ring read, so no event
    /// falls between the two (one may come twice; its time tells).
    pub fn open(&self, query: &FlowQuery) -> Result<Opened, TooManySubscribers> {
        let subscription = match query.follow {
            true => Some(self.subscribe(query.filter.clone())?),
            false => None,
        };
        let recent = self.recent(&query.filter, query.last.unwrap_or(RING));
        Ok(Opened {
            recent,
            subscription,
        })
    }

    /// Subscribers connected now.
    pub fn subscribers(&self) -> usize {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers.retain(|s| !s.queue.is_closed());
        subscribers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(ns: &str, workload: &str) -> FlowEnd {
        FlowEnd {
            namespace: ns.into(),
            workload: workload.into(),
            identity: format!("spiffe://cluster.local/ns/{ns}/sa/{workload}"),
            addr: None,
        }
    }

    fn http(i: u64, status: u16, verdict: &str) -> FlowEvent {
        FlowEvent {
            time_ms: i,
            node: "node2".into(),
            reporter: "destination".into(),
            source: end("shop", "shopper"),
            destination: end("shop", "web"),
            kind: FlowKind::Http {
                method: "GET".into(),
                authority: "web".into(),
                path: format!("/{i}"),
                status,
                duration_ms: 1.0,
                verdict: verdict.into(),
                policy: (verdict == "deny").then(|| "shop/web-reads-only".into()),
                audit: (status == 404).then(|| "shop/web-audit".into()),
            },
        }
    }

    fn filter(pairs: &[(&str, &str)]) -> FlowFilter {
        let mut f = FlowFilter::default();
        for (k, v) in pairs {
            f.set(k, v).unwrap();
        }
        f
    }

    #[test]
    fn filters_match_what_they_name_and_refuse_what_they_do_not_know() {
        let allowed = http(1, 200, "allow");
        let denied = http(2, 403, "deny");
        assert!(filter(&[("to_pod", "shop/web"), ("type", "http")]).matches(&allowed));
        assert!(!filter(&[("to_pod", "shop/other")]).matches(&allowed));
        assert!(!filter(&[("from_pod", "shop/web")]).matches(&allowed));
        assert!(filter(&[("namespace", "shop")]).matches(&allowed));
        assert!(!filter(&[("namespace", "legacy")]).matches(&allowed));
        assert!(!filter(&[("type", "tcp")]).matches(&allowed));
        assert!(filter(&[("verdict", "denied")]).matches(&denied));
        assert!(!filter(&[("verdict", "denied")]).matches(&allowed));
        let audited = http(3, 404, "allow");
        assert!(filter(&[("verdict", "audited")]).matches(&audited));
        assert!(filter(&[("verdict", "allowed")]).matches(&audited));
        assert!(!filter(&[("verdict", "audited")]).matches(&allowed));
        assert!(
            filter(&[("from_identity", "spiffe://cluster.local/ns/shop/sa/shopper")])
                .matches(&allowed)
        );
        assert!(!filter(&[("since", "2")]).matches(&allowed));
        let mut f = FlowFilter::default();
        assert!(matches!(f.set("type", "udp"), Err(FilterError::Bad { .. })));
        assert!(matches!(
            f.set("to_pod", "web"),
            Err(FilterError::Bad { .. })
        ));
        assert!(matches!(
            f.set("colour", "red"),
            Err(FilterError::Unknown(_))
        ));
    }

    #[test]
    fn the_ring_keeps_the_latest_and_answers_the_last_n_that_match() {
        let flows = Flows::new();
        for i in 0..(RING as u64 + 10) {
            flows.publish(http(
                i,
                if i % 2 == 0 { 200 } else { 403 },
                if i % 2 == 0 { "allow" } else { "deny" },
            ));
        }
        let last = flows.recent(&filter(&[("verdict", "denied")]), 3);
        let times: Vec<u64> = last.iter().map(|e| e.time_ms).collect();
        let top = RING as u64 + 9;
        assert_eq!(times, [top - 4, top - 2, top]);
        let all = flows.recent(&FlowFilter::default(), usize::MAX);
        assert_eq!(all.len(), RING);
        assert_eq!(all[0].time_ms, 10, "the oldest were dropped");
    }

    #[tokio::test]
    async fn a_slow_subscriber_loses_events_and_is_told_how_many_and_others_do_not() {
        let flows = Flows::new();
        let slow = flows.subscribe(FlowFilter::default()).unwrap();
        let mut narrow = flows.subscribe(filter(&[("verdict", "denied")])).unwrap();
        let total = QUEUE as u64 + 500;
        for i in 0..total {
            // One in a hundred denied.
            let denied = i % 100 == 0;
            flows.publish(http(
                i,
                if denied { 403 } else { 200 },
                if denied { "deny" } else { "allow" },
            ));
        }
        assert_eq!(
            slow.take_lost(),
            500,
            "the queue holds {QUEUE}; the rest is counted"
        );
        assert_eq!(slow.take_lost(), 0, "told once");
        assert_eq!(narrow.take_lost(), 0);
        let mut got = 0;
        while narrow.events.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, total.div_ceil(100));
        drop(slow);
        drop(narrow);
        flows.publish(http(0, 200, "allow"));
        assert_eq!(flows.subscribers(), 0);
    }

    #[test]
    fn events_serialize_as_one_json_object() {
        let line = serde_json::to_string(&http(7, 403, "deny")).unwrap();
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["type"], "http");
        assert_eq!(value["status"], 403);
        assert_eq!(value["policy"], "shop/web-reads-only");
        assert_eq!(value["source"]["workload"], "shopper");
        assert_eq!(
            value["destination"]["identity"],
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(value["reporter"], "destination");
    }
}
