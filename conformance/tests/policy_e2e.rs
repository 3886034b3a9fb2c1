//! Mesh policy enforced end to end at L4, real binaries on two simulated nodes: the agents
//! follow a manifest folder, and policies written to it while traffic runs decide who reaches
//! the server: allow by principal, deny by namespace, port rules, `Strict` refusing a
//! plaintext client, and the same-node shortcut held to the destination's policies like HBONE.

use std::time::{Duration, Instant};

use conformance::agents::Manifests;
use conformance::metrics::sum;
use conformance::{Cluster, ClusterSpec, PodSpec};

/// client and other (mesh) and outsider (opted out) on node 1, with neighbour (HTTP, mesh);
/// server (HTTP) on node 2; all in `default`, labelled.
fn cluster() -> Cluster {
    let spec = ClusterSpec {
        agents: true,
        ..ClusterSpec::new(
            2,
            vec![
                PodSpec::new("client", 1),
                PodSpec::new("other", 1),
                PodSpec::new("outsider", 1),
                PodSpec::new("neighbour", 1),
                PodSpec::new("server", 2),
            ],
        )
    };
    let mut cluster = Cluster::build(spec).expect("build the cluster");
    for pod in ["server", "neighbour"] {
        cluster
            .start_app(pod, &["http", "--port", "8080", "--name", pod], 8080)
            .unwrap();
    }
    apply(&cluster, "");
    cluster.start_agents().expect("agents start");
    cluster
        .start_tunnels()
        .expect("tunnels connect to their agents");
    cluster
}

/// The cluster's manifests with `policies` (YAML documents) added.
fn apply(cluster: &Cluster, policies: &str) {
    cluster
        .write_manifests(&Manifests {
            labelled: &["default"],
            opted_out: &["outsider"],
            extra: policies,
            ..Manifests::default()
        })
        .unwrap();
}

/// Whether `from` gets `to saw <text>` from `to`'s HTTP app (through capture and the tunnels).
fn reaches(cluster: &Cluster, from: &str, to: &str) -> bool {
    let url = format!("http://{}:8080/echo/hi", cluster.pod(to).ip);
    let out = cluster
        .run_in(from, "curl", &["-sS", "--max-time", "3", &url])
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout) == format!("{to} saw hi\n")
}

/// Waits until who reaches `to` is `expect` (pod, reaches?) for every pod listed: the agents
/// and tunnels follow a change within a few hundred ms.
fn settles(cluster: &Cluster, to: &str, expect: &[(&str, bool)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got: Vec<(&str, bool)> = expect
            .iter()
            .map(|(from, _)| (*from, reaches(cluster, from, to)))
            .collect();
        if got == expect {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "who reaches {to}: got {got:?}, expected {expect:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n---\n"
    )
}

fn authentication(mode: &str) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: MeshAuthentication\nmetadata: {{name: server-mode, namespace: default}}\nspec: {{selector: {{matchLabels: {{app: server}}}}, mode: {mode}}}\n---\n"
    )
}

/// Connections the server's tunnel refused by policy.
fn denied(cluster: &Cluster) -> f64 {
    sum(
        &cluster.node(2).metrics().unwrap(),
        "weft_tcp_connections_closed_total",
        &[("reporter", "destination"), ("response_flags", "DENY")],
    )
}

#[test]
fn policies_written_while_traffic_runs_decide_who_reaches_the_server() {
    let cluster = cluster();
    let everyone = [("client", true), ("other", true), ("outsider", true)];
    settles(&cluster, "server", &everyone);
    assert_eq!(denied(&cluster), 0.0);

    // Allow by principal: only the client's service account.
    apply(
        &cluster,
        &policy(
            "client-only",
            "{selector: {matchLabels: {app: server}}, action: Allow, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]}]}",
        ),
    );
    settles(
        &cluster,
        "server",
        &[("client", true), ("other", false), ("outsider", false)],
    );
    let metrics = cluster.node(2).metrics().unwrap();
    for sample in &metrics {
        let text = format!("{sample:?}");
        if text.contains("closed") {
            eprintln!("METRIC {text}");
        }
    }
    let url = format!("http://{}:8080/echo/hi", cluster.pod("server").ip);
    let out = cluster
        .run_in("outsider", "curl", &["-sS", "-v", "--max-time", "3", &url])
        .unwrap();
    eprintln!(
        "LOG curl {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let log = cluster.nodes[1].tunnel.as_ref().unwrap().output();
    for line in log
        .lines()
        .filter(|l| l.contains("denied") || l.contains("10.1.1.3") || l.contains("outsider"))
    {
        eprintln!("LOG {line}");
    }
    assert!(denied(&cluster) >= 2.0, "refusals counted with DENY");

    // Deny by namespace beats any allow.
    let deny_default = policy(
        "no-default",
        "{selector: {matchLabels: {app: server}}, action: Deny, rules: [{from: [{source: {namespaces: [default]}}]}]}",
    );
    apply(&cluster, &deny_default);
    settles(
        &cluster,
        "server",
        &[("client", false), ("other", false), ("outsider", true)],
    );

    // A port rule: allowed only on another port.
    apply(
        &cluster,
        &policy(
            "other-port",
            "{selector: {matchLabels: {app: server}}, rules: [{to: [{operation: {ports: [\"9090\"]}}]}]}",
        ),
    );
    settles(
        &cluster,
        "server",
        &[("client", false), ("other", false), ("outsider", false)],
    );

    // Strict refuses the plaintext client, Permissive lets it in; mesh clients go on.
    apply(&cluster, &authentication("Strict"));
    settles(
        &cluster,
        "server",
        &[("client", true), ("other", true), ("outsider", false)],
    );
    apply(&cluster, &authentication("Permissive"));
    settles(&cluster, "server", &everyone);

    // The same-node shortcut (client and neighbour share node 1) is held to the neighbour's
    // policies as HBONE would be.
    settles(&cluster, "neighbour", &[("client", true), ("other", true)]);
    apply(
        &cluster,
        &policy(
            "neighbour-other-only",
            "{selector: {matchLabels: {app: neighbour}}, rules: [{from: [{source: {principals: [\"*/sa/other\"]}}]}]}",
        ),
    );
    settles(&cluster, "neighbour", &[("client", false), ("other", true)]);
    let node1_denied = sum(
        &cluster.node(1).metrics().unwrap(),
        "weft_tcp_connections_closed_total",
        &[("reporter", "destination"), ("response_flags", "DENY")],
    );
    assert!(
        node1_denied >= 1.0,
        "the shortcut's refusal is counted on node 1"
    );
}
