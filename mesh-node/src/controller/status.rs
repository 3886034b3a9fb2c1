//! What each MeshPolicy's and MeshAuthentication's `status.conditions` should say, from the
//! whole cluster: `Accepted` `False` (reason `Invalid`, the fields and why) for an object the
//! agents refuse; `True` with reason `Tightened` for a policy with rules the tunnels enforce
//! more strictly than written (which rules, where, why); `True`, `Valid` otherwise. Written
//! through the status subresource, only where it differs from what the object holds.

use std::collections::BTreeMap;

use kube::Api;
use kube::api::{Patch, PatchParams};
use policy::{MeshAuthentication, MeshPolicy, StatusCondition};

use crate::cluster::ClusterObjects;
use crate::policies::{attach_policies_everywhere, check_policies, tightened};
use crate::tunnel_state::tunnel_state;

/// The kinds whose status the controller writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    MeshPolicy,
    MeshAuthentication,
}

/// The conditions one object should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredStatus {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    pub conditions: Vec<StatusCondition>,
}

/// The statuses that differ from what the objects of `objects` hold.
pub fn stale_statuses(objects: &ClusterObjects, root_namespace: &str) -> Vec<DesiredStatus> {
    let report = check_policies(objects);
    let mut state = tunnel_state(objects);
    attach_policies_everywhere(&mut state, &report, objects, root_namespace);
    let mut notes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in tightened(&state) {
        notes.entry(t.policy.clone()).or_default().push(t.note());
    }
    let mut stale = Vec::new();
    for ((namespace, name), object) in &objects.mesh_policies {
        let mut accepted =
            StatusCondition::accepted(&policy::validate_policy(object), object.metadata.generation);
        if let Some(notes) = notes.get(&format!("{namespace}/{name}"))
            && accepted.status == "True"
        {
            accepted.reason = "Tightened".to_owned();
            accepted.message = notes.join("; ");
        }
        let held = object.status.as_ref().map(|s| &s.conditions[..]);
        push_if_stale(
            &mut stale,
            PolicyKind::MeshPolicy,
            (namespace, name),
            accepted,
            held,
        );
    }
    for ((namespace, name), object) in &objects.mesh_authentications {
        let accepted = StatusCondition::accepted(
            &policy::validate_authentication(object),
            object.metadata.generation,
        );
        let held = object.status.as_ref().map(|s| &s.conditions[..]);
        let kind = PolicyKind::MeshAuthentication;
        push_if_stale(&mut stale, kind, (namespace, name), accepted, held);
    }
    stale
}

fn push_if_stale(
    stale: &mut Vec<DesiredStatus>,
    kind: PolicyKind,
    (namespace, name): (&String, &String),
    accepted: StatusCondition,
    held: Option<&[StatusCondition]>,
) {
    let conditions = vec![accepted];
    if held != Some(&conditions[..]) {
        stale.push(DesiredStatus {
            kind,
            namespace: namespace.clone(),
            name: name.clone(),
            conditions,
        });
    }
}

/// Writes one object's conditions through its status subresource (a merge patch of
/// `status.conditions` alone).
pub async fn write(client: &kube::Client, status: &DesiredStatus) -> Result<(), kube::Error> {
    let patch = Patch::Merge(serde_json::json!({"status": {"conditions": status.conditions}}));
    let params = PatchParams::default();
    match status.kind {
        PolicyKind::MeshPolicy => {
            Api::<MeshPolicy>::namespaced(client.clone(), &status.namespace)
                .patch_status(&status.name, &params, &patch)
                .await?;
        }
        PolicyKind::MeshAuthentication => {
            Api::<MeshAuthentication>::namespaced(client.clone(), &status.namespace)
                .patch_status(&status.name, &params, &patch)
                .await?;
        }
    }
    Ok(())
}
