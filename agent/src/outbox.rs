//! The sync outbox as a pure state machine: what to send next, given the acknowledged cursor,
//! the journal's end, the in-flight window, the ack timeout and the drain rate. The drain task in
//! `sync` feeds it events (acks, sessions, sends) and does what `next` says; it never polls: when
//! there is nothing to do `next` says `Idle`, and when something is due later it names the one
//! deadline to sleep until. Modelled on rumqttc's `MqttState`: no I/O, unit-tested in place.

use std::time::{Duration, Instant};

/// Outstanding events unacknowledged this long are sent again from the acknowledged cursor:
/// batches sent while nobody listened are lost without an error.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Batches a second a paced drain aims for at most: a low drain rate goes out as a steady
/// trickle of small batches instead of one full batch followed by a long pause.
const PACE_PER_SECOND: u64 = 10;

/// Events per batch at `drain_rate` events per second: a tenth of a second's worth, at least
/// one and at most `batch`.
pub fn paced_batch(batch: usize, drain_rate: u64) -> usize {
    usize::try_from(drain_rate / PACE_PER_SECOND)
        .unwrap_or(usize::MAX)
        .clamp(1, batch.max(1))
}

/// The outbox's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most events in flight (sent, not acknowledged).
    pub window: u64,
    /// Most events per batch.
    pub batch: usize,
    /// Events per second while draining a backlog.
    pub drain_rate: u64,
}

/// What the drain does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send up to `max` events from sequence `from`.
    Send {
        /// First sequence to send.
        from: u64,
        /// Most events.
        max: usize,
    },
    /// Nothing now; look again at this instant, or at an event before it.
    WaitUntil(Instant),
    /// Nothing to do until an event (a commit, an ack, a session).
    Idle,
}

/// The outbox's state.
#[derive(Debug, Clone)]
pub struct Outbox {
    limits: Limits,
    /// First sequence the cloud has not acknowledged.
    acked: u64,
    /// Next sequence to send.
    sent: u64,
    connected: bool,
    /// Since when the outstanding events have waited for the cursor to move.
    waiting_since: Option<Instant>,
    /// The current burst: when it began and how many events it has sent (the rate limit counts
    /// from there, so idle time earns no credit).
    burst: Option<(Instant, u64)>,
}

impl Outbox {
    /// An outbox whose cloud has acknowledged everything before `acked`; not connected.
    pub fn new(acked: u64, limits: Limits) -> Outbox {
        Outbox {
            limits,
            acked,
            sent: acked,
            connected: false,
            waiting_since: None,
            burst: None,
        }
    }

    /// First sequence not acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Next sequence to send.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// The link went up or down.
    pub fn set_connected(&mut self, connected: bool) {
        if connected != self.connected {
            self.connected = connected;
            self.burst = None;
            self.waiting_since = None;
        }
    }

    /// A new session, or a resend request: send again from `from` (the cursor, or before it when
    /// a restored cloud lost what it had acknowledged).
    pub fn on_session(&mut self, from: u64) {
        self.sent = from;
        self.waiting_since = None;
    }

    /// The cloud acknowledged everything before `next_seq` (never moves back).
    pub fn on_ack(&mut self, next_seq: u64, now: Instant) {
        if next_seq > self.acked {
            self.acked = next_seq;
            self.sent = self.sent.max(next_seq);
            self.waiting_since = (self.sent > self.acked).then_some(now);
        }
    }

    /// `count` events from `first` were published.
    pub fn on_sent(&mut self, first: u64, count: u64, now: Instant) {
        if self.sent <= self.acked {
            self.waiting_since = Some(now);
        }
        self.sent = self.sent.max(first + count);
        let (start, n) = self.burst.unwrap_or((now, 0));
        self.burst = Some((start, n + count));
    }

    /// What to do now; `journal_end` is the journal's next sequence.
    pub fn next(&mut self, now: Instant, journal_end: u64) -> Next {
        if !self.connected {
            return Next::Idle;
        }
        let outstanding = self.sent > self.acked;
        if outstanding
            && let Some(since) = self.waiting_since
            && now.duration_since(since) >= ACK_TIMEOUT
        {
            self.sent = self.acked;
            self.waiting_since = None;
            return self.next(now, journal_end);
        }
        let timeout = self.waiting_since.map(|s| s + ACK_TIMEOUT);
        if self.sent >= journal_end || self.sent >= self.acked + self.limits.window {
            if self.sent >= journal_end && !outstanding {
                // All sent and acknowledged: the next burst starts a fresh rate window.
                self.burst = None;
            }
            return timeout.map_or(Next::Idle, Next::WaitUntil);
        }
        if let Some((start, n)) = self.burst {
            let due = start + Duration::from_secs_f64(n as f64 / self.limits.drain_rate.max(1) as f64);
            if due > now {
                return Next::WaitUntil(timeout.map_or(due, |t| t.min(due)));
            }
        }
        let room = usize::try_from(self.acked + self.limits.window - self.sent).unwrap_or(usize::MAX);
        Next::Send {
            from: self.sent,
            max: paced_batch(self.limits.batch, self.limits.drain_rate)
                .min(room)
                .min(usize::try_from(journal_end - self.sent).unwrap_or(usize::MAX))
                .max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        window: 1000,
        batch: 500,
        drain_rate: 100_000,
    };

    fn connected(acked: u64) -> (Outbox, Instant) {
        let mut o = Outbox::new(acked, LIMITS);
        o.set_connected(true);
        (o, Instant::now())
    }

    #[test]
    fn idle_when_everything_is_acknowledged_or_the_link_is_down() {
        let (mut o, t) = connected(11);
        assert_eq!(o.next(t, 11), Next::Idle, "nothing new: no timer at all");
        o.set_connected(false);
        assert_eq!(o.next(t, 50), Next::Idle, "offline: the backlog waits");
    }

    #[test]
    fn sends_in_batches_then_waits_only_for_the_ack_deadline() {
        let (mut o, t) = connected(1);
        let ms = |n: u64| t + Duration::from_millis(n);
        assert_eq!(o.next(t, 1201), Next::Send { from: 1, max: 500 });
        o.on_sent(1, 500, t);
        // 500 events at 100,000/s: the next batch is due 5 ms after the burst began.
        assert_eq!(o.next(ms(1), 1201), Next::WaitUntil(ms(5)));
        assert_eq!(o.next(ms(5), 1201), Next::Send { from: 501, max: 500 });
        o.on_sent(501, 500, ms(5));
        // The window (1000) is full: wait for an ack, or resend at the deadline.
        assert_eq!(o.next(ms(10), 1201), Next::WaitUntil(t + ACK_TIMEOUT));
        o.on_ack(501, ms(20));
        assert_eq!(o.next(ms(20), 1201), Next::Send { from: 1001, max: 200 });
        o.on_sent(1001, 200, ms(20));
        o.on_ack(1201, ms(30));
        assert_eq!(o.next(ms(30), 1201), Next::Idle, "all acknowledged");
    }

    #[test]
    fn unacknowledged_events_are_sent_again_from_the_cursor_after_the_timeout() {
        let (mut o, t) = connected(1);
        o.on_sent(1, 10, t);
        assert_eq!(o.next(t + Duration::from_secs(1), 11), Next::WaitUntil(t + ACK_TIMEOUT));
        assert_eq!(o.next(t + ACK_TIMEOUT, 11), Next::Send { from: 1, max: 10 });
    }

    #[test]
    fn a_session_or_resend_starts_again_where_it_says() {
        let (mut o, t) = connected(5);
        o.on_sent(5, 20, t);
        let later = t + Duration::from_millis(10);
        o.on_session(5);
        assert_eq!(o.next(later, 25), Next::Send { from: 5, max: 20 });
        o.on_session(2);
        assert_eq!(o.next(later, 25), Next::Send { from: 2, max: 23 });
    }

    #[test]
    fn an_ack_never_moves_back_and_carries_sent_along() {
        let (mut o, t) = connected(10);
        o.on_ack(5, t);
        assert_eq!((o.acked(), o.sent()), (10, 10));
        o.on_ack(30, t);
        assert_eq!((o.acked(), o.sent()), (30, 30));
    }

    #[test]
    fn the_rate_limit_paces_batches_without_polling() {
        let limits = Limits {
            drain_rate: 100,
            ..LIMITS
        };
        let mut o = Outbox::new(1, limits);
        o.set_connected(true);
        let t = Instant::now();
        // 100/s: 10 events per batch, the next due 0.1 s after the burst began.
        assert_eq!(o.next(t, 1001), Next::Send { from: 1, max: 10 });
        o.on_sent(1, 10, t);
        assert_eq!(o.next(t, 1001), Next::WaitUntil(t + Duration::from_millis(100)));
        assert_eq!(
            o.next(t + Duration::from_millis(100), 1001),
            Next::Send { from: 11, max: 10 }
        );
    }

    #[test]
    fn a_low_drain_rate_sends_small_batches_often_instead_of_a_full_one_then_a_long_pause() {
        // 10 events/s: one event per batch, ten batches a second (was 500 then 50 s of nothing).
        assert_eq!(paced_batch(500, 10), 1);
        assert_eq!(paced_batch(500, 150), 15);
        assert_eq!(paced_batch(500, 1), 1);
        assert_eq!(paced_batch(500, 100_000), 500);
        assert_eq!(paced_batch(0, 100_000), 1);
        for rate in [1u64, 7, 10, 150, 4999, 100_000] {
            let pause = paced_batch(500, rate) as f64 / rate as f64;
            assert!(pause <= 1.0, "rate {rate}: {pause} s between batches");
            if rate >= PACE_PER_SECOND {
                assert!(pause <= 0.1 + 1e-9, "rate {rate}: {pause} s between batches");
            }
        }
    }
}
