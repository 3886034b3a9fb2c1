//! The Kubernetes source against a list/watch test server (the real `kube` client and
//! watcher): the same enrollment, tunnel tables and policy checks as the local folder for the
//! same objects,
//! live changes followed, and again after a `410 Gone` forces a relist.

mod support;

use std::time::{Duration, Instant};

use mesh_node::agent::local_enrolled;
use mesh_node::cluster::ClusterObjects;
use mesh_node::kube_source::KubeSource;
use mesh_node::manifests::parse_documents;
use mesh_node::policies::check_policies;
use mesh_node::tunnel_state::tunnel_state;
use support::apiserver::ApiServer;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}, annotations: {weft.dev/netns: /run/netns/web}}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: web, image: web, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Running, podIPs: [{ip: 10.1.1.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: shopper, namespace: shop, annotations: {weft.dev/netns: /run/netns/shopper}}
spec: {nodeName: node1, containers: []}
status: {phase: Running, podIP: 10.1.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: visitor, namespace: legacy}
spec: {nodeName: node2, containers: []}
status: {phase: Running, podIP: 10.1.2.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: manual, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{port: 9000}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: manual-1, namespace: shop, labels: {kubernetes.io/service-name: manual}}
addressType: IPv4
ports: [{port: 9001}]
endpoints: [{addresses: [10.1.1.3], conditions: {ready: true}}]
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: web-readers, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, rules: [{from: [{source: {namespaces: [shop]}}]}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: typo, namespace: shop}
spec: {rules: [{from: [{source: {ipBlocks: [10.0.0/8]}}]}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshAuthentication
metadata: {name: strict, namespace: shop}
spec: {mode: Strict}
"#;

/// The manual service's only endpoint stops being ready.
const MANUAL_NOT_READY: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: manual-1, namespace: shop, labels: {kubernetes.io/service-name: manual}}\naddressType: IPv4\nports: [{port: 9001}]\nendpoints: [{addresses: [10.1.1.3], conditions: {ready: false}}]\n";

const LABEL_SHOP: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {weft.dev/mesh: enabled}}\n";
const OPT_OUT_SHOPPER: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: shopper, namespace: shop, labels: {weft.dev/mesh: disabled}, annotations: {weft.dev/netns: /run/netns/shopper}}\nspec: {nodeName: node1, containers: []}\nstatus: {phase: Running, podIP: 10.1.1.3}\n";

/// What the agent derives: node1's enrolled pods and the tunnel tables.
fn results(objects: &ClusterObjects) -> String {
    let (enrolled, problems) = local_enrolled(objects, "node1");
    format!(
        "{enrolled:?}\n{problems:?}\n{:?}\n{:?}",
        tunnel_state(objects),
        check_policies(objects)
    )
}

/// The same objects read by the local folder's parser.
fn from_folder(texts: &[&str]) -> ClusterObjects {
    let mut objects = ClusterObjects::default();
    for text in texts {
        for object in parse_documents(std::path::Path::new("t.yaml"), text).unwrap() {
            objects.insert(object);
        }
    }
    objects
}

async fn converges(source: &KubeSource, texts: &[&str], what: &str) {
    let want = results(&from_folder(texts));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = results(&source.objects());
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not converged\nwant {want}\ngot  {got}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_source_enrolls_like_the_folder_through_changes_and_a_410_relist() {
    let server = ApiServer::start().await;
    server.apply(CLUSTER);
    let config = kube::Config::new(server.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let source = KubeSource::start(client);
    tokio::time::timeout(Duration::from_secs(15), source.wait_until_ready())
        .await
        .expect("the first lists arrive");
    assert!(source.ready());
    converges(&source, &[CLUSTER], "initial list").await;
    let (enrolled, _) = local_enrolled(&source.objects(), "node1");
    assert!(enrolled.is_empty(), "nothing labelled yet");
    let manual = |objects: &ClusterObjects| {
        tunnel_state(objects)
            .services
            .into_iter()
            .find(|s| s.name == "manual")
            .map(|s| (s.endpoints, s.ports[0].target_port))
    };
    assert_eq!(
        manual(&source.objects()),
        Some((vec!["shop/shopper".to_owned()], 9001)),
        "a service's endpoints come from its EndpointSlice"
    );
    server.apply(MANUAL_NOT_READY);
    converges(&source, &[CLUSTER, MANUAL_NOT_READY], "endpoint not ready").await;
    assert_eq!(manual(&source.objects()), Some((vec![], 9001)));
    let policies = check_policies(&source.objects());
    assert_eq!(
        (policies.policies, policies.authentications),
        (1, 1),
        "Weft's own kinds are watched too"
    );
    assert_eq!(policies.refused.len(), 1, "{:?}", policies.refused);
    assert!(
        policies.refused[0]
            .starts_with("MeshPolicy shop/typo: spec.rules[0].from[0].source.ipBlocks[0]")
    );

    // A live change arrives by watch.
    server.apply(LABEL_SHOP);
    converges(
        &source,
        &[CLUSTER, MANUAL_NOT_READY, LABEL_SHOP],
        "namespace labelled",
    )
    .await;
    let (enrolled, _) = local_enrolled(&source.objects(), "node1");
    assert_eq!(
        enrolled.keys().collect::<Vec<_>>(),
        ["shop/shopper", "shop/web"]
    );

    assert!(source.take_changed(), "changes are flagged");
    assert!(!source.take_changed(), "and the flag clears");

    // The server forgets its history: watches end with 410 Gone; the next change is only
    // seen through a relist.
    let lists_before = server.lists();
    server.expire();
    server.apply(OPT_OUT_SHOPPER);
    converges(
        &source,
        &[CLUSTER, MANUAL_NOT_READY, LABEL_SHOP, OPT_OUT_SHOPPER],
        "after 410 Gone",
    )
    .await;
    let (enrolled, _) = local_enrolled(&source.objects(), "node1");
    assert_eq!(enrolled.keys().collect::<Vec<_>>(), ["shop/web"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while server.lists() < lists_before + 6 {
        assert!(
            Instant::now() < deadline,
            "every kind lists again after 410 Gone ({lists_before} lists before, {} after)",
            server.lists()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
