//! A simulated cluster from Kubernetes manifests (`examples/`): a pod namespace for each Pod
//! on the node its `nodeName` names, the `weft-testapp` containers started, and a live copy of
//! the manifests with what a kubelet would add (addresses, phase, and the local source's
//! `weft.dev/netns` annotation) for the `mesh-node` agents to follow.

use std::path::Path;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{PodIP, PodStatus};
use mesh_node::cluster::ClusterObjects;
use mesh_node::enrollment::NETNS_ANNOTATION;
use mesh_node::manifests::parse_documents;

use crate::cluster::{Cluster, ClusterSpec, PodSpec};

/// Every object of the `.yaml` files of `dir`.
pub fn read_examples(dir: &Path) -> Result<ClusterObjects> {
    let mut objects = ClusterObjects::default();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for object in parse_documents(&file, &text)? {
            objects.insert(object);
        }
    }
    Ok(objects)
}

/// The cluster the objects describe: nodes `node1..nodeN` as the pods name them.
pub fn spec_for(objects: &ClusterObjects) -> Result<ClusterSpec> {
    let mut pods = Vec::new();
    for ((namespace, name), pod) in &objects.pods {
        let spec = pod.spec.as_ref();
        let node = spec
            .and_then(|s| s.node_name.as_deref())
            .and_then(|n| n.strip_prefix("node"))
            .and_then(|n| n.parse::<usize>().ok())
            .with_context(|| format!("pod {namespace}/{name}: nodeName must be node<N>"))?;
        pods.push(PodSpec {
            name: name.clone(),
            namespace: namespace.clone(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            node,
            mesh: true,
        });
    }
    let nodes = pods.iter().map(|p| p.node).max().unwrap_or(1);
    if pods
        .iter()
        .map(|p| &p.name)
        .collect::<std::collections::HashSet<_>>()
        .len()
        != pods.len()
    {
        bail!("pod names must be unique across namespaces in the simulated cluster");
    }
    Ok(ClusterSpec {
        agents: true,
        ..ClusterSpec::new(nodes, pods)
    })
}

impl Cluster {
    /// The demo's cluster from `examples/`: built, its apps, agents and tunnels running.
    pub fn from_examples() -> Result<Cluster> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let objects = read_examples(&dir)?;
        let mut cluster = Cluster::build(spec_for(&objects)?)?;
        cluster.start_example_apps(&objects)?;
        cluster.write_live_manifests(&objects)?;
        cluster.start_agents()?;
        cluster.start_tunnels()?;
        Ok(cluster)
    }

    /// Starts each pod's `weft-testapp` containers (their `args`, waiting for their first
    /// declared port).
    pub fn start_example_apps(&mut self, objects: &ClusterObjects) -> Result<()> {
        for ((_, name), pod) in &objects.pods {
            for container in pod.spec.iter().flat_map(|s| &s.containers) {
                let (Some("weft-testapp"), Some(args)) =
                    (container.image.as_deref(), &container.args)
                else {
                    continue;
                };
                let port = container
                    .ports
                    .iter()
                    .flatten()
                    .next()
                    .map(|p| p.container_port as u16)
                    .with_context(|| {
                        format!("pod {name}: a weft-testapp container needs a port")
                    })?;
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                self.start_app(name, &args, port)?;
            }
        }
        Ok(())
    }

    /// Writes the objects to [`Cluster::manifest_dir`] with each pod's addresses, phase and
    /// namespace annotation filled in.
    pub fn write_live_manifests(&self, objects: &ClusterObjects) -> Result<()> {
        let mut out = String::new();
        for ns in objects.namespaces.values() {
            push_yaml(&mut out, &**ns)?;
        }
        for ((_, name), pod) in &objects.pods {
            let live = self.pod(name);
            let mut pod = (**pod).clone();
            pod.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(
                    NETNS_ANNOTATION.into(),
                    live.netns.path().display().to_string(),
                );
            pod.status = Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(live.ip.to_string()),
                pod_ips: Some(vec![
                    PodIP {
                        ip: live.ip.to_string(),
                    },
                    PodIP {
                        ip: live.ip6.to_string(),
                    },
                ]),
                ..PodStatus::default()
            });
            push_yaml(&mut out, &pod)?;
        }
        for svc in objects.services.values() {
            push_yaml(&mut out, &**svc)?;
        }
        for slice in objects.endpoint_slices.values() {
            push_yaml(&mut out, &**slice)?;
        }
        for policy in objects.mesh_policies.values() {
            push_yaml(&mut out, &**policy)?;
        }
        for authentication in objects.mesh_authentications.values() {
            push_yaml(&mut out, &**authentication)?;
        }
        self.replace_manifests(&out)
    }
}

/// Appends one YAML document.
fn push_yaml<T: serde::Serialize>(out: &mut String, object: &T) -> Result<()> {
    out.push_str(&serde_saphyr::to_string(object)?);
    out.push_str("---\n");
    Ok(())
}
