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
    let builder = rustls::ClientConfig::builder_with_provider(provider())
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
