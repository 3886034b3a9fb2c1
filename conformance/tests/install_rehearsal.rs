//! The install, rehearsed for real: the controller Deployment and the DaemonSet `weft-node`
//! as `kubectl kustomize install/` renders them run under podman (their image, built by
//! `scripts/image.sh`; command, arguments, environment, mounts and capabilities as written),
//! follow the Kubernetes API (the test API server, over TLS, found through the in-cluster
//! configuration); the controller's CA reviews each node pod's projected token and publishes
//! the trust bundle they mount; and the node pods mesh an unmodified client's connection to a
//! server on the other node: mutual TLS on the link, nothing in clear. Then each capability the
//! manifest adds is taken away in turn, and the pod no longer meshes: the list is what is
//! needed, not more. Then the rolling update and the uninstall the README describes.

use std::time::Duration;

use conformance::node_pod::Edit;
use conformance::pcap;
use conformance::rehearsal::{CONTROLLER_TOKEN, Rehearsal, node_api_token};

const READY: Duration = Duration::from_secs(30);

#[test]
fn the_rendered_install_meshes_a_cluster_under_podman_and_the_node_pod_needs_every_capability_it_adds()
 {
    let mut rehearsal = Rehearsal::build().expect("build the rehearsal");
    assert!(
        rehearsal.echo("before"),
        "without Weft, the client reaches the server"
    );

    // A node without a BPF file system or without cgroup v2: the preflight init container
    // stops the pod with the reason as its termination message (the pod's status), and
    // nothing else starts.
    let plain = rehearsal.cluster.dir.path().join("not-a-special-fs");
    std::fs::create_dir_all(&plain).unwrap();
    for (path, says) in [
        ("/sys/fs/bpf", "no BPF file system at /sys/fs/bpf"),
        (
            "/sys/fs/cgroup",
            "/host/sys/fs/cgroup is not a cgroup v2 hierarchy",
        ),
    ] {
        let refused = rehearsal
            .start_node_pod_with_host_paths(1, &[(path, plain.clone())])
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        let message = refused
            .split_once("termination message ")
            .and_then(|(_, rest)| rest.split_once("; log:"))
            .map(|(message, _)| message)
            .unwrap_or_default();
        assert!(
            refused.contains("init container preflight failed") && message.contains(says),
            "{path} missing: the termination message says why: {refused}"
        );
    }

    // As written: ready by the manifest's own probes, and meshing.
    rehearsal
        .start_node_pods(&Edit::default())
        .expect("the node pods start (preflight passes)");
    rehearsal
        .wait_ready(READY)
        .expect("the node pods become ready");
    assert!(
        rehearsal.meshes_within(Duration::from_secs(20)),
        "the client's connection is meshed through the node pods:\nnode1:\n{}\nnode2:\n{}",
        rehearsal.logs(1),
        rehearsal.logs(2)
    );
    // The certificates came from the controller's CA, each to the node of its pod, which it
    // authenticated by TokenReview.
    let log = rehearsal.controller_log();
    for (node, pod) in [("node1", "client"), ("node2", "server")] {
        assert!(
            log.lines().any(|l| l.contains("certificate signed")
                && l.contains(&format!("node={node}"))
                && l.contains(&format!("sa/{pod}"))),
            "the controller signed {pod}'s certificate for {node}:\n{log}"
        );
    }
    let secret = "rehearsal-secret-5e1";
    let (mut tcpdump, pcap) = rehearsal.cluster.capture_link(2, "rehearsal").unwrap();
    assert!(rehearsal.echo(secret));
    std::thread::sleep(Duration::from_millis(300));
    tcpdump.stop(Duration::from_secs(5));
    assert!(
        !pcap::contains(&pcap, secret.as_bytes()).unwrap(),
        "the meshed request crossed the link in clear"
    );
    assert!(
        pcap::packets(&pcap, "tcp port 15008")
            .unwrap()
            .lines()
            .count()
            > 0,
        "the request crossed as HBONE (15008)"
    );

    // `weft observe` through the controller's relay, as a user reaches it with `kubectl
    // port-forward`: both node pods offer their flows (authenticated by TokenReview of their
    // projected tokens, as for the CA), and one command sees the request on both nodes.
    let deadline = std::time::Instant::now() + READY;
    while rehearsal.relay_nodes() != "node1\nnode2\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "both nodes offer their flows to the relay: {:?}\n{}",
            rehearsal.relay_nodes(),
            rehearsal.controller_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let observed = std::process::Command::new(conformance::binary("weft"))
        .args(["observe", "--relay", &rehearsal.relay_source()])
        .args(["--to-pod", "default/server", "--output", "json"])
        .output()
        .unwrap();
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&observed.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for node in ["node1", "node2"] {
        assert!(
            events.iter().any(|e| e["node"] == node
                && e["source"]["workload"] == "client"
                && e["type"] == "tcp_close"),
            "the relay passes on {node}'s events of the client's connections: {}{}",
            String::from_utf8_lossy(&observed.stdout),
            String::from_utf8_lossy(&observed.stderr)
        );
    }

    // A rolling update: the pods go (SIGTERM) and capture stays pinned, so the client's
    // connections are refused rather than sent in clear; the new pods take over.
    rehearsal.stop_node_pods();
    assert!(
        rehearsal.pin_dir(1).join("links").exists(),
        "capture stays pinned"
    );
    assert!(
        !rehearsal.echo("between-pods"),
        "with capture pinned and no tunnel, a connection is refused, never sent in clear"
    );
    rehearsal.start_node_pods(&Edit::default()).unwrap();
    rehearsal.wait_ready(READY).unwrap();
    assert!(rehearsal.meshes_within(Duration::from_secs(20)));
    rehearsal.stop_node_pods();

    // Each capability the manifest adds, taken away: the pod no longer meshes.
    let added: Vec<(String, String)> = rehearsal
        .pod
        .containers
        .iter()
        .flat_map(|c| {
            c.security_context
                .iter()
                .flat_map(|s| s.capabilities.iter())
                .flat_map(|caps| caps.add.iter().flatten())
                .map(|cap| (c.name.clone(), cap.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(added.len() >= 2, "{added:?}");
    let mut not_needed = Vec::new();
    for (container, cap) in &added {
        for i in 1..=2 {
            rehearsal.run_image(i, &["uninstall"]).unwrap();
        }
        let edit = Edit {
            without_capability: Some((container.clone(), cap.clone())),
        };
        let meshed = match rehearsal.start_node_pods(&edit) {
            Ok(()) => rehearsal.meshes_within(Duration::from_secs(10)),
            Err(_) => false,
        };
        if meshed {
            not_needed.push(format!("{container}: {cap}"));
        }
        rehearsal.stop_node_pods();
    }
    assert!(
        not_needed.is_empty(),
        "the node pod meshes without these capabilities, which the manifest adds: {not_needed:?}"
    );

    // Uninstall (`kubectl delete -k install/`): the DaemonSet goes, then its pods; each
    // agent, seeing its DaemonSet gone, removes capture from its node, and the client reaches
    // the server directly again.
    for i in 1..=2 {
        rehearsal.run_image(i, &["uninstall"]).unwrap();
    }
    rehearsal.start_node_pods(&Edit::default()).unwrap();
    rehearsal.wait_ready(READY).unwrap();
    assert!(rehearsal.meshes_within(Duration::from_secs(20)));
    assert!(rehearsal.pin_dir(1).join("links").exists());
    assert!(
        rehearsal
            .api
            .delete("DaemonSet", "weft-system", "weft-node")
    );
    let logs: Vec<String> = (1..=2)
        .map(|i| rehearsal.running[i - 1].logs("agent"))
        .collect();
    rehearsal.stop_node_pods();
    for i in 1..=2 {
        assert!(
            !rehearsal.pin_dir(i).exists(),
            "node{i}: capture removed with the DaemonSet:\n{}",
            logs[i - 1]
        );
    }
    assert!(
        rehearsal.echo("after-uninstall"),
        "nothing of Weft is left in the way"
    );

    // Everything each of Weft's pods asked of the API is in its role's RBAC rules.
    for (who, token, granted) in [
        (
            "node1's agent",
            node_api_token(1),
            mesh_node::api_access::node_agent(),
        ),
        (
            "node2's agent",
            node_api_token(2),
            mesh_node::api_access::node_agent(),
        ),
        (
            "the controller",
            CONTROLLER_TOKEN.to_owned(),
            mesh_node::api_access::controller(),
        ),
    ] {
        let asked = rehearsal.api.accesses_of(&token);
        assert!(!asked.is_empty(), "{who} made no request");
        for (group, resource, verb) in asked {
            assert!(
                mesh_node::api_access::allows(&granted, &group, &resource, &verb),
                "{who} asked {verb} {group}/{resource}, which install/ does not grant it"
            );
        }
    }
    let controller = rehearsal.api.accesses_of(CONTROLLER_TOKEN);
    for used in [
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("", "configmaps", "patch"),
    ] {
        let used = (used.0.to_owned(), used.1.to_owned(), used.2.to_owned());
        assert!(
            controller.contains(&used),
            "the controller's CA used {used:?}"
        );
    }
}
