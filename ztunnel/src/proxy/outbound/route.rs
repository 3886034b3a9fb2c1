//! Outbound decision: where a connection from a local pod goes, as plain data.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::identity::Identity;
use crate::state::{Protocol, State, Workload, WorkloadIdentity};

/// Port of the HBONE listener in every enrolled pod.
pub const HBONE_PORT: u16 = 15008;

/// Where to send one outbound connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Through the destination's tunnel: TLS to `hbone`, then CONNECT `target`.
    Hbone {
        destination: Arc<Workload>,
        identity: Identity,
        hbone: SocketAddr,
        target: SocketAddr,
        service: Option<String>,
    },
    /// Plain TCP from the source pod's namespace.
    Passthrough {
        target: SocketAddr,
        destination: Option<Arc<Workload>>,
        service: Option<String>,
    },
    /// A service with no endpoint.
    NoEndpoint { service: String },
}

/// Decides the route of a connection to `original` (the address the application dialled).
pub fn route(
    state: &State,
    trust_domain: &str,
    original: SocketAddr,
    cursor: &AtomicUsize,
) -> Route {
    if let Some((service, target_port)) = state.service_by_vip(original) {
        let endpoints: Vec<&Arc<Workload>> = service
            .endpoints
            .iter()
            .filter_map(|key| state.workload(key))
            .collect();
        if endpoints.is_empty() {
            return Route::NoEndpoint {
                service: service.key(),
            };
        }
        let pick = endpoints[cursor.fetch_add(1, Ordering::Relaxed) % endpoints.len()];
        let ip = pick
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == original.is_ipv4())
            .unwrap_or(&pick.ips[0]);
        return to_workload(
            pick,
            SocketAddr::new(*ip, target_port),
            trust_domain,
            Some(service.key()),
        );
    }
    match state.workload_by_ip(original.ip()) {
        Some(workload) => to_workload(workload, original, trust_domain, None),
        None => Route::Passthrough {
            target: original,
            destination: None,
            service: None,
        },
    }
}

fn to_workload(
    workload: &Arc<Workload>,
    target: SocketAddr,
    trust_domain: &str,
    service: Option<String>,
) -> Route {
    match workload.protocol {
        Protocol::Hbone => Route::Hbone {
            destination: workload.clone(),
            identity: workload.identity(trust_domain),
            hbone: SocketAddr::new(target.ip(), HBONE_PORT),
            target,
            service,
        },
        Protocol::Tcp => Route::Passthrough {
            target,
            destination: Some(workload.clone()),
            service,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::parse_state_file;
    use std::path::Path;

    const STATE: &str = r#"
workloads:
  - {name: a, namespace: ns, serviceAccount: sa-a, ips: [10.0.0.1], node: n1}
  - {name: b, namespace: ns, serviceAccount: sa-b, ips: [10.0.0.2], node: n2}
  - {name: c, namespace: ns, ips: [10.0.0.3], node: n2, protocol: TCP}
services:
  - {name: web, namespace: ns, addresses: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], endpoints: [ns/a, ns/b]}
  - {name: empty, namespace: ns, addresses: [10.96.0.2], ports: [{port: 80, targetPort: 80}]}
"#;

    #[test]
    fn decides_hbone_passthrough_and_service_endpoints() {
        let state = parse_state_file(Path::new("s"), STATE).unwrap();
        let cursor = AtomicUsize::new(0);
        let r = route(&state, "td", "10.0.0.2:9000".parse().unwrap(), &cursor);
        match r {
            Route::Hbone {
                identity,
                hbone,
                target,
                ..
            } => {
                assert_eq!(identity.to_string(), "spiffe://td/ns/ns/sa/sa-b");
                assert_eq!(hbone, "10.0.0.2:15008".parse().unwrap());
                assert_eq!(target, "10.0.0.2:9000".parse().unwrap());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            route(&state, "td", "10.0.0.3:80".parse().unwrap(), &cursor),
            Route::Passthrough {
                destination: Some(_),
                ..
            }
        ));
        assert!(matches!(
            route(&state, "td", "192.0.2.1:80".parse().unwrap(), &cursor),
            Route::Passthrough {
                destination: None,
                ..
            }
        ));
        let targets: Vec<SocketAddr> = (0..2)
            .map(
                |_| match route(&state, "td", "10.96.0.1:80".parse().unwrap(), &cursor) {
                    Route::Hbone {
                        target, service, ..
                    } => {
                        assert_eq!(service.as_deref(), Some("ns/web"));
                        target
                    }
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        assert!(targets.contains(&"10.0.0.1:8080".parse().unwrap()));
        assert!(targets.contains(&"10.0.0.2:8080".parse().unwrap()));
        assert_eq!(
            route(&state, "td", "10.96.0.2:80".parse().unwrap(), &cursor),
            Route::NoEndpoint {
                service: "ns/empty".into()
            }
        );
    }
}
