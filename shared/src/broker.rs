//! Broker addresses as users write them (`mqtt://HOST:PORT`, `mqtts://HOST:PORT`), shared by the
//! agent's sync and triggers and by cloud-sync, so every option takes the same forms.

/// A parsed broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address.
    pub host: String,
    /// Port (1883 by default, 8883 with TLS).
    pub port: u16,
    /// `mqtts://` (or `ssl://`): TLS.
    pub tls: bool,
}

impl BrokerUrl {
    /// Parses `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]`; `what` names the option in errors.
    pub fn parse(url: &str, what: &str) -> Result<BrokerUrl, String> {
        let (tls, rest) = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (false, rest),
            Some(("mqtts" | "ssl", rest)) => (true, rest),
            Some((scheme, _)) => {
                return Err(format!(
                    "{what} {url}: scheme '{scheme}' is not an MQTT broker (use mqtt://HOST:PORT or mqtts://HOST:PORT)"
                ));
            }
            // A bare HOST:PORT used to mean mqtt://; it is refused so that a typo or an http://
            // URL pasted without its scheme fails at start instead of being retried forever.
            None => {
                return Err(format!(
                    "{what} {url}: no scheme (write mqtts://{url} for TLS, or mqtt://{url})"
                ));
            }
        };
        let default_port = if tls { 8883 } else { 1883 };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 literal in brackets keeps its colons.
            Some((h, p)) if !p.contains(']') => (
                h,
                p.parse().map_err(|_| format!("'{p}' in {what} {url} is not a port"))?,
            ),
            _ => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') || host.contains('@') {
            return Err(format!("{what} {url} names no host"));
        }
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
            tls,
        })
    }

    /// The address as `mqtt(s)://HOST:PORT`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_named() {
        let u = BrokerUrl::parse("mqtt://10.0.0.2:1884", "--broker").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("10.0.0.2", 1884, false));
        assert_eq!(BrokerUrl::parse("mqtt://broker", "--broker").unwrap().port, 1883);
        assert!(
            BrokerUrl::parse("broker:1883", "--broker")
                .unwrap_err()
                .contains("--broker broker:1883: no scheme (write mqtts://broker:1883")
        );
        let t = BrokerUrl::parse("mqtts://broker.plant", "--broker").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("broker.plant", 8883, true));
        assert_eq!(t.url(), "mqtts://broker.plant:8883");
        assert!(
            BrokerUrl::parse("mqtt://h:port", "--broker")
                .unwrap_err()
                .contains("'port' in --broker mqtt://h:port is not a port")
        );
        assert!(
            BrokerUrl::parse("http://x:80", "--broker")
                .unwrap_err()
                .contains("scheme 'http'")
        );
        assert!(
            BrokerUrl::parse("mqtt://:1883", "--broker")
                .unwrap_err()
                .contains("names no host")
        );
        assert_eq!(BrokerUrl::parse("mqtt://[::1]:1884", "--broker").unwrap().host, "::1");
    }
}
