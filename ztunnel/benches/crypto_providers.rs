//! Which rustls crypto provider and TLS 1.3 cipher suite move bulk data fastest on this CPU.
//! In-memory client -> server transfer (encrypt + decrypt, no sockets), interleaved rounds,
//! medians. Run: `cargo bench -p ztunnel --bench crypto_providers`.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use rcgen::{CertificateParams, KeyPair};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
    SupportedCipherSuite,
};

const BYTES: usize = 256 << 20;
const CHUNK: usize = 64 * 1024;
const ROUNDS: usize = 5;

fn with_suite(base: CryptoProvider, name: &str) -> CryptoProvider {
    let suites: Vec<SupportedCipherSuite> = base
        .cipher_suites
        .iter()
        .copied()
        .filter(|s| format!("{:?}", s.suite()) == name)
        .collect();
    assert_eq!(suites.len(), 1, "{name}");
    CryptoProvider {
        cipher_suites: suites,
        ..base
    }
}

fn pair(provider: CryptoProvider) -> (ClientConnection, ServerConnection) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["bench.local".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = Arc::new(provider);
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.der().to_vec()))
        .unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut c = ClientConnection::new(
        Arc::new(client),
        ServerName::try_from("bench.local").unwrap(),
    )
    .unwrap();
    let mut s = ServerConnection::new(Arc::new(server)).unwrap();
    while c.is_handshaking() || s.is_handshaking() {
        shuttle(&mut c, &mut s);
    }
    (c, s)
}

fn shuttle(c: &mut ClientConnection, s: &mut ServerConnection) {
    let mut buf = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        s.read_tls(&mut rd).unwrap();
        s.process_new_packets().unwrap();
    }
    buf.clear();
    while s.wants_write() {
        s.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        c.read_tls(&mut rd).unwrap();
        c.process_new_packets().unwrap();
    }
}

/// Gbit/s of one bulk transfer.
fn transfer(provider: CryptoProvider) -> f64 {
    let (mut c, mut s) = pair(provider);
    let chunk = vec![0x5au8; CHUNK];
    let mut out = vec![0u8; CHUNK];
    let mut wire = Vec::with_capacity(CHUNK * 2);
    let start = Instant::now();
    let mut moved = 0;
    while moved < BYTES {
        c.writer().write_all(&chunk).unwrap();
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
            loop {
                match s.reader().read(&mut out) {
                    Ok(0) => break,
                    Ok(n) => moved += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
    moved as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// Provider name, TLS 1.3 suite, the provider.
type Case = (&'static str, &'static str, fn() -> CryptoProvider);

fn main() {
    let cases: Vec<Case> = vec![
        (
            "ring",
            "TLS13_AES_128_GCM_SHA256",
            rustls::crypto::ring::default_provider,
        ),
        (
            "ring",
            "TLS13_AES_256_GCM_SHA384",
            rustls::crypto::ring::default_provider,
        ),
        (
            "ring",
            "TLS13_CHACHA20_POLY1305_SHA256",
            rustls::crypto::ring::default_provider,
        ),
        (
            "aws-lc-rs",
            "TLS13_AES_128_GCM_SHA256",
            rustls::crypto::aws_lc_rs::default_provider,
        ),
        (
            "aws-lc-rs",
            "TLS13_AES_256_GCM_SHA384",
            rustls::crypto::aws_lc_rs::default_provider,
        ),
        (
            "aws-lc-rs",
            "TLS13_CHACHA20_POLY1305_SHA256",
            rustls::crypto::aws_lc_rs::default_provider,
        ),
    ];
    let mut figures = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (i, (_, suite, provider)) in cases.iter().enumerate() {
            figures[i].push(transfer(with_suite(provider(), suite)));
        }
    }
    println!(
        "rustls in-memory bulk transfer (encrypt + decrypt, one core), median of {ROUNDS} rounds of {} MiB:",
        BYTES >> 20
    );
    let median = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let base = median(&figures[0]);
    let mut json = serde_json::Map::new();
    json.insert("bench".into(), "crypto_providers".into());
    for (i, (provider, suite, _)) in cases.iter().enumerate() {
        let m = median(&figures[i]);
        println!(
            "  {provider:10} {suite:32} {m:6.2} Gbit/s  ({:.2}x ring AES-128-GCM)",
            m / base
        );
        json.insert(
            format!("{provider}_{suite}_gbps"),
            ((m * 100.0).round() / 100.0).into(),
        );
    }
    println!("{}", serde_json::Value::Object(json));
}
