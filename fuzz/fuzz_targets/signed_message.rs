//! Any bytes on a topic where signatures are required: `protocol::open` refuses them (no
//! signature, a bad one) or, for bytes really signed by the key, returns the message; the body
//! is never decoded before the signature holds. The first byte picks the trust mode.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use outpost_shared::protocol::{Body, Seal, Trust, open};
use outpost_shared::signing::{SigningKey, VerifyingKey};

fn key() -> &'static (Arc<SigningKey>, VerifyingKey) {
    static KEY: OnceLock<(Arc<SigningKey>, VerifyingKey)> = OnceLock::new();
    KEY.get_or_init(|| {
        let der = SigningKey::generate_pkcs8().unwrap();
        let k = SigningKey::from_pkcs8(&der, "fuzz").unwrap();
        let public = k.public();
        (Arc::new(k), public)
    })
}

fuzz_target!(|data: &[u8]| {
    let (signer, public) = key();
    let topic = "outpost/v1/gw/cmd";
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            // Arbitrary bytes: refused unless they decode as v1 under the insecure mode.
            let _ = open(rest, topic, Trust::Key { key: public, signer: "fuzz" });
            let _ = open(rest, topic, Trust::Unsigned);
        }
        _ => {
            // Bytes that decode as a body get sealed for real: they open to themselves on their
            // topic, and on no other.
            if let Ok(body) = postcard_body(rest) {
                let sealed = Seal::Signed(signer.clone()).encode(topic, &body);
                if let Ok(bytes) = sealed {
                    let trust = Trust::Key { key: public, signer: "fuzz" };
                    assert_eq!(open(&bytes, topic, trust).ok().as_ref(), Some(&body));
                    assert!(open(&bytes, "outpost/v1/other/cmd", trust).is_err());
                }
            }
        }
    }
});

fn postcard_body(bytes: &[u8]) -> Result<Body, outpost_shared::protocol::ProtocolError> {
    let mut v = vec![outpost_shared::protocol::VERSION];
    v.extend_from_slice(bytes);
    outpost_shared::protocol::decode(&v)
}
