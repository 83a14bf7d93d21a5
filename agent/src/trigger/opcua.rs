//! `opcua:` triggers: a monitored item on a point of an OPC UA device; each data change the
//! server reports starts one run with the value in its input.
//!
//! The run id comes from the value's source timestamp (when it changed at the PLC), so the
//! value the server sends again on every new subscription (after a reconnect, or when the
//! agent restarts) maps to the run it already started: one run per change, never two.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use outpost_shared::definition::{OpcuaTrigger, parse_duration};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{Delivery, deliver, fnv1a};
use crate::equipment::Equipment;
use crate::equipment::opcua::{Change, Subscription, Watch};
use crate::runtime::{MAX_RUN_ID_LEN, Runtime};

/// How often subscriptions are checked (and made again on a new session).
const CHECK: Duration = Duration::from_secs(1);
/// Sampling interval when a trigger does not give one.
const DEFAULT_SAMPLING: Duration = Duration::from_millis(500);

/// Device → (workflow, trigger) for every `opcua:` trigger of the latest definitions.
pub type Plan = BTreeMap<String, Vec<(String, OpcuaTrigger)>>;

/// The `opcua:` triggers of the latest version of every stored workflow, by device.
pub fn plan<'a>(defs: impl IntoIterator<Item = (&'a str, &'a [outpost_shared::definition::TriggerSpec])>) -> Plan {
    let mut plan = Plan::new();
    for (workflow, triggers) in defs {
        for t in triggers.iter().filter_map(|t| t.opcua.as_ref()) {
            plan.entry(t.device.clone())
                .or_default()
                .push((workflow.to_string(), t.clone()));
        }
    }
    plan
}

/// One monitored item per point and settings (deadband, sampling), with the workflows it starts.
pub fn watches(entries: &[(String, OpcuaTrigger)]) -> Vec<(Watch, Vec<String>)> {
    let mut out: Vec<(Watch, Vec<String>)> = Vec::new();
    for (workflow, t) in entries {
        let sampling = t
            .sampling
            .as_deref()
            .and_then(|s| parse_duration(s).ok())
            .unwrap_or(DEFAULT_SAMPLING);
        let deadband = t.deadband.unwrap_or(0.0);
        let same = |w: &Watch| w.point == t.point && w.deadband == deadband && w.sampling == sampling;
        match out.iter_mut().find(|(w, _)| same(w)) {
            Some((_, workflows)) => workflows.push(workflow.clone()),
            None => out.push((
                Watch {
                    point: t.point.clone(),
                    deadband,
                    sampling,
                },
                vec![workflow.clone()],
            )),
        }
    }
    out
}

/// The run id of a change: workflow, device, point and the value's source timestamp (the
/// server's when the source gives none); without either, the exact value.
pub fn change_run_id(workflow: &str, device: &str, change: &Change) -> String {
    let when = match (change.source_ticks, &change.server_timestamp) {
        (Some(t), _) => t.to_string(),
        (None, Some(s)) => format!("s{:016x}", fnv1a(&[s.as_bytes()])),
        (None, None) => format!("v{:016x}", fnv1a(&[change.raw.as_bytes()])),
    };
    let id = format!("opcua:{workflow}:{device}.{}:{when}", change.point);
    if id.len() <= MAX_RUN_ID_LEN {
        return id;
    }
    let key = fnv1a(&[workflow.as_bytes(), device.as_bytes(), change.point.as_bytes()]);
    format!("opcua:{key:016x}:{when}")
}

/// A change as a run's input.
pub fn change_input(device: &str, change: &Change, value: &Value) -> Value {
    json!({
        "device": device,
        "point": change.point,
        "value": value,
        "raw": change.raw,
        "source_timestamp": change.source_timestamp,
        "server_timestamp": change.server_timestamp,
    })
}

fn load(rt: &Runtime) -> Plan {
    let defs = rt.latest_definitions();
    plan(defs.iter().map(|d| (d.name(), d.doc.triggers.as_slice())))
}

/// Keeps a subscription per device named by `opcua:` triggers and starts runs from the changes
/// until the process ends.
pub async fn run(rt: Runtime, mut changed: watch::Receiver<u64>, equipment: Option<Arc<Equipment>>) {
    let mut current = load(&rt);
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Arc<Vec<String>>, Change)>();

    // Handler: starts runs off the subscription callbacks (which must not block).
    let handler = {
        let rt = rt.clone();
        tokio::spawn(async move {
            while let Some((device, workflows, change)) = rx.recv().await {
                let value = match &change.value {
                    Ok(v) => v.clone(),
                    Err(e) => {
                        warn!(device, point = %change.point, error = %e, "opcua trigger: a change that is not a value; no run");
                        continue;
                    }
                };
                for w in workflows.iter() {
                    let id = change_run_id(w, &device, &change);
                    let source = format!("opcua {device}.{}", change.point);
                    let mut delay = Duration::from_millis(500);
                    while let Delivery::Deferred =
                        deliver(&rt, w, id.clone(), change_input(&device, &change, &value), &source).await
                    {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
        })
    };

    let mut subscribed: HashMap<String, Subscription> = HashMap::new();
    let mut warned: HashSet<String> = HashSet::new();
    loop {
        if current.is_empty() {
            // Nothing to watch: no timer, so an idle agent stays idle.
            if changed.changed().await.is_err() {
                break;
            }
            current = load(&rt);
            continue;
        }
        for (device, entries) in &current {
            let dev = match equipment.as_ref().map(|e| e.opcua(device)) {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    if warned.insert(device.clone()) {
                        warn!(device, error = %e, "opcua trigger names a device that is not an opcua device; no runs");
                    }
                    continue;
                }
                None => {
                    if warned.insert(device.clone()) {
                        warn!(
                            device,
                            "opcua trigger, but no equipment is configured (--equipment FILE); no runs"
                        );
                    }
                    continue;
                }
            };
            let alive = dev.session_generation().await;
            if alive.is_some() && alive == subscribed.get(device).map(|s| s.generation) {
                continue;
            }
            let (watches, workflows): (Vec<Watch>, Vec<Arc<Vec<String>>>) =
                watches(entries).into_iter().map(|(w, wf)| (w, Arc::new(wf))).unzip();
            let (tx, name) = (tx.clone(), device.clone());
            let on_change = move |i: usize, c: Change| {
                if let Some(wf) = workflows.get(i) {
                    let _ = tx.send((name.clone(), wf.clone(), c));
                }
            };
            match dev.subscribe(&watches, on_change).await {
                Ok(sub) => {
                    info!(device, points = watches.len(), "opcua trigger subscribed");
                    warned.remove(device);
                    subscribed.insert(device.clone(), sub);
                }
                Err(e) => {
                    subscribed.remove(device);
                    if warned.insert(device.clone()) {
                        warn!(device, error = %e, "opcua trigger cannot subscribe; trying again");
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK) => {}
            Ok(()) = changed.changed() => {
                let next = load(&rt);
                // Subscriptions are made again from the new plan; the old ones end.
                for (device, sub) in subscribed.drain() {
                    if let Some(Ok(d)) = equipment.as_ref().map(|e| e.opcua(&device)) {
                        d.unsubscribe(sub).await;
                    }
                }
                warned.clear();
                current = next;
            }
        }
        if handler.is_finished() {
            break;
        }
    }
    handler.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(ticks: Option<i64>) -> Change {
        Change {
            point: "parts".into(),
            value: Ok(json!(7)),
            raw: "UInt32 7".into(),
            source_ticks: ticks,
            source_timestamp: None,
            server_timestamp: Some("2026-12-03T10:00:00Z".into()),
        }
    }

    #[test]
    fn a_value_sent_again_maps_to_the_run_it_started() {
        let a = change_run_id("count", "press", &change(Some(42)));
        assert_eq!(a, "opcua:count:press.parts:42");
        assert_eq!(a, change_run_id("count", "press", &change(Some(42))));
        assert_ne!(a, change_run_id("count", "press", &change(Some(43))));
        assert_ne!(a, change_run_id("other", "press", &change(Some(42))));
        // Without a source timestamp, the server's.
        assert!(change_run_id("count", "press", &change(None)).starts_with("opcua:count:press.parts:s"));
        let long = "w".repeat(120);
        assert!(change_run_id(&long, "press", &change(Some(1))).len() <= MAX_RUN_ID_LEN);
    }

    #[test]
    fn one_monitored_item_per_point_and_settings() {
        let t = |point: &str, deadband: Option<f64>, sampling: Option<&str>| OpcuaTrigger {
            device: "press".into(),
            point: point.into(),
            deadband,
            sampling: sampling.map(str::to_string),
        };
        let entries = vec![
            ("a".to_string(), t("speed", Some(5.0), None)),
            ("b".to_string(), t("speed", None, None)),
            ("c".to_string(), t("speed", Some(5.0), Some("500ms"))),
            ("d".to_string(), t("parts", None, Some("100ms"))),
        ];
        let w = watches(&entries);
        let summary: Vec<(&str, f64, u128, Vec<&str>)> = w
            .iter()
            .map(|(w, wf)| {
                let wf = wf.iter().map(String::as_str).collect();
                (w.point.as_str(), w.deadband, w.sampling.as_millis(), wf)
            })
            .collect();
        // A workflow with a deadband never gets the changes another one's finer item reports.
        assert_eq!(
            summary,
            vec![
                ("speed", 5.0, 500, vec!["a", "c"]),
                ("speed", 0.0, 500, vec!["b"]),
                ("parts", 0.0, 100, vec!["d"]),
            ]
        );
    }
}
