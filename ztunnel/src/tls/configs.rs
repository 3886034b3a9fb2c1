//! Builds the rustls configurations of HBONE listeners and HBONE client connections.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use super::TlsError;
use super::bundle::TrustBundle;
use super::verify::{SpiffeServerVerifier, TrustDomainClientVerifier};
use crate::identity::{CertificateManager, CertificateSlot, Identity};

/// ALPN protocol of HBONE.
const ALPN_H2: &[u8] = b"h2";

/// What every TLS configuration of this tunnel shares: crypto, trust bundle, trust domain.
#[derive(Clone, Debug)]
pub struct TlsContext {
    crypto: Arc<rustls::crypto::CryptoProvider>,
    bundle: Arc<TrustBundle>,
    trust_domain: String,
}

impl TlsContext {
    /// A context trusting the roots `bundle` holds at each handshake, for peers of
    /// `trust_domain`.
    pub fn new(
        crypto: Arc<rustls::crypto::CryptoProvider>,
        bundle: Arc<TrustBundle>,
        trust_domain: &str,
    ) -> Self {
        TlsContext {
            crypto,
            bundle,
            trust_domain: trust_domain.to_owned(),
        }
    }

    /// The trust bundle peers are verified against.
    pub fn bundle(&self) -> &Arc<TrustBundle> {
        &self.bundle
    }

    /// The crypto provider every configuration uses.
    pub fn crypto(&self) -> &Arc<rustls::crypto::CryptoProvider> {
        &self.crypto
    }

    /// The trust domain peers must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Configuration of a workload's HBONE listener: presents the current certificate of
    /// `identity` (a handshake before its first certificate has arrived is refused) and
    /// requires a client certificate of our trust domain.
    pub fn server_config(
        &self,
        certs: Arc<CertificateManager>,
        identity: Identity,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = Arc::new(TrustDomainClientVerifier {
            bundle: self.bundle.clone(),
            trust_domain: self.trust_domain.clone(),
        });
        let mut config = ServerConfig::builder_with_provider(self.crypto.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(IdentityResolver { certs, identity }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.max_early_data_size = 0;
        Ok(Arc::new(config))
    }

    /// Configuration of an HBONE connection presenting the source workload's certificate and
    /// accepting only a server that is one of `expected`.
    pub fn client_config(
        &self,
        slot: Arc<CertificateSlot>,
        expected: Vec<Identity>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = Arc::new(SpiffeServerVerifier {
            bundle: self.bundle.clone(),
            expected,
            crypto: self.crypto.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(self.crypto.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SlotResolver(slot)));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }
}

/// Presents an identity's certificate of the moment, once it has one: a pod's listeners
/// start before its first certificate arrives, and renewal needs no new config.
struct IdentityResolver {
    certs: Arc<CertificateManager>,
    identity: Identity,
}

impl std::fmt::Debug for IdentityResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityResolver")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let slot = self.certs.ready(&self.identity);
        if slot.is_none() {
            tracing::debug!(identity = %self.identity, "HBONE handshake refused: no certificate yet");
        }
        slot.map(|slot| slot.current().certified_key.clone())
    }
}

/// Presents whatever certificate the slot holds now, so renewal needs no new config.
#[derive(Debug)]
struct SlotResolver(Arc<CertificateSlot>);

impl ResolvesClientCert for SlotResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
