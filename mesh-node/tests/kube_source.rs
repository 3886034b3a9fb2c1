//! The Kubernetes source against a list/watch test server (the real `kube` client and
//! watcher): the same enrollment, tunnel tables and policy checks as the local folder for the
//! same objects,
//! live changes followed, and again after a `410 Gone` forces a relist.

use std::time::{Duration, Instant};

use mesh_node::agent::{NetnsLookup, local_enrolled};
use mesh_node::cluster::ClusterObjects;
use mesh_node::kube_source::KubeSource;
use mesh_node::manifests::parse_documents;
use mesh_node::policies::{attach_policies, check_policies};
use mesh_node::tunnel_state::tunnel_state;
use test_apiserver::ApiServer;

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
metadata: {name: web, namespace: shop, uid: 0a0a0a0a-0000-4000-8000-00000000000a, labels: {app: web}, annotations: {weft.dev/netns: /proc/1/ns/net}}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: web, image: web, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Running, podIPs: [{ip: 10.1.1.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: shopper, namespace: shop, uid: 0b0b0b0b-0000-4000-8000-00000000000b, annotations: {weft.dev/netns: /run/netns/web}}
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
const OPT_OUT_SHOPPER: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: shopper, namespace: shop, uid: 0b0b0b0b-0000-4000-8000-00000000000b, labels: {weft.dev/mesh: disabled}, annotations: {weft.dev/netns: /run/netns/web}}\nspec: {nodeName: node1, containers: []}\nstatus: {phase: Running, podIP: 10.1.1.3}\n";

/// A `/proc` where the kubelet runs `web` (pid 100) and `shopper` (pid 200) in their pod
/// cgroups, as the agent finds them on a real node.
fn fake_proc() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for (pid, uid) in [
        (100, "0a0a0a0a_0000_4000_8000_00000000000a"),
        (200, "0b0b0b0b_0000_4000_8000_00000000000b"),
    ] {
        let dir = root.path().join(pid.to_string());
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("cgroup"),
            format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/cri-containerd-1.scope\n"),
        )
        .unwrap();
    }
    root
}

/// How the agent finds namespaces with the Kubernetes source.
fn uid_only(proc: &tempfile::TempDir) -> NetnsLookup {
    NetnsLookup::UidOnly {
        proc_root: proc.path().to_owned(),
    }
}

/// What the agent derives: node1's enrolled pods and the tunnel tables.
fn results(objects: &ClusterObjects, lookup: &NetnsLookup) -> String {
    let (enrolled, problems) = local_enrolled(objects, "node1", lookup);
    let report = check_policies(objects);
    let mut state = tunnel_state(objects);
    attach_policies(&mut state, &report, objects, "node1", "weft-system");
    // By name: the API server's copies carry metadata (uid, resourceVersion) the folder's lack.
    let policies: Vec<String> = report
        .policies
        .iter()
        .map(|p| policy::name_of(&p.metadata))
        .collect();
    let authentications: Vec<String> = report
        .authentications
        .iter()
        .map(|a| policy::name_of(&a.metadata))
        .collect();
    format!(
        "{enrolled:?}\n{problems:?}\n{state:?}\n{policies:?}\n{authentications:?}\n{:?}",
        report.refused
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

async fn converges(source: &KubeSource, texts: &[&str], what: &str, lookup: &NetnsLookup) {
    let want = results(&from_folder(texts), lookup);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = results(&source.objects(), lookup);
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
    let client = {
        mesh_node::install_default_crypto_provider();
        kube::Client::try_from(config).unwrap()
    };
    let source = KubeSource::start(client);
    let proc = fake_proc();
    let lookup = uid_only(&proc);
    tokio::time::timeout(Duration::from_secs(15), source.wait_until_ready())
        .await
        .expect("the first lists arrive");
    assert!(source.ready());
    converges(&source, &[CLUSTER], "initial list", &lookup).await;
    let (enrolled, _) = local_enrolled(&source.objects(), "node1", &lookup);
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
    converges(
        &source,
        &[CLUSTER, MANUAL_NOT_READY],
        "endpoint not ready",
        &lookup,
    )
    .await;
    assert_eq!(manual(&source.objects()), Some((vec![], 9001)));
    let policies = check_policies(&source.objects());
    assert_eq!(
        (policies.policies.len(), policies.authentications.len()),
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
        &lookup,
    )
    .await;
    let (enrolled, _) = local_enrolled(&source.objects(), "node1", &lookup);
    assert_eq!(
        enrolled.keys().collect::<Vec<_>>(),
        ["shop/shopper", "shop/web"]
    );
    // Each pod's author annotated another namespace (the host's, a neighbour's): the agent
    // finds each by its UID and never looks at the annotation.
    assert_eq!(enrolled["shop/web"].netns, proc.path().join("100/ns/net"));
    assert_eq!(
        enrolled["shop/shopper"].netns,
        proc.path().join("200/ns/net")
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
        &lookup,
    )
    .await;
    let (enrolled, _) = local_enrolled(&source.objects(), "node1", &lookup);
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
    // What the source asked of the API is exactly what its list in api_access grants.
    let mut asked = server.accesses();
    let mut granted: Vec<(String, String, String)> = mesh_node::api_access::WATCHED
        .iter()
        .flat_map(|a| {
            a.verbs
                .iter()
                .map(|v| (a.group.to_owned(), a.resource.to_owned(), (*v).to_owned()))
        })
        .collect();
    asked.sort();
    granted.sort();
    assert_eq!(asked, granted, "requests made vs api_access::WATCHED");
}
