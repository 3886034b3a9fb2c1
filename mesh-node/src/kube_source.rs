//! The Kubernetes source: `kube` watchers (list, then watch, with bookmarks; a relist after an
//! expired resource version or a watch error, with backoff) feeding reflector stores of
//! Namespaces, Pods, Services, EndpointSlices and Weft's MeshPolicies and
//! MeshAuthentications (a cluster without Weft's CRDs installed never becomes ready: the
//! watch error says which resource the API server does not serve). While the API server is unreachable the stores keep the
//! last good objects, so the agent keeps serving them. It becomes ready once every store has
//! had its first full list.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use policy::{MeshAuthentication, MeshPolicy};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::changes::Changes;
use crate::cluster::{ClusterObjects, Object};

/// How one kind's watch is doing.
#[derive(Debug, Default)]
struct KindStatus {
    /// Its first full list is in.
    listed: AtomicBool,
    /// Its watch is failing now, with this message.
    error: std::sync::Mutex<Option<String>>,
}

impl KindStatus {
    /// Records the watch's current failure (`None`: healthy); true if that changed.
    fn set_error(&self, error: Option<String>) -> bool {
        let Ok(mut current) = self.error.lock() else {
            return false;
        };
        let changed = *current != error;
        *current = error;
        changed
    }
}

/// The stores and whether anything changed since the last look.
pub struct KubeSource {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    mesh_policies: Store<MeshPolicy>,
    mesh_authentications: Store<MeshAuthentication>,
    changes: Arc<Changes>,
    /// Per kind: listed once yet, and its current watch error.
    kinds: [Arc<KindStatus>; 6],
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts watching through `client`.
    pub fn start(client: Client) -> Self {
        let changes = Arc::new(Changes::default());
        let kinds: [Arc<KindStatus>; 6] = Default::default();
        let (namespaces, ns_task) = follow(
            Api::<Namespace>::all(client.clone()),
            changes.clone(),
            kinds[0].clone(),
        );
        let (pods, pod_task) = follow(
            Api::<Pod>::all(client.clone()),
            changes.clone(),
            kinds[1].clone(),
        );
        let (services, svc_task) = follow(
            Api::<Service>::all(client.clone()),
            changes.clone(),
            kinds[2].clone(),
        );
        let (endpoint_slices, slice_task) = follow(
            Api::<EndpointSlice>::all(client.clone()),
            changes.clone(),
            kinds[3].clone(),
        );
        let (mesh_policies, policy_task) = follow(
            Api::<MeshPolicy>::all(client.clone()),
            changes.clone(),
            kinds[4].clone(),
        );
        let (mesh_authentications, authn_task) = follow(
            Api::<MeshAuthentication>::all(client),
            changes.clone(),
            kinds[5].clone(),
        );
        KubeSource {
            namespaces,
            pods,
            services,
            endpoint_slices,
            mesh_policies,
            mesh_authentications,
            changes,
            kinds,
            tasks: vec![
                ns_task,
                pod_task,
                svc_task,
                slice_task,
                policy_task,
                authn_task,
            ],
        }
    }

    /// Whether every store has been listed once (before that, enrollment would be partial).
    pub fn ready(&self) -> bool {
        self.kinds.iter().all(|k| k.listed.load(Ordering::Acquire))
    }

    /// The watches failing now (the stores keep their last good objects meanwhile).
    pub fn errors(&self) -> Vec<String> {
        self.kinds
            .iter()
            .filter_map(|k| k.error.lock().ok()?.clone())
            .collect()
    }

    /// Waits until [`KubeSource::ready`].
    pub async fn wait_until_ready(&self) {
        while !self.ready() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Whether anything changed since the last call (and clears it).
    pub fn take_changed(&self) -> bool {
        self.ready() && self.changes.take()
    }

    /// Waits until a watch event arrives.
    pub async fn changed(&self) {
        self.changes.raised().await;
    }

    /// The objects now in the stores.
    pub fn objects(&self) -> ClusterObjects {
        let mut objects = ClusterObjects::default();
        for ns in self.namespaces.state() {
            objects.insert(Object::Namespace(ns));
        }
        for pod in self.pods.state() {
            objects.insert(Object::Pod(pod));
        }
        for svc in self.services.state() {
            objects.insert(Object::Service(svc));
        }
        for slice in self.endpoint_slices.state() {
            objects.insert(Object::EndpointSlice(slice));
        }
        for policy in self.mesh_policies.state() {
            objects.insert(Object::MeshPolicy(policy));
        }
        for authn in self.mesh_authentications.state() {
            objects.insert(Object::MeshAuthentication(authn));
        }
        objects
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A reflector for one kind, raising `changes` on every change; watch errors are logged once
/// per distinct message and retried with backoff by the watcher.
fn follow<K>(
    api: Api<K>,
    changes: Arc<Changes>,
    status: Arc<KindStatus>,
) -> (Store<K>, JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().any_semantic();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if matches!(event, watcher::Event::InitDone) {
                        status.listed.store(true, Ordering::Release);
                    }
                    changes.raise();
                    status.set_error(None);
                }
                Err(e) => {
                    let message = format!(
                        "watching {}: {e}; keeping the last good objects",
                        K::plural(&())
                    );
                    if status.set_error(Some(message.clone())) {
                        warn!("{message}");
                    }
                }
            }
        }
    });
    (reader, task)
}
