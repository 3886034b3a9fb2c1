//! When the agent is stopped on Kubernetes, is Weft being updated or uninstalled? Capture is
//! pinned so that it outlives the agent across a rolling update (enrolled pods fail closed
//! until the new tunnel listens); on an uninstall it must go with the agent, or every
//! enrolled pod's connections would be refused with no tunnel left to take them. The agent
//! asks the API about the DaemonSet that runs it: gone, being deleted, or its own access to
//! it revoked (the uninstall deletes the role binding too) means uninstalled; there means an
//! update; no answer keeps capture (fail closed) and says how to remove it by hand.

use k8s_openapi::api::apps::v1::DaemonSet;

/// What the agent concluded at shutdown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// The DaemonSet is there: a rolling update or a restart. Capture stays.
    Update,
    /// The DaemonSet is gone or going (the reason): capture is removed.
    Uninstall(String),
    /// The API could not say (the reason): capture stays.
    Unknown(String),
}

/// Decides from the DaemonSet `namespace/name` as the API answers now.
pub async fn at_shutdown(client: &kube::Client, namespace: &str, name: &str) -> Shutdown {
    let api: kube::Api<DaemonSet> = kube::Api::namespaced(client.clone(), namespace);
    let answer = tokio::time::timeout(std::time::Duration::from_secs(5), api.get_opt(name)).await;
    decide(namespace, name, answer)
}

type Answer = Result<Result<Option<DaemonSet>, kube::Error>, tokio::time::error::Elapsed>;

fn decide(namespace: &str, name: &str, answer: Answer) -> Shutdown {
    match answer {
        Ok(Ok(None)) => Shutdown::Uninstall(format!("the DaemonSet {namespace}/{name} is gone")),
        Ok(Ok(Some(ds))) if ds.metadata.deletion_timestamp.is_some() => {
            Shutdown::Uninstall(format!("the DaemonSet {namespace}/{name} is being deleted"))
        }
        Ok(Ok(Some(_))) => Shutdown::Update,
        Ok(Err(kube::Error::Api(status))) if status.code == 401 || status.code == 403 => {
            Shutdown::Uninstall(format!(
                "this agent may no longer read its DaemonSet {namespace}/{name} ({} {}): its service account or role binding was deleted",
                status.code, status.reason
            ))
        }
        Ok(Err(error)) => Shutdown::Unknown(error.to_string()),
        Err(_) => Shutdown::Unknown("the API did not answer within 5 s".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, reason: &str) -> Answer {
        Ok(Err(kube::Error::Api(
            kube::core::Status::failure("refused", reason)
                .with_code(code)
                .boxed(),
        )))
    }

    #[test]
    fn only_a_daemon_set_that_is_gone_going_or_closed_to_us_means_uninstall() {
        let there = DaemonSet::default();
        let mut going = DaemonSet::default();
        going.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
        );
        let decide = |answer| decide("weft-system", "weft-node", answer);
        assert_eq!(decide(Ok(Ok(Some(there)))), Shutdown::Update);
        assert!(
            matches!(decide(Ok(Ok(Some(going)))), Shutdown::Uninstall(r) if r.contains("being deleted"))
        );
        assert!(matches!(decide(Ok(Ok(None))), Shutdown::Uninstall(r) if r.contains("gone")));
        assert!(
            matches!(decide(status(403, "Forbidden")), Shutdown::Uninstall(r) if r.contains("403"))
        );
        assert!(matches!(
            decide(status(401, "Unauthorized")),
            Shutdown::Uninstall(_)
        ));
        assert!(matches!(
            decide(status(500, "InternalError")),
            Shutdown::Unknown(_)
        ));
        assert!(matches!(
            decide(status(429, "TooManyRequests")),
            Shutdown::Unknown(_)
        ));
    }
}
