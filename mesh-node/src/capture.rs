//! Keeps the node's eBPF capture equal to the enrolled pods of this node: enrolls new ones
//! (by their network namespace), re-enrolls pods whose exclusions changed, unenrolls the rest,
//! including pods enrolled before a restart that are gone since.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::AsFd;
use std::path::PathBuf;

use redirect_ebpf::{Exclusions, Redirect, netns_cookie};
use tracing::{debug, info, warn};
use tunnel_proto::StateSpec;

use crate::tunnel_link::InboundOffer;

/// What capture needs of one enrolled local pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrolledPod {
    pub netns: PathBuf,
    pub exclusions: Exclusions,
}

/// The capture of this node and what this agent enrolled in it.
pub struct CaptureReconciler {
    redirect: Redirect,
    /// Pod key -> (netns cookie, what it was enrolled with).
    enrolled: BTreeMap<String, (u64, EnrolledPod)>,
    /// Whether stale enrollments of an earlier run were cleared.
    swept: bool,
}

impl CaptureReconciler {
    /// Where the capture it drives is pinned.
    pub fn pin_dir(&self) -> &std::path::Path {
        self.redirect.pin_dir()
    }

    pub fn new(redirect: Redirect) -> Self {
        CaptureReconciler {
            redirect,
            enrolled: BTreeMap::new(),
            swept: false,
        }
    }

    /// Unenrolls the pods not in `wanted` (or enrolled with other settings), leaving new
    /// enrollments for [`CaptureReconciler::reconcile`].
    pub fn release_unwanted(&mut self, wanted: &BTreeMap<String, EnrolledPod>) -> Vec<String> {
        let mut failures = Vec::new();
        let stale: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(key, (_, pod))| wanted.get(*key) != Some(pod))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some((cookie, _)) = self.enrolled.remove(&key) {
                if let Err(e) = self.redirect.unenroll(cookie) {
                    failures.push(format!("pod {key}: cannot unenroll: {e}"));
                } else if !wanted.contains_key(&key) {
                    info!(pod = %key, "unenrolled");
                }
            }
        }
        failures
    }

    /// Registers the plaintext inbound listeners the tunnel offered, each only for an enrolled
    /// pod of this node, for addresses of that pod, and if it listens in that pod's own
    /// namespace; anything else is refused with a problem naming it. The agent keeps no copy:
    /// a listener leaves capture when the tunnel closes it.
    pub fn register_inbound(
        &mut self,
        offers: Vec<InboundOffer>,
        wanted: &BTreeMap<String, EnrolledPod>,
        state: &StateSpec,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        for offer in offers {
            let refuse = |reason: String| {
                format!(
                    "the tunnel offered an inbound listener for pod {}: {reason}; refused",
                    offer.pod
                )
            };
            let Some(pod) = wanted.get(&offer.pod) else {
                problems.push(refuse("not an enrolled pod of this node".into()));
                continue;
            };
            let ips = state
                .workloads
                .iter()
                .find(|w| format!("{}/{}", w.namespace, w.name) == offer.pod)
                .map(|w| w.ips.as_slice())
                .unwrap_or_default();
            if let Some(ip) = offer.ips.iter().find(|ip| !ips.contains(ip)) {
                problems.push(refuse(format!("{ip} is not its address")));
                continue;
            }
            let cookie = match netns_cookie(&pod.netns) {
                Ok(cookie) => cookie,
                Err(e) => {
                    problems.push(refuse(e.to_string()));
                    continue;
                }
            };
            for ip in &offer.ips {
                match self
                    .redirect
                    .register_inbound(*ip, offer.fd.as_fd(), cookie)
                {
                    Ok(()) => debug!(pod = %offer.pod, %ip, "inbound listener registered"),
                    Err(e) => problems.push(refuse(e.to_string())),
                }
            }
        }
        problems
    }

    /// Makes capture hold exactly `wanted` (pod key -> pod); returns per-pod failures, which
    /// are retried on the next call.
    pub fn reconcile(&mut self, wanted: &BTreeMap<String, EnrolledPod>) -> Vec<String> {
        let mut failures = self.release_unwanted(wanted);
        for (key, pod) in wanted {
            if self.enrolled.contains_key(key) {
                continue;
            }
            let netns = match std::fs::File::open(&pod.netns) {
                Ok(file) => file,
                Err(e) => {
                    failures.push(format!(
                        "pod {key}: cannot open its network namespace {}: {e}",
                        pod.netns.display()
                    ));
                    continue;
                }
            };
            match self.redirect.enroll(&netns, &pod.exclusions) {
                Ok(cookie) => {
                    info!(pod = %key, netns = %pod.netns.display(), cookie, "enrolled");
                    self.enrolled.insert(key.clone(), (cookie, pod.clone()));
                }
                Err(e) => failures.push(format!("pod {key}: cannot enroll: {e}")),
            }
        }
        if !self.swept && failures.is_empty() {
            // Pods an earlier run enrolled that are no longer wanted (gone while it was down).
            let ours: HashSet<u64> = self.enrolled.values().map(|(c, _)| *c).collect();
            for cookie in self.redirect.enrolled() {
                if !ours.contains(&cookie) {
                    match self.redirect.unenroll(cookie) {
                        Ok(()) => info!(cookie, "unenrolled a pod left from an earlier run"),
                        Err(e) => warn!(cookie, error = %e, "cannot unenroll a stale pod"),
                    }
                }
            }
            self.swept = true;
        }
        failures
    }
}
