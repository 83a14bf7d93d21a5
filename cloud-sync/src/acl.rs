//! Who may publish and subscribe where: one rule set, enforced by the embedded broker's TLS
//! gate (on the MQTT 3.1.1 packets a client sends) and written out as a Mosquitto ACL file.
//!
//! A gateway, identified by its certificate's common name D, may publish only on its own
//! up channels (`PREFIX/v1/D/{birth,death,events,cmd-result,reported,inventory}`), subscribe only
//! to its own down channels (`PREFIX/v1/D/{ack,cmd,desired}`, no wildcards), must connect with
//! client id D, and its will must be its own death topic. cloud-sync's identity may do anything
//! under the prefix. Everything else is refused.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)
)]

use outpost_shared::protocol::{Channel, Topics};

/// Refusals at the embedded broker's gate.
#[derive(Debug, Default)]
pub struct GateStats {
    /// TLS handshakes that failed (no, wrong, expired or revoked certificate; plain text).
    pub handshakes: std::sync::atomic::AtomicU64,
    /// Connections closed for a packet the rules refuse.
    pub denied: std::sync::atomic::AtomicU64,
    /// Connections accepted.
    pub accepted: std::sync::atomic::AtomicU64,
}

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// cloud-sync itself.
    Service,
    /// A gateway.
    Device(String),
}

/// The first packets of a client's byte stream, as far as the rules need them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT: the client id and the will topic.
    Connect {
        /// Protocol level (4 for MQTT 3.1.1).
        level: u8,
        /// Client id.
        client_id: String,
        /// Will topic, if a will is set.
        will_topic: Option<String>,
    },
    /// PUBLISH to a topic.
    Publish {
        /// Topic.
        topic: String,
    },
    /// SUBSCRIBE to filters.
    Subscribe {
        /// Filters.
        filters: Vec<String>,
    },
    /// Anything else (acks, pings, disconnect): always allowed after CONNECT.
    Other,
}

/// Why a packet is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not MQTT 3.1.1 as this gate reads it.
    #[error("malformed MQTT packet: {0}")]
    Malformed(&'static str),
    /// Larger than the protocol allows.
    #[error("packet of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The first packet was not CONNECT, or CONNECT came twice.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// The client id is not the certificate's identity.
    #[error("client id '{client_id}' is not this certificate's identity '{identity}'")]
    ClientId {
        /// What it said.
        client_id: String,
        /// What its certificate says.
        identity: String,
    },
    /// Not allowed by the rules.
    #[error("{identity} may not {action} '{topic}'")]
    Denied {
        /// Who.
        identity: String,
        /// publish / subscribe to / set its will on.
        action: &'static str,
        /// Where.
        topic: String,
    },
}

/// Splits one packet off the front of `buf`: `Ok(None)` when more bytes are needed, else the
/// packet's length. Refuses a remaining length over `max`.
pub fn frame(buf: &[u8], max: usize) -> Result<Option<usize>, Refusal> {
    let mut len: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else { return Ok(None) };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if len > max {
                return Err(Refusal::TooLarge(len));
            }
            return Ok(Some(1 + i + 1 + len));
        }
    }
    Err(Refusal::Malformed("remaining length longer than 4 bytes"))
}

/// A reader over a packet's variable header and payload.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, Refusal> {
        let (&b, rest) = self.rest.split_first().ok_or(Refusal::Malformed("packet ends early"))?;
        self.rest = rest;
        Ok(b)
    }
    fn u16(&mut self) -> Result<u16, Refusal> {
        Ok(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], Refusal> {
        let n = usize::from(self.u16()?);
        let (b, rest) = self
            .rest
            .split_at_checked(n)
            .ok_or(Refusal::Malformed("field runs past the packet"))?;
        self.rest = rest;
        Ok(b)
    }
    fn string(&mut self) -> Result<String, Refusal> {
        std::str::from_utf8(self.bytes()?)
            .map(str::to_string)
            .map_err(|_| Refusal::Malformed("string is not UTF-8"))
    }
}

/// The length of a whole packet's fixed header (type byte and remaining length).
pub fn header_len(packet: &[u8]) -> Result<usize, Refusal> {
    let len_bytes = packet
        .iter()
        .skip(1)
        .take(4)
        .position(|b| b & 0x80 == 0)
        .ok_or(Refusal::Malformed("bad remaining length"))?;
    Ok(1 + len_bytes + 1)
}

/// Reads what the rules need from one whole packet (as [`frame`] cut it).
pub fn parse(packet: &[u8]) -> Result<Packet, Refusal> {
    let (&first, _) = packet.split_first().ok_or(Refusal::Malformed("empty packet"))?;
    let header = header_len(packet)?;
    let mut r = Reader {
        rest: packet.get(header..).unwrap_or(&[]),
    };
    match first >> 4 {
        1 => {
            let name = r.bytes()?;
            if name != b"MQTT" && name != b"MQIsdp" {
                return Err(Refusal::Malformed("not an MQTT CONNECT"));
            }
            let level = r.u8()?;
            let flags = r.u8()?;
            let _keep_alive = r.u16()?;
            if level == 5 {
                return Err(Refusal::Protocol(
                    "MQTT 5 is not served by the embedded broker; use 3.1.1",
                ));
            }
            let client_id = r.string()?;
            let will_topic = if flags & 0x04 != 0 { Some(r.string()?) } else { None };
            Ok(Packet::Connect {
                level,
                client_id,
                will_topic,
            })
        }
        3 => Ok(Packet::Publish { topic: r.string()? }),
        8 => {
            let _id = r.u16()?;
            let mut filters = Vec::new();
            while !r.rest.is_empty() {
                filters.push(r.string()?);
                let _options = r.u8()?;
            }
            if filters.is_empty() {
                return Err(Refusal::Malformed("SUBSCRIBE without a filter"));
            }
            Ok(Packet::Subscribe { filters })
        }
        _ => Ok(Packet::Other),
    }
}

/// The rules for one prefix.
#[derive(Debug, Clone)]
pub struct Rules {
    topics: Topics,
    prefix: String,
}

impl Rules {
    /// Rules for the topic tree under `prefix`.
    pub fn new(prefix: &str) -> Rules {
        Rules {
            topics: Topics::new(prefix),
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    fn own(&self, device: &str, topic: &str, up: bool) -> bool {
        matches!(self.topics.parse(topic), Some((d, ch)) if d == device && ch.is_up() == up)
    }

    fn under_prefix(&self, topic: &str) -> bool {
        topic
            .strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Checks one packet of a connection whose certificate says `identity`.
    pub fn check(&self, identity: &Identity, packet: &Packet) -> Result<(), Refusal> {
        let deny = |action, topic: &str| {
            let who = match identity {
                Identity::Service => "the service".to_string(),
                Identity::Device(d) => format!("device {d}"),
            };
            Err(Refusal::Denied {
                identity: who,
                action,
                topic: outpost_shared::protocol::quote(topic),
            })
        };
        match (identity, packet) {
            (_, Packet::Other) => Ok(()),
            (Identity::Service, Packet::Connect { .. }) => Ok(()),
            (Identity::Service, Packet::Publish { topic }) if self.under_prefix(topic) => Ok(()),
            (Identity::Service, Packet::Publish { topic }) => deny("publish on", topic),
            (Identity::Service, Packet::Subscribe { filters }) => {
                match filters.iter().find(|f| !self.under_prefix(f)) {
                    Some(f) => deny("subscribe to", f),
                    None => Ok(()),
                }
            }
            (
                Identity::Device(d),
                Packet::Connect {
                    client_id, will_topic, ..
                },
            ) => {
                if client_id != d {
                    return Err(Refusal::ClientId {
                        client_id: outpost_shared::protocol::quote(client_id),
                        identity: d.clone(),
                    });
                }
                match will_topic {
                    Some(t) if *t != self.topics.topic(d, Channel::Death) => deny("set its will on", t),
                    _ => Ok(()),
                }
            }
            (Identity::Device(d), Packet::Publish { topic }) if self.own(d, topic, true) => Ok(()),
            (Identity::Device(_), Packet::Publish { topic }) => deny("publish on", topic),
            (Identity::Device(d), Packet::Subscribe { filters }) => {
                match filters.iter().find(|f| !self.own(d, f, false)) {
                    Some(f) => deny("subscribe to", f),
                    None => Ok(()),
                }
            }
        }
    }

    /// The same rules as a Mosquitto ACL file (with `use_identity_as_username true`, so `%u` is
    /// the certificate's common name, and `use_username_as_clientid true`).
    pub fn mosquitto_acl(&self, services: &[&str]) -> String {
        let mut out = String::from(
            "# Outpost topic ACL (generated by `outpost-cloud pki mosquitto`; see packaging/mosquitto).\n\
             # A gateway publishes only on its own up channels and reads only its own down channels.\n",
        );
        for service in services {
            out.push_str(&format!("user {service}\ntopic readwrite {}/#\n\n", self.prefix));
        }
        for ch in Channel::ALL {
            let access = if ch.is_up() { "write" } else { "read" };
            out.push_str(&format!(
                "pattern {access} {}/v{}/%u/{}\n",
                self.prefix,
                outpost_shared::protocol::TOPIC_VERSION,
                ch.name()
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(client_id: &str, will: Option<&str>) -> Vec<u8> {
        let mut v = vec![
            0,
            4,
            b'M',
            b'Q',
            b'T',
            b'T',
            4,
            if will.is_some() { 0x06 } else { 0x02 },
            0,
            30,
        ];
        let s = |v: &mut Vec<u8>, t: &str| {
            v.extend_from_slice(&(t.len() as u16).to_be_bytes());
            v.extend_from_slice(t.as_bytes());
        };
        s(&mut v, client_id);
        if let Some(w) = will {
            s(&mut v, w);
            s(&mut v, "x");
        }
        let mut p = vec![0x10, v.len() as u8];
        p.extend(v);
        p
    }

    fn publish(topic: &str) -> Vec<u8> {
        let mut v = (topic.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(topic.as_bytes());
        v.extend_from_slice(&[0, 1, 9, 9, 9]);
        let mut p = vec![0x32, v.len() as u8];
        p.extend(v);
        p
    }

    fn subscribe(filters: &[&str]) -> Vec<u8> {
        let mut v = vec![0, 1];
        for f in filters {
            v.extend_from_slice(&(f.len() as u16).to_be_bytes());
            v.extend_from_slice(f.as_bytes());
            v.push(1);
        }
        let mut p = vec![0x82, v.len() as u8];
        p.extend(v);
        p
    }

    #[test]
    fn frames_and_parses_what_clients_send() {
        let p = publish("outpost/v1/a/events");
        assert_eq!(frame(&p, 1 << 20).unwrap(), Some(p.len()));
        assert_eq!(frame(&p[..1], 1 << 20).unwrap(), None);
        assert_eq!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0x7f], 1 << 20),
            Err(Refusal::TooLarge(268_435_455))
        );
        assert!(frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX).is_err());
        assert_eq!(
            parse(&p).unwrap(),
            Packet::Publish {
                topic: "outpost/v1/a/events".into()
            }
        );
        let c = connect("a", Some("outpost/v1/a/death"));
        assert_eq!(
            parse(&c).unwrap(),
            Packet::Connect {
                level: 4,
                client_id: "a".into(),
                will_topic: Some("outpost/v1/a/death".into())
            }
        );
        assert_eq!(
            parse(&subscribe(&["x", "y"])).unwrap(),
            Packet::Subscribe {
                filters: vec!["x".into(), "y".into()]
            }
        );
        assert_eq!(parse(&[0xc0, 0]).unwrap(), Packet::Other);
        assert!(parse(&[0x30, 3, 0, 9, b'a']).is_err(), "topic past the end");
    }

    #[test]
    fn a_device_stays_in_its_own_subtree_in_the_right_direction() {
        let rules = Rules::new("outpost");
        let a = Identity::Device("gw-a".into());
        let ok = |id: &Identity, p: Vec<u8>| rules.check(id, &parse(&p).unwrap());
        assert!(ok(&a, connect("gw-a", Some("outpost/v1/gw-a/death"))).is_ok());
        assert!(matches!(ok(&a, connect("gw-b", None)), Err(Refusal::ClientId { .. })));
        assert!(ok(&a, connect("gw-a", Some("outpost/v1/gw-b/death"))).is_err());
        for ch in ["birth", "death", "events", "cmd-result", "reported", "inventory"] {
            assert!(ok(&a, publish(&format!("outpost/v1/gw-a/{ch}"))).is_ok(), "{ch}");
            assert!(ok(&a, publish(&format!("outpost/v1/gw-b/{ch}"))).is_err(), "{ch} of B");
        }
        for ch in ["cmd", "desired", "ack"] {
            assert!(
                ok(&a, publish(&format!("outpost/v1/gw-a/{ch}"))).is_err(),
                "publish on own {ch}"
            );
            assert!(ok(&a, subscribe(&[&format!("outpost/v1/gw-a/{ch}")])).is_ok(), "{ch}");
            assert!(
                ok(&a, subscribe(&[&format!("outpost/v1/gw-b/{ch}")])).is_err(),
                "B's {ch}"
            );
        }
        assert!(ok(&a, subscribe(&["outpost/v1/+/cmd"])).is_err());
        assert!(ok(&a, subscribe(&["#"])).is_err());
        assert!(
            ok(&a, subscribe(&["outpost/v1/gw-a/events"])).is_err(),
            "reading its own up channel"
        );
        let svc = Identity::Service;
        assert!(ok(&svc, subscribe(&["outpost/v1/+/events"])).is_ok());
        assert!(ok(&svc, publish("outpost/v1/gw-a/cmd")).is_ok());
        assert!(ok(&svc, publish("elsewhere/x")).is_err());
        let acl = rules.mosquitto_acl(&["outpost-cloud", "outpost-cloud-2"]);
        assert!(acl.contains("pattern write outpost/v1/%u/events\n"), "{acl}");
        assert!(acl.contains("pattern read outpost/v1/%u/cmd\n"), "{acl}");
        assert!(acl.contains("user outpost-cloud\ntopic readwrite outpost/#\n"), "{acl}");
        assert!(
            acl.contains("user outpost-cloud-2\ntopic readwrite outpost/#\n"),
            "{acl}"
        );
    }
}
