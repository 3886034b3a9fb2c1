//! The tunnel's proxy paths: outbound from local pods, inbound HBONE and plaintext to them.

pub mod context;
mod copy;
mod error;
pub mod hbone;
pub mod inbound_plaintext;
pub mod outbound;

pub use error::ProxyError;
