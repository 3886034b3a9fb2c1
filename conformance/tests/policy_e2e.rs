//! Mesh policy enforced end to end, real binaries on two simulated nodes: the agents follow a
//! manifest folder, and policies written to it while traffic runs decide who reaches the
//! server: allow by principal, deny by namespace, port rules, `Strict` refusing a plaintext
//! client, the same-node shortcut held to the destination's policies like HBONE; and HTTP
//! rules decided per request (HTTP/1.1 and HTTP/2), with what cannot be parsed refused.

use std::time::{Duration, Instant};

use conformance::agents::Manifests;
use conformance::metrics::sum;
use conformance::{Cluster, ClusterSpec, PodSpec};

/// client and other (mesh) and outsider (opted out) on node 1, with neighbour (HTTP, mesh);
/// server (HTTP) and db (TCP echo on 5432) on node 2; all in `default`, labelled.
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
                PodSpec::new("db", 2),
            ],
        )
    };
    let mut cluster = Cluster::build(spec).expect("build the cluster");
    for pod in ["server", "neighbour"] {
        cluster
            .start_app(pod, &["http", "--port", "8080", "--name", pod], 8080)
            .unwrap();
    }
    cluster
        .start_app("db", &["echo", "--port", "5432"], 5432)
        .unwrap();
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
    // The server's tunnel's flow events name the policy that refused `other`'s connection.
    let (status, flows) = cluster
        .node(2)
        .http_get(
            15000,
            "/flows?from_pod=default%2Fother&verdict=denied&type=tcp",
        )
        .unwrap();
    assert_eq!(status, 200);
    let refusals: Vec<serde_json::Value> = flows
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        refusals.iter().any(|e| e["type"] == "tcp_close"
            && e["flags"] == "DENY"
            && e["policy"] == "default/client-only"),
        "the refusal names its policy: {flows}"
    );
    // `settles` may have seen the client through before the policy reached the tunnel (it
    // asks the client first): one connection surely decided under the policy.
    assert!(reaches(&cluster, "client", "server"));
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

    // Deny by namespace beats any allow; a broken policy beside it is reported with its field
    // (readiness of each agent) and changes nothing.
    let deny_default = policy(
        "no-default",
        "{selector: {matchLabels: {app: server}}, action: Deny, rules: [{from: [{source: {namespaces: [default]}}]}]}",
    );
    let broken = policy(
        "broken",
        "{selector: {matchLabels: {app: server}}, rules: [{from: [{source: {ipBlocks: [\"10.0.0/8\"]}}]}]}",
    );
    apply(&cluster, &format!("{deny_default}{broken}"));
    settles(
        &cluster,
        "server",
        &[("client", false), ("other", false), ("outsider", true)],
    );
    for agent in &cluster.agents {
        let (status, body) = conformance::agents::agent_readiness(agent).unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("policy: MeshPolicy default/broken: spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0/8\""),
            "{}: {body}",
            agent.name
        );
    }

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
    let log = cluster
        .node(2)
        .wait_for_log("closing a connection the new policy refuses");
    assert!(
        log.contains("MeshPolicy default/no-client denies it"),
        "the revocation is logged with its policy"
    );
}

/// The Service of db, whose port name says it is not HTTP.
const DB_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: default}\nspec: {clusterIP: 10.96.7.7, selector: {app: db}, ports: [{name: tcp-db, port: 5432}]}\n---\n";

/// HTTP rules: who may GET /public and /upgrade on `app`.
fn public_only(name: &str, app: &str) -> String {
    policy(
        name,
        &format!(
            "{{selector: {{matchLabels: {{app: {app}}}}}, action: Allow, rules: [{{to: [{{operation: {{methods: [GET], paths: [\"/public*\", /upgrade]}}}}]}}]}}"
        ),
    )
}

/// `GET /public` then `POST /admin` on one connection: "<code> <connects>" per request (curl
/// reports no new connect when it reuses the connection). HTTP/2 with prior knowledge is
/// spoken by [`h2_get_then_post`] (curl 7.88 fails to reuse such a connection, with or
/// without Weft).
fn get_then_post(cluster: &Cluster, from: &str, to: &str) -> String {
    let base = format!("http://{}:8080", cluster.pod(to).ip);
    let write_out = "%{http_code} %{num_connects}\n";
    let (public, admin) = (format!("{base}/public"), format!("{base}/admin"));
    let one = ["-sS", "--max-time", "5", "-o", "/dev/null", "-w", write_out];
    let mut args = one.to_vec();
    args.extend([public.as_str(), "--next"]);
    args.extend(one);
    args.extend(["-d", "x=1", admin.as_str()]);
    let out = cluster.run_in(from, "curl", &args).unwrap();
    let mut got = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        got.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    got
}

/// [`get_then_post`] over HTTP/2 with prior knowledge, on one connection: "<code> <code>".
fn h2_get_then_post(cluster: &Cluster, from: &str, to: &str) -> String {
    use http_body_util::{BodyExt, Full};
    let server = std::net::SocketAddr::from((cluster.pod(to).ip, 8080));
    let exchange = async move {
        let tcp = tokio::net::TcpStream::connect(server).await?;
        let io = hyper_util::rt::TokioIo::new(tcp);
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
        tokio::spawn(connection);
        let mut codes = Vec::new();
        for (method, path, body) in [("GET", "/public", ""), ("POST", "/admin", "x=1")] {
            let request = http::Request::builder()
                .method(method)
                .uri(format!("http://{server}{path}"))
                .body(Full::new(bytes::Bytes::from_static(body.as_bytes())))?;
            let response = sender.send_request(request).await?;
            codes.push(response.status().as_u16().to_string());
            response.into_body().collect().await?;
        }
        anyhow::Ok(codes.join(" "))
    };
    let exchange = async move {
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")))
    };
    match cluster.pod(from).netns.block_on(move || exchange).unwrap() {
        Ok(codes) => codes,
        Err(error) => format!("{error:#}"),
    }
}

/// Waits until `check` holds, for up to ten seconds (the agents and tunnels follow a change
/// within a few hundred ms); `what` says what was awaited.
fn eventually(what: &str, mut check: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let Some(got) = check() else { return };
        assert!(Instant::now() < deadline, "{what}: still {got}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Requests on the server's tunnel with `code`.
fn requests(cluster: &Cluster, node: usize, code: &str) -> f64 {
    sum(
        &cluster.node(node).metrics().unwrap(),
        "weft_requests_total",
        &[("reporter", "destination"), ("response_code", code)],
    )
}

#[test]
fn http_rules_decide_each_request_and_what_cannot_be_parsed_is_refused() {
    use std::io::{Read, Write};
    let cluster = cluster();
    settles(&cluster, "server", &[("client", true)]);
    let policies = format!(
        "{}{}{DB_SERVICE}",
        public_only("server-public", "server"),
        public_only("neighbour-public", "neighbour")
    );
    apply(&cluster, &policies);

    // One keep-alive connection: GET /public allowed, POST /admin refused with 403; the same
    // over HTTP/2; through HBONE (server, node 2) and the same-node shortcut (neighbour).
    for to in ["server", "neighbour"] {
        eventually(&format!("GET then POST to {to}"), || {
            let got = get_then_post(&cluster, "client", to);
            (got != "200 1\n403 0\n").then_some(got)
        });
        eventually(&format!("GET then POST to {to} over HTTP/2"), || {
            let got = h2_get_then_post(&cluster, "client", to);
            (got != "200 403").then_some(got)
        });
    }
    let body = cluster
        .run_in(
            "client",
            "curl",
            &[
                "-sS",
                "-X",
                "POST",
                &format!("http://{}:8080/admin", cluster.pod("server").ip),
            ],
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&body.stdout),
        "access denied by mesh policy\n"
    );
    assert!(
        requests(&cluster, 2, "200") >= 2.0,
        "allowed requests counted"
    );
    assert!(
        requests(&cluster, 2, "403") >= 3.0,
        "refused requests counted"
    );
    assert!(
        requests(&cluster, 1, "403") >= 2.0,
        "the shortcut's requests too"
    );
    let log = cluster.node(2).wait_for_log("\"verdict\":\"deny\"");
    assert!(
        log.contains("request complete")
            && log.contains("\"path\":\"/admin\"")
            && log.contains("\"verdict\":\"deny\""),
        "one access-log event per request, with its verdict"
    );

    // A path spelled to slip past the rule is decided, and reaches the application, as what
    // it names; an upgrade allowed by the rules carries bytes both ways.
    let server = std::net::SocketAddr::from((cluster.pod("server").ip, 8080));
    let (sneaky, upgraded, garbage) = cluster
        .pod("client")
        .netns
        .run_in(move || {
            let exchange = |request: &[u8]| {
                let mut stream = std::net::TcpStream::connect(server).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                stream.write_all(request).unwrap();
                let mut got = vec![0u8; 4096];
                let n = stream.read(&mut got).unwrap_or(0);
                (stream, String::from_utf8_lossy(&got[..n]).into_owned())
            };
            let (_, sneaky) =
                exchange(b"GET /public/../admin HTTP/1.1\r\nHost: server\r\n\r\n");
            let (mut stream, head) = exchange(
                b"GET /upgrade HTTP/1.1\r\nHost: server\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
            );
            stream.write_all(b"ping").unwrap();
            let mut echoed = [0u8; 4];
            stream.read_exact(&mut echoed).unwrap();
            let upgraded = format!("{} then {}", head.lines().next().unwrap_or_default(), String::from_utf8_lossy(&echoed));
            let (_, garbage) = exchange(b"\x16\x03\x01 not http at all\r\n\r\n");
            (sneaky, upgraded, garbage)
        })
        .unwrap();
    assert!(sneaky.starts_with("HTTP/1.1 403"), "{sneaky}");
    assert_eq!(upgraded, "HTTP/1.1 101 Switching Protocols then ping");
    assert!(
        !garbage.contains("server:"),
        "the application saw nothing: {garbage}"
    );
    eventually("the refusal of bytes that are not HTTP", || {
        let refused = sum(
            &cluster.node(2).metrics().unwrap(),
            "weft_tcp_connections_closed_total",
            &[("reporter", "destination"), ("response_flags", "DPE")],
        );
        (refused < 1.0).then(|| format!("{refused} connections closed with DPE"))
    });

    // db's port is declared TCP (its Service's port name): a Deny made only of HTTP fields
    // cannot be decided per request there, so it denies the whole connection.
    let echo_db = || {
        let db = std::net::SocketAddr::from((cluster.pod("db").ip, 5432));
        cluster
            .pod("client")
            .netns
            .run_in(move || {
                let mut stream = std::net::TcpStream::connect(db).ok()?;
                stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
                stream.write_all(b"select").ok()?;
                let mut got = [0u8; 6];
                stream.read_exact(&mut got).ok()?;
                Some(got)
            })
            .unwrap()
    };
    assert_eq!(
        echo_db().as_ref(),
        Some(b"select"),
        "db answers before the policy"
    );
    let deny_admin = policy(
        "db-no-admin",
        "{selector: {matchLabels: {app: db}}, action: Deny, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}",
    );
    apply(&cluster, &format!("{policies}{deny_admin}"));
    eventually("db refused", || echo_db().map(|got| format!("{got:?}")));
    let tightened = "MeshPolicy default/db-no-admin: spec.rules[0] names HTTP fields, but Service default/db declares port 5432 is not HTTP";
    eventually("the tightened rule in node 2's agent's readiness", || {
        let (status, body) = conformance::agents::agent_readiness(&cluster.agents[1]).unwrap();
        (status != 200 || !body.contains(tightened)).then(|| format!("{status} {body}"))
    });
    assert!(
        cluster.agents[1].output().contains(tightened),
        "and in its log"
    );
}
