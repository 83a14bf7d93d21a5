//! Desired state on equipment, compared on the wire's terms: a desired document's entry
//! `{"mixer": {"setpoint_temp": 72.5}}` names a typed point of a Modbus or OPC UA device; its
//! value is encoded with the point's type, scale and word order (or as the OPC UA variant of the
//! point's data type), and the point is in sync only when what is read back is exactly that.
//! Planning (encoding) is pure; verifying reads.

use outpost_shared::protocol::{PointCheck, Verdict};
use serde_json::{Map, Value};

use super::{Equipment, EquipmentError};

/// A point the desired document sets, with the raw words it must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Equipment device.
    pub device: String,
    /// Point.
    pub point: String,
    /// The desired value.
    pub desired: Value,
    /// Its wire form (`PointCheck::desired_raw`).
    pub raw: String,
}

/// A desired document split into typed equipment points and the rest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Points that can be verified on the wire.
    pub targets: Vec<Target>,
    /// Points refused up front (the point's type cannot hold the value exactly, no such
    /// point, not a map of points); never written.
    pub refused: Vec<PointCheck>,
    /// Entries that are not equipment points, compared as JSON with the workflow's output.
    pub rest: Map<String, Value>,
}

impl Plan {
    /// True when the document names equipment points (verified by the agent itself).
    pub fn has_points(&self) -> bool {
        !self.targets.is_empty() || !self.refused.is_empty()
    }
}

/// Splits `doc` into the equipment points it sets and the rest, encoding every point.
pub fn plan(equipment: Option<&Equipment>, doc: &Value) -> Plan {
    let mut plan = Plan::default();
    let Some(entries) = doc.as_object() else {
        return plan;
    };
    for (key, value) in entries {
        let device = match equipment.and_then(|e| e.typed_points(key)) {
            Some(d) => d,
            None => {
                plan.rest.insert(key.clone(), value.clone());
                continue;
            }
        };
        let Some(points) = value.as_object() else {
            plan.refused.push(refused(
                key,
                "",
                value,
                format!(
                    "desired '{key}' names a {} device: it must be a map of its point names to values",
                    device.kind()
                ),
            ));
            continue;
        };
        for (point, v) in points {
            match device.encode_point(point, v) {
                Ok(raw) => plan.targets.push(Target {
                    device: key.clone(),
                    point: point.clone(),
                    desired: v.clone(),
                    raw,
                }),
                Err(e) => plan.refused.push(refused(key, point, v, e.to_string())),
            }
        }
    }
    plan
}

fn refused(device: &str, point: &str, desired: &Value, why: String) -> PointCheck {
    PointCheck {
        device: device.to_string(),
        point: point.to_string(),
        desired: desired.to_string(),
        found: String::new(),
        desired_raw: String::new(),
        found_raw: String::new(),
        verdict: Verdict::Refused(why),
    }
}

/// Reads every target back and compares its raw words; refused points keep their verdict.
pub async fn verify(equipment: &Equipment, plan: &Plan) -> Vec<PointCheck> {
    let mut out = plan.refused.clone();
    for t in &plan.targets {
        let read = match equipment.typed_points(&t.device) {
            Some(d) => d.read_point(&t.point).await,
            None => Err(EquipmentError::Invalid(format!("no device '{}'", t.device))),
        };
        let (found, found_raw, verdict) = match read {
            Ok((raw, value)) => {
                let verdict = if raw == t.raw { Verdict::Match } else { Verdict::Differs };
                (value.to_string(), raw, verdict)
            }
            Err(e) => (
                String::new(),
                String::new(),
                Verdict::Unreadable(format!("{} ({})", e, e.kind())),
            ),
        };
        out.push(PointCheck {
            device: t.device.clone(),
            point: t.point.clone(),
            desired: t.desired.to_string(),
            found,
            desired_raw: t.raw.clone(),
            found_raw,
            verdict,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EQUIPMENT: &str = "devices:\n  mixer:\n    kind: modbus\n    tcp: 127.0.0.1:1\n    points:\n      speed: {table: holding, address: 1, type: u16}\n      temp: {table: holding, address: 2, type: f32}\n      dose: {table: holding, address: 4, type: u32, word_order: little, scale: 0.1}\n";

    #[test]
    fn points_are_encoded_exactly_and_the_rest_is_left_as_json() {
        let eq = Equipment::from_yaml(EQUIPMENT).unwrap();
        let p = plan(
            Some(&eq),
            &json!({"mixer": {"speed": 900.0, "temp": 72.5, "dose": 250.5}, "mode": "auto"}),
        );
        let raw: Vec<(&str, &str)> = p.targets.iter().map(|t| (t.point.as_str(), t.raw.as_str())).collect();
        assert_eq!(
            raw,
            vec![
                ("dose", "0x09C9 0x0000"),
                ("speed", "0x0384"),
                ("temp", "0x4291 0x0000")
            ],
            "900.0 is the register value 900"
        );
        assert!(p.refused.is_empty(), "{:?}", p.refused);
        assert_eq!(p.rest, json!({"mode": "auto"}).as_object().unwrap().clone());
    }

    #[test]
    fn values_a_point_cannot_hold_exactly_are_refused_with_the_point_named() {
        let eq = Equipment::from_yaml(EQUIPMENT).unwrap();
        let p = plan(
            Some(&eq),
            &json!({"mixer": {"speed": 900.5, "temp": 72.1, "nope": 1, "dose": 99999999999.0}}),
        );
        assert!(p.targets.is_empty());
        let why: Vec<String> = p
            .refused
            .iter()
            .map(|c| format!("{}.{}: {}", c.device, c.point, c.verdict.reason().unwrap()))
            .collect();
        assert_eq!(why.len(), 4, "{why:?}");
        assert!(
            why.iter().any(|w| w.starts_with("mixer.temp:")
                && w.contains("not exactly representable as f32")
                && w.contains("72.0999984741211")),
            "{why:?}"
        );
        assert!(
            why.iter().any(|w| w.starts_with("mixer.speed:") && w.contains("900.5")),
            "{why:?}"
        );
        assert!(
            why.iter()
                .any(|w| w.starts_with("mixer.nope:") && w.contains("no point 'nope'")),
            "{why:?}"
        );
        assert!(why.iter().any(|w| w.starts_with("mixer.dose:")), "{why:?}");
        let p = plan(Some(&eq), &json!({"mixer": 5}));
        assert!(p.refused[0].verdict.reason().unwrap().contains("must be a map"));
        // Without equipment, or for keys that are not Modbus devices, the document is plain JSON.
        assert!(!plan(None, &json!({"mixer": {"speed": 1}})).has_points());
    }
}
