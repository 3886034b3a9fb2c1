//! `weft-bench policy`: what a policy decision costs in the tunnel when the mesh holds 10,000
//! MeshPolicies (selectors over 1,000 workloads in 100 namespaces, wildcard principals, address
//! ranges; each workload's own policies ten), against a mesh that holds only the workload's own
//! ten (the baseline: a decision must not grow with unrelated policies). Both go through the
//! agent's resolution (`attach_policies`) and the tunnel's compilation, as in a real pass; the
//! rounds interleave the two meshes. (The request/response figures with an L7 policy come with
//! the tunnel's HTTP parsing.)

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use anyhow::{Context, Result};
use mesh_node::cluster::ClusterObjects;
use mesh_node::manifests::parse_documents;
use mesh_node::policies::{attach_policies, check_policies};
use mesh_node::tunnel_state::tunnel_state;
use policy::authorize::{Attributes, Authorizer, Http, PeerIdentity, Verdict};

use super::{median, quantile, round2};

/// What to measure.
#[derive(Clone, Debug, clap::Args)]
pub struct PolicyBench {
    /// MeshPolicies in the mesh.
    #[arg(long, default_value_t = 10_000)]
    pub policies: usize,
    /// Decisions timed per round and mesh.
    #[arg(long, default_value_t = 200_000)]
    pub decisions: usize,
    /// Rounds; each times both meshes, in turn, then both request/response lanes.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// HTTP requests timed per round and lane.
    #[arg(long, default_value_t = 2_000)]
    pub requests: usize,
}

const NAMESPACES: usize = 100;
const PER_NAMESPACE: usize = 10;
/// The workload whose decisions are timed: `w3` of `ns7`. Policy `p` lives in namespace
/// `p % 100` and selects app `(p / 100) % 10`, so the target's are `p = 307 + 1000 k`.
const TARGET_NAMESPACE: usize = 7;
const TARGET_APP: usize = 3;
const TARGET_FIRST_POLICY: usize = TARGET_NAMESPACE + NAMESPACES * TARGET_APP;

/// The cluster's YAML: namespaces, pods (the first namespaces' on node1, the rest on node2)
/// and `policies` MeshPolicies; with `only_own`, only those that select the target.
fn cluster_yaml(policies: usize, only_own: bool) -> String {
    let mut out = String::new();
    for n in 0..NAMESPACES {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{weft.dev/mesh: enabled}}}}\n---\n"
        ));
        for w in 0..PER_NAMESPACE {
            let node = if n < 11 { 1 } else { 2 };
            out.push_str(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: w{w}, namespace: ns{n}, labels: {{app: w{w}}}}}\nspec: {{nodeName: node{node}, serviceAccountName: sa{w}, containers: [{{name: c, image: c}}]}}\nstatus: {{podIP: 10.{n}.{w}.2}}\n---\n"
            ));
        }
    }
    for p in 0..policies {
        let namespace = p % NAMESPACES;
        let app = (p / NAMESPACES) % PER_NAMESPACE;
        if only_own && (namespace, app) != (TARGET_NAMESPACE, TARGET_APP) {
            continue;
        }
        let action = if (p / 1000) % 5 == 0 { "Deny" } else { "Allow" };
        out.push_str(&format!(
            "apiVersion: weft.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: p{p}, namespace: ns{namespace}}}\nspec:\n  selector: {{matchLabels: {{app: w{app}}}}}\n  action: {action}\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/ns{}/sa/client-*\", \"*/sa/admin{}\"], ipBlocks: [\"10.{}.0.0/16\"]}}}}]\n    to: [{{operation: {{ports: [\"{}\"]}}}}]\n    when: [{{key: source.namespace, values: [\"ns{}*\"]}}]\n---\n",
            p % 50,
            p % 7,
            p % 200,
            8000 + p % 100,
            p % 37,
        ));
    }
    out
}

/// The target workload's compiled policies, as the agent resolves and the tunnel compiles them;
/// with the time the agent's resolution took.
fn authorizer_for(yaml: &str) -> Result<(Authorizer, usize, f64)> {
    let mut objects = ClusterObjects::default();
    for object in parse_documents(std::path::Path::new("bench.yaml"), yaml)? {
        objects.insert(object);
    }
    let started = Instant::now();
    let report = check_policies(&objects);
    let mut state = tunnel_state(&objects);
    attach_policies(&mut state, &report, &objects, "node1", "weft-system");
    let resolve_ms = started.elapsed().as_secs_f64() * 1e3;
    let target = state
        .workloads
        .iter()
        .find(|w| {
            w.namespace == format!("ns{TARGET_NAMESPACE}") && w.name == format!("w{TARGET_APP}")
        })
        .context("the target workload")?;
    let own: Vec<_> = state
        .policies
        .iter()
        .filter(|p| target.policies.contains(&p.name))
        .collect();
    Ok((
        Authorizer::compile_named(own.iter().copied()),
        target.policies.len(),
        resolve_ms,
    ))
}

/// Principals and addresses the timed requests come from: half match one of the target's
/// policies (`p = 307 + 1000 k`: Deny for k = 0 and 5, Allow otherwise), half match none.
fn callers() -> Vec<(String, String, IpAddr, u16)> {
    (0..64usize)
        .map(|i| {
            if i % 2 == 0 {
                let p = TARGET_FIRST_POLICY + NAMESPACES * PER_NAMESPACE * ((i / 2) % 10);
                let namespace = format!("ns{}", p % 37);
                let principal = format!("cluster.local/ns/{namespace}/sa/admin{}", p % 7);
                let ip = IpAddr::V4(Ipv4Addr::new(10, (p % 200) as u8, 1, 2));
                (principal, namespace, ip, 8000 + (p % 100) as u16)
            } else {
                let namespace = format!("ns{}", i % 40);
                let principal = format!("cluster.local/ns/{namespace}/sa/client-{i}");
                let ip = IpAddr::V4(Ipv4Addr::new(192, 168, i as u8, 2));
                (principal, namespace, ip, 9000 + i as u16)
            }
        })
        .collect()
}

/// Times `decisions` decisions (each alone): nanoseconds each, and how many allowed.
fn time_decisions(authorizer: &Authorizer, decisions: usize) -> (Vec<f64>, usize) {
    let callers = callers();
    let destination = IpAddr::V4(Ipv4Addr::new(10, 7, 3, 2));
    let mut times = Vec::with_capacity(decisions);
    let mut allowed = 0;
    for i in 0..decisions {
        let (principal, namespace, ip, port) = &callers[i % callers.len()];
        let attributes = Attributes {
            peer: Some(PeerIdentity {
                principal,
                namespace,
            }),
            source_ip: *ip,
            destination_ip: destination,
            destination_port: *port,
            http: Http::Unparsed,
        };
        let started = Instant::now();
        let decision = std::hint::black_box(authorizer.decide(std::hint::black_box(&attributes)));
        times.push(started.elapsed().as_nanos() as f64);
        allowed += usize::from(decision.verdict == Verdict::Allow);
    }
    (times, allowed)
}

/// Runs the benchmark; prints a table and returns the JSON line.
pub fn run(args: &PolicyBench) -> Result<String> {
    let (full, own_full, resolve_full_ms) = authorizer_for(&cluster_yaml(args.policies, false))?;
    let (baseline, own_base, resolve_base_ms) = authorizer_for(&cluster_yaml(args.policies, true))?;
    anyhow::ensure!(
        own_full == own_base && own_full > 0,
        "the target's own policies differ: {own_full} in the full mesh, {own_base} alone"
    );
    println!(
        "the timed workload has {own_full} policies of its own; the agent's resolution for its node (110 pods): {resolve_full_ms:.1} ms with {} policies in the mesh, {resolve_base_ms:.2} ms with {own_base}",
        args.policies
    );
    let (mut full_p50, mut full_p99, mut base_p50, mut base_p99) = (vec![], vec![], vec![], vec![]);
    for round in 0..args.rounds {
        let (times, allowed_full) = time_decisions(&full, args.decisions);
        full_p50.push(quantile(&times, 0.5));
        full_p99.push(quantile(&times, 0.99));
        let (times, allowed_base) = time_decisions(&baseline, args.decisions);
        base_p50.push(quantile(&times, 0.5));
        base_p99.push(quantile(&times, 0.99));
        anyhow::ensure!(
            allowed_full == allowed_base,
            "the two meshes decided differently"
        );
        println!(
            "  round {round}: {} policies p50 {:.0} ns p99 {:.0} ns | {own_base} policies p50 {:.0} ns p99 {:.0} ns | {allowed_full} of {} allowed",
            args.policies,
            full_p50[round],
            full_p99[round],
            base_p50[round],
            base_p99[round],
            args.decisions,
        );
    }
    let (p50, p99) = (median(&full_p50), median(&full_p99));
    let (b50, b99) = (median(&base_p50), median(&base_p99));
    println!(
        "medians: {} policies p50 {p50:.0} ns, p99 {p99:.0} ns; only the workload's own: p50 {b50:.0} ns, p99 {b99:.0} ns; ratio p50 {:.2} (goal: p99 under 1,000 ns)",
        args.policies,
        p50 / b50
    );
    println!(
        "request/response through two tunnels, {} requests per round on one connection:",
        args.requests
    );
    let (l4, l7) = super::policy_rr::round_trips(args.rounds, args.requests)?;
    println!(
        "medians: L4 policy p50 {:.1} us, L7 policy p50 {:.1} us: L7 adds {:.1} us (goal: at most 20 us); the server's tunnel spends {:.1} us of CPU per request with L4, {:.1} with L7",
        l4.rr_p50_us,
        l7.rr_p50_us,
        l7.rr_p50_us - l4.rr_p50_us,
        l4.server_cpu_us,
        l7.server_cpu_us,
    );
    Ok(serde_json::json!({
        "bench": "policy",
        "policies": args.policies,
        "decision_p50_ns": round2(p50),
        "decision_p99_ns": round2(p99),
        "l4_rr_p50_us": round2(l4.rr_p50_us),
        "l7_rr_p50_us": round2(l7.rr_p50_us),
        "l4_server_cpu_us_per_request": round2(l4.server_cpu_us),
        "l7_server_cpu_us_per_request": round2(l7.server_cpu_us),
        "own_policies_only_p50_ns": round2(b50),
        "own_policies_only_p99_ns": round2(b99),
        "agent_resolution_ms": round2(resolve_full_ms),
    })
    .to_string())
}
