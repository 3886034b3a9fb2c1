//! Which policy objects apply to a workload. A MeshPolicy applies to the workloads its
//! `selector` picks in its namespace (no selector: all of them); one in the root namespace
//! applies to the workloads it picks in every namespace. For MeshAuthentication the most
//! specific one wins: a selector in the workload's namespace, then its namespace's without
//! selector, then the root namespace's with a selector, then without (several at one level:
//! the first by name).

use std::collections::BTreeMap;

use crate::{MeshAuthentication, MtlsMode, WorkloadSelector};

/// A workload as scoping sees it.
#[derive(Clone, Copy, Debug)]
pub struct Scoped<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// Whether an object of `namespace` with `selector` applies to `workload`.
pub fn applies(
    namespace: &str,
    selector: Option<&WorkloadSelector>,
    root_namespace: &str,
    workload: Scoped<'_>,
) -> bool {
    (namespace == workload.namespace || namespace == root_namespace)
        && selector.is_none_or(|s| picks(s, workload.labels))
}

fn picks(selector: &WorkloadSelector, labels: &BTreeMap<String, String>) -> bool {
    selector
        .match_labels
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// The mTLS mode of `workload`: the most specific of `authentications` (valid ones), else
/// `Permissive`, and the object that decided (`namespace/name`).
pub fn mtls_mode<'a>(
    authentications: impl IntoIterator<Item = &'a MeshAuthentication>,
    root_namespace: &str,
    workload: Scoped<'_>,
) -> (MtlsMode, Option<String>) {
    // Lower is more specific.
    let mut best: Option<(u8, String, MtlsMode)> = None;
    for authn in authentications {
        let namespace = authn.metadata.namespace.as_deref().unwrap_or("default");
        let selector = authn.spec.selector.as_ref();
        if !applies(namespace, selector, root_namespace, workload) {
            continue;
        }
        let own = namespace == workload.namespace;
        let level = match (own, selector.is_some()) {
            (true, true) => 0,
            (true, false) => 1,
            (false, true) => 2,
            (false, false) => 3,
        };
        let name = format!(
            "{namespace}/{}",
            authn.metadata.name.as_deref().unwrap_or_default()
        );
        let better = best
            .as_ref()
            .is_none_or(|(l, n, _)| (level, &name) < (*l, n));
        if better {
            best = Some((level, name, authn.spec.mode));
        }
    }
    match best {
        Some((_, name, mode)) => (mode, Some(name)),
        None => (MtlsMode::Permissive, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MeshAuthenticationSpec;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn selector(pairs: &[(&str, &str)]) -> WorkloadSelector {
        WorkloadSelector {
            match_labels: labels(pairs),
        }
    }

    #[test]
    fn policies_apply_in_their_namespace_or_from_the_root() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let shop = Scoped {
            namespace: "shop",
            labels: &web,
        };
        let root = "weft-system";
        assert!(applies("shop", None, root, shop));
        assert!(applies(
            "shop",
            Some(&selector(&[("app", "web")])),
            root,
            shop
        ));
        assert!(
            applies("shop", Some(&selector(&[])), root, shop),
            "an empty selector picks all"
        );
        assert!(!applies(
            "shop",
            Some(&selector(&[("app", "db")])),
            root,
            shop
        ));
        assert!(!applies(
            "shop",
            Some(&selector(&[("app", "web"), ("x", "y")])),
            root,
            shop
        ));
        assert!(!applies("other", None, root, shop), "another namespace's");
        assert!(
            applies(root, None, root, shop),
            "the root namespace's: mesh-wide"
        );
        assert!(applies(
            root,
            Some(&selector(&[("tier", "front")])),
            root,
            shop
        ));
        assert!(!applies(
            root,
            Some(&selector(&[("tier", "back")])),
            root,
            shop
        ));
    }

    fn authn(
        namespace: &str,
        name: &str,
        selector: Option<WorkloadSelector>,
        mode: MtlsMode,
    ) -> MeshAuthentication {
        let mut a = MeshAuthentication::new(name, MeshAuthenticationSpec { selector, mode });
        a.metadata.namespace = Some(namespace.to_owned());
        a
    }

    #[test]
    fn the_most_specific_authentication_decides() {
        let web = labels(&[("app", "web")]);
        let shop = Scoped {
            namespace: "shop",
            labels: &web,
        };
        let root = "weft-system";
        let mesh = authn(root, "mesh", None, MtlsMode::Strict);
        let root_web = authn(
            root,
            "root-web",
            Some(selector(&[("app", "web")])),
            MtlsMode::Permissive,
        );
        let ns = authn("shop", "ns", None, MtlsMode::Strict);
        let ns_web = authn(
            "shop",
            "web",
            Some(selector(&[("app", "web")])),
            MtlsMode::Permissive,
        );
        let ns_db = authn(
            "shop",
            "db",
            Some(selector(&[("app", "db")])),
            MtlsMode::Strict,
        );
        let other = authn("other", "x", None, MtlsMode::Strict);
        assert_eq!(
            mtls_mode([&other], root, shop),
            (MtlsMode::Permissive, None)
        );
        assert_eq!(mtls_mode([&mesh], root, shop).0, MtlsMode::Strict);
        assert_eq!(
            mtls_mode([&mesh, &root_web], root, shop).0,
            MtlsMode::Permissive
        );
        assert_eq!(mtls_mode([&root_web, &ns], root, shop).0, MtlsMode::Strict);
        let all = [&mesh, &root_web, &ns, &ns_web, &ns_db, &other];
        assert_eq!(
            mtls_mode(all, root, shop),
            (MtlsMode::Permissive, Some("shop/web".to_owned()))
        );
        let a = authn("shop", "a", None, MtlsMode::Permissive);
        let b = authn("shop", "b", None, MtlsMode::Strict);
        assert_eq!(
            mtls_mode([&b, &a], root, shop).1.as_deref(),
            Some("shop/a"),
            "first by name"
        );
    }
}
