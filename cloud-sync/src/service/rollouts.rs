//! Rollouts in motion: a ticker observes every rollout still going, asks
//! `rollout::decide` what to do, does it, and stores the new state (in that order, with
//! idempotent actions: see `crate::rollout`). Operators' orders go through the same path.

use std::sync::Weak;
use std::time::Duration;

use outpost_shared::journal::Event;
use outpost_shared::run::RunStatus;
use tracing::{info, warn};

use super::{Service, blocking, now_ms};
use crate::rollout::{self, Action, DeviceState, DeviceView, Observation, Order, Previous, Rollout};
use crate::store::{Store, StoreError};

/// How often rollouts are looked at (waits are in seconds at the least, bakes in minutes).
const TICK: Duration = Duration::from_secs(1);

/// Moves every rollout on once a second, until the service is gone.
pub(super) async fn tick(service: Weak<Service>) {
    loop {
        tokio::time::sleep(TICK).await;
        let Some(s) = service.upgrade() else { return };
        if let Err(e) = s.advance_rollouts().await {
            warn!(error = %e, "cannot read the rollouts; trying again");
        }
    }
}

/// The id of the deployment that rolls back deployment `id`.
pub fn rollback_id(id: &str) -> String {
    format!("{id}r")
}

/// The newest earlier version of `workflow` that a rollback can go back to, and the version it
/// goes back as (above every version deployed so far). Versions from rollouts that halted are
/// not gone back to.
pub(super) fn previous_version(store: &Store, workflow: &str, version: u32) -> Result<Option<Previous>, StoreError> {
    let deployments = store.deployments()?;
    let highest = deployments
        .iter()
        .filter(|(_, d)| d.workflow == workflow)
        .map(|(_, d)| d.version)
        .max()
        .unwrap_or(0)
        .max(version);
    for (id, d) in &deployments {
        if d.workflow != workflow || d.version >= version {
            continue;
        }
        let document = match store.rollout(id)? {
            Some(r) if matches!(r.phase, rollout::Phase::Halted | rollout::Phase::RolledBack) => continue,
            Some(r) => Some(r.document),
            None => store.deployment_document(id, d)?,
        };
        if let Some(document) = document {
            return Ok(Some(Previous {
                version: d.version,
                document,
                as_version: highest.saturating_add(1),
            }));
        }
    }
    Ok(None)
}

/// `document` with its version set to `version` (as JSON, which every reader of definitions
/// reads too).
pub fn with_version(document: &str, version: u32) -> Result<String, StoreError> {
    let mut doc = outpost_shared::definition::parse_document(document)
        .map_err(|e| StoreError::Invalid(format!("the version to roll back to: {e}")))?;
    doc.version = version;
    serde_json::to_string(&doc).map_err(|e| StoreError::Invalid(format!("the version to roll back to: {e}")))
}

/// What the store shows of a rollout's devices (every wave, so that a wave about to start
/// knows which of its devices are offline).
fn observe(store: &Store, id: &str, r: &Rollout) -> Result<Observation, StoreError> {
    let mut obs = Observation::default();
    let mut applied_at = Vec::new();
    for wave in &r.waves {
        for d in &wave.devices {
            let online = store.device(d)?.is_some_and(|dev| dev.online());
            let c = store.command(d, &format!("{id}.{d}"))?;
            let state = match c.as_ref().map(|c| c.state.as_str()) {
                None => DeviceState::Missing,
                Some("pending") => DeviceState::Pending,
                Some("applied") => DeviceState::Applied,
                Some("rejected") => DeviceState::Rejected,
                Some(_) => DeviceState::Closed,
            };
            if state == DeviceState::Applied {
                applied_at.push((d.clone(), c.as_ref().and_then(|c| c.answered_ms).unwrap_or(0)));
            }
            let message = c.map(|c| c.message).unwrap_or_default();
            obs.devices.insert(d.clone(), DeviceView { state, online, message });
        }
    }
    for (d, since) in applied_at {
        let runs = store.runs(&d)?;
        for (run, m) in &runs {
            if m.workflow != r.workflow || m.version != r.version {
                continue;
            }
            match m.status {
                RunStatus::Completed => obs.runs.completed += 1,
                RunStatus::Failed
                | RunStatus::Compensated
                | RunStatus::CompensationFailed
                | RunStatus::Compensating => {
                    obs.runs.failed += 1;
                    if obs.runs.failed_runs.len() < rollout::MAX_LISTED {
                        obs.runs.failed_runs.push((d.clone(), run.clone()));
                    }
                }
                RunStatus::Running => obs.runs.active += 1,
                RunStatus::Cancelled | RunStatus::Terminated | RunStatus::Continued => {}
            }
        }
        if let Some(w) = &r.plan.gate.workflow {
            // The newest ended run of the health workflow since the device applied (the run's
            // time is the device's clock, the answer's the service's: skew shifts the cut).
            let newest = runs
                .iter()
                .filter(|(_, m)| &m.workflow == w && m.status.is_terminal() && m.created_ms >= since)
                .max_by_key(|(_, m)| m.created_ms);
            if let Some((run, m)) = newest {
                let healthy = m.status == RunStatus::Completed && healthy_output(store, &d, run)?;
                obs.health.insert(d.clone(), (healthy, run.clone()));
            }
        }
    }
    Ok(obs)
}

/// Whether a completed run's output says `healthy: true`.
fn healthy_output(store: &Store, device: &str, run: &str) -> Result<bool, StoreError> {
    let Some((_, history)) = store.run(device, run)? else {
        return Ok(false);
    };
    Ok(history.iter().rev().any(|(_, rec)| match &rec.event {
        Event::RunCompleted { output } => serde_json::from_str::<serde_json::Value>(output)
            .ok()
            .and_then(|v| v.get("healthy").and_then(serde_json::Value::as_bool))
            .unwrap_or(false),
        _ => false,
    }))
}

impl Service {
    /// One step of every rollout still going.
    async fn advance_rollouts(&self) -> Result<(), StoreError> {
        let _held = self.rollout_lock.lock().await;
        let store = self.store.clone();
        let _across = blocking(move || store.lock_across_replicas("rollouts")).await?;
        let store = self.store.clone();
        let list = blocking(move || store.active_rollouts()).await?;
        for (id, r) in list {
            if let Err(e) = self.advance(&id, r).await {
                warn!(deployment = %id, error = %e, "rollout step failed; trying again at the next tick");
            }
        }
        Ok(())
    }

    /// One step of one rollout (the caller holds `rollout_lock`).
    pub(super) async fn advance(&self, id: &str, r: Rollout) -> Result<(), StoreError> {
        let (store, i, rr) = (self.store.clone(), id.to_string(), r.clone());
        let obs = blocking(move || observe(&store, &i, &rr)).await?;
        let step = rollout::decide(&r, &obs, now_ms());
        self.settle(id, &r, step).await
    }

    /// Does a step's actions, then stores its state if it changed.
    async fn settle(&self, id: &str, before: &Rollout, step: rollout::Step) -> Result<(), StoreError> {
        let mut next = step.rollout;
        for action in &step.actions {
            self.carry_out(id, before, action).await?;
            if matches!(action, Action::RollBack { .. }) {
                next.rollback_deployment = Some(rollback_id(id));
            }
        }
        if &next != before {
            if next.reason != before.reason {
                info!(deployment = %id, state = next.phase.as_str(), reason = %next.reason, "rollout");
            }
            let (store, i, n) = (self.store.clone(), id.to_string(), next);
            blocking(move || store.put_rollout(&i, &n)).await?;
            self.notify();
        }
        Ok(())
    }

    async fn carry_out(&self, id: &str, r: &Rollout, action: &Action) -> Result<(), StoreError> {
        match action {
            Action::Send { devices } => {
                for d in devices {
                    // A device that cannot take it now (a full outbox) is sent it again later.
                    if let Err(e) = self.send_deploy(id, &r.workflow, &r.document, d).await {
                        warn!(deployment = %id, device = %d, error = %e, "cannot queue the deployment; trying again");
                    }
                }
            }
            Action::Withdraw { devices, why } => {
                let (store, i, list, why) = (self.store.clone(), id.to_string(), devices.clone(), why.clone());
                blocking(move || {
                    for d in &list {
                        store.close_unanswered(d, &format!("{i}.{d}"), "withdrawn", &why, now_ms())?;
                    }
                    Ok(())
                })
                .await?;
            }
            Action::RollBack { devices } => {
                let Some(p) = &r.previous else { return Ok(()) };
                let document = with_version(&p.document, p.as_version)?;
                let rid = rollback_id(id);
                let (store, ri) = (self.store.clone(), rid.clone());
                let exists = blocking(move || store.deployment(&ri)).await?.is_some();
                if !exists {
                    let dep = crate::store::Deployment {
                        workflow: r.workflow.clone(),
                        version: p.as_version,
                        devices: devices.clone(),
                        created_ms: now_ms(),
                    };
                    let (store, ri) = (self.store.clone(), rid.clone());
                    blocking(move || store.put_deployment(&ri, &dep)).await?;
                }
                for d in devices {
                    self.send_deploy(&rid, &r.workflow, &document, d).await?;
                }
                info!(deployment = %id, rollback = %rid, version = p.as_version, devices = devices.len(), "rolled back");
            }
        }
        Ok(())
    }

    /// Ends the rollouts of `workflow` still going: deployment `by` takes over.
    pub(super) async fn end_rollouts_of(&self, workflow: &str, by: &str) -> Result<(), StoreError> {
        let store = self.store.clone();
        let list = blocking(move || store.active_rollouts()).await?;
        for (id, r) in list {
            if r.workflow == workflow && id != by {
                let step = r.superseded(by, now_ms());
                self.settle(&id, &r, step).await?;
            }
        }
        Ok(())
    }

    /// An operator's order to a rollout; answers its new state. `Err(Invalid)` says why the
    /// order does not apply now.
    pub async fn rollout_order(&self, id: &str, order: Order, who: &str) -> Result<Rollout, StoreError> {
        let _held = self.rollout_lock.lock().await;
        let store = self.store.clone();
        let _across = blocking(move || store.lock_across_replicas("rollouts")).await?;
        let (store, i) = (self.store.clone(), id.to_string());
        let r = blocking(move || store.rollout(&i)).await?.ok_or_else(|| {
            StoreError::NotFound(format!("deployment '{id}' is not a staged rollout (or does not exist)"))
        })?;
        let step = rollout::order(&r, order, who, now_ms()).map_err(StoreError::Invalid)?;
        let next = step.rollout.clone();
        self.settle(id, &r, step).await?;
        // A promotion or a resume takes effect now, not at the next tick.
        if !next.phase.is_final() {
            self.advance(id, next).await?;
        }
        let (store, i) = (self.store.clone(), id.to_string());
        blocking(move || store.rollout(&i))
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("deployment '{id}' is not a staged rollout")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollback_document_is_the_old_one_with_a_higher_version() {
        let old = "name: recipe\nversion: 1\nschedules:\n  - {id: t, every: 1s}\nsteps:\n  - {id: s, action: set, args: {v: 1}}\n";
        let text = with_version(old, 3).unwrap();
        let back = outpost_shared::definition::parse_document(&text).unwrap();
        let mut want = outpost_shared::definition::parse_document(old).unwrap();
        want.version = 3;
        assert_eq!(back, want);
    }
}
