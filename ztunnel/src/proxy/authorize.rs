//! The authorize step of every path into a local pod (HBONE, plaintext inbound, the same-node
//! shortcut): the pod's MeshAuthentication mode, then its MeshPolicies (compiled with the
//! state, `policy::authorize`), decide before anything reaches the application.

use std::net::{IpAddr, SocketAddr};

use policy::MtlsMode;
use policy::authorize::{Attributes, PeerIdentity, Verdict};
use tracing::debug;

use super::ProxyError;
use super::context::{Pod, Tunnel};
use crate::identity::Identity;

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
    if let Some(audit) = decision.audited {
        debug!(policy = audit, verdict = ?decision.verdict, to = %key, "audited");
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
