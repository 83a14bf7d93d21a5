//! Any bytes on an agent's `cmd` or `desired` topic, through everything the agent does with
//! them before touching its journal: decode, parse the JSON texts, parse a deployed definition.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::definition::parse_document;
use outpost_shared::protocol::{Body, CommandKind, decode};

fuzz_target!(|data: &[u8]| {
    let json = |t: &str| serde_json::from_str::<serde_json::Value>(t).is_ok();
    match decode(data) {
        Ok(Body::Command(c)) => match c.kind {
            CommandKind::Start { input, .. } => {
                json(&input);
            }
            CommandKind::Signal { payload, .. } => {
                json(&payload);
            }
            CommandKind::Deploy { document, .. } => {
                let _ = parse_document(&document);
            }
            CommandKind::Cancel { .. } | CommandKind::Approve { .. } => {}
        },
        Ok(Body::Desired(d)) => {
            json(&d.document);
        }
        _ => {}
    }
});
