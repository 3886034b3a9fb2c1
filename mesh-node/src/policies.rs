//! The mesh's policy objects as the agent holds them: each MeshPolicy and MeshAuthentication is
//! validated; a refused one is reported (log and readiness body) with its field and reason and
//! left out, the others keep working. The valid ones that apply to this node's workloads go
//! to the tunnel with the state (`attach_policies`), which enforces them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use policy::authorize::Authorizer;
use policy::scope::{Scoped, applies, mtls_mode};
use policy::{MeshAuthentication, MeshPolicy, NamedPolicy, PolicyAction};
use tunnel_proto::{AppProtocol, StateSpec};

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
    attach_where(state, report, objects, &|w| w.node == node, root_namespace);
}

/// [`attach_policies`] for every workload of the cluster (the controller's view).
pub fn attach_policies_everywhere(
    state: &mut StateSpec,
    report: &PolicyReport,
    objects: &ClusterObjects,
    root_namespace: &str,
) {
    attach_where(state, report, objects, &|_| true, root_namespace);
}

fn attach_where(
    state: &mut StateSpec,
    report: &PolicyReport,
    objects: &ClusterObjects,
    keep: &dyn Fn(&tunnel_proto::Workload) -> bool,
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
    for workload in state.workloads.iter_mut().filter(|w| keep(w)) {
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

/// The rules of the policies in `state` (attached to its workloads) that name HTTP fields for
/// a port that a Service declares is not HTTP: the tunnel cannot read requests there, so it
/// enforces them more strictly than written (a Deny rule denies every connection it matches
/// on that port, an Allow or Audit rule matches none). One line per policy rule, Service and
/// port, for the log, readiness and the policy's status.
pub fn tightened(state: &StateSpec) -> Vec<Tightened> {
    let mut found = BTreeSet::new();
    let by_name: BTreeMap<&str, &NamedPolicy> = state
        .policies
        .iter()
        .map(|p| (p.name.as_str(), p))
        .collect();
    for workload in state.workloads.iter().filter(|w| !w.policies.is_empty()) {
        let key = workload.key();
        let opaque: Vec<(String, u16)> = state
            .services
            .iter()
            .filter(|s| s.endpoints.contains(&key))
            .flat_map(|s| {
                s.ports
                    .iter()
                    .filter(|p| p.app_protocol == AppProtocol::Opaque)
                    .map(move |p| (s.key(), p.target_port))
            })
            .collect();
        if opaque.is_empty() {
            continue;
        }
        let policies = workload
            .policies
            .iter()
            .filter_map(|name| by_name.get(name.as_str()).copied());
        let authorizer = Authorizer::compile_named(policies);
        for (service, port) in &opaque {
            for (policy, rule) in authorizer.rules_using_http_on(*port) {
                let action = by_name.get(policy).map(|p| p.spec.action);
                found.insert(Tightened {
                    policy: policy.to_owned(),
                    rule,
                    service: service.clone(),
                    port: *port,
                    action: action.unwrap_or_default(),
                });
            }
        }
    }
    found.into_iter().collect()
}

/// A rule enforced more strictly than written (see [`tightened`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tightened {
    /// `namespace/name`.
    pub policy: String,
    /// Its index in `spec.rules`.
    pub rule: usize,
    /// The Service (`namespace/name`) that declares the port is not HTTP.
    pub service: String,
    /// The workload port.
    pub port: u16,
    pub action: PolicyAction,
}

impl Tightened {
    /// What was tightened and why, for the policy's own status.
    pub fn note(&self) -> String {
        let effect = match self.action {
            PolicyAction::Deny => "denies every connection it matches there",
            PolicyAction::Allow => "allows no connection there",
            PolicyAction::Audit => "reports no connection there",
        };
        format!(
            "spec.rules[{}] names HTTP fields, but Service {} declares port {} is not HTTP, so requests there cannot be read: the rule is enforced more strictly than written (it {effect})",
            self.rule, self.service, self.port
        )
    }
}

impl std::fmt::Display for Tightened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshPolicy {}: {}", self.policy, self.note())
    }
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

    #[test]
    fn http_rules_for_a_port_declared_not_http_are_reported_as_tightened() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: node1, containers: [{name: c, image: c}]}
status: {podIP: 10.1.1.3}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.3, selector: {app: db}, ports: [{name: tcp-db, port: 5432}, {name: http-admin, port: 8080}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: no-admin, namespace: shop}
spec: {action: Deny, rules: [{from: [{source: {namespaces: [x]}}]}, {to: [{operation: {paths: [/admin*]}}]}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: gets, namespace: shop}
spec: {rules: [{to: [{operation: {ports: ["8080"], methods: [GET]}}]}]}
"#;
        let mut objects = ClusterObjects::default();
        for object in parse_documents(std::path::Path::new("t.yaml"), text).unwrap() {
            objects.insert(object);
        }
        let report = check_policies(&objects);
        let mut state = crate::tunnel_state::tunnel_state(&objects);
        attach_policies(&mut state, &report, &objects, "node1", "weft-system");
        let lines: Vec<String> = tightened(&state).iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "MeshPolicy shop/no-admin: spec.rules[1] names HTTP fields, but Service shop/db declares port 5432 is not HTTP, so requests there cannot be read: the rule is enforced more strictly than written (it denies every connection it matches there)"
            ],
            "the GET rule is for port 8080, which is HTTP; the Deny's first rule names no HTTP field"
        );
    }
}
