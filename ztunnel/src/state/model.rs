//! The workload and service tables, validated and indexed for lookups on every connection.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use std::sync::Arc;

pub use tunnel_proto::{AppProtocol, Protocol, Service, ServicePort, StateSpec, Workload};

use policy::authorize::Authorizer;
use policy::{MeshPolicy, NamedPolicy};

use super::StateError;
use crate::identity::Identity;

/// The SPIFFE identity of a workload.
pub trait WorkloadIdentity {
    /// The SPIFFE ID this workload proves.
    fn identity(&self, trust_domain: &str) -> Identity;
}

impl WorkloadIdentity for Workload {
    fn identity(&self, trust_domain: &str) -> Identity {
        Identity::new(trust_domain, &self.namespace, &self.service_account)
    }
}

/// Validated, indexed cluster state. Immutable: a change builds a new one.
#[derive(Debug, Default)]
pub struct State {
    spec: StateSpec,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    by_key: HashMap<String, Arc<Workload>>,
    by_vip: HashMap<SocketAddr, (Arc<Service>, u16)>,
    /// The compiled policies of each workload that names any, by `namespace/name`.
    authorizers: HashMap<String, Arc<Authorizer>>,
    /// What the services of a workload (`namespace/name`) declare its ports speak, by port,
    /// where any declares it (by workload first: a connection looks it up without a key to
    /// build).
    declared: HashMap<String, HashMap<u16, AppProtocol>>,
}

/// How the tunnel serving a workload carries connections to one of its ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortHandling {
    /// Bytes copied as they come; HTTP fields of the policies are enforced more strictly than
    /// written (a Deny rule with them denies the connection, an Allow rule does not match).
    Tcp,
    /// Parsed as HTTP: each request decided, answered 403 when denied, and counted.
    Http,
}

impl State {
    /// Validates `spec`; `source_name` (a file path, "agent") goes into error messages.
    pub fn build(spec: StateSpec, source_name: &str) -> Result<Self, StateError> {
        let invalid = |what: String, reason: String| StateError::Invalid {
            source_name: source_name.to_owned(),
            what,
            reason,
        };
        let mut by_ip = HashMap::new();
        let mut by_key = HashMap::new();
        for (i, w) in spec.workloads.iter().enumerate() {
            let what = format!("workloads[{i}] ({})", w.key());
            for (field, value) in [
                ("name", &w.name),
                ("namespace", &w.namespace),
                ("serviceAccount", &w.service_account),
                ("node", &w.node),
            ] {
                if value.is_empty() || value.contains('/') {
                    return Err(invalid(
                        what,
                        format!("{field} must be non-empty and hold no '/'"),
                    ));
                }
            }
            if w.ips.is_empty() {
                return Err(invalid(what, "a workload needs at least one IP".into()));
            }
            let w = Arc::new(w.clone());
            if by_key.insert(w.key(), w.clone()).is_some() {
                return Err(invalid(
                    what,
                    "a workload of that namespace and name is already listed".into(),
                ));
            }
            for ip in &w.ips {
                if let Some(other) = by_ip.insert(*ip, w.clone()) {
                    return Err(invalid(
                        what,
                        format!("IP {ip} is already used by {}", other.key()),
                    ));
                }
            }
        }
        let mut by_vip = HashMap::new();
        let mut declared: HashMap<String, HashMap<u16, AppProtocol>> = HashMap::new();
        for (i, s) in spec.services.iter().enumerate() {
            let what = format!("services[{i}] ({})", s.key());
            if s.addresses.is_empty() || s.ports.is_empty() {
                return Err(invalid(
                    what,
                    "a service needs at least one address and one port".into(),
                ));
            }
            for endpoint in &s.endpoints {
                if !by_key.contains_key(endpoint) {
                    return Err(invalid(
                        what,
                        format!("endpoint {endpoint:?} is not a listed workload (namespace/name)"),
                    ));
                }
            }
            for port in s.ports.iter().filter(|p| !p.app_protocol.is_unspecified()) {
                for endpoint in &s.endpoints {
                    declared
                        .entry(endpoint.clone())
                        .or_default()
                        .entry(port.target_port)
                        .and_modify(|d| *d = d.merge(port.app_protocol))
                        .or_insert(port.app_protocol);
                }
            }
            let service = Arc::new(s.clone());
            let mut seen = HashSet::new();
            for ip in &s.addresses {
                if by_ip.contains_key(ip) {
                    return Err(invalid(what, format!("address {ip} is also a workload IP")));
                }
                for port in &s.ports {
                    let vip = SocketAddr::new(*ip, port.port);
                    if !seen.insert(vip)
                        || by_vip
                            .insert(vip, (service.clone(), port.target_port))
                            .is_some()
                    {
                        return Err(invalid(what, format!("{vip} is already a service address")));
                    }
                }
            }
        }
        let authorizers = compile_policies(&spec, &invalid)?;
        Ok(State {
            spec,
            by_ip,
            by_key,
            by_vip,
            authorizers,
            declared,
        })
    }

    /// The workload owning `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// The workload `namespace/name`.
    pub fn workload(&self, key: &str) -> Option<&Arc<Workload>> {
        self.by_key.get(key)
    }

    /// The service behind a VIP and port, with the target port its endpoints listen on.
    pub fn service_by_vip(&self, vip: SocketAddr) -> Option<(&Arc<Service>, u16)> {
        self.by_vip.get(&vip).map(|(s, p)| (s, *p))
    }

    /// Workloads scheduled on `node`.
    pub fn local_workloads<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.by_key.values().filter(move |w| w.node == node)
    }

    /// The policies in force for workload `key`; `None`: no policy applies.
    pub fn authorizer(&self, key: &str) -> Option<&Arc<Authorizer>> {
        self.authorizers.get(key)
    }

    /// How connections to `port` of workload `key` are carried: parsed as HTTP where a
    /// service declares the port HTTP, or where no service declares what it speaks and a
    /// policy of the workload names HTTP fields for it; else copied as bytes.
    pub fn port_handling(&self, key: &str, port: u16) -> PortHandling {
        match self.declared.get(key).and_then(|ports| ports.get(&port)) {
            Some(AppProtocol::Http) => PortHandling::Http,
            Some(AppProtocol::Opaque) => PortHandling::Tcp,
            Some(AppProtocol::Unspecified) | None => {
                match self.authorizer(key).is_some_and(|a| a.uses_http_on(port)) {
                    true => PortHandling::Http,
                    false => PortHandling::Tcp,
                }
            }
        }
    }

    /// The tables as given, for `/config_dump`.
    pub fn spec(&self) -> &StateSpec {
        &self.spec
    }
}

/// Checks the state's policies (each valid, each name once, each a workload names listed)
/// and compiles each workload's.
fn compile_policies(
    spec: &StateSpec,
    invalid: &dyn Fn(String, String) -> StateError,
) -> Result<HashMap<String, Arc<Authorizer>>, StateError> {
    let mut by_name: HashMap<&str, &NamedPolicy> = HashMap::new();
    for (i, named) in spec.policies.iter().enumerate() {
        let what = format!("policies[{i}] ({})", named.name);
        let Some((namespace, name)) = named.name.split_once('/') else {
            return Err(invalid(what, "a policy's name is namespace/name".into()));
        };
        let mut object = MeshPolicy::new(name, named.spec.clone());
        object.metadata.namespace = Some(namespace.to_owned());
        if let Some(problem) = policy::validate_policy(&object).first() {
            return Err(invalid(what, problem.to_string()));
        }
        if by_name.insert(&named.name, named).is_some() {
            return Err(invalid(
                what,
                "a policy of that name is already listed".into(),
            ));
        }
    }
    let mut authorizers = HashMap::new();
    for (i, w) in spec.workloads.iter().enumerate() {
        if w.policies.is_empty() {
            continue;
        }
        let mut policies = Vec::with_capacity(w.policies.len());
        for name in &w.policies {
            match by_name.get(name.as_str()) {
                Some(named) => policies.push(*named),
                None => {
                    return Err(invalid(
                        format!("workloads[{i}] ({})", w.key()),
                        format!("names policy {name:?}, which `policies` does not list"),
                    ));
                }
            }
        }
        authorizers.insert(w.key(), Arc::new(Authorizer::compile_named(policies)));
    }
    Ok(authorizers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, ip: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: "default".into(),
            service_account: "sa".into(),
            ips: vec![ip.parse().unwrap()],
            node: "node1".into(),
            netns: None,
            protocol: Protocol::Hbone,
            policies: Vec::new(),
            mtls: Default::default(),
        }
    }

    #[test]
    fn indexes_workloads_and_service_addresses() {
        let spec = StateSpec {
            workloads: vec![workload("a", "10.0.0.1"), workload("b", "10.0.0.2")],
            services: vec![Service {
                name: "web".into(),
                namespace: "default".into(),
                addresses: vec!["10.96.0.1".parse().unwrap()],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                    app_protocol: AppProtocol::Unspecified,
                }],
                endpoints: vec!["default/b".into()],
            }],
            policies: vec![],
        };
        let state = State::build(spec, "test").unwrap();
        assert_eq!(
            state
                .workload_by_ip("10.0.0.2".parse().unwrap())
                .unwrap()
                .name,
            "b"
        );
        let (svc, port) = state
            .service_by_vip("10.96.0.1:80".parse().unwrap())
            .unwrap();
        assert_eq!((svc.name.as_str(), port), ("web", 8080));
        assert!(
            state
                .service_by_vip("10.96.0.1:81".parse().unwrap())
                .is_none()
        );
        assert_eq!(state.local_workloads("node1").count(), 2);
    }

    #[test]
    fn refuses_duplicate_ips_and_unknown_endpoints() {
        let dup = StateSpec {
            workloads: vec![workload("a", "10.0.0.1"), workload("b", "10.0.0.1")],
            services: vec![],
            policies: vec![],
        };
        let err = State::build(dup, "f.yaml").unwrap_err().to_string();
        assert!(
            err.contains("workloads[1] (default/b)") && err.contains("10.0.0.1"),
            "{err}"
        );
        let unknown = StateSpec {
            workloads: vec![workload("a", "10.0.0.1")],
            services: vec![Service {
                name: "web".into(),
                namespace: "default".into(),
                addresses: vec!["10.96.0.1".parse().unwrap()],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 80,
                    app_protocol: AppProtocol::Unspecified,
                }],
                endpoints: vec!["default/zz".into()],
            }],
            policies: vec![],
        };
        let err = State::build(unknown, "f.yaml").unwrap_err().to_string();
        assert!(err.contains("default/zz"), "{err}");
    }
}
