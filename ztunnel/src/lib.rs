//! Weft's per-node tunnel: carries local pods' TCP connections over HBONE (HTTP/2 CONNECT
//! inside mutual TLS 1.3) to the destination node's tunnel, authenticating both ends with
//! SPIFFE workload identities.

pub mod admin;
pub mod app;
pub mod busy_poll;
pub mod config;
pub mod flows_http;
pub mod flows_relay;
pub mod identity;
pub mod inbound_capture;
mod log_writer;
pub mod logging;
pub mod netns;
pub mod pods;
pub mod proxy;
pub mod state;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod tls;
