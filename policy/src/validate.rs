//! Checks a policy object field by field; every problem names its field and says what is wrong.

use std::net::IpAddr;

use crate::{MeshAuthentication, MeshPolicy, PolicyError, Rule, WorkloadSelector};

/// The attributes a `when` condition may test.
pub const CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "request.headers[<name>]",
];

/// Every problem of a MeshPolicy (empty: valid).
pub fn validate_policy(policy: &MeshPolicy) -> Vec<PolicyError> {
    let mut check = Checker::new("MeshPolicy", &policy.metadata);
    if let Some(selector) = &policy.spec.selector {
        check.selector("spec.selector", selector);
    }
    for (i, rule) in policy.spec.rules.iter().enumerate() {
        check.rule(&format!("spec.rules[{i}]"), rule);
    }
    check.problems
}

/// Every problem of a MeshAuthentication (empty: valid).
pub fn validate_authentication(authn: &MeshAuthentication) -> Vec<PolicyError> {
    let mut check = Checker::new("MeshAuthentication", &authn.metadata);
    if let Some(selector) = &authn.spec.selector {
        check.selector("spec.selector", selector);
    }
    check.problems
}

struct Checker {
    kind: &'static str,
    object: String,
    problems: Vec<PolicyError>,
}

impl Checker {
    fn new(
        kind: &'static str,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Self {
        let object = format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or("<no name>")
        );
        Checker {
            kind,
            object,
            problems: Vec::new(),
        }
    }

    fn fail(&mut self, field: &str, reason: String) {
        self.problems.push(PolicyError::Invalid {
            kind: self.kind,
            object: self.object.clone(),
            field: field.to_owned(),
            reason,
        });
    }

    /// Each value of a list, with its field path and index.
    fn each(&mut self, field: &str, values: &[String], ok: impl Fn(&str) -> Result<(), String>) {
        for (i, value) in values.iter().enumerate() {
            if let Err(reason) = ok(value) {
                self.fail(&format!("{field}[{i}]"), reason);
            }
        }
    }

    fn selector(&mut self, field: &str, selector: &WorkloadSelector) {
        for (key, value) in &selector.match_labels {
            if key.is_empty() {
                self.fail(
                    &format!("{field}.matchLabels"),
                    "an empty label key".to_owned(),
                );
            } else if value.len() > 63 {
                self.fail(
                    &format!("{field}.matchLabels.{key}"),
                    format!("{value:?} is longer than a label value may be (63)"),
                );
            }
        }
    }

    fn rule(&mut self, field: &str, rule: &Rule) {
        for (i, from) in rule.from.iter().enumerate() {
            let at = format!("{field}.from[{i}].source");
            let s = &from.source;
            self.each(&format!("{at}.principals"), &s.principals, principal);
            self.each(&format!("{at}.notPrincipals"), &s.not_principals, principal);
            self.each(&format!("{at}.namespaces"), &s.namespaces, namespace);
            self.each(&format!("{at}.notNamespaces"), &s.not_namespaces, namespace);
            self.each(&format!("{at}.ipBlocks"), &s.ip_blocks, ip_block);
            self.each(&format!("{at}.notIpBlocks"), &s.not_ip_blocks, ip_block);
        }
        for (i, to) in rule.to.iter().enumerate() {
            let at = format!("{field}.to[{i}].operation");
            let o = &to.operation;
            self.each(&format!("{at}.ports"), &o.ports, port);
            self.each(&format!("{at}.notPorts"), &o.not_ports, port);
            self.each(&format!("{at}.methods"), &o.methods, method);
            self.each(&format!("{at}.notMethods"), &o.not_methods, method);
            self.each(&format!("{at}.paths"), &o.paths, path);
            self.each(&format!("{at}.notPaths"), &o.not_paths, path);
            self.each(&format!("{at}.hosts"), &o.hosts, host);
            self.each(&format!("{at}.notHosts"), &o.not_hosts, host);
        }
        for (i, condition) in rule.when.iter().enumerate() {
            let at = format!("{field}.when[{i}]");
            if !known_condition_key(&condition.key) {
                self.fail(
                    &format!("{at}.key"),
                    format!(
                        "{:?} is not a known attribute (one of: {})",
                        condition.key,
                        CONDITION_KEYS.join(", ")
                    ),
                );
            }
            if condition.values.is_empty() && condition.not_values.is_empty() {
                self.fail(&at, "needs values or notValues".to_owned());
            }
            let value_check: fn(&str) -> Result<(), String> = match condition.key.as_str() {
                "source.ip" | "destination.ip" => ip_block,
                "destination.port" => port,
                "source.namespace" => namespace,
                "source.principal" => principal,
                _ => not_empty,
            };
            self.each(&format!("{at}.values"), &condition.values, value_check);
            self.each(
                &format!("{at}.notValues"),
                &condition.not_values,
                value_check,
            );
        }
    }
}

fn known_condition_key(key: &str) -> bool {
    if let Some(name) = key
        .strip_prefix("request.headers[")
        .and_then(|rest| rest.strip_suffix(']'))
    {
        return !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b']');
    }
    CONDITION_KEYS.contains(&key)
}

fn not_empty(value: &str) -> Result<(), String> {
    if value.is_empty() {
        Err("an empty value".to_owned())
    } else {
        Ok(())
    }
}

/// A `*` only as the whole value, its first or its last character (Istio's matching).
fn wildcard(value: &str) -> Result<&str, String> {
    not_empty(value)?;
    let bare = value
        .strip_prefix('*')
        .or_else(|| value.strip_suffix('*'))
        .unwrap_or(value);
    if bare.contains('*') {
        return Err(format!(
            "{value:?}: `*` may only be the whole value, its start or its end"
        ));
    }
    Ok(bare)
}

fn principal(value: &str) -> Result<(), String> {
    let bare = wildcard(value)?;
    if value.starts_with("spiffe://") {
        return Err(format!(
            "{value:?}: write principals without `spiffe://` (`cluster.local/ns/<namespace>/sa/<account>`)"
        ));
    }
    if bare.chars().any(char::is_whitespace) {
        return Err(format!("{value:?} contains white space"));
    }
    Ok(())
}

fn namespace(value: &str) -> Result<(), String> {
    let bare = wildcard(value)?;
    let ok = bare.len() <= 63
        && bare
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("{value:?} is not a namespace name"))
    }
}

fn ip_block(value: &str) -> Result<(), String> {
    let (addr, prefix) = match value.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (value, None),
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return Err(format!("{value:?} is not an address or a CIDR range"));
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix.map(str::parse::<u8>) {
        None => Ok(()),
        Some(Ok(bits)) if bits <= max => Ok(()),
        Some(_) => Err(format!(
            "{value:?}: the prefix length must be a number from 0 to {max}"
        )),
    }
}

fn port(value: &str) -> Result<(), String> {
    match value.parse::<u16>() {
        Ok(port) if port > 0 => Ok(()),
        _ => Err(format!("{value:?} is not a port (1-65535)")),
    }
}

fn method(value: &str) -> Result<(), String> {
    if value == "*" {
        return Ok(());
    }
    let token = !value.is_empty() && value.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
    if token {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not an HTTP method (upper case, like GET)"
        ))
    }
}

fn path(value: &str) -> Result<(), String> {
    let bare = wildcard(value)?;
    if value == "*" || bare.starts_with('/') || value.starts_with('*') {
        Ok(())
    } else {
        Err(format!("{value:?}: a path starts with `/` (or `*`)"))
    }
}

fn host(value: &str) -> Result<(), String> {
    let bare = wildcard(value)?;
    if bare.chars().any(char::is_whitespace) {
        Err(format!("{value:?} contains white space"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> MeshPolicy {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn a_valid_policy_has_no_problems() {
        let p = policy(
            r#"
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: web-readers, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: Allow
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/shopper", "*/sa/admin"], namespaces: [shop], ipBlocks: [10.0.0.0/8, "fd00::1"]}}]
    to: [{operation: {ports: ["8080"], methods: [GET, "*"], paths: [/api/*, "*"], hosts: ["*.shop.svc"]}}]
    when: [{key: "request.headers[x-team]", values: [blue]}, {key: source.ip, notValues: [10.9.0.0/16]}]
  - {}
"#,
        );
        assert_eq!(validate_policy(&p), vec![]);
        assert_eq!(p.spec.action, crate::PolicyAction::Allow);
    }

    #[test]
    fn each_problem_names_the_object_the_field_and_the_reason() {
        let p = policy(
            r#"
apiVersion: weft.dev/v1alpha1
kind: MeshPolicy
metadata: {name: broken, namespace: shop}
spec:
  action: Deny
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/a/sa/b", "a*b"], ipBlocks: [10.0.0/8, 10.0.0.0/33]}}]
    to: [{operation: {ports: ["0", http], methods: [get], paths: [api]}}]
    when: [{key: source.color, values: [red]}, {key: destination.port}]
"#,
        );
        let problems: Vec<String> = validate_policy(&p)
            .iter()
            .map(ToString::to_string)
            .collect();
        let expect = [
            "MeshPolicy shop/broken: spec.rules[0].from[0].source.principals[0]: \"spiffe://cluster.local/ns/a/sa/b\": write principals without `spiffe://`",
            "MeshPolicy shop/broken: spec.rules[0].from[0].source.principals[1]: \"a*b\": `*` may only be",
            "MeshPolicy shop/broken: spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0/8\" is not an address or a CIDR range",
            "MeshPolicy shop/broken: spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0.0/33\": the prefix length must be a number from 0 to 32",
            "MeshPolicy shop/broken: spec.rules[0].to[0].operation.ports[0]: \"0\" is not a port",
            "MeshPolicy shop/broken: spec.rules[0].to[0].operation.ports[1]: \"http\" is not a port",
            "MeshPolicy shop/broken: spec.rules[0].to[0].operation.methods[0]: \"get\" is not an HTTP method",
            "MeshPolicy shop/broken: spec.rules[0].to[0].operation.paths[0]: \"api\": a path starts with `/`",
            "MeshPolicy shop/broken: spec.rules[0].when[0].key: \"source.color\" is not a known attribute",
            "MeshPolicy shop/broken: spec.rules[0].when[1]: needs values or notValues",
        ];
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
        for (got, want) in problems.iter().zip(expect) {
            assert!(got.starts_with(want), "{got}\n  should start with\n{want}");
        }
    }

    #[test]
    fn authentication_needs_a_known_mode() {
        let ok: MeshAuthentication = serde_saphyr::from_str(
            "apiVersion: weft.dev/v1alpha1\nkind: MeshAuthentication\nmetadata: {name: strict, namespace: shop}\nspec: {mode: Strict}\n",
        )
        .unwrap();
        assert_eq!(validate_authentication(&ok), vec![]);
        assert_eq!(ok.spec.mode, crate::MtlsMode::Strict);
        let bad = serde_saphyr::from_str::<MeshAuthentication>(
            "apiVersion: weft.dev/v1alpha1\nkind: MeshAuthentication\nmetadata: {name: x}\nspec: {mode: STRICT}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains("unknown variant `STRICT`"), "{bad}");
    }

    #[test]
    fn the_accepted_condition_names_each_problem_field() {
        let ok = crate::StatusCondition::accepted(&[], Some(3));
        assert_eq!(
            (
                ok.kind.as_str(),
                ok.status.as_str(),
                ok.reason.as_str(),
                ok.observed_generation
            ),
            ("Accepted", "True", "Valid", Some(3))
        );
        let p = policy(
            "apiVersion: weft.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: b, namespace: s}\nspec: {rules: [{to: [{operation: {ports: [\"0\"], methods: [get]}}]}]}\n",
        );
        let refused = crate::StatusCondition::accepted(&validate_policy(&p), None);
        assert_eq!(
            (refused.status.as_str(), refused.reason.as_str()),
            ("False", "Invalid")
        );
        assert!(
            refused
                .message
                .starts_with("spec.rules[0].to[0].operation.ports[0]: \"0\" is not a port")
                && refused
                    .message
                    .contains("; spec.rules[0].to[0].operation.methods[0]:"),
            "{}",
            refused.message
        );
    }
}
