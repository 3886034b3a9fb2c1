//! A bare HBONE client for refusal cases: presents whatever certificate a test hands it and
//! reports exactly how the tunnel answered.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Accepts any server: these cases test the *server's* checks.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The tunnel's answer to one CONNECT.
#[derive(Debug)]
pub struct ConnectAnswer {
    pub status: u16,
    /// The `weft-error` header, if any.
    pub reason: Option<String>,
}

/// Opens TLS 1.3 with ALPN `h2` (with `client_cert`, or none) to `addr`.
pub async fn tls(
    addr: SocketAddr,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let crypto = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(crypto.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(crypto)));
    let mut config = match client_cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .context("TCP connect")?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .context("TLS handshake")
}

/// Opens TLS (with `client_cert`, or none) to `addr`, then sends `CONNECT target`.
/// Any TLS or HTTP/2 failure is an `Err` whose text says where it failed.
pub async fn connect(
    addr: SocketAddr,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    target: &str,
) -> Result<ConnectAnswer> {
    let tls = tls(addr, client_cert).await?;
    let (sender, connection) = h2::client::handshake(tls)
        .await
        .context("HTTP/2 handshake")?;
    let driver = tokio::spawn(connection);
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target)
        .body(())?;
    let mut sender = sender.ready().await.context("HTTP/2 ready")?;
    let (response, _send) = sender
        .send_request(request, false)
        .context("send CONNECT")?;
    let response = response.await.context("CONNECT response")?;
    let answer = ConnectAnswer {
        status: response.status().as_u16(),
        reason: response
            .headers()
            .get("weft-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    driver.abort();
    Ok(answer)
}

/// Runs [`connect`] on a fresh runtime inside a pod's namespace.
pub fn connect_from(
    netns: &crate::netns::Netns,
    addr: SocketAddr,
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    target: &str,
) -> Result<ConnectAnswer> {
    let target = target.to_owned();
    netns
        .block_on(move || async move { connect(addr, client_cert, &target).await })?
        .map_err(|e| anyhow!("{e:#}"))
}
