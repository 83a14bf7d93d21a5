//! Equipment: named devices from an equipment file, each bound to a backend — `sim` (the
//! simulated plant of `outpost-firmware`) or a Modbus TCP unit — and driven through the
//! firmware drivers. Every hardware call runs off the async workers, one transaction at a time
//! per bus, under a timeout.

#[cfg(feature = "linux-hal")]
mod linux;
pub mod modbus;
#[cfg(feature = "opcua")]
pub mod opcua;
#[cfg(feature = "opcua-sim")]
pub mod opcua_sim;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use embedded_hal::delay::DelayNs;
use outpost_firmware::input::DigitalInput;
use outpost_firmware::mcp3008::{self, Mcp3008};
use outpost_firmware::output::{FeedbackOutput, LatchedOutput};
use outpost_firmware::sht3x::{self, Sht3x};
use outpost_firmware::sim::{Oven, Plant, SimOutput};
use serde::Deserialize;
use serde_json::{Value, json};

use outpost_shared::definition::{DurationText, parse_duration};

/// Why an equipment operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EquipmentError {
    /// A bad request: unknown point, value the point cannot hold, wrong device kind.
    #[error("{0}")]
    Invalid(String),
    /// The device did not acknowledge.
    #[error("device did not acknowledge (absent, unpowered or wrong address)")]
    Nack,
    /// A corrupted transfer.
    #[error("{0}")]
    Crc(String),
    /// Another bus error.
    #[error("bus error: {0}")]
    Bus(String),
    /// An output did not read back as written.
    #[error("{0}")]
    Readback(String),
    /// No answer in time.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// Cannot connect to a Modbus unit.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The Modbus unit answered with an exception.
    #[error("modbus exception: {0:?}")]
    Exception(tokio_modbus::ExceptionCode),
    /// The unit answered with something that is not an answer to the request (too few
    /// registers, …); retryable, as a garbled frame usually is.
    #[error("bad response: {0}")]
    BadResponse(String),
    /// Values read back differ from those wanted; one entry per point.
    #[error("read-back differs from the desired values: {}", describe(.0))]
    Mismatch(Vec<Value>),
    /// An OPC UA server refused or failed a request (the status names why).
    #[error("{message}")]
    Opcua {
        /// The journaled kind (`opcua.unknown_node`, `opcua.timeout`, …).
        kind: &'static str,
        /// Whether retrying can help.
        retryable: bool,
        /// The device, what was asked and the status.
        message: String,
    },
}

/// An engineering value to the raw number a device holds (`raw × scale = value`). Dividing by a
/// whole reciprocal (0.1 → ×10) keeps 250.5 at scale 0.1 exactly 2505.
pub(crate) fn unscale(value: f64, scale: f64) -> f64 {
    let inv = 1.0 / scale;
    if scale.abs() < 1.0 && (inv - inv.round()).abs() < 1e-9 {
        value * inv.round()
    } else {
        value / scale
    }
}

/// A raw number to its engineering value, the inverse of [`unscale`] (2505 × 0.1 reads 250.5,
/// not 250.50000000000003).
pub(crate) fn rescale(raw: f64, scale: f64) -> f64 {
    let inv = 1.0 / scale;
    if scale.abs() < 1.0 && (inv - inv.round()).abs() < 1e-9 {
        raw / inv.round()
    } else {
        raw * scale
    }
}

/// A number as JSON: whole numbers stay integers.
pub(crate) fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

fn describe(points: &[Value]) -> String {
    points
        .iter()
        .map(|p| {
            format!(
                "{} wanted {} found {}",
                p["point"].as_str().unwrap_or("?"),
                p["wanted"],
                p["found"]
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl EquipmentError {
    /// The journaled error kind.
    pub fn kind(&self) -> &'static str {
        match self {
            EquipmentError::Invalid(_) => "equipment.invalid",
            EquipmentError::Nack => "equipment.nack",
            EquipmentError::Crc(_) => "equipment.crc",
            EquipmentError::Bus(_) => "equipment.bus",
            EquipmentError::Readback(_) => "equipment.readback",
            EquipmentError::Timeout(_) => "equipment.timeout",
            EquipmentError::Connect(_) => "modbus.connect",
            EquipmentError::Exception(tokio_modbus::ExceptionCode::IllegalDataAddress) => "modbus.illegal_address",
            EquipmentError::Exception(_) => "modbus.exception",
            EquipmentError::Mismatch(_) => "equipment.mismatch",
            EquipmentError::BadResponse(_) => "modbus.bad_response",
            EquipmentError::Opcua { kind, .. } => kind,
        }
    }

    /// False when retrying cannot help: a bad request or an address the unit does not have.
    pub fn retryable(&self) -> bool {
        use tokio_modbus::ExceptionCode as E;
        !matches!(
            self,
            EquipmentError::Invalid(_)
                | EquipmentError::Exception(E::IllegalDataAddress | E::IllegalFunction | E::IllegalDataValue)
                | EquipmentError::Opcua { retryable: false, .. }
        )
    }
}

impl<E: std::fmt::Debug> From<outpost_firmware::Error<E>> for EquipmentError {
    fn from(e: outpost_firmware::Error<E>) -> Self {
        use outpost_firmware::Error as F;
        match e {
            F::Nack => EquipmentError::Nack,
            F::Crc { .. } => EquipmentError::Crc(e.to_string()),
            F::Bus(_) => EquipmentError::Bus(e.to_string()),
            F::OutOfRange => EquipmentError::Invalid(e.to_string()),
            F::Readback { .. } => EquipmentError::Readback(e.to_string()),
        }
    }
}

/// Delay for drivers, by sleeping the (blocking) thread they run on.
struct ThreadDelay;

impl DelayNs for ThreadDelay {
    fn delay_ns(&mut self, ns: u32) {
        std::thread::sleep(Duration::from_nanos(u64::from(ns)));
    }
}

/// A switched output, whichever driver verifies it.
trait BinaryOutput: Send {
    fn set(&mut self, on: bool) -> Result<(), EquipmentError>;
    fn get(&mut self) -> Result<bool, EquipmentError>;
}

impl<O: embedded_hal::digital::StatefulOutputPin + Send> BinaryOutput for LatchedOutput<O> {
    fn set(&mut self, on: bool) -> Result<(), EquipmentError> {
        Ok(LatchedOutput::set(self, on)?)
    }
    fn get(&mut self) -> Result<bool, EquipmentError> {
        Ok(LatchedOutput::get(self)?)
    }
}

impl<O: embedded_hal::digital::OutputPin + Send, F: embedded_hal::digital::InputPin + Send> BinaryOutput
    for FeedbackOutput<O, F>
{
    fn set(&mut self, on: bool) -> Result<(), EquipmentError> {
        Ok(FeedbackOutput::set(self, on, &mut ThreadDelay)?)
    }
    fn get(&mut self) -> Result<bool, EquipmentError> {
        Ok(FeedbackOutput::get(self)?)
    }
}

/// A switch input, whatever its pin.
trait BinaryInput: Send {
    fn is_active(&mut self) -> Result<bool, EquipmentError>;
}

impl<I: embedded_hal::digital::InputPin + Send> BinaryInput for DigitalInput<I> {
    fn is_active(&mut self) -> Result<bool, EquipmentError> {
        Ok(DigitalInput::is_active(self)?)
    }
}

/// A temperature/humidity sensor, whatever its bus.
trait Thermometer: Send {
    fn measure(&mut self) -> Result<sht3x::Measurement, EquipmentError>;
}

impl<I: embedded_hal::i2c::I2c + Send> Thermometer for Sht3x<I>
where
    I::Error: std::fmt::Debug,
{
    fn measure(&mut self) -> Result<sht3x::Measurement, EquipmentError> {
        Ok(Sht3x::measure(self, &mut ThreadDelay)?)
    }
}

/// An ADC, whatever its bus.
trait AdcReader: Send {
    fn read(&mut self, channel: u8) -> Result<u16, EquipmentError>;
}

impl<S: embedded_hal::spi::SpiDevice + Send> AdcReader for Mcp3008<S>
where
    S::Error: std::fmt::Debug,
{
    fn read(&mut self, channel: u8) -> Result<u16, EquipmentError> {
        Ok(Mcp3008::read(self, channel)?)
    }
}

enum Driver {
    Output(Box<dyn BinaryOutput>),
    Input(Box<dyn BinaryInput>),
    Sht3x(Box<dyn Thermometer>),
    Mcp3008(Box<dyn AdcReader>, f32),
}

/// A device on a bus: the driver, and the lock its bus shares with the other devices on it.
struct HalDevice {
    kind: &'static str,
    driver: Arc<Mutex<Driver>>,
    bus: Arc<tokio::sync::Mutex<()>>,
}

enum Device {
    Hal(HalDevice),
    Modbus(Arc<modbus::ModbusDevice>),
    #[cfg(feature = "opcua")]
    Opcua(Arc<opcua::OpcuaDevice>),
}

/// A device whose points are typed (Modbus registers, OPC UA nodes): what desired state sets.
pub enum PointDevice {
    /// A Modbus unit.
    Modbus(Arc<modbus::ModbusDevice>),
    /// An OPC UA server.
    #[cfg(feature = "opcua")]
    Opcua(Arc<opcua::OpcuaDevice>),
}

impl PointDevice {
    /// `modbus` or `opcua`.
    pub fn kind(&self) -> &'static str {
        match self {
            PointDevice::Modbus(_) => "modbus",
            #[cfg(feature = "opcua")]
            PointDevice::Opcua(_) => "opcua",
        }
    }

    /// A point's desired value in its wire form (`PointCheck::desired_raw`), or refused.
    pub fn encode_point(&self, point: &str, value: &Value) -> Result<String, EquipmentError> {
        match self {
            PointDevice::Modbus(d) => d.encode_point(point, value).map(|w| modbus::words_text(&w)),
            #[cfg(feature = "opcua")]
            PointDevice::Opcua(d) => d.encode_point(point, value),
        }
    }

    /// Reads points by name.
    pub async fn read(&self, names: &[String]) -> Result<serde_json::Map<String, Value>, EquipmentError> {
        match self {
            PointDevice::Modbus(d) => d.read(names).await,
            #[cfg(feature = "opcua")]
            PointDevice::Opcua(d) => d.read(names).await,
        }
    }

    /// Writes points idempotently (read first, write what differs, with `verify` read back exactly).
    pub async fn write(&self, values: &serde_json::Map<String, Value>, verify: bool) -> Result<Value, EquipmentError> {
        match self {
            PointDevice::Modbus(d) => d.write(values, verify).await,
            #[cfg(feature = "opcua")]
            PointDevice::Opcua(d) => d.write(values, verify).await,
        }
    }

    /// Compares points with expected values exactly; with `report` a mismatch is an output.
    pub async fn verify(
        &self,
        expected: &serde_json::Map<String, Value>,
        report: bool,
    ) -> Result<Value, EquipmentError> {
        match self {
            PointDevice::Modbus(d) => d.verify(expected, report).await,
            #[cfg(feature = "opcua")]
            PointDevice::Opcua(d) => d.verify(expected, report).await,
        }
    }

    /// Reads a point: its wire form and engineering value.
    pub async fn read_point(&self, point: &str) -> Result<(String, Value), EquipmentError> {
        match self {
            PointDevice::Modbus(d) => d.read_point(point).await.map(|(w, v)| (modbus::words_text(&w), v)),
            #[cfg(feature = "opcua")]
            PointDevice::Opcua(d) => d.read_point(point).await,
        }
    }
}

/// Settings of the simulated plant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlantSpec {
    /// Simulated seconds per wall-clock second (default 1).
    #[serde(default)]
    pub realtime: Option<f64>,
    /// Starting oven temperature, °C (default 20).
    #[serde(default)]
    pub celsius: Option<f64>,
    /// Ambient temperature, °C (default 20).
    #[serde(default)]
    pub ambient: Option<f64>,
}

/// A pin: a sim pin name, or a Linux GPIO line.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PinRef {
    /// A pin of the simulated plant.
    Name(String),
    /// A line of a GPIO character device.
    Line {
        /// Chip device, e.g. `/dev/gpiochip0`.
        chip: String,
        /// Line offset on the chip.
        line: u32,
    },
}

fn sim_pin(p: &Option<PinRef>) -> Option<&str> {
    match p {
        Some(PinRef::Name(n)) => Some(n),
        _ => None,
    }
}

/// A device as written in the equipment file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// `output`, `input`, `sht3x`, `mcp3008` or `modbus`.
    pub kind: String,
    /// `sim` for the simulated plant (hardware kinds); Modbus devices name their unit instead.
    #[serde(default)]
    pub backend: Option<String>,
    /// Sim: `heater`, `vent` (outputs), `door`, `vent_feedback` (inputs). Linux: `{chip, line}`.
    #[serde(default)]
    pub pin: Option<PinRef>,
    /// Output: a feedback input that confirms the output's state.
    #[serde(default)]
    pub feedback: Option<PinRef>,
    /// Linux sht3x: the I2C bus device, e.g. `/dev/i2c-1`.
    #[serde(default)]
    pub bus: Option<String>,
    /// Linux sht3x: I2C address (default 0x44).
    #[serde(default)]
    pub address: Option<u8>,
    /// Linux mcp3008: the SPI device, e.g. `/dev/spidev0.0`.
    #[serde(default)]
    pub spi: Option<String>,
    /// Output: feedback reads low when on. Input: the switch pulls low when active.
    #[serde(default)]
    pub active_low: bool,
    /// Output with feedback: time to settle before the feedback is read.
    #[serde(default)]
    pub settle: Option<DurationText>,
    /// MCP3008: reference voltage (default 3.3).
    #[serde(default)]
    pub vref: Option<f32>,
    /// Modbus TCP: `host:port`.
    #[serde(default)]
    pub tcp: Option<String>,
    /// Modbus RTU: the serial line.
    #[serde(default)]
    pub rtu: Option<modbus::RtuSpec>,
    /// Modbus: unit id (default 1).
    #[serde(default)]
    pub unit: Option<u8>,
    /// Per-transaction timeout (default 2s).
    #[serde(default)]
    pub timeout: Option<DurationText>,
    /// Modbus: the register map.
    #[serde(default)]
    pub points: BTreeMap<String, modbus::PointSpec>,
    /// OPC UA: the server, its security and the node map (`kind: opcua`).
    #[cfg(feature = "opcua")]
    #[serde(default)]
    pub opcua: Option<opcua::OpcuaSpec>,
    /// Without OPC UA built in, the block is read (so the file is not refused for it) and the
    /// device is refused by its kind, saying how to build an agent that has it.
    #[cfg(not(feature = "opcua"))]
    #[serde(default)]
    pub opcua: Option<serde::de::IgnoredAny>,
}

/// The equipment file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EquipmentSpec {
    /// The simulated plant, when any device uses `backend: sim`.
    #[serde(default)]
    pub plant: Option<PlantSpec>,
    /// Devices by name.
    pub devices: BTreeMap<String, DeviceSpec>,
}

/// The configured devices. Cheap to share.
pub struct Equipment {
    devices: HashMap<String, Device>,
    timeouts: HashMap<String, Duration>,
    plant: Option<Arc<Plant>>,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

impl Equipment {
    /// Parses and opens an equipment file; errors name the device and field.
    pub fn from_yaml(text: &str) -> Result<Equipment, String> {
        let spec: EquipmentSpec = serde_saphyr::from_str(text).map_err(|e| format!("YAML error: {e}"))?;
        Self::open(&spec)
    }

    /// Opens every device of a spec.
    pub fn open(spec: &EquipmentSpec) -> Result<Equipment, String> {
        let mut problems = Vec::new();
        let uses_sim = spec.devices.values().any(|d| d.backend.as_deref() == Some("sim"));
        let plant = uses_sim.then(|| {
            let p = spec.plant.clone().unwrap_or(PlantSpec {
                realtime: None,
                celsius: None,
                ambient: None,
            });
            let oven = Oven {
                celsius: p.celsius.unwrap_or(20.0),
                ambient: p.ambient.unwrap_or(20.0),
                ..Oven::default()
            };
            Plant::new(oven, p.realtime.unwrap_or(1.0))
        });
        let sim_i2c = Arc::new(tokio::sync::Mutex::new(()));
        let sim_spi = Arc::new(tokio::sync::Mutex::new(()));
        let sim_gpio = Arc::new(tokio::sync::Mutex::new(()));
        let mut devices = HashMap::new();
        let mut timeouts = HashMap::new();
        let mut links: HashMap<String, modbus::Connection> = HashMap::new();
        #[cfg(feature = "linux-hal")]
        let mut buses: HashMap<String, Arc<tokio::sync::Mutex<()>>> = HashMap::new();
        for (name, d) in &spec.devices {
            let at = format!("devices.{name}");
            let timeout = match &d.timeout {
                Some(t) => match parse_duration(&t.0) {
                    Ok(v) => v,
                    Err(e) => {
                        problems.push(format!("{at}.timeout: {e}"));
                        continue;
                    }
                },
                None => DEFAULT_TIMEOUT,
            };
            timeouts.insert(name.clone(), timeout);
            let device = match d.kind.as_str() {
                "modbus" => {
                    let link = match (&d.tcp, &d.rtu) {
                        (Some(tcp), None) => modbus::Link::Tcp(tcp.clone()),
                        (None, Some(rtu)) => modbus::Link::Rtu(rtu.clone()),
                        _ => {
                            problems.push(format!(
                                "{at}: a modbus device needs exactly one of tcp: host:port or rtu: {{port: ...}}"
                            ));
                            continue;
                        }
                    };
                    if let Err(e) = link.check() {
                        problems.push(format!("{at}.{e}"));
                        continue;
                    }
                    let mut points = BTreeMap::new();
                    for (pname, p) in &d.points {
                        match modbus::Point::new(p) {
                            Ok(pt) => {
                                points.insert(pname.clone(), pt);
                            }
                            Err(e) => problems.push(format!("{at}.points.{pname}: {e}")),
                        }
                    }
                    let conn = links.entry(link.key()).or_default().clone();
                    Device::Modbus(Arc::new(modbus::ModbusDevice::new(
                        name,
                        link,
                        conn,
                        d.unit.unwrap_or(1),
                        timeout,
                        points,
                    )))
                }
                #[cfg(feature = "opcua")]
                "opcua" => {
                    let Some(o) = &d.opcua else {
                        problems.push(format!(
                            "{at}: an opcua device needs an opcua: block (endpoint, points, …)"
                        ));
                        continue;
                    };
                    match opcua::OpcuaDevice::new(name, o, timeout) {
                        Ok(dev) => Device::Opcua(Arc::new(dev)),
                        Err(p) => {
                            problems.extend(p.into_iter().map(|p| format!("{at}.{p}")));
                            continue;
                        }
                    }
                }
                kind @ ("output" | "input" | "sht3x" | "mcp3008") => {
                    let opened = match (d.backend.as_deref(), plant.as_ref()) {
                        (Some("sim"), Some(plant)) => sim_driver(plant, kind, d).map(|drv| {
                            let bus = match kind {
                                "sht3x" => sim_i2c.clone(),
                                "mcp3008" => sim_spi.clone(),
                                _ => sim_gpio.clone(),
                            };
                            (drv, bus)
                        }),
                        #[cfg(feature = "linux-hal")]
                        (Some("linux"), _) => linux::driver(kind, d).map(|(drv, key)| {
                            let bus = buses
                                .entry(key)
                                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
                                .clone();
                            (drv, bus)
                        }),
                        (other, _) => Err(format!(
                            "backend: '{}' is not available for {kind} devices (sim{})",
                            other.unwrap_or("(none)"),
                            if cfg!(feature = "linux-hal") {
                                ", linux"
                            } else {
                                "; linux needs the linux-hal feature"
                            }
                        )),
                    };
                    match opened {
                        Ok((driver, bus)) => Device::Hal(HalDevice {
                            kind: match kind {
                                "output" => "output",
                                "input" => "input",
                                "sht3x" => "sht3x",
                                _ => "mcp3008",
                            },
                            driver: Arc::new(Mutex::new(driver)),
                            bus,
                        }),
                        Err(e) => {
                            problems.push(format!("{at}.{e}"));
                            continue;
                        }
                    }
                }
                #[cfg(not(feature = "opcua"))]
                "opcua" => {
                    problems.push(format!(
                        "{at}.kind: this agent was built without OPC UA (build it with cargo build --release -p outpost-agent --features opcua)"
                    ));
                    continue;
                }
                other => {
                    problems.push(format!(
                        "{at}.kind: unknown kind '{other}' (output, input, sht3x, mcp3008, modbus, opcua)"
                    ));
                    continue;
                }
            };
            devices.insert(name.clone(), device);
        }
        if problems.is_empty() {
            Ok(Equipment {
                devices,
                timeouts,
                plant,
            })
        } else {
            Err(format!(
                "invalid equipment file:{}",
                problems.iter().map(|p| format!("\n  - {p}")).collect::<String>()
            ))
        }
    }

    /// The simulated plant, if configured (for demos and tests).
    pub fn plant(&self) -> Option<&Arc<Plant>> {
        self.plant.as_ref()
    }

    /// Device names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.devices.keys().cloned().collect();
        n.sort();
        n
    }

    /// The kind of a device, for validation.
    pub fn kind_of(&self, name: &str) -> Option<&'static str> {
        self.devices.get(name).map(|d| match d {
            Device::Hal(h) => h.kind,
            Device::Modbus(_) => "modbus",
            #[cfg(feature = "opcua")]
            Device::Opcua(_) => "opcua",
        })
    }

    /// A device with typed points of the wanted kind (`modbus` or `opcua`).
    pub fn points_device(&self, name: &str, want: &str) -> Result<PointDevice, EquipmentError> {
        self.device(name, want)?;
        self.typed_points(name)
            .ok_or_else(|| EquipmentError::Invalid(format!("device '{name}' has no typed points")))
    }

    /// The device as one with typed points, if it is one.
    pub fn typed_points(&self, name: &str) -> Option<PointDevice> {
        match self.devices.get(name)? {
            Device::Modbus(m) => Some(PointDevice::Modbus(m.clone())),
            #[cfg(feature = "opcua")]
            Device::Opcua(o) => Some(PointDevice::Opcua(o.clone())),
            Device::Hal(_) => None,
        }
    }

    fn device(&self, name: &str, want: &str) -> Result<&Device, EquipmentError> {
        match self.kind_of(name) {
            None => Err(EquipmentError::Invalid(format!(
                "unknown device '{name}' (configured: {})",
                self.names().join(", ")
            ))),
            Some(k) if k != want => Err(EquipmentError::Invalid(format!(
                "device '{name}' is a {k}, not a {want}"
            ))),
            Some(_) => Ok(&self.devices[name]),
        }
    }

    /// Runs a blocking driver call on its bus, under the device's timeout.
    async fn on_bus<T: Send + 'static>(
        &self,
        name: &str,
        want: &str,
        f: impl FnOnce(&mut Driver) -> Result<T, EquipmentError> + Send + 'static,
    ) -> Result<T, EquipmentError> {
        let Device::Hal(dev) = self.device(name, want)? else {
            return Err(EquipmentError::Invalid(format!("device '{name}' is not a {want}")));
        };
        let timeout = self.timeouts.get(name).copied().unwrap_or(DEFAULT_TIMEOUT);
        let (driver, bus) = (dev.driver.clone(), dev.bus.clone());
        let work = async move {
            let _turn = bus.lock_owned().await;
            tokio::task::spawn_blocking(move || {
                let mut d = driver.lock().unwrap_or_else(|p| p.into_inner());
                f(&mut d)
            })
            .await
            .map_err(|e| EquipmentError::Bus(format!("driver task failed: {e}")))?
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| EquipmentError::Timeout(timeout))?
    }

    /// Switches an output and confirms it reads back.
    pub async fn write_output(&self, name: &str, on: bool) -> Result<Value, EquipmentError> {
        let n = name.to_string();
        self.on_bus(name, "output", move |d| match d {
            Driver::Output(o) => {
                o.set(on)?;
                Ok(json!({"device": n, "value": on}))
            }
            _ => Err(EquipmentError::Invalid(format!("device '{n}' is not an output"))),
        })
        .await
    }

    /// Reads an output's (verified) state or an input.
    pub async fn read_digital(&self, name: &str) -> Result<Value, EquipmentError> {
        let want = match self.kind_of(name) {
            Some("output") => "output",
            _ => "input",
        };
        let n = name.to_string();
        self.on_bus(name, want, move |d| {
            let v = match d {
                Driver::Output(o) => o.get()?,
                Driver::Input(i) => i.is_active()?,
                _ => return Err(EquipmentError::Invalid(format!("device '{n}' is not digital"))),
            };
            Ok(json!({"device": n, "value": v}))
        })
        .await
    }

    /// Reads a temperature/humidity sensor.
    pub async fn read_sensor(&self, name: &str) -> Result<Value, EquipmentError> {
        let n = name.to_string();
        self.on_bus(name, "sht3x", move |d| match d {
            Driver::Sht3x(s) => {
                let m = s.measure()?;
                let round = |x: f32| (f64::from(x) * 100.0).round() / 100.0;
                Ok(json!({"device": n, "celsius": round(m.celsius), "humidity": round(m.humidity)}))
            }
            _ => Err(EquipmentError::Invalid(format!("device '{n}' is not a sensor"))),
        })
        .await
    }

    /// Reads an ADC channel.
    pub async fn read_adc(&self, name: &str, channel: u8) -> Result<Value, EquipmentError> {
        let n = name.to_string();
        self.on_bus(name, "mcp3008", move |d| match d {
            Driver::Mcp3008(a, vref) => {
                let raw = a.read(channel)?;
                let volts = (f64::from(mcp3008::volts(raw, *vref)) * 1000.0).round() / 1000.0;
                Ok(json!({"device": n, "channel": channel, "raw": raw, "volts": volts}))
            }
            _ => Err(EquipmentError::Invalid(format!("device '{n}' is not an ADC"))),
        })
        .await
    }

    /// A Modbus device.
    pub fn modbus(&self, name: &str) -> Result<Arc<modbus::ModbusDevice>, EquipmentError> {
        match self.device(name, "modbus")? {
            Device::Modbus(m) => Ok(m.clone()),
            _ => Err(EquipmentError::Invalid(format!(
                "device '{name}' is not a modbus device"
            ))),
        }
    }

    /// Calls a method of an OPC UA device (`opcua.call`).
    pub async fn call_method(
        &self,
        device: &str,
        method: &str,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Value, EquipmentError> {
        #[cfg(feature = "opcua")]
        {
            self.opcua(device)?.call_method(method, args).await
        }
        #[cfg(not(feature = "opcua"))]
        {
            let _ = (method, args);
            self.device(device, "opcua")?;
            Err(EquipmentError::Invalid(format!(
                "device '{device}': this agent was built without OPC UA (cargo feature opcua)"
            )))
        }
    }

    /// An OPC UA device.
    #[cfg(feature = "opcua")]
    pub fn opcua(&self, name: &str) -> Result<Arc<opcua::OpcuaDevice>, EquipmentError> {
        match self.device(name, "opcua")? {
            Device::Opcua(o) => Ok(o.clone()),
            _ => Err(EquipmentError::Invalid(format!(
                "device '{name}' is not an opcua device"
            ))),
        }
    }
}

fn sim_driver(plant: &Arc<Plant>, kind: &str, d: &DeviceSpec) -> Result<Driver, String> {
    let output = |pin: &str| match pin {
        "heater" => Ok(plant.heater()),
        "vent" => Ok(plant.vent()),
        other => Err(format!("pin: sim output '{other}' does not exist (heater, vent)")),
    };
    let input = |pin: &str| match pin {
        "door" => Ok(plant.door()),
        "vent_feedback" => Ok(plant.vent_feedback()),
        other => Err(format!("pin: sim input '{other}' does not exist (door, vent_feedback)")),
    };
    Ok(match kind {
        "output" => {
            let pin = sim_pin(&d.pin).ok_or("pin: a sim output's pin is a name (heater, vent)")?;
            let out: SimOutput = output(pin)?;
            match &d.feedback {
                Some(f) => {
                    let settle = match &d.settle {
                        Some(s) => parse_duration(&s.0).map_err(|e| format!("settle: {e}"))?,
                        None => Duration::ZERO,
                    };
                    let ms = u32::try_from(settle.as_millis()).map_err(|_| "settle: too long".to_string())?;
                    let f = sim_pin(&Some(f.clone()))
                        .ok_or("feedback: a sim feedback is a pin name")?
                        .to_string();
                    let fb = input(&f).map_err(|e| e.replace("pin:", "feedback:"))?;
                    Driver::Output(Box::new(FeedbackOutput::new(out, fb, d.active_low, ms)))
                }
                None => Driver::Output(Box::new(LatchedOutput::new(out))),
            }
        }
        "input" => {
            let pin = input(sim_pin(&d.pin).ok_or("pin: a sim input's pin is a name (door, vent_feedback)")?)?;
            Driver::Input(Box::new(DigitalInput::new(pin, d.active_low)))
        }
        "sht3x" => Driver::Sht3x(Box::new(Sht3x::new(plant.i2c(), sht3x::ADDRESS_LOW))),
        _ => Driver::Mcp3008(Box::new(Mcp3008::new(plant.spi())), d.vref.unwrap_or(3.3)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_opcua_device_is_refused_by_name_when_opcua_is_not_built_in() {
        let text = "devices:\n  press:\n    kind: opcua\n    opcua: {endpoint: \"opc.tcp://x:4840/\", points: {}}\n";
        let result = Equipment::from_yaml(text);
        if cfg!(feature = "opcua") {
            assert!(result.is_ok(), "{:?}", result.err());
        } else {
            let err = result.err().unwrap_or_default();
            assert!(
                err.contains("devices.press.kind") && err.contains("--features opcua"),
                "{err}"
            );
        }
    }
}
