//! Parking: a run with nothing to do but wait (for a timer that is far off, a signal or an
//! approval) lets go of its folded state, its task set and its timer tasks. What stays is a
//! small waiting task holding the run's control channel and admission slots; when the timer is
//! due or a request arrives, the run's state is folded again from the journal, as at start-up.
//! So a waiting run costs the journal rows it already has, not memory (issue 15).
//!
//! The decision is a pure function of what the driver awaits, unit-tested here.

use std::time::Duration;

/// Why a driver may not park, or for how long it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Park {
    /// Keep the run in memory: work is running or due soon.
    No,
    /// Park until this much time has passed (the soonest timer) or a request arrives.
    For(Duration),
    /// Park until a request arrives (a signal, an approval, a stop): no timer is pending.
    UntilRequest,
}

/// What a driver awaits at the moment it would otherwise sleep in its select loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Awaiting<'a> {
    /// Tasks in the driver's set (activities and timers).
    pub tasks: usize,
    /// Milliseconds until each timer task fires (a subset of `tasks`).
    pub timers_ms: &'a [u64],
    /// A step waits for a signal or an approval.
    pub waiting: bool,
}

/// Whether to park, given the shortest wait worth parking for (`None`: never park).
pub(crate) fn decide(park_after: Option<Duration>, a: Awaiting<'_>) -> Park {
    let Some(park_after) = park_after else {
        return Park::No;
    };
    // An activity (or its back-off) is in flight: its result must reach this driver.
    if a.tasks > a.timers_ms.len() {
        return Park::No;
    }
    match a.timers_ms.iter().min() {
        None if a.waiting => Park::UntilRequest,
        // Nothing awaited at all: the driver fails the run as stuck; not parking's business.
        None => Park::No,
        Some(&ms) if Duration::from_millis(ms) >= park_after => Park::For(Duration::from_millis(ms)),
        Some(_) => Park::No,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Option<Duration> = Some(Duration::from_secs(5));

    fn awaiting(tasks: usize, timers_ms: &[u64], waiting: bool) -> Awaiting<'_> {
        Awaiting {
            tasks,
            timers_ms,
            waiting,
        }
    }

    #[test]
    fn a_run_waiting_only_for_a_signal_parks_until_a_request() {
        assert_eq!(decide(AFTER, awaiting(0, &[], true)), Park::UntilRequest);
    }

    #[test]
    fn a_far_timer_parks_until_the_soonest_timer() {
        assert_eq!(
            decide(AFTER, awaiting(2, &[3_600_000, 60_000], false)),
            Park::For(Duration::from_secs(60))
        );
        // A signal with a timeout: the timeout bounds the park.
        assert_eq!(
            decide(AFTER, awaiting(1, &[10_000], true)),
            Park::For(Duration::from_secs(10))
        );
    }

    #[test]
    fn a_timer_due_soon_or_an_activity_in_flight_keeps_the_run_in_memory() {
        assert_eq!(decide(AFTER, awaiting(1, &[4_999], false)), Park::No);
        assert_eq!(decide(AFTER, awaiting(2, &[3_600_000], false)), Park::No);
        assert_eq!(decide(AFTER, awaiting(1, &[], true)), Park::No);
    }

    #[test]
    fn nothing_awaited_or_parking_off_never_parks() {
        assert_eq!(decide(AFTER, awaiting(0, &[], false)), Park::No);
        assert_eq!(decide(None, awaiting(0, &[], true)), Park::No);
        assert_eq!(decide(None, awaiting(1, &[3_600_000], false)), Park::No);
    }
}
