//! Backpressure: how many runs and activities may be active at once, and who waits.
//!
//! Runs are admitted by two counting limits, the workflow's own (`limits.max_runs`) and then
//! the agent-wide one, so a run waiting for its workflow's slot holds no agent-wide slot. A run
//! that cannot be admitted at once waits in a bounded queue (it is already journaled, so it
//! survives a restart and is queued again), or is rejected before anything is journaled,
//! per policy. Activities are limited per action kind and per named resource the same way.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What happens to a start when no run slot is free.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WhenFull {
    /// Wait in the admission queue (rejected only once the queue is full).
    #[default]
    Queue,
    /// Reject the start at once.
    Reject,
}

/// Backpressure settings.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Runs active at once, agent-wide; 0 means no limit.
    pub max_runs: usize,
    /// Runs that may wait for a slot.
    pub queue: usize,
    /// Policy when no slot is free.
    pub when_full: WhenFull,
    /// Activities at once per action kind (e.g. `exec` → 4).
    pub actions: BTreeMap<String, usize>,
    /// Activities at once per named resource (steps name it with `resource:`).
    pub resources: BTreeMap<String, usize>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_runs: 0,
            queue: 1000,
            when_full: WhenFull::Queue,
            actions: BTreeMap::new(),
            resources: BTreeMap::new(),
        }
    }
}

/// One counting limit and how many wait for it.
#[derive(Debug)]
pub struct Limit {
    sem: Arc<Semaphore>,
    limit: usize,
    waiting: AtomicUsize,
}

impl Limit {
    fn new(limit: usize) -> Arc<Limit> {
        Arc::new(Limit {
            sem: Arc::new(Semaphore::new(limit)),
            limit,
            waiting: AtomicUsize::new(0),
        })
    }

    /// True when a slot is free now.
    pub fn has_room(&self) -> bool {
        self.sem.available_permits() > 0
    }

    /// Takes a slot, counting this caller as waiting meanwhile.
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.sem.clone().try_acquire_owned() {
            return Some(p);
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _guard = Decrement(&self.waiting);
        self.sem.clone().acquire_owned().await.ok()
    }

    fn view(&self, name: &str) -> LimitView {
        LimitView {
            name: name.to_string(),
            limit: self.limit,
            in_use: self.limit - self.sem.available_permits().min(self.limit),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }
}

/// Decrements a counter when dropped (also when the waiting future is cancelled).
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a start was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// The agent's limits, with live counts.
#[derive(Debug)]
pub struct Limits {
    config: LimitsConfig,
    runs: Option<Arc<Limit>>,
    workflows: Mutex<HashMap<String, Arc<Limit>>>,
    actions: HashMap<String, Arc<Limit>>,
    resources: Mutex<HashMap<String, Arc<Limit>>>,
    queued: AtomicUsize,
    /// Why a run (and which of its steps) is held back, for `list` and `show`.
    notes: Mutex<BTreeMap<(String, String), String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Limits {
    /// Builds the limits from settings.
    pub fn new(config: LimitsConfig) -> Limits {
        let resources = config
            .resources
            .iter()
            .map(|(k, v)| (k.clone(), Limit::new(*v)))
            .collect();
        Limits {
            runs: (config.max_runs > 0).then(|| Limit::new(config.max_runs)),
            actions: config
                .actions
                .iter()
                .map(|(k, v)| (k.clone(), Limit::new(*v)))
                .collect(),
            resources: Mutex::new(resources),
            workflows: Mutex::new(HashMap::new()),
            queued: AtomicUsize::new(0),
            notes: Mutex::new(BTreeMap::new()),
            config,
        }
    }

    fn workflow(&self, name: &str, max_runs: Option<u32>) -> Option<Arc<Limit>> {
        let max = max_runs? as usize;
        Some(
            lock(&self.workflows)
                .entry(name.to_string())
                .or_insert_with(|| Limit::new(max))
                .clone(),
        )
    }

    /// Checks, before anything is journaled, that a run of `workflow` may start now or queue.
    pub fn check_admission(&self, workflow: &str, max_runs: Option<u32>) -> Result<(), Rejected> {
        let wf = self.workflow(workflow, max_runs);
        let full = match (&self.runs, &wf) {
            (Some(r), _) if !r.has_room() => Some(format!(
                "the agent is at its limit of {} concurrent runs",
                self.config.max_runs
            )),
            (_, Some(w)) if !w.has_room() => Some(format!(
                "workflow '{workflow}' is at its limit of {} concurrent runs (limits.max_runs)",
                w.limit
            )),
            _ => None,
        };
        let Some(why) = full else { return Ok(()) };
        match self.config.when_full {
            WhenFull::Reject => Err(Rejected(format!("start rejected: {why} (--when-full reject)"))),
            WhenFull::Queue if self.queued.load(Ordering::Relaxed) >= self.config.queue => Err(Rejected(format!(
                "start rejected: {why} and the admission queue is full ({} waiting; --queue)",
                self.config.queue
            ))),
            WhenFull::Queue => Ok(()),
        }
    }

    /// The run's slots (workflow, then agent-wide) when each is free now; `None` (taking none)
    /// when the run would have to queue.
    pub fn try_admit(&self, workflow: &str, max_runs: Option<u32>) -> Option<Vec<OwnedSemaphorePermit>> {
        let wf = self.workflow(workflow, max_runs);
        let mut permits = Vec::new();
        for limit in [wf.as_ref(), self.runs.as_ref()].into_iter().flatten() {
            permits.push(limit.sem.clone().try_acquire_owned().ok()?);
        }
        Some(permits)
    }

    /// Waits for the run's slots (workflow first, then agent-wide), noting why it waits.
    pub async fn admit(&self, run_id: &str, workflow: &str, max_runs: Option<u32>) -> Vec<OwnedSemaphorePermit> {
        let mut permits = Vec::new();
        let wf = self.workflow(workflow, max_runs);
        let steps: [(Option<&Arc<Limit>>, String); 2] = [
            (
                wf.as_ref(),
                format!("queued: workflow '{workflow}' is at its limit of concurrent runs"),
            ),
            (
                self.runs.as_ref(),
                "queued: the agent is at its limit of concurrent runs".to_string(),
            ),
        ];
        for (limit, why) in steps {
            let Some(limit) = limit else { continue };
            if !limit.has_room() {
                self.note(run_id, "", Some(why));
                self.queued.fetch_add(1, Ordering::Relaxed);
                let _guard = Decrement(&self.queued);
                if let Some(p) = limit.acquire().await {
                    permits.push(p);
                }
                self.note(run_id, "", None);
            } else if let Some(p) = limit.acquire().await {
                permits.push(p);
            }
        }
        permits
    }

    /// Waits for the activity slots of an action kind and a resource, noting why it waits.
    pub async fn activity(
        &self,
        run_id: &str,
        step: &str,
        action: &str,
        resource: Option<&str>,
    ) -> Vec<OwnedSemaphorePermit> {
        let mut permits = Vec::new();
        let resource = resource.map(|r| {
            let limit = lock(&self.resources)
                .entry(r.to_string())
                .or_insert_with(|| Limit::new(1))
                .clone();
            (format!("resource '{r}'"), limit)
        });
        let kind = self
            .actions
            .get(action)
            .map(|l| (format!("action '{action}'"), l.clone()));
        for (what, limit) in kind.into_iter().chain(resource) {
            if !limit.has_room() {
                self.note(
                    run_id,
                    step,
                    Some(format!(
                        "{step}: queued behind the limit of {what} ({} at once)",
                        limit.limit
                    )),
                );
            }
            if let Some(p) = limit.acquire().await {
                permits.push(p);
            }
            self.note(run_id, step, None);
        }
        permits
    }

    /// The activity slots of an action kind and a resource when both are free now; `None`
    /// (taking none) when the attempt would have to wait for one.
    pub fn try_activity(&self, action: &str, resource: Option<&str>) -> Option<Vec<OwnedSemaphorePermit>> {
        let resource = resource.map(|r| {
            lock(&self.resources)
                .entry(r.to_string())
                .or_insert_with(|| Limit::new(1))
                .clone()
        });
        let kind = self.actions.get(action).cloned();
        let mut permits = Vec::new();
        for limit in kind.into_iter().chain(resource) {
            permits.push(limit.sem.clone().try_acquire_owned().ok()?);
        }
        Some(permits)
    }

    fn note(&self, run_id: &str, step: &str, why: Option<String>) {
        let key = (run_id.to_string(), step.to_string());
        match why {
            Some(w) => {
                lock(&self.notes).insert(key, w);
            }
            None => {
                lock(&self.notes).remove(&key);
            }
        }
    }

    /// Forgets a run's notes (it ended or was stopped while waiting).
    pub fn forget(&self, run_id: &str) {
        lock(&self.notes).retain(|(r, _), _| r != run_id);
    }

    /// Why a run is held back by a limit, if it is.
    pub fn held(&self, run_id: &str) -> Option<String> {
        let notes = lock(&self.notes);
        let v: Vec<&str> = notes
            .range((run_id.to_string(), String::new())..)
            .take_while(|((r, _), _)| r == run_id)
            .map(|(_, w)| w.as_str())
            .collect();
        (!v.is_empty()).then(|| v.join("; "))
    }

    /// Runs holding a slot and runs queued for one, given the runtime's live-run count (which
    /// includes the queued ones).
    pub fn run_slots(&self, active_runs: usize) -> RunSlots {
        let queued = self.queued.load(Ordering::Relaxed);
        RunSlots {
            active: active_runs.saturating_sub(queued),
            queued,
        }
    }

    /// Limits, counts and queue depths for `outpost status`.
    pub fn view(&self, active_runs: usize) -> LimitsView {
        let slots = self.run_slots(active_runs);
        let mut workflows: Vec<LimitView> = lock(&self.workflows).iter().map(|(n, l)| l.view(n)).collect();
        workflows.sort_by(|a, b| a.name.cmp(&b.name));
        let mut resources: Vec<LimitView> = lock(&self.resources).iter().map(|(n, l)| l.view(n)).collect();
        resources.sort_by(|a, b| a.name.cmp(&b.name));
        LimitsView {
            runs: RunLimitsView {
                active: slots.active,
                limit: (self.config.max_runs > 0).then_some(self.config.max_runs),
                queued: slots.queued,
                queue_limit: self.config.queue,
                when_full: match self.config.when_full {
                    WhenFull::Queue => "queue",
                    WhenFull::Reject => "reject",
                }
                .into(),
            },
            workflows,
            actions: self.actions.iter().map(|(n, l)| l.view(n)).collect(),
            resources,
        }
    }
}

/// Limits, counts and queue depths, as `status` shows them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LimitsView {
    /// Agent-wide run slots and the admission queue.
    pub runs: RunLimitsView,
    /// Per-workflow run limits.
    pub workflows: Vec<LimitView>,
    /// Per-action activity limits.
    pub actions: Vec<LimitView>,
    /// Per-resource activity limits.
    pub resources: Vec<LimitView>,
}

/// Agent-wide run slots and the admission queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunLimitsView {
    /// Runs holding a slot.
    pub active: usize,
    /// The limit, if any.
    pub limit: Option<usize>,
    /// Runs waiting for a slot.
    pub queued: usize,
    /// Most runs that may wait.
    pub queue_limit: usize,
    /// `queue` or `reject`.
    pub when_full: String,
}

/// One counting limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LimitView {
    /// Workflow, action or resource name.
    pub name: String,
    /// The limit.
    pub limit: usize,
    /// Taken now.
    pub in_use: usize,
    /// Waiting for one.
    pub waiting: usize,
}

/// Run-slot counts, for `status` and `/metrics` alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSlots {
    /// Runs with a live driver, queued ones excluded.
    pub active: usize,
    /// Runs waiting for a slot.
    pub queued: usize,
}

/// Parses `NAME=N` pairs from the command line.
pub fn parse_pair(s: &str) -> Result<(String, usize), String> {
    let (name, n) = s.split_once('=').ok_or_else(|| format!("'{s}' is not NAME=N"))?;
    let n: usize = n.parse().map_err(|_| format!("'{n}' in '{s}' is not a count"))?;
    if name.is_empty() || n == 0 {
        return Err(format!("'{s}': give a name and a count of at least 1"));
    }
    Ok((name.to_string(), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_agent_queues_then_rejects_beyond_the_queue() {
        let l = Arc::new(Limits::new(LimitsConfig {
            max_runs: 1,
            queue: 1,
            ..LimitsConfig::default()
        }));
        assert!(l.check_admission("w", None).is_ok());
        let first = l.admit("r1", "w", None).await;
        assert_eq!(first.len(), 1);
        assert!(l.check_admission("w", None).is_ok(), "one may queue");
        let l2 = l.clone();
        let waiting = tokio::spawn(async move { l2.admit("r2", "w", None).await.len() });
        tokio::task::yield_now().await;
        while l.view(1).runs.queued != 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            l.held("r2").as_deref(),
            Some("queued: the agent is at its limit of concurrent runs")
        );
        let err = l.check_admission("w", None).unwrap_err();
        assert!(err.0.contains("admission queue is full"), "{err}");
        drop(first);
        assert_eq!(waiting.await.unwrap(), 1);
        assert_eq!(l.held("r2"), None);
    }

    #[test]
    fn reject_policy_refuses_at_once_naming_the_limit() {
        let l = Limits::new(LimitsConfig {
            when_full: WhenFull::Reject,
            ..LimitsConfig::default()
        });
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let _p = rt.block_on(l.admit("r1", "w", Some(1)));
        let err = l.check_admission("w", Some(1)).unwrap_err();
        assert!(err.0.contains("workflow 'w' is at its limit of 1"), "{err}");
    }

    #[test]
    fn pairs_parse_with_clear_errors() {
        assert_eq!(parse_pair("exec=4"), Ok(("exec".into(), 4)));
        assert!(parse_pair("exec").unwrap_err().contains("NAME=N"));
        assert!(parse_pair("exec=0").is_err());
    }
}
