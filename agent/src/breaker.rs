//! Circuit breakers per target (an HTTP host, a device, a named resource).
//!
//! Every run that talks to a target shares its breaker. After `threshold` consecutive retryable
//! failures the breaker opens: attempts against the target are held (journaled as
//! `AttemptDeferred`) until the cool-down ends, instead of each run hammering a dead PLC on its
//! own backoff schedule. Then it half-opens: one attempt probes; success closes it, failure
//! re-opens it with a doubled cool-down (capped). The state is a pure function of the outcomes
//! fed to it and the clock passed in, so it is unit-tested without time. It lives in memory: a
//! restarted agent learns a target's health again from its next failures.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Breaker settings.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive retryable failures that open the breaker.
    pub threshold: u32,
    /// First cool-down; doubles on every failed probe.
    pub cooldown: Duration,
    /// Longest cool-down.
    pub max_cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            threshold: 5,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Closed,
    Open { until_ms: u64 },
    HalfOpen { probe_since_ms: u64 },
}

#[derive(Debug, Clone)]
struct Breaker {
    state: State,
    failures: u32,
    /// How many times it opened in a row without a success (sets the cool-down).
    opens: u32,
    last_error: Option<String>,
}

/// What an attempt against a target may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Go ahead.
    Pass,
    /// Go ahead as the half-open probe.
    Probe,
    /// Wait until this time and ask again.
    Wait(u64),
}

/// All breakers of the agent.
#[derive(Debug)]
pub struct Breakers {
    config: BreakerConfig,
    map: Mutex<BTreeMap<String, Breaker>>,
}

impl Breakers {
    /// No breakers yet; one is created per target on first use.
    pub fn new(config: BreakerConfig) -> Breakers {
        Breakers {
            config,
            map: Mutex::new(BTreeMap::new()),
        }
    }

    fn with<R>(&self, target: &str, f: impl FnOnce(&mut Breaker, &BreakerConfig) -> R) -> R {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let b = map.entry(target.to_string()).or_insert(Breaker {
            state: State::Closed,
            failures: 0,
            opens: 0,
            last_error: None,
        });
        f(b, &self.config)
    }

    fn cooldown_ms(config: &BreakerConfig, opens: u32) -> u64 {
        let factor = 2u64.saturating_pow(opens.saturating_sub(1).min(20));
        let ms = (config.cooldown.as_millis() as u64).saturating_mul(factor);
        ms.min(config.max_cooldown.as_millis() as u64)
    }

    /// Asks whether an attempt against `target` may run at `now_ms`.
    pub fn gate(&self, target: &str, now_ms: u64) -> Gate {
        self.with(target, |b, config| match b.state {
            State::Closed => Gate::Pass,
            State::Open { until_ms } if now_ms < until_ms => Gate::Wait(until_ms),
            State::Open { .. } => {
                b.state = State::HalfOpen { probe_since_ms: now_ms };
                Gate::Probe
            }
            // One probe at a time; a probe that never reports (its run was cancelled) expires.
            State::HalfOpen { probe_since_ms } => {
                let expiry = probe_since_ms + Self::cooldown_ms(config, b.opens).max(1000);
                if now_ms >= expiry {
                    b.state = State::HalfOpen { probe_since_ms: now_ms };
                    Gate::Probe
                } else {
                    Gate::Wait(expiry.min(now_ms + 1000))
                }
            }
        })
    }

    /// Whether attempts against `target` pass without asking (its breaker is closed); unlike
    /// [`Self::gate`] this never hands out a probe.
    pub fn is_closed(&self, target: &str) -> bool {
        self.with(target, |b, _| b.state == State::Closed)
    }

    /// Records a successful attempt: the target is healthy.
    pub fn success(&self, target: &str) {
        self.with(target, |b, _| {
            b.state = State::Closed;
            b.failures = 0;
            b.opens = 0;
        });
    }

    /// Records a retryable failure; returns when the breaker is open until, if it (re)opened.
    pub fn failure(&self, target: &str, now_ms: u64, error: &str) -> Option<u64> {
        self.with(target, |b, config| {
            b.failures += 1;
            b.last_error = Some(error.to_string());
            let opens = match b.state {
                State::HalfOpen { .. } => true,
                State::Closed => b.failures >= config.threshold,
                State::Open { .. } => false,
            };
            if opens {
                b.opens += 1;
                let until_ms = now_ms + Self::cooldown_ms(config, b.opens);
                b.state = State::Open { until_ms };
                Some(until_ms)
            } else {
                None
            }
        })
    }

    /// Every breaker, for `outpost status`.
    pub fn view(&self, now_ms: u64) -> Vec<BreakerView> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(target, b)| {
                let (state, until) = match b.state {
                    State::Closed => ("closed", None),
                    State::Open { until_ms } if until_ms > now_ms => ("open", Some(until_ms)),
                    State::Open { .. } => ("half_open", None),
                    State::HalfOpen { .. } => ("half_open", None),
                };
                BreakerView {
                    target: target.clone(),
                    state: state.to_string(),
                    consecutive_failures: b.failures,
                    open_until: until.map(outpost_shared::journal::rfc3339),
                    last_error: b.last_error.clone(),
                }
            })
            .collect()
    }
}

/// One breaker as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BreakerView {
    /// The target (resource, HTTP host, device).
    pub target: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Open until (RFC 3339).
    pub open_until: Option<String>,
    /// The latest failure.
    pub last_error: Option<String>,
}

/// The target an attempt talks to: the step's `resource`, an HTTP host, or an equipment device.
pub fn target_of(action: &str, args: &Value, resource: Option<&str>) -> Option<String> {
    if let Some(r) = resource {
        return Some(r.to_string());
    }
    if action == "http" {
        let url = args.get("url")?.as_str()?;
        let uri: hyper::Uri = url.parse().ok()?;
        let host = uri.host()?;
        return Some(match uri.port_u16() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        });
    }
    let equipment = ["gpio.", "sensor.", "adc.", "modbus.", "opcua."];
    if equipment.iter().any(|p| action.starts_with(p)) {
        return args.get("device")?.as_str().map(str::to_string);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn breakers() -> Breakers {
        Breakers::new(BreakerConfig {
            threshold: 3,
            cooldown: Duration::from_millis(1000),
            max_cooldown: Duration::from_millis(3000),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_probes_once_and_closes_on_success() {
        let b = breakers();
        assert_eq!(b.gate("plc", 0), Gate::Pass);
        assert_eq!(b.failure("plc", 10, "timeout"), None);
        assert_eq!(b.failure("plc", 20, "timeout"), None);
        assert_eq!(b.failure("plc", 30, "timeout"), Some(1030));
        assert_eq!(b.gate("plc", 500), Gate::Wait(1030));
        assert_eq!(b.gate("other", 500), Gate::Pass, "breakers are per target");
        assert_eq!(b.gate("plc", 1030), Gate::Probe);
        assert!(matches!(b.gate("plc", 1031), Gate::Wait(_)), "one probe at a time");
        b.success("plc");
        assert_eq!(b.gate("plc", 1040), Gate::Pass);
    }

    #[test]
    fn a_failed_probe_reopens_with_a_longer_capped_cooldown() {
        let b = breakers();
        for t in 0..3 {
            b.failure("plc", t, "x");
        }
        assert_eq!(b.gate("plc", 1002), Gate::Probe);
        assert_eq!(b.failure("plc", 1002, "x"), Some(3002), "doubled");
        assert_eq!(b.gate("plc", 3002), Gate::Probe);
        assert_eq!(b.failure("plc", 3002, "x"), Some(6002), "capped at 3 s");
        let v = b.view(4000);
        assert_eq!(v[0].state, "open");
        assert_eq!(v[0].consecutive_failures, 5);
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let b = breakers();
        b.failure("plc", 0, "x");
        b.failure("plc", 1, "x");
        b.success("plc");
        assert_eq!(b.failure("plc", 2, "x"), None);
        assert_eq!(b.gate("plc", 3), Gate::Pass);
    }

    #[test]
    fn targets_come_from_resource_url_or_device() {
        assert_eq!(target_of("exec", &json!({}), Some("rs485")), Some("rs485".into()));
        assert_eq!(
            target_of("http", &json!({"url": "http://10.0.0.5:8080/x"}), None),
            Some("10.0.0.5:8080".into())
        );
        assert_eq!(
            target_of("modbus.read", &json!({"device": "plc1"}), None),
            Some("plc1".into())
        );
        assert_eq!(target_of("exec", &json!({"command": "x"}), None), None);
    }
}
