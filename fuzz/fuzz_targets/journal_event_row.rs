//! Any bytes under any key: unpacking an `events` row of the journal (read back from a file that
//! may be corrupt) gives ascending sequence numbers at or above the key, or an error, never a
//! panic. The first 8 bytes are the row's key, the rest its value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_agent::journal::decode_event_row;

fuzz_target!(|data: &[u8]| {
    let (key, row) = data.split_at(data.len().min(8));
    let key = key.iter().rev().fold(0u64, |v, x| v << 8 | u64::from(*x));
    if let Ok(events) = decode_event_row(key, row) {
        assert!(events.windows(2).all(|w| w[0].0 < w[1].0), "{events:?}");
        assert!(events.first().is_some_and(|(s, _)| *s >= key));
    }
});
