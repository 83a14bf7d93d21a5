//! Any bytes: decoding a block of the journal's segment log (read back from flash that may be
//! torn or corrupt) gives a block, "not a block" or an error, never a panic. The generation and
//! number expected are the ones the bytes claim, so the fuzzer reaches the checksum and the
//! payload decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_agent::journal::decode_log_block;

fuzz_target!(|data: &[u8]| {
    let claimed = |at: usize, n: usize| data.get(at..at + n).map(|b| b.iter().rev().fold(0u64, |v, x| v << 8 | u64::from(*x)));
    let generation = claimed(8, 8).unwrap_or(0);
    let number = claimed(16, 4).unwrap_or(0) as u32;
    if let Ok(Some((entries, len))) = decode_log_block(data, generation, number) {
        assert!(len % 4096 == 0 && len >= 4096, "{len}");
        let _ = entries;
    }
});
