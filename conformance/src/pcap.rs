//! Reading what tcpdump captured, to assert what crossed a link.

use std::path::Path;

use anyhow::Result;

/// A TLS 1.3 application-data record header (type 23, legacy version 3.3).
pub const TLS_APPLICATION_DATA: &[u8] = &[0x17, 0x03, 0x03];

/// Whether the raw capture file holds `needle` anywhere (payload bytes appear verbatim).
pub fn contains(pcap: &Path, needle: &[u8]) -> Result<bool> {
    let bytes = std::fs::read(pcap)?;
    Ok(bytes.windows(needle.len()).any(|w| w == needle))
}

/// tcpdump's one-line summary of each captured packet matching `filter` (empty: all).
pub fn packets(pcap: &Path, filter: &str) -> Result<String> {
    let path = pcap.to_string_lossy();
    let mut args = vec!["tcpdump", "-r", &path, "-n"];
    if !filter.is_empty() {
        args.push(filter);
    }
    crate::netns::run(&args)
}
