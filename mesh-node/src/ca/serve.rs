//! The CA's endpoint: gRPC over TLS (HTTP/2, ALPN `h2`), with a serving certificate the CA
//! signs for itself (its DNS names) from a key made in memory, renewed at half life and when
//! the CA's key changes. Callers verify it against the trust bundle, as they verify peers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::service::CaService;
use super::{CaError, MeshCa};
use crate::relay::service::RelayService;

/// A caller must finish its TLS handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The serving certificate, swapped in place when renewed.
#[derive(Debug)]
pub struct ServingCertificate {
    names: Vec<String>,
    current: ArcSwap<CertifiedKey>,
}

impl ServingCertificate {
    /// Signs a first certificate for `names` with `ca`.
    pub fn new(ca: &MeshCa, names: Vec<String>) -> Result<Arc<ServingCertificate>, CaError> {
        let key = certified_key(ca, &names)?;
        Ok(Arc::new(ServingCertificate {
            names,
            current: ArcSwap::from_pointee(key),
        }))
    }

    /// Signs a new one with `ca` (after the CA's key changed, or at half life).
    pub fn renew(&self, ca: &MeshCa) -> Result<(), CaError> {
        self.current
            .store(Arc::new(certified_key(ca, &self.names)?));
        Ok(())
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified_key(ca: &MeshCa, names: &[String]) -> Result<CertifiedKey, CaError> {
    let (chain_pem, key_pem) = ca.serving_certificate(names)?;
    let bad = |e: String| CaError::Signing(format!("the serving certificate: {e}"));
    let chain = chain_pem
        .iter()
        .map(|pem| rustls_pemfile::certs(&mut pem.as_bytes()).collect::<Result<Vec<_>, _>>())
        .collect::<Result<Vec<_>, _>>()
        .map(|chains| chains.into_iter().flatten().collect::<Vec<_>>())
        .map_err(|e| bad(e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("no key".into()))?;
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| bad(e.to_string()))?;
    Ok(CertifiedKey::new(chain, signing_key))
}

/// Serves `service` (and the flow relay, which authenticates nodes as the CA does) on `listener` over TLS with `certificate` until `stop`.
pub async fn serve(
    listener: TcpListener,
    certificate: Arc<ServingCertificate>,
    service: CaService,
    relay: RelayService,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), CaError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| CaError::Signing(e.to_string()))?
    .with_no_client_auth()
    .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // Handshakes run on their own tasks: a slow caller holds up no other.
    let accepting = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accepting a CA connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                    Ok(Err(error)) => debug!(%peer, %error, "CA client's TLS handshake failed"),
                    Err(_) => debug!(%peer, "CA client's TLS handshake timed out"),
                }
            });
        }
    });
    let incoming = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let served = ca_api::tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(service.into_server())
        .add_service(relay.into_server())
        .serve_with_incoming_shutdown(incoming, stop)
        .await;
    accepting.abort();
    served.map_err(|e| CaError::Signing(format!("the CA's gRPC server: {e}")))
}

/// Where the CA listens; for logs.
pub fn describe(addr: SocketAddr, names: &[String]) -> String {
    format!("{addr} (serving as {})", names.join(", "))
}
