//! End-to-end message signatures (Ed25519, ring): every device→cloud message is signed with the
//! device's key, every cloud→device message with the fleet key, so a broker that does not check
//! (or is compromised) can neither forge nor redirect one. See `docs/protocol.md`, "Signatures".
//!
//! A signature covers a domain tag, the topic the message was published on (so a message signed
//! for device A is refused on B's topic or on another channel) and a SHA-256 digest of the
//! message bytes before it. Keys travel as PEM: private keys as PKCS#8 (`PRIVATE KEY`, as rcgen,
//! OpenSSL and rustls write them), public keys as SubjectPublicKeyInfo (`PUBLIC KEY`).

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)
)]

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};

/// Length of a signature on the wire.
pub const SIGNATURE_BYTES: usize = 64;

/// What every signature starts with, so a signature made for Outpost's sync means nothing
/// anywhere else (and no other signature made with the same key means anything here).
const DOMAIN: &[u8] = b"outpost sync signature v1\0";

/// DER prefix of an Ed25519 PKCS#8 v1 private key (RFC 8410): the 32-byte seed follows.
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// Why a key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not readable.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a key of the expected kind.
    #[error("{what}: {reason}")]
    Invalid {
        /// Which key (a file name or a description).
        what: String,
        /// Why.
        reason: String,
    },
}

/// A private Ed25519 key that signs messages.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A key from PKCS#8 DER; `what` names it in errors.
    pub fn from_pkcs8(der: &[u8], what: &str) -> Result<SigningKey, KeyError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(|pair| SigningKey { pair })
            .map_err(|e| KeyError::Invalid {
                what: what.to_string(),
                reason: format!("not an Ed25519 private key in PKCS#8 ({e})"),
            })
    }

    /// A key from PEM text (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(pem: &[u8], what: &str) -> Result<SigningKey, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|e| KeyError::Invalid {
            what: what.to_string(),
            reason: format!("no PKCS#8 private key in PEM ({e})"),
        })?;
        Self::from_pkcs8(der.secret_pkcs8_der(), what)
    }

    /// A key from a PEM file.
    pub fn load(path: &std::path::Path) -> Result<SigningKey, KeyError> {
        let pem = read(path)?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    /// A new random key as PKCS#8 v1 DER (to be written to a file and loaded). ring makes
    /// v2 documents (with the public key), which OpenSSL 3.0 (Debian 12's, so Mosquitto's)
    /// cannot read; v1 is the seed alone and every reader takes it.
    pub fn generate_pkcs8() -> Result<Vec<u8>, KeyError> {
        let failed = || KeyError::Invalid {
            what: "a new key".into(),
            reason: "the system random source failed".into(),
        };
        let v2 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).map_err(|_| failed())?;
        // v2: 30 51 02 01 01 30 05 06 03 2b 65 70 04 22 04 20 SEED(32) a1 23 03 21 00 PUBLIC(32)
        let seed = v2.as_ref().get(16..48).ok_or_else(failed)?;
        let mut v1 = PKCS8_V1_PREFIX.to_vec();
        v1.extend_from_slice(seed);
        Ok(v1)
    }

    /// The matching public key.
    pub fn public(&self) -> VerifyingKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey { key }
    }

    /// Signs `message` as published on `topic`.
    pub fn sign(&self, topic: &str, message: &[u8]) -> [u8; SIGNATURE_BYTES] {
        let sig = self.pair.sign(&signed_bytes(topic, message));
        let mut out = [0u8; SIGNATURE_BYTES];
        out.copy_from_slice(sig.as_ref());
        out
    }
}

/// A public Ed25519 key that checks signatures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VerifyingKey {
    key: [u8; 32],
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyingKey({})", self.fingerprint())
    }
}

impl VerifyingKey {
    /// A key from its SubjectPublicKeyInfo DER.
    pub fn from_spki(der: &[u8], what: &str) -> Result<VerifyingKey, KeyError> {
        let key = der
            .strip_prefix(&ED25519_SPKI_PREFIX)
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| KeyError::Invalid {
                what: what.to_string(),
                reason: "not an Ed25519 public key (SubjectPublicKeyInfo, RFC 8410)".into(),
            })?;
        Ok(VerifyingKey { key })
    }

    /// A key from PEM text (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_pem(pem: &[u8], what: &str) -> Result<VerifyingKey, KeyError> {
        let der = SubjectPublicKeyInfoDer::from_pem_slice(pem).map_err(|e| KeyError::Invalid {
            what: what.to_string(),
            reason: format!("no public key in PEM ({e})"),
        })?;
        Self::from_spki(der.as_ref(), what)
    }

    /// A key from a PEM file.
    pub fn load(path: &std::path::Path) -> Result<VerifyingKey, KeyError> {
        let pem = read(path)?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    /// The key as SubjectPublicKeyInfo DER.
    pub fn spki(&self) -> Vec<u8> {
        let mut out = ED25519_SPKI_PREFIX.to_vec();
        out.extend_from_slice(&self.key);
        out
    }

    /// The key as PEM text.
    pub fn to_pem(&self) -> String {
        pem_block("PUBLIC KEY", &self.spki())
    }

    /// A short, stable name for people: the first 8 bytes of SHA-256 of the key, in hex.
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.key);
        d.as_ref().iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// True when `signature` is this key's over `message` as published on `topic`.
    pub fn verify(&self, topic: &str, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.key)
            .verify(&signed_bytes(topic, message), signature)
            .is_ok()
    }
}

/// What a signature covers: the domain, the topic and the message's digest (a fixed size
/// whatever the message, so signing a 1 MiB batch copies nothing).
fn signed_bytes(topic: &str, message: &[u8]) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, message);
    let mut out = Vec::with_capacity(DOMAIN.len() + topic.len() + 1 + 32);
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(topic.as_bytes());
    out.push(0);
    out.extend_from_slice(digest.as_ref());
    out
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes a key or certificate file with `mode` (0600 for private keys), atomically: a
/// temporary file created with that mode, synced, and renamed into place, so the file never
/// exists half-written or with looser permissions.
pub fn write_key_file(path: &std::path::Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// DER bytes as a PEM block with the given label.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap(), "test").unwrap()
    }

    #[test]
    fn signatures_bind_key_topic_and_bytes() {
        let k = key();
        let sig = k.sign("outpost/v1/gw-1/events", b"hello");
        let public = k.public();
        assert!(public.verify("outpost/v1/gw-1/events", b"hello", &sig));
        assert!(
            !public.verify("outpost/v1/gw-2/events", b"hello", &sig),
            "another device's topic"
        );
        assert!(
            !public.verify("outpost/v1/gw-1/birth", b"hello", &sig),
            "another channel"
        );
        assert!(!public.verify("outpost/v1/gw-1/events", b"hellO", &sig), "other bytes");
        assert!(
            !key().public().verify("outpost/v1/gw-1/events", b"hello", &sig),
            "another key"
        );
        assert!(
            !public.verify("outpost/v1/gw-1/events", b"hello", &sig[..63]),
            "short signature"
        );
    }

    #[test]
    fn keys_round_trip_through_pem() {
        let k = key();
        let pem = k.public().to_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
        assert_eq!(VerifyingKey::from_pem(pem.as_bytes(), "t").unwrap(), k.public());
        let der = SigningKey::generate_pkcs8().unwrap();
        let private = pem_block("PRIVATE KEY", &der);
        let back = SigningKey::from_pem(private.as_bytes(), "t").unwrap();
        assert_eq!(back.public(), SigningKey::from_pkcs8(&der, "t").unwrap().public());
        let err = VerifyingKey::from_pem(private.as_bytes(), "fleet.pub").unwrap_err();
        assert!(err.to_string().contains("fleet.pub"), "{err}");
        assert!(
            SigningKey::from_pem(b"garbage", "device.key")
                .unwrap_err()
                .to_string()
                .contains("device.key")
        );
        assert!(VerifyingKey::from_spki(&[0x30; 44], "x").is_err());
    }

    #[test]
    fn pem_base64_matches_the_standard_alphabet() {
        assert_eq!(pem_block("X", b"Man"), "-----BEGIN X-----\nTWFu\n-----END X-----\n");
        assert_eq!(pem_block("X", b"Ma"), "-----BEGIN X-----\nTWE=\n-----END X-----\n");
        assert_eq!(pem_block("X", b"M"), "-----BEGIN X-----\nTQ==\n-----END X-----\n");
    }
}
