//! How many connections the tunnel's HBONE listeners hold at once: in total, and from one
//! peer address. A peer that opens connections without end (a slow-loris client that never
//! finishes TLS) is refused past its share instead of taking the tunnel's descriptors and
//! memory from everyone else. Each admitted connection holds a [`Admitted`] guard; its drop
//! gives the place back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionRefused {
    #[error("the tunnel holds its limit of {limit} HBONE connections")]
    Total { limit: usize },
    #[error("this peer holds its limit of {limit} HBONE connections")]
    PerPeer { limit: usize },
}

impl AdmissionRefused {
    /// The `reason` label of `weft_hbone_connections_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AdmissionRefused::Total { .. } => "total",
            AdmissionRefused::PerPeer { .. } => "per_peer",
        }
    }
}

/// The live connection counts, shared by every HBONE listener of the tunnel.
#[derive(Debug)]
pub struct Admission {
    total_limit: usize,
    per_peer_limit: usize,
    live: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

impl Admission {
    pub fn new(total_limit: usize, per_peer_limit: usize) -> Arc<Self> {
        Arc::new(Admission {
            total_limit,
            per_peer_limit,
            live: Mutex::new(Counts::default()),
        })
    }

    /// Takes a place for a connection from `peer`, or says which limit it would pass.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, AdmissionRefused> {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if live.total >= self.total_limit {
            return Err(AdmissionRefused::Total {
                limit: self.total_limit,
            });
        }
        let from_peer = live.by_peer.entry(peer).or_default();
        if *from_peer >= self.per_peer_limit {
            return Err(AdmissionRefused::PerPeer {
                limit: self.per_peer_limit,
            });
        }
        *from_peer += 1;
        live.total += 1;
        Ok(Admitted {
            admission: self.clone(),
            peer,
        })
    }

    /// Connections held now.
    pub fn live(&self) -> usize {
        self.live.lock().map(|l| l.total).unwrap_or_default()
    }

    fn release(&self, peer: IpAddr) {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        live.total = live.total.saturating_sub(1);
        if let Some(count) = live.by_peer.get_mut(&peer) {
            *count -= 1;
            if *count == 0 {
                live.by_peer.remove(&peer);
            }
        }
    }
}

/// One admitted connection's place; given back on drop.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    peer: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission.release(self.peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_held_to_their_share_and_the_tunnel_to_its_total() {
        let admission = Admission::new(3, 2);
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
}
