//! HBONE: one HTTP/2 CONNECT stream per proxied connection, over pooled mutual TLS 1.3.

mod client;
mod flood;
mod pool;
mod server;
mod stream_io;

pub use client::{HboneStream, connect};
pub use pool::{Checkout, Pool, PoolKey, PoolSettings};
pub use server::{Client, serve_hbone_connection, serve_http2};
pub use stream_io::StreamIo;

/// HTTP/2 flow-control windows: large enough for one stream to fill a fast link. Frames (and
/// read chunks, see `copy.rs`) of up to 1 MiB: the tunnel bench measured 16 KiB frames at
/// 2.7 Gbit/s, 256 KiB at 3.8 and 1 MiB at 4.0-4.7; a 4 MiB send buffer gained nothing.
pub(crate) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub(crate) const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub(crate) const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Bytes HTTP/2 buffers per stream before a send waits for the socket.
pub(crate) const SEND_BUFFER: usize = 1024 * 1024;

/// Header carrying the reason of a refused CONNECT, for humans reading logs on the client side.
pub(crate) const ERROR_HEADER: &str = "weft-error";
