//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's `leaderelection` does
//! it: read the Lease; take it when it is free or its holder let it expire, renew it while
//! holding it; every write is an update conditioned on the resource version just read, so of
//! two candidates racing for an expired Lease the API server lets one win (the other gets 409
//! Conflict and stays a follower).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

/// Why a turn of the election could not be decided.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("Lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

/// One candidate for a Lease.
pub struct Elector {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
}

/// Whether the Lease is held by this candidate after a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leadership {
    Leading,
    /// Another candidate holds it (until it renews no more).
    Following,
}

impl Elector {
    /// A candidate called `identity` (unique among candidates: the pod's name) for the Lease
    /// `namespace/name`, holding it for `duration` past each renewal.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    /// One turn: takes or renews the Lease if it may. Run it well within the duration (a third
    /// of it, as client-go does).
    pub async fn try_acquire_or_renew(&self) -> Result<Leadership, LeaseError> {
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.error(e))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.held_spec(now, now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Leadership::Leading),
                // Another candidate created it first.
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Leadership::Following),
                Err(error) => Err(self.error(error)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !ours && !expired(&spec, now) {
            return Ok(Leadership::Following);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(if ours {
            let acquired = spec.acquire_time.map_or(now, |t| t.0);
            self.held_spec(acquired, now, transitions)
        } else {
            self.held_spec(now, now, transitions + 1)
        });
        // Conditioned on the resource version read above (kept in `lease.metadata`).
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Leadership::Leading),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Leadership::Following),
            Err(error) => Err(self.error(error)),
        }
    }

    /// Gives the Lease up at once (on shutdown), so another candidate need not wait for it to
    /// expire; only if this candidate holds it.
    pub async fn release(&self) -> Result<(), LeaseError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.error(e))?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(error) => Err(self.error(error)),
        }
    }

    fn held_spec(&self, acquired: Timestamp, renewed: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    fn error(&self, source: kube::Error) -> LeaseError {
        LeaseError::Api {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }
}

/// Whether a Lease is free: no holder, or its holder did not renew within its duration.
fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let (Some(_), Some(renewed)) = (&spec.holder_identity, &spec.renew_time) else {
        return true;
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    let until = renewed.0.as_second().saturating_add(duration);
    now.as_second() >= until
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_free_without_holder_or_once_its_holder_stops_renewing() {
        let now = Timestamp::from_second(1_000).unwrap();
        let held = |renewed: i64| LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..LeaseSpec::default()
        };
        assert!(!expired(&held(990), now), "renewed 10 s ago, for 15");
        assert!(expired(&held(985), now), "renewed 15 s ago");
        assert!(expired(&LeaseSpec::default(), now), "nobody holds it");
    }
}
