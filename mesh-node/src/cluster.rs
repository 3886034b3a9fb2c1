//! The cluster as the agent sees it, whichever source it comes from: Kubernetes objects
//! (`k8s-openapi` types) by namespace and name.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use policy::{MeshAuthentication, MeshPolicy};

/// `namespace/name` of a namespaced object.
pub type ObjectKey = (String, String);

/// Every object the agent uses. Objects are shared with the source that holds them (a
/// pass over a thousand pods copies pointers, not pods).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterObjects {
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub pods: BTreeMap<ObjectKey, Arc<Pod>>,
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    pub mesh_policies: BTreeMap<ObjectKey, Arc<MeshPolicy>>,
    pub mesh_authentications: BTreeMap<ObjectKey, Arc<MeshAuthentication>>,
}

/// One object of a kind the agent follows.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    MeshPolicy(Arc<MeshPolicy>),
    MeshAuthentication(Arc<MeshAuthentication>),
}

impl ClusterObjects {
    /// Adds (or replaces) an object; objects without a name are ignored, and namespaced ones
    /// without a namespace go to `default`, as `kubectl apply` would put them.
    pub fn insert(&mut self, object: Object) {
        match object {
            Object::Namespace(ns) => {
                if let Some(name) = ns.metadata.name.clone() {
                    self.namespaces.insert(name, ns);
                }
            }
            Object::Pod(pod) => {
                if let Some(key) = namespaced_key(&pod.metadata) {
                    self.pods.insert(key, pod);
                }
            }
            Object::Service(svc) => {
                if let Some(key) = namespaced_key(&svc.metadata) {
                    self.services.insert(key, svc);
                }
            }
            Object::EndpointSlice(slice) => {
                if let Some(key) = namespaced_key(&slice.metadata) {
                    self.endpoint_slices.insert(key, slice);
                }
            }
            Object::MeshPolicy(policy) => {
                if let Some(key) = namespaced_key(&policy.metadata) {
                    self.mesh_policies.insert(key, policy);
                }
            }
            Object::MeshAuthentication(authn) => {
                if let Some(key) = namespaced_key(&authn.metadata) {
                    self.mesh_authentications.insert(key, authn);
                }
            }
        }
    }
}

fn namespaced_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<ObjectKey> {
    let name = meta.name.clone()?;
    let namespace = meta
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    Some((namespace, name))
}
