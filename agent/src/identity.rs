//! The gateway's identity: its private key (made here, never leaves the gateway), its
//! certificate from the fleet CA, the CA that signs the broker's certificate, and the fleet's
//! public key that every order from the cloud must be signed with.
//!
//! Files live in `DATA_DIR/identity/` unless options name others: `device.key` (0600),
//! `device.csr`, `device.crt`, `ca.crt`, `fleet.pub`. `outpost keygen` makes the key and the
//! request; `outpost enroll` installs what the fleet sends back. A rotation makes
//! `device.next.key`; enrolling its certificate swaps both in, and sync picks them up on its
//! next connect (see [`Security::reload_if_changed`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use outpost_shared::broker::BrokerUrl;
use outpost_shared::protocol::Seal;
use outpost_shared::signing::{SigningKey, VerifyingKey, pem_block};
use outpost_shared::tls::{TlsFiles, client_config_at};

use crate::clock::Clock;

/// Where the identity files live by default.
pub fn identity_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("identity")
}

/// What the operator gave on the command line.
#[derive(Debug, Clone, Default)]
pub struct IdentityOptions {
    /// CA of the broker's certificate.
    pub ca: Option<PathBuf>,
    /// This gateway's certificate.
    pub cert: Option<PathBuf>,
    /// This gateway's private key.
    pub key: Option<PathBuf>,
    /// The fleet's public signing key.
    pub fleet_key: Option<PathBuf>,
    /// Plain `mqtt://` to another machine is allowed.
    pub insecure_plaintext: bool,
    /// Messages are neither signed nor checked (protocol v1).
    pub insecure_unsigned: bool,
}

/// The resolved files of an identity.
#[derive(Debug, Clone)]
struct Files {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    fleet: PathBuf,
}

/// The agent's clock as rustls' time source: certificate dates are checked against the same
/// clock the journal stamps events with (and that tests can set to 1970).
struct AgentTime(Arc<dyn Clock>);

impl std::fmt::Debug for AgentTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentTime")
    }
}

impl rustls::time_provider::TimeProvider for AgentTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        Some(rustls::pki_types::UnixTime::since_unix_epoch(
            std::time::Duration::from_millis(self.0.now_ms()),
        ))
    }
}

/// What sync uses to talk securely; shared by its tasks, swapped on rotation.
#[derive(Debug)]
pub struct Security {
    files: Option<Files>,
    tls: bool,
    /// How messages are sealed (signed with the device key, or not at all).
    seal: RwLock<Seal>,
    /// The fleet's key; `None` under `--insecure-unsigned`.
    pub fleet: Option<VerifyingKey>,
    loaded: RwLock<Option<SystemTime>>,
    time: Arc<AgentTime>,
}

/// Why the identity cannot be used.
pub type IdentityError = String;

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Security {
    /// Resolves the options against the identity directory for a link to `url`.
    /// Certificates are checked against `clock`.
    pub fn resolve(
        data_dir: &Path,
        opts: &IdentityOptions,
        url: &BrokerUrl,
        clock: Arc<dyn Clock>,
    ) -> Result<Security, IdentityError> {
        outpost_shared::tls::check_plaintext(url, opts.insecure_plaintext, "--broker")?;
        let dir = identity_dir(data_dir);
        let pick = |given: &Option<PathBuf>, name: &str| given.clone().unwrap_or_else(|| dir.join(name));
        let files = Files {
            ca: pick(&opts.ca, "ca.crt"),
            cert: pick(&opts.cert, "device.crt"),
            key: pick(&opts.key, "device.key"),
            fleet: pick(&opts.fleet_key, "fleet.pub"),
        };
        let enroll_hint = "run `outpost keygen --device-id ID`, have the fleet sign the request \
                           (`outpost-cloud pki sign`), then `outpost enroll` (README, \"Securing a fleet\")";
        if opts.insecure_unsigned {
            tracing::warn!(
                "INSECURE: --insecure-unsigned: messages to and from the cloud are neither signed nor checked; \
                 anyone who can publish on the broker can command this gateway"
            );
        }
        if !url.tls {
            tracing::warn!(broker = %url.url(), "INSECURE: plain-text MQTT (no TLS): the link can be read and changed on the way");
        }
        let needs_files = url.tls || !opts.insecure_unsigned;
        if needs_files {
            for (what, path) in [("--key", &files.key), ("--fleet-key", &files.fleet)] {
                if !path.exists() && !opts.insecure_unsigned {
                    return Err(format!(
                        "{what} {}: missing; this gateway is not enrolled: {enroll_hint}",
                        path.display()
                    ));
                }
            }
            if url.tls {
                for (what, path) in [("--ca", &files.ca), ("--cert", &files.cert), ("--key", &files.key)] {
                    if !path.exists() {
                        return Err(format!(
                            "{what} {}: missing; this gateway is not enrolled: {enroll_hint}",
                            path.display()
                        ));
                    }
                }
            }
        }
        let (seal, fleet) = if opts.insecure_unsigned {
            (Seal::Unsigned, None)
        } else {
            let key =
                SigningKey::load(&files.key).map_err(|e| format!("--key: {e} (the device key must be Ed25519)"))?;
            let fleet = VerifyingKey::load(&files.fleet).map_err(|e| format!("--fleet-key: {e}"))?;
            (Seal::Signed(Arc::new(key)), Some(fleet))
        };
        let security = Security {
            files: needs_files.then_some(files),
            tls: url.tls,
            seal: RwLock::new(seal),
            fleet,
            loaded: RwLock::new(None),
            time: Arc::new(AgentTime(clock)),
        };
        if url.tls {
            security.tls_config()?;
        }
        *security.loaded.write().unwrap_or_else(|p| p.into_inner()) = security.stamp();
        Ok(security)
    }

    /// No TLS, no signatures: only what `SyncConfig::new` starts from (the CLI always resolves
    /// the real one).
    pub fn unsigned_plaintext() -> Security {
        Security {
            files: None,
            tls: false,
            seal: RwLock::new(Seal::Unsigned),
            fleet: None,
            loaded: RwLock::new(None),
            time: Arc::new(AgentTime(Arc::new(crate::clock::SystemClock))),
        }
    }

    /// What is insecure about this link, for the fleet view.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.tls {
            w.push("plain-text MQTT link (no TLS)".to_string());
        }
        if !self.seal().signs() {
            w.push(
                "unsigned messages (--insecure-unsigned): anyone on the broker can command this gateway".to_string(),
            );
        }
        w
    }

    /// True when the link is TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls
    }

    fn stamp(&self) -> Option<SystemTime> {
        let f = self.files.as_ref()?;
        [&f.cert, &f.key].into_iter().filter_map(|p| modified(p)).max()
    }

    /// The seal for what this gateway publishes now.
    pub fn seal(&self) -> Seal {
        self.seal.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The TLS client configuration (None for plain text).
    pub fn tls_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, IdentityError> {
        if !self.tls {
            return Ok(None);
        }
        let Some(f) = &self.files else { return Ok(None) };
        let files = TlsFiles {
            ca: f.ca.clone(),
            cert: Some(f.cert.clone()),
            key: Some(f.key.clone()),
        };
        client_config_at(&files, self.time.clone())
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// After a rotation installed a new certificate and key: the new TLS configuration to
    /// connect with next (and the new signing key from now on). `Ok(None)` when nothing changed.
    pub fn reload_if_changed(&self) -> Result<Option<Option<Arc<rustls::ClientConfig>>>, IdentityError> {
        let now = self.stamp();
        if now == *self.loaded.read().unwrap_or_else(|p| p.into_inner()) {
            return Ok(None);
        }
        let Some(f) = &self.files else { return Ok(None) };
        let tls = self.tls_config()?;
        if self.seal().signs() {
            let key = SigningKey::load(&f.key).map_err(|e| e.to_string())?;
            *self.seal.write().unwrap_or_else(|p| p.into_inner()) = Seal::Signed(Arc::new(key));
        }
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = now;
        Ok(Some(tls))
    }
}

use outpost_shared::signing::write_key_file as write_private;

/// A certificate signing request for `device_id` with this key (the fleet CA signs it; its
/// subject common name is the device id, which becomes the MQTT identity).
fn csr(device_id: &str, key_der: &[u8]) -> Result<String, IdentityError> {
    let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from(key_der.to_vec());
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
        .map_err(|e| format!("cannot use the key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, device_id);
    let req = params
        .serialize_request(&pair)
        .map_err(|e| format!("cannot make the signing request: {e}"))?;
    req.pem().map_err(|e| e.to_string())
}

/// What `keygen` made.
#[derive(Debug)]
pub struct KeygenOutcome {
    /// The request to send to the fleet (PEM).
    pub csr: String,
    /// Where the key is.
    pub key: PathBuf,
    /// Where the request is.
    pub csr_path: PathBuf,
}

/// Makes this gateway's key (or, with `rotate`, its next key) and a signing request for it.
/// Refuses to replace an existing key unless `rotate`.
pub fn keygen(data_dir: &Path, device_id: &str, rotate: bool) -> Result<KeygenOutcome, IdentityError> {
    if !outpost_shared::protocol::valid_device_id(device_id) {
        return Err(format!(
            "device id '{device_id}' must be 1-64 letters, digits, '-', '_' or '.'"
        ));
    }
    let dir = identity_dir(data_dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let name = if rotate { "device.next" } else { "device" };
    let key_path = dir.join(format!("{name}.key"));
    if !rotate && key_path.exists() {
        return Err(format!(
            "{} exists: this gateway already has a key (use --rotate to make its next one)",
            key_path.display()
        ));
    }
    let der = SigningKey::generate_pkcs8().map_err(|e| e.to_string())?;
    let request = csr(device_id, &der)?;
    write_private(&key_path, pem_block("PRIVATE KEY", &der).as_bytes(), 0o600)
        .map_err(|e| format!("cannot write {}: {e}", key_path.display()))?;
    let csr_path = dir.join(format!("{name}.csr"));
    write_private(&csr_path, request.as_bytes(), 0o644)
        .map_err(|e| format!("cannot write {}: {e}", csr_path.display()))?;
    Ok(KeygenOutcome {
        csr: request,
        key: key_path,
        csr_path,
    })
}

/// Installs what the fleet sent back: the certificate (for `device.key`, or for
/// `device.next.key` after a rotation, which then becomes `device.key`), and the fleet CA and
/// signing key when given. Returns what it did, for people.
pub fn enroll(
    data_dir: &Path,
    cert: &Path,
    ca: Option<&Path>,
    fleet_key: Option<&Path>,
) -> Result<Vec<String>, IdentityError> {
    let dir = identity_dir(data_dir);
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let cert_pem = read(cert)?;
    let certs = outpost_shared::tls::load_certs("certificate", cert).map_err(|e| e.to_string())?;
    let leaf = certs.first().ok_or("no certificate")?;
    let cert_key = spki_of(leaf.as_ref()).ok_or_else(|| format!("{}: not an Ed25519 certificate", cert.display()))?;
    let mut done = Vec::new();
    if let Some(ca) = ca {
        outpost_shared::tls::load_certs("--ca", ca).map_err(|e| e.to_string())?;
        write_private(&dir.join("ca.crt"), &read(ca)?, 0o644).map_err(|e| e.to_string())?;
        done.push(format!("fleet CA installed from {}", ca.display()));
    }
    if let Some(f) = fleet_key {
        let pem = read(f)?;
        VerifyingKey::from_pem(&pem, &f.display().to_string()).map_err(|e| e.to_string())?;
        write_private(&dir.join("fleet.pub"), &pem, 0o644).map_err(|e| e.to_string())?;
        done.push(format!("fleet signing key installed from {}", f.display()));
    }
    let current = dir.join("device.key");
    let next = dir.join("device.next.key");
    let matches = |p: &Path| SigningKey::load(p).is_ok_and(|k| k.public() == cert_key);
    if next.exists() && matches(&next) {
        // The certificate first, then the key: a crash between leaves the old pair, and the
        // next `enroll` finishes.
        write_private(&dir.join("device.next.crt"), &cert_pem, 0o644).map_err(|e| e.to_string())?;
        std::fs::rename(dir.join("device.next.crt"), dir.join("device.crt")).map_err(|e| e.to_string())?;
        std::fs::rename(&next, &current).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(dir.join("device.next.csr"));
        done.push("rotated: the new key and certificate are used from the next connect".into());
    } else if matches(&current) {
        write_private(&dir.join("device.crt"), &cert_pem, 0o644).map_err(|e| e.to_string())?;
        done.push(format!("certificate installed in {}", dir.join("device.crt").display()));
    } else {
        return Err(format!(
            "{} is not for this gateway's key ({}): was it signed from this gateway's request?",
            cert.display(),
            current.display()
        ));
    }
    Ok(done)
}

/// The Ed25519 public key of a DER certificate, found by its SubjectPublicKeyInfo prefix
/// (the certificate itself is checked by TLS; this only matches it to a key file).
fn spki_of(der: &[u8]) -> Option<VerifyingKey> {
    const PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    let at = der.windows(PREFIX.len()).position(|w| w == PREFIX)?;
    let spki = der.get(at..at + 44)?;
    VerifyingKey::from_spki(spki, "certificate").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_makes_a_private_key_and_refuses_to_overwrite_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = keygen(dir.path(), "gw-1", false).unwrap();
        assert!(
            out.csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{}",
            out.csr
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        SigningKey::load(&out.key).unwrap();
        let err = keygen(dir.path(), "gw-1", false).unwrap_err();
        assert!(err.contains("--rotate"), "{err}");
        assert!(
            keygen(dir.path(), "gw-1", true)
                .unwrap()
                .key
                .ends_with("device.next.key")
        );
        assert!(keygen(dir.path(), "bad/id", false).unwrap_err().contains("bad/id"));
    }

    fn system() -> Arc<dyn Clock> {
        Arc::new(crate::clock::SystemClock)
    }

    #[test]
    fn unenrolled_gateways_are_told_how_to_enroll() {
        let dir = tempfile::tempdir().unwrap();
        let url = BrokerUrl::parse("mqtts://broker.plant", "--broker").unwrap();
        let err = Security::resolve(dir.path(), &IdentityOptions::default(), &url, system()).unwrap_err();
        assert!(err.contains("outpost keygen") && err.contains("device.key"), "{err}");
        let plain = BrokerUrl::parse("mqtt://10.1.1.1", "--broker").unwrap();
        let err = Security::resolve(dir.path(), &IdentityOptions::default(), &plain, system()).unwrap_err();
        assert!(err.contains("--insecure-plaintext"), "{err}");
        let loopback = BrokerUrl::parse("mqtt://127.0.0.1", "--broker").unwrap();
        let insecure = IdentityOptions {
            insecure_unsigned: true,
            ..Default::default()
        };
        let s = Security::resolve(dir.path(), &insecure, &loopback, system()).unwrap();
        assert!(!s.seal().signs() && s.fleet.is_none());
    }
}
