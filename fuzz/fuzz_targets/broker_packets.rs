//! Any bytes a client sends the embedded broker's gate: framing and parsing refuse them or
//! yield packets, and the rules decide each; nothing panics, whatever the lengths claim.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_cloud_sync::acl::{Identity, Rules, frame, parse};

fuzz_target!(|data: &[u8]| {
    let rules = Rules::new("outpost");
    let who = [Identity::Device("gw-a".into()), Identity::Service];
    let mut rest = data;
    while let Ok(Some(len)) = frame(rest, 1 << 20) {
        let Some((packet, tail)) = rest.split_at_checked(len) else { break };
        if let Ok(p) = parse(packet) {
            for id in &who {
                let _ = rules.check(id, &p);
            }
        }
        rest = tail;
    }
});
