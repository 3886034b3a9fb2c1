//! The mesh CA's gRPC service, served for real (TLS, HTTP/2, tonic) and called as a tunnel
//! calls it: a node gets the identities of the pods it runs and nothing else. Each refusal is
//! a test: another node's pod, a token that is unknown, forged, expired or for the wrong
//! audience (TokenReview served by the list/watch test API server), a CSR with an extra SAN,
//! a CSR asking to be a CA. The caller learns only that it was refused.

mod support;

use ca_api::tonic::{self, Code};
use mesh_node::ca::authenticate::{Authenticator, NodeTokens, TokenReviewer};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use support::TestCa;
use test_apiserver::{ApiServer, IssuedToken};
use x509_parser::prelude::{FromDer, X509Certificate};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
const NODE_AGENT: &str = "system:serviceaccount:weft-system:weft-node";

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
