//! Workload identity end to end on two simulated nodes, with the mesh CA
//! (`mesh-node controller`) signing every certificate: what goes on the wire carries the pod's
//! SPIFFE ID and chains to the mesh root (read with `openssl s_client`, checked with `openssl
//! verify`); no tunnel process has the signing key; with the CA down for a minute, traffic
//! goes on and a new pod gets its certificate once the CA is back, without a restart; with
//! certificates living 20 s, a minute of new and long-lived connections loses none while new
//! handshakes meet the renewed certificates.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use conformance::cluster::{Cluster, ClusterSpec, PodSpec};

const TD: &str = "cluster.local";

/// The certificates `openssl s_client` was shown by the HBONE listener at `ip`:15008, dialled
/// from node `from` (PEM blocks, leaf first). The handshake itself fails: s_client has no
/// client certificate, and TLS 1.3 servers send theirs before asking for one.
fn certificates_served(cluster: &Cluster, from: usize, ip: std::net::Ipv4Addr) -> Vec<String> {
    let out = cluster
        .node(from)
        .netns
        .command("timeout")
        .args(["10", "openssl", "s_client", "-showcerts", "-connect"])
        .arg(format!("{ip}:15008"))
        .args(["-alpn", "h2"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut blocks = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let end = rest[start..].find("-----END CERTIFICATE-----").unwrap() + start + 25;
        blocks.push(format!("{}\n", &rest[start..end]));
        rest = &rest[end..];
    }
    assert!(
        !blocks.is_empty(),
        "s_client saw no certificate at {ip}:15008:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    blocks
}

fn openssl(args: &[&str], input_file: &Path) -> String {
    let out = Command::new("openssl")
        .args(args)
        .arg(input_file)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn certificates_on_the_wire_carry_each_pods_spiffe_id_chain_to_the_mesh_root_and_no_tunnel_holds_the_key()
 {
    let cluster = Cluster::client_server(&[]).unwrap();
    // Traffic both ways through the mesh first.
    let url = format!("http://{}:8080/", cluster.pod("server").ip);
    let curl = cluster.curl_socks("client", &url, &[]).unwrap();
    assert!(curl.success, "{curl:?}");
    let scratch = tempfile::tempdir().unwrap();
    for (pod, from) in [("server", 1), ("client", 2)] {
        let ip = cluster.pod(pod).ip;
        let served = certificates_served(&cluster, from, ip);
        let leaf = scratch.path().join(format!("{pod}.pem"));
        std::fs::write(&leaf, &served[0]).unwrap();
        let san = openssl(&["x509", "-noout", "-ext", "subjectAltName", "-in"], &leaf);
        let expected = format!("URI:spiffe://{TD}/ns/default/sa/{pod}");
        let names: Vec<&str> = san
            .lines()
            .skip_while(|l| !l.contains("Subject Alternative Name"))
            .skip(1)
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        assert_eq!(names, vec![expected.as_str()], "{pod}'s SANs:\n{san}");
        let bundle = cluster.trust_bundle();
        let verified = openssl(
            &[
                "verify",
                "-CAfile",
                bundle.to_str().unwrap(),
                "-purpose",
                "sslserver",
            ],
            &leaf,
        );
        assert!(verified.contains(": OK"), "{pod}'s certificate: {verified}");
        let text = openssl(&["x509", "-noout", "-text", "-in"], &leaf);
        assert!(text.contains("CA:FALSE"), "{text}");
        assert!(text.contains("TLS Web Client Authentication"), "{text}");
    }
    // The client's certificate, which s_client cannot see, was verified by the server's
    // tunnel against the same bundle and read for its SPIFFE ID.
    let from_client = cluster
        .node(2)
        .meshed_from(&format!("spiffe://{TD}/ns/default/sa/client"))
        .unwrap();
    assert!(from_client >= 1.0, "no mTLS connection from the client");
    // The CA holds the key; no tunnel has it on its command line, in its environment or
    // among its open files.
    let ca_dir = cluster.ca_dir();
    assert!(ca_dir.join("ca.key").exists());
    for i in 1..=2 {
        let pid = cluster.node(i).tunnel.as_ref().unwrap().pid().unwrap();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert!(exe.ends_with("ztunnel"), "pid {pid} is {}", exe.display());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ).replace('\0', " ");
        for text in [&cmdline, &environ] {
            assert!(!text.contains("ca.key"), "node{i}'s tunnel: {text}");
            assert!(
                !text.contains(ca_dir.to_str().unwrap()),
                "node{i}'s tunnel: {text}"
            );
        }
        assert!(cmdline.contains("--ca-token-file"), "{cmdline}");
        let mut files = 0;
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
            if let Ok(target) = std::fs::read_link(fd.unwrap().path()) {
                files += 1;
                assert!(
                    !target.starts_with(&ca_dir),
                    "node{i}'s tunnel holds {} open",
                    target.display()
                );
            }
        }
        assert!(files > 5, "only {files} descriptors read: not the tunnel's");
    }
}

#[test]
fn with_the_ca_down_for_a_minute_traffic_goes_on_and_a_new_pod_gets_its_certificate_after() {
    let spec = ClusterSpec {
        // Idle pooled connections close at once: every request below is a new TLS handshake.
        tunnel_args: vec!["--pool-idle-timeout".into(), "200ms".into()],
        ..ClusterSpec::new(
            2,
            vec![
                PodSpec::new("client", 1),
                PodSpec::new("server", 2),
                PodSpec::new("late", 1),
            ],
        )
    };
    let mut cluster = Cluster::build(spec).unwrap();
    // `late` is not meshed yet: its tunnel has not asked for its certificate.
    let without_late = cluster.state_yaml(|p| p.mesh = p.name != "late");
    for i in 1..=2 {
        std::fs::write(&cluster.node(i).state_file, &without_late).unwrap();
    }
    cluster
        .start_app(
            "server",
            &["http", "--port", "8080", "--name", "server"],
            8080,
        )
        .unwrap();
    cluster.start_tunnels().unwrap();
    let url = format!("http://{}:8080/", cluster.pod("server").ip);
    assert!(cluster.curl_socks("client", &url, &[]).unwrap().success);

    cluster.stop_ca();
    // The new pod arrives while the CA is down.
    let with_late = cluster.state_yaml(|_| {});
    for i in 1..=2 {
        std::fs::write(&cluster.node(i).state_file, &with_late).unwrap();
    }
    let late_id = format!("spiffe://{TD}/ns/default/sa/late");
    let down_since = Instant::now();
    let (mut served, mut failed) = (0, Vec::new());
    let mut late_refused_with_cert = false;
    while down_since.elapsed() < Duration::from_secs(60) {
        let curl = cluster
            .curl_socks("client", &url, &["--max-time", "5"])
            .unwrap();
        if curl.success {
            served += 1;
        } else {
            failed.push(curl.stderr);
        }
        if !late_refused_with_cert {
            let late = cluster
                .curl_socks("late", &url, &["--max-time", "5"])
                .unwrap();
            assert!(!late.success, "late connected without a certificate");
            late_refused_with_cert = cluster.node(1).access_logs().iter().any(|e| {
                e["response_flags"] == "CERT"
                    && (e["src.identity"] == late_id.as_str() || e["src.workload"] == "late")
            });
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed with the CA down: {failed:?}",
        failed.len(),
        served + failed.len()
    );
    assert!(served >= 20, "only {served} requests in a minute");
    assert!(
        late_refused_with_cert,
        "the late pod's refusal carried no CERT flag:\n{}",
        cluster.node(1).log()
    );
    // Readiness and the config dump say who waits and why.
    let (status, body) = cluster.node(1).http_get(15021, "/healthz/ready").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&late_id), "{body}");
    let (_, dump) = cluster.node(1).http_get(15000, "/config_dump").unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert!(
        dump["certificates"]["waiting"][&late_id].as_str().is_some(),
        "{dump}"
    );

    // The CA is back: the late pod gets its certificate by itself, no restart.
    cluster.start_ca().unwrap();
    let back = Instant::now();
    loop {
        if cluster
            .curl_socks("late", &url, &["--max-time", "5"])
            .unwrap()
            .success
        {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "late has no certificate 30 s after the CA came back:\n{}",
            cluster.node(1).log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (_, body) = cluster.node(1).http_get(15021, "/healthz/ready").unwrap();
    assert!(!body.contains(&late_id), "{body}");
    assert!(cluster.curl_socks("client", &url, &[]).unwrap().success);
}

/// What [`steady_load`] did: new connections made, their failures, each long-lived
/// connection's echoes.
type LoadResult = (u32, Vec<String>, Vec<u32>);

/// From the client pod, for `minute`: four long-lived connections echoing every 250 ms, and
/// a new connection every 150 ms (each one echo), all to `target` through the mesh.
fn steady_load(
    cluster: &Cluster,
    target: std::net::SocketAddr,
    minute: Duration,
) -> std::thread::JoinHandle<anyhow::Result<anyhow::Result<LoadResult>>> {
    cluster.pod("client").netns.spawn_in(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            async fn echo(stream: &mut tokio::net::TcpStream, msg: &[u8]) -> anyhow::Result<()> {
                stream.write_all(msg).await?;
                let mut back = vec![0u8; msg.len()];
                stream.read_exact(&mut back).await?;
                anyhow::ensure!(back == msg, "echo garbled");
                Ok(())
            }
            let start = Instant::now();
            let mut long_lived = Vec::new();
            for i in 0..4 {
                long_lived.push(tokio::spawn(async move {
                    let mut stream = conformance::load::socks_connect(target).await?;
                    let mut ticks = 0u32;
                    while start.elapsed() < minute {
                        echo(&mut stream, format!("long {i} {ticks}").as_bytes()).await?;
                        ticks += 1;
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    anyhow::Ok(ticks)
                }));
            }
            let (mut fresh, mut failures) = (0u32, Vec::new());
            while start.elapsed() < minute {
                let attempt = async {
                    let mut stream = conformance::load::socks_connect(target).await?;
                    echo(&mut stream, b"fresh").await
                };
                match attempt.await {
                    Ok(()) => fresh += 1,
                    Err(e) => failures.push(format!("{:?}: {e:#}", start.elapsed())),
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            let mut ticks = Vec::new();
            for task in long_lived {
                ticks.push(task.await??);
            }
            anyhow::Ok((fresh, failures, ticks))
        })
    })
}

/// Waits for [`steady_load`] and asserts it lost nothing `during` its minute: no new
/// connection failed, at least 100 were made, and every long-lived one echoed at least 200
/// times.
fn assert_none_lost(
    load: std::thread::JoinHandle<anyhow::Result<anyhow::Result<LoadResult>>>,
    cluster: &Cluster,
    during: &str,
) {
    let (fresh, failures, ticks) = load
        .join()
        .unwrap()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e:#}\nnode1:\n{}", cluster.node(1).log()));
    eprintln!("{during}: {fresh} new connections, long-lived echoes {ticks:?}");
    assert!(
        failures.is_empty(),
        "{during}: {} of {} new connections failed: {failures:?}",
        failures.len(),
        fresh as usize + failures.len()
    );
    assert!(
        fresh >= 100,
        "{during}: only {fresh} new connections in a minute"
    );
    assert!(
        ticks.iter().all(|t| *t >= 200),
        "{during}: long-lived connections stalled: {ticks:?}"
    );
}

/// SHA-256 of a PEM certificate's DER, to tell certificates apart.
fn fingerprint(pem: &str) -> String {
    use sha2::Digest;
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    format!("{:x}", sha2::Sha256::digest(&der))
}

/// Client on node 1, an echo server on node 2 (port 9000), certificates living 20 s, one
/// stream per HBONE connection and idle ones closed at once: each short connection is a new
/// TLS handshake, made with the certificates of the moment.
fn short_lived_certificates_cluster() -> (Cluster, std::net::SocketAddr) {
    let spec = ClusterSpec {
        tunnel_args: [
            "--cert-lifetime",
            "20s",
            "--pool-max-streams",
            "1",
            "--pool-idle-timeout",
            "100ms",
        ]
        .map(String::from)
        .to_vec(),
        ..ClusterSpec::new(
            2,
            vec![PodSpec::new("client", 1), PodSpec::new("server", 2)],
        )
    };
    let mut cluster = Cluster::build(spec).unwrap();
    cluster
        .start_app("server", &["echo", "--port", "9000"], 9000)
        .unwrap();
    cluster.start_tunnels().unwrap();
    let target = std::net::SocketAddr::from((cluster.pod("server").ip, 9000));
    (cluster, target)
}

#[test]
fn with_twenty_second_certificates_a_minute_of_new_and_long_connections_loses_none() {
    let (cluster, target) = short_lived_certificates_cluster();
    let server_ip = cluster.pod("server").ip;
    let minute = Duration::from_secs(60);
    let load = steady_load(&cluster, target, minute);
    // Meanwhile, what the server's HBONE listener presents to new handshakes, every 4 s.
    let mut seen: Vec<String> = Vec::new();
    let began = Instant::now();
    while began.elapsed() < minute {
        let leaf = certificates_served(&cluster, 1, server_ip).remove(0);
        let print = fingerprint(&leaf);
        if seen.last() != Some(&print) {
            seen.push(print);
        }
        std::thread::sleep(Duration::from_secs(4));
    }
    assert_none_lost(load, &cluster, "with 20 s certificates");
    // Renewed about every 9-10 s: new handshakes met at least four different certificates.
    assert!(
        seen.len() >= 4,
        "new handshakes saw {} certificates in a minute",
        seen.len()
    );
    for node in [1, 2] {
        let renewals = cluster
            .node(node)
            .log()
            .matches("renewed workload certificate")
            .count();
        assert!(
            renewals >= 5,
            "node{node} renewed {renewals} times in a minute of 20 s certificates"
        );
    }
}

/// Whether `leaf_pem` verifies against `root_pem` alone, with openssl.
fn chains_to(leaf_pem: &str, root_pem: &str, scratch: &Path) -> bool {
    let (leaf, root) = (scratch.join("leaf.pem"), scratch.join("root.pem"));
    std::fs::write(&leaf, leaf_pem).unwrap();
    std::fs::write(&root, root_pem).unwrap();
    openssl(&["verify", "-CAfile", root.to_str().unwrap()], &leaf).contains(": OK")
}

#[test]
fn a_root_rotation_under_load_loses_no_connection_and_new_handshakes_chain_to_the_new_root() {
    let (cluster, target) = short_lived_certificates_cluster();
    let scratch = tempfile::tempdir().unwrap();
    let old_root = std::fs::read_to_string(cluster.ca_dir().join("ca.pem")).unwrap();
    let rotate = |step: &str| {
        let out = Command::new(conformance::binary("mesh-node"))
            .args(["ca-root", step, "--ca-dir"])
            .arg(cluster.ca_dir())
            .output()
            .unwrap();
        assert!(out.status.success(), "ca-root {step}: {out:?}");
    };
    let bundle_roots = || {
        std::fs::read_to_string(cluster.trust_bundle())
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count()
    };
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "{what}:\n{}", cluster.ca_log());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let minute = Duration::from_secs(60);
    let load = steady_load(&cluster, target, minute);
    std::thread::sleep(Duration::from_secs(5));
    // Stage: both roots in the bundle; the tunnels follow it within a second or two.
    rotate("stage");
    wait_for("the bundle never held two roots", &|| bundle_roots() == 2);
    std::thread::sleep(Duration::from_secs(3));
    let new_root = std::fs::read_to_string(cluster.ca_dir().join("next/ca.pem")).unwrap();
    // Promote: the new root signs; renewals (every ~10 s) move every certificate to it.
    rotate("promote");
    wait_for("the CA never reloaded", &|| {
        cluster.ca_log().contains("signer_changed=true")
    });
    std::thread::sleep(Duration::from_secs(25));
    for (pod, from) in [("server", 1), ("client", 2)] {
        let leaf = certificates_served(&cluster, from, cluster.pod(pod).ip).remove(0);
        assert!(
            chains_to(&leaf, &new_root, scratch.path()),
            "{pod}'s certificate does not chain to the new root 25 s after promotion"
        );
        assert!(!chains_to(&leaf, &old_root, scratch.path()));
    }
    // Retire the old root once what it signed has expired (20 s certificates).
    rotate("retire");
    wait_for("the bundle never dropped the old root", &|| {
        bundle_roots() == 1
    });
    assert_none_lost(load, &cluster, "through a root rotation");
    // After retirement, new connections still work: everything chains to the new root.
    let curl_like = cluster
        .pod("client")
        .netns
        .block_on(move || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = conformance::load::socks_connect(target).await?;
            stream.write_all(b"after").await?;
            let mut back = [0u8; 5];
            stream.read_exact(&mut back).await?;
            anyhow::Ok(back == *b"after")
        })
        .unwrap();
    assert!(curl_like.unwrap(), "no echo after the old root was retired");
}
