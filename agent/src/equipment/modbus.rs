//! Modbus TCP devices: a register map with names and types, reads, idempotent writes with
//! exact-match read-back, and a simulator (a tokio-modbus server) so recipes run without a PLC.

// Decodes untrusted bytes: no panics, no unchecked indexing (ARCHITECTURE.md, "Input").
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)
)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};

use super::EquipmentError;

/// Which Modbus table a point lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// Read/write bits.
    Coil,
    /// Read-only bits.
    DiscreteInput,
    /// Read/write 16-bit registers.
    Holding,
    /// Read-only 16-bit registers.
    Input,
}

/// How a point's registers are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    /// One bit (coils and discrete inputs).
    Bool,
    /// One register, unsigned.
    #[default]
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, two's complement.
    I32,
    /// Two registers, IEEE 754.
    F32,
}

/// Order of the two registers of a 32-bit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// High word first (the Modbus convention).
    #[default]
    Big,
    /// Low word first (common on some PLCs).
    Little,
}

/// A named point as written in the equipment file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointSpec {
    /// Table.
    pub table: Table,
    /// Zero-based address.
    pub address: u16,
    /// Data type (default `bool` for bit tables, `u16` for registers).
    #[serde(default, rename = "type")]
    pub data_type: Option<DataType>,
    /// Word order of 32-bit types.
    #[serde(default)]
    pub word_order: WordOrder,
    /// Engineering value = raw × scale (default 1).
    #[serde(default)]
    pub scale: Option<f64>,
    /// Unit, for people.
    #[serde(default)]
    pub unit: Option<String>,
}

/// A validated point.
#[derive(Debug, Clone)]
pub struct Point {
    table: Table,
    address: u16,
    data_type: DataType,
    word_order: WordOrder,
    scale: f64,
    unit: Option<String>,
}

impl Point {
    /// Validates a point spec.
    pub fn new(spec: &PointSpec) -> Result<Point, String> {
        let bits = matches!(spec.table, Table::Coil | Table::DiscreteInput);
        let data_type = spec
            .data_type
            .unwrap_or(if bits { DataType::Bool } else { DataType::U16 });
        if bits != (data_type == DataType::Bool) {
            return Err(format!("type {data_type:?} does not fit table {:?}", spec.table).to_lowercase());
        }
        let scale = spec.scale.unwrap_or(1.0);
        if !(scale.is_finite() && scale != 0.0) {
            return Err(format!("scale {scale} must be a non-zero number"));
        }
        let p = Point {
            table: spec.table,
            address: spec.address,
            data_type,
            word_order: spec.word_order,
            scale,
            unit: spec.unit.clone(),
        };
        if u32::from(p.address) + u32::from(p.words()) > 65536 {
            return Err(format!(
                "address {} with {} registers runs past 65535",
                p.address,
                p.words()
            ));
        }
        Ok(p)
    }

    fn words(&self) -> u16 {
        match self.data_type {
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            _ => 1,
        }
    }

    fn writable(&self) -> bool {
        matches!(self.table, Table::Coil | Table::Holding)
    }

    fn join(&self, w: [u16; 2]) -> u32 {
        let (hi, lo) = match self.word_order {
            WordOrder::Big => (w[0], w[1]),
            WordOrder::Little => (w[1], w[0]),
        };
        (u32::from(hi) << 16) | u32::from(lo)
    }

    /// Checks a unit's answer has exactly the words this point takes (a unit answering
    /// nonsense must not crash the agent) and decodes it.
    pub fn decode_response(&self, w: &[u16]) -> Result<Value, String> {
        // Coils come in whole bytes: tokio-modbus hands back at least the one asked for.
        let ok = match self.table {
            Table::Coil | Table::DiscreteInput => !w.is_empty(),
            _ => w.len() == usize::from(self.words()),
        };
        if !ok {
            return Err(format!(
                "{} {} for a point of {} at address {}",
                w.len(),
                if w.len() == 1 { "value" } else { "values" },
                self.words(),
                self.address
            ));
        }
        Ok(self.decode(w))
    }

    fn split(&self, v: u32) -> Vec<u16> {
        let (hi, lo) = ((v >> 16) as u16, v as u16);
        match self.word_order {
            WordOrder::Big => vec![hi, lo],
            WordOrder::Little => vec![lo, hi],
        }
    }

    /// Raw registers to an engineering value (missing words read as 0; see `decode_response`).
    fn decode(&self, w: &[u16]) -> Value {
        let word = |i: usize| w.get(i).copied().unwrap_or(0);
        let pair = [word(0), word(1)];
        let raw = match self.data_type {
            DataType::Bool => return Value::Bool(w.first().is_some_and(|&b| b != 0)),
            DataType::U16 => f64::from(word(0)),
            DataType::I16 => f64::from(word(0) as i16),
            DataType::U32 => f64::from(self.join(pair)),
            DataType::I32 => f64::from(self.join(pair) as i32),
            DataType::F32 => f64::from(f32::from_bits(self.join(pair))),
        };
        // An f32 reads as exactly what it holds (72.30000305175781, not 72.3): desired values
        // are compared on the registers, and a rounded decimal would hide a difference.
        super::number(super::rescale(raw, self.scale))
    }

    /// An engineering value to raw registers; refuses values the point cannot hold exactly.
    pub fn encode(&self, v: &Value) -> Result<Vec<u16>, String> {
        if self.data_type == DataType::Bool {
            return v
                .as_bool()
                .map(|b| vec![u16::from(b)])
                .ok_or_else(|| format!("{v} is not true or false"));
        }
        let v_f = v.as_f64().ok_or_else(|| format!("{v} is not a number"))?;
        let x = super::unscale(v_f, self.scale);
        let int = |lo: f64, hi: f64| -> Result<i64, String> {
            let r = x.round();
            if (x - r).abs() > 1e-9 || r < lo || r > hi {
                Err(format!(
                    "{v} is not representable as {:?} with scale {}",
                    self.data_type, self.scale
                )
                .to_lowercase())
            } else {
                Ok(r as i64)
            }
        };
        let exact_int = |raw: Vec<u16>| -> Result<Vec<u16>, String> {
            // 250.50000000001 at scale 0.1 rounds to 2505, which reads back as 250.5: not it.
            if self.decode(&raw).as_f64() == Some(v_f) || v_f == 0.0 {
                Ok(raw)
            } else {
                Err(format!(
                    "{v} is not exactly representable as {:?} with scale {} (it would read back as {})",
                    self.data_type,
                    self.scale,
                    self.decode(&raw)
                )
                .to_lowercase())
            }
        };
        Ok(match self.data_type {
            DataType::U16 => exact_int(vec![int(0.0, 65535.0)? as u16])?,
            DataType::I16 => exact_int(vec![int(-32768.0, 32767.0)? as i16 as u16])?,
            DataType::U32 => exact_int(self.split(int(0.0, 4_294_967_295.0)? as u32))?,
            DataType::I32 => exact_int(self.split(int(-2_147_483_648.0, 2_147_483_647.0)? as i32 as u32))?,
            DataType::F32 => {
                // `as` saturates to infinity: 5e115 would be written as +inf (found by fuzzing).
                let f = x as f32;
                if !f.is_finite() || (f == 0.0 && x != 0.0) {
                    return Err(format!("{v} is out of range for f32 with scale {}", self.scale));
                }
                // JSON has one zero: write +0.0, which is what a read of -0.0 would verify as.
                let f = if f == 0.0 { 0.0f32 } else { f };
                let raw = self.split(f.to_bits());
                // Exact means exact: the value must be what these registers read as. 72.1 would
                // be stored as 72.09999847…, which is not what was asked.
                if self.decode(&raw).as_f64() != Some(v_f) && !(v_f == 0.0 && f == 0.0) {
                    let (lo, hi) = neighbours(f, x);
                    let near = |g: f32| self.decode(&self.split(g.to_bits()));
                    return Err(format!(
                        "{v} is not exactly representable as f32 with scale {} (nearest: {} or {})",
                        self.scale,
                        near(lo),
                        near(hi)
                    ));
                }
                raw
            }
            DataType::Bool => return Err(format!("{v} is not true or false")),
        })
    }
}

/// Registers as a PLC's manual writes them: `0x4291 0x0000`.
pub fn words_text(w: &[u16]) -> String {
    w.iter().map(|x| format!("0x{x:04X}")).collect::<Vec<_>>().join(" ")
}

/// The two f32 values either side of `x`, given `f`, the one nearest to it.
fn neighbours(f: f32, x: f64) -> (f32, f32) {
    let step = |f: f32, up: bool| {
        let b = f.to_bits();
        // Away from zero is one more in the bit pattern's magnitude, whatever the sign.
        let away = up == (f >= 0.0);
        f32::from_bits(if away { b.wrapping_add(1) } else { b.wrapping_sub(1) })
    };
    if f64::from(f) < x {
        (f, step(f, true))
    } else {
        (step(f, false), f)
    }
}

/// A Modbus TCP unit with its register map. Transactions are serialised per unit.
pub struct ModbusDevice {
    name: String,
    link: Link,
    unit: u8,
    timeout: Duration,
    points: BTreeMap<String, Point>,
    conn: Connection,
}

/// Serial-line settings of a Modbus RTU link.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtuSpec {
    /// Serial device, e.g. `/dev/ttyUSB0`.
    pub port: String,
    /// Baud rate (default 9600).
    #[serde(default)]
    pub baud: Option<u32>,
    /// `none` (default), `even` or `odd`.
    #[serde(default)]
    pub parity: Option<String>,
    /// 1 (default) or 2.
    #[serde(default)]
    pub stop_bits: Option<u8>,
    /// 7 or 8 (default).
    #[serde(default)]
    pub data_bits: Option<u8>,
}

/// Where a Modbus unit is reached.
#[derive(Debug, Clone)]
pub enum Link {
    /// Modbus TCP, `host:port`.
    Tcp(String),
    /// Modbus RTU on a serial line.
    Rtu(RtuSpec),
}

impl Link {
    /// Units behind the same link share one connection (a serial line carries one transaction at a time).
    pub fn key(&self) -> String {
        match self {
            Link::Tcp(a) => format!("tcp:{a}"),
            Link::Rtu(r) => format!("rtu:{}", r.port),
        }
    }

    fn describe(&self) -> &str {
        match self {
            Link::Tcp(a) => a,
            Link::Rtu(r) => &r.port,
        }
    }

    /// Checks the settings without opening anything.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Link::Tcp(a) if !a.contains(':') => Err(format!("tcp: '{a}' is not host:port")),
            Link::Tcp(_) => Ok(()),
            Link::Rtu(r) => {
                serial_settings(r)?;
                Ok(())
            }
        }
    }

    async fn open(&self, unit: u8) -> Result<Context, String> {
        match self {
            Link::Tcp(a) => {
                let addr: SocketAddr = tokio::net::lookup_host(a)
                    .await
                    .map_err(|e| e.to_string())?
                    .next()
                    .ok_or("no address")?;
                tokio_modbus::client::tcp::connect_slave(addr, Slave(unit))
                    .await
                    .map_err(|e| e.to_string())
            }
            Link::Rtu(r) => {
                let (baud, parity, stop, data) = serial_settings(r)?;
                use tokio_serial::SerialPortBuilderExt;
                let port = tokio_serial::new(&r.port, baud)
                    .parity(parity)
                    .stop_bits(stop)
                    .data_bits(data)
                    .open_native_async()
                    .map_err(|e| e.to_string())?;
                Ok(tokio_modbus::client::rtu::attach_slave(port, Slave(unit)))
            }
        }
    }
}

fn serial_settings(
    r: &RtuSpec,
) -> Result<
    (
        u32,
        tokio_serial::Parity,
        tokio_serial::StopBits,
        tokio_serial::DataBits,
    ),
    String,
> {
    let parity = match r.parity.as_deref().unwrap_or("none") {
        "none" => tokio_serial::Parity::None,
        "even" => tokio_serial::Parity::Even,
        "odd" => tokio_serial::Parity::Odd,
        other => return Err(format!("rtu.parity: '{other}' is not none, even or odd")),
    };
    let stop = match r.stop_bits.unwrap_or(1) {
        1 => tokio_serial::StopBits::One,
        2 => tokio_serial::StopBits::Two,
        other => return Err(format!("rtu.stop_bits: {other} is not 1 or 2")),
    };
    let data = match r.data_bits.unwrap_or(8) {
        7 => tokio_serial::DataBits::Seven,
        8 => tokio_serial::DataBits::Eight,
        other => return Err(format!("rtu.data_bits: {other} is not 7 or 8")),
    };
    let baud = r.baud.unwrap_or(9600);
    if baud == 0 {
        return Err("rtu.baud: must be greater than zero".into());
    }
    Ok((baud, parity, stop, data))
}

/// A connection shared by the units behind one link.
pub type Connection = Arc<tokio::sync::Mutex<Option<Context>>>;

impl ModbusDevice {
    /// A unit behind `link`, using the link's shared connection.
    pub fn new(
        name: &str,
        link: Link,
        conn: Connection,
        unit: u8,
        timeout: Duration,
        points: BTreeMap<String, Point>,
    ) -> Self {
        ModbusDevice {
            name: name.to_string(),
            link,
            unit,
            timeout,
            points,
            conn,
        }
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

    /// Reads points by name.
    pub async fn read(&self, names: &[String]) -> Result<Map<String, Value>, EquipmentError> {
        let points: Vec<(&String, &Point)> = names
            .iter()
            .map(|n| Ok((n, self.point(n)?)))
            .collect::<Result<_, EquipmentError>>()?;
        let mut conn = self.conn.lock().await;
        let mut out = Map::new();
        for (name, p) in points {
            let words = self
                .transact(&mut conn, |ctx| Box::pin(read_raw(ctx, p.clone())))
                .await?;
            let value = p.decode_response(&words).map_err(|e| self.bad_response(name, e))?;
            out.insert(name.clone(), value);
        }
        Ok(out)
    }

    /// Writes points idempotently: reads first and writes only what differs, then (with
    /// `verify`) reads everything back and compares it exactly.
    pub async fn write(&self, values: &Map<String, Value>, verify: bool) -> Result<Value, EquipmentError> {
        let mut plan = Vec::new();
        for (name, v) in values {
            let p = self.point(name)?;
            if !p.writable() {
                return Err(EquipmentError::Invalid(
                    format!("point '{name}' of device '{}' is read-only ({:?})", self.name, p.table).to_lowercase(),
                ));
            }
            let raw = p
                .encode(v)
                .map_err(|e| EquipmentError::Invalid(format!("point '{name}': {e}")))?;
            plan.push((name, p, raw, v));
        }
        let mut conn = self.conn.lock().await;
        let (mut written, mut unchanged) = (Vec::new(), Vec::new());
        for (name, p, raw, _) in &plan {
            let current = self
                .transact(&mut conn, |ctx| Box::pin(read_raw(ctx, (*p).clone())))
                .await?;
            p.decode_response(&current).map_err(|e| self.bad_response(name, e))?;
            if current == *raw {
                unchanged.push(name.to_string());
                continue;
            }
            let raw = raw.clone();
            self.transact(&mut conn, |ctx| Box::pin(write_raw(ctx, (*p).clone(), raw.clone())))
                .await?;
            written.push(name.to_string());
        }
        if verify {
            let mut mismatches = Vec::new();
            for (name, p, raw, wanted) in &plan {
                let found = self
                    .transact(&mut conn, |ctx| Box::pin(read_raw(ctx, (*p).clone())))
                    .await?;
                p.decode_response(&found).map_err(|e| self.bad_response(name, e))?;
                if found != *raw {
                    mismatches
                        .push(json!({"point": name, "wanted": wanted, "found": p.decode(&found), "unit": p.unit}));
                }
            }
            if !mismatches.is_empty() {
                return Err(EquipmentError::Mismatch(mismatches));
            }
        }
        Ok(json!({"device": self.name, "written": written, "unchanged": unchanged, "verified": verify}))
    }

    /// Compares points with expected values exactly, without writing. With `report`, a mismatch
    /// is an output (`matched: false` and the points) instead of an error, for workflows that branch.
    pub async fn verify(&self, expected: &Map<String, Value>, report: bool) -> Result<Value, EquipmentError> {
        let mut wanted = Vec::new();
        for (name, v) in expected {
            wanted.push((name, v, self.encode_point(name, v)?));
        }
        let names: Vec<String> = expected.keys().cloned().collect();
        let mut mismatches = Vec::new();
        // Raw words against raw words: a decoded f32 is a rounded decimal, not the register.
        for (name, v, raw) in wanted {
            let (found_raw, found) = self.read_point(name).await?;
            if found_raw != raw {
                let unit = self.points.get(name).and_then(|p| p.unit.clone());
                mismatches.push(json!({"point": name, "wanted": v, "found": found, "unit": unit}));
            }
        }
        if mismatches.is_empty() || report {
            Ok(
                json!({"device": self.name, "matched": mismatches.is_empty(), "points": names, "mismatches": mismatches}),
            )
        } else {
            Err(EquipmentError::Mismatch(mismatches))
        }
    }

    /// A point's desired value as the raw words it must hold (exact, or refused with the point named).
    pub fn encode_point(&self, name: &str, value: &Value) -> Result<Vec<u16>, EquipmentError> {
        self.point(name)?
            .encode(value)
            .map_err(|e| EquipmentError::Invalid(format!("point '{name}' of device '{}': {e}", self.name)))
    }

    /// Reads one point: its raw words and engineering value.
    pub async fn read_point(&self, name: &str) -> Result<(Vec<u16>, Value), EquipmentError> {
        let p = self.point(name)?.clone();
        let mut conn = self.conn.lock().await;
        let mut words = self
            .transact(&mut conn, |ctx| Box::pin(read_raw(ctx, p.clone())))
            .await?;
        let value = p.decode_response(&words).map_err(|e| self.bad_response(name, e))?;
        // A coil read comes in whole bytes: the point is the first bit.
        if matches!(p.table, Table::Coil | Table::DiscreteInput) {
            words.truncate(1);
        }
        Ok((words, value))
    }

    fn bad_response(&self, point: &str, why: String) -> EquipmentError {
        EquipmentError::BadResponse(format!(
            "device '{}' ({} unit {}) answered {why} (point '{point}')",
            self.name,
            self.link.describe(),
            self.unit
        ))
    }

    /// One request on the unit's connection, with a timeout; reconnects after transport errors.
    async fn transact<T>(
        &self,
        conn: &mut Option<Context>,
        op: impl for<'c> Fn(
            &'c mut Context,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = tokio_modbus::Result<T>> + Send + 'c>>,
    ) -> Result<T, EquipmentError> {
        let work = async {
            if conn.is_none() {
                let ctx = self
                    .link
                    .open(self.unit)
                    .await
                    .map_err(|e| EquipmentError::Connect(format!("{}: {e}", self.link.describe())))?;
                *conn = Some(ctx);
            }
            let Some(ctx) = conn.as_mut() else {
                return Err(EquipmentError::Connect(self.link.describe().to_string()));
            };
            // The connection may be shared with other units on the same link.
            tokio_modbus::client::Context::set_slave(ctx, Slave(self.unit));
            match op(ctx).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(code)) => Err(EquipmentError::Exception(code)),
                Err(e) => {
                    *conn = None;
                    Err(EquipmentError::Bus(format!("{}: {e}", self.link.describe())))
                }
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                // The answer may still arrive on this connection; start afresh.
                *conn = None;
                Err(EquipmentError::Timeout(self.timeout))
            }
        }
    }
}

async fn read_raw(ctx: &mut Context, p: Point) -> tokio_modbus::Result<Vec<u16>> {
    let n = p.words();
    Ok(match p.table {
        Table::Coil => ctx
            .read_coils(p.address, 1)
            .await?
            .map(|b| b.iter().map(|&x| u16::from(x)).collect()),
        Table::DiscreteInput => ctx
            .read_discrete_inputs(p.address, 1)
            .await?
            .map(|b| b.iter().map(|&x| u16::from(x)).collect()),
        Table::Holding => ctx.read_holding_registers(p.address, n).await?,
        Table::Input => ctx.read_input_registers(p.address, n).await?,
    })
}

async fn write_raw(ctx: &mut Context, p: Point, raw: Vec<u16>) -> tokio_modbus::Result<()> {
    match p.table {
        Table::Coil => {
            ctx.write_single_coil(p.address, raw.first().is_some_and(|&b| b != 0))
                .await
        }
        _ => ctx.write_multiple_registers(p.address, &raw).await,
    }
}

/// Faults the simulator injects.
#[derive(Debug, Clone, Default)]
pub struct SimFaults {
    /// Answer this many requests with "server device busy" first.
    pub busy_first: u32,
    /// Delay every answer (to make clients time out).
    pub delay: Duration,
    /// Addresses at or above this are illegal (exception 0x02); 0 means none are.
    pub limit: u16,
    /// Holding registers whose writes are clamped to a maximum, like a PLC enforcing limits.
    pub clamps: HashMap<u16, u16>,
    /// Answer register reads with one register fewer than asked, like a faulty unit.
    pub short_reads: bool,
}

#[derive(Default)]
struct SimState {
    coils: HashMap<u16, bool>,
    discrete: HashMap<u16, bool>,
    holding: HashMap<u16, u16>,
    input: HashMap<u16, u16>,
    busy_left: u32,
}

/// An in-memory PLC: every table of one unit, with injectable faults. Writes are logged as JSON
/// lines so tests can count them.
#[derive(Clone)]
pub struct Simulator {
    state: Arc<Mutex<SimState>>,
    faults: SimFaults,
    log: Arc<dyn Fn(Value) + Send + Sync>,
}

impl Simulator {
    /// A simulator; `log` receives one JSON object per write.
    pub fn new(faults: SimFaults, log: Arc<dyn Fn(Value) + Send + Sync>) -> Self {
        let state = SimState {
            busy_left: faults.busy_first,
            ..SimState::default()
        };
        Simulator {
            state: Arc::new(Mutex::new(state)),
            faults,
            log,
        }
    }

    /// Serves Modbus RTU on a serial device until the task is dropped.
    pub async fn serve_rtu(self, port: &str, baud: u32) -> std::io::Result<()> {
        tokio_modbus::server::rtu::Server::new_from_path(port, baud)?
            .serve_forever(self)
            .await
    }

    /// Serves Modbus TCP on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let server = tokio_modbus::server::tcp::Server::new(listener);
        let sim = self;
        let on_connected = move |stream, _addr| {
            let sim = sim.clone();
            async move { Ok(Some((sim, stream))) }
        };
        server
            .serve(
                &on_connected,
                |e| tracing::warn!(error = %e, "modbus simulator connection error"),
            )
            .await
    }

    fn handle(&self, req: Request<'static>) -> Result<Response, ExceptionCode> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.busy_left > 0 {
            s.busy_left -= 1;
            return Err(ExceptionCode::ServerDeviceBusy);
        }
        let limit = if self.faults.limit == 0 {
            u16::MAX
        } else {
            self.faults.limit
        };
        let check = |addr: u16, n: u16| -> Result<(), ExceptionCode> {
            if u32::from(addr) + u32::from(n) > u32::from(limit) {
                Err(ExceptionCode::IllegalDataAddress)
            } else {
                Ok(())
            }
        };
        let bits =
            |m: &HashMap<u16, bool>, a: u16, n: u16| (a..a + n).map(|i| m.get(&i).copied().unwrap_or(false)).collect();
        let short = u16::from(self.faults.short_reads);
        let words = |m: &HashMap<u16, u16>, a: u16, n: u16| {
            (a..a + n.saturating_sub(short))
                .map(|i| m.get(&i).copied().unwrap_or(0))
                .collect()
        };
        Ok(match req {
            Request::ReadCoils(a, n) => {
                check(a, n)?;
                Response::ReadCoils(bits(&s.coils, a, n))
            }
            Request::ReadDiscreteInputs(a, n) => {
                check(a, n)?;
                Response::ReadDiscreteInputs(bits(&s.discrete, a, n))
            }
            Request::ReadHoldingRegisters(a, n) => {
                check(a, n)?;
                Response::ReadHoldingRegisters(words(&s.holding, a, n))
            }
            Request::ReadInputRegisters(a, n) => {
                check(a, n)?;
                Response::ReadInputRegisters(words(&s.input, a, n))
            }
            Request::WriteSingleCoil(a, v) => {
                check(a, 1)?;
                s.coils.insert(a, v);
                (self.log)(json!({"write": "coil", "address": a, "value": v}));
                Response::WriteSingleCoil(a, v)
            }
            Request::WriteSingleRegister(a, v) => {
                check(a, 1)?;
                let asked = v;
                let v = self.faults.clamps.get(&a).map_or(v, |&max| v.min(max));
                s.holding.insert(a, v);
                (self.log)(register_write(a, &[v], &[asked]));
                Response::WriteSingleRegister(a, v)
            }
            Request::WriteMultipleRegisters(a, vs) => {
                check(a, vs.len() as u16)?;
                let mut stored = Vec::with_capacity(vs.len());
                for (i, v) in vs.iter().enumerate() {
                    let at = a + i as u16;
                    let v = self.faults.clamps.get(&at).map_or(*v, |&max| (*v).min(max));
                    s.holding.insert(at, v);
                    stored.push(v);
                }
                (self.log)(register_write(a, &stored, vs.as_ref()));
                Response::WriteMultipleRegisters(a, vs.len() as u16)
            }
            Request::WriteMultipleCoils(a, vs) => {
                check(a, vs.len() as u16)?;
                for (i, v) in vs.iter().enumerate() {
                    s.coils.insert(a + i as u16, *v);
                }
                (self.log)(json!({"write": "coil", "address": a, "values": vs.to_vec()}));
                Response::WriteMultipleCoils(a, vs.len() as u16)
            }
            _ => return Err(ExceptionCode::IllegalFunction),
        })
    }
}

/// A simulator log line for a register write: what the unit now holds and, when a clamp
/// changed it, what was asked.
fn register_write(address: u16, stored: &[u16], asked: &[u16]) -> Value {
    let mut line = Map::new();
    line.insert("write".into(), json!("holding"));
    line.insert("address".into(), json!(address));
    line.insert("values".into(), json!(stored));
    if stored != asked {
        line.insert("requested".into(), json!(asked));
    }
    Value::Object(line)
}

impl tokio_modbus::server::Service for Simulator {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let result = self.handle(req);
        let delay = self.faults.delay;
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(yaml: &str) -> Point {
        Point::new(&serde_saphyr::from_str::<PointSpec>(yaml).unwrap()).unwrap()
    }

    #[test]
    fn encodes_and_decodes_every_type_exactly() {
        let f = point("{table: holding, address: 0, type: f32}");
        assert_eq!(f.encode(&json!(72.5)).unwrap(), vec![0x4291, 0x0000]);
        assert_eq!(f.decode(&[0x4291, 0x0000]), json!(72.5));
        // A unit answering fewer registers than the point takes is an error, not a panic.
        assert!(
            f.decode_response(&[0x4291])
                .unwrap_err()
                .contains("1 value for a point of 2")
        );
        assert!(f.decode_response(&[]).is_err());
        assert!(f.decode_response(&[1, 2, 3]).is_err());
        // Found by fuzz/modbus_response: out of f32's range used to encode as +inf.
        assert!(
            f.encode(&json!(5.170722890857509e115))
                .unwrap_err()
                .contains("out of range for f32")
        );
        assert!(
            f.encode(&json!(-7.0152910244413335e-121)).is_err(),
            "underflows to zero"
        );
        assert_eq!(f.encode(&json!(-0.0)).unwrap(), vec![0, 0]);
        assert_eq!(f.decode_response(&[0x4291, 0]).unwrap(), json!(72.5));
        // Exact means exact: 72.3 has no f32; the f32 nearest it is written as itself.
        let e = f.encode(&json!(72.3)).unwrap_err();
        assert!(
            e.contains("not exactly representable as f32") && e.contains("72.30000305175781"),
            "{e}"
        );
        assert_eq!(
            f.decode(&f.encode(&json!(72.30000305175781)).unwrap()),
            json!(72.30000305175781)
        );
        let scaled = point("{table: holding, address: 0, type: f32, scale: 0.001}");
        let raw = scaled.encode(&json!(7.5)).unwrap();
        assert_eq!(scaled.decode(&raw), json!(7.5));
        assert!(
            scaled.encode(&json!(7.66e-42)).is_err(),
            "found by fuzz/modbus_response: no f32 reads back as it"
        );
        assert!(f.encode(&json!(-72.1)).unwrap_err().contains("-72.0999984741211"));
        let l = point("{table: holding, address: 0, type: u32, word_order: little, scale: 0.1}");
        assert_eq!(l.encode(&json!(250.5)).unwrap(), vec![2505, 0]);
        assert_eq!(l.decode(&[2505, 0]), json!(250.5));
        let i = point("{table: holding, address: 0, type: i16}");
        assert_eq!(i.encode(&json!(-2)).unwrap(), vec![0xFFFE]);
        assert_eq!(i.decode(&[0xFFFE]), json!(-2));
        let c = point("{table: coil, address: 3}");
        assert_eq!(c.encode(&json!(true)).unwrap(), vec![1]);
    }

    #[test]
    fn refuses_values_a_point_cannot_hold() {
        let scaled = point("{table: holding, address: 0, type: u16, scale: 0.1}");
        assert_eq!(scaled.encode(&json!(250.5)).unwrap(), vec![2505]);
        assert!(
            scaled
                .encode(&json!(250.50000000001))
                .unwrap_err()
                .contains("read back as 250.5")
        );
        let u = point("{table: holding, address: 0, type: u16}");
        assert!(u.encode(&json!(70000)).is_err());
        assert!(u.encode(&json!(1.5)).is_err());
        assert!(u.encode(&json!("x")).is_err());
        assert!(
            Point::new(&serde_saphyr::from_str::<PointSpec>("{table: coil, address: 0, type: u16}").unwrap()).is_err()
        );
        assert!(
            Point::new(&serde_saphyr::from_str::<PointSpec>("{table: holding, address: 65535, type: f32}").unwrap())
                .is_err()
        );
    }
}
