//! The wire APIs between Weft's tunnels and the controller: the mesh CA, Istio's
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` over gRPC, so that Weft's tunnels
//! can use istiod as their CA and Istio's ztunnel can use Weft's; and the flow relay,
//! `weft.flows.v1.FlowRelay/Offer`, which each tunnel calls to offer its flow events to
//! `weft observe` through the controller (served on the CA's port, under the same TLS and the
//! same node authentication).

#![allow(clippy::doc_markdown, clippy::default_trait_access)]

/// The generated messages, client and server.
pub mod istio {
    tonic::include_proto!("istio.v1.auth");
}

/// The flow relay's messages, client and server.
pub mod flows {
    tonic::include_proto!("weft.flows.v1");
}

pub use flows::flow_relay_client::FlowRelayClient;
pub use flows::flow_relay_server::{FlowRelay, FlowRelayServer};

pub use istio::istio_certificate_service_client::IstioCertificateServiceClient;
pub use istio::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
pub use istio::{IstioCertificateRequest, IstioCertificateResponse};

/// The metadata key under which a node names the identity it asks a certificate for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The port istiod serves its CA on; Weft's controller serves it there too.
pub const DEFAULT_PORT: u16 = 15012;

/// The request's metadata naming `identity` (a SPIFFE ID) as the one asked for.
pub fn impersonating(identity: &str) -> prost_types::Struct {
    let value = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(identity.to_owned())),
    };
    prost_types::Struct {
        fields: [(IMPERSONATED_IDENTITY.to_owned(), value)].into(),
    }
}

/// The identity a request's metadata names, if it names one as a string.
pub fn impersonated(request: &IstioCertificateRequest) -> Option<&str> {
    match request
        .metadata
        .as_ref()?
        .fields
        .get(IMPERSONATED_IDENTITY)?
        .kind
        .as_ref()?
    {
        prost_types::value::Kind::StringValue(s) => Some(s),
        _ => None,
    }
}

/// The tonic these types are built for, for callers to serve and call them with.
pub use tonic;
