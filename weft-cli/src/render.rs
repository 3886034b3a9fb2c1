//! Events as the user reads them: aligned lines (time, node, source → destination, type,
//! verdict, details), coloured on a terminal; or the JSON line as the tunnel sent it.

use serde_json::Value;

/// How events are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

/// `namespace/workload` of one end.
fn end(v: &Value) -> String {
    let (ns, workload) = (s(v, "namespace"), s(v, "workload"));
    if ns.is_empty() || ns == "unknown" {
        v["addr"].as_str().unwrap_or(workload).to_owned()
    } else {
        format!("{ns}/{workload}")
    }
}

/// `HH:MM:SS.mmm` of a time in ms since the epoch (UTC).
fn clock(ms: u64) -> String {
    let day = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day / 3_600_000,
        day / 60_000 % 60,
        day / 1000 % 60,
        day % 1000
    )
}

fn bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

/// `allowed` or `denied`, as the tunnel decides it.
fn verdict(e: &Value) -> &'static str {
    let denied = match s(e, "type") {
        "http" => s(e, "verdict") == "deny",
        "tcp_close" => s(e, "flags") == "DENY",
        _ => false,
    };
    if denied { "denied" } else { "allowed" }
}

/// One event as a line of text.
pub fn text(e: &Value, colour: bool) -> String {
    let kind = s(e, "type");
    let protocol = if kind == "http" { "http" } else { "tcp" };
    let details = match kind {
        "http" => {
            let mut d = format!(
                "{} {}{} {} {:.1} ms",
                s(e, "method"),
                s(e, "authority"),
                s(e, "path"),
                e["status"].as_u64().unwrap_or(0),
                e["duration_ms"].as_f64().unwrap_or(0.0)
            );
            if let Some(policy) = e["policy"].as_str() {
                d.push_str(&format!(" policy={policy}"));
            }
            if let Some(audit) = e["audit"].as_str() {
                d.push_str(&format!(" audit={audit}"));
            }
            d
        }
        "tcp_open" => format!("open {}", s(e, "security")),
        "tcp_close" => {
            let mut d = format!(
                "close {} ↑{} ↓{} {} ms",
                s(e, "security"),
                bytes(e["bytes_received"].as_u64().unwrap_or(0)),
                bytes(e["bytes_sent"].as_u64().unwrap_or(0)),
                e["duration_ms"].as_u64().unwrap_or(0)
            );
            if s(e, "flags") != "-" {
                d.push_str(&format!(" flags={}", s(e, "flags")));
            }
            if let Some(policy) = e["policy"].as_str() {
                d.push_str(&format!(" policy={policy}"));
            }
            if let Some(error) = e["error"].as_str() {
                d.push_str(&format!(" ({error})"));
            }
            d
        }
        other => other.to_owned(),
    };
    let verdict = verdict(e);
    let shown = if colour {
        let code = if verdict == "denied" { "31" } else { "32" };
        format!("\x1b[{code}m{verdict:<7}\x1b[0m")
    } else {
        format!("{verdict:<7}")
    };
    format!(
        "{}  {:<8} {:>28} → {:<28} {:<4}  {shown}  {details}",
        clock(e["time_ms"].as_u64().unwrap_or(0)),
        s(e, "node"),
        end(&e["source"]),
        end(&e["destination"]),
        protocol,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_denied_request_reads_as_one_aligned_line() {
        let e = json!({"time_ms": 3_723_004u64, "node": "node2", "reporter": "destination",
            "source": {"namespace": "shop", "workload": "shopper", "identity": "x"},
            "destination": {"namespace": "shop", "workload": "web", "identity": "y"},
            "type": "http", "method": "POST", "authority": "10.96.0.10", "path": "/echo/x",
            "status": 403, "duration_ms": 0.42, "verdict": "deny", "policy": "shop/web-read-only"});
        let line = text(&e, false);
        assert!(line.starts_with("01:02:03.004  node2 "), "{line}");
        assert!(line.contains("shop/shopper → shop/web"), "{line}");
        assert!(
            line.contains(
                "http  denied   POST 10.96.0.10/echo/x 403 0.4 ms policy=shop/web-read-only"
            ),
            "{line}"
        );
        assert!(text(&e, true).contains("\x1b[31mdenied"));
        let mut audited = e.clone();
        audited["audit"] = json!("shop/web-audit");
        assert!(
            text(&audited, false).ends_with("policy=shop/web-read-only audit=shop/web-audit"),
            "{}",
            text(&audited, false)
        );
    }

    #[test]
    fn a_closed_connection_shows_its_bytes_and_flag() {
        let e = json!({"time_ms": 0, "node": "node1", "source": {"namespace": "shop", "workload": "shopper"},
            "destination": {"namespace": "unknown", "workload": "unknown", "addr": "10.1.2.3:80"},
            "type": "tcp_close", "security": "none", "bytes_sent": 2048, "bytes_received": 10,
            "duration_ms": 5, "flags": "UF", "error": "refused"});
        let line = text(&e, false);
        assert!(line.contains("→ 10.1.2.3:80"), "{line}");
        assert!(
            line.contains("close none ↑10 B ↓2.0 KiB 5 ms flags=UF (refused)"),
            "{line}"
        );
        let denied = json!({"time_ms": 0, "node": "node2", "source": {"namespace": "shop", "workload": "shopper"},
            "destination": {"namespace": "shop", "workload": "db"},
            "type": "tcp_close", "security": "mutual_tls", "bytes_sent": 0, "bytes_received": 0,
            "duration_ms": 0, "flags": "DENY", "policy": "shop/db-from-web",
            "error": "denied: no Allow MeshPolicy of shop/db matches"});
        let line = text(&denied, false);
        assert!(
            line.contains("tcp   denied   close mutual_tls ↑0 B ↓0 B 0 ms flags=DENY policy=shop/db-from-web (denied:"),
            "{line}"
        );
    }
}
