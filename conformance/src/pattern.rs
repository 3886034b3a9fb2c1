//! A deterministic byte stream, so a receiver can check a large transfer without storing it.

use sha2::{Digest, Sha256};

/// Size of the repeated block.
pub const BLOCK: usize = 64 * 1024;

/// The block the stream repeats, from a seed (xorshift64).
pub fn block(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(BLOCK);
    while out.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// The first `len` bytes of the stream for `seed`, in chunks of at most [`BLOCK`].
pub fn chunks(seed: u64, len: u64) -> impl Iterator<Item = bytes::Bytes> {
    let block = bytes::Bytes::from(block(seed));
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(BLOCK as u64) as usize;
        left -= n as u64;
        Some(block.slice(..n))
    })
}

/// Hex SHA-256 of the first `len` bytes of the stream for `seed`.
pub fn sha256_hex(seed: u64, len: u64) -> String {
    let mut hash = Sha256::new();
    for chunk in chunks(seed, len) {
        hash.update(&chunk);
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
