//! The fleet's PKI, in one directory (`DATA_DIR/pki` by default), made with rcgen:
//!
//! | file | what |
//! |---|---|
//! | `ca.key`, `ca.crt` | the fleet CA: signs broker, service and gateway certificates, and the CRL |
//! | `broker.key`, `broker.crt` | the MQTT broker's server certificate |
//! | `cloud.key`, `cloud.crt` | cloud-sync's own client certificate (identity `outpost-cloud`) |
//! | `fleet.key`, `fleet.pub` | the fleet signing key: every order to a gateway carries its signature |
//! | `devices/ID.crt`, `devices/ID.pub` | a gateway's certificate and the key(s) its messages must be signed with |
//! | `revoked` | revoked device ids, one per line; `crl.pem` lists their certificates for brokers |
//!
//! Private keys are written 0600. Gateways make their own keys (`outpost keygen`); only their
//! requests and public keys come here. The running service reads `devices/` and `revoked` as
//! they change, so `pki sign` and `devices revoke` take effect without a restart.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use outpost_shared::signing::{SigningKey, VerifyingKey};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519, RevokedCertParams, SanType,
    SerialNumber,
};

/// The identity of cloud-sync's own MQTT client; no gateway may take it.
pub const CLOUD_IDENTITY: &str = "outpost-cloud";

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Certificate work failed.
    #[error("{0}")]
    Cert(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |e| PkiError::Cert(format!("{what}: {e}"))
}

/// Writes a file atomically with `mode`.
fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    outpost_shared::signing::write_key_file(path, bytes, mode).map_err(io(path))
}

fn read_string(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// A new Ed25519 key as rcgen wants it, and its PEM (PKCS#8 v1, which OpenSSL 3.0 reads).
fn new_key(what: &str) -> Result<(KeyPair, String), PkiError> {
    let der = SigningKey::generate_pkcs8().map_err(|e| PkiError::Cert(e.to_string()))?;
    let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from(der.clone());
    let pair = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &PKCS_ED25519).map_err(cert_err(what))?;
    Ok((pair, outpost_shared::signing::pem_block("PRIVATE KEY", &der)))
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn serial() -> SerialNumber {
    // Positive 16-byte serials, random: the CRL names certificates by them.
    let mut bytes: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// The fleet PKI directory.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

/// What `init` wrote, for people.
#[derive(Debug)]
pub struct InitReport {
    /// Files written.
    pub files: Vec<PathBuf>,
}

impl Pki {
    /// The PKI in `dir` (which may not exist yet).
    pub fn new(dir: impl Into<PathBuf>) -> Pki {
        Pki { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file of the PKI.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// True once `init` has run here.
    pub fn exists(&self) -> bool {
        self.file("ca.crt").exists() && self.file("fleet.key").exists()
    }

    fn ca(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        use rustls::pki_types::pem::PemObject;
        let path = self.file("ca.key");
        let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_file(&path)
            .map_err(|e| PkiError::Cert(format!("{}: {e}", path.display())))?;
        let key = KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ED25519).map_err(cert_err("ca.key"))?;
        Issuer::from_ca_cert_pem(&read_string(&self.file("ca.crt"))?, key).map_err(cert_err("ca.crt"))
    }

    /// Makes the fleet CA, the broker's and this service's certificates and the fleet signing
    /// key. `broker_names` are the host names and addresses the broker is reached by.
    /// Refuses to overwrite an existing PKI.
    pub fn init(&self, broker_names: &[String]) -> Result<InitReport, PkiError> {
        if self.file("ca.key").exists() {
            return Err(PkiError::Cert(format!(
                "{} already holds a fleet CA; a new one would strand every enrolled gateway",
                self.dir.display()
            )));
        }
        std::fs::create_dir_all(self.dir.join("devices")).map_err(io(&self.dir))?;
        let mut files = Vec::new();
        let (ca_key, ca_pem) = new_key("CA key")?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "Outpost fleet CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.not_before = now() - time::Duration::hours(1);
        ca.not_after = now() + time::Duration::days(20 * 365);
        ca.serial_number = Some(serial());
        let ca_cert = ca.self_signed(&ca_key).map_err(cert_err("CA certificate"))?;
        write(&self.file("ca.key"), ca_pem.as_bytes(), 0o600)?;
        write(&self.file("ca.crt"), ca_cert.pem().as_bytes(), 0o644)?;
        files.extend([self.file("ca.key"), self.file("ca.crt")]);
        let issuer = Issuer::new(ca, ca_key);

        let mut names: Vec<String> = broker_names.to_vec();
        for n in ["localhost", "127.0.0.1"] {
            if !names.iter().any(|x| x == n) {
                names.push(n.to_string());
            }
        }
        let (key, cert) = leaf(
            &issuer,
            "outpost-broker",
            &names,
            ExtendedKeyUsagePurpose::ServerAuth,
            2 * 365,
        )?;
        write(&self.file("broker.key"), key.as_bytes(), 0o600)?;
        write(&self.file("broker.crt"), cert.as_bytes(), 0o644)?;
        let (key, cert) = leaf(
            &issuer,
            CLOUD_IDENTITY,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            2 * 365,
        )?;
        write(&self.file("cloud.key"), key.as_bytes(), 0o600)?;
        write(&self.file("cloud.crt"), cert.as_bytes(), 0o644)?;
        files.extend(["broker.key", "broker.crt", "cloud.key", "cloud.crt"].map(|f| self.file(f)));

        let fleet = SigningKey::generate_pkcs8().map_err(|e| PkiError::Cert(e.to_string()))?;
        let public = SigningKey::from_pkcs8(&fleet, "fleet.key")
            .map_err(|e| PkiError::Cert(e.to_string()))?
            .public();
        write(
            &self.file("fleet.key"),
            outpost_shared::signing::pem_block("PRIVATE KEY", &fleet).as_bytes(),
            0o600,
        )?;
        write(&self.file("fleet.pub"), public.to_pem().as_bytes(), 0o644)?;
        files.extend([self.file("fleet.key"), self.file("fleet.pub")]);
        self.write_crl(&issuer, &[])?;
        files.push(self.file("crl.pem"));
        Ok(InitReport { files })
    }

    /// The fleet signing key.
    pub fn fleet_key(&self) -> Result<SigningKey, PkiError> {
        SigningKey::load(&self.file("fleet.key")).map_err(|e| PkiError::Cert(e.to_string()))
    }

    /// Signs a gateway's request: a client certificate whose subject is the device id (the
    /// request's common name), valid for `days`. Records the device's key for its messages,
    /// keeping the previous one so a rotation loses nothing in flight.
    pub fn sign(&self, csr_pem: &str, days: u32) -> Result<(String, String), PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Cert(format!("not a valid certificate signing request: {e}")))?;
        let id = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .and_then(|v| match v {
                rcgen::DnValue::Utf8String(s) => Some(s.clone()),
                rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_string()),
                _ => None,
            })
            .ok_or_else(|| PkiError::Cert("the request has no common name (the device id)".into()))?;
        if !outpost_shared::protocol::valid_device_id(&id) {
            return Err(PkiError::Cert(format!(
                "'{}' is not a device id (1-64 letters, digits, '-', '_', '.')",
                outpost_shared::protocol::quote(&id)
            )));
        }
        if id.starts_with(CLOUD_IDENTITY) || id == "outpost-broker" {
            return Err(PkiError::Cert(format!("'{id}' is reserved for the fleet service")));
        }
        if self.revoked()?.contains(&id) {
            return Err(PkiError::Cert(format!(
                "device {id} is revoked; enrol the replacement gateway under a new id"
            )));
        }
        let spki = csr_spki(&csr);
        let public = VerifyingKey::from_spki(&spki, "the request's key")
            .map_err(|_| PkiError::Cert("the request's key is not Ed25519 (make it with `outpost keygen`)".into()))?;
        let issuer = self.ca()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, id.as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = now() - time::Duration::hours(1);
        params.not_after = now() + time::Duration::days(i64::from(days));
        let serial = serial();
        params.serial_number = Some(serial.clone());
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = signed.signed_by(&issuer).map_err(cert_err("device certificate"))?;
        let devices = self.dir.join("devices");
        std::fs::create_dir_all(&devices).map_err(io(&devices))?;
        write(&devices.join(format!("{id}.crt")), cert.pem().as_bytes(), 0o644)?;
        // Serials of every certificate issued to the device, for revocation.
        let serials = devices.join(format!("{id}.serials"));
        let mut list = std::fs::read_to_string(&serials).unwrap_or_default();
        list.push_str(&hex(serial.as_ref()));
        list.push('\n');
        write(&serials, list.as_bytes(), 0o644)?;
        let mut keys = self.device_keys(&id);
        keys.retain(|k| *k != public);
        keys.push(public);
        let keep = keys.len().saturating_sub(2);
        let pem: String = keys.iter().skip(keep).map(VerifyingKey::to_pem).collect();
        write(&devices.join(format!("{id}.pub")), pem.as_bytes(), 0o644)?;
        Ok((id, cert.pem()))
    }

    /// Makes the client certificate of one more cloud-sync replica: identity `name` (which starts
    /// with `outpost-cloud-`), files `replicas/NAME.crt` and `replicas/NAME.key`. Each replica
    /// needs its own: the broker takes the certificate's name as the client id, and two clients
    /// with one id would keep taking each other's session.
    pub fn replica(&self, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        let rest = name.strip_prefix(CLOUD_IDENTITY).and_then(|r| r.strip_prefix('-'));
        if rest.is_none_or(str::is_empty) || !outpost_shared::protocol::valid_device_id(name) {
            return Err(PkiError::Cert(format!(
                "'{}' is not a replica name: outpost-cloud-SOMETHING (letters, digits, '-', '_', '.')",
                outpost_shared::protocol::quote(name)
            )));
        }
        let issuer = self.ca()?;
        let (key, cert) = leaf(&issuer, name, &[], ExtendedKeyUsagePurpose::ClientAuth, 2 * 365)?;
        let dir = self.dir.join("replicas");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let (k, c) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.crt")));
        write(&k, key.as_bytes(), 0o600)?;
        write(&c, cert.as_bytes(), 0o644)?;
        Ok((c, k))
    }

    /// Enrols the agent whose data directory is `agent_dir` (on this machine: the demo, the
    /// benchmarks) as a remote one would be: it makes its own key with `EXE keygen`, this PKI
    /// signs its request, `EXE enroll` installs the certificate, the CA and the fleet key.
    /// False when it was already enrolled in this fleet.
    pub fn enroll_local(&self, exe: &Path, agent_dir: &Path, id: &str) -> Result<bool, PkiError> {
        let identity = agent_dir.join("identity");
        let run = |args: &[&std::ffi::OsStr]| -> Result<(), PkiError> {
            let out = std::process::Command::new(exe)
                .arg("--data-dir")
                .arg(agent_dir)
                .args(args)
                .output()
                .map_err(io(exe))?;
            if !out.status.success() {
                return Err(PkiError::Cert(String::from_utf8_lossy(&out.stderr).trim().to_string()));
            }
            Ok(())
        };
        if !identity.join("device.key").exists() {
            run(&["keygen".as_ref(), "--device-id".as_ref(), id.as_ref()])?;
        }
        let fleet_pub = std::fs::read(self.file("fleet.pub")).unwrap_or_default();
        let installed = std::fs::read(identity.join("fleet.pub")).unwrap_or_default();
        if identity.join("device.crt").exists() && fleet_pub == installed && !self.device_keys(id).is_empty() {
            return Ok(false);
        }
        let csr = read_string(&identity.join("device.csr"))?;
        let (_, cert) = self.sign(&csr, 730)?;
        let cert_path = identity.join(format!("{id}.crt"));
        write(&cert_path, cert.as_bytes(), 0o644)?;
        run(&[
            "enroll".as_ref(),
            "--cert".as_ref(),
            cert_path.as_os_str(),
            "--ca".as_ref(),
            self.file("ca.crt").as_os_str(),
            "--fleet-key".as_ref(),
            self.file("fleet.pub").as_os_str(),
        ])?;
        Ok(true)
    }

    /// The keys a device's messages may be signed with (newest last; empty: not enrolled).
    pub fn device_keys(&self, id: &str) -> Vec<VerifyingKey> {
        let Ok(text) = std::fs::read(self.dir.join("devices").join(format!("{id}.pub"))) else {
            return Vec::new();
        };
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::SubjectPublicKeyInfoDer::pem_slice_iter(&text)
            .filter_map(Result::ok)
            .filter_map(|der| VerifyingKey::from_spki(der.as_ref(), id).ok())
            .collect()
    }

    /// The expiry (notAfter, ms since the epoch) of a device's certificate, for the console.
    pub fn device_expiry_ms(&self, id: &str) -> Option<u64> {
        let path = self.dir.join("devices").join(format!("{id}.crt"));
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_file(&path).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        u64::try_from(cert.validity().not_after.timestamp())
            .ok()
            .map(|s| s * 1000)
    }

    /// Revoked device ids.
    pub fn revoked(&self) -> Result<BTreeSet<String>, PkiError> {
        match std::fs::read_to_string(self.file("revoked")) {
            Ok(text) => Ok(text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
            Err(e) => Err(io(&self.file("revoked"))(e)),
        }
    }

    /// Revokes a device: cloud-sync refuses its messages from now on, and the CRL (for the
    /// broker) lists every certificate it was issued.
    pub fn revoke(&self, id: &str) -> Result<(), PkiError> {
        let mut revoked = self.revoked()?;
        revoked.insert(id.to_string());
        let text: String = revoked.iter().map(|r| format!("{r}\n")).collect();
        write(&self.file("revoked"), text.as_bytes(), 0o644)?;
        let mut serials = Vec::new();
        for r in &revoked {
            let path = self.dir.join("devices").join(format!("{r}.serials"));
            for line in std::fs::read_to_string(&path).unwrap_or_default().lines() {
                if let Some(bytes) = unhex(line.trim()) {
                    serials.push(SerialNumber::from_slice(&bytes));
                }
            }
        }
        self.write_crl(&self.ca()?, &serials)
    }

    fn write_crl(&self, issuer: &Issuer<'_, KeyPair>, serials: &[SerialNumber]) -> Result<(), PkiError> {
        let number = std::fs::read_to_string(self.file("crl.number"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        let params = CertificateRevocationListParams {
            this_update: now() - time::Duration::hours(1),
            next_update: now() + time::Duration::days(365),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: s.clone(),
                    revocation_time: now(),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(issuer).map_err(cert_err("revocation list"))?;
        write(
            &self.file("crl.pem"),
            crl.pem().map_err(cert_err("revocation list"))?.as_bytes(),
            0o644,
        )?;
        write(&self.file("crl.number"), number.to_string().as_bytes(), 0o644)
    }
}

/// A leaf certificate and its new key (both PEM) signed by the CA.
/// Makes `console.crt`/`console.key` if they are missing: the console's HTTPS certificate for
/// `names` (plus localhost and 127.0.0.1). ECDSA P-256 and self-signed: browsers accept neither
/// Ed25519 keys nor Ed25519-signed chains, so the fleet CA cannot vouch for it. Returns true
/// when it made them.
pub fn ensure_console_cert(dir: &Path, names: &[String]) -> Result<bool, PkiError> {
    let (crt, key_file) = (dir.join("console.crt"), dir.join("console.key"));
    if crt.exists() && key_file.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err("console key"))?;
    let mut all: Vec<String> = names.to_vec();
    for n in ["localhost", "127.0.0.1", "::1"] {
        if !all.iter().any(|x| x == n) {
            all.push(n.to_string());
        }
    }
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "Outpost console");
    params.subject_alt_names = all
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()
        .map_err(cert_err("console certificate"))?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = now() - time::Duration::hours(1);
    params.not_after = now() + time::Duration::days(825);
    params.serial_number = Some(serial());
    let cert = params.self_signed(&key).map_err(cert_err("console certificate"))?;
    write(&key_file, key.serialize_pem().as_bytes(), 0o600)?;
    write(&crt, cert.pem().as_bytes(), 0o644)?;
    Ok(true)
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
    days: i64,
) -> Result<(String, String), PkiError> {
    let (key, key_pem) = new_key(cn)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()
        .map_err(cert_err(cn))?;
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = now() - time::Duration::hours(1);
    params.not_after = now() + time::Duration::days(days);
    params.serial_number = Some(serial());
    let cert = params.signed_by(&key, issuer).map_err(cert_err(cn))?;
    Ok((key_pem, cert.pem()))
}

fn csr_spki(csr: &CertificateSigningRequestParams) -> Vec<u8> {
    use rcgen::PublicKeyData;
    let mut out = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    out.extend_from_slice(csr.public_key.der_bytes());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| text.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// The service's view of enrolled devices: their keys and the revocation list, read from the
/// PKI directory as it changes (at most once a second per device, so a flood of forged
/// messages costs no more than that in file reads).
#[derive(Debug)]
pub struct Keyring {
    pki: Pki,
    cache: Mutex<HashMap<String, (Vec<VerifyingKey>, Instant)>>,
    revoked: Mutex<(BTreeSet<String>, Option<SystemTime>, Instant)>,
}

/// How long a device's keys are trusted before the files are read again.
const KEYRING_REFRESH: Duration = Duration::from_secs(1);

/// What a device's message may be checked with.
#[derive(Debug, PartialEq, Eq)]
pub enum DeviceTrust {
    /// These keys.
    Keys(Vec<VerifyingKey>),
    /// Not enrolled: no key on file.
    Unknown,
    /// Revoked.
    Revoked,
}

impl Keyring {
    /// A keyring over the PKI.
    pub fn new(pki: Pki) -> Keyring {
        let stale = Instant::now().checked_sub(KEYRING_REFRESH).unwrap_or_else(Instant::now);
        Keyring {
            pki,
            cache: Mutex::new(HashMap::new()),
            revoked: Mutex::new((BTreeSet::new(), None, stale)),
        }
    }

    /// The PKI.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// True when the device is revoked (the list is re-read when its file changes).
    pub fn is_revoked(&self, id: &str) -> bool {
        let mut r = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        if r.2.elapsed() >= KEYRING_REFRESH {
            r.2 = Instant::now();
            let mtime = std::fs::metadata(self.pki.file("revoked"))
                .and_then(|m| m.modified())
                .ok();
            if mtime != r.1
                && let Ok(list) = self.pki.revoked()
            {
                r.0 = list;
                r.1 = mtime;
            }
        }
        r.0.contains(id)
    }

    /// The keys for a device's messages.
    pub fn trust(&self, id: &str) -> DeviceTrust {
        if self.is_revoked(id) {
            return DeviceTrust::Revoked;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = cache.get(id).filter(|(_, at)| at.elapsed() < KEYRING_REFRESH);
        let keys = match fresh {
            Some((keys, _)) => keys.clone(),
            None => {
                let keys = self.pki.device_keys(id);
                // Bounded: one entry per id seen, and ids are bounded by the device limit.
                if cache.len() > 100_000 {
                    cache.clear();
                }
                cache.insert(id.to_string(), (keys.clone(), Instant::now()));
                keys
            }
        };
        if keys.is_empty() {
            DeviceTrust::Unknown
        } else {
            DeviceTrust::Keys(keys)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str) -> (String, SigningKey) {
        let der = SigningKey::generate_pkcs8().unwrap();
        let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from(der.clone());
        let pair = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &PKCS_ED25519).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, id);
        let csr = params.serialize_request(&pair).unwrap().pem().unwrap();
        (csr, SigningKey::from_pkcs8(&der, "t").unwrap())
    }

    #[test]
    fn each_replica_gets_its_own_client_identity_and_gateways_cannot_take_one() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path().join("pki"));
        pki.init(&[]).unwrap();
        let (cert, key) = pki.replica("outpost-cloud-2").unwrap();
        let pem = std::fs::read_to_string(&cert).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let parsed = der.parse_x509().unwrap();
        let cn = parsed
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(cn, "outpost-cloud-2");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        for bad in ["outpost-cloud", "outpost-cloud-", "gw-1", "outpost-cloud-a/b"] {
            assert!(pki.replica(bad).is_err(), "{bad}");
        }
        let (csr, _) = request("outpost-cloud-3");
        assert!(pki.sign(&csr, 30).unwrap_err().to_string().contains("reserved"));
    }

    #[test]
    fn init_sign_rotate_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path().join("pki"));
        pki.init(&["broker.plant".into()]).unwrap();
        assert!(pki.exists());
        assert!(pki.init(&[]).unwrap_err().to_string().contains("already holds"));
        use std::os::unix::fs::PermissionsExt;
        for f in ["ca.key", "fleet.key", "broker.key", "cloud.key"] {
            let mode = std::fs::metadata(pki.file(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let (csr, key) = request("gw-1");
        let (id, cert) = pki.sign(&csr, 30).unwrap();
        assert_eq!(id, "gw-1");
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(pki.device_keys("gw-1"), vec![key.public()]);
        assert!(pki.device_expiry_ms("gw-1").unwrap() > 1_767_225_600_000);
        // A rotation keeps the previous key for what is in flight; a third drops the oldest.
        let (csr2, key2) = request("gw-1");
        pki.sign(&csr2, 30).unwrap();
        assert_eq!(pki.device_keys("gw-1"), vec![key.public(), key2.public()]);
        let (csr3, key3) = request("gw-1");
        pki.sign(&csr3, 30).unwrap();
        assert_eq!(pki.device_keys("gw-1"), vec![key2.public(), key3.public()]);

        let ring = Keyring::new(pki.clone());
        assert!(matches!(ring.trust("gw-1"), DeviceTrust::Keys(k) if k.len() == 2));
        assert_eq!(ring.trust("gw-2"), DeviceTrust::Unknown);
        pki.revoke("gw-1").unwrap();
        let ring = Keyring::new(pki.clone());
        assert_eq!(ring.trust("gw-1"), DeviceTrust::Revoked);
        assert!(
            pki.sign(&request("gw-1").0, 30)
                .unwrap_err()
                .to_string()
                .contains("revoked")
        );
        assert!(
            pki.sign(&request(CLOUD_IDENTITY).0, 30)
                .unwrap_err()
                .to_string()
                .contains("reserved")
        );
        assert!(
            pki.sign("garbage", 30)
                .unwrap_err()
                .to_string()
                .contains("signing request")
        );
        assert!(read_string(&pki.file("crl.pem")).unwrap().contains("BEGIN X509 CRL"));
    }
}
