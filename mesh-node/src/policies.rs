//! The mesh's policy objects as the agent holds them: each MeshPolicy and MeshAuthentication is
//! validated; a refused one is reported (log and readiness body) with its field and reason and
//! left out, the others keep working. Enforcing them is the tunnel's, and not built yet: the
//! agent follows and checks them so that a bad object is caught where it is written.

use crate::cluster::ClusterObjects;

/// What the agent made of the cluster's policy objects.
#[derive(Debug, Default, PartialEq)]
pub struct PolicyReport {
    /// Valid MeshPolicies.
    pub policies: usize,
    /// Valid MeshAuthentications.
    pub authentications: usize,
    /// One line per problem of a refused object.
    pub refused: Vec<String>,
}

pub fn check_policies(objects: &ClusterObjects) -> PolicyReport {
    let mut report = PolicyReport::default();
    for policy in objects.mesh_policies.values() {
        let problems = policy::validate_policy(policy);
        if problems.is_empty() {
            report.policies += 1;
        }
        report.refused.extend(problems.iter().map(refusal));
    }
    for authn in objects.mesh_authentications.values() {
        let problems = policy::validate_authentication(authn);
        if problems.is_empty() {
            report.authentications += 1;
        }
        report.refused.extend(problems.iter().map(refusal));
    }
    report
}

fn refusal(problem: &policy::PolicyError) -> String {
    format!("{problem}; this object is ignored")
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
        assert_eq!(report.policies, 1);
        assert_eq!(report.authentications, 1);
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
}
