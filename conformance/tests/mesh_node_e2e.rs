//! `mesh-node` end to end, real binaries on two simulated nodes: the agents follow a folder
//! of Kubernetes manifests; labelling a namespace enrolls its pods (their traffic becomes
//! mutual TLS, checked on the wire), removing the label or opting a pod out returns it to
//! plain traffic, and a pod that appears later in a labelled namespace is enrolled.

use std::time::{Duration, Instant};

use conformance::agents::Manifests;
use conformance::metrics::sum;
use conformance::pcap;
use conformance::{Cluster, ClusterSpec, PodSpec};

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";

/// client and late on node 1, server on node 2 (HTTP on 8080), all in namespace `default`;
/// tunnels and one agent per node running; `late` not in the manifests yet.
fn cluster(labelled: bool) -> Cluster {
    let spec = ClusterSpec {
        agents: true,
        ..ClusterSpec::new(
            2,
            vec![
                PodSpec::new("client", 1),
                PodSpec::new("late", 1),
                PodSpec::new("server", 2),
            ],
        )
    };
    let mut cluster = Cluster::build(spec).expect("build the cluster");
    cluster
        .start_app(
            "server",
            &["http", "--port", "8080", "--name", "server"],
            8080,
        )
        .unwrap();
    let labels: &[&str] = if labelled { &["default"] } else { &[] };
    cluster
        .write_manifests(&Manifests {
            labelled: labels,
            absent: &["late"],
            ..Manifests::default()
        })
        .unwrap();
    cluster.start_agents().expect("agents start");
    cluster
        .start_tunnels()
        .expect("tunnels connect to their agents");
    cluster
}

/// Plain curl from `pod` to the server: whether it answered `server saw <text>`.
fn echo(cluster: &Cluster, pod: &str, text: &str) -> bool {
    let url = format!("http://{}:8080/echo/{text}", cluster.pod("server").ip);
    let out = cluster
        .run_in(pod, "curl", &["-sS", "--max-time", "5", &url])
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout) == format!("server saw {text}\n")
}

/// Connections the server's tunnel accepted over mutual TLS from `principal`.
fn meshed(cluster: &Cluster, principal: &str) -> f64 {
    cluster.node(2).meshed_from(principal).unwrap()
}

/// Plaintext connections from `pod` the server's tunnel took on its inbound port.
fn plaintext_inbound(cluster: &Cluster, pod: &str) -> f64 {
    sum(
        &cluster.node(2).metrics().unwrap(),
        "weft_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_workload", pod),
            ("connection_security_policy", "none"),
        ],
    )
}

/// Retries `check` until it holds (the agents and tunnels follow within a few hundred ms).
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `secret` from the client while capturing node 2's link: whether it crossed in clear.
fn crosses_in_clear(cluster: &Cluster, secret: &str) -> bool {
    let (mut tcpdump, pcap) = cluster.capture_link(2, secret).unwrap();
    assert!(echo(cluster, "client", secret));
    std::thread::sleep(Duration::from_millis(300));
    tcpdump.stop(Duration::from_secs(5));
    pcap::contains(&pcap, secret.as_bytes()).unwrap()
}

#[test]
fn labelling_a_namespace_enrolls_its_pods_and_unlabelling_or_opting_out_returns_them() {
    let cluster = cluster(false);
    assert!(echo(&cluster, "client", "before"));
    assert_eq!(meshed(&cluster, CLIENT), 0.0, "not labelled: plain");
    assert!(crosses_in_clear(&cluster, "plain-before-label-3f1"));

    cluster
        .write_manifests(&Manifests {
            labelled: &["default"],
            absent: &["late"],
            ..Manifests::default()
        })
        .unwrap();
    eventually("the labelled namespace's client is meshed", || {
        let before = meshed(&cluster, CLIENT);
        echo(&cluster, "client", "label") && meshed(&cluster, CLIENT) == before + 1.0
    });
    assert!(
        !crosses_in_clear(&cluster, "secret-when-labelled-8c2"),
        "enrolled traffic crossed the link in clear"
    );

    cluster
        .write_manifests(&Manifests {
            absent: &["late"],
            ..Manifests::default()
        })
        .unwrap();
    eventually("without the label the client is plain again", || {
        let before = meshed(&cluster, CLIENT);
        echo(&cluster, "client", "unlabel") && meshed(&cluster, CLIENT) == before
    });
    assert!(crosses_in_clear(&cluster, "plain-after-unlabel-5d7"));

    // Labelled again, but the client opts out: its connections go out plain and land on the
    // (enrolled) server's plaintext inbound port.
    cluster
        .write_manifests(&Manifests {
            labelled: &["default"],
            opted_out: &["client"],
            absent: &["late"],
        })
        .unwrap();
    eventually(
        "an opted-out client is plain, the server still enrolled",
        || {
            let (before, inbound) = (
                meshed(&cluster, CLIENT),
                plaintext_inbound(&cluster, "client"),
            );
            echo(&cluster, "client", "optout")
                && meshed(&cluster, CLIENT) == before
                && plaintext_inbound(&cluster, "client") == inbound + 1.0
        },
    );
}

#[test]
fn a_pod_that_appears_later_in_a_labelled_namespace_is_enrolled() {
    let cluster = cluster(true);
    eventually("the client is meshed", || {
        let before = meshed(&cluster, CLIENT);
        echo(&cluster, "client", "first") && meshed(&cluster, CLIENT) == before + 1.0
    });
    cluster
        .write_manifests(&Manifests {
            labelled: &["default"],
            ..Manifests::default()
        })
        .unwrap();
    let late = "spiffe://cluster.local/ns/default/sa/late";
    eventually("the new pod is meshed", || {
        let before = meshed(&cluster, late);
        echo(&cluster, "late", "hello") && meshed(&cluster, late) == before + 1.0
    });
}
