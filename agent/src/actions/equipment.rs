//! Equipment actions: `gpio.read`, `gpio.write`, `sensor.read`, `adc.read`, and for devices with
//! typed points `modbus.read`/`opcua.read`, `modbus.write`/`opcua.write` (idempotent, verified by
//! exact read-back), `modbus.verify`/`opcua.verify` and `opcua.call` (a method of the server).

use std::sync::Arc;

use outpost_shared::definition::Signature;
use serde_json::{Map, Value};

use super::{Action, ActionError, ActionFuture, Call, str_arg};
use crate::equipment::{Equipment, EquipmentError};

/// Which equipment operation an action performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `gpio.read`
    GpioRead,
    /// `gpio.write`
    GpioWrite,
    /// `sensor.read`
    SensorRead,
    /// `adc.read`
    AdcRead,
    /// `modbus.read`
    ModbusRead,
    /// `modbus.write`
    ModbusWrite,
    /// `modbus.verify`
    ModbusVerify,
    /// `opcua.read`
    OpcuaRead,
    /// `opcua.write`
    OpcuaWrite,
    /// `opcua.verify`
    OpcuaVerify,
    /// `opcua.call`
    OpcuaCall,
}

impl Op {
    /// Every operation with its action name.
    pub const ALL: [(&'static str, Op); 11] = [
        ("gpio.read", Op::GpioRead),
        ("gpio.write", Op::GpioWrite),
        ("sensor.read", Op::SensorRead),
        ("adc.read", Op::AdcRead),
        ("modbus.read", Op::ModbusRead),
        ("modbus.write", Op::ModbusWrite),
        ("modbus.verify", Op::ModbusVerify),
        ("opcua.read", Op::OpcuaRead),
        ("opcua.write", Op::OpcuaWrite),
        ("opcua.verify", Op::OpcuaVerify),
        ("opcua.call", Op::OpcuaCall),
    ];

    fn device_kinds(self) -> &'static [&'static str] {
        match self {
            Op::GpioRead => &["output", "input"],
            Op::GpioWrite => &["output"],
            Op::SensorRead => &["sht3x"],
            Op::AdcRead => &["mcp3008"],
            Op::ModbusRead | Op::ModbusWrite | Op::ModbusVerify => &["modbus"],
            Op::OpcuaRead | Op::OpcuaWrite | Op::OpcuaVerify | Op::OpcuaCall => &["opcua"],
        }
    }
}

/// An equipment action bound to the agent's equipment (if any is configured).
pub struct EquipmentAction {
    op: Op,
    equipment: Option<Arc<Equipment>>,
}

impl EquipmentAction {
    /// The action for `op`.
    pub fn new(op: Op, equipment: Option<Arc<Equipment>>) -> Self {
        EquipmentAction { op, equipment }
    }
}

/// A `{point: value}` argument.
fn point_map<'a>(args: &'a Value, name: &str) -> Result<&'a Map<String, Value>, ActionError> {
    args.get(name)
        .and_then(Value::as_object)
        .ok_or_else(|| ActionError::permanent("invalid_argument", format!("'{name}' must be a map of names to values")))
}

fn to_action_error(e: EquipmentError) -> ActionError {
    ActionError {
        retryable: e.retryable(),
        info: outpost_shared::ErrorInfo::new(e.kind(), e.to_string()),
    }
}

impl Action for EquipmentAction {
    fn signature(&self) -> Signature {
        match self.op {
            Op::GpioRead | Op::SensorRead => Signature {
                required: &["device"],
                optional: &[],
            },
            Op::GpioWrite => Signature {
                required: &["device", "value"],
                optional: &[],
            },
            Op::AdcRead => Signature {
                required: &["device", "channel"],
                optional: &[],
            },
            Op::ModbusRead | Op::OpcuaRead => Signature {
                required: &["device", "points"],
                optional: &[],
            },
            Op::ModbusWrite | Op::OpcuaWrite => Signature {
                required: &["device", "values"],
                optional: &["verify"],
            },
            Op::ModbusVerify | Op::OpcuaVerify => Signature {
                required: &["device", "expect"],
                optional: &["on_mismatch"],
            },
            Op::OpcuaCall => Signature {
                required: &["device", "method"],
                optional: &["args"],
            },
        }
    }

    fn check(&self, args: &Map<String, Value>) -> Vec<String> {
        let mut p = Vec::new();
        let (Some(eq), Some(Value::String(device))) = (&self.equipment, args.get("device")) else {
            return p;
        };
        if outpost_shared::expr::is_template(device) {
            return p;
        }
        match eq.kind_of(device) {
            None => p.push(format!(
                "unknown device '{device}' (configured: {})",
                eq.names().join(", ")
            )),
            Some(k) if !self.op.device_kinds().contains(&k) => p.push(format!(
                "device '{device}' is a {k}; this action needs a {}",
                self.op.device_kinds().join(" or ")
            )),
            Some(_) => {}
        }
        p
    }

    fn execute(&self, call: Call) -> ActionFuture {
        let op = self.op;
        let equipment = self.equipment.clone();
        Box::pin(async move {
            let eq = equipment.ok_or_else(|| {
                ActionError::permanent(
                    "equipment.none",
                    "no equipment is configured (start the agent with --equipment FILE)",
                )
            })?;
            let device = str_arg(&call.args, "device")?.to_string();
            let invalid = |m: &str| ActionError::permanent("invalid_argument", m.to_string());
            let result = match op {
                Op::GpioRead => eq.read_digital(&device).await,
                Op::GpioWrite => {
                    let on = call
                        .args
                        .get("value")
                        .and_then(Value::as_bool)
                        .ok_or_else(|| invalid("'value' must be true or false"))?;
                    eq.write_output(&device, on).await
                }
                Op::SensorRead => eq.read_sensor(&device).await,
                Op::AdcRead => {
                    let ch = call
                        .args
                        .get("channel")
                        .and_then(Value::as_u64)
                        .and_then(|c| u8::try_from(c).ok());
                    let ch = ch.ok_or_else(|| invalid("'channel' must be a channel number"))?;
                    eq.read_adc(&device, ch).await
                }
                Op::ModbusRead | Op::OpcuaRead => {
                    let names: Vec<String> = match call.args.get("points") {
                        Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
                        Some(Value::String(s)) => vec![s.clone()],
                        _ => return Err(invalid("'points' must be a list of point names")),
                    };
                    let d = eq
                        .points_device(&device, op.device_kinds()[0])
                        .map_err(to_action_error)?;
                    d.read(&names)
                        .await
                        .map(|values| serde_json::json!({"device": device, "values": values}))
                }
                Op::ModbusWrite | Op::OpcuaWrite => {
                    let values = point_map(&call.args, "values")?;
                    let verify = call.args.get("verify").and_then(Value::as_bool).unwrap_or(true);
                    let d = eq
                        .points_device(&device, op.device_kinds()[0])
                        .map_err(to_action_error)?;
                    d.write(values, verify).await
                }
                Op::ModbusVerify | Op::OpcuaVerify => {
                    let expect = point_map(&call.args, "expect")?;
                    let report = match call.args.get("on_mismatch").and_then(Value::as_str) {
                        None | Some("fail") => false,
                        Some("report") => true,
                        Some(other) => return Err(invalid(&format!("on_mismatch '{other}' is not fail or report"))),
                    };
                    let d = eq
                        .points_device(&device, op.device_kinds()[0])
                        .map_err(to_action_error)?;
                    d.verify(expect, report).await
                }
                Op::OpcuaCall => {
                    let method = str_arg(&call.args, "method")?;
                    let empty = Map::new();
                    let args = match call.args.get("args") {
                        None | Some(Value::Null) => &empty,
                        Some(_) => point_map(&call.args, "args")?,
                    };
                    eq.call_method(&device, method, args).await
                }
            };
            result.map_err(to_action_error)
        })
    }
}
