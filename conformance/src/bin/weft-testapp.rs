//! The application the end-to-end cases and benchmarks run in pods: a small HTTP server and a
//! TCP echo server. It knows nothing of Weft.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::BodyExt;
use http_body_util::Full;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// HTTP/1.1 and HTTP/2 with prior knowledge: `/echo/<text>` answers "<name> saw <text>",
    /// `/bytes/<n>?seed=<s>` streams n bytes of the deterministic pattern, `/upgrade` with an
    /// `Upgrade` header switches protocols (101) and echoes bytes; any other path answers
    /// "<name>: <method> <path>".
    Http {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "testapp")]
        name: String,
    },
    /// TCP echo: every byte read is written back.
    Echo {
        #[arg(long)]
        port: u16,
    },
    /// TCP source: reads an 8-byte big-endian length, writes that many bytes, closes.
    Source {
        #[arg(long)]
        port: u16,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().mode {
        Mode::Http { port, name } => serve_http(port, name).await,
        Mode::Echo { port } => serve_echo(port).await,
        Mode::Source { port } => serve_source(port).await,
    }
}

async fn serve_http(port: u16, name: String) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("::", port)).await?;
    eprintln!("http listening on {port}");
    loop {
        let (stream, _) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let name = name.clone();
                async move { Ok::<_, Infallible>(respond(&name, req)) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(name: &str, mut req: Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
    if req.uri().path() == "/upgrade" && req.headers().contains_key(hyper::header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            }
        });
        let mut response = Response::new(Full::new(Bytes::new()).boxed());
        *response.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        response.headers_mut().insert(
            hyper::header::UPGRADE,
            hyper::header::HeaderValue::from_static("echo"),
        );
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        return response;
    }
    let path = req.uri().path();
    if let Some(text) = path.strip_prefix("/echo/") {
        return Response::new(Full::new(Bytes::from(format!("{name} saw {text}\n"))).boxed());
    }
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        let seed = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("seed="))
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        let mut response = Response::new(PatternBody::new(seed, n).boxed());
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_LENGTH, n.into());
        return response;
    }
    Response::new(Full::new(Bytes::from(format!("{name}: {} {path}\n", req.method()))).boxed())
}

/// Streams the deterministic pattern without holding it in memory.
struct PatternBody {
    block: Bytes,
    left: u64,
}

impl PatternBody {
    fn new(seed: u64, len: u64) -> Self {
        PatternBody {
            block: Bytes::from(conformance::pattern::block(seed)),
            left: len,
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let n = this.left.min(this.block.len() as u64) as usize;
        this.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(this.block.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

async fn serve_echo(port: u16) -> anyhow::Result<()> {
    raise_fd_limit();
    let listener = TcpListener::bind(("::", port)).await?;
    eprintln!("echo listening on {port}");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

async fn serve_source(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("::", port)).await?;
    eprintln!("source listening on {port}");
    let block = Bytes::from(vec![0x5au8; 256 * 1024]);
    loop {
        let (mut stream, _) = listener.accept().await?;
        let block = block.clone();
        tokio::spawn(async move {
            let mut len = [0u8; 8];
            if stream.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut left = u64::from_be_bytes(len);
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                if stream.write_all(&block[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
            let _ = stream.shutdown().await;
        });
    }
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
