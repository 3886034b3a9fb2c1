//! The mesh CA's gRPC service, served for real (TLS, HTTP/2, tonic) and called as a tunnel
//! calls it: a node gets the identities of the pods it runs and nothing else. Each refusal is
//! a test: another node's pod, a token that is unknown, forged, expired or for the wrong
//! audience (TokenReview served by the list/watch test API server), a CSR with an extra SAN,
//! a CSR asking to be a CA. The caller learns only that it was refused.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use ca_api::tonic::{self, Code};
use ca_api::{IstioCertificateRequest, IstioCertificateServiceClient};
use mesh_node::ca::authenticate::{Authenticator, NodeTokens, TokenReviewer, create_node_token};
use mesh_node::ca::run::{CaSettings, start_ca};
use mesh_node::cluster::{ClusterObjects, Object};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use rustls::pki_types::ServerName;
use test_apiserver::{ApiServer, IssuedToken};
use x509_parser::prelude::{FromDer, X509Certificate};

const TD: &str = "cluster.local";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
const SERVER_NAME: &str = "weft-ca.test";
const NODE_AGENT: &str = "system:serviceaccount:weft-system:weft-node";

/// The cluster: shop/web runs on node1, shop/db on node2.
fn cluster() -> ClusterObjects {
    let mut objects = ClusterObjects::default();
    for (name, sa, node) in [("web-1", "web", "node1"), ("db-1", "db", "node2")] {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app"}]},
            "status": {"phase": "Running"},
        });
        objects.insert(Object::Pod(Arc::new(serde_json::from_value(pod).unwrap())));
    }
    objects
}

/// A CA serving on 127.0.0.1 with `authenticator`; its folder, address and trust bundle.
struct TestCa {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    bundle: String,
}

impl TestCa {
    async fn start(authenticator: impl FnOnce(&std::path::Path) -> Authenticator) -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o700)).unwrap();
        create_node_token(&tokens, "node1").unwrap();
        create_node_token(&tokens, "node2").unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(cluster()));
        // The sender outlives the test: the CA reads the cluster it last sent.
        std::mem::forget(_tx);
        let settings = CaSettings {
            dir: dir.path().join("ca"),
            trust_domain: TD.into(),
            lifetime: Duration::from_secs(3600),
            listen: "127.0.0.1:0".parse().unwrap(),
            server_names: vec![SERVER_NAME.into()],
            bundle_file: Some(dir.path().join("bundle.pem")),
        };
        std::fs::create_dir(&settings.dir).unwrap();
        let running = start_ca(settings, authenticator(&tokens), rx)
            .await
            .unwrap();
        let addr = running.bound;
        tokio::spawn(running.run(std::future::pending()));
        let bundle = std::fs::read_to_string(dir.path().join("bundle.pem")).unwrap();
        TestCa { dir, addr, bundle }
    }

    fn node_token(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("tokens/{node}.token")))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Asks for `identity` with `csr`, authenticated by `token`: the PEM chain, or the status.
    async fn ask(
        &self,
        token: &str,
        identity: &str,
        csr: String,
    ) -> Result<Vec<String>, tonic::Status> {
        let mut roots = rustls::RootCertStore::empty();
        for root in rustls_pemfile::certs(&mut self.bundle.as_bytes()) {
            roots.add(root.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = self.addr;
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let connector = connector.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    let name = ServerName::try_from(SERVER_NAME).unwrap();
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                }
            }))
            .await
            .unwrap();
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: 0,
            metadata: Some(ca_api::impersonating(identity)),
        });
        if !token.is_empty() {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
            .map(|r| r.into_inner().cert_chain)
    }
}

/// A CSR as a node makes it: its own key, the SANs given.
fn csr(sans: &[&str], tweak: impl FnOnce(&mut CertificateParams)) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = sans
        .iter()
        .map(|s| match s.strip_prefix("DNS:") {
            Some(dns) => SanType::DnsName((*dns).try_into().unwrap()),
            None => SanType::URI((*s).try_into().unwrap()),
        })
        .collect();
    tweak(&mut params);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn der(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// What the caller of a refused request sees: the code, and no reason.
fn assert_refused(result: Result<Vec<String>, tonic::Status>, code: Code) {
    let status = result.expect_err("signed, but should have been refused");
    assert_eq!(status.code(), code, "{status:?}");
    let message = status.message();
    for leak in [
        "node", "shop", "spiffe", "SAN", "token", "audience", "expired",
    ] {
        assert!(
            !message.contains(leak),
            "the refusal tells the caller why: {message}"
        );
    }
    assert!(message.contains("refused"), "{message}");
}

fn local_tokens(folder: &std::path::Path) -> Authenticator {
    Authenticator::Tokens(NodeTokens::load(folder).unwrap())
}

#[tokio::test]
async fn a_node_gets_the_identity_of_a_pod_it_runs_chained_to_the_root() {
    mesh_node::install_default_crypto_provider();
    let ca = TestCa::start(local_tokens).await;
    let chain = ca
        .ask(&ca.node_token("node1"), WEB, csr(&[WEB], |_| {}))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2, "the leaf, then the root");
    assert_eq!(chain[1], ca.bundle, "the chain ends with the bundle's root");
    let leaf_der = der(&chain[0]);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1);
    assert_eq!(
        format!("{:?}", san.value.general_names[0]),
        format!("URI({WEB:?})")
    );
    let root_der = der(&ca.bundle);
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    leaf.verify_signature(Some(root.public_key()))
        .expect("signed by the root");
    // Lives the CA's hour, not more.
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!((3600..=3600 + 120).contains(&life), "{life} s");
}

#[tokio::test]
async fn a_node_asking_for_a_pod_on_another_node_is_refused() {
    mesh_node::install_default_crypto_provider();
    let ca = TestCa::start(local_tokens).await;
    // node1 runs web, not db; node2 runs db.
    assert_refused(
        ca.ask(&ca.node_token("node1"), DB, csr(&[DB], |_| {}))
            .await,
        Code::PermissionDenied,
    );
    assert!(
        ca.ask(&ca.node_token("node2"), DB, csr(&[DB], |_| {}))
            .await
            .is_ok()
    );
    // A namespace or trust domain of its own making is no better.
    for other in [
        "spiffe://cluster.local/ns/other/sa/web",
        "spiffe://evil.td/ns/shop/sa/web",
        "spiffe://cluster.local/ns/shop/sa/web/x",
    ] {
        assert_refused(
            ca.ask(&ca.node_token("node1"), other, csr(&[other], |_| {}))
                .await,
            Code::PermissionDenied,
        );
    }
    // The CSR must name what the metadata names.
    assert_refused(
        ca.ask(&ca.node_token("node1"), WEB, csr(&[DB], |_| {}))
            .await,
        Code::PermissionDenied,
    );
}

#[tokio::test]
async fn a_csr_with_an_extra_san_or_asking_to_be_a_ca_is_refused() {
    mesh_node::install_default_crypto_provider();
    let ca = TestCa::start(local_tokens).await;
    let token = ca.node_token("node1");
    assert_refused(
        ca.ask(&token, WEB, csr(&[WEB, "DNS:web.shop.svc"], |_| {}))
            .await,
        Code::PermissionDenied,
    );
    assert_refused(
        ca.ask(
            &token,
            WEB,
            csr(&[WEB, "spiffe://cluster.local/ns/shop/sa/db"], |_| {}),
        )
        .await,
        Code::PermissionDenied,
    );
    assert_refused(
        ca.ask(
            &token,
            WEB,
            csr(&[WEB], |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
            }),
        )
        .await,
        Code::PermissionDenied,
    );
    assert_refused(
        ca.ask(&token, WEB, "not a CSR".into()).await,
        Code::PermissionDenied,
    );
    // The same node, asking properly, still gets its certificate.
    assert!(ca.ask(&token, WEB, csr(&[WEB], |_| {})).await.is_ok());
}

#[tokio::test]
async fn an_unknown_or_missing_node_token_is_refused() {
    mesh_node::install_default_crypto_provider();
    let ca = TestCa::start(local_tokens).await;
    assert_refused(
        ca.ask("0123456789abcdef0123456789abcdef", WEB, csr(&[WEB], |_| {}))
            .await,
        Code::Unauthenticated,
    );
    assert_refused(
        ca.ask("", WEB, csr(&[WEB], |_| {})).await,
        Code::Unauthenticated,
    );
}

#[tokio::test]
async fn on_kubernetes_only_a_node_agents_live_token_for_weft_ca_is_taken_and_names_its_node() {
    mesh_node::install_default_crypto_provider();
    let api = ApiServer::start().await;
    let agent_on = |node: &str| IssuedToken {
        user: NODE_AGENT.into(),
        audiences: vec!["weft-ca".into()],
        node: Some(node.into()),
        expired: false,
    };
    api.issue_token("good-node1", agent_on("node1"));
    api.issue_token(
        "expired",
        IssuedToken {
            expired: true,
            ..agent_on("node1")
        },
    );
    api.issue_token(
        "for-the-api-server",
        IssuedToken {
            audiences: vec!["https://kubernetes.default.svc".into()],
            ..agent_on("node1")
        },
    );
    api.issue_token(
        "a-workload",
        IssuedToken {
            user: "system:serviceaccount:shop:web".into(),
            ..agent_on("node1")
        },
    );
    api.issue_token(
        "not-bound-to-a-pod",
        IssuedToken {
            node: None,
            ..agent_on("node1")
        },
    );
    let config = kube::Config::new(api.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let ca = TestCa::start(move |_| {
        Authenticator::Kubernetes(TokenReviewer::new(client, vec![NODE_AGENT.into()]))
    })
    .await;
    assert!(ca.ask("good-node1", WEB, csr(&[WEB], |_| {})).await.is_ok());
    // The node comes from the token: node1's token gets nothing of node2's.
    assert_refused(
        ca.ask("good-node1", DB, csr(&[DB], |_| {})).await,
        Code::PermissionDenied,
    );
    for bad in [
        "forged",
        "expired",
        "for-the-api-server",
        "a-workload",
        "not-bound-to-a-pod",
    ] {
        assert_refused(
            ca.ask(bad, WEB, csr(&[WEB], |_| {})).await,
            Code::Unauthenticated,
        );
    }
    let granted = mesh_node::api_access::controller();
    let asked = api.accesses();
    assert!(!asked.is_empty());
    for (group, resource, verb) in asked {
        assert!(
            mesh_node::api_access::allows(&granted, &group, &resource, &verb),
            "the CA asked {verb} {group}/{resource}, not in api_access::controller()"
        );
    }
}
