//! A rollout plan as an operator writes it (the `rollout:` block of a deployment request, or the
//! console's form) and its resolution into concrete waves of devices.

use std::fmt;

use outpost_shared::definition::{DurationText, parse_duration};
use serde::{Deserialize, Deserializer, Serialize};

/// How many devices: a count (`2` or `"2"`) or a share of the devices targeted (`"10%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// This many devices.
    Count(u32),
    /// This share of the devices targeted, rounded up.
    Percent(u32),
}

impl Amount {
    /// Parses `"2"` or `"10%"`.
    pub fn parse(text: &str) -> Result<Amount, String> {
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            match p.trim().parse::<u32>() {
                Ok(n) if (1..=100).contains(&n) => Ok(Amount::Percent(n)),
                _ => Err(format!("'{text}' is not a percentage from 1% to 100%")),
            }
        } else {
            match t.parse::<u32>() {
                Ok(n) if n > 0 => Ok(Amount::Count(n)),
                _ => Err(format!(
                    "'{text}' is not a number of devices (at least 1) or a percentage such as 10%"
                )),
            }
        }
    }

    /// How many of `total` devices: at least one, at most `total`.
    pub fn of(self, total: usize) -> usize {
        let n = match self {
            Amount::Count(n) => n as usize,
            Amount::Percent(p) => (total * p as usize).div_ceil(100),
        };
        n.clamp(1, total.max(1))
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Amount;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of devices or a percentage such as \"10%\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Amount, E> {
                Amount::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Amount, E> {
                Amount::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Amount, E> {
                Amount::parse(&v.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The canaries: devices by name, or an amount picked deterministically.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Canary {
    /// These devices.
    Devices(Vec<String>),
    /// This many, picked by a stable hash of workflow and device (the same ones each time).
    Amount(Amount),
}

/// What a failed gate does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop: no further wave, pending commands withdrawn.
    #[default]
    Halt,
    /// Stop, and deploy the previous version back (as a new, higher version) to the devices
    /// already updated.
    Rollback,
}

/// Devices offline when their wave starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfflinePolicy {
    /// Queued: updated when they return; they never hold the wave.
    #[default]
    Wait,
    /// Not updated by this rollout.
    Skip,
}

/// The health gate between waves, as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateRequest {
    /// Of the new version's runs that ended on updated devices, at least this share completed
    /// (default 90).
    #[serde(default)]
    pub min_completed_percent: Option<u32>,
    /// At most this many of them failed (default 0).
    #[serde(default)]
    pub max_failed_runs: Option<u32>,
    /// At least this many ended before the gate judges (default 0: no runs is no failure).
    #[serde(default)]
    pub min_runs: Option<u32>,
    /// A custom gate: on every updated device, the newest run of this workflow started after
    /// the update must complete with `healthy: true` in its output.
    #[serde(default)]
    pub workflow: Option<String>,
}

/// A rollout plan as written (`rollout:` in a deployment request).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    /// Canary devices: names, a count or a percentage (default: none).
    #[serde(default)]
    pub canary: Option<Canary>,
    /// Size of each wave after the canaries (default: all the rest in one wave).
    #[serde(default)]
    pub wave: Option<Amount>,
    /// One wave per value of this label instead (site by site), in the values' order.
    #[serde(default)]
    pub wave_by_label: Option<String>,
    /// Least time from the start of one wave to the start of the next (default 15m).
    #[serde(default)]
    pub pace: Option<DurationText>,
    /// How long a wave's runs are watched, once it is applied, before its gate (default 5m).
    #[serde(default)]
    pub bake: Option<DurationText>,
    /// The health gate.
    #[serde(default)]
    pub gate: GateRequest,
    /// `halt` (default) or `rollback`.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// How long a device of a wave has to answer before it stops holding the wave (default 1h).
    #[serde(default)]
    pub device_deadline: Option<DurationText>,
    /// `wait` (default) or `skip`.
    #[serde(default)]
    pub offline: OfflinePolicy,
}

/// The health gate, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    /// Least share of ended runs that completed, in percent.
    pub min_completed_percent: u32,
    /// Most failed runs.
    pub max_failed_runs: u32,
    /// Least ended runs before a verdict.
    pub min_runs: u32,
    /// The custom gate's workflow.
    pub workflow: Option<String>,
}

/// A plan resolved: durations in ms, what to do on failure and with offline devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The plan in words, as the console shows it.
    pub summary: String,
    /// Least time between wave starts.
    pub pace_ms: u64,
    /// Watch time after a wave is applied.
    pub bake_ms: u64,
    /// How long a device holds its wave.
    pub device_deadline_ms: u64,
    /// The gate.
    pub gate: Gate,
    /// Roll back on failure.
    pub rollback: bool,
    /// Skip devices offline when their wave starts.
    pub skip_offline: bool,
}

/// One wave of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// `canary`, `wave 1`, … or `site=north`.
    pub name: String,
    /// Its devices.
    pub devices: Vec<String>,
}

const DEFAULT_PACE: &str = "15m";
const DEFAULT_BAKE: &str = "5m";
const DEFAULT_DEVICE_DEADLINE: &str = "1h";

fn millis(what: &str, text: Option<&DurationText>, default: &str) -> Result<u64, String> {
    let t = text.map_or(default, |d| d.0.as_str());
    parse_duration(t)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .map_err(|e| format!("rollout.{what}: {e}"))
}

/// FNV-1a: a stable order of devices per workflow, the same on every machine and release.
fn stable_hash(workflow: &str, device: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in workflow.bytes().chain([0u8]).chain(device.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl PlanRequest {
    /// Resolves the plan against the devices targeted (each with its labels): the plan and its
    /// waves, canaries first. Every targeted device is in exactly one wave.
    pub fn resolve(
        &self,
        workflow: &str,
        targets: &[(String, Vec<(String, String)>)],
    ) -> Result<(Plan, Vec<Wave>), String> {
        let pace_ms = millis("pace", self.pace.as_ref(), DEFAULT_PACE)?;
        let bake_ms = millis("bake", self.bake.as_ref(), DEFAULT_BAKE)?;
        let device_deadline_ms = millis(
            "device_deadline",
            self.device_deadline.as_ref(),
            DEFAULT_DEVICE_DEADLINE,
        )?;
        if device_deadline_ms == 0 {
            return Err("rollout.device_deadline: must be more than 0".into());
        }
        let min_completed_percent = self.gate.min_completed_percent.unwrap_or(90);
        if min_completed_percent > 100 {
            return Err(format!(
                "rollout.gate.min_completed_percent: {min_completed_percent} is more than 100"
            ));
        }
        if self.wave.is_some() && self.wave_by_label.is_some() {
            return Err("rollout: give wave or wave_by_label, not both".into());
        }
        if targets.is_empty() {
            return Err("rollout: no device to roll out to".into());
        }
        let mut order: Vec<&(String, Vec<(String, String)>)> = targets.iter().collect();
        order.sort_by_key(|(d, _)| (stable_hash(workflow, d), d.clone()));

        let canaries: Vec<String> = match &self.canary {
            None => Vec::new(),
            Some(Canary::Devices(names)) => {
                for n in names {
                    if !targets.iter().any(|(d, _)| d == n) {
                        return Err(format!("rollout.canary: '{n}' is not one of the deployment's devices"));
                    }
                }
                let mut out: Vec<String> = Vec::new();
                for n in names {
                    if !out.contains(n) {
                        out.push(n.clone());
                    }
                }
                out
            }
            Some(Canary::Amount(a)) => order.iter().take(a.of(targets.len())).map(|(d, _)| d.clone()).collect(),
        };
        let rest: Vec<&(String, Vec<(String, String)>)> =
            order.into_iter().filter(|(d, _)| !canaries.contains(d)).collect();

        let mut waves = Vec::new();
        if !canaries.is_empty() {
            waves.push(Wave {
                name: "canary".into(),
                devices: canaries.clone(),
            });
        }
        let shape = if let Some(key) = &self.wave_by_label {
            let mut groups = std::collections::BTreeMap::<Option<String>, Vec<String>>::new();
            for (d, labels) in &rest {
                let value = labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
                groups.entry(value).or_default().push(d.clone());
            }
            // Devices without the label go last.
            let unlabelled = groups.remove(&None);
            for (value, devices) in groups {
                waves.push(Wave {
                    name: format!("{key}={}", value.unwrap_or_default()),
                    devices,
                });
            }
            if let Some(devices) = unlabelled {
                waves.push(Wave {
                    name: format!("no {key} label"),
                    devices,
                });
            }
            format!("one wave per {key}")
        } else if let Some(size) = self.wave {
            let n = size.of(targets.len());
            for (i, chunk) in rest.chunks(n).enumerate() {
                waves.push(Wave {
                    name: format!("wave {}", i + 1),
                    devices: chunk.iter().map(|(d, _)| d.clone()).collect(),
                });
            }
            format!("waves of {size}")
        } else {
            if !rest.is_empty() {
                waves.push(Wave {
                    name: "wave 1".into(),
                    devices: rest.iter().map(|(d, _)| d.clone()).collect(),
                });
            }
            "the rest at once".to_string()
        };
        let gate = Gate {
            min_completed_percent,
            max_failed_runs: self.gate.max_failed_runs.unwrap_or(0),
            min_runs: self.gate.min_runs.unwrap_or(0),
            workflow: self.gate.workflow.clone().filter(|w| !w.trim().is_empty()),
        };
        let human = |ms: u64| humantime::format_duration(std::time::Duration::from_millis(ms)).to_string();
        let canary_text = match canaries.len() {
            0 => "no canary".to_string(),
            n => format!("{} then", outpost_shared::count(n as u64, "canary device")),
        };
        let summary = format!(
            "{canary_text} {shape}, every {} at the earliest, each watched {} once applied; gate: ≥{}% of ended runs completed, ≤{} failed{}{}; on failure: {}; offline devices: {}",
            human(pace_ms),
            human(bake_ms),
            gate.min_completed_percent,
            gate.max_failed_runs,
            if gate.min_runs > 0 {
                format!(", ≥{} runs", gate.min_runs)
            } else {
                String::new()
            },
            gate.workflow
                .as_ref()
                .map(|w| format!(", {w} says healthy"))
                .unwrap_or_default(),
            if self.on_failure == OnFailure::Rollback {
                "roll back"
            } else {
                "halt"
            },
            if self.offline == OfflinePolicy::Skip {
                "skipped"
            } else {
                "updated when they return"
            },
        );
        Ok((
            Plan {
                summary,
                pace_ms,
                bake_ms,
                device_deadline_ms,
                gate,
                rollback: self.on_failure == OnFailure::Rollback,
                skip_offline: self.offline == OfflinePolicy::Skip,
            },
            waves,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(n: usize) -> Vec<(String, Vec<(String, String)>)> {
        (1..=n)
            .map(|i| {
                let site = if i % 2 == 0 { "north" } else { "south" };
                (format!("gw{i:02}"), vec![("site".to_string(), site.to_string())])
            })
            .collect()
    }

    fn plan(json: &str) -> PlanRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn amounts_parse_and_round_up() {
        assert_eq!(Amount::parse("10%"), Ok(Amount::Percent(10)));
        assert_eq!(Amount::parse(" 3 "), Ok(Amount::Count(3)));
        assert!(Amount::parse("0").is_err() && Amount::parse("101%").is_err() && Amount::parse("x").is_err());
        assert_eq!(Amount::Percent(10).of(20), 2);
        assert_eq!(Amount::Percent(10).of(3), 1);
        assert_eq!(Amount::Count(50).of(20), 20);
        assert_eq!(plan(r#"{"canary": 2}"#).canary, Some(Canary::Amount(Amount::Count(2))));
        assert_eq!(
            plan(r#"{"canary": "5%"}"#).canary,
            Some(Canary::Amount(Amount::Percent(5)))
        );
        assert_eq!(
            plan(r#"{"canary": ["a"]}"#).canary,
            Some(Canary::Devices(vec!["a".into()]))
        );
        assert!(serde_json::from_str::<PlanRequest>(r#"{"canary": 2, "wvae": "10%"}"#).is_err());
    }

    #[test]
    fn every_device_is_in_exactly_one_wave_canaries_first() {
        let targets = fleet(20);
        let (p, waves) = plan(r#"{"canary": 2, "wave": "50%", "pace": "3s", "bake": "1s"}"#)
            .resolve("recipe", &targets)
            .unwrap();
        let names: Vec<&str> = waves.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["canary", "wave 1", "wave 2"]);
        assert_eq!(waves.iter().map(|w| w.devices.len()).collect::<Vec<_>>(), [2, 10, 8]);
        let mut all: Vec<&String> = waves.iter().flat_map(|w| &w.devices).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 20);
        assert_eq!((p.pace_ms, p.bake_ms, p.device_deadline_ms), (3000, 1000, 3_600_000));
        // Deterministic: the same canaries again, and others for another workflow.
        let (_, again) = plan(r#"{"canary": 2}"#).resolve("recipe", &targets).unwrap();
        assert_eq!(again.first(), waves.first());
        let (_, other) = plan(r#"{"canary": 4}"#).resolve("mixer", &targets).unwrap();
        assert_ne!(
            other.first().map(|w| &w.devices[..2]),
            waves.first().map(|w| &w.devices[..])
        );
    }

    #[test]
    fn named_canaries_and_waves_by_label() {
        let targets = fleet(6);
        let (_, waves) = plan(r#"{"canary": ["gw03", "gw03"], "wave_by_label": "site"}"#)
            .resolve("recipe", &targets)
            .unwrap();
        assert_eq!(waves[0].devices, ["gw03"]);
        assert_eq!(waves[1].name, "site=north");
        assert_eq!(waves[1].devices.len(), 3);
        assert_eq!(waves[2].name, "site=south");
        assert_eq!(waves[2].devices.len(), 2, "the canary is not in a later wave");
        let e = plan(r#"{"canary": ["gw99"]}"#).resolve("recipe", &targets).unwrap_err();
        assert!(e.contains("'gw99' is not one of the deployment's devices"), "{e}");
        let e = plan(r#"{"pace": "soon"}"#).resolve("recipe", &targets).unwrap_err();
        assert!(e.starts_with("rollout.pace:"), "{e}");
        let e = plan(r#"{"gate": {"min_completed_percent": 120}}"#)
            .resolve("recipe", &targets)
            .unwrap_err();
        assert!(e.contains("more than 100"), "{e}");
    }
}
