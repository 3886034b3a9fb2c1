//! Flow events at the source, on the demo's cluster (examples/): the server's tunnel streams
//! each HTTP request to `web` (`/flows?to_pod=shop/web&type=http&follow=true` on its admin
//! endpoint) within a second, a refused `POST` with its 403 and the policy that decided; a
//! filter that matches nothing gets nothing; `weft observe` over both nodes prints them, and
//! merges both nodes' events in time order; a subscriber that never reads loses events (and is
//! told how many) while every request still goes through.

use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use conformance::Cluster;
use conformance::process::Process;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `curl` from the demo's `shopper` pod: what it printed.
fn curl_from_shopper(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster.run_in("shopper", "curl", args).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The demo's cluster, meshed: a first request went through (the agents and tunnels settled)
/// before anything is watched.
fn meshed_demo() -> Cluster {
    let cluster = Cluster::from_examples().expect("the demo's cluster starts");
    assert_eq!(
        curl_from_shopper(&cluster, &["-sS", "http://10.96.0.10/echo/warm"]),
        "web saw warm\n"
    );
    cluster
}

/// `curl -sN` of node 2's `/flows` with `query`, left running.
fn follow(cluster: &Cluster, query: &str, name: &str) -> Process {
    let mut cmd = cluster.node(2).netns.command("curl");
    cmd.args(["-sN", &format!("http://127.0.0.1:15000/flows?{query}")]);
    Process::spawn(name, cmd, cluster.dir.path().join(format!("{name}.log"))).unwrap()
}

fn events(process: &Process) -> Vec<serde_json::Value> {
    process
        .output()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn the_servers_tunnel_streams_each_request_with_its_verdict_and_a_stuck_reader_loses_only_its_own()
{
    let cluster = meshed_demo();
    let curl = |args: &[&str]| curl_from_shopper(&cluster, args);

    let web = follow(
        &cluster,
        "to_pod=shop/web&type=http&follow=true",
        "flows-web",
    );
    let nothing = follow(
        &cluster,
        "to_pod=legacy/visitor&type=http&follow=true",
        "flows-nothing",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster.node(2).http_get(15000, "/config_dump").is_err() || events(&web).is_empty() {
        // The ring's warm-up request comes first (no `last`: the whole ring, then live).
        assert!(
            Instant::now() < deadline,
            "the follower connects: {}",
            web.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // `weft observe` over both nodes' tunnels, as a user runs it on the demo's machine.
    let tunnels: Vec<String> = (1..=2)
        .map(|i| format!("127.0.0.1:15000@{}", cluster.node(i).netns.path().display()))
        .collect();
    let weft = |args: &[&str], name: &str| {
        let mut cmd = std::process::Command::new(conformance::binary("weft"));
        cmd.arg("observe");
        for t in &tunnels {
            cmd.args(["--tunnel", t]);
        }
        cmd.args(args);
        Process::spawn(name, cmd, cluster.dir.path().join(format!("{name}.log"))).unwrap()
    };
    let observed = weft(
        &["--to-pod", "shop/web", "--type", "http", "--follow"],
        "weft-observe",
    );
    std::thread::sleep(Duration::from_millis(500));

    let before_get = now_ms();
    assert_eq!(
        curl(&["-sS", "http://10.96.0.10/echo/seen"]),
        "web saw seen\n"
    );
    let after_get = now_ms();
    let code = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "http://10.96.0.10/echo/refused",
    ]);
    let after_post = now_ms();
    assert_eq!(code, "403");

    let deadline = Instant::now() + Duration::from_secs(1);
    let find = |path: &str| {
        events(&web)
            .into_iter()
            .find(|e| e["path"].as_str() == Some(path))
    };
    let (get, post) = loop {
        if let (Some(get), Some(post)) = (find("/echo/seen"), find("/echo/refused")) {
            break (get, post);
        }
        assert!(
            Instant::now() < deadline,
            "both requests streamed within a second:\n{}",
            web.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(get["method"], "GET");
    assert_eq!(get["status"], 200);
    assert_eq!(get["verdict"], "allow");
    assert_eq!(get["source"]["workload"], "shopper");
    assert_eq!(
        get["source"]["identity"],
        "spiffe://cluster.local/ns/shop/sa/shopper"
    );
    assert_eq!(get["destination"]["workload"], "web");
    assert_eq!(get["node"], "node2");
    let t = get["time_ms"].as_u64().unwrap();
    assert!(
        before_get <= t && t <= after_get + 1000,
        "{t} in {before_get}..{after_get}"
    );
    assert_eq!(post["method"], "POST");
    assert_eq!(post["status"], 403);
    assert_eq!(post["verdict"], "deny");
    assert_eq!(post["policy"], "shop/web-read-only");
    assert!(post["time_ms"].as_u64().unwrap() <= after_post + 1000);
    // The command printed both, one aligned line each.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !observed.output().contains("/echo/refused") {
        assert!(
            Instant::now() < deadline,
            "weft observe prints the requests:\n{}",
            observed.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let printed = observed.output();
    let line = |path: &str| {
        printed
            .lines()
            .find(|l| l.contains(path))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        line("/echo/seen").contains("shop/shopper → shop/web")
            && line("/echo/seen").contains("http  allowed  GET"),
        "{printed}"
    );
    assert!(
        line("/echo/refused").contains("denied   POST")
            && line("/echo/refused").contains("403")
            && line("/echo/refused").contains("policy=shop/web-read-only"),
        "{printed}"
    );
    // Both nodes' events of the shopper's flows, merged in time order.
    last_ten_of_both_nodes_in_time_order(weft, "weft-merged");
    nothing_matches(&nothing);

    // A subscriber that never reads: its queue fills and it loses events; the requests all go
    // through meanwhile. Small send buffers in node 2's namespace (where the admin endpoint
    // is), so the kernel does not hold thousands of events for it.
    cluster
        .node(2)
        .netns
        .sysctl("net.ipv4.tcp_wmem", "4096 4096 4096")
        .unwrap();
    let mut stuck = cluster
        .node(2)
        .netns
        .run_in(|| {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            // Small buffers, so the kernel does not hold thousands of events for it.
            socket.set_recv_buffer_size(4096).unwrap();
            socket
                .connect(&std::net::SocketAddr::from(([127, 0, 0, 1], 15000)).into())
                .unwrap();
            let mut stream: std::net::TcpStream = socket.into();
            stream
                .write_all(b"GET /flows?follow=true&last=0 HTTP/1.1\r\nHost: admin\r\n\r\n")
                .unwrap();
            stream
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let burst = 3000;
    let codes = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        &format!("http://10.96.0.10/echo/[1-{burst}]"),
    ]);
    assert_eq!(
        codes.lines().filter(|c| *c == "200").count(),
        burst,
        "every request of the burst went through"
    );
    // Now it reads: what was queued, then, with the next event, how many it lost.
    stuck
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut received = Vec::new();
    drain(&mut stuck, &mut received);
    assert_eq!(
        curl(&["-sS", "http://10.96.0.10/echo/after"]),
        "web saw after\n"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let lost = loop {
        drain(&mut stuck, &mut received);
        let text = String::from_utf8_lossy(&received);
        if let Some(lost) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
            .find_map(|v| v["lost"].as_u64())
        {
            break lost;
        }
        assert!(
            Instant::now() < deadline,
            "the stuck reader is told what it lost"
        );
    };
    // Each request of the burst made one HTTP event at web's tunnel (and its connection's
    // TCP events); the stuck reader could hold only its queue and its socket's buffers.
    eprintln!(
        "the stuck reader lost {lost} events and received {} bytes while {burst} requests went through",
        received.len()
    );
    assert!(lost > 1000, "lost {lost}");
    drop(web);
    drop(nothing);
    drop(observed);
}

/// A follower whose filter matches nothing has printed nothing.
fn nothing_matches(nothing: &Process) {
    assert!(
        nothing.output().trim().is_empty(),
        "a filter that matches nothing prints nothing: {}",
        nothing.output()
    );
}

/// `weft observe --from-pod shop/shopper --last 10 --output json` (without `--follow`), run by
/// `weft`, ends with ten events in time order, of both nodes.
fn last_ten_of_both_nodes_in_time_order(weft: impl Fn(&[&str], &str) -> Process, name: &str) {
    let mut merged = weft(
        &[
            "--from-pod",
            "shop/shopper",
            "--last",
            "10",
            "--output",
            "json",
        ],
        name,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while merged.exited().is_none() {
        assert!(
            Instant::now() < deadline,
            "weft observe without --follow ends"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let merged_events = events(&merged);
    assert_eq!(merged_events.len(), 10, "{}", merged.output());
    let times: Vec<u64> = merged_events
        .iter()
        .map(|e| e["time_ms"].as_u64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "in time order: {times:?}"
    );
    for node in ["node1", "node2"] {
        assert!(
            merged_events.iter().any(|e| e["node"] == node),
            "{node}'s events are among them: {}",
            merged.output()
        );
    }
}

/// Reads what `stream` has until it is quiet for its read timeout.
fn drain(stream: &mut std::net::TcpStream, received: &mut Vec<u8>) {
    let mut buffer = [0u8; 65536];
    while let Ok(n) = stream.read(&mut buffer) {
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..n]);
    }
}

/// Through the controller's relay, as on a cluster: each node's tunnel offers its flows to the
/// controller (authenticated by its node token); one `weft observe --relay` sees both nodes,
/// merged in time order, a denied request with its policy within a second, and a filter that
/// matches nothing prints nothing.
#[test]
fn one_command_through_the_controllers_relay_sees_every_nodes_flows() {
    let cluster = meshed_demo();
    let curl = |args: &[&str]| curl_from_shopper(&cluster, args);
    let relay_nodes = || {
        let out = cluster
            .router
            .command("curl")
            .args(["-sS", "http://127.0.0.1:15010/nodes"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay_nodes() != "node1\nnode2\n" {
        assert!(
            Instant::now() < deadline,
            "both nodes offer their flows to the relay: {:?}\n{}",
            relay_nodes(),
            cluster.ca_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let relay = cluster.relay_source();
    let weft = |args: &[&str], name: &str| {
        let mut cmd = std::process::Command::new(conformance::binary("weft"));
        cmd.args(["observe", "--relay", &relay]).args(args);
        Process::spawn(name, cmd, cluster.dir.path().join(format!("{name}.log"))).unwrap()
    };
    let observed = weft(
        &["--to-pod", "shop/web", "--type", "http", "--follow"],
        "relay-observe",
    );
    let nothing = weft(
        &["--to-pod", "legacy/visitor", "--follow", "--output", "json"],
        "relay-nothing",
    );
    std::thread::sleep(Duration::from_millis(500));
    let code = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "http://10.96.0.10/echo/refused-through-relay",
    ]);
    assert_eq!(code, "403");
    let refused_at = Instant::now();
    while !observed.output().contains("/echo/refused-through-relay") {
        assert!(
            refused_at.elapsed() < Duration::from_secs(1),
            "the relay passes the denied request on within a second:\n{}",
            observed.output()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "printed through the relay {:?} after the 403",
        refused_at.elapsed()
    );
    let printed = observed.output();
    let line = printed
        .lines()
        .find(|l| l.contains("/echo/refused-through-relay"))
        .unwrap_or_default();
    assert!(
        line.contains("shop/shopper → shop/web")
            && line.contains("denied   POST")
            && line.contains("403")
            && line.contains("policy=shop/web-read-only"),
        "{printed}"
    );

    // An Audit policy written while the cluster runs: the requests it matches carry its name,
    // and `--verdict audited` asks for exactly those.
    let audit = "apiVersion: weft.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: web-audit, namespace: shop}\nspec: {selector: {matchLabels: {app: web}}, action: Audit, rules: [{to: [{operation: {paths: [/echo/audited]}}]}]}\n";
    let staged = cluster.dir.path().join("audit.yaml.tmp");
    std::fs::write(&staged, audit).unwrap();
    std::fs::rename(&staged, cluster.manifest_dir().join("audit.yaml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let audited = loop {
        assert_eq!(
            curl(&["-sS", "http://10.96.0.10/echo/audited"]),
            "web saw audited\n"
        );
        let out = std::process::Command::new(conformance::binary("weft"))
            .args(["observe", "--relay", &relay])
            .args(["--verdict", "audited", "--output", "json"])
            .output()
            .unwrap();
        let found: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if !found.is_empty() {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "an audited request is shown within 10 s of the policy"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for event in &audited {
        assert_eq!(event["path"], "/echo/audited", "{event}");
        assert_eq!(event["audit"], "shop/web-audit", "{event}");
        assert_eq!(
            event["verdict"], "allow",
            "an Audit policy decides nothing: {event}"
        );
    }

    // Both nodes' events, merged by the relay in time order.
    last_ten_of_both_nodes_in_time_order(weft, "relay-merged");
    nothing_matches(&nothing);
    drop(observed);
    drop(nothing);
}
