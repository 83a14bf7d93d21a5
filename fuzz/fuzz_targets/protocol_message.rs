//! Any bytes on a device or cloud topic: `protocol::decode` returns an error or a message that
//! re-encodes to itself; an events batch unpacks or is refused; nothing panics or over-allocates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_shared::protocol::{Body, decode, encode, unpack};

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = decode(data) {
        assert_eq!(decode(&encode(&body)).ok().as_ref(), Some(&body));
        if let Body::Events(batch) = &body {
            let _ = unpack(batch);
        }
    }
});
