//! Each local pod's plaintext inbound listeners (15006), which the node's eBPF capture steers
//! connections from outside the mesh to. The tunnel holds a duplicate of every such listener for
//! as long as the pod runs ([`LocalInboundListeners`]) and hands it to the node agent, which
//! owns capture and registers it (the tunnel then needs no BPF access). Without an agent (a
//! state file), [`InboundCapture`] registers them in capture's pinned map itself, again
//! whenever capture is reinstalled. When a pod stops, its listeners close and the kernel drops
//! them from capture's map, so the pod's inbound connections are refused, never delivered
//! around the tunnel.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use redirect_ebpf::InboundListeners;
use tracing::{info, warn};

use tunnel_proto::last_failure::LastFailure;

/// One plaintext inbound listener and the pod addresses (of its family) it serves.
pub struct InboundListener {
    pub ips: Vec<IpAddr>,
    pub fd: OwnedFd,
    /// The socket's identity (its inode): a restarted pod's new listener is another one.
    pub id: u64,
}

impl InboundListener {
    pub fn new(ips: Vec<IpAddr>, fd: OwnedFd) -> std::io::Result<Self> {
        let id = nix::sys::stat::fstat(&fd)?.st_ino;
        Ok(InboundListener { ips, fd, id })
    }
}

/// The running local pods' plaintext inbound listeners, by pod key, as the pods loop last
/// published them (before it reports a state applied).
#[derive(Clone, Default)]
pub struct LocalInboundListeners(Arc<Mutex<BTreeMap<String, Vec<Arc<InboundListener>>>>>);

impl LocalInboundListeners {
    pub fn replace(&self, listeners: BTreeMap<String, Vec<Arc<InboundListener>>>) {
        if let Ok(mut current) = self.0.lock() {
            *current = listeners;
        }
    }

    /// Every listener with its pod.
    pub fn all(&self) -> Vec<(String, Arc<InboundListener>)> {
        let Ok(current) = self.0.lock() else {
            return Vec::new();
        };
        current
            .iter()
            .flat_map(|(pod, listeners)| listeners.iter().map(|l| (pod.clone(), l.clone())))
            .collect()
    }
}

/// What `/config_dump` shows of the registration.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct InboundCaptureStatus {
    pub pin_dir: PathBuf,
    /// Kernel id of capture's inbound map in use; none while capture is not installed.
    pub map_id: Option<u32>,
    /// Pods whose listeners are registered in it.
    pub registered: Vec<String>,
}

/// Registration state against the capture pinned under one directory.
pub struct InboundCapture {
    pin_dir: PathBuf,
    /// The open map and its kernel id (a new id means capture was reinstalled).
    map: Option<(u32, InboundListeners)>,
    /// Pods whose listeners are in the open map.
    registered: HashSet<String>,
    /// Why the last attempt failed, logged once per distinct reason.
    last_error: LastFailure,
}

impl InboundCapture {
    pub fn new(pin_dir: PathBuf) -> Self {
        InboundCapture {
            pin_dir,
            map: None,
            registered: HashSet::new(),
            last_error: LastFailure::default(),
        }
    }

    /// Registers every running pod's listeners that the current capture map lacks.
    pub fn sync<'a>(
        &mut self,
        pods: impl Iterator<Item = (&'a String, &'a [Arc<InboundListener>])>,
    ) {
        let pinned = InboundListeners::pinned_id(&self.pin_dir);
        if pinned != self.map.as_ref().map(|(id, _)| *id) {
            self.registered.clear();
            self.map = match pinned {
                None => None,
                Some(_) => match InboundListeners::open(&self.pin_dir) {
                    Ok(map) => Some((map.id(), map)),
                    Err(e) => {
                        self.report(format!("cannot open capture's inbound map: {e}"));
                        None
                    }
                },
            };
            if let Some((id, _)) = &self.map {
                info!(pin_dir = %self.pin_dir.display(), map_id = id, "inbound capture found; registering pod listeners");
            }
        }
        let Some((_, map)) = self.map.as_mut() else {
            return;
        };
        let mut present = HashSet::new();
        for (pod, listeners) in pods {
            present.insert(pod.clone());
            if self.registered.contains(pod) {
                continue;
            }
            let result = listeners.iter().try_for_each(|listener| {
                listener
                    .ips
                    .iter()
                    .try_for_each(|ip| map.register(*ip, &listener.fd))
            });
            match result {
                Ok(()) => {
                    self.registered.insert(pod.clone());
                }
                Err(e) => {
                    let reason = format!("pod {pod}: cannot register its inbound listener: {e}");
                    if self.last_error.is_new(&reason) {
                        warn!("{reason}");
                    }
                }
            }
        }
        self.registered.retain(|pod| present.contains(pod));
    }

    pub fn status(&self) -> InboundCaptureStatus {
        let mut registered: Vec<String> = self.registered.iter().cloned().collect();
        registered.sort();
        InboundCaptureStatus {
            pin_dir: self.pin_dir.clone(),
            map_id: self.map.as_ref().map(|(id, _)| *id),
            registered,
        }
    }

    fn report(&mut self, reason: String) {
        if self.last_error.is_new(&reason) {
            warn!("{reason}");
        }
    }
}
