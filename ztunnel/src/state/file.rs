//! The YAML state file: the tunnel's own source of workloads and services.

use std::path::Path;

use tunnel_proto::yaml::YamlFault;

use super::{State, StateError, StateSpec};

/// Parses and validates a state file's text.
pub fn parse_state_file(path: &Path, text: &str) -> Result<State, StateError> {
    let spec: StateSpec = if text.trim().is_empty() {
        StateSpec::default()
    } else {
        serde_saphyr::from_str(text).map_err(|e| {
            let fault = YamlFault::from(&e);
            match fault.at {
                Some((line, column)) => StateError::Parse {
                    path: path.to_owned(),
                    line,
                    column,
                    reason: fault.reason,
                },
                None => StateError::ParseNoLocation {
                    path: path.to_owned(),
                    reason: fault.reason,
                },
            }
        })?
    };
    State::build(spec, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_workloads_and_services() {
        let text = r#"
workloads:
  - name: a
    namespace: default
    serviceAccount: client
    ips: [10.1.1.2]
    node: node1
    netns: /run/netns/a
  - name: b
    namespace: default
    ips: [10.1.2.2, "fd00::2"]
    node: node2
    protocol: TCP
services:
  - name: web
    namespace: default
    addresses: [10.96.0.1]
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [default/a]
"#;
        let state = parse_state_file(Path::new("s.yaml"), text).unwrap();
        let b = state.workload_by_ip("fd00::2".parse().unwrap()).unwrap();
        assert_eq!(b.service_account, "default");
        assert_eq!(b.protocol, super::super::Protocol::Tcp);
        assert_eq!(state.spec().services[0].endpoints, vec!["default/a"]);
    }

    #[test]
    fn names_file_line_and_reason() {
        let text =
            "workloads:\n  - name: a\n    namespace: default\n    ips: [not-an-ip]\n    node: n\n";
        let err = parse_state_file(Path::new("/etc/weft/state.yaml"), text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/weft/state.yaml:4:"), "{msg}");
        assert!(msg.contains("invalid IP address"), "{msg}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = "workloads:\n  - name: a\n    namespace: default\n    ips: [10.0.0.1]\n    node: n\n    nodee: x\n";
        let msg = parse_state_file(Path::new("s.yaml"), text)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("unknown field `nodee`"), "{msg}");
    }

    #[test]
    fn alias_bombs_are_refused_by_the_parsers_budget() {
        // A 1 MiB name anchored once and named by 100 workloads: 100 MiB of strings from a
        // 1 MiB file, past the parser's 64 MiB budget of scalar bytes.
        let big = "x".repeat(1 << 20);
        let mut text =
            format!("workloads:\n  - {{name: &s {big}, namespace: n, ips: [10.0.0.1], node: n}}\n");
        for _ in 0..100 {
            text.push_str("  - {name: *s, namespace: n, ips: [10.0.0.1], node: n}\n");
        }
        let msg = parse_state_file(Path::new("s.yaml"), &text)
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("s.yaml:"), "{msg}");
        assert!(msg.contains("budget breached"), "{msg}");
    }
}
