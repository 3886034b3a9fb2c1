//! The measuring client: blocking sockets, run on a thread inside the client pod's namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// How the client reaches the server.
#[derive(Clone, Copy, Debug)]
pub enum Path {
    /// Straight to the server's address.
    Direct,
    /// Through Weft's SOCKS5 entry (127.0.0.1:15080) in the client pod.
    Weft,
    /// Through a local stunnel client on this port, forwarding to a stunnel server.
    Stunnel { local_port: u16 },
}

/// Opens a connection to `target` along `path`.
pub fn connect(path: Path, target: SocketAddr) -> Result<TcpStream> {
    let stream = match path {
        Path::Direct => TcpStream::connect(target)?,
        Path::Stunnel { local_port } => TcpStream::connect(("127.0.0.1", local_port))?,
        Path::Weft => {
            let mut s = TcpStream::connect("127.0.0.1:15080").context("SOCKS5 entry")?;
            let SocketAddr::V4(v4) = target else {
                bail!("IPv4 only")
            };
            let mut req = vec![5, 1, 0, 5, 1, 0, 1];
            req.extend_from_slice(&v4.ip().octets());
            req.extend_from_slice(&v4.port().to_be_bytes());
            s.write_all(&req)?;
            let mut answer = [0u8; 12];
            s.read_exact(&mut answer)?;
            if answer[1] != 0 || answer[3] != 0 {
                bail!("SOCKS5 refused: {:?}", &answer[2..4]);
            }
            s
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Downloads `bytes` from a `weft-testapp source` server; returns Gbit/s.
pub fn throughput(path: Path, target: SocketAddr, bytes: u64) -> Result<f64> {
    let mut s = connect(path, target)?;
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    s.write_all(&bytes.to_be_bytes())?;
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    if got != bytes {
        bail!("received {got} of {bytes} bytes along {path:?}");
    }
    Ok(bytes as f64 * 8.0 / secs / 1e9)
}

/// Round trips of `size`-byte messages to a `weft-testapp echo` server on one connection;
/// returns each round trip in microseconds (after `warmup` unrecorded ones).
pub fn request_response(
    path: Path,
    target: SocketAddr,
    size: usize,
    iterations: usize,
    warmup: usize,
) -> Result<Vec<f64>> {
    let mut s = connect(path, target)?;
    let msg = vec![0x42u8; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        let start = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        if i >= warmup {
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(samples)
}

/// New connections per second along `path`, each a new TCP connection from the application
/// that carries one 64-byte round trip to a `weft-testapp echo` server and closes: `workers`
/// clients at once for `duration`. A failed connection fails the measurement.
pub fn connection_rate(
    path: Path,
    target: SocketAddr,
    workers: usize,
    duration: std::time::Duration,
) -> Result<f64> {
    let start = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            // Threads start in the namespace of the thread that spawns them.
            std::thread::spawn(move || -> Result<u64> {
                let msg = [0x42u8; 64];
                let mut back = [0u8; 64];
                let mut made = 0u64;
                while start.elapsed() < duration {
                    let mut s = connect(path, target)?;
                    s.write_all(&msg)?;
                    s.read_exact(&mut back)?;
                    made += 1;
                }
                Ok(made)
            })
        })
        .collect();
    let mut total = 0u64;
    for handle in handles {
        total += handle
            .join()
            .map_err(|_| anyhow::anyhow!("a connecting client panicked"))??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}
