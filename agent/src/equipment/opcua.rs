//! OPC UA devices (async-opcua): a typed point map (node id → name, data type, scale, unit),
//! one session per server shared by every step that uses it, reads, idempotent writes verified
//! by exact read-back, status codes classified for the retry policy, and a simulator (an OPC UA
//! server from the same crate) so recipes run without a PLC.

// Decodes untrusted values: no panics, no unchecked indexing (ARCHITECTURE.md, "Input").
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)
)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opcua::client::{ClientBuilder, DataChangeCallback, IdentityToken, MonitoredItem, Session};
use opcua::crypto::SecurityPolicy;
use opcua::types::{
    AttributeId, CallMethodRequest, DataChangeFilter, DataChangeTrigger, DataValue, DateTime, DeadbandType,
    ExtensionObject, MessageSecurityMode, MonitoredItemCreateRequest, MonitoringMode, MonitoringParameters, NodeId,
    NumericRange, ReadValueId, StatusCode, TimestampsToReturn, UAString, Variant, WriteValue,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::EquipmentError;
use outpost_shared::definition::{DurationText, parse_duration};

/// A point's OPC UA data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DataType {
    /// `Boolean`
    Boolean,
    /// `SByte`
    SByte,
    /// `Byte`
    Byte,
    /// `Int16`
    Int16,
    /// `UInt16`
    UInt16,
    /// `Int32`
    Int32,
    /// `UInt32`
    UInt32,
    /// `Int64`
    Int64,
    /// `UInt64`
    UInt64,
    /// `Float` (IEEE 754 single)
    Float,
    /// `Double`
    Double,
    /// `String`
    String,
    /// `DateTime` (RFC 3339 in JSON)
    DateTime,
}

/// A named point as written in the equipment file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointSpec {
    /// Node id, e.g. `ns=2;s=Mixer.Speed`.
    pub node: String,
    /// Data type of the node's value.
    #[serde(rename = "type")]
    pub data_type: DataType,
    /// Engineering value = raw × scale (numeric types; default 1).
    #[serde(default)]
    pub scale: Option<f64>,
    /// Unit, for people.
    #[serde(default)]
    pub unit: Option<String>,
}

/// A validated point.
#[derive(Debug, Clone)]
pub struct Point {
    node: NodeId,
    data_type: DataType,
    scale: f64,
    unit: Option<String>,
}

impl Point {
    /// Validates a point spec.
    pub fn new(spec: &PointSpec) -> Result<Point, String> {
        let node: NodeId = spec.node.parse().map_err(|_| {
            format!(
                "node: '{}' is not a node id (write ns=2;s=Name or ns=2;i=1001)",
                spec.node
            )
        })?;
        let scale = spec.scale.unwrap_or(1.0);
        if !(scale.is_finite() && scale != 0.0) {
            return Err(format!("scale {scale} must be a non-zero number"));
        }
        if scale != 1.0
            && matches!(
                spec.data_type,
                DataType::Boolean | DataType::String | DataType::DateTime
            )
        {
            return Err(format!("scale applies to numeric types, not {:?}", spec.data_type));
        }
        Ok(Point {
            node,
            data_type: spec.data_type,
            scale,
            unit: spec.unit.clone(),
        })
    }

    /// An engineering value to the variant the node must hold; refuses values the type cannot
    /// hold exactly (the variant must read back as exactly that value).
    pub fn encode(&self, v: &Value) -> Result<Variant, String> {
        let t = self.data_type;
        let variant = match t {
            DataType::Boolean => Variant::Boolean(v.as_bool().ok_or_else(|| format!("{v} is not true or false"))?),
            DataType::String => Variant::String(UAString::from(
                v.as_str().ok_or_else(|| format!("{v} is not a string"))?,
            )),
            DataType::DateTime => {
                let s = v.as_str().ok_or_else(|| format!("{v} is not an RFC 3339 time"))?;
                let d = DateTime::parse_from_rfc3339(s).map_err(|e| format!("'{s}' is not an RFC 3339 time: {e}"))?;
                Variant::DateTime(Box::new(d))
            }
            _ => {
                let x = v.as_f64().ok_or_else(|| format!("{v} is not a number"))?;
                let raw = super::unscale(x, self.scale);
                let whole = |lo: f64, hi: f64| -> Result<f64, String> {
                    let r = raw.round();
                    if (raw - r).abs() > 1e-9 || r < lo || r > hi {
                        Err(format!("{v} is not representable as {t:?} with scale {}", self.scale))
                    } else {
                        Ok(r)
                    }
                };
                match t {
                    DataType::SByte => Variant::SByte(whole(-128.0, 127.0)? as i8),
                    DataType::Byte => Variant::Byte(whole(0.0, 255.0)? as u8),
                    DataType::Int16 => Variant::Int16(whole(-32768.0, 32767.0)? as i16),
                    DataType::UInt16 => Variant::UInt16(whole(0.0, 65535.0)? as u16),
                    DataType::Int32 => Variant::Int32(whole(-2_147_483_648.0, 2_147_483_647.0)? as i32),
                    DataType::UInt32 => Variant::UInt32(whole(0.0, 4_294_967_295.0)? as u32),
                    // Beyond 2^53 a JSON number is not exact: take the integer JSON holds, unscaled.
                    DataType::Int64 => match v.as_i64().filter(|_| self.scale == 1.0) {
                        Some(i) => Variant::Int64(i),
                        None => Variant::Int64(whole(-9.007_199_254_740_992e15, 9.007_199_254_740_992e15)? as i64),
                    },
                    DataType::UInt64 => match v.as_u64().filter(|_| self.scale == 1.0) {
                        Some(i) => Variant::UInt64(i),
                        None => Variant::UInt64(whole(0.0, 9.007_199_254_740_992e15)? as u64),
                    },
                    DataType::Float => {
                        let f = raw as f32;
                        if !f.is_finite() || (f == 0.0 && raw != 0.0) {
                            return Err(format!("{v} is out of range for Float with scale {}", self.scale));
                        }
                        Variant::Float(if f == 0.0 { 0.0 } else { f })
                    }
                    _ => {
                        if !raw.is_finite() {
                            return Err(format!("{v} is out of range for Double with scale {}", self.scale));
                        }
                        Variant::Double(if raw == 0.0 { 0.0 } else { raw })
                    }
                }
            }
        };
        // Exact means exact: 72.1 as a Float is 72.09999847…, which is not what was asked.
        if let (Some(want), Ok(back)) = (v.as_f64(), self.decode(&variant))
            && back.as_f64() != Some(want)
            && !(want == 0.0 && back.as_f64() == Some(0.0))
            && v.as_i64().is_none_or(|i| back.as_i64() != Some(i))
            && v.as_u64().is_none_or(|i| back.as_u64() != Some(i))
        {
            return Err(format!(
                "{v} is not exactly representable as {t:?} with scale {} (it would read back as {back})",
                self.scale
            ));
        }
        Ok(variant)
    }

    /// A variant read from the node to an engineering value; a variant of another type than the
    /// point's is an error (the equipment file and the server disagree).
    pub fn decode(&self, v: &Variant) -> Result<Value, String> {
        let num = |raw: f64| super::number(super::rescale(raw, self.scale));
        let int = |raw: i64| {
            if self.scale == 1.0 { json!(raw) } else { num(raw as f64) }
        };
        Ok(match (self.data_type, v) {
            (DataType::Boolean, Variant::Boolean(b)) => json!(b),
            (DataType::SByte, Variant::SByte(x)) => int(i64::from(*x)),
            (DataType::Byte, Variant::Byte(x)) => int(i64::from(*x)),
            (DataType::Int16, Variant::Int16(x)) => int(i64::from(*x)),
            (DataType::UInt16, Variant::UInt16(x)) => int(i64::from(*x)),
            (DataType::Int32, Variant::Int32(x)) => int(i64::from(*x)),
            (DataType::UInt32, Variant::UInt32(x)) => int(i64::from(*x)),
            (DataType::Int64, Variant::Int64(x)) => int(*x),
            (DataType::UInt64, Variant::UInt64(x)) if self.scale == 1.0 => json!(x),
            (DataType::UInt64, Variant::UInt64(x)) => num(*x as f64),
            (DataType::Float, Variant::Float(f)) => num(f64::from(*f)),
            (DataType::Double, Variant::Double(f)) => num(*f),
            (DataType::String, Variant::String(s)) => s.value().as_ref().map_or(Value::Null, |s| json!(s)),
            (DataType::DateTime, Variant::DateTime(d)) => json!(d.to_rfc3339()),
            (t, other) => {
                return Err(format!(
                    "holds {}, not the {t:?} the equipment file says",
                    type_name(other)
                ));
            }
        })
    }
}

fn type_name(v: &Variant) -> String {
    let text = format!("{v:?}");
    text.split(['(', ' ']).next().unwrap_or("a value").to_string()
}

/// A variant as it is on the wire, exactly: two values match when these texts are equal
/// (`Float 0x42910000`, `UInt16 900`, `String "auto"`).
pub fn variant_text(v: &Variant) -> String {
    match v {
        Variant::Boolean(b) => format!("Boolean {b}"),
        Variant::SByte(x) => format!("SByte {x}"),
        Variant::Byte(x) => format!("Byte {x}"),
        Variant::Int16(x) => format!("Int16 {x}"),
        Variant::UInt16(x) => format!("UInt16 {x}"),
        Variant::Int32(x) => format!("Int32 {x}"),
        Variant::UInt32(x) => format!("UInt32 {x}"),
        Variant::Int64(x) => format!("Int64 {x}"),
        Variant::UInt64(x) => format!("UInt64 {x}"),
        Variant::Float(f) => format!("Float 0x{:08X}", f.to_bits()),
        Variant::Double(f) => format!("Double 0x{:016X}", f.to_bits()),
        Variant::String(s) => format!("String {:?}", s.value().as_deref().unwrap_or("")),
        Variant::DateTime(d) => format!("DateTime {}", d.checked_ticks()),
        other => format!("{other:?}"),
    }
}

/// How an OPC UA status maps onto the journal's error kinds and the retry policy.
pub fn classify(code: StatusCode) -> (&'static str, bool) {
    let c = StatusCode::from(code.bits() & 0xFFFF_0000);
    let is = |list: &[StatusCode]| list.contains(&c);
    if is(&[StatusCode::BadTimeout, StatusCode::BadRequestTimeout]) {
        ("opcua.timeout", true)
    } else if is(&[
        StatusCode::BadSessionClosed,
        StatusCode::BadSessionIdInvalid,
        StatusCode::BadServerNotConnected,
        StatusCode::BadNotConnected,
        StatusCode::BadConnectionClosed,
        StatusCode::BadConnectionRejected,
        StatusCode::BadCommunicationError,
        StatusCode::BadSecureChannelClosed,
        StatusCode::BadServerHalted,
        StatusCode::BadTooManySessions,
    ]) {
        ("opcua.not_connected", true)
    } else if is(&[StatusCode::BadNodeIdUnknown, StatusCode::BadNodeIdInvalid]) {
        ("opcua.unknown_node", false)
    } else if is(&[StatusCode::BadTypeMismatch]) {
        ("opcua.type_mismatch", false)
    } else if is(&[
        StatusCode::BadUserAccessDenied,
        StatusCode::BadNotWritable,
        StatusCode::BadNotReadable,
    ]) {
        ("opcua.access_denied", false)
    } else if is(&[
        StatusCode::BadIdentityTokenRejected,
        StatusCode::BadIdentityTokenInvalid,
    ]) {
        ("opcua.identity_rejected", false)
    } else if is(&[
        StatusCode::BadSecurityPolicyRejected,
        StatusCode::BadSecurityModeRejected,
        StatusCode::BadSecurityChecksFailed,
        StatusCode::BadCertificateUntrusted,
        StatusCode::BadCertificateInvalid,
    ]) {
        ("opcua.security", false)
    } else if is(&[StatusCode::BadOutOfRange]) {
        ("opcua.out_of_range", false)
    } else if is(&[
        StatusCode::BadMethodInvalid,
        StatusCode::BadArgumentsMissing,
        StatusCode::BadTooManyArguments,
        StatusCode::BadInvalidArgument,
    ]) {
        ("opcua.bad_call", false)
    } else {
        ("opcua.bad_status", true)
    }
}

/// Connection settings of an OPC UA server, as written in the equipment file (`opcua:`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcuaSpec {
    /// `opc.tcp://HOST:PORT/PATH`.
    pub endpoint: String,
    /// `None` (default), `Basic256Sha256`, `Aes128Sha256RsaOaep` or `Aes256Sha256RsaPss`.
    #[serde(default)]
    pub security_policy: Option<String>,
    /// `None` (default with policy None), `Sign` or `SignAndEncrypt` (default otherwise).
    #[serde(default)]
    pub security_mode: Option<String>,
    /// User name (with `password_file`); anonymous without.
    #[serde(default)]
    pub user: Option<String>,
    /// File holding the user's password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A user certificate (DER or PEM) to sign in with instead of a user name (X509 identity).
    #[serde(default)]
    pub identity_certificate: Option<PathBuf>,
    /// The identity certificate's private key (PEM).
    #[serde(default)]
    pub identity_key: Option<PathBuf>,
    /// The gateway's application certificate and key (`own/`, `private/`, made on first use)
    /// and the server certificates it trusts (`trusted/`). Default: `/var/lib/outpost/opcua-pki`.
    #[serde(default)]
    pub pki_dir: Option<PathBuf>,
    /// An application certificate issued by the plant's PKI (DER or PEM; relative to `pki_dir`
    /// or absolute) instead of the one the gateway makes itself.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub private_key: Option<PathBuf>,
    /// Trust any server certificate (tests and commissioning only; logged as a warning).
    #[serde(default)]
    pub trust_any_server: bool,
    /// Session timeout asked of the server (default 60s).
    #[serde(default)]
    pub session_timeout: Option<DurationText>,
    /// The point map.
    pub points: BTreeMap<String, PointSpec>,
    /// Methods `opcua.call` may call, by name.
    #[serde(default)]
    pub methods: BTreeMap<String, MethodSpec>,
}

/// A method of the server, as written in the equipment file (`opcua.methods`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSpec {
    /// Node id of the object the method belongs to.
    pub object: String,
    /// Node id of the method.
    pub method: String,
    /// Input arguments, in the method's order.
    #[serde(default)]
    pub inputs: Vec<ArgSpec>,
    /// Output arguments, in the method's order.
    #[serde(default)]
    pub outputs: Vec<ArgSpec>,
}

/// One argument of a method.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgSpec {
    /// Name in the step's `args` (inputs) or output (outputs).
    pub name: String,
    /// Data type.
    #[serde(rename = "type")]
    pub data_type: DataType,
}

/// A validated method: its nodes and typed arguments.
#[derive(Debug, Clone)]
struct Method {
    object: NodeId,
    method: NodeId,
    inputs: Vec<(String, Point)>,
    outputs: Vec<(String, Point)>,
}

impl Method {
    fn new(spec: &MethodSpec) -> Result<Method, String> {
        let node = |field: &str, text: &str| -> Result<NodeId, String> {
            text.parse()
                .map_err(|_| format!("{field}: '{text}' is not a node id (write ns=2;s=Name or ns=2;i=1001)"))
        };
        let (object, method) = (node("object", &spec.object)?, node("method", &spec.method)?);
        let args = |list: &[ArgSpec]| -> Result<Vec<(String, Point)>, String> {
            list.iter()
                .map(|a| {
                    let p = Point::new(&PointSpec {
                        node: spec.method.clone(),
                        data_type: a.data_type,
                        scale: None,
                        unit: None,
                    })?;
                    Ok((a.name.clone(), p))
                })
                .collect()
        };
        Ok(Method {
            object,
            method,
            inputs: args(&spec.inputs)?,
            outputs: args(&spec.outputs)?,
        })
    }

    /// The step's named arguments as the method's input variants, in order; every input must be
    /// given and held exactly by its type, and no other name is accepted.
    fn encode_inputs(&self, args: &Map<String, Value>) -> Result<Vec<Variant>, String> {
        if let Some(extra) = args.keys().find(|k| !self.inputs.iter().any(|(n, _)| n == *k)) {
            let names: Vec<&str> = self.inputs.iter().map(|(n, _)| n.as_str()).collect();
            return Err(format!("'{extra}' is not an input (inputs: {})", names.join(", ")));
        }
        self.inputs
            .iter()
            .map(|(n, p)| {
                let v = args.get(n).ok_or_else(|| format!("input '{n}' is missing"))?;
                p.encode(v).map_err(|e| format!("input '{n}': {e}"))
            })
            .collect()
    }

    /// The method's output variants as named values; the count and each type must match.
    fn decode_outputs(&self, outputs: &[Variant]) -> Result<Map<String, Value>, String> {
        if outputs.len() != self.outputs.len() {
            return Err(format!(
                "the method returned {} outputs, the equipment file declares {}",
                outputs.len(),
                self.outputs.len()
            ));
        }
        self.outputs
            .iter()
            .zip(outputs)
            .map(|((n, p), v)| Ok((n.clone(), p.decode(v).map_err(|e| format!("output '{n}' {e}"))?)))
            .collect()
    }
}

const DEFAULT_PKI: &str = "/var/lib/outpost/opcua-pki";

enum Identity {
    Anonymous,
    User(String, String),
    Certificate(PathBuf, PathBuf),
}

/// A session and the task that drives it.
struct Live {
    session: Arc<Session>,
    task: tokio::task::JoinHandle<StatusCode>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An OPC UA server with its point map; one session, opened on first use and again after the
/// connection is lost.
pub struct OpcuaDevice {
    name: String,
    endpoint: String,
    policy: SecurityPolicy,
    mode: MessageSecurityMode,
    identity: Identity,
    pki_dir: PathBuf,
    /// A plant-issued application certificate and key, instead of the generated pair.
    own: Option<(PathBuf, PathBuf)>,
    trust_any_server: bool,
    session_timeout: Duration,
    timeout: Duration,
    points: BTreeMap<String, Point>,
    methods: BTreeMap<String, Method>,
    live: tokio::sync::Mutex<Link>,
}

/// The session, if open, and how the last attempts to open one went.
#[derive(Default)]
struct Link {
    live: Option<Live>,
    /// Connection attempts that failed in a row.
    failures: u32,
    /// No new attempt before this.
    next_attempt: Option<tokio::time::Instant>,
    /// Sessions opened so far: a subscription belongs to the session it was made on.
    generation: u64,
}

/// One watched point of a data-change subscription.
#[derive(Debug, Clone)]
pub struct Watch {
    /// Point name.
    pub point: String,
    /// Absolute deadband (0: every change).
    pub deadband: f64,
    /// Sampling interval asked of the server.
    pub sampling: Duration,
}

/// A subscription on one session of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// The server's subscription id.
    pub id: u32,
    /// The session it lives on.
    pub generation: u64,
}

/// A data change of a watched point, as the server reported it.
#[derive(Debug, Clone)]
pub struct Change {
    /// Point name.
    pub point: String,
    /// The engineering value (or why it could not be decoded).
    pub value: Result<Value, String>,
    /// The value's wire form, exact.
    pub raw: String,
    /// When the value changed at its source (server ticks, 100 ns since 1601), if reported.
    pub source_ticks: Option<i64>,
    /// The same as RFC 3339.
    pub source_timestamp: Option<String>,
    /// When the server saw it.
    pub server_timestamp: Option<String>,
}

/// How long to wait before the next connection attempt after `failures` failed in a row:
/// nothing after a success, then 0.5 s doubling to at most 10 s, so a server that is down
/// is not hammered by every step that needs it, and one that comes back is found soon.
pub fn reconnect_delay(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let ms = 500u64.saturating_mul(1u64 << (failures - 1).min(16));
    Duration::from_millis(ms.min(10_000))
}

impl OpcuaDevice {
    /// Validates the settings and the point map; opens nothing. Errors name the field.
    pub fn new(name: &str, spec: &OpcuaSpec, timeout: Duration) -> Result<OpcuaDevice, Vec<String>> {
        let mut problems = Vec::new();
        if !spec.endpoint.starts_with("opc.tcp://") {
            problems.push(format!(
                "opcua.endpoint: '{}' is not opc.tcp://HOST:PORT/PATH",
                spec.endpoint
            ));
        }
        let policy = match spec.security_policy.as_deref().unwrap_or("None") {
            "None" => SecurityPolicy::None,
            "Basic256Sha256" => SecurityPolicy::Basic256Sha256,
            "Aes128Sha256RsaOaep" => SecurityPolicy::Aes128Sha256RsaOaep,
            "Aes256Sha256RsaPss" => SecurityPolicy::Aes256Sha256RsaPss,
            other => {
                problems.push(format!(
                    "opcua.security_policy: '{other}' is not None, Basic256Sha256, Aes128Sha256RsaOaep or Aes256Sha256RsaPss"
                ));
                SecurityPolicy::None
            }
        };
        let default_mode = if policy == SecurityPolicy::None {
            "None"
        } else {
            "SignAndEncrypt"
        };
        let mode = match spec.security_mode.as_deref().unwrap_or(default_mode) {
            "None" => MessageSecurityMode::None,
            "Sign" => MessageSecurityMode::Sign,
            "SignAndEncrypt" => MessageSecurityMode::SignAndEncrypt,
            other => {
                problems.push(format!(
                    "opcua.security_mode: '{other}' is not None, Sign or SignAndEncrypt"
                ));
                MessageSecurityMode::None
            }
        };
        if (policy == SecurityPolicy::None) != (mode == MessageSecurityMode::None) {
            problems
                .push("opcua.security_mode: None goes with security_policy None only, and the other way round".into());
        }
        let readable = |field: &str, f: &PathBuf, problems: &mut Vec<String>| {
            if let Err(e) = std::fs::metadata(f) {
                problems.push(format!("opcua.{field}: cannot read {}: {e}", f.display()));
            }
        };
        let identity = match (&spec.user, &spec.password_file) {
            (None, None) => match (&spec.identity_certificate, &spec.identity_key) {
                (None, None) => Identity::Anonymous,
                (Some(c), Some(k)) => {
                    readable("identity_certificate", c, &mut problems);
                    readable("identity_key", k, &mut problems);
                    Identity::Certificate(c.clone(), k.clone())
                }
                _ => {
                    problems.push("opcua.identity_certificate and opcua.identity_key go together".into());
                    Identity::Anonymous
                }
            },
            (Some(_), Some(_)) if spec.identity_certificate.is_some() => {
                problems.push("opcua: give user and password_file, or identity_certificate, not both".into());
                Identity::Anonymous
            }
            (Some(u), Some(f)) => match std::fs::read_to_string(f) {
                Ok(p) => Identity::User(u.clone(), p.lines().next().unwrap_or("").to_string()),
                Err(e) => {
                    problems.push(format!("opcua.password_file: cannot read {}: {e}", f.display()));
                    Identity::Anonymous
                }
            },
            _ => {
                problems.push("opcua.user and opcua.password_file go together".into());
                Identity::Anonymous
            }
        };
        let pki_dir = spec.pki_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_PKI));
        let own = match (&spec.certificate, &spec.private_key) {
            (None, None) => None,
            (Some(c), Some(k)) => {
                readable("certificate", &pki_dir.join(c), &mut problems);
                readable("private_key", &pki_dir.join(k), &mut problems);
                Some((c.clone(), k.clone()))
            }
            _ => {
                problems.push("opcua.certificate and opcua.private_key go together".into());
                None
            }
        };
        let session_timeout = match &spec.session_timeout {
            Some(t) => parse_duration(&t.0).unwrap_or_else(|e| {
                problems.push(format!("opcua.session_timeout: {e}"));
                Duration::from_secs(60)
            }),
            None => Duration::from_secs(60),
        };
        let mut points = BTreeMap::new();
        for (pname, p) in &spec.points {
            match Point::new(p) {
                Ok(pt) => {
                    points.insert(pname.clone(), pt);
                }
                Err(e) => problems.push(format!("opcua.points.{pname}: {e}")),
            }
        }
        let mut methods = BTreeMap::new();
        for (mname, m) in &spec.methods {
            match Method::new(m) {
                Ok(m) => {
                    methods.insert(mname.clone(), m);
                }
                Err(e) => problems.push(format!("opcua.methods.{mname}: {e}")),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(OpcuaDevice {
            name: name.to_string(),
            endpoint: spec.endpoint.clone(),
            policy,
            mode,
            identity,
            pki_dir,
            own,
            trust_any_server: spec.trust_any_server,
            session_timeout,
            timeout,
            points,
            methods,
            live: tokio::sync::Mutex::new(Link::default()),
        })
    }

    /// Names of the points.
    pub fn point_names(&self) -> Vec<String> {
        self.points.keys().cloned().collect()
    }

    fn point(&self, name: &str) -> Result<&Point, EquipmentError> {
        self.points.get(name).ok_or_else(|| {
            EquipmentError::Invalid(format!(
                "device '{}' has no point '{name}' (points: {})",
                self.name,
                self.point_names().join(", ")
            ))
        })
    }

    fn fail(&self, what: &str, code: StatusCode) -> EquipmentError {
        let (kind, retryable) = classify(code);
        EquipmentError::Opcua {
            kind,
            retryable,
            message: format!("device '{}' ({}): {what}: {code}", self.name, self.endpoint),
        }
    }

    async fn connect(&self) -> Result<Live, EquipmentError> {
        if self.trust_any_server {
            tracing::warn!(device = %self.name, "opcua.trust_any_server: any server certificate is accepted");
        }
        let mut builder = ClientBuilder::new()
            .application_name("Outpost gateway")
            .application_uri(format!("urn:outpost:gateway:{}", self.name))
            .product_uri("urn:outpost")
            .pki_dir(&self.pki_dir)
            .create_sample_keypair(self.own.is_none());
        if let Some((cert, key)) = &self.own {
            builder = builder.certificate_path(cert).private_key_path(key);
        }
        let mut client = builder
            .trust_server_certs(self.trust_any_server)
            .session_retry_limit(0)
            .session_timeout(u32::try_from(self.session_timeout.as_millis()).unwrap_or(u32::MAX))
            .request_timeout(self.timeout)
            .client()
            .map_err(|e| EquipmentError::Invalid(format!("device '{}': opcua client: {}", self.name, e.join("; "))))?;
        let identity = match &self.identity {
            Identity::Anonymous => IdentityToken::Anonymous,
            Identity::User(u, p) => IdentityToken::UserName(u.clone(), opcua::client::Password(p.clone())),
            Identity::Certificate(cert, key) => IdentityToken::new_x509_path(cert, key).map_err(|e| {
                EquipmentError::Invalid(format!(
                    "device '{}': opcua.identity_certificate {} / identity_key {}: {e}",
                    self.name,
                    cert.display(),
                    key.display()
                ))
            })?,
        };
        let endpoint = (self.endpoint.as_str(), self.policy.to_str(), self.mode);
        let (session, event_loop) = client
            .connect_to_matching_endpoint(endpoint, identity)
            .await
            .map_err(|e| {
                let what = format!(
                    "no session on an endpoint with security_policy {} and security_mode {:?}",
                    self.policy, self.mode
                );
                self.fail(&format!("{what} ({e})"), e.status())
            })?;
        let mut task = event_loop.spawn();
        let refused = "the session did not activate (identity, certificate or policy refused)";
        // A loop that ends (the server refused the session) never marks it connected.
        tokio::select! {
            up = session.wait_for_connection() => if !up {
                task.abort();
                return Err(self.fail(refused, StatusCode::BadConnectionClosed));
            },
            ended = &mut task => {
                return Err(self.fail(refused, ended.unwrap_or(StatusCode::BadConnectionClosed)));
            }
        }
        Ok(Live { session, task })
    }

    /// One request on the device's session (opened if need be), under the device's timeout;
    /// a connection-level failure drops the session so the next request opens a new one.
    async fn call<T, F>(&self, what: &str, op: impl FnOnce(Arc<Session>) -> F) -> Result<T, EquipmentError>
    where
        F: std::future::Future<Output = Result<T, opcua::types::Error>>,
    {
        self.call_on_session(what, op).await.map(|(v, _)| v)
    }

    /// `call`, also saying which session (generation) the request went on.
    async fn call_on_session<T, F>(
        &self,
        what: &str,
        op: impl FnOnce(Arc<Session>) -> F,
    ) -> Result<(T, u64), EquipmentError>
    where
        F: std::future::Future<Output = Result<T, opcua::types::Error>>,
    {
        let mut link = self.live.lock().await;
        if link.live.as_ref().is_none_or(|l| l.task.is_finished()) {
            link.live = None;
            if let Some(at) = link.next_attempt {
                tokio::time::sleep_until(at).await;
            }
            let opened = tokio::time::timeout(self.timeout.max(Duration::from_secs(5)), self.connect()).await;
            let opened = match opened {
                Ok(r) => r,
                Err(_) => Err(self.fail("no session within the connect timeout", StatusCode::BadTimeout)),
            };
            match opened {
                Ok(live) => {
                    if link.failures > 0 {
                        tracing::info!(device = %self.name, failed = link.failures, "opcua session open again");
                    }
                    *link = Link {
                        live: Some(live),
                        generation: link.generation.wrapping_add(1),
                        ..Link::default()
                    };
                }
                Err(e) => {
                    link.failures = link.failures.saturating_add(1);
                    let wait = reconnect_delay(link.failures);
                    link.next_attempt = Some(tokio::time::Instant::now() + wait);
                    tracing::warn!(device = %self.name, failed = link.failures, next_in = ?wait, error = %e, "opcua connection failed");
                    return Err(e);
                }
            }
        }
        let Some(session) = link.live.as_ref().map(|l| l.session.clone()) else {
            return Err(self.fail(what, StatusCode::BadNotConnected));
        };
        match tokio::time::timeout(self.timeout, op(session)).await {
            Ok(Ok(v)) => Ok((v, link.generation)),
            Ok(Err(e)) => {
                let err = self.fail(what, e.status());
                if matches!(classify(e.status()).0, "opcua.not_connected" | "opcua.timeout") {
                    link.live = None;
                }
                Err(err)
            }
            Err(_) => {
                link.live = None;
                Err(EquipmentError::Timeout(self.timeout))
            }
        }
    }

    /// The generation of the open session, if one is open and alive.
    pub async fn session_generation(&self) -> Option<u64> {
        let link = self.live.lock().await;
        link.live
            .as_ref()
            .filter(|l| !l.task.is_finished())
            .map(|_| link.generation)
    }

    /// Watches points for data changes on the device's session (opened if need be): each
    /// change the server reports goes to `on_change` with the index of its watch. The subscription lives as long as that
    /// session; its generation tells the caller when to subscribe again on a new one.
    pub async fn subscribe(
        &self,
        watches: &[Watch],
        on_change: impl Fn(usize, Change) + Send + Sync + 'static,
    ) -> Result<Subscription, EquipmentError> {
        let mut items = Vec::new();
        let mut by_handle = BTreeMap::new();
        for (handle, w) in (1u32..).zip(watches) {
            let p = self.point(&w.point)?.clone();
            let filter = DataChangeFilter {
                trigger: DataChangeTrigger::StatusValue,
                deadband_type: if w.deadband > 0.0 {
                    DeadbandType::Absolute as u32
                } else {
                    DeadbandType::None as u32
                },
                deadband_value: w.deadband,
            };
            items.push(MonitoredItemCreateRequest::new(
                ReadValueId::from(p.node.clone()),
                MonitoringMode::Reporting,
                MonitoringParameters {
                    client_handle: handle,
                    sampling_interval: w.sampling.as_secs_f64() * 1000.0,
                    filter: ExtensionObject::from_message(filter),
                    queue_size: 100,
                    discard_oldest: false,
                },
            ));
            by_handle.insert(handle, (by_handle.len(), w.point.clone(), p));
        }
        let callback = DataChangeCallback::new(move |dv: DataValue, item: &MonitoredItem| {
            let Some((index, name, p)) = by_handle.get(&item.client_handle()) else {
                return;
            };
            let v = dv.value.clone().unwrap_or(Variant::Empty);
            on_change(
                *index,
                Change {
                    point: name.clone(),
                    value: match dv.status.filter(|c| !c.is_good()) {
                        Some(c) => Err(format!("status {c}")),
                        None => p.decode(&v),
                    },
                    raw: variant_text(&v),
                    source_ticks: dv.source_timestamp.map(|t| t.checked_ticks()),
                    source_timestamp: dv.source_timestamp.map(|t| t.to_rfc3339()),
                    server_timestamp: dv.server_timestamp.map(|t| t.to_rfc3339()),
                },
            );
        });
        let points: Vec<String> = watches.iter().map(|w| w.point.clone()).collect();
        let ((id, created), generation) = self
            .call_on_session("subscribe", |s| async move {
                let publishing = Duration::from_millis(250);
                let id = s.create_subscription(publishing, 240, 20, 0, 0, true, callback).await?;
                Ok((id, s.create_monitored_items(id, TimestampsToReturn::Both, items).await?))
            })
            .await?;
        let sub = Subscription { id, generation };
        for (item, point) in created.iter().zip(&points) {
            if !item.result.status_code.is_good() {
                self.unsubscribe(sub).await;
                return Err(self.fail(&format!("monitoring point '{point}'"), item.result.status_code));
            }
        }
        Ok(sub)
    }

    /// Ends a subscription if its session is still the open one (else it ended with it).
    pub async fn unsubscribe(&self, sub: Subscription) {
        if self.session_generation().await != Some(sub.generation) {
            return;
        }
        if let Err(e) = self
            .call("unsubscribe", |s| async move { s.delete_subscription(sub.id).await })
            .await
        {
            tracing::debug!(device = %self.name, error = %e, "cannot delete a subscription");
        }
    }

    async fn read_variants(&self, names: &[&str]) -> Result<Vec<Variant>, EquipmentError> {
        let mut ids = Vec::new();
        for n in names {
            ids.push(ReadValueId::from(self.point(n)?.node.clone()));
        }
        let values: Vec<DataValue> = self
            .call("read", |s| async move {
                s.read(&ids, TimestampsToReturn::Neither, 0.0).await
            })
            .await?;
        if values.len() != names.len() {
            return Err(EquipmentError::BadResponse(format!(
                "device '{}' answered {} values for {} nodes",
                self.name,
                values.len(),
                names.len()
            )));
        }
        let mut out = Vec::new();
        for (n, dv) in names.iter().zip(values) {
            if let Some(code) = dv.status.filter(|c| !c.is_good()) {
                return Err(self.fail(&format!("read of point '{n}'"), code));
            }
            out.push(dv.value.unwrap_or(Variant::Empty));
        }
        Ok(out)
    }

    fn decoded(&self, name: &str, v: &Variant) -> Result<Value, EquipmentError> {
        self.point(name)?.decode(v).map_err(|e| EquipmentError::Opcua {
            kind: "opcua.type_mismatch",
            retryable: false,
            message: format!("device '{}' point '{name}' {e}", self.name),
        })
    }

    /// Reads points by name.
    pub async fn read(&self, names: &[String]) -> Result<Map<String, Value>, EquipmentError> {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let values = self.read_variants(&refs).await?;
        let mut out = Map::new();
        for (n, v) in names.iter().zip(&values) {
            out.insert(n.clone(), self.decoded(n, v)?);
        }
        Ok(out)
    }

    fn encode_all(&self, values: &Map<String, Value>) -> Result<Vec<(String, Variant)>, EquipmentError> {
        values
            .iter()
            .map(|(n, v)| {
                let variant = self
                    .point(n)?
                    .encode(v)
                    .map_err(|e| EquipmentError::Invalid(format!("point '{n}' of device '{}': {e}", self.name)))?;
                Ok((n.clone(), variant))
            })
            .collect()
    }

    /// Every point whose variant read back is not the wanted one, as `modbus.write` lists them.
    fn mismatches(&self, plan: &[(String, Variant)], found: &[Variant], wanted: &Map<String, Value>) -> Vec<Value> {
        plan.iter()
            .zip(found)
            .filter(|((_, want), got)| variant_text(want) != variant_text(got))
            .map(|((n, _), got)| {
                json!({
                    "point": n, "wanted": wanted.get(n), "found": self.decoded(n, got).unwrap_or(Value::Null),
                    "unit": self.points.get(n).and_then(|p| p.unit.clone()),
                })
            })
            .collect()
    }

    /// Writes points idempotently: reads first and writes only what differs, then (with
    /// `verify`) reads everything back and compares the variants exactly.
    pub async fn write(&self, values: &Map<String, Value>, verify: bool) -> Result<Value, EquipmentError> {
        let plan = self.encode_all(values)?;
        let names: Vec<&str> = plan.iter().map(|(n, _)| n.as_str()).collect();
        let current = self.read_variants(&names).await?;
        let (mut written, mut unchanged, mut writes) = (Vec::new(), Vec::new(), Vec::new());
        for ((n, want), now) in plan.iter().zip(&current) {
            if variant_text(want) == variant_text(now) {
                unchanged.push(n.clone());
                continue;
            }
            writes.push(WriteValue {
                node_id: self.point(n)?.node.clone(),
                attribute_id: AttributeId::Value as u32,
                index_range: NumericRange::None,
                value: DataValue::value_only(want.clone()),
            });
            written.push(n.clone());
        }
        if !writes.is_empty() {
            let statuses = self.call("write", |s| async move { s.write(&writes).await }).await?;
            for (n, code) in written.iter().zip(statuses) {
                if !code.is_good() {
                    return Err(self.fail(&format!("write of point '{n}'"), code));
                }
            }
        }
        if verify {
            let back = self.read_variants(&names).await?;
            let mismatches = self.mismatches(&plan, &back, values);
            if !mismatches.is_empty() {
                return Err(EquipmentError::Mismatch(mismatches));
            }
        }
        Ok(json!({"device": self.name, "written": written, "unchanged": unchanged, "verified": verify}))
    }

    /// Compares points with expected values exactly, without writing; with `report`, a mismatch
    /// is an output (`matched: false`) instead of an error.
    pub async fn verify(&self, expected: &Map<String, Value>, report: bool) -> Result<Value, EquipmentError> {
        let plan = self.encode_all(expected)?;
        let names: Vec<&str> = plan.iter().map(|(n, _)| n.as_str()).collect();
        let found = self.read_variants(&names).await?;
        let mismatches = self.mismatches(&plan, &found, expected);
        if mismatches.is_empty() || report {
            Ok(
                json!({"device": self.name, "matched": mismatches.is_empty(), "points": names, "mismatches": mismatches}),
            )
        } else {
            Err(EquipmentError::Mismatch(mismatches))
        }
    }

    /// Calls a method declared in the equipment file with named, typed inputs; returns its
    /// named outputs. Not idempotent: a call interrupted by a crash is made again on resume.
    pub async fn call_method(&self, name: &str, args: &Map<String, Value>) -> Result<Value, EquipmentError> {
        let m = self.methods.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.methods.keys().map(String::as_str).collect();
            EquipmentError::Invalid(format!(
                "device '{}' has no method '{name}' (methods: {})",
                self.name,
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ))
        })?;
        let inputs = m
            .encode_inputs(args)
            .map_err(|e| EquipmentError::Invalid(format!("method '{name}' of device '{}': {e}", self.name)))?;
        let request = CallMethodRequest {
            object_id: m.object.clone(),
            method_id: m.method.clone(),
            input_arguments: Some(inputs),
        };
        let results = self
            .call(&format!("call of method '{name}'"), |s| async move {
                s.call(vec![request]).await
            })
            .await?;
        let Some(result) = results.into_iter().next() else {
            return Err(EquipmentError::BadResponse(format!(
                "device '{}' answered no result for method '{name}'",
                self.name
            )));
        };
        if !result.status_code.is_good() {
            let detail = result
                .input_argument_results
                .iter()
                .flatten()
                .zip(&m.inputs)
                .filter(|(c, _)| !c.is_good())
                .map(|(c, (n, _))| format!("input '{n}': {c}"))
                .collect::<Vec<_>>();
            let what = if detail.is_empty() {
                format!("call of method '{name}'")
            } else {
                format!("call of method '{name}' ({})", detail.join(", "))
            };
            return Err(self.fail(&what, result.status_code));
        }
        let outputs = m
            .decode_outputs(result.output_arguments.as_deref().unwrap_or_default())
            .map_err(|e| EquipmentError::Opcua {
                kind: "opcua.type_mismatch",
                retryable: false,
                message: format!("device '{}' method '{name}': {e}", self.name),
            })?;
        Ok(json!({"device": self.name, "method": name, "outputs": outputs}))
    }

    /// A point's desired value in its wire form (exact, or refused with the point named).
    pub fn encode_point(&self, name: &str, value: &Value) -> Result<String, EquipmentError> {
        let p = self.point(name)?;
        p.encode(value)
            .map(|v| variant_text(&v))
            .map_err(|e| EquipmentError::Invalid(format!("point '{name}' of device '{}': {e}", self.name)))
    }

    /// Reads one point: its wire form and engineering value.
    pub async fn read_point(&self, name: &str) -> Result<(String, Value), EquipmentError> {
        let v = self.read_variants(&[name]).await?;
        let v = v.into_iter().next().unwrap_or(Variant::Empty);
        Ok((variant_text(&v), self.decoded(name, &v)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t: &str, scale: Option<f64>) -> Point {
        let spec: PointSpec = serde_json::from_value(json!({"node": "ns=2;s=X", "type": t, "scale": scale})).unwrap();
        Point::new(&spec).unwrap()
    }

    #[test]
    fn every_type_encodes_exactly_or_refuses() {
        let f = point("Float", None);
        assert_eq!(variant_text(&f.encode(&json!(72.5)).unwrap()), "Float 0x42910000");
        let e = f.encode(&json!(72.1)).unwrap_err();
        assert!(
            e.contains("not exactly representable as Float") && e.contains("72.0999984741211"),
            "{e}"
        );
        assert_eq!(f.decode(&Variant::Float(72.5)).unwrap(), json!(72.5));
        let u = point("UInt16", None);
        assert_eq!(variant_text(&u.encode(&json!(900.0)).unwrap()), "UInt16 900");
        assert!(u.encode(&json!(900.5)).is_err());
        assert!(u.encode(&json!(70000)).is_err());
        let s = point("Int16", Some(0.1));
        assert_eq!(variant_text(&s.encode(&json!(-25.5)).unwrap()), "Int16 -255");
        assert_eq!(s.decode(&Variant::Int16(-255)).unwrap(), json!(-25.5));
        let big = point("UInt64", None);
        assert_eq!(
            variant_text(&big.encode(&json!(u64::MAX)).unwrap()),
            format!("UInt64 {}", u64::MAX)
        );
        let d = point("Double", None);
        assert_eq!(d.decode(&d.encode(&json!(0.1)).unwrap()).unwrap(), json!(0.1));
        let b = point("Boolean", None);
        assert_eq!(variant_text(&b.encode(&json!(true)).unwrap()), "Boolean true");
        let t = point("String", None);
        assert_eq!(variant_text(&t.encode(&json!("auto")).unwrap()), "String \"auto\"");
        let when = point("DateTime", None);
        let v = when.encode(&json!("2026-12-03T10:00:00Z")).unwrap();
        assert_eq!(
            when.decode(&v).unwrap().as_str().unwrap().get(..19),
            Some("2026-12-03T10:00:00")
        );
        assert!(when.encode(&json!("yesterday")).is_err());
        // The server holding another type than the equipment file says is named.
        assert!(
            u.decode(&Variant::Double(1.0))
                .unwrap_err()
                .contains("holds Double, not the UInt16")
        );
    }

    #[test]
    fn reconnects_back_off_from_half_a_second_to_ten() {
        let ms: Vec<u128> = (0..8).map(|f| reconnect_delay(f).as_millis()).collect();
        assert_eq!(ms, [0, 500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        assert_eq!(reconnect_delay(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn method_arguments_are_typed_exactly_and_named() {
        let spec: MethodSpec = serde_saphyr::from_str(
            "{object: \"ns=2;s=Press\", method: \"ns=2;s=Start\", inputs: [{name: recipe, type: String}, {name: count, type: UInt32}], outputs: [{name: job, type: UInt32}]}",
        )
        .unwrap();
        let m = Method::new(&spec).unwrap();
        let args = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            m.encode_inputs(&args(json!({"count": 3, "recipe": "A"}))).unwrap(),
            vec![Variant::String("A".into()), Variant::UInt32(3)],
            "in the method's order, whatever the order of the step's map"
        );
        let err = m
            .encode_inputs(&args(json!({"recipe": "A", "count": 3.5})))
            .unwrap_err();
        assert!(err.contains("input 'count'"), "{err}");
        let err = m.encode_inputs(&args(json!({"recipe": "A"}))).unwrap_err();
        assert!(err.contains("'count' is missing"), "{err}");
        let err = m
            .encode_inputs(&args(json!({"recipe": "A", "count": 1, "x": 1})))
            .unwrap_err();
        assert!(err.contains("'x' is not an input"), "{err}");
        assert_eq!(m.decode_outputs(&[Variant::UInt32(7)]).unwrap()["job"], json!(7));
        let err = m.decode_outputs(&[Variant::String("7".into())]).unwrap_err();
        assert!(err.contains("output 'job'"), "{err}");
        assert!(m.decode_outputs(&[]).unwrap_err().contains("returned 0 outputs"));
    }

    #[test]
    fn statuses_map_onto_the_retry_policy() {
        for (code, kind, retry) in [
            (StatusCode::BadTimeout, "opcua.timeout", true),
            (StatusCode::BadSessionClosed, "opcua.not_connected", true),
            (StatusCode::BadServerNotConnected, "opcua.not_connected", true),
            (StatusCode::BadNodeIdUnknown, "opcua.unknown_node", false),
            (StatusCode::BadTypeMismatch, "opcua.type_mismatch", false),
            (StatusCode::BadUserAccessDenied, "opcua.access_denied", false),
            (StatusCode::BadIdentityTokenRejected, "opcua.identity_rejected", false),
            (StatusCode::BadCertificateUntrusted, "opcua.security", false),
        ] {
            assert_eq!(classify(code), (kind, retry), "{code}");
        }
    }

    #[test]
    fn settings_are_checked_with_the_field_named() {
        let spec: OpcuaSpec = serde_json::from_value(json!({
            "endpoint": "tcp://x", "security_policy": "Basic128", "user": "op",
            "points": {"p": {"node": "nonsense", "type": "UInt16"}}
        }))
        .unwrap();
        let problems = OpcuaDevice::new("press", &spec, Duration::from_secs(1))
            .err()
            .unwrap()
            .join("\n");
        for field in [
            "opcua.endpoint",
            "opcua.security_policy",
            "opcua.user and opcua.password_file",
            "opcua.points.p: node",
        ] {
            assert!(problems.contains(field), "{field}: {problems}");
        }
    }
}
