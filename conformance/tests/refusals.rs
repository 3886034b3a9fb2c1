//! What the tunnels refuse, each with its reason: foreign or missing client certificates, a
//! destination with an unexpected identity, misdirected CONNECTs, malformed state files.

use std::net::SocketAddr;
use std::time::Duration;

use conformance::hbone_client::{ConnectAnswer, connect_from};
use conformance::metrics::sum;
use conformance::pki::TestCa;
use conformance::{Cluster, ClusterSpec, PodSpec};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn cluster() -> Cluster {
    let spec = ClusterSpec::new(
        2,
        vec![
            PodSpec::new("client", 1),
            PodSpec::new("server", 2),
            PodSpec::new("other", 2),
        ],
    );
    Cluster::with_http(spec, &["server"]).expect("build the cluster")
}

/// The bare HBONE client, from the client pod, to the server pod's 15008, asking for `pod`.
fn bare_connect(
    cluster: &Cluster,
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    pod: &str,
) -> anyhow::Result<ConnectAnswer> {
    connect_from(
        &cluster.pod("client").netns,
        hbone_addr(cluster),
        cert,
        &target(cluster, pod),
    )
}

fn hbone_addr(cluster: &Cluster) -> SocketAddr {
    SocketAddr::from((cluster.pod("server").ip, 15008))
}

fn target(cluster: &Cluster, pod: &str) -> String {
    format!("{}:8080", cluster.pod(pod).ip)
}

fn wait_for_log(cluster: &Cluster, node: usize, needle: &str) -> String {
    cluster.node(node).wait_for_log(needle)
}

#[test]
fn a_valid_mesh_certificate_is_accepted_by_the_bare_client() {
    // The control for the refusals below: the same client, with a good certificate, gets 200.
    let cluster = cluster();
    let ca = TestCa::load(&cluster.ca_dir()).unwrap();
    let cert = ca
        .issue(Some("spiffe://cluster.local/ns/default/sa/client"))
        .unwrap();
    let answer = bare_connect(&cluster, Some(cert), "server").unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
}

#[test]
fn a_client_certificate_from_another_ca_and_trust_domain_is_refused() {
    let cluster = cluster();
    let foreign = TestCa::generate().unwrap();
    let cert = foreign
        .issue(Some("spiffe://evil.example/ns/default/sa/client"))
        .unwrap();
    let result = bare_connect(&cluster, Some(cert), "server");
    assert!(
        result.is_err(),
        "a foreign certificate got through: {result:?}"
    );
    let log = wait_for_log(&cluster, 2, "TLS handshake failed");
    assert!(log.contains("UnknownIssuer"), "{log}");
}

#[test]
fn a_client_certificate_for_another_trust_domain_from_our_ca_is_refused() {
    let cluster = cluster();
    let ca = TestCa::load(&cluster.ca_dir()).unwrap();
    let cert = ca
        .issue(Some("spiffe://other.domain/ns/default/sa/client"))
        .unwrap();
    let result = bare_connect(&cluster, Some(cert), "server");
    assert!(
        result.is_err(),
        "another trust domain got through: {result:?}"
    );
    wait_for_log(
        &cluster,
        2,
        "is from trust domain \\\"other.domain\\\", expected \\\"cluster.local\\\"",
    );
}

#[test]
fn a_client_without_certificate_is_refused() {
    let cluster = cluster();
    let result = bare_connect(&cluster, None, "server");
    assert!(
        result.is_err(),
        "no client certificate got through: {result:?}"
    );
    wait_for_log(&cluster, 2, "peer sent no certificates");
}

#[test]
fn a_certificate_without_spiffe_id_is_refused() {
    let cluster = cluster();
    let ca = TestCa::load(&cluster.ca_dir()).unwrap();
    let cert = ca.issue(None).unwrap();
    let result = bare_connect(&cluster, Some(cert), "server");
    assert!(
        result.is_err(),
        "a certificate without SPIFFE ID got through: {result:?}"
    );
    wait_for_log(&cluster, 2, "peer certificate carries no SPIFFE ID");
}

#[test]
fn a_connect_to_an_address_the_listener_does_not_serve_is_refused() {
    let cluster = cluster();
    let ca = TestCa::load(&cluster.ca_dir()).unwrap();
    let cert = ca
        .issue(Some("spiffe://cluster.local/ns/default/sa/client"))
        .unwrap();
    // "other" is a real pod on the same node, but this listener belongs to "server".
    let answer = bare_connect(&cluster, Some(cert), "other").unwrap();
    assert_eq!(answer.status, 421, "{answer:?}");
    let reason = answer.reason.unwrap_or_default();
    assert!(
        reason.contains("this listener serves default/server"),
        "{reason}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let metrics = cluster.node(2).metrics().unwrap();
    assert_eq!(
        sum(
            &metrics,
            "weft_tcp_connections_closed_total",
            &[("reporter", "destination"), ("response_flags", "NR")]
        ),
        1.0
    );
}

#[test]
fn a_destination_with_an_unexpected_identity_is_refused_by_the_client_tunnel() {
    let mut cluster = cluster();
    // Node 1 believes the server runs as "payments"; node 2 (truthfully) presents "server".
    let lie = cluster.state_yaml(|pod| {
        if pod.name == "server" {
            pod.service_account = "payments".into();
        }
    });
    std::fs::write(&cluster.node(1).state_file, lie).unwrap();
    wait_for_log(&cluster, 1, "reloaded state file");
    cluster.wait_ready(1, Duration::from_secs(5)).unwrap();
    let url = format!(
        "http://{}/echo/should-not-arrive",
        target(&cluster, "server")
    );
    let out = cluster.curl_socks("client", &url, &[]).unwrap();
    assert!(!out.success, "curl reached an impostor: {}", out.stdout);
    let log = wait_for_log(
        &cluster,
        1,
        "is not the expected spiffe://cluster.local/ns/default/sa/payments",
    );
    assert!(
        log.contains("spiffe://cluster.local/ns/default/sa/server"),
        "{log}"
    );
    let metrics = cluster.node(1).metrics().unwrap();
    assert_eq!(
        sum(
            &metrics,
            "weft_tcp_connections_closed_total",
            &[("reporter", "source"), ("response_flags", "TLS")]
        ),
        1.0
    );
    assert!(!cluster.node(2).log().contains("should-not-arrive"));
}

#[test]
fn a_malformed_state_file_is_refused_with_its_line_and_the_previous_state_stays() {
    let cluster = cluster();
    let good = std::fs::read_to_string(&cluster.node(1).state_file).unwrap();
    let bad = good.replacen("ips: [10.10.2.1,", "ips: [10.10.2.999,", 1);
    assert_ne!(good, bad);
    std::fs::write(&cluster.node(1).state_file, &bad).unwrap();
    let log = wait_for_log(&cluster, 1, "refused state file update");
    let path = cluster.node(1).state_file.display().to_string();
    assert!(
        log.contains(&format!("{path}:")) && log.contains("invalid IP address"),
        "{log}"
    );
    // The previous state is still in force: the server is still reached through the mesh.
    let url = format!("http://{}/echo/still-works", target(&cluster, "server"));
    let out = cluster.curl_socks("client", &url, &[]).unwrap();
    assert_eq!(out.stdout, "server saw still-works\n");
    let metrics = cluster.node(2).metrics().unwrap();
    assert_eq!(
        sum(
            &metrics,
            "weft_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "mutual_tls")
            ]
        ),
        1.0
    );
}

#[test]
fn a_tunnel_started_with_a_malformed_state_file_exits_with_the_reason() {
    let mut cluster = Cluster::build(ClusterSpec::new(1, vec![PodSpec::new("client", 1)])).unwrap();
    std::fs::write(
        &cluster.node(1).state_file,
        "workloads:\n  - name: a\n    ips: 7\n",
    )
    .unwrap();
    let err = cluster.start_tunnel(1).unwrap_err().to_string();
    let path = cluster.node(1).state_file.display().to_string();
    assert!(err.contains("exited with exit status: 1"), "{err}");
    assert!(err.contains(&format!("{path}:3:")), "{err}");
}

#[test]
fn a_local_pod_whose_namespace_is_missing_makes_the_tunnel_unready_and_the_rest_keeps_working() {
    let mut cluster = cluster();
    let mut state = std::fs::read_to_string(&cluster.node(2).state_file).unwrap();
    state = state.replacen(
        "services:",
        "  - name: ghost\n    namespace: default\n    ips: [10.10.2.200]\n    node: node2\n    netns: /run/netns/does-not-exist\nservices:",
        1,
    );
    std::fs::write(&cluster.node(2).state_file, state).unwrap();
    wait_for_log(&cluster, 2, "reloaded state file");
    let mut readiness = (0, String::new());
    for _ in 0..50 {
        readiness = cluster.node(2).http_get(15021, "/healthz/ready").unwrap();
        if readiness.0 == 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(readiness.0, 503, "{readiness:?}");
    assert!(
        readiness.1.contains("default/ghost") && readiness.1.contains("/run/netns/does-not-exist"),
        "{readiness:?}"
    );
    let (status, dump) = cluster.node(2).http_get(15000, "/config_dump").unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(
        dump["pods"]["running"],
        serde_json::json!(["default/other", "default/server"])
    );
    assert!(
        dump["pods"]["failed"]["default/ghost"]
            .as_str()
            .unwrap()
            .contains("cannot open network namespace")
    );
    // The healthy pods are untouched.
    let url = format!("http://{}/echo/still-served", target(&cluster, "server"));
    let out = cluster.curl_socks("client", &url, &[]).unwrap();
    assert_eq!(out.stdout, "server saw still-served\n");
    cluster.wait_ready(1, Duration::from_secs(1)).unwrap();
}

#[test]
fn the_log_level_changes_at_run_time_and_a_bad_filter_is_refused() {
    let cluster = cluster();
    let node = cluster.node(1);
    let set = |level: &str| {
        let out = node
            .netns
            .command("curl")
            .args([
                "-s",
                "-g",
                "-X",
                "POST",
                "-w",
                "\n%{http_code}",
                &format!("http://127.0.0.1:15000/logging?level={level}"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bad = set("nonsense=[[");
    assert!(
        bad.ends_with("400") && bad.contains("bad log filter"),
        "{bad}"
    );
    assert!(set("debug").ends_with("200"));
    assert_eq!(
        node.http_get(15000, "/logging").unwrap(),
        (200, "debug\n".to_owned())
    );
    let url = format!("http://{}/echo/x", target(&cluster, "server"));
    cluster.curl_socks("client", &url, &[]).unwrap();
    wait_for_log(&cluster, 1, "\"level\":\"DEBUG\"");
}
