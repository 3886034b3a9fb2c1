//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! Parsing is the `spiffe` crate's (the SPIFFE ID standard: scheme, trust domain and path
//! characters, no query, fragment, port, user info, empty or dot segments); Weft then requires
//! the Kubernetes shape of the path.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a Weft workload identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with spiffe://")]
    NotSpiffe(String),
    #[error("identity {id:?} is not a valid SPIFFE ID: {reason}")]
    Malformed { id: String, reason: String },
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    BadPath(String),
}

/// A workload's SPIFFE ID, as carried in the URI SAN of its certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    /// Builds the identity of a service account in a trust domain.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }
}

impl Identity {
    /// The principal policies name: the SPIFFE ID without `spiffe://` (`td/ns/<ns>/sa/<sa>`).
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.starts_with("spiffe://") {
            return Err(IdentityError::NotSpiffe(s.to_owned()));
        }
        let id = spiffe::SpiffeId::new(s).map_err(|e| IdentityError::Malformed {
            id: s.to_owned(),
            reason: e.to_string(),
        })?;
        let segments: Vec<&str> = id.path().split('/').skip(1).collect();
        match segments.as_slice() {
            ["ns", ns, "sa", sa] => Ok(Identity::new(id.trust_domain().as_ref(), ns, sa)),
            _ => Err(IdentityError::BadPath(s.to_owned())),
        }
    }
}

impl TryFrom<String> for Identity {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Identity> for String {
    fn from(id: Identity) -> String {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_uri() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "default", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
    }

    #[test]
    fn a_trust_domain_in_capitals_is_read_in_lower_case() {
        // The `spiffe` crate normalizes (trust domain names are case-insensitive).
        let id: Identity = "spiffe://Cluster.Local/ns/a/sa/b".parse().unwrap();
        assert_eq!(id.trust_domain, "cluster.local");
    }

    #[test]
    fn refuses_other_shapes() {
        assert!(matches!(
            "https://cluster.local/ns/a/sa/b".parse::<Identity>(),
            Err(IdentityError::NotSpiffe(_))
        ));
        for bad in [
            "spiffe://cluster.local/ns/a",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://td/ns/a/sb/b",
            "spiffe://td",
        ] {
            assert!(
                matches!(bad.parse::<Identity>(), Err(IdentityError::BadPath(_))),
                "{bad}"
            );
        }
        // Not SPIFFE IDs at all, by the standard (the hand-written parser this replaced
        // accepted the first four).
        for bad in [
            "spiffe://td/ns/a/sa/b?x=1",
            "spiffe://td/ns/a/sa/b#frag",
            "spiffe://td:8443/ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/../sa/b",
            "spiffe://td/ns/a/sa/b/",
            "spiffe://user@td/ns/a/sa/b",
        ] {
            assert!(
                matches!(
                    bad.parse::<Identity>(),
                    Err(IdentityError::Malformed { .. })
                ),
                "{bad}: {:?}",
                bad.parse::<Identity>()
            );
        }
    }
}
