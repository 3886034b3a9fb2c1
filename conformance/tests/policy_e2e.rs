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
    assert!(denied(&cluster) >= 2.0, "refusals counted with DENY");
    let decided = |decision: &str| {
        sum(
            &cluster.node(2).metrics().unwrap(),
            "weft_policy_decisions_total",
            &[("policy", "default/client-only"), ("decision", decision)],
        )
    };
    assert!(decided("allow") >= 1.0, "the policy's allows are counted");
    let (status, dump) = cluster.node(2).http_get(15000, "/config_dump").unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(
        dump["policies"]["default/server"]["policies"],
        serde_json::json!(["default/client-only"]),
        "/config_dump lists the policies in force per local workload"
    );

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

/// A policy change closes a live connection it now refuses within a second (the request on it
/// went through before), and the refusal names the policy in the server tunnel's log.
#[test]
fn a_policy_change_closes_a_connection_it_now_refuses_within_a_second() {
    use std::io::Read;
    let cluster = cluster();
    settles(&cluster, "server", &[("client", true)]);
    let server = std::net::SocketAddr::from((cluster.pod("server").ip, 8080));
    let refusing = cluster.manifests_yaml(&Manifests {
        labelled: &["default"],
        opted_out: &["outsider"],
        extra: &policy(
            "no-client",
            "{selector: {matchLabels: {app: server}}, action: Deny, rules: [{from: [{source: {principals: [\"*/sa/client\"]}}]}]}",
        ),
        ..Manifests::default()
    });
    let dir = cluster.manifest_dir();
    let (first, ended, after) = cluster
        .pod("client")
        .netns
        .run_in(move || {
            let mut stream = std::net::TcpStream::connect(server).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let first = conformance::load::http_echo(&mut stream, "before").unwrap();
            let tmp = dir.join(".policy.tmp");
            std::fs::write(&tmp, &refusing).unwrap();
            std::fs::rename(&tmp, dir.join("cluster.yaml")).unwrap();
            let changed = Instant::now();
            let mut byte = [0u8; 1];
            let ended = stream.read(&mut byte);
            (first, format!("{ended:?}"), changed.elapsed())
        })
        .unwrap();
    assert_eq!(first, "server saw before\n");
    eprintln!("the connection ended ({ended}) {after:?} after the policy was written");
    assert!(
        ended == "Ok(0)" || ended.contains("ConnectionReset"),
        "closed, not timed out: {ended}"
    );
    assert!(after < Duration::from_secs(1), "{after:?}");
    let log = cluster.nodes[1].tunnel.as_ref().unwrap().output();
    assert!(
        log.contains("closing a connection the new policy refuses")
            && log.contains("MeshPolicy default/no-client denies it"),
        "the revocation is logged with its policy"
    );
}
