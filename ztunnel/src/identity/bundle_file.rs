//! The trust bundle file the CA publishes (locally a file it writes, on Kubernetes a
//! ConfigMap's volume): waited for at start while it does not exist yet (a new cluster's CA
//! publishes it shortly after the node pods start), read (a bundle that is there but does not
//! parse stops the start, with the reason), and followed, so that a root rotation's new bundle
//! is trusted within a second of being written. Later, a bundle that does not parse is
//! refused with a warning and the one in use stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tracing::{info, warn};
use tunnel_proto::file_trust::read_trusted;
use tunnel_proto::last_failure::LastFailure;

use super::CertificateError;
use crate::tls::TrustBundle;

/// How often the file is looked at.
const POLL: Duration = Duration::from_secs(1);

/// Largest bundle read (a few roots are a few KiB).
const LIMIT: u64 = 1 << 20;

/// Reads the bundle at `path` and follows it in the background for as long as the returned
/// bundle lives.
pub fn load(
    path: &Path,
    crypto: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<TrustBundle>, CertificateError> {
    let roots = read(path)?;
    let count = roots.len();
    let bundle = TrustBundle::new(crypto, roots).map_err(|e| CertificateError::BadPem {
        path: path.to_owned(),
        what: "trust bundle",
        reason: e.to_string(),
    })?;
    info!(path = %path.display(), roots = count, "trust bundle loaded");
    tokio::spawn(follow(path.to_owned(), Arc::downgrade(&bundle)));
    Ok(bundle)
}

/// [`load`], once the file exists: until then, looks every second and says once what it waits
/// for.
pub async fn load_when_present(
    path: &Path,
    crypto: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<TrustBundle>, CertificateError> {
    let mut said = false;
    while !path.exists() {
        if !said {
            info!(path = %path.display(), "waiting for the trust bundle (the mesh CA publishes it; on Kubernetes, the ConfigMap weft-trust-bundle)");
            said = true;
        }
        tokio::time::sleep(POLL).await;
    }
    load(path, crypto)
}

async fn follow(path: PathBuf, bundle: std::sync::Weak<TrustBundle>) {
    let mut failure = LastFailure::default();
    loop {
        tokio::time::sleep(POLL).await;
        let Some(bundle) = bundle.upgrade() else {
            return;
        };
        let replaced = read(&path).and_then(|roots| {
            let count = roots.len();
            bundle
                .replace(roots)
                .map(|changed| changed.then_some(count))
                .map_err(|e| CertificateError::BadPem {
                    path: path.clone(),
                    what: "trust bundle",
                    reason: e.to_string(),
                })
        });
        match replaced {
            Ok(Some(count)) => {
                failure.clear();
                info!(path = %path.display(), roots = count, "trust bundle changed: peers are verified against the new roots");
            }
            Ok(None) => failure.clear(),
            Err(error) => {
                let text = error.to_string();
                if failure.is_new(&text) {
                    warn!("{text}; the bundle in use stays");
                }
            }
        }
    }
}

fn read(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertificateError> {
    let text = read_trusted(path, LIMIT)?;
    let roots = rustls_pemfile::certs(&mut text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertificateError::BadPem {
            path: path.to_owned(),
            what: "trust bundle",
            reason: e.to_string(),
        })?;
    if roots.is_empty() {
        return Err(CertificateError::BadPem {
            path: path.to_owned(),
            what: "trust bundle",
            reason: "no PEM CERTIFICATE block".into(),
        });
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::local_ca::LocalCa;

    #[tokio::test]
    async fn a_bundle_not_published_yet_is_waited_for_and_a_bad_one_refused() {
        let crypto = Arc::new(rustls::crypto::ring::default_provider());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roots.pem");
        let waiting = tokio::spawn({
            let (path, crypto) = (path.clone(), crypto.clone());
            async move { load_when_present(&path, crypto).await }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!waiting.is_finished(), "no bundle yet: still waiting");
        // Published (as the kubelet does: the file appears whole).
        let made = tempfile::tempdir().unwrap();
        let (pem, _) = LocalCa::create_root(made.path(), "cluster.local").unwrap();
        std::fs::copy(pem, &path).unwrap();
        let bundle = tokio::time::timeout(Duration::from_secs(3), waiting)
            .await
            .expect("loaded within a second or two of appearing")
            .unwrap();
        assert!(bundle.is_ok());

        // A file that is there but not a bundle stops the start with the reason.
        std::fs::write(&path, "not a certificate\n").unwrap();
        let refused = load_when_present(&path, crypto).await.err().unwrap();
        assert!(refused.to_string().contains("roots.pem"), "{refused}");
    }
}
