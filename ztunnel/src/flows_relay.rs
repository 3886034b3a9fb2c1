//! Offers this tunnel's flow events to the controller's relay (`--flow-relay host:port`):
//! `FlowRelay/Offer` is called on every address the name resolves to (each controller replica
//! behind a headless Service) and kept open, authenticated with the node's CA token, over TLS
//! verified as the CA is. The relay asks for subscriptions (a `/flows` query each); each is
//! served as the admin endpoint serves one: the ring's matching events, then, when it follows,
//! new ones through a bounded subscriber queue, so a slow relay loses events (counted and sent
//! as `lost`) and the data path never waits.
//!
//! The call goes out from the node: nodes open no port for it, and the relay needs no list of
//! nodes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ca_api::FlowRelayClient;
use ca_api::flows::{FromTunnel, to_tunnel};
use ca_api::tonic;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use tunnel_proto::flows::{FlowEvent, FlowQuery};

use crate::identity::{bearer, controller_channel, describe_status};
use crate::telemetry::Metrics;
use crate::tls::TrustBundle;

/// The relay's name is resolved again this often (replicas come and go).
const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// Most events in one message.
const BATCH: usize = 256;

/// Messages waiting to be sent on one call; past this, a subscription's events wait in its
/// subscriber queue (and are lost there when it is full).
const OUTBOUND: usize = 16;

/// A lost call is made again after 1 s, doubling up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where the relay is and how this tunnel proves its node.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// `host:port`; every address the host resolves to is called.
    pub address: String,
    /// The DNS name the controller's serving certificate must carry.
    pub server_name: String,
    /// The node's token (the one given to the CA), read at each call.
    pub token_file: PathBuf,
}

/// Offers the flow events of `metrics` to the relay until `stop`.
pub async fn offer(
    settings: RelaySettings,
    metrics: Arc<Metrics>,
    bundle: Arc<TrustBundle>,
    crypto: Arc<rustls::crypto::CryptoProvider>,
    stop: CancellationToken,
) {
    let mut calls: HashMap<SocketAddr, JoinHandle<()>> = HashMap::new();
    let mut said_unresolved = false;
    loop {
        match tokio::net::lookup_host(&settings.address).await {
            Ok(addrs) => {
                said_unresolved = false;
                let now: HashSet<SocketAddr> = addrs.collect();
                calls.retain(|addr, task| {
                    let keep = now.contains(addr) && !task.is_finished();
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for addr in now {
                    calls.entry(addr).or_insert_with(|| {
                        info!(relay = %addr, "offering flows to the relay");
                        tokio::spawn(call_again_and_again(
                            addr,
                            settings.clone(),
                            metrics.clone(),
                            bundle.clone(),
                            crypto.clone(),
                        ))
                    });
                }
            }
            Err(error) => {
                if !said_unresolved {
                    warn!(address = %settings.address, %error, "the flow relay's address does not resolve; trying again every {RESOLVE_EVERY:?}");
                    said_unresolved = true;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(RESOLVE_EVERY) => {}
        }
    }
    for task in calls.into_values() {
        task.abort();
    }
}

async fn call_again_and_again(
    addr: SocketAddr,
    settings: RelaySettings,
    metrics: Arc<Metrics>,
    bundle: Arc<TrustBundle>,
    crypto: Arc<rustls::crypto::CryptoProvider>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let served = call(addr, &settings, &metrics, bundle.clone(), crypto.clone()).await;
        match served {
            Ok(()) => {
                debug!(relay = %addr, "the relay ended the call; calling again");
                backoff = Duration::from_secs(1);
            }
            Err(reason) => {
                // At debug after the first: a replica restarting is not worth a line a second.
                if backoff == Duration::from_secs(1) {
                    warn!(relay = %addr, %reason, "the flow relay call failed; retrying");
                } else {
                    debug!(relay = %addr, %reason, "the flow relay call failed again");
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

/// One call: open until the relay or the connection ends it.
async fn call(
    addr: SocketAddr,
    settings: &RelaySettings,
    metrics: &Arc<Metrics>,
    bundle: Arc<TrustBundle>,
    crypto: Arc<rustls::crypto::CryptoProvider>,
) -> Result<(), String> {
    let channel = controller_channel(
        &addr.to_string(),
        &settings.server_name,
        None,
        bundle,
        crypto,
    )
    .map_err(|e| e.to_string())?;
    let bearer = bearer(&settings.token_file).map_err(|e| e.to_string())?;
    let (out, mut out_rx) = mpsc::channel::<FromTunnel>(OUTBOUND);
    let outbound = futures_util::stream::poll_fn(move |cx| out_rx.poll_recv(cx));
    let mut request = tonic::Request::new(outbound);
    request.metadata_mut().insert("authorization", bearer);
    let mut inbound = FlowRelayClient::new(channel)
        .offer(request)
        .await
        .map_err(|status| describe_status(&status))?
        .into_inner();
    let mut subscriptions: HashMap<u64, JoinHandle<()>> = HashMap::new();
    let ended = loop {
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) => break Ok(()),
            Err(status) => break Err(describe_status(&status)),
        };
        subscriptions.retain(|_, task| !task.is_finished());
        match message.request {
            Some(to_tunnel::Request::Subscribe(s)) => {
                debug!(relay = %addr, id = s.id, query = %s.query, "relay subscribed");
                let task = tokio::spawn(serve(s.id, s.query, metrics.clone(), out.clone()));
                if let Some(old) = subscriptions.insert(s.id, task) {
                    old.abort();
                }
            }
            Some(to_tunnel::Request::Unsubscribe(u)) => {
                if let Some(task) = subscriptions.remove(&u.id) {
                    task.abort();
                }
            }
            None => {}
        }
    };
    for task in subscriptions.into_values() {
        task.abort();
    }
    ended
}

fn json(event: &FlowEvent) -> String {
    serde_json::to_string(event).unwrap_or_default()
}

/// Serves one subscription of the relay: its backlog, then (when it follows) new events.
async fn serve(id: u64, query: String, metrics: Arc<Metrics>, out: mpsc::Sender<FromTunnel>) {
    let refuse = |error: String| FromTunnel {
        id,
        end: true,
        error,
        ..FromTunnel::default()
    };
    let query = match FlowQuery::parse(&query) {
        Ok(query) => query,
        Err(e) => {
            let _ = out.send(refuse(format!("bad query: {e}"))).await;
            return;
        }
    };
    let opened = match metrics.flows.open(&query) {
        Ok(opened) => opened,
        Err(e) => {
            let _ = out.send(refuse(e.to_string())).await;
            return;
        }
    };
    for chunk in opened.recent.chunks(BATCH) {
        let events = chunk.iter().map(|e| json(e)).collect();
        let message = FromTunnel {
            id,
            events,
            ..FromTunnel::default()
        };
        if out.send(message).await.is_err() {
            return;
        }
    }
    let Some(mut subscription) = opened.subscription else {
        let _ = out
            .send(FromTunnel {
                id,
                end: true,
                ..FromTunnel::default()
            })
            .await;
        return;
    };
    while let Some((events, lost)) = subscription.next_batch(BATCH).await {
        let message = FromTunnel {
            id,
            events: events.iter().map(|e| json(e)).collect(),
            lost,
            ..FromTunnel::default()
        };
        if out.send(message).await.is_err() {
            return;
        }
    }
}
