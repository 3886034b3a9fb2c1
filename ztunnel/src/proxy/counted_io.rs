//! A byte stream that counts what passes each way, for connections whose bytes are handed to a
//! parser (the HTTP proxy) instead of copied by `copy.rs`, which counts its own.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::copy::Totals;

/// Bytes read from and written to one stream so far; shared with whoever reports them.
#[derive(Debug, Default)]
pub struct Tally {
    read: AtomicU64,
    written: AtomicU64,
}

impl Tally {
    /// What was read (from the client onwards) and written (back to it).
    pub fn totals(&self) -> Totals {
        Totals {
            forward: self.read.load(Ordering::Relaxed),
            backward: self.written.load(Ordering::Relaxed),
        }
    }
}

/// `io`, counting reads into `read` and writes into `written` as they happen.
pub struct CountedIo<IO> {
    io: IO,
    tally: Arc<Tally>,
    read: Vec<Counter>,
    written: Vec<Counter>,
}

impl<IO> CountedIo<IO> {
    pub fn new(io: IO, read: Vec<Counter>, written: Vec<Counter>) -> (Self, Arc<Tally>) {
        let tally = Arc::new(Tally::default());
        let counted = CountedIo {
            io,
            tally: tally.clone(),
            read,
            written,
        };
        (counted, tally)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for CountedIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            crate::busy_poll::activity();
            self.tally.read.fetch_add(n, Ordering::Relaxed);
            for counter in &self.read {
                counter.inc_by(n);
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for CountedIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.tally.written.fetch_add(n as u64, Ordering::Relaxed);
            for counter in &self.written {
                counter.inc_by(n as u64);
            }
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
