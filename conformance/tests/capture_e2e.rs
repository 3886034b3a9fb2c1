//! Transparent capture end to end: real `weft-redirect` (eBPF), real `ztunnel` per node, and an
//! unmodified `curl` (no SOCKS, no environment variable) in the pods.

use std::time::Duration;

use conformance::load::http_echo;
use conformance::metrics::sum;
use conformance::pcap;
use conformance::{Cluster, ClusterSpec, PodSpec};

const TD: &str = "cluster.local";

/// client and outsider on node 1 (only client enrolled), server (mesh) and plain (outside the
/// mesh) on node 2, HTTP servers on 8080, tunnels and capture running.
fn cluster() -> Cluster {
    let spec = ClusterSpec::new(
        2,
        vec![
            PodSpec::new("client", 1),
            PodSpec::new("outsider", 1).outside_mesh(),
            PodSpec::new("server", 2),
            PodSpec::new("plain", 2).outside_mesh(),
        ],
    );
    let mut cluster = Cluster::with_http(spec, &["server", "plain"]).expect("build the cluster");
    cluster
        .start_capture(&["client", "server"])
        .expect("capture starts");
    cluster
}

/// Plain curl in `pod`: (stdout, success).
fn curl(cluster: &Cluster, pod: &str, url: &str) -> (String, bool) {
    let out = cluster
        .run_in(pod, "curl", &["-sS", "--max-time", "10", url])
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        out.status.success(),
    )
}

#[test]
fn an_unmodified_client_is_carried_through_both_tunnels_with_mtls() {
    let cluster = cluster();
    let (mut tcpdump, pcap) = cluster.capture_link(2, "transparent").unwrap();
    let secret = "transparent-secret-93af";
    let server = cluster.pod("server").ip;
    let (out, ok) = curl(
        &cluster,
        "client",
        &format!("http://{server}:8080/echo/{secret}"),
    );
    assert!(ok, "{out}\nnode1:\n{}", cluster.node(1).log());
    assert_eq!(out, format!("server saw {secret}\n"));
    std::thread::sleep(Duration::from_millis(300));
    tcpdump.stop(Duration::from_secs(5));

    let client_id = cluster.pod("client").identity(TD);
    assert_eq!(cluster.node(2).meshed_from(&client_id).unwrap(), 1.0);
    assert!(
        !pcap::contains(&pcap, secret.as_bytes()).unwrap(),
        "mesh payload crossed the link in plaintext"
    );
    assert!(
        pcap::contains(&pcap, pcap::TLS_APPLICATION_DATA).unwrap(),
        "no TLS application data on the link"
    );
}

#[test]
fn an_enrolled_pod_reaches_a_non_mesh_server_by_passthrough() {
    let cluster = cluster();
    let plain = cluster.pod("plain").ip;
    let (out, ok) = curl(
        &cluster,
        "client",
        &format!("http://{plain}:8080/echo/passthrough"),
    );
    assert!(ok, "{out}");
    assert_eq!(out, "plain saw passthrough\n");
    let metrics = cluster.node(1).metrics().unwrap();
    let labels = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "plain"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(
        sum(&metrics, "weft_tcp_connections_opened_total", &labels),
        1.0
    );
}

/// The outsider is not enrolled: its connect is not captured (its node's tunnel sees nothing),
/// and as a plaintext client from outside the mesh it lands on the enrolled server's plaintext
/// inbound listener (15006, steered by sk_lookup), which the server's tunnel reports.
#[test]
fn a_pod_that_is_not_enrolled_connects_directly_and_lands_on_the_servers_plaintext_inbound() {
    let cluster = cluster();
    let server = cluster.pod("server").ip;
    let (out, ok) = curl(
        &cluster,
        "outsider",
        &format!("http://{server}:8080/echo/direct"),
    );
    assert!(ok, "{out}");
    assert_eq!(out, "server saw direct\n");
    let metrics = cluster.node(1).metrics().unwrap();
    assert_eq!(
        sum(&metrics, "weft_tcp_connections_opened_total", &[]),
        0.0,
        "the client node's tunnel saw nothing"
    );
    let inbound = [
        ("reporter", "destination"),
        ("source_workload", "outsider"),
        ("destination_workload", "server"),
        ("connection_security_policy", "none"),
    ];
    let metrics = cluster.node(2).metrics().unwrap();
    assert_eq!(
        sum(&metrics, "weft_tcp_connections_opened_total", &inbound),
        1.0,
        "the server's tunnel took the plaintext connection on 15006"
    );
    cluster
        .node(2)
        .wait_for_log("\"src.workload\":\"outsider\"");
    let logs = cluster.node(2).access_logs();
    assert!(
        logs.iter().any(|l| l["src.workload"] == "outsider"
            && l["security"] == "none"
            && l["dst.addr"] == format!("Some({server}:8080)")),
        "access log of the inbound plaintext connection with its original destination: {logs:?}"
    );
}

/// With the server's tunnel stopped, a plaintext client reaching the enrolled server is
/// refused (its listener left capture's map when it closed): nothing reaches the application
/// around the tunnel.
#[test]
fn with_the_servers_tunnel_stopped_inbound_plaintext_is_refused() {
    let mut cluster = cluster();
    let server = cluster.pod("server").ip;
    let (out, ok) = curl(
        &cluster,
        "outsider",
        &format!("http://{server}:8080/echo/before"),
    );
    assert!(ok, "{out}");
    let exit = cluster.nodes[1]
        .tunnel
        .as_mut()
        .unwrap()
        .stop(Duration::from_secs(15));
    assert!(exit.is_some_and(|s| s.success()), "tunnel exit: {exit:?}");
    let (out, ok) = curl(
        &cluster,
        "outsider",
        &format!("http://{server}:8080/echo/after"),
    );
    assert!(!ok, "reached the application without its tunnel: {out}");
    assert!(
        out.contains("Connection refused") || out.contains("Couldn't connect"),
        "{out}"
    );
    // Another pod of that node, not enrolled, still answers directly.
    let plain = cluster.pod("plain").ip;
    let (out, ok) = curl(
        &cluster,
        "outsider",
        &format!("http://{plain}:8080/echo/still"),
    );
    assert!(ok && out == "plain saw still\n", "{out}");
}

#[test]
fn with_the_tunnel_stopped_enrolled_connections_are_refused_never_sent_in_plaintext() {
    let mut cluster = cluster();
    let exit = cluster.nodes[0]
        .tunnel
        .as_mut()
        .unwrap()
        .stop(Duration::from_secs(15));
    assert!(exit.is_some_and(|s| s.success()), "tunnel exit: {exit:?}");
    let (mut tcpdump, pcap) = cluster.capture_link(1, "fail-closed").unwrap();
    let secret = "must-not-leak-5e1d";
    let server = cluster.pod("server").ip;
    let (out, ok) = curl(
        &cluster,
        "client",
        &format!("http://{server}:8080/echo/{secret}"),
    );
    assert!(
        !ok,
        "an enrolled connection went out without the tunnel: {out}"
    );
    assert!(
        out.contains("Connection refused") || out.contains("Couldn't connect"),
        "{out}"
    );
    std::thread::sleep(Duration::from_millis(300));
    tcpdump.stop(Duration::from_secs(5));
    assert!(
        !pcap::contains(&pcap, secret.as_bytes()).unwrap(),
        "plaintext left the pod"
    );
    let leaked = pcap::packets(&pcap, "tcp port 8080").unwrap();
    assert!(
        leaked.trim().is_empty(),
        "packets to the application port left the node:\n{leaked}"
    );
    // The pod that is not enrolled is unaffected.
    let (out, ok) = curl(
        &cluster,
        "outsider",
        &format!("http://{server}:8080/echo/still-direct"),
    );
    assert!(ok && out == "server saw still-direct\n", "{out}");
}

#[test]
fn an_unmodified_client_is_carried_over_ipv6_too() {
    let cluster = cluster();
    let server = cluster.pod("server").ip6;
    let (out, ok) = curl(
        &cluster,
        "client",
        &format!("http://[{server}]:8080/echo/ipv6-transparent"),
    );
    assert!(ok, "{out}\nnode1:\n{}", cluster.node(1).log());
    assert_eq!(out, "server saw ipv6-transparent\n");
    let client_id = cluster.pod("client").identity(TD);
    assert_eq!(cluster.node(2).meshed_from(&client_id).unwrap(), 1.0);
}

#[test]
fn enrolling_and_unenrolling_a_live_pod_takes_effect_for_the_next_connection() {
    let cluster = Cluster::client_server(&[]).unwrap();
    let url = format!("http://{}:8080/echo/live", cluster.pod("server").ip);
    let meshed = |c: &Cluster| {
        sum(
            &c.node(1).metrics().unwrap(),
            "weft_tcp_connections_opened_total",
            &[("reporter", "source")],
        )
    };

    let (out, ok) = curl(&cluster, "client", &url);
    assert!(ok && out == "server saw live\n", "{out}");
    assert_eq!(meshed(&cluster), 0.0, "not enrolled yet: direct");

    let capture = cluster.spawn_capture(&["client"], false).unwrap();
    let (out, ok) = curl(&cluster, "client", &url);
    assert!(ok && out == "server saw live\n", "{out}");
    assert_eq!(
        meshed(&cluster),
        1.0,
        "enrolled: the next connection is meshed"
    );

    drop(capture);
    let (out, ok) = curl(&cluster, "client", &url);
    assert!(ok && out == "server saw live\n", "{out}");
    assert_eq!(meshed(&cluster), 1.0, "unenrolled: direct again");
}

#[test]
fn a_gibibyte_through_the_fast_path_arrives_intact() {
    let cluster = Cluster::client_server(&[]).unwrap();
    let _capture = cluster.spawn_capture(&["client", "server"], true).unwrap();
    let server = cluster.pod("server").ip;
    let (size, seed) = (1u64 << 30, 11);
    let script = format!(
        "curl -sS --max-time 240 http://{server}:8080/bytes/{size}?seed={seed} | sha256sum"
    );
    let out = cluster.run_in("client", "sh", &["-c", &script]).unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    let expected = conformance::pattern::sha256_hex(seed, size);
    assert_eq!(
        got.split_whitespace().next(),
        Some(expected.as_str()),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client_id = cluster.pod("client").identity(TD);
    assert_eq!(cluster.node(2).meshed_from(&client_id).unwrap(), 1.0);
}

/// The capture loader is stopped and a new one takes over while an unmodified client keeps
/// opening connections and one long connection stays in use: no connection fails, every one
/// is meshed, and the long connection carries on.
#[test]
fn restarting_the_capture_loader_under_load_fails_no_connection() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    let mut cluster = cluster();
    let server = cluster.pod("server").ip;
    let target = std::net::SocketAddr::from((server, 8080));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU32::new(0));
    let load = {
        let (stop, done) = (stop.clone(), done.clone());
        cluster.pod("client").netns.spawn_in(move || {
            let timeout = Some(Duration::from_secs(5));
            let mut long = std::net::TcpStream::connect(target).map_err(|e| format!("{e}"))?;
            long.set_read_timeout(timeout).map_err(|e| format!("{e}"))?;
            let (mut failures, mut long_uses) = (Vec::new(), 0u32);
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let text = format!("n{n}");
                n += 1;
                let answer = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))
                    .and_then(|mut s| {
                        s.set_read_timeout(timeout)?;
                        http_echo(&mut s, &text)
                    });
                match answer {
                    Ok(body) if body == format!("server saw {text}\n") => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.push(format!("{text}: {other:?}")),
                }
                if n.is_multiple_of(10) {
                    match http_echo(&mut long, "long") {
                        Ok(body) if body == "server saw long\n" => long_uses += 1,
                        other => failures.push(format!("long connection: {other:?}")),
                    }
                }
            }
            Ok::<_, String>((failures, long_uses))
        })
    };
    // Wait for load before the restart and after it, whatever the machine's pace.
    let wait_for = |count: u32| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while done.load(Ordering::Relaxed) < count {
            assert!(
                std::time::Instant::now() < deadline,
                "load stalled at {count}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(10);
    cluster.captures[0]
        .restart()
        .expect("a new loader takes over");
    let at_restart = done.load(Ordering::Relaxed);
    wait_for(at_restart + 20);
    stop.store(true, Ordering::Relaxed);
    let (failures, long_uses) = load
        .join()
        .unwrap()
        .unwrap()
        .expect("the long connection opens");
    let done = done.load(Ordering::Relaxed);
    assert!(failures.is_empty(), "failed: {failures:?}");
    assert!(
        long_uses >= 2,
        "the long connection was used {long_uses} times"
    );
    let meshed = cluster
        .node(2)
        .meshed_from(&format!("spiffe://{TD}/ns/default/sa/client"))
        .unwrap();
    assert_eq!(
        meshed,
        f64::from(done) + 1.0,
        "every connection (and the long one) went through the mesh"
    );
}

/// Tunnels whose sockets carry no mark: only their cgroup keeps capture off them. The server
/// tunnel's connection to the application inside the server pod, and the client tunnel's
/// passthrough from inside the client pod, would otherwise be captured back into the tunnel.
#[test]
fn the_tunnels_own_connections_are_never_captured_even_without_their_mark() {
    let mut spec = ClusterSpec::new(
        2,
        vec![
            PodSpec::new("client", 1),
            PodSpec::new("server", 2),
            PodSpec::new("plain", 2).outside_mesh(),
        ],
    );
    spec.tunnel_args = vec!["--socket-mark".into(), "0".into()];
    let mut cluster = Cluster::with_http(spec, &["server", "plain"]).unwrap();
    cluster.start_capture(&["client", "server"]).unwrap();
    let server = cluster.pod("server").ip;
    let (out, ok) = curl(
        &cluster,
        "client",
        &format!("http://{server}:8080/echo/mesh"),
    );
    assert!(ok && out == "server saw mesh\n", "{out}");
    let meshed = cluster
        .node(2)
        .meshed_from(&format!("spiffe://{TD}/ns/default/sa/client"))
        .unwrap();
    assert_eq!(meshed, 1.0);
    let plain = cluster.pod("plain").ip;
    let (out, ok) = curl(&cluster, "client", &format!("http://{plain}:8080/echo/out"));
    assert!(ok && out == "plain saw out\n", "{out}");
}
