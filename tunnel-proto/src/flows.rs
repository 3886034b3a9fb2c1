//! The flow events a tunnel reports (`GET /flows` on its admin endpoint, one JSON object a
//! line) and the question a reader asks: shared by the tunnel, which makes and filters the
//! events, and `weft observe`, which asks and prints them. The query string is written and read
//! here only.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One end of a flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEnd {
    pub namespace: String,
    pub workload: String,
    pub identity: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FlowKind {
    /// A connection accepted by this tunnel (`reporter`: which end this tunnel serves).
    TcpOpen { security: String },
    /// A connection's end: bytes each way, how long, and the flag when it failed or was
    /// refused (`DENY`, `CERT`, `UF`...; `-` for a clean close).
    TcpClose {
        security: String,
        bytes_sent: u64,
        bytes_received: u64,
        duration_ms: u64,
        flags: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// The policy that refused it (flag `DENY`), when a policy did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<String>,
    },
    /// An HTTP request on a parsed port, with the verdict and the policy that decided.
    Http {
        method: String,
        authority: String,
        path: String,
        status: u16,
        duration_ms: f64,
        verdict: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<String>,
        /// The Audit policy that matched the request, if one did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        audit: Option<String>,
    },
}

/// One event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowEvent {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The node whose tunnel saw it.
    pub node: String,
    /// `source` or `destination`: which end this tunnel serves.
    pub reporter: String,
    pub source: FlowEnd,
    pub destination: FlowEnd,
    #[serde(flatten)]
    pub kind: FlowKind,
}

impl FlowEvent {
    /// `allowed` or `denied`.
    pub fn verdict(&self) -> &'static str {
        let denied = match &self.kind {
            FlowKind::TcpOpen { .. } => false,
            FlowKind::TcpClose { flags, .. } => flags == "DENY",
            FlowKind::Http { verdict, .. } => verdict == "deny",
        };
        if denied { "denied" } else { "allowed" }
    }

    /// Whether an Audit policy matched it.
    pub fn audited(&self) -> bool {
        matches!(&self.kind, FlowKind::Http { audit: Some(_), .. })
    }

    /// `tcp` or `http`.
    pub fn protocol(&self) -> &'static str {
        match self.kind {
            FlowKind::Http { .. } => "http",
            _ => "tcp",
        }
    }
}

/// `event` as a line of `/flows` (JSON and a newline), as the tunnel and the relay write it.
pub fn event_line(event: &FlowEvent) -> Vec<u8> {
    let mut text = serde_json::to_vec(event).unwrap_or_default();
    text.push(b'\n');
    text
}

/// The line of `/flows` that tells a reader it lost `lost` events before the next one.
pub fn lost_line(lost: u64) -> Vec<u8> {
    format!("{{\"lost\":{lost}}}\n").into_bytes()
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Which events a subscriber wants; every field given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// Either end in this namespace.
    pub namespace: Option<String>,
    /// The source is this pod (`namespace/workload`).
    pub from_pod: Option<String>,
    /// The destination is this pod (`namespace/workload`).
    pub to_pod: Option<String>,
    /// The source's SPIFFE ID.
    pub from_identity: Option<String>,
    /// `tcp` or `http`.
    pub protocol: Option<String>,
    /// `allowed`, `denied`, or `audited` (an Audit policy matched, whatever the verdict).
    pub verdict: Option<String>,
    /// Only events at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("{name}={value}: {why}")]
    Bad {
        name: String,
        value: String,
        why: &'static str,
    },
    #[error(
        "unknown filter {0:?} (namespace, from_pod, to_pod, from_identity, type, verdict, since, last, follow)"
    )]
    Unknown(String),
}

impl FlowFilter {
    /// Reads one `name=value` of a query; `last` and `follow` are not filters and are left to
    /// the caller.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), FilterError> {
        let bad = |why| FilterError::Bad {
            name: name.to_owned(),
            value: value.to_owned(),
            why,
        };
        let value = value.to_owned();
        match name {
            "namespace" => self.namespace = Some(value),
            "from_pod" | "to_pod" => {
                if value
                    .split_once('/')
                    .is_none_or(|(ns, pod)| ns.is_empty() || pod.is_empty())
                {
                    return Err(bad("a pod is namespace/name"));
                }
                if name == "from_pod" {
                    self.from_pod = Some(value);
                } else {
                    self.to_pod = Some(value);
                }
            }
            "from_identity" => self.from_identity = Some(value),
            "type" => match value.as_str() {
                "tcp" | "http" => self.protocol = Some(value),
                _ => return Err(bad("tcp or http")),
            },
            "verdict" => match value.as_str() {
                "allowed" | "denied" | "audited" => self.verdict = Some(value),
                _ => return Err(bad("allowed, denied or audited")),
            },
            "since" => {
                self.since_ms = Some(
                    value
                        .parse()
                        .map_err(|_| bad("milliseconds since the Unix epoch"))?,
                )
            }
            other => return Err(FilterError::Unknown(other.to_owned())),
        }
        Ok(())
    }

    pub fn matches(&self, event: &FlowEvent) -> bool {
        let pod = |end: &FlowEnd, want: &str| {
            want.split_once('/')
                .is_some_and(|(ns, name)| end.namespace == ns && end.workload == name)
        };
        self.namespace
            .as_ref()
            .is_none_or(|ns| event.source.namespace == *ns || event.destination.namespace == *ns)
            && self.from_pod.as_ref().is_none_or(|p| pod(&event.source, p))
            && self
                .to_pod
                .as_ref()
                .is_none_or(|p| pod(&event.destination, p))
            && self
                .from_identity
                .as_ref()
                .is_none_or(|id| event.source.identity == *id)
            && self.protocol.as_ref().is_none_or(|p| event.protocol() == p)
            && self.verdict.as_ref().is_none_or(|v| match v.as_str() {
                "audited" => event.audited(),
                v => event.verdict() == v,
            })
            && self.since_ms.is_none_or(|since| event.time_ms >= since)
    }
}

/// What a reader asks of `/flows`: which events, how many of the recent ones, and whether to
/// stay for new ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowQuery {
    pub filter: FlowFilter,
    /// The last N matching events of the ring first; all it holds when `None`.
    pub last: Option<usize>,
    pub follow: bool,
}

impl FlowQuery {
    /// The query string.
    pub fn to_query(&self) -> String {
        let f = &self.filter;
        let mut pairs: Vec<(&str, String)> = Vec::new();
        for (name, value) in [
            ("namespace", &f.namespace),
            ("from_pod", &f.from_pod),
            ("to_pod", &f.to_pod),
            ("from_identity", &f.from_identity),
            ("type", &f.protocol),
            ("verdict", &f.verdict),
        ] {
            if let Some(v) = value {
                pairs.push((name, v.clone()));
            }
        }
        if let Some(since) = f.since_ms {
            pairs.push(("since", since.to_string()));
        }
        if let Some(last) = self.last {
            pairs.push(("last", last.to_string()));
        }
        if self.follow {
            pairs.push(("follow", "true".into()));
        }
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// Reads a query string (values percent-decoded).
    pub fn parse(query: &str) -> Result<FlowQuery, String> {
        let mut out = FlowQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value =
                percent_decode(value).ok_or_else(|| format!("{name}: bad percent-encoding"))?;
            match name {
                "last" => {
                    out.last = Some(
                        value
                            .parse()
                            .map_err(|_| format!("last={value}: a number of events"))?,
                    )
                }
                "follow" => {
                    out.follow = match value.as_str() {
                        "" | "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(format!("follow={value}: true or false")),
                    }
                }
                _ => out.filter.set(name, &value).map_err(|e| e.to_string())?,
            }
        }
        Ok(out)
    }
}

/// Percent-encodes everything but unreserved characters.
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_written_reads_back_the_same() {
        let mut filter = FlowFilter::default();
        filter.set("to_pod", "shop/web").unwrap();
        filter
            .set("from_identity", "spiffe://cluster.local/ns/shop/sa/shopper")
            .unwrap();
        filter.set("type", "http").unwrap();
        filter.set("since", "940000").unwrap();
        let query = FlowQuery {
            filter,
            last: Some(20),
            follow: true,
        };
        let text = query.to_query();
        assert_eq!(
            text,
            "to_pod=shop%2Fweb&from_identity=spiffe%3A%2F%2Fcluster.local%2Fns%2Fshop%2Fsa%2Fshopper&type=http&since=940000&last=20&follow=true"
        );
        assert_eq!(FlowQuery::parse(&text).unwrap(), query);
        assert_eq!(FlowQuery::parse("").unwrap(), FlowQuery::default());
        assert!(
            FlowQuery::parse("last=many")
                .unwrap_err()
                .contains("last=many")
        );
        assert!(
            FlowQuery::parse("verdict=maybe")
                .unwrap_err()
                .contains("allowed, denied or audited")
        );
        assert!(
            FlowQuery::parse("colour=red")
                .unwrap_err()
                .contains("unknown filter")
        );
        assert!(FlowQuery::parse("to_pod=%zz").is_err());
    }
}
