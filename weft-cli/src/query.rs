//! What the user asks, as the query string each tunnel's `/flows` takes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The filters and window of one `weft observe`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Question {
    pub namespace: Option<String>,
    pub from_pod: Option<String>,
    pub to_pod: Option<String>,
    pub from_identity: Option<String>,
    /// `tcp` or `http`.
    pub protocol: Option<String>,
    /// `allowed` or `denied`.
    pub verdict: Option<String>,
    /// Only events this recent.
    pub since: Option<Duration>,
    /// The last N events (over all tunnels).
    pub last: Option<usize>,
    pub follow: bool,
}

impl Question {
    /// The query string for `/flows`, at time `now`.
    pub fn query(&self, now: SystemTime) -> String {
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut add = |name: &str, value: &Option<String>| {
            if let Some(v) = value {
                pairs.push((name.to_owned(), v.clone()));
            }
        };
        add("namespace", &self.namespace);
        add("from_pod", &self.from_pod);
        add("to_pod", &self.to_pod);
        add("from_identity", &self.from_identity);
        add("type", &self.protocol);
        add("verdict", &self.verdict);
        if let Some(since) = self.since {
            let at = now
                .checked_sub(since)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis());
            pairs.push(("since".into(), at.to_string()));
        }
        if let Some(last) = self.last {
            // Each tunnel sends its last N; the merge keeps the last N of all.
            pairs.push(("last".into(), last.to_string()));
        }
        if self.follow {
            pairs.push(("follow".into(), "true".into()));
        }
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// Percent-encodes everything but unreserved characters.
fn encode(value: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_become_the_query_the_tunnels_read() {
        let q = Question {
            to_pod: Some("shop/web".into()),
            from_identity: Some("spiffe://cluster.local/ns/shop/sa/shopper".into()),
            protocol: Some("http".into()),
            since: Some(Duration::from_secs(60)),
            last: Some(20),
            follow: true,
            ..Question::default()
        };
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(
            q.query(now),
            "to_pod=shop%2Fweb&from_identity=spiffe%3A%2F%2Fcluster.local%2Fns%2Fshop%2Fsa%2Fshopper&type=http&since=940000&last=20&follow=true"
        );
        assert_eq!(Question::default().query(now), "");
    }
}
