//! Keeps one current certificate per identity in use and renews it at half life (a little
//! before, at random, so that certificates issued together are not all renewed together),
//! retrying failures with exponential backoff while the current certificate stays in use.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tracing::{info, warn};

use super::{CertificateError, CertificateProvider, Identity, WorkloadCertificate};
use crate::telemetry::{IdentityLabels, Metrics, RenewalLabels};

/// The current certificate of one identity; swapped in place on renewal, so TLS configs that
/// hold the slot always present a valid certificate without being rebuilt.
#[derive(Debug)]
pub struct CertificateSlot {
    current: ArcSwap<WorkloadCertificate>,
}

impl CertificateSlot {
    /// The certificate to present right now.
    pub fn current(&self) -> Arc<WorkloadCertificate> {
        self.current.load_full()
    }
}

/// Certificate cache shared by all listeners and outbound connections of the tunnel.
pub struct CertificateManager {
    provider: Arc<dyn CertificateProvider>,
    metrics: Arc<Metrics>,
    /// Renewal tasks hold only a Weak to their slot, so dropping an identity stops its task.
    /// The map's lock is held only to find an identity's cell: first fetches of different
    /// identities run at the same time.
    slots: std::sync::Mutex<HashMap<Identity, Arc<SlotCell>>>,
    /// Identities whose first certificate is being fetched in the background: the last
    /// failure, if one failed (for `/config_dump`, readiness and fast refusals).
    waiting: std::sync::Mutex<HashMap<Identity, Option<String>>>,
    /// The identities of the local pods now: a background fetch for any other stops.
    in_use: std::sync::Mutex<std::collections::HashSet<Identity>>,
}

/// An identity's slot once its first certificate has been fetched.
type SlotCell = tokio::sync::OnceCell<Arc<CertificateSlot>>;

/// The first retry of a failed renewal; each next one waits twice as long, up to
/// [`MOST_BACKOFF`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MOST_BACKOFF: Duration = Duration::from_secs(60);
/// A pod without its first certificate cannot connect at all: its fetch is retried at least
/// this often, so it gets one soon after the CA is back.
const FIRST_FETCH_MOST_BACKOFF: Duration = Duration::from_secs(10);

impl CertificateManager {
    /// A manager that asks `provider` for certificates and reports them in `metrics`.
    pub fn new(provider: Arc<dyn CertificateProvider>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(CertificateManager {
            provider,
            metrics,
            slots: Default::default(),
            waiting: Default::default(),
            in_use: Default::default(),
        })
    }

    /// The slot of `identity` if its first certificate has arrived.
    pub fn ready(&self, identity: &Identity) -> Option<Arc<CertificateSlot>> {
        lock(&self.slots)
            .get(identity)
            .and_then(|cell| cell.get().cloned())
    }

    /// The certificate for a new connection of `identity`: the current one; or, while a
    /// background fetch keeps failing, that failure at once (the connection is refused with
    /// flag CERT rather than waiting on a CA that does not answer); or the first fetch.
    pub async fn for_connection(
        &self,
        identity: &Identity,
    ) -> Result<Arc<CertificateSlot>, CertificateError> {
        if let Some(slot) = self.ready(identity) {
            return Ok(slot);
        }
        if let Some(Some(reason)) = lock(&self.waiting).get(identity).cloned() {
            return Err(CertificateError::Waiting {
                identity: identity.clone(),
                reason,
            });
        }
        self.get(identity).await
    }

    /// Fetches the first certificate of `identity` (a local pod's) in the background, ahead
    /// of its first connection, retrying failures with backoff until it arrives or the pod
    /// goes; nothing if it is there or on its way.
    pub fn prefetch(self: &Arc<Self>, identity: &Identity) {
        if self.ready(identity).is_some() {
            return;
        }
        {
            let mut waiting = lock(&self.waiting);
            if waiting.contains_key(identity) {
                return;
            }
            waiting.insert(identity.clone(), None);
        }
        let manager = Arc::downgrade(self);
        let identity = identity.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let Some(this) = manager.upgrade() else {
                    return;
                };
                if !lock(&this.in_use).contains(&identity) {
                    lock(&this.waiting).remove(&identity);
                    return;
                }
                match this.get(&identity).await {
                    Ok(_) => {
                        lock(&this.waiting).remove(&identity);
                        return;
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        let retry_in = backoff(failures).min(FIRST_FETCH_MOST_BACKOFF);
                        let text = error.to_string();
                        let first = lock(&this.waiting)
                            .insert(identity.clone(), Some(text.clone()))
                            .flatten()
                            .is_none_or(|before| before != text);
                        if first {
                            warn!(%identity, ?retry_in, "{text}; its connections are refused (flag CERT) until it arrives");
                        }
                        drop(this);
                        tokio::time::sleep(retry_in).await;
                    }
                }
            }
        });
    }

    /// Identities waiting for their first certificate, and why (the last failure), by SPIFFE
    /// ID.
    pub fn waiting(&self) -> std::collections::BTreeMap<String, String> {
        lock(&self.waiting)
            .iter()
            .map(|(identity, reason)| {
                let reason = reason
                    .clone()
                    .unwrap_or_else(|| "first request to the CA in flight".into());
                (identity.to_string(), reason)
            })
            .collect()
    }

    /// The slot for `identity`, fetching the first certificate if needed. Concurrent callers
    /// for the same identity wait for one fetch.
    pub async fn get(&self, identity: &Identity) -> Result<Arc<CertificateSlot>, CertificateError> {
        let cell = lock(&self.slots)
            .entry(identity.clone())
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            let first = self.provider.fetch(identity).await?;
            info!(%identity, not_after = ?first.not_after, "issued workload certificate");
            report_expiration(&self.metrics, identity, &first);
            let slot = Arc::new(CertificateSlot {
                current: ArcSwap::from_pointee(first),
            });
            tokio::spawn(renew(
                self.provider.clone(),
                self.metrics.clone(),
                identity.clone(),
                Arc::downgrade(&slot),
            ));
            Ok(slot)
        })
        .await
        .cloned()
    }

    /// Drops every certificate whose identity is not in `in_use`; their renewal stops, and so
    /// does a background fetch.
    pub async fn retain(&self, in_use: &std::collections::HashSet<Identity>) {
        lock(&self.in_use).clone_from(in_use);
        let mut slots = lock(&self.slots);
        slots.retain(|identity, cell| {
            let keep = in_use.contains(identity);
            if !keep && cell.initialized() {
                info!(%identity, "no local workload uses this identity any more; dropping its certificate");
                self.metrics.certificate_expiration.remove(&IdentityLabels {
                    identity: identity.to_string(),
                });
            }
            keep
        });
    }
}

/// Locks `mutex`; nothing panics while holding these locks, and a poisoned map is still a map.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn renew(
    provider: Arc<dyn CertificateProvider>,
    metrics: Arc<Metrics>,
    identity: Identity,
    slot: Weak<CertificateSlot>,
) {
    let mut failures = 0u32;
    loop {
        let due = match slot.upgrade() {
            Some(slot) if failures == 0 => renewal_time(&slot.current(), jitter_fraction()),
            Some(_) => SystemTime::now() + backoff(failures),
            None => return,
        };
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait).await;
        let Some(slot) = slot.upgrade() else { return };
        match provider.fetch(&identity).await {
            Ok(fresh) => {
                info!(%identity, not_after = ?fresh.not_after, "renewed workload certificate");
                report_expiration(&metrics, &identity, &fresh);
                metrics
                    .certificate_renewals
                    .get_or_create(&RenewalLabels { result: "success" })
                    .inc();
                slot.current.store(Arc::new(fresh));
                failures = 0;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let retry_in = backoff(failures);
                let valid_until = slot.current().not_after;
                warn!(%identity, %error, ?retry_in, ?valid_until, "certificate renewal failed; the current certificate stays in use");
                metrics
                    .certificate_renewals
                    .get_or_create(&RenewalLabels { result: "failure" })
                    .inc();
            }
        }
    }
}

fn report_expiration(metrics: &Metrics, identity: &Identity, cert: &WorkloadCertificate) {
    let expires = cert
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    metrics
        .certificate_expiration
        .get_or_create(&IdentityLabels {
            identity: identity.to_string(),
        })
        .set(i64::try_from(expires).unwrap_or(i64::MAX));
}

/// When to renew `cert`: at half its life, less up to a tenth of its life (`jitter` in
/// [0, 1) picks where), so that certificates issued together spread their renewals.
fn renewal_time(cert: &WorkloadCertificate, jitter: f64) -> SystemTime {
    let life = cert
        .not_after
        .duration_since(cert.issued_at)
        .unwrap_or_default();
    cert.refresh_at() - life.mul_f64(jitter.clamp(0.0, 1.0) / 10.0)
}

/// A number in [0, 1), different for each call (std's per-process random hash keys, mixed with
/// the time: good enough to spread renewals, not for anything secret).
fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// How long to wait after the `failures`-th failure in a row: 1 s, 2 s, 4 s... up to 60 s.
fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST_RETRY * 2u32.pow(doublings)).min(MOST_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LocalCa;

    #[tokio::test]
    async fn renews_at_half_life_and_stops_when_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = LocalCa::create_root(dir.path(), "td").unwrap();
        let crypto = Arc::new(rustls::crypto::ring::default_provider());
        let ca = LocalCa::load(&cert, &key, Duration::from_secs(2), crypto).unwrap();
        let metrics = Metrics::new();
        let manager = CertificateManager::new(Arc::new(ca), metrics.clone());
        let id = Identity::new("td", "ns", "sa");
        let slot = manager.get(&id).await.unwrap();
        let again = manager.get(&id).await.unwrap();
        assert!(Arc::ptr_eq(&slot, &again), "one slot per identity");
        let first = slot.current();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let renewed = slot.current();
        assert!(!Arc::ptr_eq(&first, &renewed), "renewed at half life");
        assert!(renewed.not_after > first.not_after);
        let text = metrics.encode();
        let expires = renewed
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            text.contains(&format!(
                "weft_certificate_expiration_timestamp_seconds{{identity=\"spiffe://td/ns/ns/sa/sa\"}} {expires}"
            )),
            "{text}"
        );
        assert!(
            text.contains("weft_certificate_renewals_total{result=\"success\"} 1"),
            "{text}"
        );
        manager.retain(&Default::default()).await;
        assert!(
            !metrics
                .encode()
                .contains("identity=\"spiffe://td/ns/ns/sa/sa\""),
            "a dropped identity leaves the expiration gauge"
        );
        let fresh = manager.get(&id).await.unwrap();
        assert!(
            !Arc::ptr_eq(&slot, &fresh),
            "a dropped identity gets a new slot"
        );
        drop(slot);
        drop(again);
        let weak = Arc::downgrade(&fresh);
        manager.retain(&Default::default()).await;
        drop(fresh);
        assert!(
            weak.upgrade().is_none(),
            "only the manager kept the slot alive"
        );
    }

    #[test]
    fn renewal_is_at_half_life_less_up_to_a_tenth_and_retries_back_off() {
        let issued_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let cert = |life: u64| WorkloadCertificate {
            identity: Identity::new("td", "ns", "sa"),
            certified_key: test_certified_key(),
            issued_at,
            not_after: issued_at + Duration::from_secs(life),
        };
        let day = cert(86_400);
        assert_eq!(
            renewal_time(&day, 0.0),
            issued_at + Duration::from_secs(43_200)
        );
        assert_eq!(
            renewal_time(&day, 0.5),
            issued_at + Duration::from_secs(38_880)
        );
        let earliest = issued_at + Duration::from_secs(43_200 - 8_640);
        for _ in 0..100 {
            let at = renewal_time(&day, jitter_fraction());
            assert!(at <= day.refresh_at() && at > earliest, "{at:?}");
        }
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), MOST_BACKOFF);
    }

    fn test_certified_key() -> Arc<rustls::sign::CertifiedKey> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(der)
            .unwrap();
        Arc::new(rustls::sign::CertifiedKey::new(
            vec![cert.der().clone()],
            signing,
        ))
    }

    #[tokio::test]
    async fn retain_keeps_only_identities_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = LocalCa::create_root(dir.path(), "td").unwrap();
        let crypto = Arc::new(rustls::crypto::ring::default_provider());
        let ca = LocalCa::load(&cert, &key, Duration::from_secs(60), crypto).unwrap();
        let manager = CertificateManager::new(Arc::new(ca), Metrics::new());
        let (a, b) = (
            Identity::new("td", "ns", "a"),
            Identity::new("td", "ns", "b"),
        );
        let slot_a = Arc::downgrade(&manager.get(&a).await.unwrap());
        let slot_b = Arc::downgrade(&manager.get(&b).await.unwrap());
        manager.retain(&[a.clone()].into_iter().collect()).await;
        assert!(slot_a.upgrade().is_some());
        assert!(slot_b.upgrade().is_none(), "b's certificate was dropped");
    }
}
