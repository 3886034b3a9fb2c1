//! The trust bundle: the roots peers are verified against, replaced in place when the CA
//! publishes a new one (a root rotation adds the new root beside the old, then drops the old).
//! Handshakes load the roots of the moment; a verifier is built once per bundle, not per
//! handshake.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use super::TlsError;

/// One version of the bundle.
#[derive(Debug)]
pub struct Roots {
    pub store: Arc<RootCertStore>,
    pub ders: Vec<CertificateDer<'static>>,
    /// Verifies a client's chain against these roots (the SPIFFE checks come after).
    pub client_verifier: Arc<dyn ClientCertVerifier>,
}

/// The bundle of the moment.
#[derive(Debug)]
pub struct TrustBundle {
    crypto: Arc<CryptoProvider>,
    current: ArcSwap<Roots>,
}

impl TrustBundle {
    /// A bundle of `roots` (at least one).
    pub fn new(
        crypto: Arc<CryptoProvider>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<TrustBundle>, TlsError> {
        let first = build(&crypto, roots)?;
        Ok(Arc::new(TrustBundle {
            crypto,
            current: ArcSwap::from_pointee(first),
        }))
    }

    /// Replaces the roots with `roots`; false if they are the ones in use. A bad bundle is an
    /// error and the current one stays.
    pub fn replace(&self, roots: Vec<CertificateDer<'static>>) -> Result<bool, TlsError> {
        if self.current.load().ders == roots {
            return Ok(false);
        }
        self.current.store(Arc::new(build(&self.crypto, roots)?));
        Ok(true)
    }

    /// The roots of the moment.
    pub fn current(&self) -> Arc<Roots> {
        self.current.load_full()
    }
}

fn build(
    crypto: &Arc<CryptoProvider>,
    ders: Vec<CertificateDer<'static>>,
) -> Result<Roots, TlsError> {
    if ders.is_empty() {
        return Err(TlsError::BadCertificate(
            "the trust bundle holds no root".into(),
        ));
    }
    let mut store = RootCertStore::empty();
    for root in &ders {
        store
            .add(root.clone())
            .map_err(|e| TlsError::BadCertificate(format!("trust root: {e}")))?;
    }
    let store = Arc::new(store);
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(store.clone(), crypto.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Roots {
        store,
        ders,
        client_verifier,
    })
}
