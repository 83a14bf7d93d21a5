//! Any bytes: decoding a journal record returns an error or a record that re-encodes to the
//! same record, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::journal::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = decode(data) {
        assert_eq!(decode(&encode(&record)).ok(), Some(record));
    }
});
