//! Everything `mesh-node` asks of the Kubernetes API, in one list per role. The install's
//! RBAC rules are checked against these lists (`install/tests`), and the tests that run the
//! Kubernetes source, the controller and the CA against the test API server check that every
//! request made is on the list, so a new watch or write without its permission fails a test
//! rather than a cluster.

/// One permission: verbs on a resource of an API group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// The API group (`""` for the core group).
    pub group: &'static str,
    /// The resource's plural, with `/status` for the status subresource.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    /// Cluster-wide (a ClusterRole), or only in the role's own namespace (a Role).
    pub scope: Scope,
}

/// Where a permission holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Cluster,
    /// The namespace Weft is installed in (the controller's Lease, the node DaemonSet).
    OwnNamespace,
}

const LIST_WATCH: &[&str] = &["list", "watch"];

/// What the Kubernetes source (`kube_source`) lists and watches, cluster-wide: both the node
/// agent and the controller follow the cluster through it.
pub const WATCHED: &[ApiAccess] = &[
    cluster("", "namespaces", LIST_WATCH),
    cluster("", "pods", LIST_WATCH),
    cluster("", "services", LIST_WATCH),
    cluster("discovery.k8s.io", "endpointslices", LIST_WATCH),
    cluster("weft.dev", "meshpolicies", LIST_WATCH),
    cluster("weft.dev", "meshauthentications", LIST_WATCH),
];

/// What only the controller does besides following the cluster: policy status (`controller::
/// status`), leader election (`controller::lease`), the CA's TokenReviews
/// (`ca::authenticate`) and its trust bundle (`ca::publish`).
pub const CONTROLLER_WRITES: &[ApiAccess] = &[
    cluster("weft.dev", "meshpolicies/status", &["patch"]),
    cluster("weft.dev", "meshauthentications/status", &["patch"]),
    cluster("authentication.k8s.io", "tokenreviews", &["create"]),
    ApiAccess {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "update"],
        scope: Scope::OwnNamespace,
    },
    // The trust bundle, into the ConfigMap the install creates (`ca::publish`).
    ApiAccess {
        group: "",
        resource: "configmaps",
        verbs: &["patch"],
        scope: Scope::OwnNamespace,
    },
];

const fn cluster(
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
) -> ApiAccess {
    ApiAccess {
        group,
        resource,
        verbs,
        scope: Scope::Cluster,
    }
}

/// What the node agent asks besides following the cluster: at shutdown, whether its
/// DaemonSet is still there (`owner`: an update keeps capture, an uninstall removes it).
pub const NODE_AGENT_OWN: &[ApiAccess] = &[ApiAccess {
    group: "apps",
    resource: "daemonsets",
    verbs: &["get"],
    scope: Scope::OwnNamespace,
}];

/// The node agent's permissions (`mesh-node run --kubernetes`).
pub fn node_agent() -> Vec<ApiAccess> {
    WATCHED.iter().chain(NODE_AGENT_OWN).copied().collect()
}

/// The controller's permissions (`mesh-node controller`).
pub fn controller() -> Vec<ApiAccess> {
    WATCHED.iter().chain(CONTROLLER_WRITES).copied().collect()
}

/// Whether `accesses` allow `verb` on `group`/`resource`.
pub fn allows(accesses: &[ApiAccess], group: &str, resource: &str, verb: &str) -> bool {
    accesses
        .iter()
        .any(|a| a.group == group && a.resource == resource && a.verbs.contains(&verb))
}
