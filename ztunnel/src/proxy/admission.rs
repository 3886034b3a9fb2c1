//! What the tunnel's HBONE listeners hold at once, in total and for one peer address: a peer
//! that opens connections without end (a slow-loris client that never finishes TLS), streams
//! without end, or sends and never lets the application's bytes be taken, is held to its share
//! instead of taking the tunnel's descriptors and memory from everyone else.
//!
//! A peer's share: `per_peer` connections, `streams_per_peer` CONNECT streams over all of them,
//! and `receive_budget` bytes of HTTP/2 receive window over all of them. The window is the
//! most a peer can make the tunnel buffer on its way in (h2 holds what arrives until the
//! application takes it, and a peer may send only what the window allows): each connection's
//! window is allotted from the budget at its handshake (up to the full connection window) and
//! given back when it closes; once the budget is spent, a connection gets HTTP/2's minimum of
//! 64 KiB. Each admitted connection holds an [`Admitted`] guard and each stream a [`StreamPlace`];
//! their drops give the places back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use super::send_budget::SendBudget;

/// HTTP/2's initial connection window, which a connection always has (RFC 9113, 6.9.2).
pub const MIN_RECEIVE_WINDOW: u32 = 65_535;

/// Why a connection or a stream was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionRefused {
    #[error("the tunnel holds its limit of {limit} HBONE connections")]
    Total { limit: usize },
    #[error("this peer holds its limit of {limit} HBONE connections")]
    PerPeer { limit: usize },
    #[error("this peer holds its limit of {limit} HBONE streams")]
    StreamsPerPeer { limit: usize },
}

impl AdmissionRefused {
    /// The `reason` label of `weft_hbone_connections_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AdmissionRefused::Total { .. } => "total",
            AdmissionRefused::PerPeer { .. } => "per_peer",
            AdmissionRefused::StreamsPerPeer { .. } => "streams_per_peer",
        }
    }
}

/// The limits of [`Admission`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Connections held by the tunnel's HBONE listeners together.
    pub total: usize,
    /// Connections from one peer address.
    pub per_peer: usize,
    /// CONNECT streams from one peer address, over all its connections.
    pub streams_per_peer: usize,
    /// Bytes of HTTP/2 receive window one peer address is given, over all its connections.
    pub receive_budget: u64,
    /// Bytes one peer address's streams may have read from applications and not yet written
    /// to the peer, over all its connections ([`SendBudget`]).
    pub send_budget: u64,
}

/// The live counts, shared by every HBONE listener of the tunnel.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    live: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_peer: HashMap<IpAddr, Share>,
}

/// What one peer holds now.
#[derive(Debug)]
struct Share {
    connections: usize,
    streams: usize,
    /// Receive window allotted from the budget (the minimum windows are not counted).
    window: u64,
    send: Arc<SendBudget>,
}

impl Share {
    fn new(limits: &AdmissionLimits) -> Self {
        Share {
            connections: 0,
            streams: 0,
            window: 0,
            send: SendBudget::new(limits.send_budget),
        }
    }
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            live: Mutex::new(Counts::default()),
        })
    }

    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    /// Takes a place for a connection from `peer`, or says which limit it would pass.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, AdmissionRefused> {
        let mut live = self.lock();
        if live.total >= self.limits.total {
            return Err(AdmissionRefused::Total {
                limit: self.limits.total,
            });
        }
        let share = live
            .by_peer
            .entry(peer)
            .or_insert_with(|| Share::new(&self.limits));
        if share.connections >= self.limits.per_peer {
            return Err(AdmissionRefused::PerPeer {
                limit: self.limits.per_peer,
            });
        }
        share.connections += 1;
        let send = share.send.clone();
        live.total += 1;
        Ok(Admitted {
            admission: self.clone(),
            peer,
            window: 0,
            send,
        })
    }

    /// Connections held now.
    pub fn live(&self) -> usize {
        self.lock().total
    }

    /// What `peer` holds now: (connections, streams, receive window allotted).
    pub fn share_of(&self, peer: IpAddr) -> (usize, usize, u64) {
        self.lock()
            .by_peer
            .get(&peer)
            .map(|s| (s.connections, s.streams, s.window))
            .unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent under any panic (each change is one statement).
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `change` on `peer`'s share, forgetting the peer once it holds nothing.
    fn change_share(&self, peer: IpAddr, change: impl FnOnce(&mut Share)) {
        let mut live = self.lock();
        if let Some(share) = live.by_peer.get_mut(&peer) {
            change(share);
            if share.connections == 0 && share.streams == 0 && share.window == 0 {
                live.by_peer.remove(&peer);
            }
        }
    }
}

/// One admitted connection's place (and its receive window); given back on drop.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    peer: IpAddr,
    /// Allotted from the peer's receive budget.
    window: u64,
    /// The peer's send budget, shared by its connections.
    send: Arc<SendBudget>,
}

impl Admitted {
    /// The send budget of this connection's peer.
    pub fn send_budget(&self) -> Arc<SendBudget> {
        self.send.clone()
    }

    /// The receive window of this connection: `wanted`, or what is left of the peer's budget,
    /// and never less than HTTP/2's minimum. Allotted once; a second call gives the same.
    pub fn receive_window(&mut self, wanted: u32) -> u32 {
        if self.window == 0 {
            let budget = self.admission.limits.receive_budget;
            let mut live = self.admission.lock();
            if let Some(share) = live.by_peer.get_mut(&self.peer) {
                let left = budget.saturating_sub(share.window);
                let take = u64::from(wanted).min(left);
                if take > u64::from(MIN_RECEIVE_WINDOW) {
                    share.window += take;
                    self.window = take;
                }
            }
        }
        // At most `wanted`, a u32.
        u32::try_from(self.window)
            .unwrap_or(u32::MAX)
            .max(MIN_RECEIVE_WINDOW)
    }

    /// Takes a place for one more CONNECT stream of this peer.
    pub fn open_stream(&self) -> Result<StreamPlace, AdmissionRefused> {
        let limit = self.admission.limits.streams_per_peer;
        let mut live = self.admission.lock();
        let limits = self.admission.limits;
        let share = live
            .by_peer
            .entry(self.peer)
            .or_insert_with(|| Share::new(&limits));
        if share.streams >= limit {
            return Err(AdmissionRefused::StreamsPerPeer { limit });
        }
        share.streams += 1;
        Ok(StreamPlace {
            admission: self.admission.clone(),
            peer: self.peer,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let window = self.window;
        let mut live = self.admission.lock();
        live.total = live.total.saturating_sub(1);
        drop(live);
        self.admission.change_share(self.peer, |share| {
            share.connections = share.connections.saturating_sub(1);
            share.window = share.window.saturating_sub(window);
        });
    }
}

/// One admitted stream's place; given back on drop (it may outlive its connection's guard).
#[derive(Debug)]
pub struct StreamPlace {
    admission: Arc<Admission>,
    peer: IpAddr,
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        self.admission.change_share(self.peer, |share| {
            share.streams = share.streams.saturating_sub(1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(
        total: usize,
        per_peer: usize,
        streams_per_peer: usize,
        receive_budget: u64,
    ) -> AdmissionLimits {
        AdmissionLimits {
            total,
            per_peer,
            streams_per_peer,
            receive_budget,
            send_budget: 1 << 20,
        }
    }

    #[test]
    fn peers_are_held_to_their_share_and_the_tunnel_to_its_total() {
        let admission = Admission::new(limits(3, 2, 10, 1 << 20));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = admission.admit(a).unwrap();
        let _a2 = admission.admit(a).unwrap();
        assert_eq!(
            admission.admit(a).unwrap_err(),
            AdmissionRefused::PerPeer { limit: 2 }
        );
        let _b1 = admission.admit(b).unwrap();
        assert_eq!(
            admission.admit(b).unwrap_err(),
            AdmissionRefused::Total { limit: 3 }
        );
        drop(a1);
        assert_eq!(admission.live(), 2);
        let _b2 = admission.admit(b).expect("a place came back");
        assert_eq!(
            admission.admit(a).unwrap_err().reason(),
            "total",
            "the total is checked first"
        );
    }

    #[test]
    fn a_peers_streams_are_counted_over_its_connections_and_outlive_them() {
        let admission = Admission::new(limits(10, 10, 3, 1 << 20));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let (c1, c2) = (admission.admit(a).unwrap(), admission.admit(a).unwrap());
        let s1 = c1.open_stream().unwrap();
        let _s2 = c2.open_stream().unwrap();
        let _s3 = c2.open_stream().unwrap();
        assert_eq!(
            c1.open_stream().unwrap_err(),
            AdmissionRefused::StreamsPerPeer { limit: 3 }
        );
        let other = admission.admit(b).unwrap();
        let _b1 = other.open_stream().expect("another peer has its own share");
        drop(s1);
        let s4 = c1.open_stream().expect("a place came back");
        drop((c1, c2));
        assert_eq!(
            admission.share_of(a),
            (0, 3, 0),
            "streams outlive their connection's guard"
        );
        drop(s4);
        assert_eq!(admission.share_of(a), (0, 2, 0));
    }

    #[test]
    fn receive_windows_come_from_the_peers_budget() {
        const MIB: u32 = 1 << 20;
        let admission = Admission::new(limits(10, 10, 10, 40 << 20));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mut c1 = admission.admit(a).unwrap();
        let mut c2 = admission.admit(a).unwrap();
        let mut c3 = admission.admit(a).unwrap();
        let mut c4 = admission.admit(a).unwrap();
        assert_eq!(c1.receive_window(16 * MIB), 16 * MIB);
        assert_eq!(c1.receive_window(16 * MIB), 16 * MIB, "allotted once");
        assert_eq!(c2.receive_window(16 * MIB), 16 * MIB);
        assert_eq!(c3.receive_window(16 * MIB), 8 * MIB, "what is left");
        assert_eq!(
            c4.receive_window(16 * MIB),
            MIN_RECEIVE_WINDOW,
            "HTTP/2's minimum"
        );
        assert_eq!(admission.share_of(a).2, 40 << 20);
        let mut other = admission.admit("10.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(
            other.receive_window(16 * MIB),
            16 * MIB,
            "budgets are per peer"
        );
        drop(c1);
        let mut c5 = admission.admit(a).unwrap();
        assert_eq!(
            c5.receive_window(16 * MIB),
            16 * MIB,
            "a closed connection gives it back"
        );
        drop((c2, c3, c4, c5));
        assert_eq!(admission.share_of(a), (0, 0, 0));
    }
}
