//! The authorize step of every path into a local pod (HBONE, plaintext inbound, the same-node
//! shortcut): the pod's MeshAuthentication mode, then its MeshPolicies (compiled with the
//! state, `policy::authorize`), decide before anything reaches the application.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use policy::MtlsMode;
use policy::authorize::{Attributes, PeerIdentity, Verdict};
use tracing::{debug, info};

use super::ProxyError;
use super::context::{Pod, Tunnel};
use crate::identity::Identity;
use crate::telemetry::PolicyDecisionLabels;

/// A connection into a pod: who makes it (its verified identity, none in plaintext; its
/// address) and where to. Decided when it opens, and again whenever the state changes.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub identity: Option<Arc<Identity>>,
    pub ip: IpAddr,
    pub target: SocketAddr,
}

/// Allows or refuses a new connection to `pod`; the refusal says which object decided. Every
/// decision a policy takes is counted.
pub fn authorize(tunnel: &Tunnel, pod: &Pod, inbound: &Inbound) -> Result<(), ProxyError> {
    decide(tunnel, pod, inbound, Count::Every)
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

fn decide(tunnel: &Tunnel, pod: &Pod, inbound: &Inbound, count: Count) -> Result<(), ProxyError> {
    let state = tunnel.state.borrow().clone();
    let key = pod.workload.key();
    // The state's view of the pod (its policies and mode change with it).
    let workload = state.workload(&key);
    if inbound.identity.is_none() && workload.is_some_and(|w| w.mtls == MtlsMode::Strict) {
        return Err(ProxyError::Denied(format!(
            "the MeshAuthentication of {key} is Strict: plaintext is refused"
        )));
    }
    let Some(authorizer) = state.authorizer(&key) else {
        return Ok(());
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
        http: None,
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
    if let (Some(audit), Count::Every) = (decision.audited, count) {
        debug!(policy = audit, verdict = ?decision.verdict, to = %key, "audited");
        counted(audit, "audit");
    }
    match (decision.verdict, decision.policy) {
        (Verdict::Allow, policy) => {
            if let (Some(policy), Count::Every) = (policy, count) {
                counted(policy, "allow");
            }
            Ok(())
        }
        (Verdict::Deny, Some(policy)) => {
            counted(policy, "deny");
            Err(ProxyError::Denied(format!("MeshPolicy {policy} denies it")))
        }
        (Verdict::Deny, None) => Err(ProxyError::Denied(format!(
            "no Allow MeshPolicy of {key} matches"
        ))),
    }
}

/// Resolves, with the refusal, once the state's policies and mode for `pod` no longer allow
/// this connection (a policy change revokes live connections, not only new ones); never
/// resolves while they do.
pub async fn revoked(tunnel: &Tunnel, pod: &Pod, inbound: &Inbound) -> ProxyError {
    let mut state = tunnel.state.clone();
    loop {
        // Marked seen before deciding, so a change during the decision wakes the next turn.
        // The first turn decides again too: the state may have changed since the connection
        // was allowed (while it connected to the application).
        state.borrow_and_update();
        if let Err(refused) = decide(tunnel, pod, inbound, Count::Refusal) {
            info!(pod = %pod.workload.key(), client = %inbound.ip, target = %inbound.target, reason = %refused, "closing a connection the new policy refuses");
            return refused;
        }
        if state.changed().await.is_err() {
            // The tunnel is going away; its shutdown ends the connection.
            return std::future::pending().await;
        }
    }
}
