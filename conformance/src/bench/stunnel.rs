//! The stunnel baseline: a pair of stunnel4 TLS 1.3 tunnels with mutual authentication on the
//! same path as Weft's (client pod -> router -> server pod), held to what Weft does: the same
//! cipher suite (TLS_AES_128_GCM_SHA256: stunnel would pick AES-256-GCM), and each side verifies
//! the other's chain to the test CA.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;

use crate::cluster::{Cluster, wait_for_port};
use crate::pki::TestCa;

/// Ports: the server-side stunnel accepts on `base + i`, the client-side on `local_base + i`,
/// for each target port `i` of `targets`.
pub struct StunnelPair {
    pub local_ports: Vec<u16>,
}

/// The suite Weft's tunnels negotiate (rustls prefers it, both ends offer it).
pub const SUITE: &str = "TLS_AES_128_GCM_SHA256";

const SERVER_BASE: u16 = 19000;
const LOCAL_BASE: u16 = 29000;

fn write(path: &std::path::Path, text: &str) -> Result<()> {
    std::fs::write(path, text)?;
    Ok(())
}

/// Starts stunnel servers in `server_pod` (forwarding to 127.0.0.1:<target>) and clients in
/// `client_pod`, one service per target port.
pub fn start(
    cluster: &mut Cluster,
    client_pod: &str,
    server_pod: &str,
    server_ip: Ipv4Addr,
    targets: &[u16],
) -> Result<StunnelPair> {
    let dir = cluster.dir.path().join("stunnel");
    std::fs::create_dir_all(&dir)?;
    let ca = TestCa::generate()?;
    let (ca_pem, server_pem, server_key) = ca.issue_pem("spiffe://bench/ns/default/sa/server")?;
    let (_, client_pem, client_key) = ca.issue_pem("spiffe://bench/ns/default/sa/client")?;
    write(&dir.join("ca.pem"), &ca_pem)?;
    write(&dir.join("server.pem"), &server_pem)?;
    write(&dir.join("server.key"), &server_key)?;
    write(&dir.join("client.pem"), &client_pem)?;
    write(&dir.join("client.key"), &client_key)?;
    let d = dir.display();
    let common =
        "foreground = yes\npid =\ndebug = 4\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n";
    let mut server = String::from(common);
    let mut client = String::from(common);
    let mut local_ports = Vec::new();
    for (i, port) in targets.iter().enumerate() {
        let server_port = SERVER_BASE + i as u16;
        let local_port = LOCAL_BASE + i as u16;
        server += &format!(
            "[s{i}]\naccept = 0.0.0.0:{server_port}\nconnect = 127.0.0.1:{port}\ncert = {d}/server.pem\nkey = {d}/server.key\nCAfile = {d}/ca.pem\nverifyChain = yes\nrequireCert = yes\nsslVersionMin = TLSv1.3\nciphersuites = {SUITE}\n"
        );
        client += &format!(
            "[c{i}]\nclient = yes\naccept = 127.0.0.1:{local_port}\nconnect = {server_ip}:{server_port}\ncert = {d}/client.pem\nkey = {d}/client.key\nCAfile = {d}/ca.pem\nverifyChain = yes\nsslVersionMin = TLSv1.3\nciphersuites = {SUITE}\n"
        );
        local_ports.push(local_port);
    }
    write(&dir.join("server.conf"), &server)?;
    write(&dir.join("client.conf"), &client)?;
    let stunnel = std::path::Path::new("stunnel4");
    cluster.spawn_in(server_pod, stunnel, &[&format!("{d}/server.conf")])?;
    cluster.spawn_in(client_pod, stunnel, &[&format!("{d}/client.conf")])?;
    let server_ns = &cluster.pod(server_pod).netns;
    for i in 0..targets.len() {
        wait_for_port(
            server_ns,
            server_ip,
            SERVER_BASE + i as u16,
            Duration::from_secs(10),
        )?;
    }
    let client_ns = &cluster.pod(client_pod).netns;
    for port in &local_ports {
        wait_for_port(
            client_ns,
            Ipv4Addr::LOCALHOST,
            *port,
            Duration::from_secs(10),
        )?;
    }
    Ok(StunnelPair { local_ports })
}
