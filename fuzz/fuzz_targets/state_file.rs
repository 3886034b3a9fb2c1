//! The tunnel's YAML state file: any text is a state or an error naming where.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ztunnel::state::parse_state_file(std::path::Path::new("fuzz.yaml"), text);
    }
});
