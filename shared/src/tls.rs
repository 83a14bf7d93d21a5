//! TLS for the MQTT links (rustls on the ring provider): the client side both binaries use, the
//! server side of the embedded broker, and the rule about plain text.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// The earliest wall-clock time (2026-01-01 UTC, in seconds) taken as plausible. A gateway
/// without a battery-backed clock boots at 1970 and every certificate would look not yet valid:
/// until its clock passes this (NTP, GPS, an operator), the agent does not connect and says why.
pub const PLAUSIBLE_CLOCK_SECS: u64 = 1_767_225_600;

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("{what} {path}: {reason}")]
    File {
        /// Which option or role (`--ca`, `--cert`, …).
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the material.
    #[error("TLS setup: {0}")]
    Config(String),
}

/// PEM files for one side of a TLS link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) that sign the peer's certificate.
    pub ca: PathBuf,
    /// This side's certificate chain (client authentication on a client).
    pub cert: Option<PathBuf>,
    /// This side's private key.
    pub key: Option<PathBuf>,
}

fn file_err(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The certificates of a PEM file (at least one).
pub fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(what, path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(what, path, e))?;
    if certs.is_empty() {
        return Err(file_err(what, path, "no certificate in it (PEM expected)"));
    }
    Ok(certs)
}

fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(what, path, format!("no private key ({e})")))
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs("--ca", ca)? {
        roots.add(c).map_err(|e| file_err("--ca", ca, e))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration: the broker's certificate must chain to `files.ca` and name the host
/// dialled; with `cert` and `key`, this side authenticates with them.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_at(files, Arc::new(rustls::time_provider::DefaultTimeProvider))
}

/// [`client_config`] checking certificate dates against `time` instead of the system clock:
/// the agent passes its own clock, so what it journals and what it trusts agree.
pub fn client_config_at(
    files: &TlsFiles,
    time: Arc<dyn rustls::time_provider::TimeProvider>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_details(provider(), time)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(&files.ca)?);
    let config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs("--cert", cert)?, load_key("--key", key)?)
            .map_err(|e| file_err("--cert/--key", cert, e))?,
        (None, None) => builder.with_no_client_auth(),
        (Some(c), None) | (None, Some(c)) => {
            return Err(file_err("--cert/--key", c, "give both --cert and --key, or neither"));
        }
    };
    Ok(Arc::new(config))
}

/// A server configuration that requires a client certificate chaining to `ca` and not revoked
/// by `crl` (when it exists).
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    crl: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider());
    if let Some(crl) = crl.filter(|p| p.exists()) {
        let list: Vec<_> = CertificateRevocationListDer::pem_file_iter(crl)
            .map_err(|e| file_err("revocation list", crl, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err("revocation list", crl, e))?;
        verifier = verifier.with_crls(list);
    }
    let verifier = verifier.build().map_err(|e| TlsError::Config(e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs("server certificate", cert)?, load_key("server key", key)?)
        .map_err(|e| file_err("server certificate", cert, e))?;
    Ok(Arc::new(config))
}

/// A server configuration for browsers and API clients: no client certificate (they sign in),
/// HTTP/1.1 by ALPN.
pub fn web_server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(load_certs("HTTPS certificate", cert)?, load_key("HTTPS key", key)?)
        .map_err(|e| file_err("HTTPS certificate", cert, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// True for `localhost` and loopback addresses.
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The plain-text rule: `mqtt://` is refused to anything but loopback unless the operator
/// said `--insecure-plaintext`. `what` names the option in the error.
pub fn check_plaintext(url: &crate::broker::BrokerUrl, insecure: bool, what: &str) -> Result<(), String> {
    if url.tls || insecure || is_loopback(&url.host) {
        return Ok(());
    }
    Err(format!(
        "{what} {}: plain-text MQTT to another machine is refused (anyone on the path reads and changes it); \
         use mqtts:// with --ca/--cert/--key, or give --insecure-plaintext to accept the risk",
        url.url()
    ))
}

/// True once the wall clock is plausible (see [`PLAUSIBLE_CLOCK_SECS`]).
pub fn clock_plausible(now_secs: u64) -> bool {
    now_secs >= PLAUSIBLE_CLOCK_SECS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BrokerUrl;

    #[test]
    fn plaintext_only_to_loopback_unless_insecure() {
        let url = |u| BrokerUrl::parse(u, "--broker").unwrap();
        assert!(check_plaintext(&url("mqtt://127.0.0.1:1883"), false, "--broker").is_ok());
        assert!(check_plaintext(&url("mqtt://localhost"), false, "--broker").is_ok());
        assert!(check_plaintext(&url("mqtt://[::1]:1883"), false, "--broker").is_ok());
        let err = check_plaintext(&url("mqtt://10.0.0.2:1883"), false, "--broker").unwrap_err();
        assert!(
            err.contains("--insecure-plaintext") && err.contains("10.0.0.2"),
            "{err}"
        );
        assert!(check_plaintext(&url("mqtt://10.0.0.2:1883"), true, "--broker").is_ok());
        assert!(check_plaintext(&url("mqtts://broker.plant"), false, "--broker").is_ok());
    }

    #[test]
    fn the_clock_rule() {
        assert!(!clock_plausible(0));
        assert!(!clock_plausible(PLAUSIBLE_CLOCK_SECS - 1));
        assert!(clock_plausible(PLAUSIBLE_CLOCK_SECS));
    }

    /// A TLS 1.3 handshake in memory between a server with `cert` and a client built by
    /// `client_config_at(time)`; the client's error, if any.
    fn handshake_at(dir: &Path, secs: u64) -> Result<(), rustls::Error> {
        let time = Arc::new(Fixed(rustls::pki_types::UnixTime::since_unix_epoch(
            std::time::Duration::from_secs(secs),
        )));
        let files = TlsFiles {
            ca: dir.join("ca.crt"),
            cert: None,
            key: None,
        };
        let client = client_config_at(&files, time).unwrap();
        let server = web_server_config(&dir.join("ca.crt"), &dir.join("ca.key")).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            if s.process_new_packets().is_err() {
                break;
            }
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
    }

    #[derive(Debug)]
    struct Fixed(rustls::pki_types::UnixTime);

    impl rustls::time_provider::TimeProvider for Fixed {
        fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
            Some(self.0)
        }
    }

    #[test]
    fn certificate_dates_are_checked_against_the_clock_given() {
        // rcgen's default validity: 1975-01-01 to 4096-01-01.
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("ca.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("ca.key"), key.serialize_pem()).unwrap();
        assert!(handshake_at(dir.path(), PLAUSIBLE_CLOCK_SECS).is_ok());
        let at_1970 = handshake_at(dir.path(), 86_400).unwrap_err();
        assert!(format!("{at_1970:?}").contains("NotValidYet"), "{at_1970:?}");
        let expired = handshake_at(dir.path(), 130_000_000_000).unwrap_err(); // year 6089
        assert!(format!("{expired:?}").contains("Expired"), "{expired:?}");
    }

    #[test]
    fn missing_files_are_named() {
        let files = TlsFiles {
            ca: "/nonexistent/ca.crt".into(),
            cert: None,
            key: None,
        };
        let err = client_config(&files).unwrap_err().to_string();
        assert!(err.contains("--ca /nonexistent/ca.crt"), "{err}");
    }
}
