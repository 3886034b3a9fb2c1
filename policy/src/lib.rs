//! Weft's mesh policy resources, group `weft.dev`, version `v1alpha1`: [`MeshPolicy`] (who may
//! reach which workloads, shaped like Istio's AuthorizationPolicy so users can move over) and
//! [`MeshAuthentication`] (whether plaintext may reach a workload). Types, validation with a
//! reason per field, the CustomResourceDefinitions generated from the types, and decisions
//! ([`authorize`]). No I/O.

pub mod authorize;
mod crds;
mod resources;
pub mod scope;
mod validate;

pub use crds::crds_yaml;
pub use resources::{
    Condition, MeshAuthentication, MeshAuthenticationSpec, MeshPolicy, MeshPolicySpec, MtlsMode,
    ObjectStatus, Operation, PolicyAction, Rule, RuleFrom, RuleTo, Source, StatusCondition,
    WorkloadSelector,
};
pub use validate::{validate_authentication, validate_policy};

/// A policy as the agent sends it to the tunnel: its `namespace/name` and spec.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NamedPolicy {
    pub name: String,
    pub spec: MeshPolicySpec,
}

impl From<&MeshPolicy> for NamedPolicy {
    fn from(policy: &MeshPolicy) -> Self {
        NamedPolicy {
            name: name_of(&policy.metadata),
            spec: policy.spec.clone(),
        }
    }
}

/// `namespace/name` of an object (`default` when it names no namespace).
pub fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// Why a policy object is refused; the object is ignored, the rest of the mesh keeps working.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{kind} {object}: {field}: {reason}")]
    Invalid {
        kind: &'static str,
        /// `namespace/name`.
        object: String,
        /// Where in the object, e.g. `spec.rules[0].from[1].source.ipBlocks[0]`.
        field: String,
        reason: String,
    },
}
