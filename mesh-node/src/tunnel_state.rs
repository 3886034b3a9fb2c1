//! The tunnel's view of the cluster, computed from the objects: every pod with an address as
//! a workload (HBONE when enrolled, plain TCP otherwise) and every service with a cluster IP
//! and its endpoints: the ready pods of its EndpointSlices when it has any (what Kubernetes
//! maintains, and the only endpoints of a service without selector), else the pods its
//! selector picks (a manifest folder has no EndpointSlice controller).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tracing::warn;
use tunnel_proto::{AppProtocol, Protocol, Service, ServicePort, StateSpec, Workload};

use crate::cluster::{ClusterObjects, ObjectKey};
use crate::enrollment::{ips_of, is_enrolled, is_host_network, node_of};

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
            // Only this node's agent knows where its pods' namespaces are (a state file
            // output fills them in for its own pods; the protocol sends descriptors).
            netns: None,
            protocol: if is_enrolled(pod, &objects.namespaces) {
                Protocol::Hbone
            } else {
                Protocol::Tcp
            },
            // A node's agent fills in its own workloads' (`policies::attach_policies`).
            policies: Vec::new(),
            mtls: Default::default(),
        });
    }
    let mut by_ip = HashMap::new();
    for w in &workloads {
        for ip in &w.ips {
            by_ip.insert(*ip, (w.namespace.clone(), w.name.clone()));
        }
    }
    let listed: HashSet<ObjectKey> = by_ip.values().cloned().collect();
    let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for ((namespace, _), slice) in &objects.endpoint_slices {
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let Some(service) = service {
            slices
                .entry((namespace.as_str(), service.as_str()))
                .or_default()
                .push(slice);
        }
    }
    let known = Known {
        pods: &objects.pods,
        listed: &listed,
        by_ip: &by_ip,
    };
    let services = objects
        .services
        .iter()
        .filter_map(|((namespace, name), svc)| {
            let slices = slices
                .get(&(namespace.as_str(), name.as_str()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            service(namespace, name, svc, slices, &known)
        })
        .collect();
    StateSpec {
        workloads,
        services,
        policies: Vec::new(),
    }
}

/// The label that ties an EndpointSlice to its service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The workloads of the table, for finding a service's members.
struct Known<'a> {
    pods: &'a BTreeMap<ObjectKey, Arc<Pod>>,
    listed: &'a HashSet<ObjectKey>,
    by_ip: &'a HashMap<IpAddr, ObjectKey>,
}

fn service(
    namespace: &str,
    name: &str,
    svc: &KubeService,
    slices: &[&EndpointSlice],
    known: &Known<'_>,
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
    let members: Vec<(&ObjectKey, &Pod)> = if !slices.is_empty() {
        slice_members(namespace, slices, known)
    } else {
        let selector = spec.selector.clone().unwrap_or_default();
        if selector.is_empty() {
            Vec::new()
        } else {
            known
                .pods
                .iter()
                .filter(|(key, pod)| {
                    key.0 == namespace
                        && known.listed.contains(*key)
                        && selector.iter().all(|(k, v)| {
                            pod.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v)
                        })
                })
                .map(|(key, pod)| (key, &**pod))
                .collect()
        }
    };
    let member_pods: Vec<&Pod> = members.iter().map(|(_, pod)| *pod).collect();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let target_port = match (slice_port(slices, p.name.as_deref()), &p.target_port) {
                (Some(resolved), _) => resolved,
                (None, None) => port,
                (None, Some(IntOrString::Int(n))) => u16::try_from(*n).ok()?,
                (None, Some(IntOrString::String(named))) => named_port(&member_pods, named)?,
            };
            let app_protocol = AppProtocol::declared(p.app_protocol.as_deref(), p.name.as_deref());
            Some(ServicePort {
                port,
                target_port,
                app_protocol,
            })
        })
        .collect();
    Some(Service {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        addresses,
        ports,
        endpoints: members
            .iter()
            .map(|((ns, pod), _)| format!("{ns}/{pod}"))
            .collect(),
    })
}

/// The ready endpoints of a service's slices that are workloads of the table: by the pod they
/// name, else by address. Endpoints outside the cluster's pods are left out (the tunnel's
/// service endpoints are workloads).
fn slice_members<'a>(
    namespace: &str,
    slices: &[&EndpointSlice],
    known: &Known<'a>,
) -> Vec<(&'a ObjectKey, &'a Pod)> {
    let mut members = BTreeMap::new();
    for slice in slices {
        for endpoint in slice.endpoints.iter().flatten() {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true); // unknown readiness counts as ready, as the API says
            if !ready {
                continue;
            }
            let by_ref = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref().is_none_or(|k| k == "Pod"))
                .and_then(|r| {
                    let ns = r.namespace.as_deref().unwrap_or(namespace);
                    Some((ns.to_owned(), r.name.clone()?))
                });
            let key = by_ref.or_else(|| {
                endpoint
                    .addresses
                    .iter()
                    .find_map(|a| known.by_ip.get(&a.parse().ok()?).cloned())
            });
            let Some(key) = key else { continue };
            if let Some((key, pod)) = known.pods.get_key_value(&key)
                && known.listed.contains(key)
            {
                members.insert(key, &**pod);
            }
        }
    }
    members.into_iter().collect()
}

/// The target port a service port resolves to in its slices (matched by port name).
fn slice_port(slices: &[&EndpointSlice], name: Option<&str>) -> Option<u16> {
    let name = name.unwrap_or_default();
    slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|p| p.name.as_deref().unwrap_or_default() == name)
        .and_then(|p| u16::try_from(p.port?).ok())
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
            web1.netns, None,
            "the tables never carry a path from an annotation (the agent resolves its own pods)"
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
                    target_port: 8080,
                    app_protocol: AppProtocol::Unspecified,
                },
                ServicePort {
                    port: 8443,
                    target_port: 8443,
                    app_protocol: AppProtocol::Unspecified,
                }
            ]
        );
    }

    #[test]
    fn endpoint_slices_when_present_give_the_ready_pods_and_the_resolved_ports() {
        let slices = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: apps}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: tls, port: 8443, targetPort: 8443}]
---
apiVersion: v1
kind: Service
metadata: {name: manual, namespace: apps}
spec: {clusterIP: 10.96.0.11, ports: [{port: 9000}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: apps, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 9090}, {name: tls, port: 8443}]
endpoints:
- {addresses: [10.1.1.2], conditions: {ready: true}, targetRef: {kind: Pod, name: web-1, namespace: apps}}
- {addresses: [10.1.2.2], conditions: {ready: false}, targetRef: {kind: Pod, name: web-2, namespace: apps}}
- {addresses: [192.0.2.7]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: manual-1, namespace: apps, labels: {kubernetes.io/service-name: manual}}
addressType: IPv4
ports: [{port: 9001}]
endpoints:
- {addresses: [10.1.2.2]}
"#;
        let mut objects = objects();
        for object in parse_documents(std::path::Path::new("s.yaml"), slices).unwrap() {
            objects.insert(object);
        }
        let state = tunnel_state(&objects);
        let by_name: BTreeMap<&str, &Service> = state
            .services
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        let web = by_name["web"];
        assert_eq!(
            web.endpoints,
            vec!["apps/web-1"],
            "web-2 is not ready; 192.0.2.7 is no pod"
        );
        assert_eq!(
            web.ports,
            vec![
                ServicePort {
                    port: 80,
                    target_port: 9090,
                    app_protocol: AppProtocol::Http,
                },
                ServicePort {
                    port: 8443,
                    target_port: 8443,
                    app_protocol: AppProtocol::Opaque,
                }
            ],
            "the slice's resolution of the named port wins; the names say HTTP and TLS"
        );
        let manual = by_name["manual"];
        assert_eq!(
            manual.endpoints,
            vec!["apps/web-2"],
            "a service without selector, its endpoint found by address"
        );
        assert_eq!(
            manual.ports,
            vec![ServicePort {
                port: 9000,
                target_port: 9001,
                app_protocol: AppProtocol::Unspecified,
            }]
        );
    }
}
