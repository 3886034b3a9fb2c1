//! End to end through two tunnels on two simulated nodes: real ztunnel, real curl, real TLS.

use std::time::Duration;

use conformance::metrics::sum;
use conformance::pcap;
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
    Cluster::with_http(spec, &["server", "plain"]).expect("build the cluster")
}

/// curl through the client pod's SOCKS5 entry; returns (stdout, exit code).
fn curl_socks(cluster: &Cluster, url: &str, extra: &[&str]) -> (String, i32) {
    let curl = cluster.curl_socks("client", url, extra).unwrap();
    (curl.stdout + &curl.stderr, if curl.success { 0 } else { 1 })
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
    // The tunnel chose its crypto from this CPU's features (read here from /proc/cpuinfo, not
    // the way the tunnel reads them) and said so; it busy-polls by default.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap()
        .split_whitespace()
        .collect();
    let wide_aes = ["aes", "vaes", "vpclmulqdq", "avx512f", "avx512vl"]
        .iter()
        .all(|f| flags.contains(f));
    let expected = if wide_aes { "aws-lc-rs" } else { "ring" };
    let log = cluster
        .node(1)
        .wait_for_log(&format!("crypto provider {expected}:"));
    assert!(log.contains("busy polling: after traffic"), "{log}");
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
    cluster.node(2).wait_for_log("connection complete");
    let logs = cluster.node(2).access_logs();
    let entry = logs
        .iter()
        .find(|l| l["src.identity"] == client_id.as_str())
        .expect("access log of the connection");
    assert_eq!(entry["bytes_received"].as_f64(), Some(request));
    assert_eq!(entry["bytes_sent"].as_f64(), Some(response));
}

#[test]
fn the_link_between_nodes_carries_tls_only() {
    let cluster = two_nodes();
    let (mut tcpdump, pcap) = cluster.capture_link(2, "link").unwrap();
    let secret = "meshsecret-7f3a9c";
    let visible = "plaintoken-51d2e8";
    let server = cluster.pod("server").ip;
    let plain = cluster.pod("plain").ip;
    let (out, code) = curl_socks(
        &cluster,
        &format!("http://{server}:8080/echo/{secret}"),
        &[],
    );
    assert_eq!(
        (out.as_str(), code),
        (format!("server saw {secret}\n").as_str(), 0)
    );
    // Control: the same capture does see plaintext when the destination is outside the mesh.
    let (out, code) = curl_socks(
        &cluster,
        &format!("http://{plain}:8080/echo/{visible}"),
        &[],
    );
    assert_eq!(
        (out.as_str(), code),
        (format!("plain saw {visible}\n").as_str(), 0)
    );
    std::thread::sleep(Duration::from_millis(300));
    tcpdump.stop(Duration::from_secs(5));

    let summary = pcap::packets(&pcap, "").unwrap_or_default();
    assert!(
        pcap::contains(&pcap, visible.as_bytes()).unwrap(),
        "the capture must see passthrough plaintext:\n{summary}\n{}",
        tcpdump.output()
    );
    assert!(
        !pcap::contains(&pcap, secret.as_bytes()).unwrap(),
        "mesh payload crossed the link in plaintext"
    );
    let hbone = pcap::packets(&pcap, "tcp port 15008 and greater 100").unwrap();
    assert!(
        hbone.lines().count() >= 4,
        "expected HBONE traffic on 15008:\n{hbone}"
    );
    // TLS 1.3 application data records (type 23, legacy version 3.3) carry the payload.
    assert!(
        pcap::contains(&pcap, pcap::TLS_APPLICATION_DATA).unwrap(),
        "no TLS application data record in the capture"
    );
}

#[test]
fn a_gibibyte_arrives_intact() {
    let cluster = two_nodes();
    let server = cluster.pod("server").ip;
    let size: u64 = 1 << 30;
    let seed = 7;
    let script = format!(
        "curl -sS --max-time 240 --socks5 127.0.0.1:15080 http://{server}:8080/bytes/{size}?seed={seed} | sha256sum"
    );
    let out = cluster.run_in("client", "sh", &["-c", &script]).unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    let expected = conformance::pattern::sha256_hex(seed, size);
    assert_eq!(
        got.split_whitespace().next(),
        Some(expected.as_str()),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = cluster.node(2).metrics().unwrap();
    let sent = sum(
        &metrics,
        "weft_tcp_sent_bytes_total",
        &[("reporter", "destination")],
    );
    assert!(
        sent > size as f64,
        "server tunnel counted {sent} bytes sent, less than the body"
    );
}

#[test]
fn a_thousand_concurrent_connections_share_a_handful_of_tls_connections() {
    const N: usize = 1000;
    let mut cluster = two_nodes();
    cluster
        .start_app("server", &["echo", "--port", "9000"], 9000)
        .unwrap();
    let server = cluster.pod("server");
    let server_ip = server.ip;
    let client_ns = cluster.pod("client").netns.name.clone();
    let (held_tx, held_rx) = std::sync::mpsc::channel::<usize>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let worker = cluster
        .pod("client")
        .netns
        .run_in(move || {
            std::thread::spawn(move || {
                conformance::load::hold_echo_connections(N, server_ip, 9000, held_tx, release_rx)
            })
        })
        .unwrap();
    let ok = held_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("connections opened");
    assert_eq!(ok, N, "every connection echoed through the mesh");
    let ss = conformance::netns::run(&[
        "ip",
        "netns",
        "exec",
        &client_ns,
        "ss",
        "-Htn",
        "state",
        "established",
        "dst",
        &format!("{server_ip}:15008"),
    ])
    .unwrap();
    let tls_connections = ss.lines().count();
    let metrics = cluster.node(1).metrics().unwrap();
    let gauge = sum(&metrics, "weft_hbone_pool_connections", &[]);
    let opened = sum(
        &metrics,
        "weft_tcp_connections_opened_total",
        &[("reporter", "source")],
    );
    release_tx.send(()).unwrap();
    worker.join().unwrap().unwrap();
    println!("{N} connections over {tls_connections} TLS connections");
    assert!(
        (1..=10).contains(&tls_connections),
        "{tls_connections} TLS connections for {N} streams:\n{ss}"
    );
    assert_eq!(
        gauge as usize, tls_connections,
        "the pool gauge agrees with the kernel"
    );
    assert_eq!(opened as usize, N);
}

#[test]
fn sigterm_drains_live_connections_before_exiting() {
    let mut cluster = two_nodes();
    let server = cluster.pod("server").ip;
    // A 4 MiB download at 1 MiB/s: still running when the client's tunnel gets SIGTERM.
    let mut curl = cluster
        .pod("client")
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "--limit-rate",
            "1M",
            "--socks5",
            "127.0.0.1:15080",
        ])
        .arg(format!("http://{server}:8080/bytes/4194304?seed=3"))
        .arg("-o")
        .arg(cluster.dir.path().join("download"))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let tunnel = cluster.nodes[0].tunnel.as_ref().unwrap();
    tunnel.signal(nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    // Draining: new connections are not accepted any more.
    let refused = cluster
        .run_in(
            "client",
            "curl",
            &[
                "-sS",
                "--max-time",
                "3",
                "--socks5",
                "127.0.0.1:15080",
                &format!("http://{server}:8080/echo/late"),
            ],
        )
        .unwrap();
    assert!(
        !refused.status.success(),
        "a new connection was accepted while draining"
    );
    let status = curl.wait().unwrap();
    assert!(
        status.success(),
        "the live download was cut by the shutdown"
    );
    let len = std::fs::metadata(cluster.dir.path().join("download"))
        .unwrap()
        .len();
    assert_eq!(len, 4 << 20);
    let exit = cluster.nodes[0]
        .tunnel
        .as_mut()
        .unwrap()
        .stop(Duration::from_secs(15));
    assert!(exit.is_some_and(|s| s.success()), "tunnel exit: {exit:?}");
    assert!(cluster.node(1).log().contains("all connections drained"));
}

#[test]
fn certificates_renew_at_half_life_without_dropping_connections() {
    let spec = ClusterSpec {
        tunnel_args: vec!["--cert-lifetime".into(), "3s".into()],
        ..ClusterSpec::new(
            2,
            vec![PodSpec::new("client", 1), PodSpec::new("server", 2)],
        )
    };
    let mut cluster = Cluster::build(spec).unwrap();
    cluster
        .start_app("server", &["echo", "--port", "9000"], 9000)
        .unwrap();
    let server = cluster.pod("server");
    let target = std::net::SocketAddr::from((server.ip, 9000));
    cluster.start_tunnels().unwrap();
    // One connection lives through several renewals of both ends' certificates, echoing
    // every 500 ms; new connections made after the first certificates expired also work.
    let result = cluster
        .pod("client")
        .netns
        .block_on(move || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut long = conformance::load::socks_connect(target).await?;
            for i in 0..14 {
                let msg = format!("tick {i:02}");
                long.write_all(msg.as_bytes()).await?;
                let mut back = vec![0u8; msg.len()];
                long.read_exact(&mut back).await?;
                anyhow::ensure!(back == msg.as_bytes());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let mut fresh = conformance::load::socks_connect(target).await?;
            fresh.write_all(b"fresh").await?;
            let mut back = [0u8; 5];
            fresh.read_exact(&mut back).await?;
            anyhow::ensure!(&back == b"fresh");
            anyhow::Ok(())
        })
        .unwrap();
    result.unwrap_or_else(|e| panic!("{e:#}\nnode1:\n{}", cluster.node(1).log()));
    for node in [1, 2] {
        let renewals = cluster
            .node(node)
            .log()
            .matches("renewed workload certificate")
            .count();
        assert!(
            renewals >= 3,
            "node{node} renewed {renewals} times in 7 s with a 3 s lifetime"
        );
        // The same, as metrics: renewals counted, and the expiry of the current certificate
        // of the pod's identity, a few seconds ahead.
        let metrics = cluster.node(node).metrics().unwrap();
        let counted = sum(
            &metrics,
            "weft_certificate_renewals_total",
            &[("result", "success")],
        );
        assert!(
            counted >= 3.0,
            "node{node}: {counted} renewals counted\n{metrics:?}"
        );
        let pod = if node == 1 { "client" } else { "server" };
        let identity = cluster.pod(pod).identity(TD);
        let expires = sum(
            &metrics,
            "weft_certificate_expiration_timestamp_seconds",
            &[("identity", identity.as_str())],
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            expires > now - 1.0 && expires < now + 4.0,
            "node{node}: {identity} expires at {expires}, now {now}\n{metrics:?}"
        );
    }
}

#[test]
fn an_unmodified_client_redirected_to_15001_is_carried_with_its_original_destination() {
    // Before eBPF capture exists, an nftables redirect in the client pod stands in for it: the
    // tunnel reads SO_ORIGINAL_DST. Its own sockets carry mark 0x539 and are left alone.
    let cluster = two_nodes();
    let rules = "table ip weft {\n  chain out {\n    type nat hook output priority -100; policy accept;\n    meta mark 0x539 return\n    ip daddr 127.0.0.0/8 return\n    tcp dport 8080 redirect to :15001\n  }\n}\n";
    let file = cluster.dir.path().join("capture.nft");
    std::fs::write(&file, rules).unwrap();
    let out = cluster
        .run_in("client", "nft", &["-f", file.to_str().unwrap()])
        .unwrap();
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = cluster.pod("server").ip;
    let out = cluster
        .run_in(
            "client",
            "curl",
            &[
                "-sS",
                "--max-time",
                "10",
                &format!("http://{server}:8080/echo/captured"),
            ],
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "server saw captured\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client_id = cluster.pod("client").identity(TD);
    assert_eq!(cluster.node(2).meshed_from(&client_id).unwrap(), 1.0);
    // A direct connection to the outbound port (not redirected) is refused, not looped.
    let out = cluster
        .run_in(
            "client",
            "curl",
            &["-sS", "--max-time", "3", "http://127.0.0.1:15001/"],
        )
        .unwrap();
    assert!(!out.status.success());
    cluster.node(1).wait_for_log("not redirected");
}

#[test]
fn idle_pooled_connections_are_closed_after_the_idle_timeout() {
    let cluster = Cluster::client_server(&["--pool-idle-timeout", "1s"]).unwrap();
    let (out, code) = curl_socks(
        &cluster,
        &format!("http://{}:8080/echo/once", cluster.pod("server").ip),
        &[],
    );
    assert_eq!(code, 0, "{out}");
    let gauge = |c: &Cluster| {
        sum(
            &c.node(1).metrics().unwrap(),
            "weft_hbone_pool_connections",
            &[],
        )
    };
    assert_eq!(
        gauge(&cluster),
        1.0,
        "the connection stays pooled after use"
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(gauge(&cluster), 0.0, "idle for longer than 1 s: closed");
}

#[test]
fn the_same_path_works_over_ipv6() {
    let cluster = two_nodes();
    let server = cluster.pod("server").ip6;
    let (out, code) = curl_socks(
        &cluster,
        &format!("http://[{server}]:8080/echo/over-ipv6"),
        &[],
    );
    assert_eq!(
        (out.as_str(), code),
        ("server saw over-ipv6\n", 0),
        "node1:\n{}",
        cluster.node(1).log()
    );
    let client_id = cluster.pod("client").identity(TD);
    assert_eq!(cluster.node(2).meshed_from(&client_id).unwrap(), 1.0);
    let ss = cluster
        .run_in(
            "client",
            "ss",
            &[
                "-Htn",
                "state",
                "established",
                "dst",
                &format!("[{server}]:15008"),
            ],
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ss.stdout).lines().count(),
        1,
        "one HBONE connection over IPv6"
    );
}

/// Two pods on one node, client and server, with the tunnel's extra arguments.
fn same_node(tunnel_args: &[&str]) -> Cluster {
    let spec = ClusterSpec {
        tunnel_args: tunnel_args.iter().map(|a| (*a).to_owned()).collect(),
        ..ClusterSpec::new(
            1,
            vec![PodSpec::new("client", 1), PodSpec::new("server", 1)],
        )
    };
    Cluster::with_http(spec, &["server"]).unwrap()
}

/// What node 1's tunnel counted for client -> server: (source-side opened, destination-side
/// opened with the client's identity, HBONE pool connections).
fn same_node_counts(cluster: &Cluster) -> (f64, f64, f64) {
    let metrics = cluster.node(1).metrics().unwrap();
    let pair = [
        ("source_workload", "client"),
        ("destination_workload", "server"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let with = |reporter: &'static str, extra: &[(&'static str, &str)]| {
        let mut labels = vec![("reporter", reporter)];
        labels.extend_from_slice(&pair);
        labels.extend_from_slice(extra);
        sum(&metrics, "weft_tcp_connections_opened_total", &labels)
    };
    let principal = "spiffe://cluster.local/ns/default/sa/client";
    (
        with("source", &[]),
        with("destination", &[("source_principal", principal)]),
        sum(&metrics, "weft_hbone_pool_connections", &[]),
    )
}

/// Pods on the same node are connected in process: both sides are reported as over HBONE, but
/// no TLS connection is opened (the pool stays empty). With the shortcut off, the same request
/// goes through TLS to the server pod's 15008.
#[test]
fn pods_on_one_node_are_connected_in_process_unless_the_shortcut_is_off() {
    let cluster = same_node(&[]);
    let url = format!("http://{}:8080/echo/local", cluster.pod("server").ip);
    let curl = cluster.curl_socks("client", &url, &[]).unwrap();
    assert!(
        curl.success && curl.stdout == "server saw local\n",
        "{curl:?}"
    );
    assert_eq!(same_node_counts(&cluster), (1.0, 1.0, 0.0));

    let cluster = same_node(&["--same-node-shortcut", "false"]);
    let url = format!("http://{}:8080/echo/hbone", cluster.pod("server").ip);
    let curl = cluster.curl_socks("client", &url, &[]).unwrap();
    assert!(
        curl.success && curl.stdout == "server saw hbone\n",
        "{curl:?}"
    );
    assert_eq!(same_node_counts(&cluster), (1.0, 1.0, 1.0));
}
