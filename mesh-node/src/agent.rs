//! The agent's loop: read the cluster, compute the tunnel's tables and this node's enrolled
//! pods, hand both on, again whenever the cluster changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};
use tunnel_proto::StateSpec;
use tunnel_proto::last_failure::LastFailure;

use crate::capture::{CaptureReconciler, EnrolledPod};
use crate::cluster::ClusterObjects;
use crate::enrollment::{exclusions_of, is_enrolled, netns_annotation, node_of};
use crate::kube_source::KubeSource;
use crate::manifests::ManifestFolder;
use crate::pod_netns::PodNamespaces;
use crate::policies::{attach_policies, check_policies, tightened};
use crate::tunnel_link::TunnelLink;
use crate::tunnel_state::tunnel_state;

/// Why the agent could not hand the tables to the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot write the tunnel's state file {path}: {source}")]
    WriteState {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode the tunnel's state: {0}")]
    Encode(#[from] serde_saphyr::ser_error::Error),
}

/// Where the agent looks for a pod's network namespace. Nothing a pod's author writes may
/// choose it: the namespace is where capture enrolls and the tunnel opens listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetnsLookup {
    /// The local manifest folder (written by the node's admin): the `weft.dev/netns`
    /// annotation, else the pod's UID in the kubelet's cgroups under this `/proc`.
    AnnotationThenUid { proc_root: PathBuf },
    /// Kubernetes: only by the pod's UID (set by the API server) in the kubelet's cgroups
    /// under this `/proc`; annotations are the pod author's and are never read for it.
    UidOnly { proc_root: PathBuf },
}

impl NetnsLookup {
    fn proc_root(&self) -> &Path {
        match self {
            NetnsLookup::AnnotationThenUid { proc_root } | NetnsLookup::UidOnly { proc_root } => {
                proc_root
            }
        }
    }
}

/// The enrolled pods of `node`, with what capture needs; pods that cannot be captured are
/// reported and left out.
pub fn local_enrolled(
    objects: &ClusterObjects,
    node: &str,
    lookup: &NetnsLookup,
) -> (BTreeMap<String, EnrolledPod>, Vec<String>) {
    let mut wanted = BTreeMap::new();
    let mut problems = Vec::new();
    // Scanned at most once per pass, and only if a pod needs it.
    let mut proc_index: Option<PodNamespaces> = None;
    for ((namespace, name), pod) in &objects.pods {
        if node_of(pod) != Some(node) || !is_enrolled(pod, &objects.namespaces) {
            continue;
        }
        let key = format!("{namespace}/{name}");
        let by_uid = || {
            let uid = pod.metadata.uid.as_deref()?;
            let index = proc_index.get_or_insert_with(|| PodNamespaces::scan(lookup.proc_root()));
            index.get(uid).cloned()
        };
        let annotated = match lookup {
            NetnsLookup::AnnotationThenUid { .. } => netns_annotation(pod),
            NetnsLookup::UidOnly { .. } => None,
        };
        let Some(netns) = annotated.or_else(by_uid) else {
            let looked = match lookup {
                NetnsLookup::AnnotationThenUid { .. } => {
                    "no weft.dev/netns annotation, no running process of its UID"
                }
                NetnsLookup::UidOnly { .. } => "no running process of its UID",
            };
            problems.push(format!(
                "pod {key}: its network namespace is unknown ({looked})"
            ));
            continue;
        };
        match exclusions_of(pod) {
            Ok(exclusions) => {
                wanted.insert(key, EnrolledPod { netns, exclusions });
            }
            Err(reason) => problems.push(format!("pod {key}: {reason}")),
        }
    }
    (wanted, problems)
}

/// The state for a state-file tunnel, which finds its pods' namespaces by path: this node's
/// enrolled pods get the paths the agent resolved.
fn with_local_netns(state: &StateSpec, wanted: &BTreeMap<String, EnrolledPod>) -> StateSpec {
    let mut state = state.clone();
    for workload in &mut state.workloads {
        let key = format!("{}/{}", workload.namespace, workload.name);
        workload.netns = wanted.get(&key).map(|pod| pod.netns.clone());
    }
    state
}

/// Writes the tunnel's state file atomically (a rename), so the tunnel never reads half.
pub fn write_state(path: &Path, state: &StateSpec) -> Result<(), AgentError> {
    let text = serde_saphyr::to_string(state)?;
    let tmp = path.with_extension("tmp");
    let fail = |source| AgentError::WriteState {
        path: path.to_owned(),
        source,
    };
    std::fs::write(&tmp, text).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

/// Where the agent hands the tunnel its tables and local pods.
pub enum TunnelOutput {
    /// A YAML state file the tunnel polls (the tunnel finds pods' namespaces by path).
    StateFile(PathBuf),
    /// The tunnel protocol over a Unix socket (namespaces passed as descriptors).
    Socket(TunnelLink),
}

/// What the agent's readiness endpoint reports.
#[derive(Clone, Debug, Default)]
pub struct AgentStatus {
    /// The source had the whole cluster once and a pass was applied.
    pub synced: bool,
    /// Per-pod problems of the last pass (retried).
    pub problems: Vec<String>,
    /// Source errors now (e.g. the API server unreachable: the last good objects are served).
    pub source_errors: Vec<String>,
    /// Policy objects refused, and rules enforced more strictly than written.
    pub policies: Vec<String>,
}

/// Where the cluster comes from.
pub enum ClusterSource {
    /// The local manifest folder.
    Folder(ManifestFolder),
    /// The Kubernetes API.
    Kubernetes(KubeSource),
}

impl ClusterSource {
    /// Whether the source has the whole cluster (a Kubernetes source before its first lists
    /// does not: acting on it would unenroll every pod).
    fn ready(&self) -> bool {
        match self {
            ClusterSource::Folder(_) => true,
            ClusterSource::Kubernetes(k) => k.ready(),
        }
    }

    /// Looks again; whether anything changed, and what could not be read.
    fn refresh(&mut self) -> (bool, Vec<String>) {
        match self {
            ClusterSource::Folder(folder) => {
                let (changed, errors) = folder.reload();
                (changed, errors.iter().map(folder_error).collect())
            }
            ClusterSource::Kubernetes(k) => (k.take_changed(), Vec::new()),
        }
    }

    fn errors(&self) -> Vec<String> {
        match self {
            ClusterSource::Folder(folder) => folder.errors().iter().map(folder_error).collect(),
            ClusterSource::Kubernetes(k) => k.errors(),
        }
    }

    /// Resolves when the source's watch reports a change (the agent then acts at once).
    async fn changed(&self) {
        match self {
            ClusterSource::Folder(folder) => folder.changed().await,
            ClusterSource::Kubernetes(k) => k.changed().await,
        }
    }

    /// Where this source's pods' network namespaces are found.
    fn netns_lookup(&self) -> NetnsLookup {
        let proc_root = PathBuf::from("/proc");
        match self {
            ClusterSource::Folder(_) => NetnsLookup::AnnotationThenUid { proc_root },
            ClusterSource::Kubernetes(_) => NetnsLookup::UidOnly { proc_root },
        }
    }

    fn objects(&self) -> ClusterObjects {
        match self {
            ClusterSource::Folder(folder) => folder.objects(),
            ClusterSource::Kubernetes(k) => k.objects(),
        }
    }
}

/// A manifest file's failure as the agent reports it.
fn folder_error(e: &crate::manifests::ManifestError) -> String {
    format!("{e}; ignored, its last good objects stay")
}

/// Where the agent stands in the mesh.
#[derive(Clone, Debug)]
pub struct AgentScope {
    /// This node's name (the pods' `spec.nodeName`).
    pub node: String,
    /// Policies of this namespace apply to the whole mesh.
    pub root_namespace: String,
}

/// Follows the cluster until `stop` resolves.
pub async fn run_agent(
    mut source: ClusterSource,
    scope: &AgentScope,
    mut output: TunnelOutput,
    poll: Duration,
    mut capture: Option<CaptureReconciler>,
    status: std::sync::Arc<std::sync::Mutex<AgentStatus>>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut last_state: Option<StateSpec> = None;
    let mut last_written: Option<StateSpec> = None;
    let mut last_problems: Vec<String> = Vec::new();
    let mut last_policy_counts = (0, 0);
    // Refused policy objects and tightened rules: reported once each, kept in readiness, not
    // retried (only a change to an object can fix it, and a change brings a pass).
    let mut last_policy_lines: Vec<String> = Vec::new();
    let mut link_failure = LastFailure::default();
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        let mut tunnel_came = false;
        let connection = async {
            match &mut output {
                TunnelOutput::Socket(link) => link.next_connection().await,
                TunnelOutput::StateFile(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = source.changed() => {}
            _ = ticker.tick() => {}
            Some(stream) = connection => {
                if let TunnelOutput::Socket(link) = &mut output {
                    link.adopt(stream);
                    tunnel_came = true;
                }
            }
            _ = &mut stop => return,
        }
        let pass = std::time::Instant::now();
        if !source.ready() {
            if let Ok(mut s) = status.lock() {
                s.source_errors = source.errors();
            }
            continue;
        }
        let (changed, errors) = source.refresh();
        for e in errors {
            warn!("{e}");
        }
        if let Ok(mut s) = status.lock() {
            s.source_errors = source.errors();
        }
        if !changed && last_state.is_some() && last_problems.is_empty() && !tunnel_came {
            continue;
        }
        let objects = source.objects();
        let read = pass.elapsed();
        let mut state = tunnel_state(&objects);
        let node = scope.node.as_str();
        let (wanted, mut problems) = local_enrolled(&objects, node, &source.netns_lookup());
        let policies = check_policies(&objects);
        attach_policies(&mut state, &policies, &objects, node, &scope.root_namespace);
        let counts = (policies.policies.len(), policies.authentications.len());
        if counts != last_policy_counts {
            last_policy_counts = counts;
            info!(
                mesh_policies = counts.0,
                mesh_authentications = counts.1,
                in_force_here = state.policies.len(),
                "policy objects followed"
            );
        }
        let policy_lines: Vec<String> = policies
            .refused
            .iter()
            .cloned()
            .chain(tightened(&state).iter().map(ToString::to_string))
            .collect();
        for line in policy_lines
            .iter()
            .filter(|line| !last_policy_lines.contains(line))
        {
            warn!("{line}");
        }
        last_policy_lines = policy_lines;
        // Capture lets go of pods first, the tunnel is told next, and capture takes new pods
        // last, once the tunnel serves them: no connection meets a capture without a tunnel.
        if let Some(capture) = capture.as_mut() {
            problems.extend(capture.release_unwanted(&wanted));
        }
        let released = pass.elapsed();
        match &mut output {
            TunnelOutput::StateFile(path) => {
                let state = with_local_netns(&state, &wanted);
                if last_written.as_ref() != Some(&state) {
                    match write_state(path, &state) {
                        Ok(()) => {
                            info!(
                                workloads = state.workloads.len(),
                                services = state.services.len(),
                                "tunnel state written"
                            );
                            last_written = Some(state);
                        }
                        // A problem: logged below and tried again next pass.
                        Err(e) => problems.push(e.to_string()),
                    }
                }
            }
            TunnelOutput::Socket(link) => {
                let pods = wanted
                    .iter()
                    .map(|(key, pod)| (key.clone(), pod.netns.clone()))
                    .collect();
                match link.sync(&pods, &state).await {
                    // The listeners of pods the tunnel started go into capture before those
                    // pods are enrolled below, so their inbound connections find them.
                    Ok(offers) => {
                        link_failure.clear();
                        if let Some(capture) = capture.as_mut() {
                            // Not retried: the tunnel offers each listener once per connection.
                            for refused in capture.register_inbound(offers, &wanted, &state) {
                                warn!("{refused}");
                            }
                        }
                    }
                    // Once while it repeats: a tunnel that refuses this agent (another socket
                    // mark, say) retries every second.
                    Err(e) => {
                        let text = format!("{e}; waiting for the tunnel to reconnect");
                        if link_failure.is_new(&text) {
                            warn!("{text}");
                        }
                    }
                }
            }
        }
        let told = pass.elapsed();
        if let Some(capture) = capture.as_mut() {
            problems.extend(capture.reconcile(&wanted));
        }
        tracing::debug!(
            read_ms = read.as_secs_f64() * 1e3,
            release_ms = (released - read).as_secs_f64() * 1e3,
            tunnel_ms = (told - released).as_secs_f64() * 1e3,
            capture_ms = (pass.elapsed() - told).as_secs_f64() * 1e3,
            enrolled = wanted.len(),
            "pass applied"
        );
        for p in problems.iter().filter(|p| !last_problems.contains(p)) {
            warn!("{p}; retrying");
        }
        if let Ok(mut s) = status.lock() {
            s.synced = true;
            s.problems = problems.clone();
            s.policies = last_policy_lines.clone();
        }
        last_problems = problems;
        last_state = Some(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse_documents;

    /// A labelled namespace and a pod whose author annotated the host's network namespace.
    const HOSTILE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {weft.dev/mesh: enabled}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: evil, namespace: apps, uid: 0c0c0c0c-0000-4000-8000-00000000000c, annotations: {weft.dev/netns: /proc/1/ns/net}}\nspec: {nodeName: node1, containers: []}\nstatus: {podIP: 10.1.1.9}\n";

    fn objects() -> ClusterObjects {
        let mut objects = ClusterObjects::default();
        for object in parse_documents(Path::new("t.yaml"), HOSTILE).unwrap() {
            objects.insert(object);
        }
        objects
    }

    #[test]
    fn on_kubernetes_a_pod_annotation_never_names_the_namespace() {
        let empty_proc = tempfile::tempdir().unwrap();
        let lookup = NetnsLookup::UidOnly {
            proc_root: empty_proc.path().to_owned(),
        };
        let (wanted, problems) = local_enrolled(&objects(), "node1", &lookup);
        assert!(wanted.is_empty(), "{wanted:?}");
        assert_eq!(
            problems,
            ["pod apps/evil: its network namespace is unknown (no running process of its UID)"]
        );
        // Its process appears in its pod cgroup: that namespace, not the annotated one.
        let pid = empty_proc.path().join("4242");
        std::fs::create_dir(&pid).unwrap();
        std::fs::write(
            pid.join("cgroup"),
            "0::/kubepods/besteffort/pod0c0c0c0c-0000-4000-8000-00000000000c/abc\n",
        )
        .unwrap();
        let (wanted, problems) = local_enrolled(&objects(), "node1", &lookup);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(wanted["apps/evil"].netns, pid.join("ns/net"));
    }

    #[test]
    fn the_local_folder_names_namespaces_and_a_state_file_gets_only_this_nodes_paths() {
        let lookup = NetnsLookup::AnnotationThenUid {
            proc_root: PathBuf::from("/nonexistent"),
        };
        let objects = objects();
        let (wanted, problems) = local_enrolled(&objects, "node1", &lookup);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(wanted["apps/evil"].netns, Path::new("/proc/1/ns/net"));
        let state = crate::tunnel_state::tunnel_state(&objects);
        assert_eq!(state.workloads[0].netns, None);
        let written = with_local_netns(&state, &wanted);
        assert_eq!(
            written.workloads[0].netns.as_deref(),
            Some(Path::new("/proc/1/ns/net"))
        );
        let other_node = with_local_netns(&state, &BTreeMap::new());
        assert_eq!(other_node.workloads[0].netns, None);
    }
}
