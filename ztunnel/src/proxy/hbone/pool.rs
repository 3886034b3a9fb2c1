//! Pooled HBONE connections: reuse one TLS + HTTP/2 connection for many streams.
//!
//! Connections are keyed by source workload, expected destination identity and destination
//! address. Streams per connection are bounded; past the bound a new connection opens. Opening
//! is serialised per key, so a burst of new streams waits for one handshake instead of starting
//! hundreds (no thundering herd).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use tokio::sync::Mutex as AsyncMutex;
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use super::{CONNECTION_WINDOW, MAX_FRAME_SIZE, SEND_BUFFER, STREAM_WINDOW};
use crate::identity::{CertificateManager, Identity};
use crate::netns::SocketFactory;
use crate::proxy::ProxyError;
use crate::telemetry::Metrics;
use crate::tls::TlsContext;

/// Tunables of the pool.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub max_streams_per_connection: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
}

/// What makes two streams able to share a connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    /// The source workload (`namespace/name`); connections start in its network namespace.
    pub source: String,
    pub source_identity: Identity,
    pub destination_identity: Identity,
    pub destination: SocketAddr,
}

struct PooledConnection {
    sender: SendRequest<Bytes>,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
}

type Slot = Arc<AsyncMutex<Vec<Arc<PooledConnection>>>>;

/// The pool of outbound HBONE connections of one tunnel.
pub struct Pool {
    settings: PoolSettings,
    tls: TlsContext,
    certs: Arc<CertificateManager>,
    metrics: Arc<Metrics>,
    slots: Mutex<HashMap<PoolKey, Slot>>,
}

/// A stream slot on a pooled connection; released when dropped.
pub struct Checkout {
    pub sender: SendRequest<Bytes>,
    connection: Arc<PooledConnection>,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if self.connection.active.fetch_sub(1, Ordering::AcqRel) == 1
            && let Ok(mut since) = self.connection.idle_since.lock()
        {
            *since = Instant::now();
        }
    }
}

impl Pool {
    /// An empty pool; call [`Pool::reap_idle`] periodically (see `spawn_reaper`).
    pub fn new(
        settings: PoolSettings,
        tls: TlsContext,
        certs: Arc<CertificateManager>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Pool {
            settings,
            tls,
            certs,
            metrics,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// Closes idle connections every half idle timeout, until the pool is dropped.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let period = self.settings.idle_timeout / 2;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                match weak.upgrade() {
                    Some(pool) => pool.reap_idle(),
                    None => return,
                }
            }
        });
    }

    fn slot(&self, key: &PoolKey) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key.clone()).or_default().clone()
    }

    /// A stream slot to `key.destination`, on a pooled connection or a new one made through
    /// `sockets` (the source workload's namespace).
    pub async fn checkout(
        &self,
        key: &PoolKey,
        sockets: &SocketFactory,
    ) -> Result<Checkout, ProxyError> {
        let slot = self.slot(key);
        let mut connections = slot.lock().await;
        connections.retain(|c| !c.closed.load(Ordering::Acquire));
        let max = self.settings.max_streams_per_connection;
        for c in connections.iter() {
            let active = c.active.load(Ordering::Acquire);
            if active < max && c.sender.current_max_send_streams() > active {
                c.active.fetch_add(1, Ordering::AcqRel);
                return Ok(Checkout {
                    sender: c.sender.clone(),
                    connection: c.clone(),
                });
            }
        }
        let connection = self.connect(key, sockets).await?;
        connection.active.fetch_add(1, Ordering::AcqRel);
        connections.push(connection.clone());
        Ok(Checkout {
            sender: connection.sender.clone(),
            connection,
        })
    }

    async fn connect(
        &self,
        key: &PoolKey,
        sockets: &SocketFactory,
    ) -> Result<Arc<PooledConnection>, ProxyError> {
        let addr = key.destination;
        let certificate = self.certs.for_connection(&key.source_identity).await?;
        let config = self
            .tls
            .client_config(certificate, vec![key.destination_identity.clone()])?;
        let tcp = tokio::time::timeout(self.settings.connect_timeout, sockets.connect(addr))
            .await
            .map_err(|_| ProxyError::ConnectTimeout { addr })?
            .map_err(|source| ProxyError::HboneConnect { addr, source })?;
        // A peer that accepts and never answers must not hold this key's opening (and every
        // connection waiting for it) for ever.
        let handshakes = async {
            let tls = TlsConnector::from(config)
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .map_err(|e| ProxyError::Handshake {
                    addr,
                    reason: crate::tls::describe_handshake_error(&e),
                })?;
            h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME_SIZE)
                .max_send_buffer_size(SEND_BUFFER)
                .enable_push(false)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(ProxyError::from)
        };
        let (sender, connection) = tokio::time::timeout(self.settings.connect_timeout, handshakes)
            .await
            .map_err(|_| ProxyError::ConnectTimeout { addr })??;
        let closed = Arc::new(AtomicBool::new(false));
        let gauge = self.metrics.hbone_pool_connections.clone();
        gauge.inc();
        info!(source = %key.source, destination = %addr, peer = %key.destination_identity, "opened HBONE connection");
        let task_closed = closed.clone();
        let task_addr = addr;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(destination = %task_addr, %error, "HBONE connection ended with an error");
            }
            task_closed.store(true, Ordering::Release);
            gauge.dec();
            debug!(destination = %task_addr, "HBONE connection closed");
        });
        Ok(Arc::new(PooledConnection {
            sender,
            active: AtomicUsize::new(0),
            closed,
            idle_since: Mutex::new(Instant::now()),
        }))
    }

    /// Drops connections with no stream for longer than the idle timeout; HTTP/2 then sends
    /// GOAWAY and closes them.
    pub fn reap_idle(&self) {
        let slots: Vec<(PoolKey, Slot)> = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let timeout = self.settings.idle_timeout;
        for (key, slot) in slots {
            // A slot in use is opening a connection right now: not idle.
            let Ok(mut connections) = slot.try_lock() else {
                continue;
            };
            connections.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && c.idle_since
                        .lock()
                        .map(|t| t.elapsed() >= timeout)
                        .unwrap_or(false);
                if idle {
                    debug!(destination = %key.destination, "closing idle HBONE connection");
                }
                !idle && !c.closed.load(Ordering::Acquire)
            });
            if connections.is_empty() {
                drop(connections);
                let mut all = self.slots.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = all.get(&key)
                    && Arc::ptr_eq(s, &slot)
                    && Arc::strong_count(&slot) == 2
                {
                    all.remove(&key);
                }
            }
        }
    }
}
