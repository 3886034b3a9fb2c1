//! The CustomResourceDefinitions, generated from the types (`install/base/crds.yaml` holds this
//! text; a test keeps the two equal).

use kube::CustomResourceExt;

use crate::{MeshAuthentication, MeshPolicy};

/// Both definitions as one multi-document YAML text.
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Generated from policy/src/resources.rs: do not edit; regenerate with\n# WEFT_WRITE_CRDS=1 cargo test -p policy --test crds\n",
    );
    for crd in [MeshPolicy::crd(), MeshAuthentication::crd()] {
        out.push_str("---\n");
        // Cannot fail: a CRD is plain strings, maps, lists and numbers.
        let text = serde_saphyr::to_string(&crd).expect("a CRD serializes to YAML");
        out.push_str(&text);
    }
    out
}
