//! The node agent's manifest folder: any file is objects or an error naming the document, and
//! what it yields goes through enrollment and the tables without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::agent::{NetnsLookup, local_enrolled};
use mesh_node::cluster::ClusterObjects;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(found) = mesh_node::manifests::parse_documents(std::path::Path::new("fuzz.yaml"), text)
    else {
        return;
    };
    let mut objects = ClusterObjects::default();
    for object in found {
        objects.insert(object);
    }
    let _ = mesh_node::tunnel_state::tunnel_state(&objects);
    let _ = mesh_node::policies::check_policies(&objects);
    let lookup = NetnsLookup::AnnotationThenUid {
        proc_root: std::path::PathBuf::from("/nonexistent"),
    };
    let _ = local_enrolled(&objects, "node1", &lookup);
});
