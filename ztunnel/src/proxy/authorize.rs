//! The authorize step of every path into a local pod (HBONE, plaintext inbound, the same-node
//! shortcut): the pod's MeshAuthentication mode, then its MeshPolicies (compiled with the
//! state, `policy::authorize`), decide before anything reaches the application. On a port
//! whose traffic is parsed as HTTP the connection is decided on what no request can change,
//! then each request ([`authorize_request`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use policy::MtlsMode;
use policy::authorize::{Attributes, Http, HttpAttributes, PeerIdentity, Verdict};
use tracing::{debug, info};

use super::ProxyError;
use super::context::{Pod, Tunnel};
use crate::identity::Identity;
use crate::state::{PortHandling, State};
use crate::telemetry::PolicyDecisionLabels;

/// A connection into a pod: who makes it (its verified identity, none in plaintext; its
/// address) and where to. Decided when it opens, and again whenever the state changes.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub identity: Option<Arc<Identity>>,
    pub ip: IpAddr,
    pub target: SocketAddr,
}

/// Allows or refuses a new connection to `pod`, and says how it is carried (copied, or parsed
/// as HTTP); the refusal says which object decided. Every decision a policy takes is counted.
pub fn authorize(
    tunnel: &Tunnel,
    pod: &Pod,
    inbound: &Inbound,
) -> Result<PortHandling, ProxyError> {
    let state = tunnel.state.borrow().clone();
    let handling = state.port_handling(&pod.workload.key(), inbound.target.port());
    let ruling = decide(
        &state,
        tunnel,
        pod,
        inbound,
        connection_view(handling),
        Count::Every,
    );
    match ruling.refused {
        Some(refused) => Err(refused),
        None => Ok(handling),
    }
}

/// What a connection's decision knows of HTTP.
fn connection_view(handling: PortHandling) -> Http<'static> {
    match handling {
        PortHandling::Tcp => Http::Unparsed,
        PortHandling::Http => Http::Connection,
    }
}

/// A decision: refused (why) or not, and the policy that decided, if one did.
pub struct Ruling {
    pub refused: Option<ProxyError>,
    pub policy: Option<String>,
    /// The Audit policy that matched a request, if one did.
    pub audited: Option<String>,
}

/// Decides one HTTP request on an allowed connection, with the state as it is now; counted.
pub fn authorize_request(
    tunnel: &Tunnel,
    pod: &Pod,
    inbound: &Inbound,
    request: &HttpAttributes<'_>,
) -> Ruling {
    let state = tunnel.state.borrow().clone();
    decide(
        &state,
        tunnel,
        pod,
        inbound,
        Http::Request(request),
        Count::Every,
    )
}

/// Which decisions `weft_policy_decisions_total` counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Count {
    /// A new connection: every policy that decided or audited.
    Every,
    /// A live connection decided again: only a refusal (a revocation), not the allows that
    /// merely confirm it on every state change.
    Refusal,
}

fn decide(
    state: &State,
    tunnel: &Tunnel,
    pod: &Pod,
    inbound: &Inbound,
    http: Http<'_>,
    count: Count,
) -> Ruling {
    let key = pod.workload.key();
    // The state's view of the pod (its policies and mode change with it).
    let workload = state.workload(&key);
    if inbound.identity.is_none() && workload.is_some_and(|w| w.mtls == MtlsMode::Strict) {
        return Ruling {
            refused: Some(ProxyError::Denied {
                reason: format!("the MeshAuthentication of {key} is Strict: plaintext is refused"),
                policy: None,
            }),
            policy: None,
            audited: None,
        };
    }
    let Some(authorizer) = state.authorizer(&key) else {
        return Ruling {
            refused: None,
            policy: None,
            audited: None,
        };
    };
    let principal = inbound.identity.as_deref().map(Identity::principal);
    let attributes = Attributes {
        peer: inbound
            .identity
            .as_deref()
            .zip(principal.as_deref())
            .map(|(id, principal)| PeerIdentity {
                principal,
                namespace: &id.namespace,
            }),
        source_ip: inbound.ip,
        destination_ip: inbound.target.ip(),
        destination_port: inbound.target.port(),
        http,
    };
    let decision = authorizer.decide(&attributes);
    let counted = |policy: &str, decision: &'static str| {
        tunnel
            .metrics
            .policy_decisions
            .get_or_create(&PolicyDecisionLabels {
                policy: policy.to_owned(),
                decision,
            })
            .inc();
    };
    // A parsed connection's Audit policies are reported with each request.
    let audits = count == Count::Every && !matches!(http, Http::Connection);
    let audited = match (decision.audited, audits) {
        (Some(audit), true) => {
            debug!(policy = audit, verdict = ?decision.verdict, to = %key, "audited");
            counted(audit, "audit");
            Some(audit.to_owned())
        }
        _ => None,
    };
    match (decision.verdict, decision.policy) {
        (Verdict::Allow, policy) => {
            if let (Some(policy), Count::Every) = (policy, count) {
                counted(policy, "allow");
            }
            Ruling {
                refused: None,
                policy: policy.map(str::to_owned),
                audited,
            }
        }
        (Verdict::Deny, Some(policy)) => {
            counted(policy, "deny");
            Ruling {
                refused: Some(ProxyError::Denied {
                    reason: format!("MeshPolicy {policy} denies it"),
                    policy: Some(policy.to_owned()),
                }),
                policy: Some(policy.to_owned()),
                audited,
            }
        }
        // Denied because none of the Allow policies allows it: they are what decided.
        (Verdict::Deny, None) => Ruling {
            refused: Some(ProxyError::Denied {
                reason: format!("no Allow MeshPolicy of {key} matches"),
                policy: Some(authorizer.allow_policies().to_owned()),
            }),
            policy: Some(authorizer.allow_policies().to_owned()),
            audited,
        },
    }
}

/// Resolves, with the refusal, once the state's policies and mode for `pod` no longer allow
/// this connection, carried as `handling` says (a policy change revokes live connections, not
/// only new ones); never resolves while they do.
pub async fn revoked(
    tunnel: &Tunnel,
    pod: &Pod,
    inbound: &Inbound,
    handling: PortHandling,
) -> ProxyError {
    let mut state = tunnel.state.clone();
    loop {
        // Marked seen before deciding, so a change during the decision wakes the next turn.
        // The first turn decides again too: the state may have changed since the connection
        // was allowed (while it connected to the application).
        // Decided in a plain function: nothing of the decision stays in the future's state
        // while it waits (one per held connection).
        if let Some(refused) = decide_again(tunnel, pod, inbound, handling, &mut state) {
            info!(pod = %pod.workload.key(), client = %inbound.ip, target = %inbound.target, reason = %refused, "closing a connection the new policy refuses");
            return refused;
        }
        if state.changed().await.is_err() {
            // The tunnel is going away; its shutdown ends the connection.
            return std::future::pending().await;
        }
    }
}

/// Decides a live connection with the state as it is now, marking that state seen.
fn decide_again(
    tunnel: &Tunnel,
    pod: &Pod,
    inbound: &Inbound,
    handling: PortHandling,
    state: &mut tokio::sync::watch::Receiver<Arc<State>>,
) -> Option<ProxyError> {
    let now = state.borrow_and_update().clone();
    let http = connection_view(handling);
    decide(&now, tunnel, pod, inbound, http, Count::Refusal).refused
}
