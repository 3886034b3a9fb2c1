//! The controller role against the list/watch test API server (the real `kube` client): two
//! replicas elect one leader with a Lease; the leader writes each policy object's
//! `status.conditions` through the status subresource (valid, invalid with its field,
//! tightened with its rule), once, and again when the object changes; when the leader stops,
//! the other replica takes the Lease over and goes on.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_node::controller::{ControllerSettings, ControllerStatus, run_controller};
use serde_json::Value;
use test_apiserver::ApiServer;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: node1, containers: [{name: db, image: db}]}
status: {phase: Running, podIP: 10.1.1.3}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.3, selector: {app: db}, ports: [{name: tcp-db, port: 5432}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: good, namespace: shop, generation: 1}
spec: {action: Deny, rules: [{from: [{source: {namespaces: [legacy]}}]}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: typo, namespace: shop, generation: 3}
spec: {rules: [{to: [{operation: {ports: ["99999"]}}]}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: db-no-admin, namespace: shop, generation: 1}
spec: {selector: {matchLabels: {app: db}}, action: Deny, rules: [{to: [{operation: {paths: ["/admin*"]}}]}]}
---
apiVersion: weft.dev/v1alpha1
kind: MeshAuthentication
metadata: {name: strict, namespace: shop, generation: 2}
spec: {mode: Strict}
"#;

/// One replica running in the background; stopped when dropped.
struct Replica {
    status: Arc<Mutex<ControllerStatus>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Replica {
    fn start(server: &ApiServer, identity: &str) -> Replica {
        let config = kube::Config::new(server.url().parse().unwrap());
        let client = {
            mesh_node::install_default_crypto_provider();
            kube::Client::try_from(config).unwrap()
        };
        let settings = ControllerSettings {
            lease_namespace: "weft-system".into(),
            lease_name: "weft-controller".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(1),
            root_namespace: "weft-system".into(),
        };
        let status = Arc::new(Mutex::new(ControllerStatus::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_controller(
            client,
            settings,
            status.clone(),
            None,
            async {
                let _ = stopped.await;
            },
        ));
        Replica {
            status,
            stop: Some(stop),
            task,
        }
    }

    fn leading(&self) -> bool {
        self.status.lock().unwrap().leading
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = (&mut self.task).await;
    }
}

/// Waits up to ten seconds for `check` to give `Some`.
async fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `Accepted` condition of an object: (status, reason, message, observedGeneration).
fn accepted(server: &ApiServer, kind: &str, name: &str) -> Option<(String, String, String, i64)> {
    let object = server.get(kind, "shop", name)?;
    let condition = object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    Some((
        text(&condition["status"]),
        text(&condition["reason"]),
        text(&condition["message"]),
        condition["observedGeneration"].as_i64().unwrap_or(-1),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_writes_each_status_once_and_another_takes_over() {
    let server = ApiServer::start().await;
    server.apply(CLUSTER);
    let a = Replica::start(&server, "controller-a");
    let b = Replica::start(&server, "controller-b");
    let holder = until("a leader", || {
        let lease = server.get("Lease", "weft-system", "weft-controller")?;
        lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
    })
    .await;
    let (leader, follower) = if holder == "controller-a" {
        (a, b)
    } else {
        (b, a)
    };
    until("the replicas to agree", || {
        (leader.leading() && !follower.leading()).then_some(())
    })
    .await;

    let good = until("good's status", || accepted(&server, "MeshPolicy", "good")).await;
    assert_eq!(good, ("True".into(), "Valid".into(), String::new(), 1));
    let typo = until("typo's status", || accepted(&server, "MeshPolicy", "typo")).await;
    assert_eq!(
        (typo.0.as_str(), typo.1.as_str(), typo.3),
        ("False", "Invalid", 3)
    );
    assert!(
        typo.2
            .contains("spec.rules[0].to[0].operation.ports[0]: \"99999\" is not a port"),
        "the message names the field: {}",
        typo.2
    );
    let tightened = until("db-no-admin's status", || {
        accepted(&server, "MeshPolicy", "db-no-admin")
    })
    .await;
    assert_eq!(
        (tightened.0.as_str(), tightened.1.as_str()),
        ("True", "Tightened")
    );
    assert!(
        tightened.2.starts_with(
            "spec.rules[0] names HTTP fields, but Service shop/db declares port 5432 is not HTTP"
        ) && tightened
            .2
            .contains("denies every connection it matches there"),
        "{}",
        tightened.2
    );
    let strict = until("strict's status", || {
        accepted(&server, "MeshAuthentication", "strict")
    })
    .await;
    assert_eq!(strict, ("True".into(), "Valid".into(), String::new(), 2));

    // Written once each: later passes find the status already true.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let patches = server.status_patches();
    assert_eq!(patches.len(), 4, "one write per object: {patches:#?}");

    // A fix is seen and written again.
    server.apply(
        "apiVersion: weft.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: typo, namespace: shop, generation: 4}\nspec: {rules: [{to: [{operation: {ports: [\"9999\"]}}]}]}\n",
    );
    let fixed = until("typo fixed", || {
        accepted(&server, "MeshPolicy", "typo").filter(|a| a.0 == "True")
    })
    .await;
    assert_eq!(fixed, ("True".into(), "Valid".into(), String::new(), 4));

    // The leader stops (giving the Lease up): the follower leads and writes what comes next.
    leader.stop().await;
    until("the follower to lead", || follower.leading().then_some(())).await;
    server.apply(
        "apiVersion: weft.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: late, namespace: shop, generation: 1}\nspec: {rules: [{to: [{operation: {ports: [\"0\"]}}]}]}\n",
    );
    let late = until("late's status", || accepted(&server, "MeshPolicy", "late")).await;
    assert_eq!((late.0.as_str(), late.1.as_str()), ("False", "Invalid"));
    let lease = server
        .get("Lease", "weft-system", "weft-controller")
        .unwrap();
    assert_ne!(lease["spec"]["holderIdentity"], holder.as_str());
    follower.stop().await;
    // Every request the replicas made is one the controller's RBAC list grants.
    let granted = mesh_node::api_access::controller();
    for (group, resource, verb) in server.accesses() {
        assert!(
            mesh_node::api_access::allows(&granted, &group, &resource, &verb),
            "the controller asked {verb} {group}/{resource}, not in api_access::controller()"
        );
    }
}
