//! The install's node pod, rehearsed for real: the DaemonSet `weft-node` as `kubectl
//! kustomize install/` renders it runs under podman on both simulated nodes (its image, built
//! by `scripts/image.sh`; its command, arguments, environment, mounts and capabilities as
//! written), follows the Kubernetes API (the test API server, over TLS, found through the
//! in-cluster configuration), and meshes an unmodified client's connection to a server on
//! the other node: mutual TLS on the link, nothing in clear. Then each capability the
//! manifest adds is taken away in turn, and the pod no longer meshes: the list is what is
//! needed, not more. Then the rolling update and the uninstall the README describes.

use std::time::Duration;

use conformance::node_pod::Edit;
use conformance::pcap;
use conformance::rehearsal::Rehearsal;

const READY: Duration = Duration::from_secs(30);

#[test]
fn the_rendered_node_pod_meshes_a_cluster_under_podman_and_needs_every_capability_it_adds() {
    let mut rehearsal = Rehearsal::build().expect("build the rehearsal");
    assert!(
        rehearsal.echo("before"),
        "without Weft, the client reaches the server"
    );

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

    // Everything the agents asked of the API is in the node agent's RBAC list.
    let granted = mesh_node::api_access::node_agent();
    for (group, resource, verb) in rehearsal.api.accesses() {
        assert!(
            mesh_node::api_access::allows(&granted, &group, &resource, &verb),
            "the agent asked {verb} {group}/{resource}, which install/ does not grant"
        );
    }
}
