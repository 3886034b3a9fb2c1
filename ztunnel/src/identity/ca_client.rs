//! Workload certificates from the mesh CA (`mesh-node controller`, or any CA serving Istio's
//! `IstioCertificateService`): the key is made here and never leaves the node; a CSR naming
//! the workload's SPIFFE ID goes to the CA with the node's token, and the identity asked for in
//! the `ImpersonatedIdentity` metadata. The CA is reached over TLS and verified against the
//! trust bundle, under its DNS name. At most a few requests are in flight at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ca_api::tonic;
use ca_api::{IstioCertificateRequest, IstioCertificateServiceClient};
use futures_util::future::BoxFuture;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::sync::Semaphore;

use super::{CertificateError, CertificateProvider, Identity, WorkloadCertificate};
use crate::tls::{TrustBundle, peer_identity};

/// Requests in flight to the CA at once (a node starting many pods queues the rest).
const IN_FLIGHT: usize = 4;

/// One request, connection included, must be answered within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest token file read.
const TOKEN_LIMIT: u64 = 16 * 1024;

/// Where the CA is and how the tunnel proves its node.
#[derive(Clone, Debug)]
pub struct CaClientSettings {
    /// `host:port` of the CA.
    pub address: String,
    /// The DNS name the CA's serving certificate must carry.
    pub server_name: String,
    /// The node's token: a per-node token, or a projected service account token (audience
    /// weft-ca); read at each request, so a rotated token is picked up.
    pub token_file: PathBuf,
    /// The lifetime asked for (the CA may give less).
    pub lifetime: Duration,
}

/// Signs workload certificates through the mesh CA.
pub struct MeshCaClient {
    settings: CaClientSettings,
    client: IstioCertificateServiceClient<tonic::transport::Channel>,
    crypto: Arc<rustls::crypto::CryptoProvider>,
    in_flight: Semaphore,
}

impl MeshCaClient {
    /// A client of the CA at `settings.address`, verified against `bundle`'s roots of the
    /// moment. Connects on first use, and again after the connection is lost.
    pub fn new(
        settings: CaClientSettings,
        bundle: Arc<TrustBundle>,
        crypto: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<MeshCaClient, CertificateError> {
        let channel = controller_channel(
            &settings.address,
            &settings.server_name,
            Some(REQUEST_TIMEOUT),
            bundle,
            crypto.clone(),
        )?;
        Ok(MeshCaClient {
            settings,
            client: IstioCertificateServiceClient::new(channel),
            crypto,
            in_flight: Semaphore::new(IN_FLIGHT),
        })
    }

    async fn request(&self, identity: &Identity) -> Result<WorkloadCertificate, CertificateError> {
        let failed = |reason: String| CertificateError::Signing {
            identity: identity.clone(),
            reason,
        };
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| failed("the CA client is closed".into()))?;
        let (csr, key) = csr_for(identity).map_err(failed)?;
        let bearer = bearer(&self.settings.token_file)?;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.settings.lifetime.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(ca_api::impersonating(&identity.to_string())),
        });
        request.metadata_mut().insert("authorization", bearer);
        let issued_at = SystemTime::now();
        let response = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(|status| CertificateError::CaRefused {
                identity: identity.clone(),
                reason: format!("at {}: {}", self.settings.address, describe_status(&status)),
            })?
            .into_inner();
        let chain = response
            .cert_chain
            .iter()
            .map(|pem| rustls_pemfile::certs(&mut pem.as_bytes()).collect::<Result<Vec<_>, _>>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| failed(format!("the CA's answer does not parse: {e}")))?
            .into_iter()
            .flatten()
            .collect::<Vec<CertificateDer<'static>>>();
        // The last certificate is the root: peers have it in their bundle, it is not sent.
        let Some((leaf, rest)) = chain.split_first() else {
            return Err(failed("the CA answered with no certificate".into()));
        };
        let got = peer_identity(leaf).map_err(|e| failed(format!("the CA's certificate: {e}")))?;
        if &got != identity {
            return Err(failed(format!("the CA signed {got} instead")));
        }
        let not_after = not_after(leaf).map_err(failed)?;
        let mut sent = vec![leaf.clone()];
        sent.extend(rest.iter().take(rest.len().saturating_sub(1)).cloned());
        WorkloadCertificate::with_key(identity, sent, &key, &self.crypto, issued_at, not_after)
    }
}

impl CertificateProvider for MeshCaClient {
    fn fetch(
        &self,
        identity: &Identity,
    ) -> BoxFuture<'_, Result<WorkloadCertificate, CertificateError>> {
        let identity = identity.clone();
        Box::pin(async move { self.request(&identity).await })
    }
}

/// A gRPC channel to the controller at `address` (the CA, or the flow relay on its port),
/// over TLS verified against `bundle`'s roots of the moment under `server_name`. Connects on
/// first use, and again after the connection is lost. `timeout` bounds each call (none for a
/// call that stays open).
pub(crate) fn controller_channel(
    address: &str,
    server_name: &str,
    timeout: Option<Duration>,
    bundle: Arc<TrustBundle>,
    crypto: Arc<rustls::crypto::CryptoProvider>,
) -> Result<tonic::transport::Channel, CertificateError> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("https://{address}"))
        .map_err(|e| CertificateError::CaAddress {
            address: address.to_owned(),
            reason: e.to_string(),
        })?
        .connect_timeout(REQUEST_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30));
    if let Some(timeout) = timeout {
        endpoint = endpoint.timeout(timeout);
    }
    let server_name =
        ServerName::try_from(server_name.to_owned()).map_err(|e| CertificateError::CaAddress {
            address: server_name.to_owned(),
            reason: format!("not a DNS name: {e}"),
        })?;
    let address = address.to_owned();
    let connector = tower::service_fn(move |_: http::Uri| {
        let address = address.clone();
        let server_name = server_name.clone();
        let bundle = bundle.clone();
        let crypto = crypto.clone();
        async move {
            let config = ca_tls_config(&bundle, crypto)?;
            let tcp = tokio::net::TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// TLS to the CA: its certificate must chain to the bundle and carry its DNS name.
fn ca_tls_config(
    bundle: &TrustBundle,
    crypto: Arc<rustls::crypto::CryptoProvider>,
) -> std::io::Result<Arc<rustls::ClientConfig>> {
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        bundle.current().store.clone(),
        crypto.clone(),
    )
    .build()
    .map_err(std::io::Error::other)?;
    let mut config = rustls::ClientConfig::builder_with_provider(crypto)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(std::io::Error::other)?
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A new key and a CSR for `identity` with it: one URI SAN, nothing else.
fn csr_for(identity: &Identity) -> Result<(String, KeyPair), String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = identity.to_string();
    params.subject_alt_names = vec![SanType::URI(
        uri.try_into().map_err(|e: rcgen::Error| e.to_string())?,
    )];
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| e.to_string())?;
    Ok((csr, key))
}

/// The `authorization` value proving the node: `Bearer` and the token read from `path` now
/// (a rotated projected token is picked up).
pub(crate) fn bearer(
    path: &std::path::Path,
) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, CertificateError> {
    let token = read_token(path)?;
    format!("Bearer {token}")
        .parse()
        .map_err(|_| CertificateError::BadToken {
            path: path.to_owned(),
            reason: "not a valid header value".into(),
        })
}

fn read_token(path: &std::path::Path) -> Result<String, CertificateError> {
    use std::io::Read;
    let bad = |reason: String| CertificateError::BadToken {
        path: path.to_owned(),
        reason,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(TOKEN_LIMIT).read_to_string(&mut text))
        .map_err(|e| bad(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(bad("empty".into()));
    }
    Ok(token.to_owned())
}

fn not_after(leaf: &CertificateDer<'_>) -> Result<SystemTime, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let seconds = u64::try_from(cert.validity().not_after.timestamp())
        .map_err(|_| "the certificate expired before 1970".to_owned())?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

/// A gRPC failure as a log reads it: the CA's refusal, or why it could not be reached.
pub(crate) fn describe_status(status: &tonic::Status) -> String {
    use std::error::Error;
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = status.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
