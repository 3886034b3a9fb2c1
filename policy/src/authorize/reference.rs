//! A plain evaluator written straight from the semantics (see the parent module), over the
//! policy objects as written: slow, allocating, obviously right. Tests check the compiled
//! [`super::Authorizer`] against it on generated policies and requests.

use std::net::IpAddr;

use super::{Attributes, Http, Verdict};
use crate::{Condition, MeshPolicy, Operation, PolicyAction, Rule, Source};

/// The verdict, the deciding policy and the first matching Audit policy (`namespace/name`).
pub fn decide(
    policies: &[MeshPolicy],
    a: &Attributes<'_>,
) -> (Verdict, Option<String>, Option<String>) {
    let with = |action: PolicyAction| -> Vec<&MeshPolicy> {
        policies
            .iter()
            .filter(|p| p.spec.action == action)
            .collect()
    };
    let first_match = |list: &[&MeshPolicy]| -> Option<String> {
        list.iter()
            .find(|p| policy_matches(p, a))
            .map(|p| crate::name_of(&p.metadata))
    };
    let audited = first_match(&with(PolicyAction::Audit));
    if let Some(deny) = first_match(&with(PolicyAction::Deny)) {
        return (Verdict::Deny, Some(deny), audited);
    }
    let allows = with(PolicyAction::Allow);
    if allows.is_empty() {
        return (Verdict::Allow, None, audited);
    }
    match first_match(&allows) {
        Some(allow) => (Verdict::Allow, Some(allow), audited),
        None => (Verdict::Deny, None, audited),
    }
}

fn policy_matches(p: &MeshPolicy, a: &Attributes<'_>) -> bool {
    let deny = p.spec.action == PolicyAction::Deny;
    p.spec.rules.iter().any(|rule| rule_matches(rule, a, deny))
}

fn rule_matches(rule: &Rule, a: &Attributes<'_>, deny: bool) -> bool {
    let from = rule.from.is_empty() || rule.from.iter().any(|f| source_matches(&f.source, a));
    let to = rule.to.is_empty()
        || rule
            .to
            .iter()
            .any(|t| operation_matches(&t.operation, a, deny));
    let when = rule.when.iter().all(|c| condition_matches(c, a, deny));
    from && to && when
}

/// One field: `values` (one must match) and `not_values` (none may); an absent attribute
/// matches no list and every `not` list; an empty list is no constraint.
fn field(
    values: &[String],
    not_values: &[String],
    value: Option<&str>,
    test: fn(&str, &str) -> bool,
) -> bool {
    let positive = values.is_empty() || value.is_some_and(|v| values.iter().any(|p| test(p, v)));
    let negative =
        not_values.is_empty() || value.is_none_or(|v| !not_values.iter().any(|p| test(p, v)));
    positive && negative
}

fn wildcard(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else {
        pattern == value
    }
}

fn host_wildcard(pattern: &str, value: &str) -> bool {
    let (pattern, value) = (pattern.to_lowercase(), value.to_lowercase());
    if wildcard(&pattern, &value) {
        return true;
    }
    // With the port left off: `name:digits` or `[v6]:digits`.
    match value.rsplit_once(':') {
        Some((bare, port))
            if !port.is_empty()
                && port.chars().all(|c| c.is_ascii_digit())
                && (bare.ends_with(']') || !bare.contains(':')) =>
        {
            wildcard(&pattern, bare)
        }
        _ => false,
    }
}

fn in_block(block: &str, value: &str) -> bool {
    let Ok(ip) = value.parse::<IpAddr>() else {
        return false;
    };
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let (network, len) = match block.split_once('/') {
        Some((n, l)) => (n, l.parse::<u32>().ok()),
        None => (block, None),
    };
    let Ok(network) = network.parse::<IpAddr>() else {
        return false;
    };
    // Compare the top `len` bits of both, as 128-bit numbers (IPv4 in the low 32 bits).
    let (bits, a, b) = match (network, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (32, u128::from(u32::from(n)), u128::from(u32::from(i))),
        (IpAddr::V6(n), IpAddr::V6(i)) => (128, u128::from(n), u128::from(i)),
        _ => return false,
    };
    let len = len.unwrap_or(bits).min(bits);
    let shift = bits - len;
    shift >= 128 || (a >> shift) == (b >> shift)
}

fn port_is(pattern: &str, value: &str) -> bool {
    pattern.parse::<u16>().ok() == value.parse::<u16>().ok() && pattern.parse::<u16>().is_ok()
}

fn source_matches(s: &Source, a: &Attributes<'_>) -> bool {
    let ip = a.source_ip.to_string();
    field(
        &s.principals,
        &s.not_principals,
        a.peer.map(|p| p.principal),
        wildcard,
    ) && field(
        &s.namespaces,
        &s.not_namespaces,
        a.peer.map(|p| p.namespace),
        wildcard,
    ) && field(&s.ip_blocks, &s.not_ip_blocks, Some(&ip), in_block)
}

fn operation_matches(o: &Operation, a: &Attributes<'_>, deny: bool) -> bool {
    let port = a.destination_port.to_string();
    if !field(&o.ports, &o.not_ports, Some(&port), port_is) {
        return false;
    }
    let uses_http = [
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
        &o.hosts,
        &o.not_hosts,
    ]
    .iter()
    .any(|list| !list.is_empty());
    if !uses_http {
        return true;
    }
    match a.http {
        Http::Unparsed => deny,
        Http::Connection => !deny,
        Http::Request(r) => {
            field(&o.methods, &o.not_methods, Some(r.method), wildcard)
                && field(&o.paths, &o.not_paths, Some(r.path), wildcard)
                && field(&o.hosts, &o.not_hosts, Some(r.host), host_wildcard)
        }
    }
}

fn condition_matches(c: &Condition, a: &Attributes<'_>, deny: bool) -> bool {
    let (v, nv) = (&c.values[..], &c.not_values[..]);
    match c.key.as_str() {
        "source.ip" => field(v, nv, Some(&a.source_ip.to_string()), in_block),
        "destination.ip" => field(v, nv, Some(&a.destination_ip.to_string()), in_block),
        "destination.port" => field(v, nv, Some(&a.destination_port.to_string()), port_is),
        "source.namespace" => field(v, nv, a.peer.map(|p| p.namespace), wildcard),
        "source.principal" => field(v, nv, a.peer.map(|p| p.principal), wildcard),
        key => match super::header_name(key) {
            Some(name) => match a.http {
                Http::Unparsed => deny,
                Http::Connection => !deny,
                Http::Request(r) => field(v, nv, r.header.get(&name.to_lowercase()), wildcard),
            },
            None => deny,
        },
    }
}
