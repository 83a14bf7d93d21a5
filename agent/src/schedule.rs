//! Schedules: cron expressions and fixed intervals attached to workflow definitions.
//!
//! Each schedule keeps one durable cursor, the last slot it handled. At every wake-up the
//! scheduler asks [`plan`] which slots are due between that cursor and now; this is a pure
//! function, so catch-up, bounds and clock sanity are unit-tested without a clock. A slot's
//! run id is `sched:WORKFLOW:SCHEDULE:SLOT_MS`, so a slot started before a crash is found, not
//! started again, when the cursor had not yet moved.
//!
//! Clock sanity (a gateway without a battery-backed clock boots in 1970): nothing fires while
//! the wall clock reads earlier than [`MIN_PLAUSIBLE_MS`] or earlier than the newest journaled
//! event; a schedule seen for the first time starts from now without back-filling; and after
//! a forward jump, catch-up is bounded (`run_once`, or at most `max_catch_up` for `run_all`).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use outpost_shared::definition::{self, CatchUp, Overlap, ScheduleSpec};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::runtime::{Runtime, RuntimeError, StartRequest};

/// 2024-01-01T00:00:00Z: a wall clock earlier than this has not been set yet.
pub const MIN_PLAUSIBLE_MS: u64 = 1_704_067_200_000;
/// Default bound of `run_all`.
pub const DEFAULT_MAX_CATCH_UP: u32 = 10;
/// The scheduler re-reads the clock at least this often, so a clock jump is noticed promptly.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// When a schedule fires.
#[derive(Debug, Clone)]
pub enum Every {
    /// A cron expression (UTC).
    Cron(Box<croner::Cron>),
    /// A fixed interval in ms, slots at multiples of it since the Unix epoch.
    Interval(u64),
}

impl Every {
    /// From a validated spec.
    pub fn of(spec: &ScheduleSpec) -> Option<Every> {
        if let Some(c) = &spec.cron {
            return definition::parse_cron(c).ok().map(|c| Every::Cron(Box::new(c)));
        }
        let d = definition::parse_duration(&spec.every.as_ref()?.0).ok()?;
        Some(Every::Interval(u64::try_from(d.as_millis()).ok()?.max(1)))
    }

    /// The first slot strictly after `t`.
    pub fn next_after(&self, t: u64) -> Option<u64> {
        match self {
            Every::Interval(i) => Some((t / i + 1) * i),
            Every::Cron(c) => {
                let dt = to_dt(t)?;
                c.find_next_occurrence(&dt, false)
                    .ok()
                    .map(|d| d.timestamp() as u64 * 1000)
            }
        }
    }

    /// The last slot at or before `t`.
    pub fn last_at_or_before(&self, t: u64) -> Option<u64> {
        match self {
            Every::Interval(i) => Some(t / i * i),
            Every::Cron(c) => {
                let dt = to_dt(t)?;
                c.find_previous_occurrence(&dt, true)
                    .ok()
                    .map(|d| d.timestamp() as u64 * 1000)
            }
        }
    }
}

/// Whole seconds only: cron slots fall on whole seconds, and croner keeps sub-second parts.
fn to_dt(ms: u64) -> Option<DateTime<Utc>> {
    Utc.timestamp_opt(i64::try_from(ms / 1000).ok()?, 0).single()
}

/// What to do at one wake-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Slots to start now, oldest first.
    pub fire: Vec<u64>,
    /// Missed slots dropped by the catch-up policy (at least this many).
    pub dropped: u64,
    /// The cursor to store once `fire` has started.
    pub cursor: Option<u64>,
    /// When to look again.
    pub next_ms: Option<u64>,
    /// Set when the clock is not trusted and nothing fires.
    pub paused: Option<String>,
    /// True when `fire` makes up for downtime rather than being the slot that is due now.
    pub catch_up: bool,
}

/// Decides which slots are due. `cursor` is the last slot handled (`None`: never seen), `floor`
/// the newest time the agent has recorded (the clock must not read earlier).
pub fn plan(every: &Every, catch_up: CatchUp, max_catch_up: u32, cursor: Option<u64>, now: u64, floor: u64) -> Plan {
    let mut p = Plan {
        fire: Vec::new(),
        dropped: 0,
        cursor,
        next_ms: None,
        paused: None,
        catch_up: false,
    };
    if now < MIN_PLAUSIBLE_MS || now + 1000 < floor {
        p.paused = Some(format!(
            "wall clock reads {} which is before {}; schedules wait until it is set",
            outpost_shared::journal::rfc3339(now),
            outpost_shared::journal::rfc3339(floor.max(MIN_PLAUSIBLE_MS))
        ));
        p.next_ms = Some(now + MAX_SLEEP.as_millis() as u64);
        return p;
    }
    let Some(last) = cursor.filter(|c| *c >= MIN_PLAUSIBLE_MS && *c <= now) else {
        // First sight (or a cursor from an unset or future clock): start from now, no back-fill.
        p.cursor = every.last_at_or_before(now).or(Some(now));
        p.next_ms = every.next_after(now);
        return p;
    };
    // Due slots are those in (last, now]; walk back from now so decades of missed slots cost
    // no more than the bound.
    let bound = match catch_up {
        CatchUp::Skip | CatchUp::RunOnce => 1,
        CatchUp::RunAll => max_catch_up.max(1) as usize,
    };
    let mut due = Vec::new();
    let mut t = now;
    while due.len() <= bound {
        match every.last_at_or_before(t) {
            Some(s) if s > last => {
                due.push(s);
                if s == 0 {
                    break;
                }
                t = s - 1;
            }
            _ => break,
        }
    }
    let more = due.len() > bound;
    due.truncate(bound);
    due.reverse();
    if let Some(&newest) = due.last() {
        p.cursor = Some(newest);
        // The newest due slot is on time only if it is the last one before now.
        let behind = due.len() as u64 - 1 + u64::from(more);
        p.catch_up = behind > 0 || every.next_after(last).is_some_and(|n| n != newest);
        match catch_up {
            CatchUp::Skip => {
                // Only a slot that is due now (not a missed one) runs.
                let on_time = every.next_after(newest).is_none_or(|n| n > now) && !more && due.len() == 1;
                let prev_ok = every.next_after(last).is_some_and(|n| n == newest);
                if on_time && prev_ok {
                    p.fire = due;
                } else {
                    p.dropped = behind + 1;
                }
            }
            CatchUp::RunOnce => {
                p.fire = vec![newest];
                let prev_ok = every.next_after(last).is_some_and(|n| n == newest);
                p.dropped = u64::from(!prev_ok || more);
            }
            CatchUp::RunAll => {
                p.dropped = u64::from(more);
                p.fire = due;
            }
        }
    }
    p.next_ms = every.next_after(now);
    p
}

/// One schedule of one workflow, as the scheduler tracks it.
struct Entry {
    workflow: String,
    id: String,
    spec: ScheduleSpec,
    every: Every,
}

impl Entry {
    fn cursor_key(&self) -> String {
        format!("schedule/{}/{}", self.workflow, self.id)
    }
    fn run_id(&self, slot: u64) -> String {
        format!("sched:{}:{}:{slot}", self.workflow, self.id)
    }
    fn prefix(&self) -> String {
        format!("sched:{}:{}:", self.workflow, self.id)
    }
}

/// The schedules of the latest version of every stored workflow.
fn load(rt: &Runtime) -> Vec<Entry> {
    let mut out = Vec::new();
    for def in rt.latest_definitions() {
        for (i, spec) in def.doc.schedules.iter().enumerate() {
            if let Some(every) = Every::of(spec) {
                out.push(Entry {
                    workflow: def.name().to_string(),
                    id: definition::schedule_id(spec, i),
                    spec: spec.clone(),
                    every,
                });
            }
        }
    }
    out
}

/// Runs the scheduler until the process ends. `changed` is notified when definitions change.
pub async fn run(rt: Runtime, mut changed: watch::Receiver<u64>) {
    let mut entries = load(&rt);
    // A `queue_one` slot waiting for the previous run: (workflow, schedule) → slot.
    let mut queued: HashMap<(String, String), u64> = HashMap::new();
    let mut paused_logged = false;
    let mut behind = ClockBehind::default();
    let grace = clock_grace();
    loop {
        let now = rt.clock_ms();
        let newest = rt.journal().last_event_ms().ok().flatten().unwrap_or(0);
        let floor = behind.floor(now, newest, std::time::Instant::now(), grace);
        let mut next = now + MAX_SLEEP.as_millis() as u64;
        for e in &entries {
            let key = e.cursor_key();
            let cursor = rt.journal().cursor(&key).ok().flatten();
            let max = e.spec.max_catch_up.unwrap_or(DEFAULT_MAX_CATCH_UP);
            let p = plan(&e.every, e.spec.catch_up, max, cursor, now, floor);
            if let Some(why) = &p.paused {
                if !paused_logged {
                    warn!("{why}");
                    paused_logged = true;
                }
                continue;
            }
            paused_logged = false;
            if p.dropped > 0 {
                info!(workflow = %e.workflow, schedule = %e.id, dropped = p.dropped, policy = ?e.spec.catch_up, "missed schedule slots not run");
            }
            let qkey = (e.workflow.clone(), e.id.clone());
            let mut slots = p.fire.clone();
            if let Some(q) = queued.get(&qkey).copied() {
                slots.insert(0, q);
            }
            let mut store_cursor = p.cursor;
            for slot in slots {
                let busy = rt.has_active_prefix(&e.prefix());
                match (e.spec.overlap, busy) {
                    (_, false) | (Overlap::Allow, true) => {
                        queued.remove(&qkey);
                        if start(&rt, e, slot, p.catch_up && p.fire.contains(&slot)).await == Start::Later {
                            // Refused for now (a full limit or outbox, a failing journal): the
                            // cursor stays before this slot so it is due again, durably, and the
                            // slots after it wait their turn.
                            store_cursor = held_cursor(cursor, slot);
                            if store_cursor == cursor {
                                queued.insert(qkey.clone(), slot);
                            }
                            next = next.min(now + RETRY_REFUSED.as_millis() as u64);
                            break;
                        }
                    }
                    (Overlap::Skip, true) => {
                        info!(workflow = %e.workflow, schedule = %e.id, slot = %outpost_shared::journal::rfc3339(slot), "previous run still active; slot skipped");
                    }
                    (Overlap::QueueOne, true) => {
                        if queued.insert(qkey.clone(), slot).is_some_and(|old| old != slot) {
                            info!(workflow = %e.workflow, schedule = %e.id, "a queued slot was replaced by a newer one");
                        }
                        next = next.min(now + 500);
                    }
                }
            }
            if store_cursor != cursor
                && let Some(c) = store_cursor
                && let Err(err) = rt.journal().put_cursor(&key, c).await
            {
                warn!(error = %err, "cannot store schedule cursor; will retry");
            }
            if let Some(n) = p.next_ms {
                next = next.min(n);
            }
        }
        if entries.is_empty() {
            // No schedules: nothing to wake for until a definition changes.
            if changed.changed().await.is_err() {
                return;
            }
            entries = load(&rt);
            continue;
        }
        let wait = Duration::from_millis(next.saturating_sub(rt.clock_ms())).min(MAX_SLEEP);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            Ok(()) = changed.changed() => entries = load(&rt),
        }
    }
}

/// How long schedules wait for a plausible clock that reads earlier than the newest journaled
/// event (NTP correcting a clock that had jumped ahead) before they trust it; without a bound a
/// forward jump and its correction would pause every schedule until the clock caught up again.
const CLOCK_GRACE: Duration = Duration::from_secs(600);

fn clock_grace() -> Duration {
    #[cfg(feature = "test-clock")]
    if let Some(ms) = std::env::var("OUTPOST_CLOCK_GRACE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    CLOCK_GRACE
}

/// Tracks how long a plausible clock has read earlier than the newest journaled event.
#[derive(Debug, Default)]
struct ClockBehind {
    since: Option<std::time::Instant>,
    warned: bool,
}

impl ClockBehind {
    /// The floor to give `plan`: the newest event time, or 0 once a plausible clock has read
    /// earlier than it for longer than `grace` (the clock was wrong before, not now).
    fn floor(&mut self, now: u64, newest: u64, at: std::time::Instant, grace: Duration) -> u64 {
        if now < MIN_PLAUSIBLE_MS || now + 1000 >= newest {
            self.since = None;
            self.warned = false;
            return newest;
        }
        let since = *self.since.get_or_insert(at);
        if at.duration_since(since) < grace {
            return newest;
        }
        if !self.warned {
            warn!(
                clock = %outpost_shared::journal::rfc3339(now),
                newest_event = %outpost_shared::journal::rfc3339(newest),
                "the wall clock has read earlier than the newest journaled event for {grace:?}; trusting it (it had jumped ahead before) and running schedules again"
            );
            self.warned = true;
        }
        0
    }
}

/// How soon a slot whose start was refused for now is tried again.
const RETRY_REFUSED: Duration = Duration::from_secs(2);

/// What became of a slot's start.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// Started, already started, or refused for good (logged): the slot is handled.
    Handled,
    /// Refused for now: try the slot again.
    Later,
}

/// The cursor to keep when `slot` must be tried again: just before it, never behind `cursor`
/// (a slot at or before the stored cursor was queued in memory and stays queued).
fn held_cursor(cursor: Option<u64>, slot: u64) -> Option<u64> {
    let before = slot.saturating_sub(1);
    match cursor {
        Some(c) if c >= before => Some(c),
        _ => Some(before),
    }
}

async fn start(rt: &Runtime, e: &Entry, slot: u64, catch_up: bool) -> Start {
    let mut input = e.spec.input.clone().unwrap_or_else(|| json!({}));
    if let Value::Object(m) = &mut input {
        m.insert("schedule".into(), json!(e.id));
        m.insert("slot".into(), json!(outpost_shared::journal::rfc3339(slot)));
        m.insert("catch_up".into(), json!(catch_up));
    }
    let req = StartRequest {
        workflow: e.workflow.clone(),
        version: None,
        input: Some(input),
        id: Some(e.run_id(slot)),
    };
    match rt.start(req).await {
        Ok(r) if r.created => {
            info!(run_id = %r.run_id, schedule = %e.id, "scheduled run started");
            Start::Handled
        }
        Ok(_) => Start::Handled,
        Err(err @ (RuntimeError::Busy(_) | RuntimeError::Journal(_))) => {
            warn!(workflow = %e.workflow, schedule = %e.id, slot = %outpost_shared::journal::rfc3339(slot), error = %err, "scheduled run refused for now; the slot is tried again");
            Start::Later
        }
        Err(err) => {
            warn!(workflow = %e.workflow, schedule = %e.id, error = %err, "scheduled run not started");
            Start::Handled
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000; // 2027-01-15
    const MIN: u64 = 60_000;

    fn every_min() -> Every {
        Every::Interval(MIN)
    }

    #[test]
    fn a_clock_behind_the_newest_event_is_trusted_after_the_grace() {
        let mut b = ClockBehind::default();
        let t0 = std::time::Instant::now();
        let g = Duration::from_secs(600);
        let newest = T0 + 365 * 24 * 3600 * 1000; // events from a clock a year ahead
        assert_eq!(b.floor(T0, newest, t0, g), newest, "waits at first");
        assert_eq!(b.floor(T0, newest, t0 + Duration::from_secs(599), g), newest);
        assert_eq!(
            b.floor(T0, newest, t0 + Duration::from_secs(600), g),
            0,
            "then trusts it"
        );
        let p = plan(&every_min(), CatchUp::RunAll, 3, Some(newest), T0, 0);
        assert!(
            p.paused.is_none() && p.cursor.is_some(),
            "a future cursor restarts from now: {p:?}"
        );
        // An unset clock is never trusted, however long it stays unset.
        let mut b = ClockBehind::default();
        assert_eq!(b.floor(1_000, T0, t0, g), T0);
        assert_eq!(b.floor(1_000, T0, t0 + Duration::from_secs(6000), g), T0);
        // A clock caught up resets the wait.
        let mut b = ClockBehind::default();
        b.floor(T0, newest, t0, g);
        assert_eq!(b.floor(newest, newest, t0 + Duration::from_secs(700), g), newest);
        assert!(b.since.is_none());
    }

    #[test]
    fn a_refused_slot_holds_the_cursor_just_before_it() {
        assert_eq!(held_cursor(Some(T0), T0 + MIN), Some(T0 + MIN - 1));
        assert_eq!(held_cursor(None, T0), Some(T0 - 1));
        // A queued slot older than the cursor leaves the cursor alone.
        assert_eq!(held_cursor(Some(T0 + MIN), T0), Some(T0 + MIN));
        // The held cursor makes the slot due again.
        let p = plan(
            &every_min(),
            CatchUp::RunAll,
            10,
            held_cursor(Some(T0), T0 + MIN),
            T0 + MIN + 5,
            0,
        );
        assert_eq!(p.fire, vec![T0 + MIN]);
    }

    #[test]
    fn first_sight_starts_from_now_without_backfill() {
        let p = plan(&every_min(), CatchUp::RunAll, 10, None, T0 + 5, 0);
        assert!(p.fire.is_empty());
        assert_eq!(p.cursor, Some(T0 / MIN * MIN));
        assert_eq!(p.next_ms, Some((T0 / MIN + 1) * MIN));
    }

    #[test]
    fn on_time_slots_fire_once() {
        let c = T0 / MIN * MIN;
        let p = plan(&every_min(), CatchUp::Skip, 10, Some(c), c + MIN + 3, 0);
        assert_eq!(p.fire, vec![c + MIN]);
        assert!(!p.catch_up);
        assert_eq!(p.cursor, Some(c + MIN));
        // Asked again at the same time: nothing new.
        let p = plan(&every_min(), CatchUp::Skip, 10, p.cursor, c + MIN + 4, 0);
        assert!(p.fire.is_empty());
    }

    #[test]
    fn catch_up_policies_after_an_hour_of_downtime() {
        let c = T0 / MIN * MIN;
        let now = c + 60 * MIN + 10;
        let skip = plan(&every_min(), CatchUp::Skip, 10, Some(c), now, 0);
        assert!(skip.fire.is_empty() && skip.dropped >= 1 && skip.cursor == Some(c + 60 * MIN));
        let once = plan(&every_min(), CatchUp::RunOnce, 10, Some(c), now, 0);
        assert_eq!(once.fire, vec![c + 60 * MIN]);
        assert!(once.catch_up);
        let all = plan(&every_min(), CatchUp::RunAll, 5, Some(c), now, 0);
        assert_eq!(all.fire, (56..=60).map(|k| c + k * MIN).collect::<Vec<_>>());
        assert_eq!(all.dropped, 1);
        let all = plan(&every_min(), CatchUp::RunAll, 100, Some(c), now, 0);
        assert_eq!(all.fire.len(), 60);
    }

    #[test]
    fn a_clock_in_1970_fires_nothing_and_a_jump_to_today_fires_at_most_the_bound() {
        let boot_1970 = 5_000;
        let p = plan(&every_min(), CatchUp::RunAll, 10, None, boot_1970, 0);
        assert!(p.fire.is_empty() && p.paused.is_some() && p.cursor.is_none());
        // A cursor left by a clock that was once wrong in the past is ignored, not caught up.
        let p = plan(&Every::Interval(1000), CatchUp::RunAll, 10, Some(boot_1970), T0, 0);
        assert!(p.fire.is_empty(), "decades of slots must not fire");
        // A real cursor two years old (a gateway in a drawer): bounded, and cheap to compute.
        let decade = T0 - 2 * 365 * 86_400_000;
        let t = std::time::Instant::now();
        let p = plan(&Every::Interval(1000), CatchUp::RunAll, 10, Some(decade), T0, 0);
        assert_eq!(p.fire.len(), 10);
        assert!(t.elapsed() < Duration::from_secs(1));
        // A clock behind the journal (reset after events were written) pauses schedules.
        let p = plan(&every_min(), CatchUp::RunOnce, 10, Some(T0), T0 - 3_600_000, T0);
        assert!(p.paused.is_some() && p.fire.is_empty());
    }

    #[test]
    fn cron_slots_walk_back_cheaply() {
        let cron = Every::Cron(Box::new(definition::parse_cron("*/15 * * * *").unwrap()));
        let c = cron.last_at_or_before(T0).unwrap();
        assert_eq!(c % (15 * MIN), 0);
        let p = plan(&cron, CatchUp::RunAll, 3, Some(c), c + 100 * 15 * MIN + 1, 0);
        assert_eq!(p.fire, vec![c + 98 * 15 * MIN, c + 99 * 15 * MIN, c + 100 * 15 * MIN]);
        let six = definition::parse_cron("*/10 * * * * *").unwrap();
        assert_eq!(Every::Cron(Box::new(six)).next_after(T0), Some(T0 + 10_000));
    }
}
