//! `FlowRelay/Offer`, served on the CA's port: a node's tunnel calls it and keeps the call
//! open. The caller is authenticated as the CA authenticates it (its node's token, or its pod's
//! service-account token by TokenReview); the node it proves is the only node its events may
//! name.

use std::pin::Pin;
use std::sync::Arc;

use ca_api::flows::{FromTunnel, ToTunnel};
use ca_api::tonic::{self, Request, Response, Status, Streaming};
use futures_util::Stream;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{NODE_REQUESTS, Relay};
use crate::ca::authenticate::Authenticator;
use crate::ca::service::bearer;

/// Largest message a node may send: a batch of events (each well under a kilobyte).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// What a refused caller is told (the controller's log says why).
const REFUSED: &str = "flow relay call refused (the controller's log says why)";

/// The gRPC service; cheap to clone.
#[derive(Clone)]
pub struct RelayService {
    relay: Arc<Relay>,
    authenticator: Arc<Authenticator>,
}

impl RelayService {
    pub fn new(relay: Arc<Relay>, authenticator: Arc<Authenticator>) -> RelayService {
        RelayService {
            relay,
            authenticator,
        }
    }

    /// The tonic server for this service, reading at most [`MAX_MESSAGE_BYTES`] a message.
    pub fn into_server(self) -> ca_api::FlowRelayServer<RelayService> {
        ca_api::FlowRelayServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

type Requests = Pin<Box<dyn Stream<Item = Result<ToTunnel, Status>> + Send>>;

#[tonic::async_trait]
impl ca_api::FlowRelay for RelayService {
    type OfferStream = Requests;

    async fn offer(
        &self,
        request: Request<Streaming<FromTunnel>>,
    ) -> Result<Response<Requests>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "an unknown address".to_owned(), |a| a.to_string());
        let Some(token) = bearer(&request) else {
            warn!(%peer, "flow relay call refused: no bearer token");
            return Err(Status::unauthenticated(REFUSED));
        };
        let node = match self.authenticator.node(&token).await {
            Ok(node) => node,
            Err(error) => {
                warn!(%peer, %error, "flow relay call refused: caller not authenticated");
                return Err(Status::unauthenticated(REFUSED));
            }
        };
        let (tx, mut rx) = mpsc::channel(NODE_REQUESTS);
        let handle = match self.relay.add_node(&node, tx) {
            Ok(handle) => handle,
            Err(error) => {
                warn!(%peer, %node, %error, "flow relay call refused");
                return Err(Status::resource_exhausted(error.to_string()));
            }
        };
        info!(%node, %peer, "node offers its flows to the relay");
        let mut inbound = request.into_inner();
        let relay = self.relay.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    () = relay.closed() => break,
                };
                match message {
                    Ok(Some(message)) => relay.deliver(&handle, message),
                    Ok(None) => break,
                    Err(status) => {
                        info!(node = %node, "node's flow relay call ended: {}", status.message());
                        break;
                    }
                }
            }
            info!(%node, "node no longer offers its flows");
            drop(handle);
        });
        let requests = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|r| r.map(Ok)));
        Ok(Response::new(Box::pin(requests)))
    }
}
