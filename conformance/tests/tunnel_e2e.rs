//! End to end through two tunnels on two simulated nodes: real ztunnel, real curl, real TLS.

use std::time::Duration;

use conformance::cluster::wait_for_port;
use conformance::metrics::sum;
use conformance::{Cluster, ClusterSpec, PodSpec};

const TD: &str = "cluster.local";

/// client on node 1, server on node 2 (both enrolled), plain on node 2 (outside the mesh).
fn two_nodes() -> Cluster {
    let spec = ClusterSpec::new(
        2,
        vec![
            PodSpec::new("client", 1),
            PodSpec::new("server", 2),
            PodSpec::new("plain", 2).outside_mesh(),
        ],
    );
    let mut cluster = Cluster::build(spec).expect("build the cluster");
    let app = conformance::binary("weft-testapp");
    for pod in ["server", "plain"] {
        cluster
            .spawn_in(pod, &app, &["http", "--port", "8080", "--name", pod])
            .unwrap();
        let p = cluster.pod(pod);
        wait_for_port(&p.netns, p.ip, 8080, Duration::from_secs(10)).unwrap();
    }
    cluster.start_tunnels().expect("tunnels start");
    cluster
}

/// curl through the client pod's SOCKS5 entry; returns (stdout, exit code).
fn curl_socks(cluster: &Cluster, url: &str, extra: &[&str]) -> (String, i32) {
    let mut args = vec!["-sS", "--max-time", "20", "--socks5", "127.0.0.1:15080"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = cluster.run_in("client", "curl", &args).unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (text, out.status.code().unwrap_or(-1))
}

#[test]
fn curl_reaches_a_pod_on_another_node_through_both_tunnels_with_mtls() {
    let cluster = two_nodes();
    let server = cluster.pod("server");
    let client = cluster.pod("client");
    let url = format!("http://{}:8080/echo/hello-mesh", server.ip);
    let (out, code) = curl_socks(
        &cluster,
        &url,
        &["-w", "\n%{size_request} %{size_header} %{size_download}"],
    );
    assert_eq!(
        code,
        0,
        "curl failed: {out}\nnode1:\n{}\nnode2:\n{}",
        cluster.node(1).log(),
        cluster.node(2).log()
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("server saw hello-mesh"));
    let sizes: Vec<f64> = lines
        .rfind(|l| !l.is_empty())
        .unwrap()
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    let (request, response) = (sizes[0], sizes[1] + sizes[2]);

    // Server side saw the client's SPIFFE ID.
    let client_id = client.identity(TD);
    let server_id = server.identity(TD);
    let dst_metrics = cluster.node(2).metrics().unwrap();
    let labels = [
        ("reporter", "destination"),
        ("source_principal", client_id.as_str()),
        ("destination_principal", server_id.as_str()),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        sum(&dst_metrics, "weft_tcp_connections_opened_total", &labels),
        1.0
    );
    assert_eq!(
        sum(&dst_metrics, "weft_tcp_received_bytes_total", &labels),
        request
    );
    assert_eq!(
        sum(&dst_metrics, "weft_tcp_sent_bytes_total", &labels),
        response
    );

    let src_metrics = cluster.node(1).metrics().unwrap();
    let labels = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "server"),
        ("destination_principal", server_id.as_str()),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        sum(&src_metrics, "weft_tcp_connections_opened_total", &labels),
        1.0
    );
    assert_eq!(
        sum(&src_metrics, "weft_tcp_received_bytes_total", &labels),
        request
    );
    assert_eq!(
        sum(&src_metrics, "weft_tcp_sent_bytes_total", &labels),
        response
    );

    // Closed once both directions ended; the access log says the same.
    std::thread::sleep(Duration::from_millis(300));
    let dst_metrics = cluster.node(2).metrics().unwrap();
    assert_eq!(
        sum(
            &dst_metrics,
            "weft_tcp_connections_closed_total",
            &[("reporter", "destination"), ("response_flags", "-")]
        ),
        1.0
    );
    let logs = cluster.node(2).access_logs();
    let entry = logs
        .iter()
        .find(|l| l["src.identity"] == client_id.as_str())
        .expect("access log of the connection");
    assert_eq!(entry["bytes_received"].as_f64(), Some(request));
    assert_eq!(entry["bytes_sent"].as_f64(), Some(response));
}
