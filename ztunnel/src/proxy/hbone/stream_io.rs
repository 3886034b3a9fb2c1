//! One HBONE stream (an HTTP/2 CONNECT stream's two halves) as a byte stream, for what parses
//! the bytes it carries (the HTTP proxy of an HTTP port) rather than copying them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads the stream's DATA frames and writes DATA frames within the flow-control window: a
/// write waits for window, so what the stream buffers is bounded by it.
pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The rest of the last DATA frame read.
    pending: Bytes,
    /// End of stream sent.
    finished: bool,
}

impl StreamIo {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        StreamIo {
            send,
            recv,
            pending: Bytes::new(),
            finished: false,
        }
    }
}

fn h2_error(error: h2::Error) -> io::Error {
    if error.is_io() {
        if let Some(io) = error.into_io() {
            return io;
        }
        return io::ErrorKind::ConnectionReset.into();
    }
    io::Error::new(io::ErrorKind::ConnectionReset, error)
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Window given back once the bytes are handed on (a slow reader slows the
                    // sender).
                    let len = data.len();
                    self.recv
                        .flow_control()
                        .release_capacity(len)
                        .map_err(h2_error)?;
                    self.pending = data;
                }
                Some(Err(error)) => return Poll::Ready(Err(h2_error(error))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            self.send.reserve_capacity(buf.len());
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(granted)) => {
                    let n = granted.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_error)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(error)) => return Poll::Ready(Err(h2_error(error))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the HTTP/2 stream was closed by the peer",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes DATA frames out as the connection task runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.finished {
            self.finished = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_error)?;
        }
        Poll::Ready(Ok(()))
    }
}
