//! Weft's Kubernetes install is the kustomize tree around this crate (`kubectl apply -k
//! install/`). This crate renders it with `kubectl kustomize` and parses every object into
//! its `k8s-openapi` type, refusing keys the type does not know (a misspelt `hostPid` would
//! otherwise be dropped by the API server without a word), so that tests can hold the
//! manifests to the code: RBAC to what the code asks of the API, arguments to the binaries'
//! parsers, and the node pod itself rehearsed under podman (`conformance`).

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot run `kubectl kustomize {dir}` (kubectl 1.14 or later is needed): {source}")]
    Kubectl {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("`kubectl kustomize {dir}` failed: {stderr}")]
    Render { dir: PathBuf, stderr: String },
    #[error("the rendered YAML of {dir} does not parse: {message}")]
    Yaml { dir: PathBuf, message: String },
    #[error("{object}: no Kubernetes type for {api_version} {kind} here")]
    UnknownKind {
        object: String,
        api_version: String,
        kind: String,
    },
    #[error("{object}: not a valid {kind}: {message}")]
    Invalid {
        object: String,
        kind: String,
        message: String,
    },
    #[error("{object}: keys its type does not know (the API server would drop them): {keys:?}")]
    UnknownKeys { object: String, keys: Vec<String> },
}

/// The install's root folder (`kubectl apply -k` this).
pub fn install_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Renders the kustomization in `dir` with `kubectl kustomize`: one JSON value per object.
pub fn render(dir: &Path) -> Result<Vec<Value>, InstallError> {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .map_err(|source| InstallError::Kubectl {
            dir: dir.to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(InstallError::Render {
            dir: dir.to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    let text = String::from_utf8_lossy(&output.stdout);
    serde_saphyr::from_multiple::<Value>(&text).map_err(|e| InstallError::Yaml {
        dir: dir.to_owned(),
        message: e.to_string(),
    })
}

/// The Prometheus Operator's PodMonitor, as far as the install uses it (no Kubernetes crate
/// has its type).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMonitor {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: PodMonitorSpec,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMonitorSpec {
    pub selector: LabelSelector,
    pub pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMetricsEndpoint {
    pub port: String,
    pub path: Option<String>,
    pub interval: Option<String>,
}

/// One rendered object, typed.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Box<Namespace>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    DaemonSet(Box<DaemonSet>),
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    ConfigMap(Box<ConfigMap>),
    CustomResourceDefinition(Box<CustomResourceDefinition>),
    PodMonitor(Box<PodMonitor>),
}

/// `kind namespace/name` of a rendered object, for messages.
pub fn describe(value: &Value) -> String {
    let kind = value["kind"].as_str().unwrap_or("?");
    let name = value["metadata"]["name"].as_str().unwrap_or("?");
    match value["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Parses `value` into its type, refusing any key the type does not know.
pub fn parse(value: &Value) -> Result<Object, InstallError> {
    let api_version = value["apiVersion"].as_str().unwrap_or_default();
    let kind = value["kind"].as_str().unwrap_or_default();
    let object = match (api_version, kind) {
        ("v1", "Namespace") => Object::Namespace(strict(value)?),
        ("v1", "ServiceAccount") => Object::ServiceAccount(strict(value)?),
        ("v1", "Service") => Object::Service(strict(value)?),
        ("v1", "ConfigMap") => Object::ConfigMap(strict(value)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(strict(value)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(strict(value)?)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => Object::Role(strict(value)?),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => Object::RoleBinding(strict(value)?),
        ("apps/v1", "DaemonSet") => Object::DaemonSet(strict(value)?),
        ("apps/v1", "Deployment") => Object::Deployment(strict(value)?),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            Object::CustomResourceDefinition(strict(value)?)
        }
        ("monitoring.coreos.com/v1", "PodMonitor") => Object::PodMonitor(strict(value)?),
        _ => {
            return Err(InstallError::UnknownKind {
                object: describe(value),
                api_version: api_version.to_owned(),
                kind: kind.to_owned(),
            });
        }
    };
    Ok(object)
}

/// Deserializes `value` as `T`, collecting the path of every key `T` ignored.
fn strict<T: DeserializeOwned>(value: &Value) -> Result<Box<T>, InstallError> {
    let mut unknown = Vec::new();
    let typed: T = serde_ignored::deserialize(value.clone(), |path| {
        // Options show as `?` segments: not part of the key's path in the YAML.
        unknown.push(path.to_string().replace(".?", ""));
    })
    .map_err(|e| InstallError::Invalid {
        object: describe(value),
        kind: value["kind"].as_str().unwrap_or("?").to_owned(),
        message: e.to_string(),
    })?;
    // apiVersion and kind are read by the type's own deserializer only to check them in
    // k8s-openapi, which reports them as ignored on some types: they were checked above.
    unknown.retain(|path| path != "apiVersion" && path != "kind");
    unknown.sort();
    if unknown.is_empty() {
        Ok(Box::new(typed))
    } else {
        Err(InstallError::UnknownKeys {
            object: describe(value),
            keys: unknown,
        })
    }
}

/// The HTTP readiness probe of `container` as the kubelet would run it: (port, path), a named
/// port resolved to the container's port of that name. `None` without an HTTP probe, or when
/// the name is no port of the container.
pub fn readiness_probe(container: &Container) -> Option<(u16, String)> {
    let get = container.readiness_probe.as_ref()?.http_get.as_ref()?;
    let port = match &get.port {
        IntOrString::Int(port) => *port,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))?
                .container_port
        }
    };
    Some((
        u16::try_from(port).ok()?,
        get.path.clone().unwrap_or_default(),
    ))
}

/// Renders `dir` and parses every object: the first problem, or all objects.
pub fn load(dir: &Path) -> Result<Vec<Object>, InstallError> {
    render(dir)?.iter().map(parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_misspelt_key_is_named_with_its_path() {
        let pod_set = json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "x", "namespace": "weft-system"},
            "spec": {"selector": {"matchLabels": {"a": "b"}},
                     "template": {"spec": {"hostPid": true, "containers": [{"name": "c", "imagePullPolicy": "Never", "securityContext": {"capabilities": {"add": ["BPF"], "drop": ["ALL"], "keep": ["X"]}}}]}}}
        });
        match parse(&pod_set) {
            Err(InstallError::UnknownKeys { object, keys }) => {
                assert_eq!(object, "DaemonSet weft-system/x");
                assert_eq!(
                    keys,
                    [
                        "spec.template.spec.containers.0.securityContext.capabilities.keep",
                        "spec.template.spec.hostPid",
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_well_formed_object_parses_and_an_unknown_kind_is_refused() {
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a", "labels": {"x": "y"}}});
        assert!(matches!(parse(&ns), Ok(Object::Namespace(_))));
        let odd = json!({"apiVersion": "v1", "kind": "Pdo", "metadata": {"name": "a"}});
        assert!(matches!(parse(&odd), Err(InstallError::UnknownKind { .. })));
    }
}
