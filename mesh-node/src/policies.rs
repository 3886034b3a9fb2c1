//! The mesh's policy objects as the agent holds them: each MeshPolicy and MeshAuthentication is
//! validated; a refused one is reported (log and readiness body) with its field and reason and
//! left out, the others keep working. The valid ones that apply to this node's workloads go
//! to the tunnel with the state (`attach_policies`), which enforces them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use policy::scope::{Scoped, applies, mtls_mode};
use policy::{MeshAuthentication, MeshPolicy, NamedPolicy};
use tunnel_proto::StateSpec;

use crate::cluster::ClusterObjects;

/// What the agent made of the cluster's policy objects.
#[derive(Debug, Default, PartialEq)]
pub struct PolicyReport {
    /// Valid MeshPolicies, by namespace and name.
    pub policies: Vec<Arc<MeshPolicy>>,
    /// Valid MeshAuthentications, by namespace and name.
    pub authentications: Vec<Arc<MeshAuthentication>>,
    /// One line per problem of a refused object.
    pub refused: Vec<String>,
}

pub fn check_policies(objects: &ClusterObjects) -> PolicyReport {
    let mut report = PolicyReport::default();
    for policy in objects.mesh_policies.values() {
        let problems = policy::validate_policy(policy);
        if problems.is_empty() {
            report.policies.push(policy.clone());
        }
        report.refused.extend(problems.iter().map(refusal));
    }
    for authn in objects.mesh_authentications.values() {
        let problems = policy::validate_authentication(authn);
        if problems.is_empty() {
            report.authentications.push(authn.clone());
        }
        report.refused.extend(problems.iter().map(refusal));
    }
    report
}

fn refusal(problem: &policy::PolicyError) -> String {
    format!("{problem}; this object is ignored")
}

/// Gives each workload of `node` in `state` the valid policies that apply to it (by namespace
/// and name) and its mTLS mode, and `state` those policies. Only the node's own: the tunnel
/// that serves a pod decides for it.
pub fn attach_policies(
    state: &mut StateSpec,
    report: &PolicyReport,
    objects: &ClusterObjects,
    node: &str,
    root_namespace: &str,
) {
    let namespace_of = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned())
    };
    // Each valid policy's name, made once; by index in the report's order.
    let names: Vec<String> = report
        .policies
        .iter()
        .map(|p| policy::name_of(&p.metadata))
        .collect();
    let mut policies_by_namespace: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, p) in report.policies.iter().enumerate() {
        policies_by_namespace
            .entry(namespace_of(&p.metadata))
            .or_default()
            .push(i);
    }
    let mut authns_by_namespace: BTreeMap<String, Vec<&MeshAuthentication>> = BTreeMap::new();
    for a in &report.authentications {
        authns_by_namespace
            .entry(namespace_of(&a.metadata))
            .or_default()
            .push(a);
    }
    let no_labels = BTreeMap::new();
    let mut used = BTreeSet::new();
    for workload in state.workloads.iter_mut().filter(|w| w.node == node) {
        let key = (workload.namespace.clone(), workload.name.clone());
        let labels = objects
            .pods
            .get(&key)
            .and_then(|pod| pod.metadata.labels.as_ref())
            .unwrap_or(&no_labels);
        let scoped = Scoped {
            namespace: &workload.namespace,
            labels,
        };
        // Its namespace's and the root namespace's, in namespace and name order.
        let mut namespaces = vec![workload.namespace.as_str(), root_namespace];
        namespaces.sort_unstable();
        namespaces.dedup();
        let mut in_force = Vec::new();
        for namespace in &namespaces {
            for &i in policies_by_namespace.get(*namespace).into_iter().flatten() {
                let selector = report.policies[i].spec.selector.as_ref();
                if applies(namespace, selector, root_namespace, scoped) {
                    used.insert(i);
                    in_force.push(names[i].clone());
                }
            }
        }
        workload.policies = in_force;
        let authns = namespaces
            .iter()
            .flat_map(|ns| authns_by_namespace.get(*ns).into_iter().flatten().copied());
        workload.mtls = mtls_mode(authns, root_namespace, scoped).0;
    }
    state.policies = used
        .into_iter()
        .map(|i| NamedPolicy {
            name: names[i].clone(),
            spec: report.policies[i].spec.clone(),
        })
        .collect();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse_documents;

    #[test]
    fn a_bad_policy_is_refused_with_its_field_and_the_good_ones_count() {
        let text = r#"
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: good, namespace: shop}
spec: {action: Deny, rules: [{from: [{source: {namespaces: [legacy]}}]}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: bad, namespace: shop}
spec: {rules: [{to: [{operation: {ports: ["99999"]}}]}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshAuthentication
metadata: {name: strict, namespace: shop}
spec: {mode: Strict}
"#;
        let mut objects = ClusterObjects::default();
        for object in parse_documents(std::path::Path::new("p.yaml"), text).unwrap() {
            objects.insert(object);
        }
        let report = check_policies(&objects);
        assert_eq!(report.policies.len(), 1);
        assert_eq!(report.authentications.len(), 1);
        assert_eq!(
            report.refused,
            vec![
                "MeshPolicy shop/bad: spec.rules[0].to[0].operation.ports[0]: \"99999\" is not a port (1-65535); this object is ignored"
            ]
        );
    }

    #[test]
    fn a_weft_kind_of_another_api_version_fails_its_file_with_a_reason() {
        let text = "apiVersion: weft.dev/v2\nkind: MeshPolicy\nmetadata: {name: x, namespace: a}\nspec: {}\n";
        let error = parse_documents(std::path::Path::new("v.yaml"), text)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("v.yaml: document 1")
                && error.contains(
                    "MeshPolicy of apiVersion Some(\"weft.dev/v2\"): Weft reads weft.dev/v1alpha1"
                ),
            "{error}"
        );
    }

    #[test]
    fn this_nodes_workloads_get_the_valid_policies_that_apply_and_their_mode() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node1, containers: [{name: c, image: c}]}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: node1, containers: [{name: c, image: c}]}
status: {podIP: 10.1.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: shop, labels: {app: web}}
spec: {nodeName: node2, containers: [{name: c, image: c}]}
status: {podIP: 10.1.2.2}
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: web-only, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, rules: [{}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: whole-namespace, namespace: shop}
spec: {action: Deny, rules: [{from: [{source: {namespaces: [legacy]}}]}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: broken, namespace: shop}
spec: {rules: [{to: [{operation: {ports: ["0"]}}]}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: mesh-wide, namespace: weft-system}
spec: {action: Audit, rules: [{}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: elsewhere, namespace: other}
spec: {rules: [{}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshAuthentication
metadata: {name: strict-db, namespace: shop}
spec: {selector: {matchLabels: {app: db}}, mode: Strict}
"#;
        let mut objects = ClusterObjects::default();
        for object in parse_documents(std::path::Path::new("p.yaml"), text).unwrap() {
            objects.insert(object);
        }
        let report = check_policies(&objects);
        assert_eq!(
            report.refused.len(),
            1,
            "the broken one: {:?}",
            report.refused
        );
        let mut state = crate::tunnel_state::tunnel_state(&objects);
        attach_policies(&mut state, &report, &objects, "node1", "weft-system");
        let of = |name: &str| {
            let w = state.workloads.iter().find(|w| w.name == name).unwrap();
            (w.policies.clone(), w.mtls)
        };
        assert_eq!(
            of("web"),
            (
                vec![
                    "shop/web-only".to_owned(),
                    "shop/whole-namespace".to_owned(),
                    "weft-system/mesh-wide".to_owned()
                ],
                policy::MtlsMode::Permissive
            )
        );
        assert_eq!(
            of("db"),
            (
                vec![
                    "shop/whole-namespace".to_owned(),
                    "weft-system/mesh-wide".to_owned()
                ],
                policy::MtlsMode::Strict
            )
        );
        assert_eq!(
            of("far"),
            (vec![], policy::MtlsMode::Permissive),
            "another node's"
        );
        let sent: Vec<&str> = state.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            sent,
            [
                "shop/web-only",
                "shop/whole-namespace",
                "weft-system/mesh-wide"
            ],
            "only what this node's workloads use, never the broken one"
        );
    }
}
