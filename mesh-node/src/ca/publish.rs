//! The trust bundle published where every node's tunnel can mount it: a ConfigMap in Weft's
//! namespace (`roots.pem`), which the install creates empty and the CA fills, and fills again
//! after every root rotation step. Every CA replica publishes (they share the root, so they
//! write the same bytes); a failed write is retried each second, and the kubelet brings the
//! new file to every node's tunnel, which follows it.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use tracing::{info, warn};

use super::MeshCa;

/// The key the roots are published under (the tunnels' `--trust-bundle` file name).
pub const BUNDLE_KEY: &str = "roots.pem";

/// How often the published bundle is compared with the CA's.
const EVERY: Duration = Duration::from_secs(1);

/// The ConfigMap `namespace/name` the bundle goes to.
#[derive(Clone)]
pub struct BundleConfigMap {
    pub client: kube::Client,
    pub namespace: String,
    pub name: String,
}

impl BundleConfigMap {
    /// Writes `roots` (PEM) under [`BUNDLE_KEY`], changing nothing else in the ConfigMap.
    pub async fn write(&self, roots: &str) -> Result<(), kube::Error> {
        let api: kube::Api<ConfigMap> = kube::Api::namespaced(self.client.clone(), &self.namespace);
        let patch = serde_json::json!({ "data": { BUNDLE_KEY: roots } });
        api.patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
    }

    /// Publishes the CA's bundle now and whenever it changes, until dropped.
    pub async fn follow(self, ca: Arc<ArcSwap<MeshCa>>) {
        let mut published = String::new();
        let mut last_error = String::new();
        loop {
            let roots = ca.load().trust_bundle().concat();
            if roots != published {
                match self.write(&roots).await {
                    Ok(()) => {
                        info!(configmap = %format!("{}/{}", self.namespace, self.name), roots = ca.load().trust_bundle().len(), "trust bundle published");
                        published = roots;
                        last_error.clear();
                    }
                    Err(error) => {
                        let text = error.to_string();
                        if text != last_error {
                            warn!(configmap = %format!("{}/{}", self.namespace, self.name), %error, "cannot publish the trust bundle (the install creates this ConfigMap); retrying every second");
                            last_error = text;
                        }
                    }
                }
            }
            tokio::time::sleep(EVERY).await;
        }
    }
}
