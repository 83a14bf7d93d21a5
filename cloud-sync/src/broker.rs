//! The embedded MQTT broker (rumqttd) for the zero-install default, behind a TLS gate.
//!
//! rumqttd listens on a loopback port that takes only a per-process secret password; clients
//! reach it through the gate, which requires a client certificate from the fleet CA (not on
//! the CRL), takes the certificate's common name as the identity, and checks every packet the
//! client sends against [`crate::acl::Rules`]: the client id must be the identity, and a
//! gateway publishes and subscribes only in its own subtree, in the right direction. A refused
//! packet closes the connection and is logged and counted. The gate then writes the identity
//! and the secret into the CONNECT it passes on. In-memory only: fine for a demo, tests and a
//! small site; a production fleet uses Mosquitto, EMQX or HiveMQ with the same rules.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::acl::{GateStats, Identity, Packet, Refusal, Rules};

/// How the embedded broker is reached.
#[derive(Debug, Clone)]
pub enum Listen {
    /// TLS with client certificates through the gate (the default).
    Tls {
        /// Where clients connect.
        addr: SocketAddr,
        /// The server configuration (client certificates required).
        config: Arc<rustls::ServerConfig>,
        /// The topic prefix the rules apply to.
        prefix: String,
        /// The identity of cloud-sync's own client.
        service: String,
    },
    /// `--insecure-plaintext`: rumqttd directly, anyone may connect and publish anywhere.
    Plain(SocketAddr),
}

/// A running embedded broker.
#[derive(Debug, Clone)]
pub struct Running {
    /// Where cloud-sync's own client connects (the gate, or rumqttd in plain mode).
    pub addr: SocketAddr,
    /// Gate counters.
    pub stats: Arc<GateStats>,
}

fn rumqttd_config(listen: SocketAddr, auth: Option<HashMap<String, String>>) -> Config {
    let server = ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            // Larger packets are refused at the door: the publisher is disconnected, nobody
            // downstream receives them.
            max_payload_size: outpost_shared::protocol::MAX_PACKET_BYTES,
            max_inflight_count: 200,
            auth,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        ..Config::default()
    }
}

fn spawn_rumqttd(config: Config) -> Result<(), String> {
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Starts the broker (and its gate, for TLS) in the background.
pub async fn start(listen: Listen) -> Result<Running, String> {
    match listen {
        Listen::Plain(addr) => {
            // Fail early with a clear message if the port is taken (rumqttd would only log it).
            std::net::TcpListener::bind(addr).map_err(|e| format!("embedded broker cannot listen on {addr}: {e}"))?;
            spawn_rumqttd(rumqttd_config(addr, None))?;
            wait_listening(addr, None).await?;
            Ok(Running {
                addr,
                stats: Arc::default(),
            })
        }
        Listen::Tls {
            addr,
            config,
            prefix,
            service,
        } => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("embedded broker cannot listen on {addr}: {e}"))?;
            let inner = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("embedded broker: no loopback port: {e}"))?;
            let secret: String = (0..32).map(|_| fastrand::alphanumeric()).collect();
            // rumqttd checks username/password pairs; the gate writes each identity's with the
            // secret, so nobody on this machine reaches rumqttd around the gate.
            let auth = Arc::new(Secret(secret));
            let mut cfg = rumqttd_config(inner, None);
            if let Some(servers) = cfg.v4.as_mut() {
                for s in servers.values_mut() {
                    let secret = auth.clone();
                    s.set_auth_handler(move |_client, _user, pass: String| {
                        let ok = pass == secret.0;
                        async move { ok }
                    });
                }
            }
            spawn_rumqttd(cfg)?;
            wait_listening(inner, Some(&auth.0)).await?;
            let stats = Arc::new(GateStats::default());
            let gate = Gate {
                acceptor: tokio_rustls::TlsAcceptor::from(config),
                rules: Rules::new(&prefix),
                service,
                inner,
                secret: auth,
                stats: stats.clone(),
            };
            tokio::spawn(Arc::new(gate).serve(listener));
            Ok(Running { addr, stats })
        }
    }
}

/// Waits until rumqttd (started on its own thread) accepts connections, so this service's own
/// first connect is not refused and logged as a lost connection on every start. The probe is a
/// whole MQTT session (CONNECT, CONNACK, close): a bare TCP connect that closes at once is
/// logged by rumqttd as a failed connect.
async fn wait_listening(addr: SocketAddr, password: Option<&str>) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let e = match tokio::time::timeout(Duration::from_secs(2), probe(addr, password)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no CONNACK within 2 s".to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("embedded broker did not start listening on {addr}: {e}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One MQTT 3.1.1 session that connects and leaves at once.
async fn probe(addr: SocketAddr, password: Option<&str>) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let field = |out: &mut Vec<u8>, s: &[u8]| {
        out.extend_from_slice(&u16::try_from(s.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(s);
    };
    let mut body = Vec::new();
    field(&mut body, b"MQTT");
    // Level 4; clean session, plus user name and password when rumqttd checks them.
    body.push(4);
    body.push(if password.is_some() { 0xC2 } else { 0x02 });
    body.extend_from_slice(&10u16.to_be_bytes());
    field(&mut body, b"outpost-cloud-probe");
    if let Some(p) = password {
        field(&mut body, b"outpost-cloud-probe");
        field(&mut body, p.as_bytes());
    }
    let len = u8::try_from(body.len()).map_err(|_| std::io::Error::other("probe too long"))?;
    let mut packet = vec![0x10, len];
    packet.extend_from_slice(&body);
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(&packet).await?;
    let mut ack = [0u8; 4];
    tcp.read_exact(&mut ack).await?;
    if ack[0] != 0x20 || ack[3] != 0 {
        return Err(std::io::Error::other(format!("CONNACK {ack:02x?}")));
    }
    // Leaves by closing the connection: rumqttd 0.20 logs a DISCONNECT followed by the close as
    // an error about a connection already gone.
    Ok(())
}

struct Secret(String);

struct Gate {
    acceptor: tokio_rustls::TlsAcceptor,
    rules: Rules,
    service: String,
    inner: SocketAddr,
    secret: Arc<Secret>,
    stats: Arc<GateStats>,
}

impl Gate {
    async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "embedded broker: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let gate = self.clone();
            tokio::spawn(async move {
                if let Err(why) = gate.connection(tcp).await {
                    warn!(%peer, reason = %why, "embedded broker refused a connection");
                }
            });
        }
    }

    async fn connection(&self, tcp: TcpStream) -> Result<(), String> {
        let _ = tcp.set_nodelay(true);
        let handshake = tokio::time::timeout(std::time::Duration::from_secs(10), self.acceptor.accept(tcp)).await;
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.stats.handshakes.fetch_add(1, Ordering::Relaxed);
                return Err(format!("TLS handshake failed: {e}"));
            }
            Err(_) => {
                self.stats.handshakes.fetch_add(1, Ordering::Relaxed);
                return Err("TLS handshake timed out".into());
            }
        };
        let name = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| common_name(c.as_ref()))
            .ok_or("the client certificate has no common name")?;
        let identity = if name == self.service {
            Identity::Service
        } else if outpost_shared::protocol::valid_device_id(&name) {
            Identity::Device(name.clone())
        } else {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
            return Err(format!(
                "certificate name '{}' is not a device id",
                outpost_shared::protocol::quote(&name)
            ));
        };
        let upstream = TcpStream::connect(self.inner)
            .await
            .map_err(|e| format!("embedded broker unreachable: {e}"))?;
        let _ = upstream.set_nodelay(true);
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let (mut client_rx, mut client_tx) = tokio::io::split(tls);
        let (mut up_rx, mut up_tx) = upstream.into_split();
        let down = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut up_rx, &mut client_tx).await;
            let _ = client_tx.shutdown().await;
        });
        let result = self
            .client_to_broker(&identity, &name, &mut client_rx, &mut up_tx)
            .await;
        let _ = up_tx.shutdown().await;
        down.abort();
        if let Err(r) = &result {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
            return Err(format!("{name}: {r}"));
        }
        Ok(())
    }

    /// Reads the client's packets, checks each, and passes it on; returns when the client
    /// closes, or with the refusal that closed it.
    async fn client_to_broker<R: AsyncReadExt + Unpin>(
        &self,
        identity: &Identity,
        name: &str,
        rx: &mut R,
        tx: &mut tokio::net::tcp::OwnedWriteHalf,
    ) -> Result<(), Refusal> {
        let max = outpost_shared::protocol::MAX_PACKET_BYTES;
        let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        let mut connected = false;
        loop {
            while let Some(len) = crate::acl::frame(&buf, max)? {
                let packet: Vec<u8> = buf.drain(..len).collect();
                let parsed = crate::acl::parse(&packet)?;
                match (&parsed, connected) {
                    (Packet::Connect { .. }, true) => return Err(Refusal::Protocol("a second CONNECT")),
                    (Packet::Connect { .. }, false) => {}
                    (_, false) => return Err(Refusal::Protocol("the first packet is not CONNECT")),
                    _ => {}
                }
                self.rules.check(identity, &parsed)?;
                let out = if let Packet::Connect { .. } = parsed {
                    connected = true;
                    info!(identity = name, "embedded broker: client connected");
                    rewrite_connect(&packet, name, &self.secret.0)?
                } else {
                    packet
                };
                if tx.write_all(&out).await.is_err() {
                    return Ok(());
                }
            }
            match rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
            }
        }
    }
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// The CONNECT packet with `user` and `password` in place of whatever the client sent.
fn rewrite_connect(packet: &[u8], user: &str, password: &str) -> Result<Vec<u8>, Refusal> {
    let bad = Refusal::Malformed("CONNECT");
    let header = crate::acl::header_len(packet)?;
    let body = packet.get(header..).ok_or(bad.clone())?;
    let field = |at: usize| -> Result<usize, Refusal> {
        let hi = *body.get(at).ok_or(bad.clone())?;
        let lo = *body.get(at + 1).ok_or(bad.clone())?;
        Ok(at + 2 + (usize::from(hi) << 8 | usize::from(lo)))
    };
    let after_name = field(0)?;
    let flags_at = after_name + 1;
    let flags = *body.get(flags_at).ok_or(bad.clone())?;
    let payload_at = flags_at + 3;
    let mut end = field(payload_at)?; // client id
    if flags & 0x04 != 0 {
        end = field(end)?; // will topic
        end = field(end)?; // will message
    }
    if end > body.len() {
        return Err(bad);
    }
    let mut out_body = Vec::with_capacity(end + user.len() + password.len() + 4);
    out_body.extend_from_slice(body.get(..flags_at).ok_or(bad.clone())?);
    out_body.push((flags & 0x3f) | 0xc0);
    out_body.extend_from_slice(body.get(flags_at + 1..end).ok_or(bad.clone())?);
    for s in [user, password] {
        let len = u16::try_from(s.len()).map_err(|_| bad.clone())?;
        out_body.extend_from_slice(&len.to_be_bytes());
        out_body.extend_from_slice(s.as_bytes());
    }
    let mut out = vec![0x10];
    let mut len = out_body.len();
    loop {
        let mut b = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend(out_body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_gets_the_identity_and_secret() {
        // CONNECT 3.1.1, clean session, will flag, client id "gw", will "t"/"m", username "evil".
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x86, 0, 30];
        for s in ["gw", "t", "m", "evil"] {
            body.extend_from_slice(&(s.len() as u16).to_be_bytes());
            body.extend_from_slice(s.as_bytes());
        }
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        let out = rewrite_connect(&p, "gw", "s3cret").unwrap();
        assert_eq!(
            crate::acl::parse(&out).unwrap(),
            Packet::Connect {
                level: 4,
                client_id: "gw".into(),
                will_topic: Some("t".into())
            }
        );
        let tail: Vec<u8> = [&[0u8, 2][..], b"gw", &[0, 6], b"s3cret"].concat();
        assert!(out.ends_with(&tail), "{out:?}");
        assert_eq!(out[9] & 0xc0, 0xc0);
        assert!(rewrite_connect(&[0x10, 2, 0, 9], "a", "b").is_err());
    }
}
