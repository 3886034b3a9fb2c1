//! The CA's gRPC service, Istio's `IstioCertificateService/CreateCertificate`: authenticates
//! the calling node, reads the identity it asks for from the request's `ImpersonatedIdentity`
//! metadata, signs only if a pod of that service account runs on that node, and answers with
//! the leaf, the intermediates and the root. Each refusal is logged with its reason and the
//! caller is told only that it was refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ca_api::tonic::{self, Request, Response, Status};
use ca_api::{IstioCertificateRequest, IstioCertificateResponse};
use tracing::{info, warn};

use super::authenticate::Authenticator;
use super::{MeshCa, may_hold};
use crate::cluster::ClusterObjects;

/// Largest request the CA reads: a CSR is under a kilobyte; anything far larger is not one.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Each node's requests: a burst as large as a node's pods starting at once, then a steady
/// rate that renewals never come near.
const BURST_PER_NODE: f64 = 200.0;
const RATE_PER_NODE: f64 = 20.0;

/// What the caller is told of any refusal (the CA's log says why).
const REFUSED: &str = "certificate request refused (the mesh CA's log says why)";

/// The service; cheap to clone.
#[derive(Clone)]
pub struct CaService {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<ArcSwap<MeshCa>>,
    authenticator: Arc<Authenticator>,
    cluster: tokio::sync::watch::Receiver<Arc<ClusterObjects>>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl CaService {
    /// Signs with whatever CA `ca` holds at each request, authorizing against `cluster`.
    pub fn new(
        ca: Arc<ArcSwap<MeshCa>>,
        authenticator: Arc<Authenticator>,
        cluster: tokio::sync::watch::Receiver<Arc<ClusterObjects>>,
    ) -> CaService {
        CaService {
            inner: Arc::new(Inner {
                ca,
                authenticator,
                cluster,
                buckets: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The tonic server for this service, reading at most [`MAX_REQUEST_BYTES`] a request.
    pub fn into_server(self) -> ca_api::IstioCertificateServiceServer<CaService> {
        ca_api::IstioCertificateServiceServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Takes one request from `node`'s allowance; false when it is spent.
    fn admit(&self, node: &str) -> bool {
        let mut buckets = self
            .inner
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let bucket = buckets.entry(node.to_owned()).or_insert(Bucket {
            tokens: BURST_PER_NODE,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * RATE_PER_NODE;
        bucket.tokens = (bucket.tokens + refill).min(BURST_PER_NODE);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    async fn handle(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, Refusal> {
        let token = bearer(&request).ok_or(Refusal::Unauthenticated(
            super::authenticate::AuthError::NoToken.to_string(),
        ))?;
        let node = self
            .inner
            .authenticator
            .node(&token)
            .await
            .map_err(|e| Refusal::Unauthenticated(e.to_string()))?;
        if !self.admit(&node) {
            return Err(Refusal::TooMany { node });
        }
        let body = request.into_inner();
        let asked = ca_api::impersonated(&body).ok_or_else(|| Refusal::Forbidden {
            node: node.clone(),
            reason: "the request names no identity (ImpersonatedIdentity metadata); a node has none of its own".into(),
        })?;
        let ca = self.inner.ca.load_full();
        let (namespace, service_account) =
            workload_of(asked, ca.trust_domain()).map_err(|reason| Refusal::Forbidden {
                node: node.clone(),
                reason,
            })?;
        let cluster = self.inner.cluster.borrow().clone();
        may_hold(&cluster, &node, &namespace, &service_account).map_err(|e| {
            Refusal::Forbidden {
                node: node.clone(),
                reason: e.to_string(),
            }
        })?;
        let lifetime = u64::try_from(body.validity_duration)
            .ok()
            .filter(|s| *s > 0)
            .map_or(ca.lifetime(), Duration::from_secs);
        let issued = ca
            .sign_for(&body.csr, asked, lifetime)
            .map_err(|e| Refusal::Forbidden {
                node: node.clone(),
                reason: format!("for {asked}: {e}"),
            })?;
        let not_after = humantime::format_rfc3339_seconds(issued.not_after);
        info!(%node, identity = %asked, %not_after, "certificate signed");
        let mut cert_chain = issued.chain_pem;
        cert_chain.push(ca.signing_root().to_owned());
        Ok(IstioCertificateResponse { cert_chain })
    }
}

/// Why a request was not signed: for the log, never for the caller.
#[derive(Debug)]
enum Refusal {
    Unauthenticated(String),
    TooMany { node: String },
    Forbidden { node: String, reason: String },
}

#[tonic::async_trait]
impl ca_api::IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "an unknown address".to_owned(), |a| a.to_string());
        match self.handle(request).await {
            Ok(response) => Ok(Response::new(response)),
            Err(Refusal::Unauthenticated(reason)) => {
                warn!(%peer, "certificate request refused: caller not authenticated: {reason}");
                Err(Status::unauthenticated(REFUSED))
            }
            Err(Refusal::TooMany { node }) => {
                warn!(%peer, %node, "certificate request refused: over the node's rate ({RATE_PER_NODE}/s, bursts of {BURST_PER_NODE})");
                Err(Status::resource_exhausted(
                    "too many certificate requests from this node; retry later",
                ))
            }
            Err(Refusal::Forbidden { node, reason }) => {
                warn!(%peer, %node, "certificate request refused: {reason}");
                Err(Status::permission_denied(REFUSED))
            }
        }
    }
}

/// The token of the request's `authorization: Bearer <token>` metadata.
pub(crate) fn bearer<T>(request: &Request<T>) -> Option<String> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?
        .trim();
    (!token.is_empty()).then(|| token.to_owned())
}

/// The namespace and service account of `id`, a SPIFFE ID of `trust_domain` of the form
/// `spiffe://<td>/ns/<ns>/sa/<sa>`.
fn workload_of(id: &str, trust_domain: &str) -> Result<(String, String), String> {
    let parsed =
        spiffe::SpiffeId::new(id).map_err(|e| format!("{id:?} is not a SPIFFE ID: {e}"))?;
    if parsed.trust_domain().to_string() != trust_domain {
        return Err(format!(
            "{id} is of trust domain {}, the CA signs for {trust_domain}",
            parsed.trust_domain()
        ));
    }
    match parsed.path().split('/').collect::<Vec<_>>().as_slice() {
        ["", "ns", ns, "sa", sa] if !ns.is_empty() && !sa.is_empty() => {
            Ok(((*ns).to_owned(), (*sa).to_owned()))
        }
        _ => Err(format!(
            "{id} is not a workload identity (spiffe://{trust_domain}/ns/<namespace>/sa/<service account>)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_workload_identities_of_the_trust_domain_are_read() {
        assert_eq!(
            workload_of("spiffe://cluster.local/ns/shop/sa/web", "cluster.local"),
            Ok(("shop".into(), "web".into()))
        );
        for bad in [
            "spiffe://other.td/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/web?x=1",
            "spiffe://cluster.local/ns//sa/web",
            "https://cluster.local/ns/shop/sa/web",
        ] {
            assert!(workload_of(bad, "cluster.local").is_err(), "{bad} accepted");
        }
    }
}
