//! Desired state: bringing the device to the cloud's desired document and saying, exactly,
//! whether it is there. The remediation workflow applies the document; the agent itself reads
//! back every equipment point the document sets and compares raw words (`equipment::state`);
//! anything else in the document is compared with the workflow's output as JSON, numbers by
//! value. Between versions the agent re-verifies the points (`--verify-every`, and on every
//! reconnect) and reports drift as soon as it sees it. The decisions here are pure; `sync`
//! stores and publishes what they produce.

use std::sync::Arc;
use std::time::Duration;

use outpost_shared::protocol::{Desired, PointCheck, StateReport, Verdict};
use serde_json::{Map, Value, json};

use crate::equipment::Equipment;
use crate::equipment::state::{self, Plan};
use crate::runtime::{Runtime, StartRequest};

/// What to do when a verified state drifts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnDrift {
    /// Report the drift (not in sync, the points named); an operator decides.
    #[default]
    Report,
    /// Report it and run the remediation workflow again, once per drift.
    Remediate,
}

/// How the agent reconciles desired state.
#[derive(Clone, Default)]
pub struct DesiredConfig {
    /// The workflow that applies a desired document (`--remediation`).
    pub remediation: Option<String>,
    /// The equipment whose points a desired document may set.
    pub equipment: Option<Arc<Equipment>>,
    /// Re-verify the points this often (`--verify-every`; `None`: only on reconnect).
    pub verify_every: Option<Duration>,
    /// What a drift leads to.
    pub on_drift: OnDrift,
}

impl std::fmt::Debug for DesiredConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesiredConfig")
            .field("remediation", &self.remediation)
            .field("equipment", &self.equipment.as_ref().map(|e| e.names()))
            .field("verify_every", &self.verify_every)
            .field("on_drift", &self.on_drift)
            .finish()
    }
}

impl DesiredConfig {
    /// The desired document split into typed points and the rest.
    pub fn plan(&self, d: &Desired) -> Option<Plan> {
        let doc: Value = serde_json::from_str(&d.document).ok()?;
        Some(state::plan(self.equipment.as_deref(), &doc))
    }

    /// Applies `d` with the remediation workflow (run `run_id`) and verifies the result.
    pub async fn remediate(&self, rt: &Runtime, d: &Desired, run_id: &str) -> StateReport {
        let now = rt.clock_ms();
        let Ok(want) = serde_json::from_str::<Value>(&d.document) else {
            return report(
                d.version,
                "null".into(),
                false,
                "the desired document is not JSON".into(),
                now,
            );
        };
        let plan = state::plan(self.equipment.as_deref(), &want);
        if !plan.refused.is_empty() {
            // Nothing is written when any point cannot be held exactly: a half-applied recipe
            // is worse than none.
            let mut r = report(
                d.version,
                "null".into(),
                false,
                format!(
                    "desired v{} refused, nothing written: {}",
                    d.version,
                    describe(&plan.refused)
                ),
                now,
            );
            r.points = plan.refused.clone();
            return r;
        }
        let output = match &self.remediation {
            None => Err("no remediation workflow is configured (--remediation)".to_string()),
            Some(workflow) => run_remediation(rt, workflow, &want, d.version, run_id).await,
        };
        let checks = match &self.equipment {
            Some(eq) if plan.has_points() => state::verify(eq, &plan).await,
            _ => Vec::new(),
        };
        assess(d.version, &plan, &output, checks, run_id, rt.clock_ms())
    }

    /// Reads the points of an already reported version again; a new report when what is found
    /// changed (a drift seen, or gone), `None` when nothing changed or there is nothing to read.
    pub async fn reverify(&self, d: &Desired, prev: &StateReport, now_ms: u64) -> Option<StateReport> {
        let eq = self.equipment.as_ref()?;
        let plan = self.plan(d)?;
        // A refused version wrote nothing: there is nothing of it to keep verifying.
        if plan.targets.is_empty() || !plan.refused.is_empty() || prev.desired_version != d.version {
            return None;
        }
        let checks = state::verify(eq, &plan).await;
        drifted(prev, checks, now_ms)
    }
}

async fn run_remediation(
    rt: &Runtime,
    workflow: &str,
    want: &Value,
    version: u64,
    run_id: &str,
) -> Result<Value, String> {
    let req = StartRequest {
        workflow: workflow.to_string(),
        version: None,
        input: Some(json!({"desired": want, "version": version})),
        id: Some(run_id.to_string()),
    };
    // A start with the id of a run that exists (a restart mid-remediation) starts nothing:
    // this waits for that run.
    rt.start(req)
        .await
        .map_err(|e| format!("cannot start {workflow}: {e}"))?;
    rt.wait_until_ended(run_id).await.map_err(|e| e.to_string())?;
    match rt.final_event(run_id).map_err(|e| e.to_string())? {
        outpost_shared::Event::RunCompleted { output } => Ok(serde_json::from_str(&output).unwrap_or(Value::Null)),
        outpost_shared::Event::RunFailed { error } => Err(format!(
            "remediation failed: run {run_id} failed: {} ({})",
            error.message, error.kind
        )),
        other => Err(format!("remediation failed: run {run_id} ended {}", other.name())),
    }
}

fn report(version: u64, document: String, in_sync: bool, message: String, now_ms: u64) -> StateReport {
    StateReport {
        desired_version: version,
        document,
        in_sync,
        message,
        points: Vec::new(),
        verified_ms: now_ms,
        drift_since_ms: None,
    }
}

/// Equal as JSON, numbers by value: `900.0` is `900`.
pub fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// Every point that is not a match, for people: `mixer.speed wanted 1500 found 1200; …`.
pub fn describe(points: &[PointCheck]) -> String {
    points
        .iter()
        .filter(|p| p.verdict != Verdict::Match)
        .map(|p| {
            let name = if p.point.is_empty() {
                p.device.clone()
            } else {
                format!("{}.{}", p.device, p.point)
            };
            match &p.verdict {
                Verdict::Differs => format!(
                    "{name} wanted {} found {} (raw {}, wanted {})",
                    p.desired, p.found, p.found_raw, p.desired_raw
                ),
                Verdict::Unreadable(why) => format!("{name} unreadable: {why}"),
                Verdict::Refused(why) => format!("{name} refused: {why}"),
                Verdict::Match => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Puts every value read back into the document at `device.point`.
fn overlay(doc: &mut Map<String, Value>, checks: &[PointCheck]) {
    for c in checks {
        if let Ok(found) = serde_json::from_str::<Value>(&c.found)
            && let Some(points) = doc.entry(c.device.clone()).or_insert_with(|| json!({})).as_object_mut()
        {
            points.insert(c.point.clone(), found);
        }
    }
}

/// The report of a remediation: in sync only when the run completed, every point matched on
/// the wire and the rest of the document equals the run's output.
pub fn assess(
    version: u64,
    plan: &Plan,
    output: &Result<Value, String>,
    checks: Vec<PointCheck>,
    run_id: &str,
    now_ms: u64,
) -> StateReport {
    let points_ok = checks.iter().all(|c| c.verdict == Verdict::Match);
    // With no equipment points, the output is the document (as before points existed).
    let document = match output {
        Ok(o) if !plan.has_points() => o.clone(),
        _ => {
            // The keys the desired document has: found points, and the rest as the run output them.
            let mut doc = Map::new();
            if let Ok(o) = output {
                for k in plan.rest.keys() {
                    if let Some(v) = o.get(k.as_str()) {
                        doc.insert(k.clone(), v.clone());
                    }
                }
            }
            overlay(&mut doc, &checks);
            Value::Object(doc)
        }
    };
    let rest_differs: Vec<&String> = match output {
        Ok(o) if !plan.has_points() => {
            if same_json(o, &Value::Object(plan.rest.clone())) {
                Vec::new()
            } else {
                plan.rest.keys().collect()
            }
        }
        Ok(o) => plan
            .rest
            .iter()
            .filter(|(k, v)| !o.get(k.as_str()).is_some_and(|f| same_json(v, f)))
            .map(|(k, _)| k)
            .collect(),
        Err(_) => plan.rest.keys().collect(),
    };
    let in_sync = output.is_ok() && points_ok && rest_differs.is_empty();
    let mut why = Vec::new();
    if let Err(e) = output {
        why.push(e.clone());
    }
    if !points_ok {
        why.push(describe(&checks));
    }
    if output.is_ok() && !rest_differs.is_empty() {
        if plan.has_points() {
            let keys: Vec<&str> = rest_differs.iter().map(|k| k.as_str()).collect();
            why.push(format!("run {run_id} output differs at {}", keys.join(", ")));
        } else {
            why.push(format!(
                "run {run_id} verified a state that differs from the desired one"
            ));
        }
    }
    let message = if in_sync {
        format!("verified by run {run_id}")
    } else if output.is_ok() && !points_ok {
        format!("read-back differs: {}", why.join("; "))
    } else {
        why.join("; ")
    };
    let mut r = report(version, document.to_string(), in_sync, message, now_ms);
    r.points = checks;
    r
}

/// What a re-verification found against the previous report: `None` when the verdict of
/// every point is what it was.
pub fn drifted(prev: &StateReport, checks: Vec<PointCheck>, now_ms: u64) -> Option<StateReport> {
    let same = prev.points.len() == checks.len()
        && prev
            .points
            .iter()
            .zip(&checks)
            .all(|(a, b)| a.verdict == b.verdict && a.found_raw == b.found_raw);
    if same {
        return None;
    }
    let all_match = checks.iter().all(|c| c.verdict == Verdict::Match);
    let was_verified = prev.in_sync || prev.drift_since_ms.is_some();
    let mut r = prev.clone();
    r.verified_ms = now_ms;
    let mut doc: Map<String, Value> = serde_json::from_str(&prev.document).unwrap_or_default();
    overlay(&mut doc, &checks);
    r.document = Value::Object(doc).to_string();
    if all_match {
        // Back as desired (put back by hand, or the remediation did it): in sync again only
        // when the rest was, which the first report said.
        r.in_sync = was_verified;
        r.drift_since_ms = None;
        r.message = if r.in_sync {
            "verified again: every point matches".into()
        } else {
            format!("every point matches now; {}", prev.message)
        };
    } else {
        r.in_sync = false;
        if was_verified {
            let since = prev.drift_since_ms.unwrap_or(now_ms);
            r.drift_since_ms = Some(since);
            r.message = format!("drift: {}", describe(&checks));
        } else {
            r.message = format!("read-back differs: {}", describe(&checks));
        }
    }
    r.points = checks;
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::equipment::state::Target;

    fn check(point: &str, desired: u16, found: u16) -> PointCheck {
        PointCheck {
            device: "mixer".into(),
            point: point.into(),
            desired: desired.to_string(),
            found: found.to_string(),
            desired_raw: format!("0x{desired:04X}"),
            found_raw: format!("0x{found:04X}"),
            verdict: if desired == found {
                Verdict::Match
            } else {
                Verdict::Differs
            },
        }
    }

    fn plan_of(points: &[(&str, u16)], rest: Value) -> Plan {
        Plan {
            targets: points
                .iter()
                .map(|(p, v)| Target {
                    device: "mixer".into(),
                    point: (*p).into(),
                    desired: json!(v),
                    raw: format!("0x{v:04X}"),
                })
                .collect(),
            refused: Vec::new(),
            rest: rest.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(same_json(
            &json!({"a": 900.0, "b": [1, 2.0]}),
            &json!({"a": 900, "b": [1.0, 2]})
        ));
        assert!(!same_json(&json!({"a": 900.5}), &json!({"a": 900})));
        assert!(!same_json(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
    }

    #[test]
    fn a_remediation_is_in_sync_only_when_every_point_matches_and_the_rest_equals_the_output() {
        let plan = plan_of(&[("speed", 1500)], json!({"mode": "auto"}));
        let ok = assess(
            3,
            &plan,
            &Ok(json!({"mode": "auto"})),
            vec![check("speed", 1500, 1500)],
            "r",
            9,
        );
        assert!(ok.in_sync, "{}", ok.message);
        assert_eq!(
            serde_json::from_str::<Value>(&ok.document).unwrap(),
            json!({"mode": "auto", "mixer": {"speed": 1500}})
        );
        let clamped = assess(
            3,
            &plan,
            &Ok(json!({"mode": "auto"})),
            vec![check("speed", 1500, 1200)],
            "r",
            9,
        );
        assert!(!clamped.in_sync);
        assert!(
            clamped.message.contains("mixer.speed wanted 1500 found 1200"),
            "{}",
            clamped.message
        );
        let failed = assess(
            3,
            &plan,
            &Err("remediation failed: run r failed: boom (x)".into()),
            vec![check("speed", 1500, 1)],
            "r",
            9,
        );
        assert!(
            failed.message.starts_with("remediation failed") && failed.message.contains("mixer.speed"),
            "{}",
            failed.message
        );
        // No points: the workflow's output is the document, numbers by value.
        let none = Plan {
            rest: json!({"setpoint": 900.0}).as_object().cloned().unwrap(),
            ..Plan::default()
        };
        assert!(assess(1, &none, &Ok(json!({"setpoint": 900})), Vec::new(), "r", 9).in_sync);
        let differs = assess(1, &none, &Ok(json!({"setpoint": 250})), Vec::new(), "r", 9);
        assert!(!differs.in_sync && differs.message.contains("differs"));
        assert_eq!(differs.document, r#"{"setpoint":250}"#);
    }

    #[test]
    fn drift_is_reported_from_when_it_was_first_seen_until_it_is_gone() {
        let plan = plan_of(&[("speed", 1500)], json!({}));
        let ok = assess(3, &plan, &Ok(json!({})), vec![check("speed", 1500, 1500)], "r", 10);
        assert_eq!(
            drifted(&ok, vec![check("speed", 1500, 1500)], 20),
            None,
            "nothing changed: nothing to report"
        );
        let d1 = drifted(&ok, vec![check("speed", 1500, 1400)], 30).unwrap();
        assert!(!d1.in_sync);
        assert_eq!(d1.drift_since_ms, Some(30));
        assert!(
            d1.message.starts_with("drift: mixer.speed wanted 1500 found 1400"),
            "{}",
            d1.message
        );
        let d2 = drifted(&d1, vec![check("speed", 1500, 1300)], 40).unwrap();
        assert_eq!(d2.drift_since_ms, Some(30), "first seen stays");
        let back = drifted(&d2, vec![check("speed", 1500, 1500)], 50).unwrap();
        assert!(back.in_sync);
        assert_eq!(back.drift_since_ms, None);
        // A state that never was in sync does not "drift": it still differs.
        let bad = assess(3, &plan, &Ok(json!({})), vec![check("speed", 1500, 1200)], "r", 10);
        let still = drifted(&bad, vec![check("speed", 1500, 1100)], 20).unwrap();
        assert_eq!(still.drift_since_ms, None);
        assert!(!still.in_sync);
    }
}
