//! `install/base/crds.yaml` is what the types generate: never edited by hand, never stale.

use std::path::PathBuf;

#[test]
fn install_crds_match_the_types() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../install/base/crds.yaml");
    let generated = policy::crds_yaml();
    if std::env::var_os("WEFT_WRITE_CRDS").is_some() {
        std::fs::write(&file, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        committed == generated,
        "{} differs from the CRDs the types generate; regenerate it with\n  WEFT_WRITE_CRDS=1 cargo test -p policy --test crds",
        file.display()
    );
    // And it is what an API server would take: two CRDs of group weft.dev with a schema.
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&committed).unwrap();
    let names: Vec<&str> = docs
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["meshpolicies.weft.dev", "meshauthentications.weft.dev"]
    );
    for doc in &docs {
        assert_eq!(doc["kind"].as_str(), Some("CustomResourceDefinition"));
        assert_eq!(doc["spec"]["scope"].as_str(), Some("Namespaced"));
        let version = &doc["spec"]["versions"][0];
        assert_eq!(version["name"].as_str(), Some("v1alpha1"));
        assert!(version["schema"]["openAPIV3Schema"]["properties"]["spec"].is_object());
        // The controller writes `status.conditions` through the status subresource, and
        // `kubectl get` shows whether the object was accepted.
        assert!(version["subresources"]["status"].is_object());
        assert!(
            version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
                ["conditions"]
                .is_object()
        );
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(columns.contains(&"Accepted"), "{columns:?}");
    }
}
