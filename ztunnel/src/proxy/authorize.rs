//! The authorize step of every path into a local pod (HBONE, plaintext inbound, the same-node
//! shortcut): the pod's MeshAuthentication mode, then its MeshPolicies (compiled with the
//! state, `policy::authorize`), decide before anything reaches the application.

use std::net::{IpAddr, SocketAddr};

use policy::MtlsMode;
use policy::authorize::{Attributes, PeerIdentity, Verdict};
use tracing::{debug, info};

use super::ProxyError;
use super::context::{Pod, Tunnel};
use crate::identity::Identity;
use crate::telemetry::PolicyDecisionLabels;

/// Who is connecting: its verified identity (none in plaintext) and address.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    pub identity: Option<&'a Identity>,
    pub ip: IpAddr,
}

/// Allows or refuses a connection from `caller` to `target` of `pod`; the refusal says which
/// object decided.
pub fn authorize(
    tunnel: &Tunnel,
    pod: &Pod,
    caller: Caller<'_>,
    target: SocketAddr,
) -> Result<(), ProxyError> {
    let state = tunnel.state.borrow().clone();
    let key = pod.workload.key();
    // The state's view of the pod (its policies and mode change with it).
    let workload = state.workload(&key);
    if caller.identity.is_none() && workload.is_some_and(|w| w.mtls == MtlsMode::Strict) {
        return Err(ProxyError::Denied(format!(
            "the MeshAuthentication of {key} is Strict: plaintext is refused"
        )));
    }
    let Some(authorizer) = state.authorizer(&key) else {
        return Ok(());
    };
    let principal = caller.identity.map(Identity::principal);
    let attributes = Attributes {
        peer: caller
            .identity
            .zip(principal.as_deref())
            .map(|(id, principal)| PeerIdentity {
                principal,
                namespace: &id.namespace,
            }),
        source_ip: caller.ip,
        destination_ip: target.ip(),
        destination_port: target.port(),
        http: None,
    };
    let decision = authorizer.decide(&attributes);
    let count = |policy: &str, decision: &'static str| {
        tunnel
            .metrics
            .policy_decisions
            .get_or_create(&PolicyDecisionLabels {
                policy: policy.to_owned(),
                decision,
            })
            .inc();
    };
    if let Some(audit) = decision.audited {
        debug!(policy = audit, verdict = ?decision.verdict, to = %key, "audited");
        count(audit, "audit");
    }
    if let Some(policy) = decision.policy {
        count(
            policy,
            match decision.verdict {
                Verdict::Allow => "allow",
                Verdict::Deny => "deny",
            },
        );
    }
    match (decision.verdict, decision.policy) {
        (Verdict::Allow, _) => Ok(()),
        (Verdict::Deny, Some(policy)) => {
            Err(ProxyError::Denied(format!("MeshPolicy {policy} denies it")))
        }
        (Verdict::Deny, None) => Err(ProxyError::Denied(format!(
            "no Allow MeshPolicy of {key} matches"
        ))),
    }
}

/// What a connection was allowed as: decided again whenever the state changes.
#[derive(Clone, Debug)]
pub struct Allowed {
    pub identity: Option<std::sync::Arc<Identity>>,
    pub ip: IpAddr,
    pub target: SocketAddr,
}

/// Resolves, with the refusal, once the state's policies and mode for `pod` no longer allow
/// this connection (a policy change revokes live connections, not only new ones); never
/// resolves while they do.
pub async fn revoked(tunnel: &Tunnel, pod: &Pod, allowed: &Allowed) -> ProxyError {
    let mut state = tunnel.state.clone();
    // Changes from now on: the connection was allowed by the state of its start.
    state.borrow_and_update();
    loop {
        if state.changed().await.is_err() {
            // The tunnel is going away; its shutdown ends the connection.
            return std::future::pending().await;
        }
        let caller = Caller {
            identity: allowed.identity.as_deref(),
            ip: allowed.ip,
        };
        if let Err(refused) = authorize(tunnel, pod, caller, allowed.target) {
            info!(pod = %pod.workload.key(), client = %allowed.ip, target = %allowed.target, reason = %refused, "closing a connection the new policy refuses");
            return refused;
        }
    }
}
