//! A watch on the HTTP/2 frames a client sends, below `h2`: PING and SETTINGS frames cost the
//! client nine bytes and the tunnel an answer each, and `h2` answers any number of them. A
//! client that sends more than [`BURST`] at once, or keeps up more than [`PER_SECOND`], gets its
//! connection ended (the read fails), not the tunnel slowed. (Rapid reset and CONTINUATION
//! floods are bounded by `h2` itself: see the builder in `server.rs`.)
//!
//! It also follows the frames the tunnel writes, so that the connection's [`SendLedger`] learns
//! when each stream's DATA went out, and the resets either way (h2 then drops what it held).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::send_budget::SendLedger;

/// Control frames a client may send at once.
pub const BURST: f64 = 200.0;
/// Control frames a client may keep sending per second.
pub const PER_SECOND: f64 = 50.0;

const PREFACE_LEN: usize = 24;
const HEADER_LEN: usize = 9;
const DATA: u8 = 0x0;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// What a walk over an HTTP/2 byte stream meets.
enum Step<'a> {
    /// A frame's whole header.
    Header(&'a [u8; HEADER_LEN]),
    /// `n` bytes of the payload of the frame whose header came last.
    Payload(&'a [u8; HEADER_LEN], usize),
}

/// Where a walk stands in an HTTP/2 byte stream that arrives in pieces of any size.
#[derive(Debug)]
struct FrameWalker {
    /// Bytes still to skip before the first frame (the client's preface).
    skip: usize,
    header: [u8; HEADER_LEN],
    header_len: usize,
    payload_left: usize,
}

impl FrameWalker {
    fn new(skip: usize) -> Self {
        FrameWalker {
            skip,
            header: [0; HEADER_LEN],
            header_len: 0,
            payload_left: 0,
        }
    }

    /// Walks the next `bytes`, telling `step` each header and each run of payload.
    fn walk<E>(
        &mut self,
        mut bytes: &[u8],
        mut step: impl FnMut(Step<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
                step(Step::Payload(&self.header, n))?;
            } else {
                let n = (HEADER_LEN - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == HEADER_LEN {
                    self.header_len = 0;
                    let h = &self.header;
                    self.payload_left =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    step(Step::Header(&self.header))?;
                }
            }
        }
        Ok(())
    }
}

fn stream_id(header: &[u8; HEADER_LEN]) -> u32 {
    u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff
}

/// What the client sends, followed for floods.
#[derive(Debug)]
struct Frames {
    walker: FrameWalker,
    /// Token bucket of control frames.
    tokens: f64,
    refilled: Instant,
}

impl Frames {
    fn new() -> Self {
        Frames {
            walker: FrameWalker::new(PREFACE_LEN),
            tokens: BURST,
            refilled: Instant::now(),
        }
    }

    /// Follows `bytes` (the next bytes the client sent); an error once it floods. `reset` is
    /// told each stream the client resets.
    fn follow(&mut self, bytes: &[u8], reset: &mut dyn FnMut(u32)) -> io::Result<()> {
        let Frames {
            walker,
            tokens,
            refilled,
        } = self;
        walker.walk(bytes, |step| {
            if let Step::Header(h) = step {
                let (kind, flags) = (h[3], h[4]);
                if (kind == PING || kind == SETTINGS) && flags & ACK == 0 {
                    take_token(tokens, refilled)?;
                }
                if kind == RST_STREAM {
                    reset(stream_id(h));
                }
            }
            Ok(())
        })
    }
}

/// Takes one control frame's token from the bucket, refilled for the time since.
fn take_token(tokens: &mut f64, refilled: &mut Instant) -> io::Result<()> {
    let now = Instant::now();
    let elapsed = now.duration_since(*refilled).as_secs_f64();
    *refilled = now;
    *tokens = (*tokens + elapsed * PER_SECOND).min(BURST);
    if *tokens < 1.0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "HTTP/2 control frame flood: more than {BURST} PING/SETTINGS frames at once or {PER_SECOND} a second"
            ),
        ));
    }
    *tokens -= 1.0;
    Ok(())
}

/// What the tunnel writes (h2's frames, no preface on this side), followed for the ledger.
#[derive(Debug)]
struct Written(FrameWalker);

impl Default for Written {
    fn default() -> Self {
        Written(FrameWalker::new(0))
    }
}

impl Written {
    fn follow(&mut self, bytes: &[u8], ledger: &SendLedger) {
        let _ = self.0.walk(bytes, |step| {
            match step {
                Step::Payload(h, n) if h[3] == DATA => ledger.written(stream_id(h), n as u64),
                Step::Header(h) if h[3] == RST_STREAM => ledger.forget(stream_id(h)),
                _ => {}
            }
            Ok::<(), ()>(())
        });
    }
}

/// The server's side of an HBONE connection, watched for control-frame floods; what it writes
/// is followed for the connection's [`SendLedger`].
pub struct FloodWatch<T> {
    inner: T,
    frames: Frames,
    /// Set once the client flooded: every later read fails too.
    flooded: bool,
    written: Written,
    ledger: Arc<SendLedger>,
}

impl<T> FloodWatch<T> {
    pub fn new(inner: T, ledger: Arc<SendLedger>) -> Self {
        FloodWatch {
            inner,
            frames: Frames::new(),
            flooded: false,
            written: Written::default(),
            ledger,
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
        let ledger = &this.ledger;
        if let Poll::Ready(Ok(())) = &polled
            && let Err(e) = this
                .frames
                .follow(&buf.filled()[before..], &mut |stream| ledger.forget(stream))
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
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            this.written.follow(&buf[..*n], &this.ledger);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            let mut left = *n;
            for buf in bufs {
                let take = left.min(buf.len());
                this.written.follow(&buf[..take], &this.ledger);
                left -= take;
                if left == 0 {
                    break;
                }
            }
        }
        polled
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
            frames.follow(chunk, &mut |_| {}).unwrap();
        }
        let ping = frame(PING, 0, &[0; 8]);
        let mut sent = 0;
        let error = loop {
            match frames.follow(&ping, &mut |_| {}) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
        };
        // The burst allowance less the SETTINGS, give or take what refilled meanwhile.
        assert!((199..=210).contains(&sent), "{sent} pings passed");
        assert!(error.to_string().contains("control frame flood"), "{error}");
    }

    #[test]
    fn written_data_is_told_to_the_ledger_by_stream_and_a_reset_forgets_it() {
        use crate::proxy::send_budget::SendBudget;
        let budget = SendBudget::new(1 << 20);
        let ledger = SendLedger::new(budget.clone());
        for (stream, n) in [(1u32, 3000u64), (3, 2000)] {
            futures_util::FutureExt::now_or_never(budget.reserve(n)).unwrap();
            ledger.charge(stream, n);
        }
        let mut out = frame(0x1, 0x4, &[0; 20]); // HEADERS of stream 0 in this helper
        let mut data1 = frame(DATA, 0, &[7; 1000]);
        data1[5..9].copy_from_slice(&1u32.to_be_bytes());
        let mut data3 = frame(DATA, 0, &[7; 500]);
        data3[5..9].copy_from_slice(&3u32.to_be_bytes());
        let mut reset3 = frame(RST_STREAM, 0, &[0, 0, 0, 8]);
        reset3[5..9].copy_from_slice(&3u32.to_be_bytes());
        out.extend(data1);
        out.extend(data3);
        out.extend(reset3);
        let mut written = Written::default();
        for piece in out.chunks(13) {
            written.follow(piece, &ledger);
        }
        assert_eq!(ledger.held(1), 2000, "1,000 of stream 1's bytes went out");
        assert_eq!(ledger.held(3), 0, "stream 3 was reset");
        assert_eq!(budget.in_flight(), 2000);
    }
}
