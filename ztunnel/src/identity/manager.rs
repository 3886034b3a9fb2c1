//! Keeps one current certificate per identity in use and renews it at half life.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tracing::{info, warn};

use super::{CertificateError, CertificateProvider, Identity, WorkloadCertificate};

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
    /// Renewal tasks hold only a Weak to their slot, so dropping an identity stops its task.
    /// The map's lock is held only to find an identity's cell: first fetches of different
    /// identities run at the same time.
    slots: std::sync::Mutex<HashMap<Identity, Arc<SlotCell>>>,
}

/// An identity's slot once its first certificate has been fetched.
type SlotCell = tokio::sync::OnceCell<Arc<CertificateSlot>>;

/// How long to wait before retrying a failed renewal.
const RETRY: Duration = Duration::from_secs(1);

impl CertificateManager {
    /// A manager that asks `provider` for certificates.
    pub fn new(provider: Arc<dyn CertificateProvider>) -> Arc<Self> {
        Arc::new(CertificateManager {
            provider,
            slots: Default::default(),
        })
    }

    /// The provider's trust bundle.
    pub fn trust_roots(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        self.provider.trust_roots()
    }

    /// The slot for `identity`, fetching the first certificate if needed. Concurrent callers
    /// for the same identity wait for one fetch.
    pub async fn get(&self, identity: &Identity) -> Result<Arc<CertificateSlot>, CertificateError> {
        let cell = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(identity.clone())
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            let first = self.provider.fetch(identity).await?;
            info!(%identity, not_after = ?first.not_after, "issued workload certificate");
            let slot = Arc::new(CertificateSlot {
                current: ArcSwap::from_pointee(first),
            });
            tokio::spawn(renew(
                self.provider.clone(),
                identity.clone(),
                Arc::downgrade(&slot),
            ));
            Ok(slot)
        })
        .await
        .cloned()
    }

    /// Drops every certificate whose identity is not in `in_use`; their renewal stops.
    pub async fn retain(&self, in_use: &std::collections::HashSet<Identity>) {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slots.retain(|identity, cell| {
            let keep = in_use.contains(identity);
            if !keep && cell.initialized() {
                info!(%identity, "no local workload uses this identity any more; dropping its certificate");
            }
            keep
        });
    }
}

async fn renew(
    provider: Arc<dyn CertificateProvider>,
    identity: Identity,
    slot: Weak<CertificateSlot>,
) {
    loop {
        let due = match slot.upgrade() {
            Some(slot) => slot.current().refresh_at(),
            None => return,
        };
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait).await;
        let Some(slot) = slot.upgrade() else { return };
        match provider.fetch(&identity).await {
            Ok(fresh) => {
                info!(%identity, not_after = ?fresh.not_after, "renewed workload certificate");
                slot.current.store(Arc::new(fresh));
            }
            Err(error) => {
                warn!(%identity, %error, "certificate renewal failed; retrying");
                drop(slot);
                tokio::time::sleep(RETRY).await;
            }
        }
    }
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
        let manager = CertificateManager::new(Arc::new(ca));
        let id = Identity::new("td", "ns", "sa");
        let slot = manager.get(&id).await.unwrap();
        let again = manager.get(&id).await.unwrap();
        assert!(Arc::ptr_eq(&slot, &again), "one slot per identity");
        let first = slot.current();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let renewed = slot.current();
        assert!(!Arc::ptr_eq(&first, &renewed), "renewed at half life");
        assert!(renewed.not_after > first.not_after);
        manager.retain(&Default::default()).await;
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

    #[tokio::test]
    async fn retain_keeps_only_identities_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = LocalCa::create_root(dir.path(), "td").unwrap();
        let crypto = Arc::new(rustls::crypto::ring::default_provider());
        let ca = LocalCa::load(&cert, &key, Duration::from_secs(60), crypto).unwrap();
        let manager = CertificateManager::new(Arc::new(ca));
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
