//! One tunnel to ask: its admin address, reached from this machine's network namespace or
//! from inside another (`ADDR@/run/netns/NAME`: one machine's simulated nodes, where each
//! tunnel's admin endpoint listens on its node's loopback).

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::sync::mpsc;

/// The longest line taken from a tunnel (an event is well under 4 KiB).
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0:?}: a tunnel is HOST:PORT or HOST:PORT@/run/netns/NAME")]
    Syntax(String),
    #[error("{source_name}: cannot connect: {error}")]
    Connect {
        source_name: String,
        error: std::io::Error,
    },
    #[error("{source_name}: {error}")]
    Http { source_name: String, error: String },
    #[error("{source_name}: refused the question ({status}): {body}")]
    Refused {
        source_name: String,
        status: u16,
        body: String,
    },
}

/// A tunnel's admin endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub addr: SocketAddr,
    pub netns: Option<PathBuf>,
}

impl std::str::FromStr for Source {
    type Err = SourceError;

    fn from_str(text: &str) -> Result<Self, SourceError> {
        let (addr, netns) = match text.split_once('@') {
            Some((addr, netns)) => (addr, Some(PathBuf::from(netns))),
            None => (text, None),
        };
        let addr = addr
            .parse()
            .map_err(|_| SourceError::Syntax(text.to_owned()))?;
        Ok(Source { addr, netns })
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.netns {
            Some(netns) => write!(f, "{}@{}", self.addr, netns.display()),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// What a source sends on: each JSON line, or its end.
#[derive(Debug)]
pub enum Line {
    Json(serde_json::Value),
    Ended(Option<String>),
}

impl Source {
    async fn connect(&self) -> std::io::Result<tokio::net::TcpStream> {
        let Some(netns) = self.netns.clone() else {
            return tokio::net::TcpStream::connect(self.addr).await;
        };
        // A socket made inside the namespace stays there; made by a thread of its own, so
        // this process's threads stay where they are.
        let addr = self.addr;
        let stream =
            tokio::task::spawn_blocking(move || -> std::io::Result<std::net::TcpStream> {
                let file = std::fs::File::open(&netns)?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                std::net::TcpStream::connect(addr)
            })
            .await
            .map_err(std::io::Error::other)??;
        stream.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(stream)
    }

    /// Asks `/flows?<query>` and sends each line to `out`, then `Ended`.
    pub async fn stream(self, query: String, out: mpsc::Sender<(usize, Line)>, index: usize) {
        let ended = match self.stream_lines(&query, &out, index).await {
            Ok(()) => None,
            Err(e) => Some(e.to_string()),
        };
        let _ = out.send((index, Line::Ended(ended))).await;
    }

    async fn stream_lines(
        &self,
        query: &str,
        out: &mpsc::Sender<(usize, Line)>,
        index: usize,
    ) -> Result<(), SourceError> {
        let source_name = self.to_string();
        let http = |error: String| SourceError::Http {
            source_name: source_name.clone(),
            error,
        };
        let stream = self.connect().await.map_err(|error| SourceError::Connect {
            source_name: source_name.clone(),
            error,
        })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| http(e.to_string()))?;
        tokio::spawn(connection);
        let request = hyper::Request::get(format!("/flows?{query}"))
            .header(hyper::header::HOST, self.addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let text = body
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
                .unwrap_or_default();
            return Err(SourceError::Refused {
                source_name,
                status: status.as_u16(),
                body: text,
            });
        }
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| http(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            if pending.len() > MAX_LINE && !pending.contains(&b'\n') {
                return Err(http(format!(
                    "a line over {MAX_LINE} bytes: not flow events"
                )));
            }
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                match serde_json::from_slice(&line) {
                    Ok(value) => {
                        if out.send((index, Line::Json(value))).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) => return Err(http(format!("not a JSON line: {e}"))),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_read_an_address_and_an_optional_namespace() {
        let plain: Source = "127.0.0.1:15000".parse().unwrap();
        assert_eq!(plain.netns, None);
        let inside: Source = "127.0.0.1:15000@/run/netns/demo-node1".parse().unwrap();
        assert_eq!(inside.netns, Some(PathBuf::from("/run/netns/demo-node1")));
        assert_eq!(inside.to_string(), "127.0.0.1:15000@/run/netns/demo-node1");
        assert!("node1".parse::<Source>().is_err());
    }

    /// Serves one HTTP response with `body` on a loopback port.
    async fn serve_once(body: Vec<u8>) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
        });
        addr
    }

    async fn lines_of(addr: SocketAddr) -> Vec<Line> {
        let (tx, mut rx) = mpsc::channel(16);
        let source = Source { addr, netns: None };
        tokio::spawn(source.stream(String::new(), tx, 0));
        let mut out = Vec::new();
        while let Some((_, line)) = rx.recv().await {
            let ended = matches!(line, Line::Ended(_));
            out.push(line);
            if ended {
                break;
            }
        }
        out
    }

    #[tokio::test]
    async fn lines_are_read_as_json_and_an_endless_line_or_garbage_is_refused() {
        let good = lines_of(serve_once(b"{\"time_ms\":1}\n{\"lost\":3}\n".to_vec()).await).await;
        assert!(
            matches!(&good[..], [Line::Json(a), Line::Json(b), Line::Ended(None)]
            if a["time_ms"] == 1 && b["lost"] == 3)
        );
        let endless = lines_of(serve_once(vec![b'x'; MAX_LINE + 10]).await).await;
        assert!(
            matches!(&endless[..], [Line::Ended(Some(e))] if e.contains("a line over")),
            "{endless:?}"
        );
        let garbage = lines_of(serve_once(b"not json\n".to_vec()).await).await;
        assert!(
            matches!(&garbage[..], [Line::Ended(Some(e))] if e.contains("not a JSON line")),
            "{garbage:?}"
        );
    }
}
