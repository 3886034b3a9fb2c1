//! `mesh-node controller`: the cluster's one writer of what is said about the mesh's objects.
//! Replicas elect a leader with a Lease (`lease.rs`); the leader follows the whole cluster
//! (the agents' Kubernetes source) and keeps each MeshPolicy's and MeshAuthentication's
//! `status.conditions` true to what the agents and tunnels do with it (`status.rs`). Followers
//! only watch the Lease. The mesh CA (`crate::ca`) runs beside this loop on every replica,
//! authorizing against the objects this loop hands it.

pub mod lease;
pub mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use tunnel_proto::last_failure::LastFailure;

use crate::kube_source::KubeSource;
use lease::{Elector, Leadership};
use policy::StatusCondition;
use status::PolicyKind;

/// How long a status this leader wrote is trusted to be what the object holds: the watch
/// shows a write a moment later, so a pass in between would write it again; past this, a
/// status someone else changed is corrected.
const TRUST_WRITTEN: Duration = Duration::from_secs(30);

/// How the controller takes part in the election, and for which mesh.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// The Lease: `namespace/name`.
    pub lease_namespace: String,
    pub lease_name: String,
    /// This replica's name among the candidates (unique: the pod's name).
    pub identity: String,
    /// How long a leader holds the Lease past each renewal; renewed every third of it.
    pub lease_duration: Duration,
    pub root_namespace: String,
}

/// What readiness reports of the controller.
#[derive(Clone, Debug, Default)]
pub struct ControllerStatus {
    /// The cluster was listed once.
    pub synced: bool,
    pub leading: bool,
    /// The last failure to reach the API server (Lease or status), if it still stands.
    pub problem: Option<String>,
}

/// Runs the controller until `stop`; a leader gives the Lease up on the way out. The cluster's
/// objects, once listed and on every change, go to `objects` (the CA authorizes against them,
/// leading or not).
pub async fn run_controller(
    client: kube::Client,
    settings: ControllerSettings,
    status: Arc<Mutex<ControllerStatus>>,
    objects: Option<tokio::sync::watch::Sender<Arc<crate::cluster::ClusterObjects>>>,
    stop: impl std::future::Future<Output = ()>,
) {
    // The cluster as listed, made once per change: handed to the CA and read by status passes.
    let mut snapshot: Option<Arc<crate::cluster::ClusterObjects>> = None;
    let elector = Elector::new(
        client.clone(),
        &settings.lease_namespace,
        &settings.lease_name,
        &settings.identity,
        settings.lease_duration,
    );
    let source = KubeSource::start(client.clone());
    let renew_every = settings.lease_duration / 3;
    let mut leading = false;
    let mut last_turn: Option<Instant> = None;
    // Since when renewals fail while leading: past the Lease's duration another replica may
    // lead, so this one stops writing.
    let mut failing_since: Option<Instant> = None;
    let mut lease_failure = LastFailure::default();
    let mut written: HashMap<(PolicyKind, String, String), (Vec<StatusCondition>, Instant)> =
        HashMap::new();
    // The statuses are worked out again (the whole cluster's tables: tens of ms with 10,000
    // policies) on a change, under a new leader, after a failed write, and every
    // `TRUST_WRITTEN` to correct what someone else wrote; not on every renewal tick.
    let mut pass_due = true;
    let mut last_pass = Instant::now();
    let mut ticker = tokio::time::interval(renew_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = source.changed() => {}
            () = &mut stop => break,
        }
        if last_turn.is_none_or(|t| t.elapsed() >= renew_every) {
            last_turn = Some(Instant::now());
            let was_leading = leading;
            match elector.try_acquire_or_renew().await {
                Ok(turn) => {
                    lease_failure.clear();
                    failing_since = None;
                    leading = turn == Leadership::Leading;
                }
                Err(error) => {
                    let text = error.to_string();
                    if lease_failure.is_new(&text) {
                        warn!("{text}; retrying");
                    }
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= settings.lease_duration {
                        leading = false;
                    }
                }
            }
            match (was_leading, leading) {
                (false, true) => {
                    info!(identity = %settings.identity, lease = %format!("{}/{}", settings.lease_namespace, settings.lease_name), "leading: writing the status of policy objects");
                    // Everything is checked again under the new leader.
                    written.clear();
                    pass_due = true;
                }
                (true, false) => {
                    warn!(identity = %settings.identity, "no longer leading: another replica writes status")
                }
                _ => {}
            }
        }
        let synced = source.ready();
        let mut problem = lease_failure.current().map(str::to_owned);
        // Taken whether leading or not: a new leader passes anyway.
        let changed = source.take_changed();
        if changed {
            snapshot = None;
        }
        pass_due |= changed || last_pass.elapsed() >= TRUST_WRITTEN;
        if let Some(objects) = objects.as_ref().filter(|_| synced && snapshot.is_none()) {
            objects.send_replace(current_objects(&mut snapshot, &source));
        }
        if leading && synced && pass_due {
            pass_due = false;
            last_pass = Instant::now();
            let cluster = current_objects(&mut snapshot, &source);
            for stale in status::stale_statuses(&cluster, &settings.root_namespace) {
                let key = (stale.kind, stale.namespace.clone(), stale.name.clone());
                let just_written = written.get(&key).is_some_and(|(conditions, at)| {
                    *conditions == stale.conditions && at.elapsed() < TRUST_WRITTEN
                });
                if just_written {
                    continue;
                }
                let what = format!("{:?} {}/{}", stale.kind, stale.namespace, stale.name);
                match status::write(&client, &stale).await {
                    Ok(()) => {
                        written.insert(key, (stale.conditions.clone(), Instant::now()));
                        let accepted = &stale.conditions[0];
                        info!(object = %what, accepted = %accepted.status, reason = %accepted.reason, message = %accepted.message, "status written");
                    }
                    Err(error) => {
                        let text = format!("writing the status of {what}: {error}");
                        warn!("{text}; retrying");
                        problem = Some(text);
                        pass_due = true;
                    }
                }
            }
        }
        if let Ok(mut s) = status.lock() {
            s.synced = synced;
            s.leading = leading;
            s.problem = problem;
        }
    }
    if leading {
        match elector.release().await {
            Ok(()) => info!("gave the Lease up"),
            Err(error) => warn!("{error}; the Lease expires by itself"),
        }
    }
}

/// The snapshot of the cluster, made from `source` if there is none since the last change.
fn current_objects(
    snapshot: &mut Option<Arc<crate::cluster::ClusterObjects>>,
    source: &KubeSource,
) -> Arc<crate::cluster::ClusterObjects> {
    snapshot
        .get_or_insert_with(|| Arc::new(source.objects()))
        .clone()
}
