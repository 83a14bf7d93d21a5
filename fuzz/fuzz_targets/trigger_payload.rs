//! Any MQTT trigger message or trigger file: the run id and input are derived without panics,
//! the same bytes always give the same run id, and the id is a valid run id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_agent::trigger::{file_input, message_input, message_run_id};

fuzz_target!(|data: &[u8]| {
    let topic = "plant/line1/lot";
    let id = message_run_id("w", topic, data);
    assert_eq!(id, message_run_id("w", topic, data));
    assert!(id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)), "{id}");
    let _ = message_input(data);
    if let Ok((a, _)) = file_input("w", "lot.json", data) {
        assert_eq!(Ok(a), file_input("w", "lot.json", data).map(|(id, _)| id));
    }
});
