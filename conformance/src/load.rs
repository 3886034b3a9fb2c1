//! Load helpers that run inside a pod's namespace (call them from `Netns::run_in`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::mpsc;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a TCP connection to `target` through the SOCKS5 entry on 127.0.0.1:15080.
pub async fn socks_connect(target: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect("127.0.0.1:15080")
        .await
        .context("connect to SOCKS5 entry")?;
    s.set_nodelay(true)?;
    let SocketAddr::V4(v4) = target else {
        bail!("IPv4 only")
    };
    let mut req = vec![5, 1, 0, 5, 1, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&req).await?;
    let mut answer = [0u8; 12];
    s.read_exact(&mut answer).await.context("SOCKS5 answer")?;
    if answer[..2] != [5, 0] || answer[3] != 0 {
        bail!("SOCKS5 refused: {:?}", &answer[2..4]);
    }
    Ok(s)
}

/// Opens `n` echo connections at once through the mesh, checks one echo on each, reports how
/// many succeeded on `held`, keeps them all open until `release`, then closes them.
pub fn hold_echo_connections(
    n: usize,
    ip: Ipv4Addr,
    port: u16,
    held: mpsc::Sender<usize>,
    release: mpsc::Receiver<()>,
) -> Result<()> {
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let target = SocketAddr::from((ip, port));
    runtime.block_on(async move {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                tokio::spawn(async move {
                    let mut s = socks_connect(target).await?;
                    let msg = format!("ping {i:06}");
                    s.write_all(msg.as_bytes()).await?;
                    let mut back = vec![0u8; msg.len()];
                    s.read_exact(&mut back).await?;
                    anyhow::ensure!(back == msg.as_bytes(), "echo mismatch");
                    Ok::<_, anyhow::Error>(s)
                })
            })
            .collect();
        let mut open = Vec::new();
        for t in tasks {
            if let Ok(Ok(s)) = t.await {
                open.push(s);
            }
        }
        let _ = held.send(open.len());
        tokio::task::spawn_blocking(move || release.recv())
            .await
            .ok();
        drop(open);
        Ok(())
    })
}

/// Lifts the open-file soft limit to the hard limit.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// One HTTP/1.1 request for `/echo/<text>` on a blocking `stream` (kept open for more): the
/// response body.
pub fn http_echo(stream: &mut std::net::TcpStream, text: &str) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    write!(stream, "GET /echo/{text} HTTP/1.1\r\nHost: server\r\n\r\n")?;
    let mut reader = BufReader::new(stream);
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}
