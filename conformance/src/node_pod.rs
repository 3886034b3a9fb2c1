//! A pod of the install's rendered manifests run under podman the way a kubelet would run
//! it on one simulated node: its image, commands, arguments, environment (field references
//! resolved), volumes (host paths mapped to the simulated node's, emptyDirs, ConfigMaps,
//! Secrets, projected service account tokens, the automounted API credentials), security context
//! (capabilities dropped and added one by one, read-only root, no privilege escalation,
//! seccomp) and PID namespace as written, in its own pod network namespace. Anything in the
//! pod that this translation does not know is refused, so the rehearsal can never pass by
//! ignoring part of the manifest.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Container, PodSpec, Volume};

/// What the simulated node's kubelet provides to the pod.
#[derive(Clone, Debug)]
pub struct Kubelet {
    pub node_name: String,
    /// The pod's name and namespace (downward API).
    pub pod_name: String,
    pub pod_namespace: String,
    /// The pod's own network namespace (`/run/netns/<name>`).
    pub pod_netns: PathBuf,
    /// A host path as the manifest names it -> where that is for this simulated node.
    pub host_paths: BTreeMap<String, PathBuf>,
    /// A ConfigMap's name -> a folder holding its keys as files.
    pub config_maps: BTreeMap<String, PathBuf>,
    /// A Secret's name -> a folder holding its keys as files (copied with the volume's mode,
    /// as the kubelet writes them).
    pub secrets: BTreeMap<String, PathBuf>,
    /// What a projected service account token volume holds (any audience): the token's text.
    pub projected_token: String,
    /// The API server the pod's in-cluster configuration points at.
    pub api_server: SocketAddr,
    /// The CA that signed the API server's certificate (PEM), and the pod's own token.
    pub api_ca_pem: String,
    pub api_token: String,
    /// Names the cluster's DNS would answer for the pod.
    pub hosts: Vec<(String, IpAddr)>,
    /// Where emptyDirs, the automounted credentials and termination logs are kept.
    pub state_dir: PathBuf,
}

/// A change to the pod as written, for the tests that show each part is needed.
#[derive(Clone, Debug, Default)]
pub struct Edit {
    /// (container, capability): that capability is not added.
    pub without_capability: Option<(String, String)>,
}

/// The running containers of one pod.
pub struct NodePod {
    prefix: String,
    names: Vec<(String, String)>,
    grace: Duration,
}

const POD_KEYS: &[&str] = &[
    "serviceAccountName",
    // Scheduling only: every simulated node takes the pod.
    "priorityClassName",
    "tolerations",
    "hostPID",
    "terminationGracePeriodSeconds",
    "initContainers",
    "containers",
    "volumes",
    "securityContext",
];
const POD_SECURITY_KEYS: &[&str] = &["seccompProfile", "runAsUser"];
const CONTAINER_KEYS: &[&str] = &[
    "name",
    "image",
    "command",
    "args",
    "env",
    // Declarations: the tests check them against what the binaries serve.
    "ports",
    "readinessProbe",
    "resources",
    "securityContext",
    "volumeMounts",
    "terminationMessagePolicy",
    "terminationMessagePath",
];
const CONTAINER_SECURITY_KEYS: &[&str] = &[
    "readOnlyRootFilesystem",
    "allowPrivilegeEscalation",
    "capabilities",
    "seccompProfile",
    "runAsUser",
];

fn only_known(value: &serde_json::Value, known: &[&str], what: &str) -> Result<()> {
    if let Some(map) = value.as_object() {
        for key in map.keys() {
            ensure!(
                known.contains(&key.as_str()),
                "{what}: the rehearsal does not know how a kubelet would apply {key:?}; teach conformance/src/node_pod.rs"
            );
        }
    }
    Ok(())
}

impl NodePod {
    /// Runs the init containers to completion (an error carries a failed one's termination
    /// message and log), then starts the containers.
    pub fn start(pod: &PodSpec, kubelet: &Kubelet, edit: &Edit) -> Result<NodePod> {
        let value = serde_json::to_value(pod)?;
        only_known(&value, POD_KEYS, "pod")?;
        only_known(
            &value["securityContext"],
            POD_SECURITY_KEYS,
            "pod securityContext",
        )?;
        std::fs::create_dir_all(&kubelet.state_dir)?;
        let prefix = format!("weft-rehearsal-{}-{}", std::process::id(), kubelet.pod_name);
        let volumes = prepare_volumes(pod.volumes.as_deref().unwrap_or_default(), kubelet)?;
        let service_account = write_service_account(kubelet)?;
        let mut names = Vec::new();
        let grace = Duration::from_secs(pod.termination_grace_period_seconds.unwrap_or(30) as u64);
        let mut started = NodePod {
            prefix: prefix.clone(),
            names: Vec::new(),
            grace,
        };
        for init in pod.init_containers.iter().flatten() {
            let name = format!("{prefix}-{}", init.name);
            let args = podman_run(pod, init, kubelet, &volumes, &service_account, edit, &name)?;
            let out = Command::new("podman").arg("run").args(&args).output()?;
            let log = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            let _ = Command::new("podman").args(["rm", "-f", &name]).output();
            if !out.status.success() {
                let message = std::fs::read_to_string(termination_log(kubelet, &init.name))
                    .unwrap_or_default();
                bail!(
                    "init container {} failed ({}): termination message {message:?}; log:\n{log}",
                    init.name,
                    out.status
                );
            }
        }
        for container in &pod.containers {
            let name = format!("{prefix}-{}", container.name);
            let args = podman_run(
                pod,
                container,
                kubelet,
                &volumes,
                &service_account,
                edit,
                &name,
            )?;
            let out = Command::new("podman")
                .args(["run", "--detach"])
                .args(&args)
                .output()?;
            ensure!(
                out.status.success(),
                "podman run {}: {}",
                container.name,
                String::from_utf8_lossy(&out.stderr)
            );
            names.push((container.name.clone(), name));
            started.names = names.clone();
        }
        Ok(started)
    }

    /// Everything container `container` printed.
    pub fn logs(&self, container: &str) -> String {
        let Some((_, name)) = self.names.iter().find(|(c, _)| c == container) else {
            return format!("no container {container}");
        };
        Command::new("podman")
            .args(["logs", name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_default()
    }

    /// Whether container `container` is still running.
    pub fn running(&self, container: &str) -> bool {
        let Some((_, name)) = self.names.iter().find(|(c, _)| c == container) else {
            return false;
        };
        Command::new("podman")
            .args(["inspect", "--format", "{{.State.Running}}", name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
            .unwrap_or(false)
    }

    /// Stops the pod as the kubelet does when it is deleted: SIGTERM to every container, then
    /// SIGKILL after the grace period.
    pub fn stop(&mut self) {
        let names: Vec<&str> = self.names.iter().map(|(_, n)| n.as_str()).collect();
        if names.is_empty() {
            return;
        }
        let _ = Command::new("podman")
            .args(["stop", "--time", &self.grace.as_secs().to_string()])
            .args(&names)
            .output();
        let _ = Command::new("podman")
            .args(["rm", "-f"])
            .args(&names)
            .output();
        self.names.clear();
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Drop for NodePod {
    fn drop(&mut self) {
        let names: Vec<&str> = self.names.iter().map(|(_, n)| n.as_str()).collect();
        if !names.is_empty() {
            let _ = Command::new("podman")
                .args(["rm", "-f", "--time", "0"])
                .args(&names)
                .output();
        }
    }
}

/// Where a container's termination message goes.
fn termination_log(kubelet: &Kubelet, container: &str) -> PathBuf {
    kubelet
        .state_dir
        .join(format!("termination-log-{container}"))
}

/// Each volume's source on this machine, by volume name.
fn prepare_volumes(volumes: &[Volume], kubelet: &Kubelet) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for volume in volumes {
        let source = if volume.empty_dir.is_some() {
            let dir = kubelet.state_dir.join(format!("empty-{}", volume.name));
            std::fs::create_dir_all(&dir)?;
            dir
        } else if let Some(host) = &volume.host_path {
            kubelet
                .host_paths
                .get(&host.path)
                .cloned()
                .with_context(|| {
                    format!(
                        "volume {}: host path {} is not mapped for the simulated node",
                        volume.name, host.path
                    )
                })?
        } else if let Some(map) = &volume.config_map {
            kubelet
                .config_maps
                .get(&map.name)
                .cloned()
                .with_context(|| format!("volume {}: no ConfigMap {}", volume.name, map.name))?
        } else if let Some(secret) = &volume.secret {
            let name = secret.secret_name.as_deref().unwrap_or_default();
            let from = kubelet
                .secrets
                .get(name)
                .with_context(|| format!("volume {}: no Secret {name}", volume.name))?;
            let dir = kubelet.state_dir.join(format!("secret-{}", volume.name));
            std::fs::create_dir_all(&dir)?;
            let mode = secret.default_mode.unwrap_or(0o644) as u32;
            for entry in std::fs::read_dir(from)? {
                let entry = entry?;
                let to = dir.join(entry.file_name());
                std::fs::copy(entry.path(), &to)?;
                std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
            }
            dir
        } else if let Some(projected) = &volume.projected {
            let dir = kubelet.state_dir.join(format!("projected-{}", volume.name));
            std::fs::create_dir_all(&dir)?;
            for source in projected.sources.iter().flatten() {
                let token = source.service_account_token.as_ref().with_context(|| {
                    format!(
                        "volume {}: only service account tokens are projected here",
                        volume.name
                    )
                })?;
                std::fs::write(dir.join(&token.path), &kubelet.projected_token)?;
            }
            dir
        } else {
            bail!(
                "volume {}: a kind of volume the rehearsal does not provide",
                volume.name
            );
        };
        out.insert(volume.name.clone(), source);
    }
    Ok(out)
}

/// The automounted API credentials (`/var/run/secrets/kubernetes.io/serviceaccount`).
fn write_service_account(kubelet: &Kubelet) -> Result<PathBuf> {
    let dir = kubelet.state_dir.join("serviceaccount");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("token"), &kubelet.api_token)?;
    std::fs::write(dir.join("ca.crt"), &kubelet.api_ca_pem)?;
    std::fs::write(dir.join("namespace"), &kubelet.pod_namespace)?;
    Ok(dir)
}

/// `podman run` arguments (after `run`) for `container`, named `name`.
fn podman_run(
    pod: &PodSpec,
    container: &Container,
    kubelet: &Kubelet,
    volumes: &BTreeMap<String, PathBuf>,
    service_account: &Path,
    edit: &Edit,
    name: &str,
) -> Result<Vec<String>> {
    let value = serde_json::to_value(container)?;
    let what = format!("container {}", container.name);
    only_known(&value, CONTAINER_KEYS, &what)?;
    only_known(&value["securityContext"], CONTAINER_SECURITY_KEYS, &what)?;
    let mut args: Vec<String> = vec![
        "--name".into(),
        name.into(),
        "--network".into(),
        format!("ns:{}", kubelet.pod_netns.display()),
        "--hostname".into(),
        kubelet.pod_name.clone(),
    ];
    if pod.host_pid == Some(true) {
        args.extend(["--pid".into(), "host".into()]);
    }
    for (host, ip) in &kubelet.hosts {
        args.extend(["--add-host".into(), format!("{host}:{ip}")]);
    }
    // Security: the container's settings over the pod's.
    let pod_security = pod.security_context.as_ref();
    let security = container.security_context.as_ref();
    let seccomp = security
        .and_then(|s| s.seccomp_profile.as_ref())
        .or(pod_security.and_then(|s| s.seccomp_profile.as_ref()))
        .map(|p| p.type_.as_str());
    match seccomp {
        // podman's default profile, as containerd's and CRI-O's RuntimeDefault.
        Some("RuntimeDefault") => {}
        // The kubelet's default without --seccomp-default.
        None | Some("Unconfined") => {
            args.extend(["--security-opt".into(), "seccomp=unconfined".into()])
        }
        Some(other) => bail!("{what}: seccomp profile {other} is not rehearsed"),
    }
    if let Some(user) = security
        .and_then(|s| s.run_as_user)
        .or(pod_security.and_then(|s| s.run_as_user))
    {
        args.extend(["--user".into(), user.to_string()]);
    }
    if let Some(security) = security {
        if security.read_only_root_filesystem == Some(true) {
            args.push("--read-only".into());
        }
        if security.allow_privilege_escalation == Some(false) {
            args.extend(["--security-opt".into(), "no-new-privileges".into()]);
        }
        if let Some(caps) = &security.capabilities {
            for cap in caps.drop.iter().flatten() {
                args.extend(["--cap-drop".into(), cap.clone()]);
            }
            for cap in caps.add.iter().flatten() {
                let removed = edit
                    .without_capability
                    .as_ref()
                    .is_some_and(|(c, dropped)| *c == container.name && dropped == cap);
                if !removed {
                    args.extend(["--cap-add".into(), format!("CAP_{cap}")]);
                }
            }
        }
    }
    if let Some(memory) = container
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
    {
        args.extend(["--memory".into(), podman_size(&memory.0)?]);
    }
    // The environment: what the kubelet injects, then the container's own.
    args.extend([
        "--env".into(),
        format!("KUBERNETES_SERVICE_HOST={}", kubelet.api_server.ip()),
        "--env".into(),
        format!("KUBERNETES_SERVICE_PORT={}", kubelet.api_server.port()),
    ]);
    for env in container.env.iter().flatten() {
        let value = match (&env.value, &env.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                let field = from.field_ref.as_ref().with_context(|| {
                    format!("{what}: env {} is not a field reference", env.name)
                })?;
                match field.field_path.as_str() {
                    "spec.nodeName" => kubelet.node_name.clone(),
                    "metadata.name" => kubelet.pod_name.clone(),
                    "metadata.namespace" => kubelet.pod_namespace.clone(),
                    other => bail!(
                        "{what}: env {} from field {other} is not rehearsed",
                        env.name
                    ),
                }
            }
            (None, None) => String::new(),
        };
        args.extend(["--env".into(), format!("{}={value}", env.name)]);
    }
    // Mounts: the container's, the credentials, the termination log.
    for mount in container.volume_mounts.iter().flatten() {
        let source = volumes
            .get(&mount.name)
            .with_context(|| format!("{what} mounts {}, which is no volume", mount.name))?;
        let ro = if mount.read_only == Some(true) {
            ":ro"
        } else {
            ""
        };
        args.extend([
            "--volume".into(),
            format!("{}:{}{ro}", source.display(), mount.mount_path),
        ]);
    }
    args.extend([
        "--volume".into(),
        format!(
            "{}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
            service_account.display()
        ),
    ]);
    let log = termination_log(kubelet, &container.name);
    std::fs::write(&log, "")?;
    args.extend([
        "--volume".into(),
        format!(
            "{}:{}",
            log.display(),
            container
                .termination_message_path
                .as_deref()
                .unwrap_or("/dev/termination-log")
        ),
    ]);
    // The command: `command` replaces the image's entrypoint, `args` follow.
    let command = container
        .command
        .as_ref()
        .filter(|c| !c.is_empty())
        .with_context(|| format!("{what} has no command"))?;
    args.extend(["--entrypoint".into(), command[0].clone()]);
    args.push(
        container
            .image
            .clone()
            .with_context(|| format!("{what} has no image"))?,
    );
    args.extend(command[1..].iter().cloned());
    args.extend(container.args.iter().flatten().cloned());
    Ok(args)
}

/// A Kubernetes memory quantity as podman takes it (`256Mi` -> `256m`).
fn podman_size(quantity: &str) -> Result<String> {
    for (suffix, unit) in [("Ki", "k"), ("Mi", "m"), ("Gi", "g")] {
        if let Some(number) = quantity.strip_suffix(suffix) {
            return Ok(format!("{number}{unit}"));
        }
    }
    ensure!(
        quantity.chars().all(|c| c.is_ascii_digit()),
        "memory {quantity}: not rehearsed"
    );
    Ok(quantity.to_owned())
}
