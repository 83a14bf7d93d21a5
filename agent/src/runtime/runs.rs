//! The runs this process drives, and their tasks: a live run has a driver task and a control
//! channel; a parked run has neither, only a small row here (its definition, its admission
//! slots, when to wake it). See [`super::park`] for when a run parks.
//!
//! Every move between the two states happens under the table's one lock, so a request never
//! finds a run in neither. A request sent to a live run that parks before reading it is lost
//! with the channel; the sender sees its reply dropped and asks again, which wakes the parked
//! run (`Runtime::control_of`). That retry is safe because a driver parks only with an empty
//! channel and between requests, never during one: a request is either wholly handled and
//! answered, or not seen at all.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use outpost_shared::definition::Definition;
use outpost_shared::{ErrorInfo, Event};
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use tracing::{Instrument, error, info_span, warn};

use super::driver::{Admission, Control, Driver, Outcome};
use super::park::Park;
use super::{Inner, activity, lock};
use crate::engine::RunState;

/// A run's end, for whoever waits on it. Made only when someone waits (most runs are never
/// waited on), and kept in the run's row across parks.
#[derive(Default)]
pub(super) struct Done {
    end: OnceLock<Event>,
    notify: Notify,
}

impl Done {
    /// Waits for the run's final event.
    pub(super) async fn wait(&self) -> Event {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before looking, so an end set meanwhile still wakes this wait.
            notified.as_mut().enable();
            if let Some(end) = self.end.get() {
                return end.clone();
            }
            notified.await;
        }
    }

    fn set(&self, end: Event) {
        let _ = self.end.set(end);
        self.notify.notify_waiters();
    }
}

/// A run with a driver task.
pub(super) struct Live {
    /// Requests to the driver.
    pub(super) control: mpsc::Sender<Box<Control>>,
    done: Option<Arc<Done>>,
}

/// A run whose state is only in the journal. Kept small: 20,000 of them is the design point.
struct Parked {
    def: Arc<Definition>,
    /// Its admission slots (a parked run was admitted: it parks only while it runs).
    admission: Box<[OwnedSemaphorePermit]>,
    child: bool,
    /// When its soonest timer is due (`None`: it waits only for a request).
    wake: Option<Instant>,
    done: Option<Arc<Done>>,
}

/// Live and parked runs, under one lock.
#[derive(Default)]
pub(super) struct RunTable {
    live: HashMap<String, Live>,
    /// A B-tree rather than a hash table: it grows a node at a time, where a hash table of
    /// 20,000 rows doubles into a fresh 4 MB block and leaves the old one to the allocator.
    parked: BTreeMap<Box<str>, Parked>,
    /// Parked runs' wake-ups, soonest first.
    wakes: BTreeSet<(Instant, Box<str>)>,
}

impl RunTable {
    /// Live and parked runs.
    pub(super) fn len(&self) -> usize {
        self.live.len() + self.parked.len()
    }

    /// Parked runs.
    pub(super) fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Whether the run is active here, live or parked.
    pub(super) fn contains(&self, id: &str) -> bool {
        self.live.contains_key(id) || self.parked.contains_key(id)
    }

    /// Every active run's id.
    pub(super) fn ids(&self) -> impl Iterator<Item = &str> {
        self.live
            .keys()
            .map(String::as_str)
            .chain(self.parked.keys().map(|k| &**k))
    }

    /// The run's end, to wait on (made on first use); `None` when the run is not active.
    pub(super) fn done(&mut self, id: &str) -> Option<Arc<Done>> {
        let slot = match (self.live.get_mut(id), self.parked.get_mut(id)) {
            (Some(l), _) => &mut l.done,
            (None, Some(p)) => &mut p.done,
            (None, None) => return None,
        };
        Some(slot.get_or_insert_with(Default::default).clone())
    }

    /// A live run's control channel.
    pub(super) fn control(&self, id: &str) -> Option<mpsc::Sender<Box<Control>>> {
        self.live.get(id).map(|l| l.control.clone())
    }
}

/// How a run's task begins.
pub(super) enum Begin {
    /// With this state, folded by the caller (a resume at start-up).
    With(Box<RunState>),
    /// With this driver, whose first records were journaled with the run's start.
    Started(Box<Driver>),
    /// By folding its history again (waking a parked run); `timer_due` when its timer woke it.
    Rehydrate { timer_due: bool },
}

/// Registers a live run in `table` and spawns its task; returns its control channel.
pub(super) fn launch(
    table: &mut RunTable,
    task: RunTask,
    begin: Begin,
    done: Option<Arc<Done>>,
) -> mpsc::Sender<Box<Control>> {
    let (control, rx) = mpsc::channel(16);
    table.live.insert(
        task.run_id.clone(),
        Live {
            control: control.clone(),
            done,
        },
    );
    task.inner.drivers.send_modify(|n| *n = n.wrapping_add(1));
    // A root span: a run started by another (continue-as-new, a child) is not nested in it.
    let span = info_span!(parent: None, "run", run_id = %task.run_id, workflow = task.def.name());
    tokio::spawn(task.run(begin, rx).instrument(span));
    control
}

/// Wakes a parked run: folds its state again in a new task. Returns its control channel, or
/// `None` when the run is not parked (live runs are found by [`RunTable::control`]).
pub(super) fn unpark(
    inner: &Arc<Inner>,
    table: &mut RunTable,
    id: &str,
    timer_due: bool,
) -> Option<mpsc::Sender<Box<Control>>> {
    let p = table.parked.remove(id)?;
    if let Some(wake) = p.wake {
        table.wakes.remove(&(wake, Box::from(id)));
    }
    let task = RunTask {
        inner: inner.clone(),
        run_id: id.to_string(),
        def: p.def,
        child: p.child,
        admission: Some(p.admission.into_vec()),
    };
    Some(launch(table, task, Begin::Rehydrate { timer_due }, p.done))
}

/// One live run's task: drives it until it ends or parks.
pub(super) struct RunTask {
    inner: Arc<Inner>,
    run_id: String,
    def: Arc<Definition>,
    child: bool,
    admission: Admission,
}

impl RunTask {
    /// The task of a run just started or resumed (a child run needs no admission slots).
    pub(super) fn new(inner: Arc<Inner>, run_id: String, def: Arc<Definition>, child: bool) -> RunTask {
        RunTask {
            inner,
            run_id,
            def,
            child,
            admission: child.then(Vec::new),
        }
    }

    /// Takes the run's admission slots already held (a start that found them free).
    pub(super) fn admitted(mut self, permits: Vec<OwnedSemaphorePermit>) -> RunTask {
        self.admission = Some(permits);
        self
    }

    async fn run(mut self, begin: Begin, mut control: mpsc::Receiver<Box<Control>>) {
        let mut driver = match begin {
            Begin::With(st) => Driver::new(self.inner.clone(), self.def.clone(), *st),
            Begin::Started(driver) => *driver,
            Begin::Rehydrate { timer_due } => match Box::pin(rehydrate(&self.inner, &self.def, &self.run_id)).await {
                Ok(st) => {
                    let driver = Driver::new(self.inner.clone(), self.def.clone(), st);
                    if timer_due { driver.woken_for_timer() } else { driver }
                }
                Err(end) => {
                    Box::pin(activity::append_durably(&self.inner, &self.run_id, vec![end.clone()])).await;
                    return self.end(end);
                }
            },
        };
        loop {
            // Boxed: the driver's future is large and is freed when the run parks.
            match Box::pin(driver.run(&mut control, &mut self.admission)).await {
                Outcome::Ended(end) => return self.end(end),
                Outcome::Parked(park, state) => match self.park(park, &control) {
                    Ok(()) => return,
                    // A request came in meanwhile: keep driving with the state at hand.
                    Err(task) => {
                        self = task;
                        driver = Driver::new(self.inner.clone(), self.def.clone(), *state);
                    }
                },
            }
        }
    }

    /// Moves the run from live to parked, unless a request waits in its channel.
    fn park(self, park: Park, control: &mpsc::Receiver<Box<Control>>) -> Result<(), RunTask> {
        let inner = self.inner.clone();
        let mut table = lock(&inner.runs);
        if !control.is_empty() {
            drop(table);
            return Err(self);
        }
        let done = table.live.remove(&self.run_id).and_then(|l| l.done);
        let wake = match park {
            Park::For(wait) => Some(Instant::now() + wait),
            Park::UntilRequest | Park::No => None,
        };
        if let Some(at) = wake {
            table.wakes.insert((at, Box::from(self.run_id.as_str())));
        }
        tracing::debug!(?park, "run parked");
        table.parked.insert(
            self.run_id.into_boxed_str(),
            Parked {
                def: self.def,
                admission: self.admission.unwrap_or_default().into_boxed_slice(),
                child: self.child,
                wake,
                done,
            },
        );
        drop(table);
        inner.trimmer.freed();
        if wake.is_some() {
            start_waker(&inner);
            inner.wakeups.notify_one();
        }
        Ok(())
    }

    /// The run ended: it leaves the table and its waiters hear of it.
    fn end(self, end: Event) {
        self.inner.limits.forget(&self.run_id);
        let live = lock(&self.inner.runs).live.remove(&self.run_id);
        if let Some(done) = live.and_then(|l| l.done) {
            done.set(end);
        }
    }
}

/// A parked run's state, folded again from its journaled history. A read that fails (storage)
/// is retried with back-off: the run only waits longer. A history that no longer folds (which
/// folded when the run parked) fails the run, as at start-up.
async fn rehydrate(inner: &Arc<Inner>, def: &Arc<Definition>, run_id: &str) -> Result<RunState, Event> {
    let mut delay = Duration::from_millis(100);
    loop {
        match inner.journal.history(run_id) {
            Ok(history) => {
                return RunState::replay(def, run_id, history.iter().map(|(_, r)| &r.event)).map_err(|e| {
                    error!(error = %e, "a parked run's history does not fold; failing it");
                    Event::RunFailed {
                        error: ErrorInfo::new("resume", e.to_string()),
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "cannot read a parked run's history; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Starts the one task that wakes parked runs whose timer is due (once per runtime).
fn start_waker(inner: &Arc<Inner>) {
    if inner.waker.set(()).is_ok() {
        let weak = Arc::downgrade(inner);
        let wakeups = inner.wakeups.clone();
        tokio::spawn(wake_due(weak, wakeups));
    }
}

/// Sleeps until the soonest parked run's timer is due, wakes every run that is, and repeats;
/// told of earlier wake-ups through `wakeups`. Ends with the runtime.
async fn wake_due(weak: Weak<Inner>, wakeups: Arc<Notify>) {
    loop {
        let notified = wakeups.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = {
            let Some(inner) = weak.upgrade() else { return };
            let now = Instant::now();
            let mut table = lock(&inner.runs);
            while let Some((at, id)) = table.wakes.first().cloned()
                && at <= now
            {
                table.wakes.pop_first();
                if let Some(p) = table.parked.get_mut(&id) {
                    p.wake = None;
                }
                unpark(&inner, &mut table, &id, true);
            }
            table.wakes.first().map(|(at, _)| *at)
        };
        match next {
            Some(at) => tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(at) => {}
            },
            None => notified.await,
        }
    }
}
