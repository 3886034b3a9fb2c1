//! MeshPolicy and MeshAuthentication objects: anything that deserializes is validated field
//! by field without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy::{MeshAuthentication, MeshPolicy, validate_authentication, validate_policy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) = serde_saphyr::from_str::<MeshPolicy>(text) {
        let _ = validate_policy(&policy);
    }
    if let Ok(authn) = serde_saphyr::from_str::<MeshAuthentication>(text) {
        let _ = validate_authentication(&authn);
    }
});
