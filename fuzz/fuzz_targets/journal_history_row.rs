//! Any bytes: decoding a `run_history` row of the journal (read back from a file that may be
//! corrupt) gives ascending sequence numbers or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_agent::journal::decode_history_row;

fuzz_target!(|data: &[u8]| {
    if let Ok(seqs) = decode_history_row(data) {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    }
});
