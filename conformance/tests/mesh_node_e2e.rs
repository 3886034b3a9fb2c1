//! `mesh-node` end to end, real binaries on two simulated nodes: the agents follow a folder
//! of Kubernetes manifests; labelling a namespace enrolls its pods (their traffic becomes
//! mutual TLS, checked on the wire), removing the label or opting a pod out returns it to
//! plain traffic, and a pod that appears later in a labelled namespace is enrolled.

use std::time::{Duration, Instant};

use conformance::agents::Manifests;
use conformance::load::http_echo;
use conformance::metrics::sum;
use conformance::pcap;
use conformance::{Cluster, ClusterSpec, PodSpec};

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";

/// client and late on node 1, server on node 2 (HTTP on 8080), all in namespace `default`;
/// tunnels and one agent per node running; `late` not in the manifests yet.
fn cluster(labelled: bool) -> Cluster {
    let spec = ClusterSpec {
        agents: true,
        // A tunnel restart waits for its live connections at most this long.
        tunnel_args: vec!["--drain-timeout".into(), "2s".into()],
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
/// Waits until a request from the client reaches the server meshed.
fn wait_until_meshed(cluster: &Cluster) {
    eventually("the client is meshed", || {
        let before = meshed(cluster, CLIENT);
        echo(cluster, "client", "first") && meshed(cluster, CLIENT) == before + 1.0
    });
}

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
            ..Manifests::default()
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
    wait_until_meshed(&cluster);
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

/// Steady traffic from the client: a new connection per request, each carrying a secret in
/// its path, and one long connection used between them; every outcome stamped with the time
/// since `started`.
struct Traffic {
    started: Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU32>,
    thread: std::thread::JoinHandle<anyhow::Result<Outcome>>,
}

#[derive(Debug, Default)]
struct Outcome {
    successes: Vec<Duration>,
    failures: Vec<(Duration, String)>,
    long_failure: Option<(Duration, String)>,
}

impl Outcome {
    /// How long after `t` the first request succeeded.
    fn resumed_after(&self, t: Duration) -> Duration {
        let resumed = self
            .successes
            .iter()
            .find(|s| **s > t)
            .expect("service resumes");
        *resumed - t
    }
}

impl Traffic {
    fn start(cluster: &Cluster) -> Traffic {
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        let target = std::net::SocketAddr::from((cluster.pod("server").ip, 8080));
        let started = Instant::now();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let done = std::sync::Arc::new(AtomicU32::new(0));
        let (stop2, done2) = (stop.clone(), done.clone());
        let thread = cluster.pod("client").netns.spawn_in(move || {
            let timeout = Some(Duration::from_secs(3));
            let mut outcome = Outcome::default();
            let mut long = std::net::TcpStream::connect(target).ok();
            let mut n = 0u32;
            while !stop2.load(Ordering::Relaxed) {
                n += 1;
                let text = format!("secret-{n}");
                let answer = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))
                    .and_then(|mut s| {
                        s.set_read_timeout(timeout)?;
                        http_echo(&mut s, &text)
                    });
                match answer {
                    Ok(body) if body == format!("server saw {text}\n") => {
                        outcome.successes.push(started.elapsed());
                        done2.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        outcome
                            .failures
                            .push((started.elapsed(), format!("{other:?}")));
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                if n.is_multiple_of(10) && outcome.long_failure.is_none() {
                    let used = long
                        .as_mut()
                        .ok_or_else(|| std::io::Error::other("never opened"))
                        .and_then(|s| http_echo(s, "long"));
                    if let Err(e) = used {
                        outcome.long_failure = Some((started.elapsed(), e.to_string()));
                    }
                }
            }
            outcome
        });
        Traffic {
            started,
            stop,
            done,
            thread,
        }
    }

    /// Waits until `more` further requests succeeded.
    fn wait_for(&self, more: u32) {
        let done = || self.done.load(std::sync::atomic::Ordering::Relaxed);
        let target = done() + more;
        eventually(&format!("{more} more requests succeed"), || {
            done() >= target
        });
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn finish(self) -> Outcome {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap().unwrap()
    }
}

/// The agent of the client's node restarts, then the client's tunnel restarts, under steady
/// traffic. Nothing crosses the link in clear at any time. The agent's restart is invisible
/// (capture stays pinned, the tunnel keeps serving and reconnects): no request fails and the
/// long connection stays up. The tunnel's restart refuses new connections while it is down
/// (fail closed) and serves again within a second of its start; the long connection it
/// carried may end with it (the tunnel holds the proxied connection).
#[test]
fn agent_and_tunnel_restarts_under_traffic_send_nothing_in_plaintext() {
    let mut cluster = cluster(true);
    wait_until_meshed(&cluster);
    let meshed_before = meshed(&cluster, CLIENT);
    let (mut tcpdump, pcap) = cluster.capture_link(2, "restarts").unwrap();
    let traffic = Traffic::start(&cluster);
    traffic.wait_for(20);

    cluster.agents[0].stop(Duration::from_secs(5));
    traffic.wait_for(10);
    cluster.agents[0] = cluster.spawn_agent(1).unwrap();
    traffic.wait_for(20);

    let tunnel_stopped = traffic.now();
    let exit = cluster.nodes[0]
        .tunnel
        .as_mut()
        .unwrap()
        .stop(Duration::from_secs(15));
    assert!(exit.is_some(), "the tunnel stops");
    std::thread::sleep(Duration::from_millis(300));
    let tunnel_started = traffic.now();
    cluster.start_tunnel(1).unwrap();
    traffic.wait_for(20);
    let outcome = traffic.finish();
    std::thread::sleep(Duration::from_millis(300));
    tcpdump.stop(Duration::from_secs(5));

    assert!(
        !pcap::contains(&pcap, b"secret-").unwrap(),
        "a request crossed the link in clear"
    );
    let before_tunnel: Vec<_> = outcome
        .failures
        .iter()
        .filter(|(t, _)| *t < tunnel_stopped)
        .collect();
    assert!(
        before_tunnel.is_empty(),
        "requests failed around the agent's restart: {before_tunnel:?}"
    );
    if let Some((t, e)) = &outcome.long_failure {
        assert!(
            *t >= tunnel_stopped,
            "the long connection broke at {t:?} (before the tunnel restart): {e}"
        );
    }
    let resume = outcome.resumed_after(tunnel_started);
    assert!(
        resume < Duration::from_secs(1),
        "service resumed {resume:?} after the new tunnel started"
    );
    let meshed_now = meshed(&cluster, CLIENT) - meshed_before;
    assert!(
        meshed_now >= outcome.successes.len() as f64,
        "{} requests succeeded but {meshed_now} were meshed",
        outcome.successes.len()
    );
    eprintln!(
        "{} requests succeeded; {} refused while the tunnel was down; service resumed {resume:?} after the new tunnel started; long connection: {:?}",
        outcome.successes.len(),
        outcome.failures.len(),
        outcome.long_failure
    );
}

/// Each node's tunnel is killed with SIGKILL under steady traffic (a crash, an OOM kill: no
/// drain, no goodbye) and started again. Nothing of the client's traffic crosses the link in
/// clear; while a tunnel is dead, new connections are refused at once (capture stays pinned
/// and the tunnel's in-pod listeners died with it); a new tunnel serves within a second.
#[test]
fn a_killed_tunnel_fails_closed_until_a_new_one_serves() {
    let mut cluster = cluster(true);
    wait_until_meshed(&cluster);
    let (mut tcpdump, pcap) = cluster.capture_link(2, "kill9").unwrap();
    let traffic = Traffic::start(&cluster);
    traffic.wait_for(20);
    let mut gaps = Vec::new();
    for node in [1, 2] {
        let killed = traffic.now();
        let status = cluster.nodes[node - 1].tunnel.as_mut().unwrap().kill();
        assert!(status.is_some(), "node{node}'s tunnel is killed");
        std::thread::sleep(Duration::from_millis(500));
        let started = traffic.now();
        cluster.start_tunnel(node).unwrap();
        traffic.wait_for(20);
        gaps.push((node, killed, started));
    }
    let outcome = traffic.finish();
    std::thread::sleep(Duration::from_millis(300));
    tcpdump.stop(Duration::from_secs(5));
    assert!(
        !pcap::contains(&pcap, b"secret-").unwrap(),
        "a request crossed the link in clear"
    );
    for (node, killed, started) in gaps {
        // Requests that began while the tunnel was dead (the one in flight when it died may
        // end otherwise).
        let refused: Vec<_> = outcome
            .failures
            .iter()
            .filter(|(t, _)| *t > killed + Duration::from_millis(50) && *t < started)
            .collect();
        assert!(
            !refused.is_empty(),
            "node{node}: no request was refused while its tunnel was dead"
        );
        let succeeded_while_dead = outcome
            .successes
            .iter()
            .filter(|t| **t > killed + Duration::from_millis(50) && **t < started)
            .count();
        assert_eq!(
            succeeded_while_dead, 0,
            "node{node}: requests got through while its tunnel was dead"
        );
        if node == 1 {
            // The client's own tunnel is gone: its connects are refused in the pod itself.
            assert!(
                refused.iter().all(|(_, e)| e.contains("ConnectionRefused")),
                "node1: {refused:?}"
            );
        }
        let resume = outcome.resumed_after(started);
        assert!(
            resume < Duration::from_secs(1),
            "node{node}: service resumed {resume:?} after the new tunnel started"
        );
    }
    eprintln!(
        "{} requests succeeded, {} refused while a tunnel was dead",
        outcome.successes.len(),
        outcome.failures.len()
    );
}

/// The demo's manifests (`examples/`) stay valid: the cluster they describe meshes the
/// labelled namespace's client, by service address too, and leaves the other one plain.
#[test]
fn the_example_manifests_mesh_the_labelled_namespace() {
    let cluster = Cluster::from_examples().expect("the demo's cluster starts");
    let web = cluster.pod("web").ip;
    let get = |pod: &str, url: &str| {
        let out = cluster
            .run_in(pod, "curl", &["-sS", "--max-time", "10", url])
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        get("shopper", "http://10.96.0.10/echo/svc"),
        "web saw svc\n"
    );
    assert_eq!(
        get("visitor", &format!("http://{web}:8080/echo/plain")),
        "web saw plain\n"
    );
    let node2 = cluster.node(2);
    assert_eq!(
        node2
            .meshed_from("spiffe://cluster.local/ns/shop/sa/shopper")
            .unwrap(),
        1.0
    );
    let visitor_plain = sum(
        &node2.metrics().unwrap(),
        "weft_tcp_connections_opened_total",
        &[
            ("source_workload", "visitor"),
            ("connection_security_policy", "none"),
        ],
    );
    assert_eq!(visitor_plain, 1.0);
    for agent in &cluster.agents {
        let (status, body) = conformance::agents::agent_readiness(agent).unwrap();
        assert_eq!((status, body.as_str()), (200, "ready\n"), "{}", agent.name);
    }

    // Bad input beside the good: a policy with a bad field and a file that does not parse.
    // Both are reported (readiness body, still ready), nothing else changes.
    let dir = cluster.manifest_dir();
    std::fs::write(
        dir.join("policies.yaml"),
        "apiVersion: weft.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: typo, namespace: shop}\nspec: {rules: [{to: [{operation: {ports: [\"99999\"]}}]}]}\n",
    )
    .unwrap();
    std::fs::write(dir.join("broken.yaml"), "kind: Pod\nmetadata: [unclosed\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for agent in &cluster.agents {
        loop {
            let (status, body) = conformance::agents::agent_readiness(agent).unwrap();
            let reported = body.contains(
                "MeshPolicy shop/typo: spec.rules[0].to[0].operation.ports[0]: \"99999\" is not a port",
            ) && body.contains("broken.yaml: document 1 (line");
            if reported {
                assert_eq!(status, 200, "{body}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: not reported: {body}",
                agent.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(
        get("shopper", "http://10.96.0.10/echo/still"),
        "web saw still\n"
    );
    assert_eq!(
        node2
            .meshed_from("spiffe://cluster.local/ns/shop/sa/shopper")
            .unwrap(),
        2.0,
        "still meshed"
    );
}

/// A pod whose listeners restart (its service account changed) gets them back on the same
/// ports at once: the old ones, and the duplicates kept for capture, close first (before, the
/// new 15008 and 15006 failed to bind, "Address already in use", and the pod stayed
/// unreachable).
#[test]
fn a_pod_whose_service_account_changes_is_served_again_under_its_new_identity() {
    let cluster = cluster(true);
    wait_until_meshed(&cluster);
    let manifests = |account: &str| {
        cluster
            .manifests_yaml(&Manifests {
                labelled: &["default"],
                opted_out: &["late"],
                ..Manifests::default()
            })
            .replace(
                "serviceAccountName: server\n",
                &format!("serviceAccountName: {account}\n"),
            )
    };
    cluster.replace_manifests(&manifests("server")).unwrap();
    eventually("late (opted out) reaches the server in plaintext", || {
        echo(&cluster, "late", "before")
    });
    cluster.replace_manifests(&manifests("server-v2")).unwrap();
    let served_as_v2 = || {
        sum(
            &cluster.node(2).metrics().unwrap(),
            "weft_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/default/sa/server-v2",
                ),
            ],
        )
    };
    eventually(
        "served again under the new identity, meshed and in plaintext",
        || {
            echo(&cluster, "client", "after")
                && echo(&cluster, "late", "after")
                && served_as_v2() >= 2.0
        },
    );
}
