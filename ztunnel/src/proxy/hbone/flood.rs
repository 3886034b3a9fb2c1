//! A watch on the HTTP/2 frames a client sends, below `h2`: PING and SETTINGS frames cost the
//! client nine bytes and the tunnel an answer each, and `h2` answers any number of them. A
//! client that sends more than [`BURST`] at once, or keeps up more than [`PER_SECOND`], gets its
//! connection ended (the read fails), not the tunnel slowed. (Rapid reset and CONTINUATION
//! floods are bounded by `h2` itself: see the builder in `server.rs`.)

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Control frames a client may send at once.
pub const BURST: f64 = 200.0;
/// Control frames a client may keep sending per second.
pub const PER_SECOND: f64 = 50.0;

const PREFACE_LEN: usize = 24;
const HEADER_LEN: usize = 9;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// Where the parser stands in the client's byte stream.
#[derive(Debug)]
struct Frames {
    preface_left: usize,
    header: [u8; HEADER_LEN],
    header_len: usize,
    payload_left: usize,
    /// Token bucket of control frames.
    tokens: f64,
    refilled: Instant,
}

impl Frames {
    fn new() -> Self {
        Frames {
            preface_left: PREFACE_LEN,
            header: [0; HEADER_LEN],
            header_len: 0,
            payload_left: 0,
            tokens: BURST,
            refilled: Instant::now(),
        }
    }

    /// Follows `bytes` (the next bytes the client sent); an error once it floods.
    fn follow(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (HEADER_LEN - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == HEADER_LEN {
                    self.header_len = 0;
                    let h = self.header;
                    self.payload_left =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    if (kind == PING || kind == SETTINGS) && flags & ACK == 0 {
                        self.take_token()?;
                    }
                }
            }
        }
        Ok(())
    }

    fn take_token(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * PER_SECOND).min(BURST);
        if self.tokens < 1.0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "HTTP/2 control frame flood: more than {BURST} PING/SETTINGS frames at once or {PER_SECOND} a second"
                ),
            ));
        }
        self.tokens -= 1.0;
        Ok(())
    }
}

/// The server's side of an HBONE connection, watched for control-frame floods.
pub struct FloodWatch<T> {
    inner: T,
    frames: Frames,
    /// Set once the client flooded: every later read fails too.
    flooded: bool,
}

impl<T> FloodWatch<T> {
    pub fn new(inner: T) -> Self {
        FloodWatch {
            inner,
            frames: Frames::new(),
            flooded: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FloodWatch<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.flooded {
            return Poll::Ready(Err(io::ErrorKind::InvalidData.into()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled
            && let Err(e) = this.frames.follow(&buf.filled()[before..])
        {
            this.flooded = true;
            return Poll::Ready(Err(e));
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FloodWatch<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn data_and_acks_pass_and_a_ping_flood_is_cut_off_even_split_across_reads() {
        let mut frames = Frames::new();
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        stream.extend(frame(SETTINGS, 0, &[]));
        // A megabyte of DATA whose payload looks like PING headers is payload, not frames.
        stream.extend(frame(0x0, 0, &frame(PING, 0, &[0; 8]).repeat(100_000)));
        stream.extend(frame(PING, ACK, &[0; 8]).repeat(1_000));
        for chunk in stream.chunks(7) {
            frames.follow(chunk).unwrap();
        }
        let ping = frame(PING, 0, &[0; 8]);
        let mut sent = 0;
        let error = loop {
            match frames.follow(&ping) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
        };
        // The burst allowance less the SETTINGS, give or take what refilled meanwhile.
        assert!((199..=210).contains(&sent), "{sent} pings passed");
        assert!(error.to_string().contains("control frame flood"), "{error}");
    }
}
