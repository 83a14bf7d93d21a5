//! Staged rollouts: a deployment sent wave by wave (canaries first) with a health gate between
//! waves, and `decide`, the pure step that moves a rollout on from what the store shows.
//!
//! The service (`service::rollouts`) observes the store, calls `decide`, carries out the actions
//! and only then stores the new state. Every action is idempotent (commands by id, withdrawals
//! of unanswered commands, a rollback deployment under an id derived from the rollout's), so a
//! crash at any moment repeats at most an action that changes nothing the second time.
//!
//! A rollout can never wait forever: a device holds its wave only while it is online and within
//! its deadline, the gate waits for evidence only until the same deadline, and every state has a
//! reason in words.

pub mod plan;

use std::collections::BTreeMap;

use outpost_shared::journal::rfc3339;
use serde::{Deserialize, Serialize};

pub use plan::{Plan, PlanRequest, Wave};

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Sending waves, waiting for them, or baking.
    Running,
    /// An operator paused it: nothing new is sent.
    Paused,
    /// A gate failed; pending commands were withdrawn.
    Halted,
    /// A gate failed and the previous version was deployed back.
    RolledBack,
    /// An operator, or a newer deployment of the workflow, stopped it.
    Aborted,
    /// Every wave passed.
    Completed,
}

impl Phase {
    /// Its name in the API and the console.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Halted => "halted",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
            Phase::Completed => "completed",
        }
    }

    /// True once nothing more will happen.
    pub fn is_final(self) -> bool {
        !matches!(self, Phase::Running | Phase::Paused)
    }
}

/// The version a rollback deploys back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Previous {
    /// Its version.
    pub version: u32,
    /// Its document.
    pub document: String,
    /// The version it is deployed back as (higher than any deployed so far: versions only go up).
    pub as_version: u32,
}

/// What the gate saw: the figures shown on the deployment page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// Devices of the waves sent that applied the new version.
    pub applied: u32,
    /// Devices of the waves sent still to answer.
    pub pending: u32,
    /// Of those, the offline ones (they do not hold a wave).
    pub offline: Vec<String>,
    /// Online devices that did not answer within their deadline.
    pub timed_out: Vec<String>,
    /// Devices that rejected it, with their reason.
    pub rejected: Vec<(String, String)>,
    /// Runs of the new version on updated devices that completed.
    pub runs_completed: u32,
    /// … that failed.
    pub runs_failed: u32,
    /// … still active.
    pub runs_active: u32,
    /// The failed runs (device, run), at most `MAX_LISTED`.
    pub failed_runs: Vec<(String, String)>,
    /// The custom gate's verdict per updated device that has one: (device, healthy, run).
    pub health: Vec<(String, bool, String)>,
}

/// Most devices or runs a list in `Evidence` names.
pub const MAX_LISTED: usize = 20;

/// One line of a rollout's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// When.
    pub at_ms: u64,
    /// What happened.
    pub text: String,
}

/// Lines of history kept per rollout.
const MAX_LOG: usize = 100;

/// A rollout's stored state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The workflow.
    pub workflow: String,
    /// Its new version.
    pub version: u32,
    /// The document deployed (sent to each wave as it starts).
    pub document: String,
    /// The plan.
    pub plan: Plan,
    /// The waves, canaries first.
    pub waves: Vec<Wave>,
    /// What a rollback deploys, when there is an earlier version.
    pub previous: Option<Previous>,
    /// Where it stands.
    pub phase: Phase,
    /// Waves sent so far; the current wave is the last of them.
    pub sent: u32,
    /// When the current wave started.
    pub wave_started_ms: u64,
    /// When every device of the current wave had answered or stopped holding it.
    pub settled_ms: Option<u64>,
    /// The operator skipped the current wave's bake and pace.
    pub promoted: bool,
    /// Why it stands where it does, in words.
    pub reason: String,
    /// What the gate saw last.
    pub evidence: Evidence,
    /// The deployment that rolled it back.
    pub rollback_deployment: Option<String>,
    /// What happened, oldest first.
    pub log: Vec<LogEntry>,
}

/// What a device of a sent wave did with the deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Not answered yet.
    Pending,
    /// Applied.
    Applied,
    /// Rejected.
    Rejected,
    /// Withdrawn or superseded: not updated by this rollout.
    Closed,
    /// No command (it could not be queued): sent again.
    Missing,
}

/// One device of a sent wave, as the store shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    /// Its command's state.
    pub state: DeviceState,
    /// Online now.
    pub online: bool,
    /// Its answer's message.
    pub message: String,
}

/// The new version's runs on updated devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunCounts {
    /// Completed.
    pub completed: u32,
    /// Failed (failed, compensated, compensation failed or compensating).
    pub failed: u32,
    /// Still active.
    pub active: u32,
    /// The failed runs (device, run), at most `MAX_LISTED`.
    pub failed_runs: Vec<(String, String)>,
}

/// What the store shows of a rollout's devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// Every device of the waves sent.
    pub devices: BTreeMap<String, DeviceView>,
    /// The new version's runs on devices that applied it.
    pub runs: RunCounts,
    /// The custom gate's newest verdict per updated device: (healthy, run).
    pub health: BTreeMap<String, (bool, String)>,
}

/// Something the service does for a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Queue the deployment's command for these devices.
    Send {
        /// The devices.
        devices: Vec<String>,
    },
    /// Close these devices' unanswered commands (answered ones are left as they are).
    Withdraw {
        /// The devices.
        devices: Vec<String>,
        /// Why, as the device's state says it.
        why: String,
    },
    /// Deploy the previous version back to these devices as `Previous::as_version`.
    RollBack {
        /// The devices that applied the new version.
        devices: Vec<String>,
    },
}

/// An operator's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Send nothing new until resumed.
    Pause,
    /// Go on.
    Resume,
    /// Skip the current wave's bake and pace: the next wave starts once it is applied.
    Promote,
    /// Stop for good; pending commands are withdrawn.
    Abort,
}

impl Order {
    /// Parses `pause`, `resume`, `promote` or `abort`.
    pub fn parse(name: &str) -> Option<Order> {
        Some(match name {
            "pause" => Order::Pause,
            "resume" => Order::Resume,
            "promote" => Order::Promote,
            "abort" => Order::Abort,
            _ => return None,
        })
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Order::Pause => "pause",
            Order::Resume => "resume",
            Order::Promote => "promote",
            Order::Abort => "abort",
        }
    }
}

/// A rollout after a decision, and what to do for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The new state (store it after the actions are done).
    pub rollout: Rollout,
    /// The actions, in order.
    pub actions: Vec<Action>,
}

impl Rollout {
    /// A rollout about to send its first wave.
    pub fn new(
        workflow: String,
        version: u32,
        document: String,
        plan: Plan,
        waves: Vec<Wave>,
        previous: Option<Previous>,
        now: u64,
    ) -> Rollout {
        Rollout {
            workflow,
            version,
            document,
            log: vec![LogEntry {
                at_ms: now,
                text: format!("planned: {}", plan.summary),
            }],
            plan,
            waves,
            previous,
            phase: Phase::Running,
            sent: 0,
            wave_started_ms: now,
            settled_ms: None,
            promoted: false,
            reason: "starting".into(),
            evidence: Evidence::default(),
            rollback_deployment: None,
        }
    }

    /// Devices of the waves sent so far.
    pub fn sent_devices(&self) -> impl Iterator<Item = &String> {
        self.waves
            .iter()
            .take(self.sent as usize)
            .flat_map(|w| w.devices.iter())
    }

    /// The wave a device is in (index).
    pub fn wave_of(&self, device: &str) -> Option<usize> {
        self.waves.iter().position(|w| w.devices.iter().any(|d| d == device))
    }

    fn note(&mut self, at_ms: u64, text: String) {
        self.log.push(LogEntry { at_ms, text });
        if self.log.len() > MAX_LOG {
            self.log.remove(1);
        }
    }

    /// Ends it with a newer deployment of the same workflow taking over.
    pub fn superseded(&self, by: &str, now: u64) -> Step {
        let mut r = self.clone();
        r.phase = Phase::Aborted;
        r.reason = format!("superseded by deployment {by}");
        r.note(now, r.reason.clone());
        let devices = self.sent_devices().cloned().collect();
        Step {
            rollout: r,
            actions: vec![Action::Withdraw {
                devices,
                why: format!("superseded by deployment {by}"),
            }],
        }
    }
}

/// Carries out an operator's order; `Err` says why it does not apply now.
pub fn order(r: &Rollout, o: Order, who: &str, now: u64) -> Result<Step, String> {
    let mut next = r.clone();
    let mut actions = Vec::new();
    match (o, r.phase) {
        (_, p) if p.is_final() => {
            return Err(format!(
                "the rollout is {}: nothing to {}",
                p.as_str().replace('_', " "),
                o.as_str()
            ));
        }
        (Order::Pause, Phase::Running) => {
            next.phase = Phase::Paused;
            next.reason = format!("paused by {who}: nothing new is sent until it is resumed");
        }
        (Order::Resume, Phase::Paused) => {
            next.phase = Phase::Running;
            next.reason = format!("resumed by {who}");
        }
        (Order::Promote, _) => {
            next.promoted = true;
            next.reason = format!("promoted by {who}: the next wave starts once this one is applied");
        }
        (Order::Abort, _) => {
            next.phase = Phase::Aborted;
            next.reason = format!("aborted by {who}");
            actions.push(Action::Withdraw {
                devices: r.sent_devices().cloned().collect(),
                why: format!("rollout aborted by {who}"),
            });
        }
        (Order::Pause, _) | (Order::Resume, _) => {
            return Err(format!(
                "the rollout is {}: nothing to {}",
                r.phase.as_str(),
                o.as_str()
            ));
        }
    }
    let line = format!("{} by {who}", o.as_str());
    next.note(now, line);
    Ok(Step { rollout: next, actions })
}

fn at(ms: u64) -> String {
    rfc3339(ms)
}

/// The gate's figures from what the store shows.
fn evidence(r: &Rollout, obs: &Observation, now: u64) -> Evidence {
    let deadline = r.wave_started_ms.saturating_add(r.plan.device_deadline_ms);
    let current: Vec<&String> = r
        .waves
        .get((r.sent as usize).saturating_sub(1))
        .map(|w| w.devices.iter().collect())
        .unwrap_or_default();
    let mut e = Evidence::default();
    for d in r.sent_devices() {
        let Some(v) = obs.devices.get(d) else { continue };
        match v.state {
            DeviceState::Applied => e.applied += 1,
            DeviceState::Pending | DeviceState::Missing => {
                e.pending += 1;
                if !v.online {
                    e.offline.push(d.clone());
                } else if now >= deadline && current.contains(&d) {
                    e.timed_out.push(d.clone());
                }
            }
            DeviceState::Rejected => e.rejected.push((d.clone(), v.message.clone())),
            DeviceState::Closed => {}
        }
    }
    e.offline.truncate(MAX_LISTED);
    e.timed_out.truncate(MAX_LISTED);
    e.rejected.truncate(MAX_LISTED);
    e.runs_completed = obs.runs.completed;
    e.runs_failed = obs.runs.failed;
    e.runs_active = obs.runs.active;
    e.failed_runs = obs.runs.failed_runs.iter().take(MAX_LISTED).cloned().collect();
    e.health = obs
        .health
        .iter()
        .take(MAX_LISTED)
        .map(|(d, (ok, run))| (d.clone(), *ok, run.clone()))
        .collect();
    e
}

/// Why the rollout must stop now, whatever the bake: a rejection, too many failed runs, or the
/// custom gate saying unhealthy.
fn failure(r: &Rollout, e: &Evidence) -> Option<String> {
    if let Some((d, why)) = e.rejected.first() {
        return Some(format!("device {d} rejected the deployment: {why}"));
    }
    let g = &r.plan.gate;
    if e.runs_failed > g.max_failed_runs {
        let ended = e.runs_completed + e.runs_failed;
        let which: Vec<String> = e
            .failed_runs
            .iter()
            .take(3)
            .map(|(d, run)| format!("{d}/{run}"))
            .collect();
        return Some(format!(
            "{} of {ended} ended runs of v{} failed (at most {} allowed): {}",
            e.runs_failed,
            r.version,
            g.max_failed_runs,
            which.join(", ")
        ));
    }
    if let Some((d, _, run)) = e.health.iter().find(|(_, ok, _)| !ok) {
        return Some(format!(
            "health check {} on {d} says unhealthy (run {run})",
            g.workflow.as_deref().unwrap_or("?")
        ));
    }
    None
}

/// The gate's verdict once the bake is over: `Ok` to go on, `Err(Some)` failed, `Err(None)`
/// with the reason to wait for more evidence.
enum Verdict {
    Pass,
    Fail(String),
    Wait(String),
}

fn gate(r: &Rollout, e: &Evidence, obs: &Observation) -> Verdict {
    let g = &r.plan.gate;
    let ended = e.runs_completed + e.runs_failed;
    if ended < g.min_runs {
        return Verdict::Wait(format!(
            "waiting for evidence: {ended} of the {} runs of v{} the gate needs have ended",
            g.min_runs, r.version
        ));
    }
    if ended > 0 && u64::from(e.runs_completed) * 100 < u64::from(g.min_completed_percent) * u64::from(ended) {
        return Verdict::Fail(format!(
            "only {} of {ended} ended runs of v{} completed (at least {}% needed)",
            e.runs_completed, r.version, g.min_completed_percent
        ));
    }
    if let Some(w) = &g.workflow {
        let missing: Vec<&String> = r
            .sent_devices()
            .filter(|d| obs.devices.get(*d).is_some_and(|v| v.state == DeviceState::Applied))
            .filter(|d| !obs.health.contains_key(*d))
            .collect();
        if let Some(first) = missing.first() {
            return Verdict::Wait(format!(
                "waiting for health check {w} on {} (first: {first})",
                outpost_shared::count(missing.len() as u64, "device")
            ));
        }
    }
    Verdict::Pass
}

fn halt(r: &Rollout, next: &mut Rollout, actions: &mut Vec<Action>, obs: &Observation, why: String, now: u64) {
    let wave = r
        .waves
        .get((r.sent as usize).saturating_sub(1))
        .map_or("?", |w| w.name.as_str());
    actions.push(Action::Withdraw {
        devices: r.sent_devices().cloned().collect(),
        why: format!("rollout halted: {why}"),
    });
    next.phase = Phase::Halted;
    next.reason = format!("halted at {wave}: {why}");
    if r.plan.rollback {
        let updated: Vec<String> = r
            .sent_devices()
            .filter(|d| obs.devices.get(*d).is_some_and(|v| v.state == DeviceState::Applied))
            .cloned()
            .collect();
        match &r.previous {
            Some(p) if !updated.is_empty() => {
                next.phase = Phase::RolledBack;
                next.reason = format!(
                    "halted at {wave}: {why}; v{} deployed back as v{} to {} updated",
                    p.version,
                    p.as_version,
                    outpost_shared::count(updated.len() as u64, "device")
                );
                actions.push(Action::RollBack { devices: updated });
            }
            Some(_) => next
                .reason
                .push_str("; no device had applied it, so nothing to roll back"),
            None => next.reason.push_str("; no earlier version to roll back to"),
        }
    }
    next.note(now, next.reason.clone());
}

/// One step of a rollout: from its state and what the store shows now, its next state and the
/// actions that get it there.
pub fn decide(r: &Rollout, obs: &Observation, now: u64) -> Step {
    let mut next = r.clone();
    let mut actions = Vec::new();
    if r.phase.is_final() {
        return Step { rollout: next, actions };
    }
    next.evidence = evidence(r, obs, now);
    // A device whose command could not be queued is sent again (never stuck on a full outbox).
    let missing: Vec<String> = r
        .sent_devices()
        .filter(|d| obs.devices.get(*d).is_some_and(|v| v.state == DeviceState::Missing))
        .cloned()
        .collect();
    if !missing.is_empty() {
        actions.push(Action::Send { devices: missing });
    }
    if r.sent > 0
        && let Some(why) = failure(r, &next.evidence)
    {
        halt(r, &mut next, &mut actions, obs, why, now);
        return Step { rollout: next, actions };
    }
    if r.phase == Phase::Paused {
        return Step { rollout: next, actions };
    }
    if r.sent == 0 {
        start_wave(r, &mut next, &mut actions, obs, 0, now);
        return Step { rollout: next, actions };
    }
    let w = r.sent as usize - 1;
    let Some(wave) = r.waves.get(w) else {
        next.phase = Phase::Completed;
        next.reason = "no wave to send".into();
        return Step { rollout: next, actions };
    };
    let deadline = r.wave_started_ms.saturating_add(r.plan.device_deadline_ms);
    let holding: Vec<&String> = wave
        .devices
        .iter()
        .filter(|d| {
            obs.devices
                .get(*d)
                .is_some_and(|v| matches!(v.state, DeviceState::Pending | DeviceState::Missing) && v.online)
        })
        .collect();
    if !holding.is_empty() && now < deadline {
        let applied = wave
            .devices
            .iter()
            .filter(|d| obs.devices.get(*d).is_some_and(|v| v.state == DeviceState::Applied))
            .count();
        next.reason = format!(
            "{}: {applied} of {} applied; waiting for {} online to answer (until {}){}",
            wave.name,
            wave.devices.len(),
            outpost_shared::count(holding.len() as u64, "device"),
            at(deadline),
            offline_note(&next.evidence),
        );
        return Step { rollout: next, actions };
    }
    let settled = r.settled_ms.unwrap_or(now);
    if r.settled_ms.is_none() {
        next.settled_ms = Some(settled);
        next.note(now, format!("{} applied{}", wave.name, offline_note(&next.evidence)));
    }
    let bake_end = settled.saturating_add(r.plan.bake_ms);
    let e = &next.evidence;
    if !r.promoted && now < bake_end {
        next.reason = format!(
            "{} applied; watching its runs until {}: {} completed, {} failed, {} active",
            wave.name,
            at(bake_end),
            e.runs_completed,
            e.runs_failed,
            e.runs_active
        );
        return Step { rollout: next, actions };
    }
    match gate(r, e, obs) {
        Verdict::Fail(why) => {
            halt(r, &mut next, &mut actions, obs, why, now);
            return Step { rollout: next, actions };
        }
        Verdict::Wait(why) if !r.promoted => {
            // Evidence is awaited as long as a device is: then the rollout stops and says why.
            let give_up = bake_end.max(deadline);
            if now < give_up {
                next.reason = format!("{}: {why} (until {})", wave.name, at(give_up));
            } else {
                halt(
                    r,
                    &mut next,
                    &mut actions,
                    obs,
                    format!("no verdict by {}: {why}", at(give_up)),
                    now,
                );
            }
            return Step { rollout: next, actions };
        }
        Verdict::Wait(_) | Verdict::Pass => {}
    }
    if w + 1 >= r.waves.len() {
        next.phase = Phase::Completed;
        next.reason = format!(
            "all {} done: {} applied{}",
            outpost_shared::count(r.waves.len() as u64, "wave"),
            e.applied,
            offline_note(e)
        );
        next.note(now, next.reason.clone());
        return Step { rollout: next, actions };
    }
    let pace_end = r.wave_started_ms.saturating_add(r.plan.pace_ms);
    if !r.promoted && now < pace_end {
        let upcoming = r.waves.get(w + 1).map_or("?", |w| w.name.as_str());
        next.reason = format!(
            "{} passed its gate; waiting for {upcoming} at {}",
            wave.name,
            at(pace_end)
        );
        return Step { rollout: next, actions };
    }
    start_wave(r, &mut next, &mut actions, obs, w + 1, now);
    Step { rollout: next, actions }
}

fn offline_note(e: &Evidence) -> String {
    let mut s = String::new();
    if !e.offline.is_empty() {
        s.push_str(&format!(
            "; {} offline, updated when they return",
            outpost_shared::count(e.offline.len() as u64, "device")
        ));
    }
    if !e.timed_out.is_empty() {
        s.push_str(&format!(
            "; {} did not answer in time",
            outpost_shared::count(e.timed_out.len() as u64, "device")
        ));
    }
    s
}

fn start_wave(r: &Rollout, next: &mut Rollout, actions: &mut Vec<Action>, obs: &Observation, w: usize, now: u64) {
    let Some(wave) = r.waves.get(w) else { return };
    actions.push(Action::Send {
        devices: wave.devices.clone(),
    });
    let mut text = format!(
        "{} started: {}",
        wave.name,
        outpost_shared::count(wave.devices.len() as u64, "device")
    );
    if r.plan.skip_offline {
        // Whether a device is online is known only for devices already observed: the service
        // observes every target for this (see `service::rollouts`).
        let offline: Vec<String> = wave
            .devices
            .iter()
            .filter(|d| obs.devices.get(*d).is_some_and(|v| !v.online))
            .cloned()
            .collect();
        if !offline.is_empty() {
            text.push_str(&format!(", {} offline skipped", offline.len()));
            actions.push(Action::Withdraw {
                devices: offline,
                why: "skipped: offline when its wave started".into(),
            });
        }
    }
    next.sent = u32::try_from(w + 1).unwrap_or(u32::MAX);
    next.wave_started_ms = now;
    next.settled_ms = None;
    next.promoted = false;
    next.reason = text.clone();
    next.note(now, text);
}

#[cfg(test)]
mod tests;
