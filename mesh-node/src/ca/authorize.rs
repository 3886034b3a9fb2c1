//! Which identities a node may be given: a service account's, while a pod running as it is
//! scheduled on that node. Anything else is refused with a reason for the CA's log (the caller
//! is told only that it was refused).

use k8s_openapi::api::core::v1::Pod;

use crate::cluster::ClusterObjects;
use crate::enrollment::node_of;

/// Why a node may not have an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "node {node} asked for {namespace}/{service_account}, and no running pod of that service account is scheduled on it{elsewhere}"
    )]
    NotOnNode {
        node: String,
        namespace: String,
        service_account: String,
        /// Where such pods are, for the log: `` or ` (they run on node2, node3)`.
        elsewhere: String,
    },
}

/// Whether `node` may hold the identity of `namespace/service_account` now.
pub fn may_hold(
    cluster: &ClusterObjects,
    node: &str,
    namespace: &str,
    service_account: &str,
) -> Result<(), Refusal> {
    let mut elsewhere: Vec<&str> = Vec::new();
    let pods = cluster
        .pods
        .iter()
        .filter(|((ns, _), _)| ns == namespace)
        .map(|(_, pod)| pod.as_ref())
        .filter(|pod| running_as(pod) == service_account && !finished(pod));
    for pod in pods {
        match node_of(pod) {
            Some(n) if n == node => return Ok(()),
            Some(n) if !elsewhere.contains(&n) => elsewhere.push(n),
            _ => {}
        }
    }
    elsewhere.sort_unstable();
    Err(Refusal::NotOnNode {
        node: node.to_owned(),
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        elsewhere: if elsewhere.is_empty() {
            String::new()
        } else {
            format!(" (they run on {})", elsewhere.join(", "))
        },
    })
}

/// The service account a pod runs as (Kubernetes' default when unset).
fn running_as(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default")
}

/// A pod that has ended holds no identity any more.
fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Object;
    use std::sync::Arc;

    fn pod(ns: &str, name: &str, sa: Option<&str>, node: Option<&str>, phase: &str) -> Object {
        let value = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "containers": [{"name": "app"}],
                "serviceAccountName": sa,
                "nodeName": node,
            },
            "status": {"phase": phase},
        });
        Object::Pod(Arc::new(serde_json::from_value(value).unwrap()))
    }

    fn cluster(objects: Vec<Object>) -> ClusterObjects {
        let mut c = ClusterObjects::default();
        for o in objects {
            c.insert(o);
        }
        c
    }

    #[test]
    fn a_node_may_hold_the_identities_of_the_pods_it_runs_and_no_others() {
        let c = cluster(vec![
            pod("shop", "web-1", Some("web"), Some("node1"), "Running"),
            pod("shop", "db-1", Some("db"), Some("node2"), "Running"),
            pod("shop", "plain", None, Some("node1"), "Pending"),
        ]);
        assert_eq!(may_hold(&c, "node1", "shop", "web"), Ok(()));
        assert_eq!(may_hold(&c, "node1", "shop", "default"), Ok(()));
        let refused = may_hold(&c, "node1", "shop", "db").unwrap_err();
        assert_eq!(
            refused.to_string(),
            "node node1 asked for shop/db, and no running pod of that service account is scheduled on it (they run on node2)"
        );
        // The same service account name in another namespace is another identity.
        assert!(may_hold(&c, "node1", "other", "web").is_err());
        assert!(may_hold(&c, "node3", "shop", "web").is_err());
    }

    #[test]
    fn unscheduled_and_finished_pods_give_nothing() {
        let c = cluster(vec![
            pod("shop", "web-1", Some("web"), None, "Pending"),
            pod("shop", "job", Some("batch"), Some("node1"), "Succeeded"),
            pod("shop", "crashed", Some("batch2"), Some("node1"), "Failed"),
        ]);
        assert!(may_hold(&c, "node1", "shop", "web").is_err());
        assert!(may_hold(&c, "node1", "shop", "batch").is_err());
        assert!(may_hold(&c, "node1", "shop", "batch2").is_err());
    }
}
