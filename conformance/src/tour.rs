//! What `weft-demo` sends, for any cluster of manifests: from each client pod (one that runs no
//! HTTP test app) to each HTTP server pod by its address, and to each service in front of a
//! server by the service's address. A folder with other pods than the demo's gets its own tour
//! instead of a missing pod.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use mesh_node::cluster::ClusterObjects;
use mesh_node::enrollment::is_enrolled;

/// At most this many calls (a folder of many pods gets a sample).
const MAX_CALLS: usize = 12;

/// One request of the tour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The pod it is sent from.
    pub from: String,
    pub url: String,
}

/// The HTTP port of a pod running `weft-testapp http`.
fn http_port(pod: &Pod) -> Option<u16> {
    pod.spec.iter().flat_map(|s| &s.containers).find_map(|c| {
        let is_http = c.image.as_deref() == Some("weft-testapp")
            && c.args.as_ref().and_then(|a| a.first()).map(String::as_str) == Some("http");
        let port = c.ports.iter().flatten().next()?.container_port;
        is_http.then(|| u16::try_from(port).ok()).flatten()
    })
}

/// The calls for `objects`; `ip_of` gives a pod's address by name.
pub fn tour(objects: &ClusterObjects, ip_of: impl Fn(&str) -> Option<IpAddr>) -> Vec<Call> {
    let servers: Vec<(&str, u16, &Pod)> = objects
        .pods
        .iter()
        .filter_map(|((_, name), pod)| Some((name.as_str(), http_port(pod)?, &**pod)))
        .collect();
    let mut clients: Vec<&str> = objects
        .pods
        .keys()
        .map(|(_, name)| name.as_str())
        .filter(|name| servers.iter().all(|(server, _, _)| server != name))
        .collect();
    if clients.is_empty() {
        // Only servers: they call each other.
        clients = servers.iter().map(|(name, _, _)| *name).collect();
    }
    // Clients in the mesh first: a service address is reached only through the mesh (there is
    // no kube-proxy in the simulated cluster).
    let enrolled = |name: &str| {
        objects
            .pods
            .iter()
            .find(|((_, n), _)| n == name)
            .is_some_and(|(_, pod)| is_enrolled(pod, &objects.namespaces))
    };
    clients.sort_by_key(|name| !enrolled(name));
    let mut calls = Vec::new();
    // Each service in front of a server, from the first client.
    for ((namespace, name), service) in &objects.services {
        let Some(spec) = &service.spec else { continue };
        let (Some(vip), Some(port)) = (
            spec.cluster_ip.as_deref().filter(|ip| *ip != "None"),
            spec.ports.iter().flatten().next().map(|p| p.port),
        ) else {
            continue;
        };
        let selects_a_server = spec.selector.as_ref().is_some_and(|selector| {
            servers.iter().any(|(_, _, pod)| {
                pod.metadata.namespace.as_deref() == Some(namespace.as_str())
                    && selector.iter().all(|(k, v)| {
                        pod.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v)
                    })
            })
        });
        let meshed_client = clients.first().filter(|c| enrolled(c));
        if let (true, Some(client)) = (selects_a_server, meshed_client) {
            calls.push(Call {
                from: (*client).to_owned(),
                url: format!("http://{vip}:{port}/echo/hello-via-service-{name}"),
            });
        }
    }
    // Each client to each server, by the server's address.
    for client in &clients {
        for (server, port, _) in &servers {
            if client == server {
                continue;
            }
            if let Some(ip) = ip_of(server) {
                calls.push(Call {
                    from: (*client).to_owned(),
                    url: format!("http://{ip}:{port}/echo/hello-from-{client}"),
                });
            }
        }
    }
    calls.truncate(MAX_CALLS);
    calls
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_node::manifests::parse_documents;

    fn objects(text: &str) -> ClusterObjects {
        let mut objects = ClusterObjects::default();
        for object in parse_documents(std::path::Path::new("t.yaml"), text).unwrap() {
            objects.insert(object);
        }
        objects
    }

    fn ip(name: &str) -> Option<IpAddr> {
        match name {
            "api" => Some("10.10.2.1".parse().unwrap()),
            "db" => Some("10.10.2.2".parse().unwrap()),
            _ => Some("10.10.1.9".parse().unwrap()),
        }
    }

    #[test]
    fn any_cluster_gets_its_own_tour() {
        let cluster = objects(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: outside}
---
apiVersion: v1
kind: Pod
metadata: {name: visitor, namespace: outside}
spec: {nodeName: node1, containers: [{name: v, image: curl}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: app, labels: {role: api}}
spec: {nodeName: node2, containers: [{name: a, image: weft-testapp, args: [http, --port, "9000", --name, api], ports: [{containerPort: 9000}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: app}
spec: {nodeName: node2, containers: [{name: d, image: weft-testapp, args: [echo, --port, "5432"], ports: [{containerPort: 5432}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: tester, namespace: app}
spec: {nodeName: node1, containers: [{name: t, image: curl}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: app}
spec: {clusterIP: 10.96.1.1, selector: {role: api}, ports: [{port: 80, targetPort: 9000}]}
"#,
        );
        assert_eq!(
            tour(&cluster, ip),
            vec![
                Call {
                    from: "db".into(),
                    url: "http://10.96.1.1:80/echo/hello-via-service-api".into()
                },
                Call {
                    from: "db".into(),
                    url: "http://10.10.2.1:9000/echo/hello-from-db".into()
                },
                Call {
                    from: "tester".into(),
                    url: "http://10.10.2.1:9000/echo/hello-from-tester".into()
                },
                Call {
                    from: "visitor".into(),
                    url: "http://10.10.2.1:9000/echo/hello-from-visitor".into()
                },
            ],
            "meshed clients first (the service only from one of them); the echo pod is a \
             client of the HTTP one like any other pod"
        );
        let none = objects("apiVersion: v1\nkind: Namespace\nmetadata: {name: empty}\n");
        assert_eq!(tour(&none, ip), vec![], "nothing to call is no panic");
    }
}
