//! The compiled forms of a rule's value lists: strings with Istio's wildcards, address ranges
//! and ports. Each answers "does this value match one of the list" without allocating.

use std::collections::HashSet;
use std::net::IpAddr;

/// Strings matched exactly, by prefix (`x*`), by suffix (`*x`) or all (`*`), as in Istio.
#[derive(Clone, Debug, Default)]
pub(crate) struct Strings {
    any: bool,
    exact: HashSet<Box<str>>,
    prefixes: Vec<Box<str>>,
    suffixes: Vec<Box<str>>,
}

impl Strings {
    /// `lowercase`: the values (and later the candidates) compare without case (hosts).
    pub(crate) fn new(values: &[String], lowercase: bool) -> Self {
        let mut strings = Strings::default();
        for value in values {
            let value = if lowercase {
                value.to_ascii_lowercase()
            } else {
                value.clone()
            };
            if value == "*" {
                strings.any = true;
            } else if let Some(prefix) = value.strip_suffix('*') {
                strings.prefixes.push(prefix.into());
            } else if let Some(suffix) = value.strip_prefix('*') {
                strings.suffixes.push(suffix.into());
            } else {
                strings.exact.insert(value.into());
            }
        }
        strings
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        self.any
            || self.exact.contains(value)
            || self.prefixes.iter().any(|p| value.starts_with(&**p))
            || self.suffixes.iter().any(|s| value.ends_with(&**s))
    }
}

/// Address ranges, by prefix length: a lookup masks the address once per length in use and
/// looks it up in that length's set.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cidrs {
    v4: Vec<(u8, HashSet<u32>)>,
    v6: Vec<(u8, HashSet<u128>)>,
}

impl Cidrs {
    /// `values` were validated (`a.b.c.d`, `a.b.c.d/n`, IPv6 likewise); anything else is
    /// left out, which can only make an allow narrower.
    pub(crate) fn new(values: &[String]) -> Self {
        let mut cidrs = Cidrs::default();
        for value in values {
            let (addr, len) = match value.split_once('/') {
                Some((addr, len)) => (addr, len.parse::<u8>().ok()),
                None => (value.as_str(), None),
            };
            match addr.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => {
                    let len = len.unwrap_or(32).min(32);
                    insert(&mut cidrs.v4, len, mask4(u32::from(ip), len));
                }
                Ok(IpAddr::V6(ip)) => {
                    let len = len.unwrap_or(128).min(128);
                    insert(&mut cidrs.v6, len, mask6(u128::from(ip), len));
                }
                Err(_) => {}
            }
        }
        cidrs
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => {
                let ip = u32::from(ip);
                self.v4
                    .iter()
                    .any(|(len, set)| set.contains(&mask4(ip, *len)))
            }
            IpAddr::V6(ip) => {
                // An IPv4-mapped address is its IPv4 address (a dual-stack socket's peers).
                if let Some(v4) = ip.to_ipv4_mapped() {
                    return self.contains(IpAddr::V4(v4));
                }
                let ip = u128::from(ip);
                self.v6
                    .iter()
                    .any(|(len, set)| set.contains(&mask6(ip, *len)))
            }
        }
    }
}

fn insert<T: std::hash::Hash + Eq>(by_len: &mut Vec<(u8, HashSet<T>)>, len: u8, network: T) {
    match by_len.iter_mut().find(|(l, _)| *l == len) {
        Some((_, set)) => {
            set.insert(network);
        }
        None => by_len.push((len, HashSet::from([network]))),
    }
}

fn mask4(ip: u32, len: u8) -> u32 {
    match len {
        0 => 0,
        len => ip & (u32::MAX << (32 - u32::from(len))),
    }
}

fn mask6(ip: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        len => ip & (u128::MAX << (128 - u32::from(len))),
    }
}

/// Ports.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ports(Vec<u16>);

impl Ports {
    /// `values` were validated; anything that is not a port is left out.
    pub(crate) fn new(values: &[String]) -> Self {
        let mut ports: Vec<u16> = values.iter().filter_map(|v| v.parse().ok()).collect();
        ports.sort_unstable();
        ports.dedup();
        Ports(ports)
    }

    pub(crate) fn contains(&self, port: u16) -> bool {
        self.0.binary_search(&port).is_ok()
    }
}

/// Lower-cases `value` into `buf` when it fits (hosts are at most 255 bytes), without
/// allocating; a longer value is returned as it is.
pub(crate) fn ascii_lowercase<'b>(value: &'b str, buf: &'b mut [u8; 256]) -> &'b str {
    if !value.bytes().any(|b| b.is_ascii_uppercase()) || value.len() > buf.len() {
        return value;
    }
    let out = &mut buf[..value.len()];
    out.copy_from_slice(value.as_bytes());
    out.make_ascii_lowercase();
    // Lower-casing ASCII letters keeps UTF-8 valid.
    std::str::from_utf8(out).unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(values: &[&str]) -> Strings {
        let owned: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        Strings::new(&owned, false)
    }

    #[test]
    fn strings_match_exactly_by_prefix_by_suffix_or_all() {
        let s = strings(&["a/b", "ns/*", "*/sa/admin"]);
        assert!(s.matches("a/b"));
        assert!(!s.matches("a/bc"));
        assert!(s.matches("ns/x") && s.matches("ns/"));
        assert!(s.matches("td/ns/x/sa/admin"));
        assert!(!s.matches("td/ns/x/sa/admins"));
        assert!(strings(&["*"]).matches("anything"));
        assert!(!strings(&[]).matches(""));
    }

    #[test]
    fn cidrs_contain_addresses_in_their_ranges() {
        let values: Vec<String> = ["10.1.0.0/16", "192.168.1.7", "fd00::/8", "0.0.0.0/0"]
            .iter()
            .map(|v| (*v).to_owned())
            .collect();
        let all = Cidrs::new(&values[..3]);
        assert!(all.contains("10.1.200.3".parse().unwrap()));
        assert!(!all.contains("10.2.0.1".parse().unwrap()));
        assert!(all.contains("192.168.1.7".parse().unwrap()));
        assert!(!all.contains("192.168.1.8".parse().unwrap()));
        assert!(all.contains("fd12::1".parse().unwrap()));
        assert!(!all.contains("fe80::1".parse().unwrap()));
        assert!(
            all.contains("::ffff:10.1.0.9".parse().unwrap()),
            "IPv4-mapped"
        );
        let everything = Cidrs::new(&values[3..]);
        assert!(everything.contains("203.0.113.9".parse().unwrap()));
        assert!(!everything.contains("fd00::1".parse().unwrap()));
    }

    #[test]
    fn hosts_lower_case_without_allocating() {
        let mut buf = [0u8; 256];
        assert_eq!(
            ascii_lowercase("Shop.Example:8080", &mut buf),
            "shop.example:8080"
        );
        let long = "A".repeat(300);
        assert_eq!(ascii_lowercase(&long, &mut buf), long);
    }
}
