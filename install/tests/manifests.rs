//! The install, rendered by `kubectl kustomize`, held to the code: every object parses into
//! its type with no unknown key; the RBAC rules are exactly what `mesh-node` asks of the API;
//! each container's command is accepted by its binary's own parser; ports, paths and names
//! agree between the manifests and what the binaries use; the dashboard queries only metrics
//! the tunnel exports.

use std::collections::BTreeSet;

use clap::Parser;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, Service};
use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_node::api_access::{self, ApiAccess, Scope};
use weft_install::{Object, install_dir, load};

type Access = (String, String, String);

struct Install {
    objects: Vec<Object>,
}

impl Install {
    fn base() -> Install {
        Install {
            objects: load(&install_dir()).expect("install/ renders and parses"),
        }
    }

    fn daemon_set(&self) -> &DaemonSet {
        self.objects
            .iter()
            .find_map(|o| match o {
                Object::DaemonSet(d) if d.metadata.name.as_deref() == Some("weft-node") => {
                    Some(&**d)
                }
                _ => None,
            })
            .expect("DaemonSet weft-node")
    }

    fn deployment(&self) -> &Deployment {
        self.objects
            .iter()
            .find_map(|o| match o {
                Object::Deployment(d) => Some(&**d),
                _ => None,
            })
            .expect("Deployment weft-controller")
    }

    fn service(&self, name: &str) -> &Service {
        self.objects
            .iter()
            .find_map(|o| match o {
                Object::Service(s) if s.metadata.name.as_deref() == Some(name) => Some(&**s),
                _ => None,
            })
            .unwrap_or_else(|| panic!("Service {name}"))
    }

    /// What the ClusterRole `name` and, when given, the Role `name` grant, as
    /// (group, resource, verb) with the scope.
    fn granted(&self, name: &str) -> BTreeSet<(Access, bool)> {
        let mut out = BTreeSet::new();
        for object in &self.objects {
            let (rules, cluster) = match object {
                Object::ClusterRole(r) if r.metadata.name.as_deref() == Some(name) => {
                    (r.rules.clone().unwrap_or_default(), true)
                }
                Object::Role(r) if r.metadata.name.as_deref() == Some(name) => {
                    (r.rules.clone().unwrap_or_default(), false)
                }
                _ => continue,
            };
            for rule in rules {
                out.extend(expand(&rule).into_iter().map(|a| (a, cluster)));
            }
        }
        out
    }

    /// (role kind, role name) bound to the service account `account` of weft-system.
    fn bindings_of(&self, account: &str) -> BTreeSet<(String, String)> {
        let subject_is = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
            subjects.iter().flatten().any(|s| {
                s.kind == "ServiceAccount"
                    && s.name == account
                    && s.namespace.as_deref() == Some("weft-system")
            })
        };
        let mut out = BTreeSet::new();
        for object in &self.objects {
            match object {
                Object::ClusterRoleBinding(b) if subject_is(&b.subjects) => {
                    out.insert((b.role_ref.kind.clone(), b.role_ref.name.clone()));
                }
                Object::RoleBinding(b) if subject_is(&b.subjects) => {
                    assert_eq!(b.metadata.namespace.as_deref(), Some("weft-system"));
                    out.insert((b.role_ref.kind.clone(), b.role_ref.name.clone()));
                }
                _ => {}
            }
        }
        out
    }
}

fn expand(rule: &PolicyRule) -> Vec<Access> {
    assert!(
        rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
        "rules name whole resources: {rule:?}"
    );
    let mut out = Vec::new();
    for group in rule.api_groups.iter().flatten() {
        for resource in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                assert_ne!(verb, "*", "no wildcard verbs: {rule:?}");
                assert_ne!(resource, "*", "no wildcard resources: {rule:?}");
                out.push((group.clone(), resource.clone(), verb.clone()));
            }
        }
    }
    out
}

fn from_code(accesses: &[ApiAccess]) -> BTreeSet<(Access, bool)> {
    accesses
        .iter()
        .flat_map(|a| {
            a.verbs.iter().map(move |v| {
                (
                    (a.group.to_owned(), a.resource.to_owned(), (*v).to_owned()),
                    a.scope == Scope::Cluster,
                )
            })
        })
        .collect()
}

#[test]
fn every_rendered_object_parses_into_its_type_with_no_unknown_key() {
    let base = Install::base();
    let kinds: BTreeSet<String> = base
        .objects
        .iter()
        .map(|o| format!("{o:?}").split('(').next().unwrap_or("").to_owned())
        .collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "DaemonSet",
        "Deployment",
        "Service",
        "CustomResourceDefinition",
    ] {
        assert!(kinds.contains(kind), "install/ has a {kind}: {kinds:?}");
    }
    let monitoring = load(&install_dir().join("monitoring")).expect("install/monitoring");
    assert_eq!(monitoring.len(), base.objects.len() + 2);
    let monitor = monitoring
        .iter()
        .find_map(|o| match o {
            Object::PodMonitor(m) => Some(m),
            _ => None,
        })
        .expect("a PodMonitor");
    let dashboard = monitoring
        .iter()
        .find_map(|o| match o {
            Object::ConfigMap(c)
                if c.metadata.name.as_deref() == Some("weft-grafana-dashboard") =>
            {
                Some(c)
            }
            _ => None,
        })
        .expect("the dashboard's ConfigMap");
    assert!(
        dashboard
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key("weft-dashboard.json"))
    );
    // The PodMonitor's port is the tunnel's metrics port, on the node pods.
    let pod = &base.daemon_set().spec;
    assert_eq!(
        monitor.spec.selector.match_labels,
        pod.selector.match_labels
    );
    let endpoint = &monitor.spec.pod_metrics_endpoints[0];
    assert_eq!(
        container_port(
            container(pod_spec(base.daemon_set()), "tunnel"),
            &endpoint.port
        ),
        15020
    );
    assert_eq!(endpoint.path.as_deref(), Some("/metrics"));
}

/// The roles named `role` grant exactly `code`: a missing rule and an extra one both fail.
fn same_rules(install: &Install, role: &str, code: &[ApiAccess]) {
    let granted = install.granted(role);
    let wanted = from_code(code);
    let extra: Vec<_> = granted.difference(&wanted).collect();
    let missing: Vec<_> = wanted.difference(&granted).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{role}: rules the code does not use (true: ClusterRole, false: Role): {extra:?}; rules the code needs and {role} lacks: {missing:?}"
    );
}

#[test]
fn rbac_rules_are_exactly_what_the_code_asks_of_the_api() {
    let install = Install::base();
    same_rules(&install, "weft-node", &api_access::node_agent());
    same_rules(&install, "weft-controller", &api_access::controller());
    // Each role is bound to the service account its pods run as, and to nothing else.
    assert_eq!(
        pod_spec(install.daemon_set())
            .service_account_name
            .as_deref(),
        Some("weft-node")
    );
    assert_eq!(
        install.bindings_of("weft-node"),
        BTreeSet::from([
            ("ClusterRole".to_owned(), "weft-node".to_owned()),
            ("Role".to_owned(), "weft-node".to_owned()),
        ])
    );
    assert_eq!(
        install
            .deployment()
            .spec
            .template
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref()),
        Some("weft-controller")
    );
    assert_eq!(
        install.bindings_of("weft-controller"),
        BTreeSet::from([
            ("ClusterRole".to_owned(), "weft-controller".to_owned()),
            ("Role".to_owned(), "weft-controller".to_owned()),
        ])
    );
    // The flows reader: port-forward to the controller and nothing else, bound to no one.
    let reader: BTreeSet<(Access, bool)> = [
        ("apps", "deployments", "get"),
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods/portforward", "create"),
    ]
    .into_iter()
    .map(|(g, r, v)| ((g.to_owned(), r.to_owned(), v.to_owned()), false))
    .collect();
    assert_eq!(install.granted("weft-flows-reader"), reader);
    assert!(
        !install.objects.iter().any(|o| matches!(o,
            Object::RoleBinding(b) if b.role_ref.name == "weft-flows-reader")),
        "the install grants no one the flows"
    );
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.template.spec.as_ref().expect("a pod template")
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("container {name}"))
}

fn container_port(c: &Container, name: &str) -> i32 {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{} has no port {name}", c.name))
        .container_port
}

fn argv(c: &Container) -> Vec<String> {
    c.command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect()
}

/// The container's environment as the kubelet would set it, with field references resolved.
fn environment(c: &Container) -> Vec<(String, String)> {
    c.env
        .iter()
        .flatten()
        .map(
            |EnvVar {
                 name,
                 value,
                 value_from,
             }| {
                let value = match (value, value_from) {
                    (Some(v), _) => v.clone(),
                    (None, Some(from)) => {
                        let field = &from
                            .field_ref
                            .as_ref()
                            .expect("only field references")
                            .field_path;
                        match field.as_str() {
                            "spec.nodeName" => "node1".to_owned(),
                            "metadata.name" => "weft-controller-abc12".to_owned(),
                            "metadata.namespace" => "weft-system".to_owned(),
                            other => panic!("{name}: field {other} is not one the test resolves"),
                        }
                    }
                    (None, None) => String::new(),
                };
                (name.clone(), value)
            },
        )
        .collect()
}

/// Runs `parse` with the container's environment set, as clap reads it from the process.
fn with_environment<T>(c: &Container, parse: impl FnOnce() -> T) -> T {
    let env = environment(c);
    for (name, value) in &env {
        // SAFETY: nextest runs each test in its own process, and this test starts no threads
        // that read the environment while it is changed.
        unsafe { std::env::set_var(name, value) };
    }
    let out = parse();
    for (name, _) in &env {
        // SAFETY: as above.
        unsafe { std::env::remove_var(name) };
    }
    out
}

fn probe_port(c: &Container) -> (i32, String) {
    let (port, path) = weft_install::readiness_probe(c)
        .unwrap_or_else(|| panic!("{} has an HTTP readiness probe on one of its ports", c.name));
    (i32::from(port), path)
}

fn mount_path(c: &Container, volume: &str) -> String {
    c.volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume)
        .unwrap_or_else(|| panic!("{} mounts {volume}", c.name))
        .mount_path
        .clone()
}

#[test]
fn each_container_command_is_accepted_by_its_binary_and_agrees_with_the_manifest() {
    let install = Install::base();
    let pod = pod_spec(install.daemon_set());

    // The agent.
    let agent = container(pod, "agent");
    let args = argv(agent);
    assert_eq!(args[0], "mesh-node");
    let parsed = with_environment(agent, || mesh_node::cli::Args::try_parse_from(&args))
        .unwrap_or_else(|e| panic!("mesh-node refuses the agent's command {args:?}: {e}"));
    let mesh_node::cli::Command::Run(run) = parsed.command else {
        panic!("the agent runs `mesh-node run`");
    };
    assert!(run.kubernetes && run.manifests.is_none());
    assert_eq!(run.node_name, "node1", "WEFT_NODE_NAME from spec.nodeName");
    assert!(!run.no_capture);
    assert_eq!(
        run.owner_daemonset.as_deref(),
        install.daemon_set().metadata.name.as_deref(),
        "the agent watches its own DaemonSet to tell an update from an uninstall"
    );
    assert_eq!(run.pod_namespace, "weft-system");
    assert_eq!(
        run.readiness_addr.port() as i32,
        probe_port(agent).0,
        "the agent's readiness probe"
    );
    assert!(
        run.readiness_addr.ip().is_unspecified(),
        "the kubelet probes the pod's address"
    );
    let socket = run.tunnel_socket.expect("an agent socket");
    assert!(socket.starts_with(mount_path(agent, "run")));
    let cgroup = run
        .cgroup
        .expect("--cgroup: the host's hierarchy, not the container's");
    assert_eq!(cgroup.to_str(), Some(mount_path(agent, "cgroup").as_str()));
    assert_eq!(mount_path(agent, "bpffs"), "/sys/fs/bpf");

    // The preflight checks what the agent will use.
    let preflight = container(pod, "preflight");
    let args = argv(preflight);
    let parsed = with_environment(preflight, || mesh_node::cli::Args::try_parse_from(&args))
        .unwrap_or_else(|e| panic!("mesh-node refuses the preflight's command {args:?}: {e}"));
    let mesh_node::cli::Command::Preflight(checks) = parsed.command else {
        panic!("the init container runs `mesh-node preflight`");
    };
    assert_eq!(checks.cgroup, cgroup);
    assert_eq!(
        checks.bpffs.to_str(),
        Some(mount_path(preflight, "bpffs").as_str())
    );
    assert_eq!(
        checks.termination_log.to_str(),
        Some(
            preflight
                .termination_message_path
                .as_deref()
                .unwrap_or("/dev/termination-log")
        )
    );

    // The tunnel.
    let tunnel = container(pod, "tunnel");
    let args = argv(tunnel);
    assert_eq!(args[0], "ztunnel");
    let parsed = with_environment(tunnel, || ztunnel::config::Cli::try_parse_from(&args))
        .unwrap_or_else(|e| panic!("ztunnel refuses the tunnel's command {args:?}: {e}"));
    let ztunnel::config::Command::Run(config) = parsed.command;
    config.validate().expect("a valid tunnel configuration");
    assert_eq!(config.node_name, "node1");
    assert_eq!(
        config.agent_socket.as_ref(),
        Some(&socket),
        "one agent socket"
    );
    assert!(
        config
            .agent_socket
            .as_ref()
            .unwrap()
            .starts_with(mount_path(tunnel, "run"))
    );
    assert!(
        config
            .trust_bundle
            .starts_with(mount_path(tunnel, "trust-bundle"))
    );
    assert!(
        config
            .ca_token_file
            .starts_with(mount_path(tunnel, "ca-token"))
    );
    let (port, path) = probe_port(tunnel);
    assert_eq!(
        (config.readiness_addr.port() as i32, path.as_str()),
        (port, "/healthz/ready")
    );
    assert!(config.readiness_addr.ip().is_unspecified());
    assert!(config.metrics_addr.ip().is_unspecified());
    assert_eq!(
        config.metrics_addr.port() as i32,
        container_port(tunnel, "http-metrics")
    );
    let annotations = install
        .daemon_set()
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert_eq!(
        annotations.get("prometheus.io/port").map(String::as_str),
        Some(config.metrics_addr.port().to_string().as_str())
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );
    assert!(
        config.admin_addr.ip().is_loopback(),
        "the admin endpoint stays on the pod's loopback"
    );
    assert_eq!(
        config.socket_mark, run.tunnel_mark,
        "the tunnel's mark is the agent's"
    );

    // The controller, and the tunnel's way to its CA.
    let deployment = install.deployment();
    let controller_pod = deployment.spec.template.spec.as_ref().unwrap();
    let controller = &controller_pod.containers[0];
    let args = argv(controller);
    let parsed = with_environment(controller, || mesh_node::cli::Args::try_parse_from(&args))
        .unwrap_or_else(|e| panic!("mesh-node refuses the controller's command {args:?}: {e}"));
    let mesh_node::cli::Command::Controller(settings) = parsed.command else {
        panic!("the controller runs `mesh-node controller`");
    };
    assert!(settings.manifests.is_none() && settings.ca.node_tokens.is_none());
    assert_eq!(settings.identity.as_deref(), Some("weft-controller-abc12"));
    assert_eq!(settings.lease_namespace, "weft-system");
    assert_eq!(
        settings.ca.ca_dir.as_ref().and_then(|d| d.to_str()),
        Some(mount_path(controller, "ca").as_str())
    );
    assert_eq!(
        settings.readiness_addr.port() as i32,
        probe_port(controller).0
    );
    assert_eq!(
        settings.ca.node_agent_accounts,
        ["system:serviceaccount:weft-system:weft-node"],
        "the CA takes the node DaemonSet's service account"
    );
    let ca_port = settings.ca.ca_listen.port() as i32;
    assert_eq!(container_port(controller, "grpc-ca"), ca_port);
    let service = install.service("weft-ca");
    let service_port = &service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(service_port.target_port, Some(IntOrString::Int(ca_port)));
    assert_eq!(
        config.ca_address,
        format!("weft-ca.weft-system.svc:{}", service_port.port),
        "the tunnel dials the CA's Service"
    );
    assert!(
        settings.ca.ca_server_names.contains(&config.ca_server_name),
        "the CA's certificate names what the tunnel verifies"
    );
    // The bundle the CA publishes is the file the tunnel follows.
    let published = settings
        .ca
        .trust_bundle_configmap
        .as_deref()
        .expect("the CA publishes its bundle in a ConfigMap");
    let mounted = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "trust-bundle")
        .and_then(|v| v.config_map.as_ref())
        .map(|c| c.name.as_str());
    assert_eq!(
        mounted,
        Some(published),
        "the tunnel mounts the CA's ConfigMap"
    );
    assert_eq!(
        config.trust_bundle.file_name().and_then(|n| n.to_str()),
        Some(mesh_node::ca::publish::BUNDLE_KEY)
    );
    assert!(
        install
            .objects
            .iter()
            .any(|o| matches!(o, Object::ConfigMap(c)
            if c.metadata.name.as_deref() == Some(published) && c.data.is_none())),
        "the install creates the ConfigMap empty, for the CA to fill"
    );
    assert_eq!(
        service.spec.as_ref().unwrap().selector,
        deployment.spec.selector.match_labels
    );
    // The flow relay: every replica, on the CA's port; users reach it on loopback only.
    let relay = install.service("weft-relay");
    let relay_spec = relay.spec.as_ref().unwrap();
    assert_eq!(
        relay_spec.cluster_ip.as_deref(),
        Some("None"),
        "headless: a tunnel resolves every replica"
    );
    assert_eq!(relay_spec.selector, deployment.spec.selector.match_labels);
    let relay_port = &relay_spec.ports.as_ref().unwrap()[0];
    assert_eq!(relay_port.target_port, Some(IntOrString::Int(ca_port)));
    assert_eq!(
        config.flow_relay,
        Some(format!("weft-relay.weft-system.svc:{}", relay_port.port)),
        "the tunnel offers its flows to every replica"
    );
    assert!(settings.ca.flows_listen.ip().is_loopback());
}

#[test]
fn the_dashboard_queries_only_metrics_the_tunnel_exports() {
    let text = std::fs::read_to_string(
        install_dir().join("components/grafana-dashboard/weft-dashboard.json"),
    )
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let exported = every_metric_once();
    let mut queried = BTreeSet::new();
    let mut labels = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("weft_") {
                    queried.insert(word.to_owned());
                }
            }
            // Label names: in `by (...)` groupings and before `=`, `!=`, `=~` in matchers.
            for grouping in expr.split("by (").skip(1) {
                let names = grouping.split(')').next().unwrap_or("");
                labels.extend(names.split(',').map(|n| n.trim().to_owned()));
            }
            for matcher in expr.split(['{', ',']).skip(1) {
                if let Some((name, _)) = matcher.split_once('=') {
                    labels.insert(name.trim().trim_end_matches('!').to_owned());
                }
            }
        }
    }
    assert!(queried.len() >= 8, "{queried:?}");
    // `le` is the histogram's own; `pod` is the label Prometheus's Kubernetes discovery adds.
    for label in labels
        .iter()
        .filter(|l| !["le", "pod"].contains(&l.as_str()))
    {
        assert!(
            exported.contains(&format!("{label}=\"")),
            "the dashboard groups or filters by {label}, a label no tunnel metric has"
        );
    }
    for metric in &queried {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| metric.strip_suffix(suffix))
            .unwrap_or(metric);
        assert!(
            exported.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {metric}, which the tunnel does not export:\n{exported}"
        );
    }
}

/// The tunnel's metrics text with one sample in every family (a family with no sample is not
/// written at all).
fn every_metric_once() -> String {
    use ztunnel::telemetry::{
        ConnectionLabels, IdentityLabels, Metrics, PolicyDecisionLabels, RefusedLabels,
        RenewalLabels, Reporter, RequestLabels,
    };
    let metrics = Metrics::new();
    let connection = ConnectionLabels {
        reporter: Reporter::destination,
        source_workload: "client".into(),
        source_workload_namespace: "shop".into(),
        source_principal: "spiffe://cluster.local/ns/shop/sa/client".into(),
        destination_workload: "web".into(),
        destination_workload_namespace: "shop".into(),
        destination_principal: "spiffe://cluster.local/ns/shop/sa/web".into(),
        destination_service: "web.shop.svc.cluster.local".into(),
        connection_security_policy: "mutual_tls".into(),
        response_flags: "-".into(),
    };
    for family in [
        &metrics.opened,
        &metrics.closed,
        &metrics.sent_bytes,
        &metrics.received_bytes,
    ] {
        family.get_or_create(&connection).inc();
    }
    let request = RequestLabels {
        connection,
        response_code: 200,
        request_protocol: "http",
    };
    metrics.requests.get_or_create(&request).inc();
    for family in [
        &metrics.request_duration,
        &metrics.request_bytes,
        &metrics.response_bytes,
    ] {
        family.get_or_create(&request).observe(1.0);
    }
    metrics
        .policy_decisions
        .get_or_create(&PolicyDecisionLabels {
            policy: "shop/web".into(),
            decision: "deny",
        })
        .inc();
    metrics
        .hbone_refused
        .get_or_create(&RefusedLabels { reason: "tls" })
        .inc();
    metrics
        .certificate_expiration
        .get_or_create(&IdentityLabels {
            identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
        })
        .set(1);
    metrics
        .certificate_renewals
        .get_or_create(&RenewalLabels { result: "success" })
        .inc();
    metrics.encode()
}
