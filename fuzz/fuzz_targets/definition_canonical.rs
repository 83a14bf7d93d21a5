//! Any definition text: a definition that validates has a canonical JSON form (stored in the
//! journal, sent in the inventory) that parses back to the same definition and the same form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::definition::{ActionCatalog, parse};
use serde_json::{Map, Value};

struct Everything;

impl ActionCatalog for Everything {
    fn names(&self) -> Vec<String> {
        vec!["x".into(), "set".into(), "sleep".into()]
    }
    fn check(&self, action: &str, _: &Map<String, Value>) -> Option<Vec<String>> {
        (action != "unknown").then(Vec::new)
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(def) = parse(text, &Everything) {
        let canonical = def.to_json();
        let again = parse(&canonical, &Everything).expect("the canonical form validates");
        assert_eq!(again.to_json(), canonical);
    }
});
