//! Decisions: the policies that apply to one workload, compiled once into matchers (hashed
//! sets for exact strings, address ranges by prefix length, sorted ports), then asked about each
//! connection or request without allocating.
//!
//! The semantics are Istio's AuthorizationPolicy's: a matching `Deny` denies; with no `Allow`
//! policy, allow; else a matching `Allow` allows and anything else is denied; `Audit` decides
//! nothing and is reported. A policy matches when one of its rules does (no rules: never); a
//! rule when one of its `from`, one of its `to` and all of its `when` match (an empty list
//! matches); a field when the value matches one of its list, a `not` field when it matches none.
//! A peer without a verified identity has no principal and no namespace: `principals` and
//! `namespaces` never match it, `notPrincipals` and `notNamespaces` always do.
//!
//! HTTP fields (`methods`, `paths`, `hosts`, `request.headers[...]`) on traffic that is not
//! parsed as HTTP are never weaker than written: a `Deny` rule counts them as matching (it
//! denies the whole connection), an `Allow` or `Audit` rule does not match. On a port whose
//! requests are parsed, the connection is decided first on what no request can change
//! ([`Http::Connection`]), then each request.

mod matchers;
pub mod reference;

use std::net::IpAddr;
use std::sync::Arc;

use matchers::{Cidrs, Ports, Strings, ascii_lowercase};

use crate::{
    Condition, MeshPolicy, MeshPolicySpec, NamedPolicy, Operation, PolicyAction, Rule, Source,
    name_of,
};

/// What a decision looks at.
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a> {
    /// The verified peer, if any (a plaintext client has none).
    pub peer: Option<PeerIdentity<'a>>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// The request, or how HTTP fields count when there is none.
    pub http: Http<'a>,
}

/// What a decision knows of HTTP.
#[derive(Clone, Copy, Debug)]
pub enum Http<'a> {
    /// Traffic the tunnel does not parse: HTTP fields are never weaker than written (a `Deny`
    /// rule counts them as matching and denies the whole connection; an `Allow` or `Audit`
    /// rule does not match).
    Unparsed,
    /// A connection whose requests are each decided as they come: decided on what no request
    /// can change (a `Deny` rule's HTTP fields do not match here, an `Allow` rule's may), so it
    /// is refused only when every request on it would be.
    Connection,
    /// One parsed request.
    Request(&'a HttpAttributes<'a>),
}

/// A verified peer: its SPIFFE ID without `spiffe://` (`td/ns/<ns>/sa/<sa>`) and namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerIdentity<'a> {
    pub principal: &'a str,
    pub namespace: &'a str,
}

/// One HTTP request.
#[derive(Clone, Copy)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    /// The authority (`Host`), maybe with a port.
    pub host: &'a str,
    /// The request's headers.
    pub header: &'a dyn Headers,
}

/// A request's headers, looked up by lower-case name (the first value, if there are several;
/// none if it is not text).
pub trait Headers {
    fn get(&self, name: &str) -> Option<&str>;
}

/// A lookup function (tests, benchmarks).
impl<F: Fn(&str) -> Option<&'static str>> Headers for F {
    fn get(&self, name: &str) -> Option<&str> {
        self(name)
    }
}

impl std::fmt::Debug for HttpAttributes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAttributes")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// A decision and the policies behind it (`namespace/name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<'p> {
    pub verdict: Verdict,
    /// The matching Deny or Allow policy that decided; `None` when no policy decided (allowed
    /// with no Allow policy, or denied because no Allow policy matched).
    pub policy: Option<&'p str>,
    /// The first matching Audit policy.
    pub audited: Option<&'p str>,
}

/// The policies in force for one workload, compiled.
#[derive(Clone, Debug, Default)]
pub struct Authorizer {
    deny: Vec<Compiled>,
    allow: Vec<Compiled>,
    audit: Vec<Compiled>,
    /// The Allow policies' names joined by `,`, made once here rather than on each denial.
    allow_names: Arc<str>,
}

#[derive(Clone, Debug)]
struct Compiled {
    /// `namespace/name`.
    name: Arc<str>,
    rules: Vec<CompiledRule>,
}

#[derive(Clone, Debug)]
struct CompiledRule {
    from: Vec<CompiledSource>,
    to: Vec<CompiledOperation>,
    when: Vec<CompiledCondition>,
}

/// A field's list and its `not` form; `None` where the policy left it out.
#[derive(Clone, Debug)]
struct Field<T> {
    any_of: Option<T>,
    none_of: Option<T>,
}

impl<T> Field<T> {
    fn new(values: &[String], not_values: &[String], build: impl Fn(&[String]) -> T) -> Self {
        Field {
            any_of: (!values.is_empty()).then(|| build(values)),
            none_of: (!not_values.is_empty()).then(|| build(not_values)),
        }
    }

    fn is_set(&self) -> bool {
        self.any_of.is_some() || self.none_of.is_some()
    }

    /// `value` is `None` when the attribute is absent: a list then never matches, its `not`
    /// form always does.
    fn matches<V: Copy>(&self, value: Option<V>, test: impl Fn(&T, V) -> bool) -> bool {
        let any = match (&self.any_of, value) {
            (None, _) => true,
            (Some(list), Some(v)) => test(list, v),
            (Some(_), None) => false,
        };
        let none = match (&self.none_of, value) {
            (None, _) | (Some(_), None) => true,
            (Some(list), Some(v)) => !test(list, v),
        };
        any && none
    }
}

#[derive(Clone, Debug)]
struct CompiledSource {
    principals: Field<Strings>,
    namespaces: Field<Strings>,
    ip_blocks: Field<Cidrs>,
}

#[derive(Clone, Debug)]
struct CompiledOperation {
    ports: Field<Ports>,
    methods: Field<Strings>,
    paths: Field<Strings>,
    hosts: Field<Strings>,
}

#[derive(Clone, Debug)]
enum CompiledCondition {
    SourceIp(Field<Cidrs>),
    DestinationIp(Field<Cidrs>),
    DestinationPort(Field<Ports>),
    SourceNamespace(Field<Strings>),
    SourcePrincipal(Field<Strings>),
    /// By lower-case header name.
    Header(Box<str>, Field<Strings>),
    /// A key validation refuses (such a policy is never sent to be enforced): in a Deny
    /// policy it matches, elsewhere it does not, so it can only make the policy stricter.
    Unknown {
        in_deny: bool,
    },
}

/// How an HTTP field takes part in a decision.
#[derive(Clone, Copy)]
enum HttpFields<'a> {
    /// Parsed: compared.
    Request(&'a HttpAttributes<'a>),
    /// No request: counted as matching (unparsed in a Deny rule; a connection's decision in
    /// an Allow rule).
    AssumeMatch,
    /// No request: counted as not matching.
    AssumeMismatch,
}

impl Authorizer {
    /// Compiles `policies` (those that apply to one workload, valid ones, in the order their
    /// decisions should name them: by namespace and name).
    pub fn compile<'a>(policies: impl IntoIterator<Item = &'a MeshPolicy>) -> Self {
        let named: Vec<(String, &MeshPolicySpec)> = policies
            .into_iter()
            .map(|p| (name_of(&p.metadata), &p.spec))
            .collect();
        Self::compile_specs(named.iter().map(|(name, spec)| (name.as_str(), *spec)))
    }

    /// Compiles policies as they travel to the tunnel.
    pub fn compile_named<'a>(policies: impl IntoIterator<Item = &'a NamedPolicy>) -> Self {
        Self::compile_specs(policies.into_iter().map(|p| (p.name.as_str(), &p.spec)))
    }

    fn compile_specs<'a>(
        policies: impl IntoIterator<Item = (&'a str, &'a MeshPolicySpec)>,
    ) -> Self {
        let mut authorizer = Authorizer::default();
        for (name, spec) in policies {
            let in_deny = spec.action == PolicyAction::Deny;
            let compiled = Compiled {
                name: name.into(),
                rules: spec
                    .rules
                    .iter()
                    .map(|rule| compile_rule(rule, in_deny))
                    .collect(),
            };
            match spec.action {
                PolicyAction::Deny => authorizer.deny.push(compiled),
                PolicyAction::Allow => authorizer.allow.push(compiled),
                PolicyAction::Audit => authorizer.audit.push(compiled),
            }
        }
        let names: Vec<&str> = authorizer.allow.iter().map(|p| &*p.name).collect();
        authorizer.allow_names = names.join(",").into();
        authorizer
    }

    /// The Allow policies in force (`namespace/name`, joined by `,`): when none of them
    /// matches, they are what denied.
    pub fn allow_policies(&self) -> &str {
        &self.allow_names
    }

    /// Whether no policy applies (everything is allowed and nothing audited).
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }

    /// Whether a rule that names HTTP fields may apply to connections to `port`: the tunnel
    /// then parses that port's traffic as HTTP to decide each request.
    pub fn uses_http_on(&self, port: u16) -> bool {
        self.rules_using_http_on(port).next().is_some()
    }

    /// The rules that name HTTP fields and may apply to `port`: the policy (`namespace/name`)
    /// and the rule's index in it.
    pub fn rules_using_http_on(&self, port: u16) -> impl Iterator<Item = (&str, usize)> {
        self.deny
            .iter()
            .chain(&self.allow)
            .chain(&self.audit)
            .flat_map(move |policy| {
                policy
                    .rules
                    .iter()
                    .enumerate()
                    .filter(move |(_, rule)| rule.uses_http_on(port))
                    .map(|(i, _)| (&*policy.name, i))
            })
    }

    /// Decides one connection or request.
    pub fn decide(&self, attributes: &Attributes<'_>) -> Decision<'_> {
        let audited = first_match(&self.audit, attributes, Action::AllowOrAudit);
        if let Some(policy) = first_match(&self.deny, attributes, Action::Deny) {
            return Decision {
                verdict: Verdict::Deny,
                policy: Some(policy),
                audited,
            };
        }
        if self.allow.is_empty() {
            return Decision {
                verdict: Verdict::Allow,
                policy: None,
                audited,
            };
        }
        match first_match(&self.allow, attributes, Action::AllowOrAudit) {
            Some(policy) => Decision {
                verdict: Verdict::Allow,
                policy: Some(policy),
                audited,
            },
            None => Decision {
                verdict: Verdict::Deny,
                policy: None,
                audited,
            },
        }
    }
}

/// Which side of a decision a policy is on: it says how HTTP fields count without a request.
#[derive(Clone, Copy)]
enum Action {
    Deny,
    AllowOrAudit,
}

/// The first of `policies` (all with the same `action`) that matches.
fn first_match<'p, 'a>(
    policies: &'p [Compiled],
    attributes: &Attributes<'a>,
    action: Action,
) -> Option<&'p str> {
    let http = match (attributes.http, action) {
        (Http::Request(request), _) => HttpFields::Request(request),
        (Http::Unparsed, Action::Deny) | (Http::Connection, Action::AllowOrAudit) => {
            HttpFields::AssumeMatch
        }
        (Http::Unparsed, Action::AllowOrAudit) | (Http::Connection, Action::Deny) => {
            HttpFields::AssumeMismatch
        }
    };
    policies
        .iter()
        .find(|p| p.matches(attributes, http))
        .map(|p| &*p.name)
}

impl Compiled {
    fn matches(&self, attributes: &Attributes<'_>, http: HttpFields<'_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(attributes, http))
    }
}

impl CompiledRule {
    fn matches(&self, a: &Attributes<'_>, http: HttpFields<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(a)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(a, http)))
            && self.when.iter().all(|c| c.matches(a, http))
    }
}

impl CompiledRule {
    /// Whether one of the rule's HTTP fields may take part in deciding a connection to `port`.
    fn uses_http_on(&self, port: u16) -> bool {
        let on_port = |ports: &Field<Ports>| ports.matches(Some(port), Ports::contains);
        let port_conditions_hold = self.when.iter().all(|c| match c {
            CompiledCondition::DestinationPort(ports) => on_port(ports),
            _ => true,
        });
        let headers = self
            .when
            .iter()
            .any(|c| matches!(c, CompiledCondition::Header(..)));
        let operation_on_port = self.to.is_empty() || self.to.iter().any(|o| on_port(&o.ports));
        let http_operation_on_port = self.to.iter().any(|o| o.uses_http() && on_port(&o.ports));
        port_conditions_hold && ((headers && operation_on_port) || http_operation_on_port)
    }
}

impl CompiledSource {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        self.principals
            .matches(a.peer.map(|p| p.principal), Strings::matches)
            && self
                .namespaces
                .matches(a.peer.map(|p| p.namespace), Strings::matches)
            && self.ip_blocks.matches(Some(a.source_ip), Cidrs::contains)
    }
}

impl CompiledOperation {
    fn uses_http(&self) -> bool {
        self.methods.is_set() || self.paths.is_set() || self.hosts.is_set()
    }

    fn matches(&self, a: &Attributes<'_>, http: HttpFields<'_>) -> bool {
        if !self
            .ports
            .matches(Some(a.destination_port), Ports::contains)
        {
            return false;
        }
        if !self.uses_http() {
            return true;
        }
        match http {
            HttpFields::AssumeMatch => true,
            HttpFields::AssumeMismatch => false,
            HttpFields::Request(request) => {
                let mut buf = [0u8; 256];
                let host = ascii_lowercase(request.host, &mut buf);
                self.methods.matches(Some(request.method), Strings::matches)
                    && self.paths.matches(Some(request.path), Strings::matches)
                    && self.hosts.matches(Some(host), host_matches)
            }
        }
    }
}

/// A host matches with or without its port (`shop.example:8080` matches `shop.example`).
fn host_matches(hosts: &Strings, host: &str) -> bool {
    hosts.matches(host) || strip_port(host).is_some_and(|bare| hosts.matches(bare))
}

fn strip_port(host: &str) -> Option<&str> {
    let (bare, port) = host.rsplit_once(':')?;
    let is_port = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    // `[v6]:port`, or a name or IPv4 address (a bare IPv6 address has several colons).
    (is_port && (bare.ends_with(']') || !bare.contains(':'))).then_some(bare)
}

impl CompiledCondition {
    fn matches(&self, a: &Attributes<'_>, http: HttpFields<'_>) -> bool {
        match self {
            CompiledCondition::SourceIp(f) => f.matches(Some(a.source_ip), Cidrs::contains),
            CompiledCondition::DestinationIp(f) => {
                f.matches(Some(a.destination_ip), Cidrs::contains)
            }
            CompiledCondition::DestinationPort(f) => {
                f.matches(Some(a.destination_port), Ports::contains)
            }
            CompiledCondition::SourceNamespace(f) => {
                f.matches(a.peer.map(|p| p.namespace), Strings::matches)
            }
            CompiledCondition::SourcePrincipal(f) => {
                f.matches(a.peer.map(|p| p.principal), Strings::matches)
            }
            CompiledCondition::Header(name, f) => match http {
                HttpFields::AssumeMatch => true,
                HttpFields::AssumeMismatch => false,
                HttpFields::Request(request) => {
                    f.matches(request.header.get(name), Strings::matches)
                }
            },
            CompiledCondition::Unknown { in_deny } => *in_deny,
        }
    }
}

fn compile_rule(rule: &Rule, in_deny: bool) -> CompiledRule {
    CompiledRule {
        from: rule
            .from
            .iter()
            .map(|f| compile_source(&f.source))
            .collect(),
        to: rule
            .to
            .iter()
            .map(|t| compile_operation(&t.operation))
            .collect(),
        when: rule
            .when
            .iter()
            .map(|c| compile_condition(c, in_deny))
            .collect(),
    }
}

fn strings(values: &[String]) -> Strings {
    Strings::new(values, false)
}

fn compile_source(s: &Source) -> CompiledSource {
    CompiledSource {
        principals: Field::new(&s.principals, &s.not_principals, strings),
        namespaces: Field::new(&s.namespaces, &s.not_namespaces, strings),
        ip_blocks: Field::new(&s.ip_blocks, &s.not_ip_blocks, Cidrs::new),
    }
}

fn compile_operation(o: &Operation) -> CompiledOperation {
    CompiledOperation {
        ports: Field::new(&o.ports, &o.not_ports, Ports::new),
        methods: Field::new(&o.methods, &o.not_methods, strings),
        paths: Field::new(&o.paths, &o.not_paths, strings),
        hosts: Field::new(&o.hosts, &o.not_hosts, |v| Strings::new(v, true)),
    }
}

fn compile_condition(c: &Condition, in_deny: bool) -> CompiledCondition {
    let (values, not_values) = (&c.values[..], &c.not_values[..]);
    match c.key.as_str() {
        "source.ip" => CompiledCondition::SourceIp(Field::new(values, not_values, Cidrs::new)),
        "destination.ip" => {
            CompiledCondition::DestinationIp(Field::new(values, not_values, Cidrs::new))
        }
        "destination.port" => {
            CompiledCondition::DestinationPort(Field::new(values, not_values, Ports::new))
        }
        "source.namespace" => {
            CompiledCondition::SourceNamespace(Field::new(values, not_values, strings))
        }
        "source.principal" => {
            CompiledCondition::SourcePrincipal(Field::new(values, not_values, strings))
        }
        key => match header_name(key) {
            Some(name) => CompiledCondition::Header(
                name.to_ascii_lowercase().into(),
                Field::new(values, not_values, strings),
            ),
            None => CompiledCondition::Unknown { in_deny },
        },
    }
}

/// The name in `request.headers[<name>]`.
pub(crate) fn header_name(key: &str) -> Option<&str> {
    key.strip_prefix("request.headers[")
        .and_then(|rest| rest.strip_suffix(']'))
        .filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests;
