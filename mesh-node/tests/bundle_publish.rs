//! On Kubernetes the CA publishes the trust bundle in the ConfigMap every node's tunnel mounts
//! (`--trust-bundle-configmap`): filled at start, filled again at each root rotation step,
//! written again once a missing ConfigMap appears; every request it makes is one the
//! controller's RBAC list grants.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_node::ca::authenticate::{Authenticator, NodeTokens};
use mesh_node::ca::publish::{BUNDLE_KEY, BundleConfigMap};
use mesh_node::ca::run::{CaSettings, start_ca};
use mesh_node::cluster::ClusterObjects;
use test_apiserver::ApiServer;

const EMPTY_BUNDLE: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: weft-trust-bundle, namespace: weft-system}\n";

async fn published(api: &ApiServer, want: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = api
            .get("ConfigMap", "weft-system", "weft-trust-bundle")
            .and_then(|c| c["data"][BUNDLE_KEY].as_str().map(str::to_owned));
        if found.as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the ConfigMap holds {found:?}, not the CA's bundle"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_publishes_its_bundle_in_the_configmap_and_follows_rotation() {
    mesh_node::install_default_crypto_provider();
    let api = ApiServer::start().await;
    let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    std::fs::create_dir(&ca_dir).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let settings = CaSettings {
        dir: ca_dir.clone(),
        trust_domain: "cluster.local".into(),
        lifetime: Duration::from_secs(3600),
        listen: "127.0.0.1:0".parse().unwrap(),
        server_names: vec!["weft-ca.test".into()],
        bundle_file: Some(dir.path().join("bundle.pem")),
    };
    let (_objects, rx) = tokio::sync::watch::channel(Arc::new(ClusterObjects::default()));
    let running = start_ca(
        settings,
        Authenticator::Tokens(NodeTokens::load(&tokens).unwrap()),
        rx,
    )
    .await
    .unwrap()
    .publish_to(BundleConfigMap {
        client,
        namespace: "weft-system".into(),
        name: "weft-trust-bundle".into(),
    });
    tokio::spawn(running.run(std::future::pending()));
    let bundle = || std::fs::read_to_string(dir.path().join("bundle.pem")).unwrap();

    // The install has not made the ConfigMap yet: the CA keeps trying, and fills it once it
    // appears.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        api.get("ConfigMap", "weft-system", "weft-trust-bundle")
            .is_none()
    );
    api.apply(EMPTY_BUNDLE);
    published(&api, &bundle(), "at start").await;
    assert_eq!(bundle().matches("BEGIN CERTIFICATE").count(), 1);

    // A root staged: both roots are published, the new one beside the old.
    mesh_node::ca::stage_root(&ca_dir, "cluster.local").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while bundle().matches("BEGIN CERTIFICATE").count() != 2 {
        assert!(Instant::now() < deadline, "the CA picks up the staged root");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    published(&api, &bundle(), "after a root was staged").await;

    let granted = mesh_node::api_access::controller();
    let asked = api.accesses();
    assert!(asked.contains(&("".into(), "configmaps".into(), "patch".into())));
    for (group, resource, verb) in asked {
        assert!(
            mesh_node::api_access::allows(&granted, &group, &resource, &verb),
            "the CA asked {verb} {group}/{resource}, not in api_access::controller()"
        );
    }
}
