//! An events batch as the cloud ingests it: any count, first sequence and payload, either as
//! raw deflate bytes or as records compressed for the fuzzer (to reach the record parser).
//! Unpacking and decoding every record returns errors, never panics; what unpacks is contiguous.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::journal;
use outpost_shared::protocol::{EventBatch, unpack};

fuzz_target!(|data: &[u8]| {
    if data.len() < 13 {
        return;
    }
    let (head, rest) = data.split_at(13);
    let first_seq = u64::from_le_bytes(head[..8].try_into().unwrap());
    let count = u32::from_le_bytes(head[8..12].try_into().unwrap());
    let compressed = if head[12] & 1 == 0 {
        rest.to_vec()
    } else {
        miniz_oxide::deflate::compress_to_vec(rest, 1)
    };
    let batch = EventBatch { epoch: 1, first_seq, count, compressed };
    if let Ok(events) = unpack(&batch) {
        assert_eq!(events.len(), count as usize);
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.seq, first_seq + i as u64);
            let _ = journal::decode(&e.record);
            let _ = journal::for_sync(&e.record);
        }
    }
});
