//! The controller's flow relay: one place where `weft observe` sees the whole mesh.
//!
//! Every node's tunnel keeps a call open to every controller replica (`FlowRelay/Offer`,
//! `service.rs`), authenticated as its node as for the mesh CA. A user's question comes to
//! the relay's HTTP endpoint (`http.rs`, on loopback: reached through `kubectl port-forward`,
//! which the API server authenticates and RBAC limits); the relay hands the question to every
//! node connected (so filters are still applied where events are made), and merges what comes
//! back in time order. Events are checked on the way: one that does not parse, or that names
//! another node than the one that sent it, is dropped and logged.
//!
//! Nothing waits on a slow reader: each subscription has a bounded queue, and what does not fit
//! is counted and reported to the reader as lost, as the tunnels do.

pub mod http;
pub mod service;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ca_api::flows::{FromTunnel, Subscribe, ToTunnel, Unsubscribe, to_tunnel};
use tokio::sync::mpsc;
use tracing::warn;
use tunnel_proto::flows::{FlowEvent, FlowQuery};

/// Users' subscriptions a relay serves at once (each costs one on every node's tunnel, which
/// has 16).
pub const MAX_SUBSCRIPTIONS: usize = 8;

/// Calls one node may hold open at once (a tunnel holds one per replica; a restarted one's old
/// call may linger until its keepalive fails).
pub const MAX_CALLS_PER_NODE: usize = 4;

/// Events held for one subscription's reader before more are counted as lost.
const QUEUE: usize = 4096;

/// Requests waiting to be sent to one node (subscribe, unsubscribe).
const NODE_REQUESTS: usize = 64;

/// What a subscription's reader gets.
#[derive(Debug)]
pub enum RelayItem {
    Event(Box<FlowEvent>),
    /// `node` sent all it will for this subscription (an error if it refused it).
    NodeEnded {
        node: String,
        error: Option<String>,
    },
}

/// Why a question, or a node's call, was not taken.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the relay serves {MAX_SUBSCRIPTIONS} subscriptions at once; try again when one ends")]
    TooManySubscriptions,
    #[error("node {0} holds {MAX_CALLS_PER_NODE} calls to the relay already")]
    TooManyCalls(String),
    #[error("the controller is stopping")]
    Closed,
}

/// The nodes connected and the subscriptions served; shared by the gRPC service and the HTTP
/// endpoint.
pub struct Relay {
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Becomes true when the controller stops: each call's reader stops reading then.
    closing: tokio::sync::watch::Sender<bool>,
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            state: Mutex::default(),
            next_id: AtomicU64::new(0),
            closing: tokio::sync::watch::Sender::new(false),
        }
    }
}

#[derive(Default)]
struct State {
    nodes: HashMap<u64, NodeSession>,
    subscriptions: HashMap<u64, Subscriber>,
    /// The controller is stopping: calls are ended and no new one is taken.
    closed: bool,
}

struct NodeSession {
    node: String,
    requests: mpsc::Sender<ToTunnel>,
}

struct Subscriber {
    query: FlowQuery,
    events: mpsc::Sender<RelayItem>,
    lost: Arc<AtomicU64>,
    /// The node calls that ended this subscription: each end is passed on once.
    ended: HashSet<u64>,
}

/// A user's subscription; dropping it ends it on every node.
pub struct RelaySubscription {
    id: u64,
    relay: Arc<Relay>,
    pub events: mpsc::Receiver<RelayItem>,
    lost: Arc<AtomicU64>,
    /// The nodes asked when it started (a node that connects later is asked too, if it
    /// follows).
    pub nodes: Vec<String>,
}

impl RelaySubscription {
    /// Events lost since last asked (this relay's queue, and what the nodes reported).
    pub fn take_lost(&self) -> u64 {
        self.lost.swap(0, Ordering::Relaxed)
    }
}

impl Drop for RelaySubscription {
    fn drop(&mut self) {
        self.relay.unsubscribe(self.id);
    }
}

/// A node's call, registered; dropping it removes the node.
pub struct NodeHandle {
    id: u64,
    /// The node the call proved: the only one its events may name.
    node: String,
    /// A dropped event of this call was logged (one line per call, not one per event).
    warned: AtomicBool,
    relay: Arc<Relay>,
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        self.relay.lock().nodes.remove(&self.id);
    }
}

impl Relay {
    pub fn new() -> Arc<Relay> {
        Arc::new(Relay::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn next(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The nodes connected now, sorted.
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self.lock().nodes.values().map(|s| s.node.clone()).collect();
        nodes.sort();
        nodes
    }

    /// Registers `node`'s call; `requests` carries what the relay asks of it. It is asked at
    /// once for the following subscriptions open now (new events only: their backlog was
    /// read from the nodes there when they started).
    pub fn add_node(
        self: &Arc<Self>,
        node: &str,
        requests: mpsc::Sender<ToTunnel>,
    ) -> Result<NodeHandle, RelayError> {
        let id = self.next();
        let mut state = self.lock();
        if state.closed {
            return Err(RelayError::Closed);
        }
        if state.nodes.values().filter(|s| s.node == node).count() >= MAX_CALLS_PER_NODE {
            return Err(RelayError::TooManyCalls(node.to_owned()));
        }
        for (sub, subscriber) in &state.subscriptions {
            if subscriber.query.follow {
                let mut query = subscriber.query.clone();
                query.last = Some(0);
                let _ = requests.try_send(subscribe(*sub, &query));
            }
        }
        state.nodes.insert(
            id,
            NodeSession {
                node: node.to_owned(),
                requests,
            },
        );
        Ok(NodeHandle {
            id,
            node: node.to_owned(),
            warned: AtomicBool::new(false),
            relay: self.clone(),
        })
    }

    /// Ends every node's call (their streams of requests end, so each call completes and the
    /// server can stop gracefully; the tunnels call again, elsewhere or later) and takes no
    /// new one. Readers' subscriptions end with them.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.nodes.clear();
        state.subscriptions.clear();
        self.closing.send_replace(true);
    }

    /// Resolves once [`Relay::close`] was called: a call's reader stops reading the node's
    /// stream then (dropping it resets the stream, which the node may never end itself).
    pub async fn closed(&self) {
        let mut closing = self.closing.subscribe();
        let _ = closing.wait_for(|closed| *closed).await;
    }

    /// Asks every node connected for `query`'s events.
    pub fn subscribe(self: &Arc<Self>, query: &FlowQuery) -> Result<RelaySubscription, RelayError> {
        let id = self.next();
        let (tx, rx) = mpsc::channel(QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        let mut state = self.lock();
        if state.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            return Err(RelayError::TooManySubscriptions);
        }
        let mut nodes = Vec::new();
        for session in state.nodes.values() {
            if session.requests.try_send(subscribe(id, query)).is_ok() {
                nodes.push(session.node.clone());
            } else {
                warn!(node = %session.node, "a node's call is not taking requests; it is left out of this subscription");
            }
        }
        nodes.sort();
        state.subscriptions.insert(
            id,
            Subscriber {
                query: query.clone(),
                events: tx,
                lost: lost.clone(),
                ended: HashSet::new(),
            },
        );
        Ok(RelaySubscription {
            id,
            relay: self.clone(),
            events: rx,
            lost,
            nodes,
        })
    }

    fn unsubscribe(&self, id: u64) {
        let mut state = self.lock();
        state.subscriptions.remove(&id);
        for session in state.nodes.values() {
            let request = ToTunnel {
                request: Some(to_tunnel::Request::Unsubscribe(Unsubscribe { id })),
            };
            let _ = session.requests.try_send(request);
        }
    }

    /// Takes what `node`'s call sent: its events go to the subscription they are for, unless
    /// they do not parse or name another node. Parsed before the relay's lock is taken.
    pub fn deliver(&self, handle: &NodeHandle, message: FromTunnel) {
        let mut first_refusal = None;
        let events: Vec<FlowEvent> = message
            .events
            .iter()
            .filter_map(|line| {
                let refusal = match serde_json::from_str::<FlowEvent>(line) {
                    Ok(event) if event.node == handle.node => return Some(event),
                    Ok(event) => format!("it names node {:?}", event.node),
                    Err(e) => format!("it is not a flow event: {e}"),
                };
                first_refusal.get_or_insert(refusal);
                None
            })
            .collect();
        if let Some(reason) = first_refusal
            && !handle.warned.swap(true, Ordering::Relaxed)
        {
            warn!(node = %handle.node, %reason, "a flow event from this node was dropped (further drops on this call are not logged)");
        }
        let mut state = self.lock();
        if !state.nodes.contains_key(&handle.id) {
            return;
        }
        let Some(subscriber) = state.subscriptions.get_mut(&message.id) else {
            // Ended here; the node has not had the unsubscribe yet.
            return;
        };
        for event in events {
            if subscriber
                .events
                .try_send(RelayItem::Event(Box::new(event)))
                .is_err()
            {
                subscriber.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
        subscriber.lost.fetch_add(message.lost, Ordering::Relaxed);
        // Once per node call: a node repeating its end makes no more work here.
        if message.end && subscriber.ended.insert(handle.id) {
            let error = (!message.error.is_empty()).then(|| message.error.clone());
            let ended = RelayItem::NodeEnded {
                node: handle.node.clone(),
                error,
            };
            // Waited for by the reader: sent even past a full queue.
            let events = subscriber.events.clone();
            tokio::spawn(async move {
                let _ = events.send(ended).await;
            });
        }
    }
}

fn subscribe(id: u64, query: &FlowQuery) -> ToTunnel {
    ToTunnel {
        request: Some(to_tunnel::Request::Subscribe(Subscribe {
            id,
            query: query.to_query(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel_proto::flows::{FlowEnd, FlowKind};

    fn event(node: &str, time_ms: u64) -> String {
        let event = FlowEvent {
            time_ms,
            node: node.into(),
            reporter: "destination".into(),
            source: FlowEnd::default(),
            destination: FlowEnd::default(),
            kind: FlowKind::TcpOpen {
                security: "mutual_tls".into(),
            },
        };
        serde_json::to_string(&event).unwrap()
    }

    fn subscribed_id(request: ToTunnel) -> (u64, String) {
        match request.request {
            Some(to_tunnel::Request::Subscribe(s)) => (s.id, s.query),
            other => panic!("expected a subscribe, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_nodes_events_reach_the_subscription_and_events_naming_another_node_do_not() {
        let relay = Relay::new();
        let (tx, mut requests) = mpsc::channel(8);
        let node1 = relay.add_node("node1", tx).unwrap();
        let query = FlowQuery {
            follow: true,
            ..FlowQuery::default()
        };
        let mut subscription = relay.subscribe(&query).unwrap();
        assert_eq!(subscription.nodes, ["node1"]);
        let (id, sent) = subscribed_id(requests.recv().await.unwrap());
        assert!(sent.contains("follow=true"), "{sent}");
        relay.deliver(
            &node1,
            FromTunnel {
                id,
                events: vec![event("node1", 5), event("node2", 6), "{not json".into()],
                lost: 3,
                end: false,
                error: String::new(),
            },
        );
        match subscription.events.recv().await.unwrap() {
            RelayItem::Event(e) => assert_eq!((e.node.as_str(), e.time_ms), ("node1", 5)),
            other => panic!("{other:?}"),
        }
        assert!(
            subscription.events.try_recv().is_err(),
            "the forged and bad events were dropped"
        );
        assert_eq!(subscription.take_lost(), 3);
        drop(subscription);
        match requests.recv().await.unwrap().request {
            Some(to_tunnel::Request::Unsubscribe(u)) => assert_eq!(u.id, id),
            other => panic!("expected an unsubscribe, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_node_connecting_later_is_asked_for_new_events_of_following_subscriptions_only() {
        let relay = Relay::new();
        let follow = FlowQuery {
            follow: true,
            last: Some(20),
            ..FlowQuery::default()
        };
        let _following = relay.subscribe(&follow).unwrap();
        let _once = relay.subscribe(&FlowQuery::default()).unwrap();
        let (tx, mut requests) = mpsc::channel(8);
        let _node = relay.add_node("node2", tx).unwrap();
        let (_, query) = subscribed_id(requests.recv().await.unwrap());
        let parsed = FlowQuery::parse(&query).unwrap();
        assert!(parsed.follow);
        assert_eq!(parsed.last, Some(0), "no backlog for a late node: {query}");
        assert!(
            requests.try_recv().is_err(),
            "the one-off question is not sent"
        );
        assert_eq!(relay.nodes(), ["node2"]);
    }

    #[tokio::test]
    async fn a_node_repeating_its_end_is_passed_on_once_and_its_calls_are_bounded() {
        let relay = Relay::new();
        let (tx, _requests) = mpsc::channel(8);
        let node = relay.add_node("node1", tx).unwrap();
        let mut subscription = relay.subscribe(&FlowQuery::default()).unwrap();
        for _ in 0..1000 {
            relay.deliver(
                &node,
                FromTunnel {
                    id: subscription.id,
                    end: true,
                    ..FromTunnel::default()
                },
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(matches!(
            subscription.events.try_recv(),
            Ok(RelayItem::NodeEnded { .. })
        ));
        assert!(subscription.events.try_recv().is_err(), "one end only");
        let mut held = Vec::new();
        for _ in 1..MAX_CALLS_PER_NODE {
            held.push(relay.add_node("node1", mpsc::channel(1).0).unwrap());
        }
        assert!(matches!(
            relay.add_node("node1", mpsc::channel(1).0),
            Err(RelayError::TooManyCalls(_))
        ));
        assert!(relay.add_node("node2", mpsc::channel(1).0).is_ok());
        drop(held);
        assert!(relay.add_node("node1", mpsc::channel(1).0).is_ok());
    }

    #[test]
    fn subscriptions_are_bounded() {
        let relay = Relay::new();
        let held: Vec<_> = (0..MAX_SUBSCRIPTIONS)
            .map(|_| relay.subscribe(&FlowQuery::default()).unwrap())
            .collect();
        assert!(matches!(
            relay.subscribe(&FlowQuery::default()),
            Err(RelayError::TooManySubscriptions)
        ));
        drop(held);
        assert!(relay.subscribe(&FlowQuery::default()).is_ok());
    }
}
