//! Everything that can go wrong with one proxied connection, and how it is reported.

use std::net::SocketAddr;

use http::StatusCode;

use crate::identity::CertificateError;
use crate::tls::TlsError;

/// Why a proxied connection failed. Each maps to a `response_flags` value for metrics and logs
/// and, on the inbound side, to the HTTP status of the CONNECT response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("SOCKS5 request refused: {0}")]
    Socks(String),
    #[error("cannot read the original destination of a captured connection: {0}")]
    OriginalDestination(std::io::Error),
    #[error("service {service} has no endpoints to send to")]
    NoHealthyUpstream { service: String },
    #[error("connection to {addr} failed: {source}; is the application listening on that port?")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot reach the tunnel at {addr}: {source}; maybe a NetworkPolicy blocks HBONE port 15008"
    )]
    HboneConnect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("timed out connecting to {addr}; maybe a NetworkPolicy blocks port {}", addr.port())]
    ConnectTimeout { addr: SocketAddr },
    #[error("TLS handshake with {addr} failed: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
    /// Boxed: certificate errors carry an identity and a reason, and every connection's
    /// task holds room for its error type.
    #[error("no certificate for the source workload: {0}")]
    Certificate(Box<CertificateError>),
    #[error("TLS configuration: {0}")]
    Tls(#[from] TlsError),
    #[error("HTTP/2 error: {0}")]
    Http2(#[from] h2::Error),
    #[error("the peer tunnel refused CONNECT {target} with {status}{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    ConnectRefused {
        target: SocketAddr,
        status: StatusCode,
        reason: Option<String>,
    },
    #[error("CONNECT target {0:?} is not an address:port")]
    BadTarget(String),
    #[error("this listener serves {serves}, not {target}")]
    Misdirected { target: SocketAddr, serves: String },
    #[error("method {0} is not supported; HBONE uses CONNECT")]
    BadMethod(http::Method),
    #[error("I/O error while copying: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}; the stream is refused")]
    Overflow(#[from] crate::proxy::admission::AdmissionRefused),
    #[error("denied: {reason}")]
    Denied {
        reason: String,
        /// The policy (or the Allow policies, joined) that decided; none for a mode's refusal.
        policy: Option<String>,
    },
    #[error(
        "bytes that are not HTTP on port {port}, which is served as HTTP: {reason}; the connection is refused"
    )]
    NotHttp { port: u16, reason: String },
    #[error("HTTP connection failed: {0}")]
    HttpConnection(String),
}

impl ProxyError {
    /// The policy that refused, for a refusal a policy decided.
    pub fn policy(&self) -> Option<&str> {
        match self {
            ProxyError::Denied { policy, .. } => policy.as_deref(),
            _ => None,
        }
    }

    /// Envoy-style short flag for the `response_flags` label and the access log.
    pub fn response_flags(&self) -> &'static str {
        match self {
            ProxyError::Socks(_) | ProxyError::BadTarget(_) | ProxyError::BadMethod(_) => "DPE",
            ProxyError::OriginalDestination(_) => "NOD",
            ProxyError::NoHealthyUpstream { .. } => "UH",
            ProxyError::Connect { .. } | ProxyError::HboneConnect { .. } => "UF",
            ProxyError::ConnectTimeout { .. } => "UT",
            ProxyError::Handshake { .. } | ProxyError::Tls(_) => "TLS",
            ProxyError::Certificate(_) => "CERT",
            ProxyError::Http2(_) => "H2",
            ProxyError::ConnectRefused { .. } => "URX",
            ProxyError::Misdirected { .. } => "NR",
            ProxyError::Io(_) => "IO",
            // Envoy's flag for a limit reached (upstream overflow).
            ProxyError::Overflow(_) => "UO",
            ProxyError::Denied { .. } => "DENY",
            ProxyError::NotHttp { .. } => "DPE",
            ProxyError::HttpConnection(_) => "IO",
        }
    }

    /// HTTP status answering a CONNECT that failed for this reason.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadTarget(_) => StatusCode::BAD_REQUEST,
            ProxyError::BadMethod(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::ConnectTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Denied { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<CertificateError> for ProxyError {
    fn from(error: CertificateError) -> Self {
        ProxyError::Certificate(Box::new(error))
    }
}
