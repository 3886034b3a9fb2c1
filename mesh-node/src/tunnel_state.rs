//! The tunnel's view of the cluster, computed from the objects: every pod with an address as
//! a workload (HBONE when enrolled, plain TCP otherwise) and every service with a cluster IP
//! and its endpoints (the pods its selector picks, as an EndpointSlice would list them).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tracing::warn;
use tunnel_proto::{Protocol, Service, ServicePort, StateSpec, Workload};

use crate::cluster::ClusterObjects;
use crate::enrollment::{ips_of, is_enrolled, is_host_network, netns_of, node_of};

/// Pods that no longer run keep their last status but not their address.
fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The workload and service tables for every tunnel.
pub fn tunnel_state(objects: &ClusterObjects) -> StateSpec {
    let mut seen_ips = HashSet::new();
    let mut workloads = Vec::new();
    for ((namespace, name), pod) in &objects.pods {
        if is_host_network(pod) || is_finished(pod) {
            continue;
        }
        let ips: Vec<IpAddr> = ips_of(pod)
            .into_iter()
            .filter(|ip| {
                let fresh = seen_ips.insert(*ip);
                if !fresh {
                    warn!(pod = %format!("{namespace}/{name}"), %ip, "address already used by another pod; ignored");
                }
                fresh
            })
            .collect();
        let Some(node) = node_of(pod) else { continue };
        if ips.is_empty() {
            continue;
        }
        let spec = pod.spec.as_ref();
        workloads.push(Workload {
            name: name.clone(),
            namespace: namespace.clone(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned()),
            ips,
            node: node.to_owned(),
            netns: netns_of(pod),
            protocol: if is_enrolled(pod, &objects.namespaces) {
                Protocol::Hbone
            } else {
                Protocol::Tcp
            },
        });
    }
    let listed: HashSet<(String, String)> = workloads
        .iter()
        .map(|w| (w.namespace.clone(), w.name.clone()))
        .collect();
    let services = objects
        .services
        .iter()
        .filter_map(|((namespace, name), svc)| {
            service(namespace, name, svc, &objects.pods, &listed)
        })
        .collect();
    StateSpec {
        workloads,
        services,
    }
}

fn service(
    namespace: &str,
    name: &str,
    svc: &KubeService,
    pods: &BTreeMap<(String, String), std::sync::Arc<Pod>>,
    listed: &HashSet<(String, String)>,
) -> Option<Service> {
    let spec = svc.spec.as_ref()?;
    let addresses: Vec<IpAddr> = spec
        .cluster_ips
        .clone()
        .unwrap_or_else(|| spec.cluster_ip.clone().into_iter().collect())
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if addresses.is_empty() {
        return None; // headless or not allocated yet: clients reach pods directly
    }
    let selector = spec.selector.clone().unwrap_or_default();
    let members: Vec<&Pod> = if selector.is_empty() {
        Vec::new()
    } else {
        pods.iter()
            .filter(|(key, pod)| {
                key.0 == namespace
                    && listed.contains(*key)
                    && selector.iter().all(|(k, v)| {
                        pod.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v)
                    })
            })
            .map(|(_, pod)| &**pod)
            .collect()
    };
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let target_port = match &p.target_port {
                None => port,
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok()?,
                Some(IntOrString::String(named)) => named_port(&members, named)?,
            };
            Some(ServicePort { port, target_port })
        })
        .collect();
    Some(Service {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        addresses,
        ports,
        endpoints: members
            .iter()
            .filter_map(|p| p.metadata.name.as_ref())
            .map(|n| format!("{namespace}/{n}"))
            .collect(),
    })
}

/// A named target port, from the first member pod's containers that declares it.
fn named_port(members: &[&Pod], name: &str) -> Option<u16> {
    members.iter().find_map(|pod| {
        pod.spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse_documents;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: apps, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: apps, labels: {app: web}, annotations: {weft.dev/netns: /run/netns/web-1}}
spec:
  nodeName: node1
  serviceAccountName: web
  containers: [{name: web, image: web, ports: [{name: http, containerPort: 8080}]}]
status: {podIPs: [{ip: 10.1.1.2}, {ip: "fd00::1:2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: apps, labels: {app: web, weft.dev/mesh: disabled}}
spec: {nodeName: node2, containers: []}
status: {podIP: 10.1.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
spec: {nodeName: node2, containers: []}
status: {podIP: 10.1.2.3}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: apps}
spec: {nodeName: node2, containers: []}
status: {podIP: 10.1.2.3, phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: agent, namespace: apps}
spec: {nodeName: node2, hostNetwork: true, containers: []}
status: {podIP: 10.255.2.1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: apps}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: http}, {port: 8443, targetPort: 8443}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: apps}
spec: {clusterIP: None, selector: {app: web}}
"#;

    fn objects() -> ClusterObjects {
        let mut objects = ClusterObjects::default();
        for object in parse_documents(std::path::Path::new("t.yaml"), CLUSTER).unwrap() {
            objects.insert(object);
        }
        objects
    }

    #[test]
    fn pods_become_workloads_with_their_protocol() {
        let state = tunnel_state(&objects());
        let by_name: BTreeMap<&str, &Workload> = state
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), w))
            .collect();
        assert_eq!(
            by_name.keys().copied().collect::<Vec<_>>(),
            vec!["old", "web-1", "web-2"],
            "finished and host-network pods are not workloads"
        );
        let web1 = by_name["web-1"];
        assert_eq!(web1.protocol, Protocol::Hbone);
        assert_eq!(web1.service_account, "web");
        assert_eq!(web1.node, "node1");
        assert_eq!(web1.ips.len(), 2);
        assert_eq!(
            web1.netns.as_deref(),
            Some(std::path::Path::new("/run/netns/web-1"))
        );
        assert_eq!(by_name["web-2"].protocol, Protocol::Tcp, "opted out");
        assert_eq!(
            by_name["old"].protocol,
            Protocol::Tcp,
            "namespace not labelled"
        );
    }

    #[test]
    fn services_get_their_selected_endpoints_and_resolved_ports() {
        let state = tunnel_state(&objects());
        assert_eq!(state.services.len(), 1, "a headless service has no VIP");
        let web = &state.services[0];
        assert_eq!(web.addresses, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(web.endpoints, vec!["apps/web-1", "apps/web-2"]);
        assert_eq!(
            web.ports,
            vec![
                ServicePort {
                    port: 80,
                    target_port: 8080
                },
                ServicePort {
                    port: 8443,
                    target_port: 8443
                }
            ]
        );
    }
}
