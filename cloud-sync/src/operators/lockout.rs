//! Sign-in rate limiting: after `failures` wrong passwords within `window` for one user name, or
//! from one address, that name (or address) is locked out for `lock`. Pure: the caller gives the
//! time.

use std::collections::HashMap;

/// How many failures lock out, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct LockoutPolicy {
    /// Failures within `window_ms` that lock.
    pub failures: u32,
    /// The window failures are counted in.
    pub window_ms: u64,
    /// How long a lock lasts.
    pub lock_ms: u64,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy {
            failures: 5,
            window_ms: 15 * 60_000,
            lock_ms: 15 * 60_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Count {
    first_ms: u64,
    failures: u32,
    locked_until_ms: u64,
}

/// Failure counts per user name and per address.
#[derive(Debug, Default)]
pub struct Lockout {
    policy: LockoutPolicy,
    counts: HashMap<String, Count>,
}

/// Most keys remembered; the oldest unlocked ones are dropped past it, so a flood of made-up
/// names cannot grow memory without bound.
const MAX_KEYS: usize = 10_000;

impl Lockout {
    /// Counts with `policy`.
    pub fn new(policy: LockoutPolicy) -> Lockout {
        Lockout {
            policy,
            counts: HashMap::new(),
        }
    }

    fn keys(user: &str, addr: &str) -> [String; 2] {
        [format!("user:{user}"), format!("addr:{addr}")]
    }

    /// When `user` from `addr` is locked out at `now_ms`: the seconds left, for the message.
    pub fn locked(&self, user: &str, addr: &str, now_ms: u64) -> Option<u64> {
        Self::keys(user, addr)
            .iter()
            .filter_map(|k| self.counts.get(k))
            .map(|c| c.locked_until_ms)
            .filter(|until| *until > now_ms)
            .max()
            .map(|until| (until - now_ms).div_ceil(1000))
    }

    /// Records a failed sign-in; true when it locked the user or the address.
    pub fn failed(&mut self, user: &str, addr: &str, now_ms: u64) -> bool {
        let p = self.policy;
        let mut locked = false;
        for k in Self::keys(user, addr) {
            let c = self.counts.entry(k).or_default();
            if now_ms.saturating_sub(c.first_ms) > p.window_ms {
                *c = Count {
                    first_ms: now_ms,
                    ..Count::default()
                };
            }
            c.failures += 1;
            if c.failures >= p.failures {
                c.locked_until_ms = now_ms + p.lock_ms;
                c.failures = 0;
                c.first_ms = now_ms;
                locked = true;
            }
        }
        if self.counts.len() > MAX_KEYS {
            self.counts.retain(|_, c| c.locked_until_ms > now_ms);
        }
        locked
    }

    /// Records a good sign-in: the user's count starts again (the address's does not, so one
    /// good account cannot reset a guesser's count).
    pub fn succeeded(&mut self, user: &str) {
        self.counts.remove(&format!("user:{user}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_lock_the_name_and_the_address_for_a_while() {
        let mut l = Lockout::new(LockoutPolicy::default());
        for i in 0..4 {
            assert!(!l.failed("ada", "10.0.0.1", i));
        }
        assert!(l.locked("ada", "10.0.0.1", 5).is_none());
        assert!(l.failed("ada", "10.0.0.1", 5));
        assert_eq!(l.locked("ada", "10.0.0.9", 5), Some(900));
        assert!(l.locked("bob", "10.0.0.1", 5).is_some(), "the address is locked too");
        assert!(l.locked("bob", "10.0.0.2", 5).is_none());
        assert!(l.locked("ada", "10.0.0.9", 5 + 15 * 60_000).is_none());
    }

    #[test]
    fn failures_spread_past_the_window_do_not_lock_and_success_resets_the_name() {
        let mut l = Lockout::new(LockoutPolicy::default());
        for i in 0..10u64 {
            assert!(!l.failed("ada", &format!("a{i}"), i * 4 * 60_000));
        }
        let mut l = Lockout::new(LockoutPolicy::default());
        for i in 0..4 {
            l.failed("ada", &format!("a{i}"), i);
        }
        l.succeeded("ada");
        assert!(!l.failed("ada", "a9", 10));
    }
}
