//! Any text: parsing and validating a definition returns an error or a definition, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::definition::{ActionCatalog, parse};
use serde_json::{Map, Value};

struct Everything;

impl ActionCatalog for Everything {
    fn names(&self) -> Vec<String> {
        vec!["x".into()]
    }
    fn check(&self, action: &str, _: &Map<String, Value>) -> Option<Vec<String>> {
        (action != "unknown").then(Vec::new)
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse(text, &Everything);
    }
});
