//! Every field and its `not` form, wildcards, empty lists, peers without identity and HTTP
//! fields on traffic that is not parsed, each against the compiled authorizer and the
//! reference evaluator alike.

use super::*;

/// A policy of `action` with `rules` (YAML flow text of the rules list).
fn policy(name: &str, action: &str, rules: &str) -> MeshPolicy {
    serde_saphyr::from_str(&format!(
        "apiVersion: weft.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{action: {action}, rules: {rules}}}\n"
    ))
    .unwrap()
}

fn headers(name: &str) -> Option<&'static str> {
    match name {
        "x-team" => Some("blue-team"),
        _ => None,
    }
}

const GET_PUBLIC: HttpAttributes<'static> = HttpAttributes {
    method: "GET",
    path: "/public/index.html",
    host: "Shop.Example:8080",
    header: &headers,
};

/// A request from `shop/sa/web` at 10.1.2.3 to 10.9.0.1:8080, with `http` if parsed.
fn request(peer: bool, http: Option<&'static HttpAttributes<'static>>) -> Attributes<'static> {
    Attributes {
        peer: peer.then_some(PeerIdentity {
            principal: "cluster.local/ns/shop/sa/web",
            namespace: "shop",
        }),
        source_ip: "10.1.2.3".parse().unwrap(),
        destination_ip: "10.9.0.1".parse().unwrap(),
        destination_port: 8080,
        http: http.map_or(Http::Unparsed, Http::Request),
    }
}

/// Whether one Allow policy of `rules` allows `attributes`, checked against the reference.
fn allows(rules: &str, attributes: &Attributes<'_>) -> bool {
    let policies = [policy("p", "Allow", rules)];
    let authorizer = Authorizer::compile(&policies);
    let decision = authorizer.decide(attributes);
    let reference = reference::decide(&policies, attributes);
    assert_eq!(
        (decision.verdict, decision.policy.map(str::to_owned)),
        (reference.0, reference.1),
        "compiled and reference differ on {rules} for {attributes:?}"
    );
    decision.verdict == Verdict::Allow
}

#[test]
fn each_source_field_and_its_not_form() {
    let peer = request(true, None);
    let plain = request(false, None);
    let cases = [
        (
            "[{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]",
            true,
            false,
        ),
        (
            "[{from: [{source: {principals: [cluster.local/ns/shop/*]}}]}]",
            true,
            false,
        ),
        (
            "[{from: [{source: {principals: [\"*/sa/web\"]}}]}]",
            true,
            false,
        ),
        ("[{from: [{source: {principals: [\"*\"]}}]}]", true, false),
        (
            "[{from: [{source: {principals: [cluster.local/ns/other/sa/web]}}]}]",
            false,
            false,
        ),
        (
            "[{from: [{source: {notPrincipals: [cluster.local/ns/shop/sa/web]}}]}]",
            false,
            true,
        ),
        (
            "[{from: [{source: {notPrincipals: [\"*/sa/other\"]}}]}]",
            true,
            true,
        ),
        ("[{from: [{source: {namespaces: [shop]}}]}]", true, false),
        ("[{from: [{source: {namespaces: [sh*]}}]}]", true, false),
        ("[{from: [{source: {namespaces: [other]}}]}]", false, false),
        ("[{from: [{source: {notNamespaces: [shop]}}]}]", false, true),
        (
            "[{from: [{source: {ipBlocks: [10.1.0.0/16]}}]}]",
            true,
            true,
        ),
        ("[{from: [{source: {ipBlocks: [10.1.2.3]}}]}]", true, true),
        (
            "[{from: [{source: {ipBlocks: [10.2.0.0/16]}}]}]",
            false,
            false,
        ),
        (
            "[{from: [{source: {notIpBlocks: [10.0.0.0/8]}}]}]",
            false,
            false,
        ),
        (
            "[{from: [{source: {notIpBlocks: [192.168.0.0/16]}}]}]",
            true,
            true,
        ),
        // Fields of one source all match; sources of one rule any.
        (
            "[{from: [{source: {namespaces: [shop], ipBlocks: [10.2.0.0/16]}}]}]",
            false,
            false,
        ),
        (
            "[{from: [{source: {namespaces: [other]}}, {source: {ipBlocks: [10.1.0.0/16]}}]}]",
            true,
            true,
        ),
    ];
    for (rules, with_peer, plaintext) in cases {
        assert_eq!(allows(rules, &peer), with_peer, "{rules} for a mesh peer");
        assert_eq!(
            allows(rules, &plain),
            plaintext,
            "{rules} for a plaintext client"
        );
    }
}

#[test]
fn each_operation_field_and_its_not_form() {
    let get = request(true, Some(&GET_PUBLIC));
    let cases = [
        ("[{to: [{operation: {ports: [\"8080\"]}}]}]", true),
        ("[{to: [{operation: {ports: [\"80\", \"443\"]}}]}]", false),
        ("[{to: [{operation: {notPorts: [\"8080\"]}}]}]", false),
        ("[{to: [{operation: {methods: [GET, HEAD]}}]}]", true),
        ("[{to: [{operation: {methods: [POST]}}]}]", false),
        ("[{to: [{operation: {notMethods: [POST]}}]}]", true),
        ("[{to: [{operation: {paths: [/public/*]}}]}]", true),
        ("[{to: [{operation: {paths: [\"*.html\"]}}]}]", true),
        ("[{to: [{operation: {paths: [/public]}}]}]", false),
        ("[{to: [{operation: {notPaths: [/admin/*]}}]}]", true),
        ("[{to: [{operation: {hosts: [shop.example]}}]}]", true),
        ("[{to: [{operation: {hosts: [\"*.EXAMPLE\"]}}]}]", true),
        ("[{to: [{operation: {hosts: [other.example]}}]}]", false),
        (
            "[{to: [{operation: {notHosts: [shop.example:8080]}}]}]",
            false,
        ),
        (
            "[{to: [{operation: {ports: [\"8080\"], methods: [POST]}}, {operation: {paths: [/public/*]}}]}]",
            true,
        ),
    ];
    for (rules, expect) in cases {
        assert_eq!(allows(rules, &get), expect, "{rules}");
    }
}

#[test]
fn each_condition_key_and_not_values() {
    let get = request(true, Some(&GET_PUBLIC));
    let cases = [
        ("[{when: [{key: source.ip, values: [10.1.0.0/16]}]}]", true),
        (
            "[{when: [{key: source.ip, notValues: [10.1.0.0/16]}]}]",
            false,
        ),
        (
            "[{when: [{key: destination.ip, values: [10.9.0.1]}]}]",
            true,
        ),
        (
            "[{when: [{key: destination.port, values: [\"8080\"]}]}]",
            true,
        ),
        (
            "[{when: [{key: destination.port, notValues: [\"8080\"]}]}]",
            false,
        ),
        ("[{when: [{key: source.namespace, values: [shop]}]}]", true),
        (
            "[{when: [{key: source.principal, values: [\"*/sa/web\"]}]}]",
            true,
        ),
        (
            "[{when: [{key: \"request.headers[X-Team]\", values: [blue*]}]}]",
            true,
        ),
        (
            "[{when: [{key: \"request.headers[x-team]\", values: [red]}]}]",
            false,
        ),
        (
            "[{when: [{key: \"request.headers[x-missing]\", values: [\"*\"]}]}]",
            false,
        ),
        (
            "[{when: [{key: \"request.headers[x-missing]\", notValues: [a]}]}]",
            true,
        ),
        // All conditions of a rule must match.
        (
            "[{when: [{key: source.namespace, values: [shop]}, {key: destination.port, values: [\"1\"]}]}]",
            false,
        ),
    ];
    for (rules, expect) in cases {
        assert_eq!(allows(rules, &get), expect, "{rules}");
    }
}

#[test]
fn empty_lists_and_rules() {
    let peer = request(true, None);
    assert!(
        allows("[{}]", &peer),
        "a rule with no fields matches everything"
    );
    assert!(allows("[{from: [], to: [], when: []}]", &peer));
    assert!(
        !allows("[]", &peer),
        "an Allow policy with no rules allows nothing"
    );
    let deny_nothing = [policy("d", "Deny", "[]")];
    assert_eq!(
        Authorizer::compile(&deny_nothing).decide(&peer).verdict,
        Verdict::Allow,
        "a Deny policy with no rules denies nothing"
    );
}

#[test]
fn deny_first_then_allow_policies_audit_decides_nothing() {
    let peer = request(true, None);
    let policies = [
        policy("audit", "Audit", "[{}]"),
        policy(
            "only-other",
            "Allow",
            "[{from: [{source: {namespaces: [other]}}]}]",
        ),
        policy(
            "shop",
            "Allow",
            "[{from: [{source: {namespaces: [shop]}}]}]",
        ),
    ];
    let authorizer = Authorizer::compile(&policies);
    let decision = authorizer.decide(&peer);
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.policy, Some("shop/shop"));
    assert_eq!(decision.audited, Some("shop/audit"));
    let with_deny = [
        policies[2].clone(),
        policy(
            "no-8080",
            "Deny",
            "[{to: [{operation: {ports: [\"8080\"]}}]}]",
        ),
    ];
    let denying = Authorizer::compile(&with_deny);
    let decision = denying.decide(&peer);
    assert_eq!(
        (decision.verdict, decision.policy),
        (Verdict::Deny, Some("shop/no-8080"))
    );
    let plain = request(false, None);
    let decision = authorizer.decide(&plain);
    assert_eq!(
        (decision.verdict, decision.policy),
        (Verdict::Deny, None),
        "Allow policies exist and none matches"
    );
    assert_eq!(
        Authorizer::default().decide(&plain).verdict,
        Verdict::Allow,
        "no policy: allowed"
    );
}

#[test]
fn http_fields_on_traffic_not_parsed_are_never_weaker_than_written() {
    let tcp = request(true, None);
    let deny_admin = [policy(
        "no-admin",
        "Deny",
        "[{to: [{operation: {paths: [/admin/*]}}]}]",
    )];
    assert_eq!(
        Authorizer::compile(&deny_admin).decide(&tcp).verdict,
        Verdict::Deny,
        "a Deny of HTTP fields denies the whole connection it cannot parse"
    );
    let header_deny = [policy(
        "no-red",
        "Deny",
        "[{when: [{key: \"request.headers[x-team]\", values: [red]}]}]",
    )];
    assert_eq!(
        Authorizer::compile(&header_deny).decide(&tcp).verdict,
        Verdict::Deny
    );
    assert!(
        !allows("[{to: [{operation: {methods: [GET]}}]}]", &tcp),
        "an Allow of HTTP fields does not match a connection it cannot parse"
    );
    assert!(
        allows(
            "[{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [shop]}}]}]",
            &tcp
        ),
        "its L4 rules still do"
    );
    let get = request(true, Some(&GET_PUBLIC));
    assert_eq!(
        Authorizer::compile(&deny_admin).decide(&get).verdict,
        Verdict::Allow,
        "parsed, the same Deny compares the path"
    );
}

#[test]
fn a_connection_whose_requests_are_parsed_is_refused_only_when_every_request_would_be() {
    let connection = Attributes {
        http: Http::Connection,
        ..request(true, None)
    };
    let deny_admin = [policy(
        "no-admin",
        "Deny",
        "[{to: [{operation: {paths: [/admin/*]}}]}]",
    )];
    assert_eq!(
        Authorizer::compile(&deny_admin).decide(&connection).verdict,
        Verdict::Allow,
        "a Deny of paths waits for the requests"
    );
    let deny_shop = [policy(
        "no-shop",
        "Deny",
        "[{from: [{source: {namespaces: [shop]}}], to: [{operation: {ports: [\"8080\"]}}, {operation: {methods: [POST]}}]}]",
    )];
    assert_eq!(
        Authorizer::compile(&deny_shop).decide(&connection).policy,
        Some("shop/no-shop"),
        "a Deny whose L4 part alone matches refuses the connection"
    );
    assert!(
        allows("[{to: [{operation: {methods: [GET]}}]}]", &connection),
        "an Allow of HTTP fields may allow a request: the connection is let in"
    );
    assert!(
        !allows(
            "[{from: [{source: {namespaces: [other]}}], to: [{operation: {methods: [GET]}}]}]",
            &connection
        ),
        "an Allow whose L4 part cannot match refuses it"
    );
}

#[test]
fn the_ports_whose_traffic_http_rules_need_parsed() {
    let on = |rules: &str, port: u16| {
        Authorizer::compile(&[policy("p", "Allow", rules)]).uses_http_on(port)
    };
    assert!(
        on("[{to: [{operation: {methods: [GET]}}]}]", 5432),
        "no port named: every port"
    );
    assert!(on(
        "[{to: [{operation: {ports: [\"80\"], paths: [/a]}}]}]",
        80
    ));
    assert!(!on(
        "[{to: [{operation: {ports: [\"80\"], paths: [/a]}}]}]",
        81
    ));
    assert!(
        !on(
            "[{to: [{operation: {ports: [\"80\"]}}, {operation: {ports: [\"81\"], hosts: [a]}}]}]",
            80
        ),
        "the HTTP operation is another port's"
    );
    assert!(on(
        "[{to: [{operation: {ports: [\"80\"]}}], when: [{key: \"request.headers[x-team]\", values: [a]}]}]",
        80
    ));
    assert!(!on(
        "[{when: [{key: destination.port, values: [\"80\"]}, {key: \"request.headers[x-team]\", values: [a]}]}]",
        81
    ));
    assert!(
        !on("[{to: [{operation: {ports: [\"80\"]}}]}]", 80),
        "no HTTP field"
    );
    let policies = [
        policy("a", "Deny", "[{}, {to: [{operation: {notPaths: [/x]}}]}]"),
        policy("b", "Audit", "[{to: [{operation: {methods: [GET]}}]}]"),
    ];
    let authorizer = Authorizer::compile(&policies);
    let rules: Vec<_> = authorizer.rules_using_http_on(1).collect();
    assert_eq!(rules, [("shop/a", 1), ("shop/b", 0)]);
}
