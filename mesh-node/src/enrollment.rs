//! Which pods are in the mesh, and what capture needs to know about them: a pod is enrolled
//! when its namespace has `weft.dev/mesh=enabled` and the pod itself does not say
//! `weft.dev/mesh=disabled`; host-network pods never are.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use redirect_ebpf::Exclusions;

/// The label on namespaces (`enabled`) and pods (`disabled`) that decides enrollment.
pub const MESH_LABEL: &str = "weft.dev/mesh";
/// Local manifest folder only: where the pod's network namespace is (`/run/netns/<name>`).
/// Never read from the Kubernetes API, where a pod's author writes the annotations.
pub const NETNS_ANNOTATION: &str = "weft.dev/netns";
/// Destination ports the pod's connections keep out of capture: `5432,6379`.
pub const EXCLUDE_PORTS_ANNOTATION: &str = "weft.dev/exclude-outbound-ports";
/// Destination ranges the pod's connections keep out of capture: `10.0.0.0/8,fd00::/8`.
pub const EXCLUDE_CIDRS_ANNOTATION: &str = "weft.dev/exclude-outbound-cidrs";

fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

/// Whether `pod` is enrolled, given the cluster's namespaces.
pub fn is_enrolled(pod: &Pod, namespaces: &BTreeMap<String, Arc<Namespace>>) -> bool {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let namespace_on = namespaces
        .get(namespace)
        .is_some_and(|ns| label(&ns.metadata.labels, MESH_LABEL) == Some("enabled"));
    let pod_off = label(&pod.metadata.labels, MESH_LABEL) == Some("disabled");
    namespace_on && !pod_off && !is_host_network(pod)
}

pub fn is_host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

/// The node the pod is scheduled on.
pub fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

/// The pod's IPs from its status (`podIPs`, else `podIP`), skipping any that do not parse.
pub fn ips_of(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<&str> = match &status.pod_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(|ip| ip.ip.as_str()).collect(),
        _ => status.pod_ip.as_deref().into_iter().collect(),
    };
    listed.iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// The pod's network namespace as its `weft.dev/netns` annotation names it (to be trusted
/// only when the node's admin wrote the pod: the local manifest folder).
pub fn netns_annotation(pod: &Pod) -> Option<PathBuf> {
    label(&pod.metadata.annotations, NETNS_ANNOTATION).map(PathBuf::from)
}

/// The pod's capture exclusions from its annotations, or what is wrong with them.
pub fn exclusions_of(pod: &Pod) -> Result<Exclusions, String> {
    let annotations = &pod.metadata.annotations;
    let mut exclusions = Exclusions::default();
    if let Some(ports) = label(annotations, EXCLUDE_PORTS_ANNOTATION) {
        for port in ports.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let port = port
                .parse()
                .map_err(|_| format!("{EXCLUDE_PORTS_ANNOTATION}: {port:?} is not a port"))?;
            exclusions.ports.push(port);
        }
    }
    if let Some(cidrs) = label(annotations, EXCLUDE_CIDRS_ANNOTATION) {
        for cidr in cidrs.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let bad = || format!("{EXCLUDE_CIDRS_ANNOTATION}: {cidr:?} is not address/prefix");
            let (addr, len) = cidr.split_once('/').ok_or_else(bad)?;
            let addr: IpAddr = addr.parse().map_err(|_| bad())?;
            let len: u8 = len.parse().map_err(|_| bad())?;
            exclusions.cidrs.push((addr, len));
        }
    }
    Ok(exclusions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn namespaces(labelled: bool) -> BTreeMap<String, Arc<Namespace>> {
        let label = if labelled {
            "{weft.dev/mesh: enabled}"
        } else {
            "{}"
        };
        let ns: Namespace = serde_saphyr::from_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: apps, labels: {label}}}\n"
        ))
        .unwrap();
        BTreeMap::from([("apps".to_owned(), Arc::new(ns))])
    }

    #[test]
    fn the_namespace_label_enrolls_and_the_pod_label_or_host_network_opts_out() {
        let plain = pod("apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: apps}\n");
        assert!(is_enrolled(&plain, &namespaces(true)));
        assert!(!is_enrolled(&plain, &namespaces(false)));
        let opted_out = pod(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: apps, labels: {weft.dev/mesh: disabled}}\n",
        );
        assert!(!is_enrolled(&opted_out, &namespaces(true)));
        let host = pod(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: apps}\nspec: {hostNetwork: true, containers: []}\n",
        );
        assert!(!is_enrolled(&host, &namespaces(true)));
        let elsewhere = pod("apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: other}\n");
        assert!(!is_enrolled(&elsewhere, &namespaces(true)));
    }

    #[test]
    fn reads_ips_netns_and_exclusions() {
        let p = pod(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  annotations:\n    weft.dev/netns: /run/netns/a\n    weft.dev/exclude-outbound-ports: \"5432, 6379\"\n    weft.dev/exclude-outbound-cidrs: 10.96.0.0/12,fd00::/8\nstatus:\n  podIPs: [{ip: 10.1.0.5}, {ip: 'fd00::5'}]\n",
        );
        assert_eq!(
            ips_of(&p),
            vec![
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(netns_annotation(&p), Some(PathBuf::from("/run/netns/a")));
        let e = exclusions_of(&p).unwrap();
        assert_eq!(e.ports, vec![5432, 6379]);
        assert_eq!(e.cidrs.len(), 2);
        let bad = pod(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, annotations: {weft.dev/exclude-outbound-ports: 'http'}}\n",
        );
        assert!(
            exclusions_of(&bad)
                .unwrap_err()
                .contains("\"http\" is not a port")
        );
    }
}
