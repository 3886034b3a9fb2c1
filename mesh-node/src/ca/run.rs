//! The CA as the controller runs it: loads (or creates) the key material, publishes the trust
//! bundle, serves CreateCertificate, and renews its own serving certificate at half life.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tracing::{info, warn};

use super::authenticate::Authenticator;
use super::serve::{ServingCertificate, describe, serve};
use super::service::CaService;
use super::{CaError, Created, MeshCa};
use crate::cluster::ClusterObjects;
use crate::relay::Relay;
use crate::relay::service::RelayService;

/// How the CA is set up.
#[derive(Clone, Debug)]
pub struct CaSettings {
    /// `ca.pem` and `ca.key` (created on first start if neither exists).
    pub dir: PathBuf,
    pub trust_domain: String,
    /// How long workload certificates live (a request may ask for less).
    pub lifetime: Duration,
    pub listen: SocketAddr,
    /// The DNS names of the CA's serving certificate (what callers verify).
    pub server_names: Vec<String>,
    /// Where the trust bundle (PEM roots) is written for tunnels, if anywhere.
    pub bundle_file: Option<PathBuf>,
}

/// Loads the CA and binds its endpoint (errors here stop the controller at start); the
/// returned future serves until `stop`.
pub async fn start_ca(
    settings: CaSettings,
    authenticator: Authenticator,
    cluster: tokio::sync::watch::Receiver<Arc<ClusterObjects>>,
) -> Result<RunningCa, CaError> {
    let (ca, created) =
        MeshCa::load_or_create(&settings.dir, &settings.trust_domain, settings.lifetime)?;
    match created {
        Created::NewRoot => {
            info!(dir = %settings.dir.display(), trust_domain = %settings.trust_domain, "no CA key found: created a new mesh root (ca.pem, ca.key)")
        }
        Created::Loaded => info!(dir = %settings.dir.display(), "mesh CA key loaded"),
    }
    if let Some(path) = &settings.bundle_file {
        write_bundle(path, ca.trust_bundle())?;
        info!(path = %path.display(), roots = ca.trust_bundle().len(), "trust bundle written");
    }
    let serving = ServingCertificate::new(&ca, settings.server_names.clone())?;
    let ca = Arc::new(ArcSwap::from_pointee(ca));
    let authenticator = Arc::new(authenticator);
    let service = CaService::new(ca.clone(), authenticator.clone(), cluster);
    let relay = Relay::new();
    let relay_service = RelayService::new(relay.clone(), authenticator);
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| CaError::Listen {
            addr: settings.listen,
            source,
        })?;
    let bound = listener.local_addr().unwrap_or(settings.listen);
    info!(endpoint = %describe(bound, &settings.server_names), "mesh CA serving CreateCertificate");
    Ok(RunningCa {
        bound,
        relay,
        relay_service,
        publish: None,
        ca,
        serving,
        service,
        listener,
        settings,
    })
}

/// A CA ready to serve.
pub struct RunningCa {
    pub bound: SocketAddr,
    /// The flow relay served beside the CA, for its users' endpoint.
    pub relay: Arc<Relay>,
    relay_service: RelayService,
    /// Where the bundle is published besides `bundle_file`, if anywhere.
    publish: Option<super::publish::BundleConfigMap>,
    ca: Arc<ArcSwap<MeshCa>>,
    serving: Arc<ServingCertificate>,
    service: CaService,
    listener: tokio::net::TcpListener,
    settings: CaSettings,
}

impl RunningCa {
    /// Also publishes the trust bundle in `configmap` while serving.
    pub fn publish_to(mut self, configmap: super::publish::BundleConfigMap) -> Self {
        self.publish = Some(configmap);
        self
    }

    /// Serves until `stop`.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> Result<(), CaError> {
        let renew = {
            let ca = self.ca.clone();
            let serving = self.serving.clone();
            let every = self.settings.lifetime / 2;
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(error) = serving.renew(&ca.load()) {
                        warn!(%error, "renewing the CA's serving certificate failed; the current one stays");
                    }
                }
            }
        };
        let follow = follow_files(self.ca.clone(), self.serving.clone(), self.settings.clone());
        let publish = {
            let (target, ca) = (self.publish.clone(), self.ca.clone());
            async move {
                match target {
                    Some(configmap) => configmap.follow(ca).await,
                    None => std::future::pending().await,
                }
            }
        };
        // The relay's calls never end by themselves: they are ended first, or the server's
        // graceful stop would wait for them for ever.
        let relay = self.relay.clone();
        let stop = async move {
            stop.await;
            relay.close();
        };
        tokio::select! {
            served = serve(self.listener, self.serving, self.service, self.relay_service, stop) => served,
            () = renew => Ok(()),
            () = follow => Ok(()),
            () = publish => Ok(()),
        }
    }
}

/// How often the CA's folder is looked at for a rotation step.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// Loads the CA again when its files change (a root staged, promoted or retired): the new
/// signer signs from then on, the serving certificate is renewed with it, the bundle is
/// written again. Files that do not load (a step half done) keep the CA as it was.
async fn follow_files(
    ca: Arc<ArcSwap<MeshCa>>,
    serving: Arc<ServingCertificate>,
    settings: CaSettings,
) {
    let mut seen = super::fingerprint(&settings.dir);
    let mut last_error = String::new();
    loop {
        tokio::time::sleep(FOLLOW_EVERY).await;
        let now = super::fingerprint(&settings.dir);
        if now == seen {
            continue;
        }
        match MeshCa::reload(&settings.dir, &settings.trust_domain, settings.lifetime) {
            Ok(fresh) => {
                seen = now;
                last_error.clear();
                let signer_changed = fresh.signing_root() != ca.load().signing_root();
                if let Some(path) = &settings.bundle_file
                    && let Err(error) = write_bundle(path, fresh.trust_bundle())
                {
                    warn!(%error, "writing the trust bundle failed; retrying");
                    seen.clear();
                }
                info!(
                    roots = fresh.trust_bundle().len(),
                    signer_changed, "mesh CA files changed: reloaded"
                );
                ca.store(Arc::new(fresh));
                if signer_changed && let Err(error) = serving.renew(&ca.load()) {
                    warn!(%error, "renewing the CA's serving certificate under the new root failed");
                }
            }
            Err(error) => {
                let text = error.to_string();
                if text != last_error {
                    warn!("mesh CA files changed but do not load: {text}; signing as before");
                    last_error = text;
                }
            }
        }
    }
}

/// Writes the bundle atomically (a reader sees the old file or the new, never half of one),
/// readable by all: it holds only public certificates.
fn write_bundle(path: &std::path::Path, roots: &[String]) -> Result<(), CaError> {
    let failed = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let temporary = path.with_extension("pem.tmp");
    std::fs::write(&temporary, roots.concat()).map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)
}
