//! The compiled authorizer decides as the reference evaluator (written straight from the
//! semantics) does, on generated policies and requests: verdict, deciding policy and audit.

use std::net::IpAddr;

use policy::authorize::{Attributes, Authorizer, Http, HttpAttributes, PeerIdentity, reference};
use policy::{
    Condition, MeshPolicy, MeshPolicySpec, Operation, PolicyAction, Rule, RuleFrom, RuleTo, Source,
};
use proptest::prelude::*;

const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/shop/sa/web",
    "cluster.local/ns/shop/*",
    "*/sa/web",
    "*",
    "cluster.local/ns/other/sa/db",
    "*/sa/db",
];
const NAMESPACES: &[&str] = &["shop", "other", "sh*", "*op", "*"];
const BLOCKS: &[&str] = &[
    "10.1.0.0/16",
    "10.1.2.3",
    "10.0.0.0/8",
    "192.168.0.0/16",
    "0.0.0.0/0",
    "fd00::/8",
    "::/0",
    "10.9.0.1",
];
const PORTS: &[&str] = &["80", "8080", "443"];
const METHODS: &[&str] = &["GET", "POST", "*"];
const PATHS: &[&str] = &["/public/*", "/admin/*", "*.html", "/", "*"];
const HOSTS: &[&str] = &[
    "shop.example",
    "*.example",
    "Other.Example",
    "*",
    "shop.example:8080",
];
const TEAMS: &[&str] = &["blue", "bl*", "*", "red"];

/// Up to `max` values of `vocabulary`.
fn some(vocabulary: &'static [&'static str], max: usize) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(prop::sample::select(vocabulary), 0..=max)
        .prop_map(|v| v.into_iter().map(str::to_owned).collect())
}

fn source() -> impl Strategy<Value = Source> {
    (
        some(PRINCIPALS, 2),
        some(PRINCIPALS, 1),
        some(NAMESPACES, 2),
        some(NAMESPACES, 1),
        some(BLOCKS, 2),
        some(BLOCKS, 1),
    )
        .prop_map(|(p, np, n, nn, b, nb)| Source {
            principals: p,
            not_principals: np,
            namespaces: n,
            not_namespaces: nn,
            ip_blocks: b,
            not_ip_blocks: nb,
        })
}

fn operation() -> impl Strategy<Value = Operation> {
    (
        (some(PORTS, 2), some(PORTS, 1)),
        (some(METHODS, 2), some(METHODS, 1)),
        (some(PATHS, 2), some(PATHS, 1)),
        (some(HOSTS, 2), some(HOSTS, 1)),
    )
        .prop_map(|((p, np), (m, nm), (pa, npa), (h, nh))| Operation {
            ports: p,
            not_ports: np,
            methods: m,
            not_methods: nm,
            paths: pa,
            not_paths: npa,
            hosts: h,
            not_hosts: nh,
        })
}

fn condition() -> impl Strategy<Value = Condition> {
    let keyed = |key: &'static str, vocabulary: &'static [&'static str]| {
        (some(vocabulary, 2), some(vocabulary, 1)).prop_map(move |(values, not_values)| Condition {
            key: key.to_owned(),
            values,
            not_values,
        })
    };
    prop_oneof![
        keyed("source.ip", BLOCKS),
        keyed("destination.ip", BLOCKS),
        keyed("destination.port", PORTS),
        keyed("source.namespace", NAMESPACES),
        keyed("source.principal", PRINCIPALS),
        keyed("request.headers[x-team]", TEAMS),
        keyed("request.headers[X-None]", TEAMS),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(source(), 0..=2),
        prop::collection::vec(operation(), 0..=2),
        prop::collection::vec(condition(), 0..=2),
    )
        .prop_map(|(from, to, when)| Rule {
            from: from.into_iter().map(|source| RuleFrom { source }).collect(),
            to: to
                .into_iter()
                .map(|operation| RuleTo { operation })
                .collect(),
            when,
        })
}

fn policies() -> impl Strategy<Value = Vec<MeshPolicy>> {
    let action = prop_oneof![
        Just(PolicyAction::Allow),
        Just(PolicyAction::Deny),
        Just(PolicyAction::Audit)
    ];
    prop::collection::vec((action, prop::collection::vec(rule(), 0..=3)), 0..=5).prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (action, rules))| {
                let mut p = MeshPolicy::new(
                    &format!("p{i}"),
                    MeshPolicySpec {
                        selector: None,
                        action,
                        rules,
                    },
                );
                p.metadata.namespace = Some("shop".to_owned());
                p
            })
            .collect()
    })
}

/// A request's attributes, owned, for the strategy to generate.
#[derive(Clone, Debug)]
struct Case {
    peer: Option<(&'static str, &'static str)>,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    port: u16,
    http: Option<(
        &'static str,
        &'static str,
        &'static str,
        Option<&'static str>,
    )>,
    /// Without a request: a connection whose requests are parsed (else traffic not parsed).
    connection: bool,
}

fn case() -> impl Strategy<Value = Case> {
    let peer = prop::option::of(prop::sample::select(
        &[
            ("cluster.local/ns/shop/sa/web", "shop"),
            ("cluster.local/ns/other/sa/db", "other"),
        ][..],
    ));
    let ip = |v: &'static [&'static str]| {
        prop::sample::select(v).prop_map(|s| s.parse::<IpAddr>().unwrap())
    };
    let http = prop::option::of((
        prop::sample::select(&["GET", "POST", "DELETE"][..]),
        prop::sample::select(&["/public/a.html", "/admin/x", "/"][..]),
        prop::sample::select(
            &[
                "shop.example",
                "SHOP.example:8080",
                "api.example",
                "[fd00::1]:80",
            ][..],
        ),
        prop::option::of(prop::sample::select(&["blue", "red", "bluebird"][..])),
    ));
    (
        peer,
        ip(&[
            "10.1.2.3",
            "10.5.0.1",
            "192.168.3.4",
            "fd00::5",
            "::ffff:10.1.2.3",
        ]),
        ip(&["10.9.0.1", "fd00::9"]),
        prop::sample::select(&[80u16, 8080, 443][..]),
        http,
        any::<bool>(),
    )
        .prop_map(
            |(peer, source_ip, destination_ip, port, http, connection)| Case {
                peer,
                source_ip,
                destination_ip,
                port,
                http,
                connection,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn compiled_decisions_are_the_references(policies in policies(), case in case()) {
        let team = case.http.and_then(|h| h.3);
        let header = move |name: &str| if name == "x-team" { team } else { None };
        let http = case.http.map(|(method, path, host, _)| HttpAttributes {
            method,
            path,
            host,
            header: &header,
        });
        let attributes = Attributes {
            peer: case.peer.map(|(principal, namespace)| PeerIdentity { principal, namespace }),
            source_ip: case.source_ip,
            destination_ip: case.destination_ip,
            destination_port: case.port,
            http: match (&http, case.connection) {
                (Some(request), _) => Http::Request(request),
                (None, true) => Http::Connection,
                (None, false) => Http::Unparsed,
            },
        };
        let authorizer = Authorizer::compile(&policies);
        let decision = authorizer.decide(&attributes);
        let (verdict, policy, audited) = reference::decide(&policies, &attributes);
        prop_assert_eq!(decision.verdict, verdict);
        prop_assert_eq!(decision.policy.map(str::to_owned), policy);
        prop_assert_eq!(decision.audited.map(str::to_owned), audited);
    }
}
