//! Moving bytes both ways, between two TCP sockets or between a TCP socket and an HTTP/2
//! stream, counting them as they go. Buffers are taken only when data is ready (an idle
//! connection holds none) and grow while reads keep filling them (bulk transfer).

use std::future::poll_fn;
use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::ProxyError;
use super::send_budget::{SendBudget, SendLedger};

const MIN_READ: usize = 16 * 1024;
const MAX_READ: usize = 1024 * 1024;

/// Bytes moved in each direction of a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// From the accepting side (the client) onwards.
    pub forward: u64,
    /// Back towards the client.
    pub backward: u64,
}

impl Totals {
    /// The same figures seen from the other end.
    pub fn reversed(self) -> Totals {
        Totals {
            forward: self.backward,
            backward: self.forward,
        }
    }
}

/// Reads in chunks sized by how busy the socket is. While reads keep filling the buffer (bulk
/// transfer) one allocation is reused, reclaimed once the previous chunks were sent on; a read
/// that drains the socket lets it go, so a connection waiting for data holds no buffer.
struct AdaptiveReader {
    size: usize,
    buf: BytesMut,
    /// Where the chunks go counted in flight until written (HBONE server streams).
    budget: Option<Arc<SendBudget>>,
}

impl AdaptiveReader {
    fn new(budget: Option<Arc<SendBudget>>) -> Self {
        AdaptiveReader {
            size: MIN_READ,
            buf: BytesMut::new(),
            budget,
        }
    }

    /// The next chunk, or `None` at end of stream.
    async fn next(&mut self, rd: &OwnedReadHalf) -> io::Result<Option<Bytes>> {
        loop {
            rd.readable().await?;
            let want = self.size;
            // Room in the budget before the buffer is taken; what is not read goes back.
            if let Some(budget) = &self.budget {
                budget.reserve(want as u64).await;
            }
            self.buf.reserve(want);
            let read = rd.try_read_buf(&mut bytes::BufMut::limit(&mut self.buf, want));
            if let Some(budget) = &self.budget {
                let kept = read.as_ref().map_or(0, |n| *n);
                budget.give_back((want - kept) as u64);
            }
            match read {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    crate::busy_poll::activity();
                    let filled = n == want;
                    if filled {
                        self.size = (want * 2).min(MAX_READ);
                    } else if n < want / 4 {
                        self.size = (want / 2).max(MIN_READ);
                    }
                    let chunk = self.buf.split().freeze();
                    if !filled {
                        self.buf = BytesMut::new();
                    }
                    return Ok(Some(chunk));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The readiness was stale (tokio clears it only on WouldBlock, so the call
                    // after a read that drained the socket lands here): let the buffer go
                    // before waiting, or every idle connection would hold one.
                    self.buf = BytesMut::new();
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Copies between a client socket and an upstream socket until both directions end.
pub async fn copy_tcp(
    client: TcpStream,
    upstream: TcpStream,
    forward: &[Counter],
    backward: &[Counter],
) -> Result<Totals, ProxyError> {
    let (crd, cwr) = client.into_split();
    let (urd, uwr) = upstream.into_split();
    let (f, b) = tokio::try_join!(
        tcp_to_tcp(crd, uwr, forward),
        tcp_to_tcp(urd, cwr, backward)
    )?;
    Ok(Totals {
        forward: f,
        backward: b,
    })
}

async fn tcp_to_tcp(
    rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    counters: &[Counter],
) -> io::Result<u64> {
    let mut reader = AdaptiveReader::new(None);
    let mut total = 0u64;
    while let Some(chunk) = reader.next(&rd).await? {
        wr.write_all(&chunk).await?;
        for counter in counters {
            counter.inc_by(chunk.len() as u64);
        }
        total += chunk.len() as u64;
    }
    wr.shutdown().await?;
    Ok(total)
}

/// Copies between a TCP socket and an HTTP/2 stream until both directions end. `forward`
/// counts TCP to HTTP/2, `backward` HTTP/2 to TCP.
/// On the HBONE server, `ledger` counts what the stream sends out of its peer's budget.
pub async fn copy_tcp_h2(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    forward: &Counter,
    backward: &Counter,
    ledger: Option<Arc<SendLedger>>,
) -> Result<Totals, ProxyError> {
    let (rd, wr) = tcp.into_split();
    let (f, b) = tokio::try_join!(
        tcp_to_h2(rd, send, forward, ledger),
        h2_to_tcp(recv, wr, backward)
    )?;
    Ok(Totals {
        forward: f,
        backward: b,
    })
}

async fn tcp_to_h2(
    rd: OwnedReadHalf,
    mut send: SendStream<Bytes>,
    counter: &Counter,
    ledger: Option<Arc<SendLedger>>,
) -> Result<u64, ProxyError> {
    let mut reader = AdaptiveReader::new(ledger.as_ref().map(|l| l.budget().clone()));
    let mut total = 0u64;
    while let Some(chunk) = reader.next(&rd).await? {
        let len = chunk.len() as u64;
        send_all(&mut send, chunk, ledger.as_deref()).await?;
        counter.inc_by(len);
        total += len;
    }
    send.send_data(Bytes::new(), true)?;
    Ok(total)
}

/// Sends `data` as HTTP/2 DATA frames as fast as flow control allows. With a `ledger`, `data`
/// was reserved from the peer's budget: each piece is charged to the stream as h2 takes it,
/// and what h2 never takes is given back.
async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    ledger: Option<&SendLedger>,
) -> Result<(), ProxyError> {
    let stream = u32::from(send.stream_id());
    let mut unsent = Unsent {
        ledger,
        bytes: data.len() as u64,
    };
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(granted) => granted?,
            None => {
                return Err(ProxyError::Io(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the HTTP/2 stream was closed by the peer",
                )));
            }
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        let len = chunk.len() as u64;
        unsent.bytes -= len;
        if let Some(ledger) = ledger {
            ledger.charge(stream, len);
        }
        if let Err(error) = send.send_data(chunk, false) {
            if let Some(ledger) = ledger {
                ledger.uncharge(stream, len);
            }
            return Err(error.into());
        }
    }
    Ok(())
}

/// Reserved bytes of a chunk not handed to h2 yet; given back if the send stops early.
struct Unsent<'a> {
    ledger: Option<&'a SendLedger>,
    bytes: u64,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if let Some(ledger) = self.ledger {
            ledger.budget().give_back(self.bytes);
        }
    }
}

async fn h2_to_tcp(
    mut recv: RecvStream,
    mut wr: OwnedWriteHalf,
    counter: &Counter,
) -> Result<u64, ProxyError> {
    let mut total = 0u64;
    while let Some(data) = recv.data().await {
        let data = data?;
        crate::busy_poll::activity();
        let len = data.len();
        wr.write_all(&data).await?;
        // Released only once written: a slow reader slows the sender (back-pressure).
        recv.flow_control().release_capacity(len)?;
        counter.inc_by(len as u64);
        total += len as u64;
    }
    wr.shutdown().await?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn buffers_grow_for_bulk_and_are_released_when_the_socket_drains() {
        let (mut writer, reader_side) = crate::test_support::tcp_pair().await;
        let (rd, _wr) = reader_side.into_split();
        let mut reader = AdaptiveReader::new(None);
        // A small message: one small read, and no buffer kept while waiting for more.
        writer.write_all(b"hello").await.unwrap();
        let chunk = reader.next(&rd).await.unwrap().unwrap();
        assert_eq!(&chunk[..], b"hello");
        assert_eq!(
            reader.buf.capacity(),
            0,
            "an idle connection holds no buffer"
        );
        assert_eq!(reader.size, MIN_READ);
        // Waiting for more (readiness still set from the read above: the wake-up is stale) holds
        // no buffer either.
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), reader.next(&rd)).await;
        assert!(waited.is_err(), "nothing more was sent");
        assert_eq!(
            reader.buf.capacity(),
            0,
            "a connection waiting for data holds no buffer"
        );

        // Bulk: reads fill the buffer and it grows to the maximum.
        let data = vec![7u8; 8 << 20];
        let send = tokio::spawn(async move {
            writer.write_all(&data).await.unwrap();
            writer
        });
        let mut got = 0;
        let mut largest = 0;
        while got < 8 << 20 {
            let chunk = reader.next(&rd).await.unwrap().unwrap();
            largest = largest.max(chunk.len());
            got += chunk.len();
        }
        assert_eq!(got, 8 << 20);
        assert_eq!(largest, MAX_READ, "bulk reads grow to the largest size");
        let writer = send.await.unwrap();
        drop(writer);
        assert!(reader.next(&rd).await.unwrap().is_none());
    }

    #[test]
    fn totals_reverse() {
        let t = Totals {
            forward: 1,
            backward: 2,
        };
        assert_eq!(
            t.reversed(),
            Totals {
                forward: 2,
                backward: 1
            }
        );
    }
}
