//! The trust bundle file the CA publishes (locally a file it writes, on Kubernetes a
//! ConfigMap's volume): read at start (the tunnel does not start without one) and followed, so
//! that a root rotation's new bundle is trusted within a second of being written. A bundle that
//! does not parse is refused with a warning and the one in use stays.

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
