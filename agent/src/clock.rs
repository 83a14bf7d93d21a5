//! Wall-clock time behind an interface, so tests can inject a clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// Now, in ms since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock before 1970 reads as 0 rather than panicking.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// The system clock shifted by an offset (ms, may be negative) read from a file every 100 ms.
/// Tests use it (`OUTPOST_CLOCK_OFFSET_FILE`) to reset a running agent's clock to 1970 and
/// back, as a gateway without a battery-backed clock sees when NTP finally answers. Only in
/// builds with the `test-clock` feature (the test suite's), never in a release package.
#[cfg(feature = "test-clock")]
pub struct FileOffsetClock {
    offset: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

#[cfg(feature = "test-clock")]
impl FileOffsetClock {
    /// Starts watching `path` (a missing or unreadable file means offset 0).
    pub fn watch(path: std::path::PathBuf) -> FileOffsetClock {
        let offset = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
                .unwrap_or(0)
        };
        offset.store(read(&path), std::sync::atomic::Ordering::Relaxed);
        let shared = offset.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_millis(100));
                shared.store(read(&path), std::sync::atomic::Ordering::Relaxed);
            }
        });
        FileOffsetClock { offset }
    }
}

#[cfg(feature = "test-clock")]
impl Clock for FileOffsetClock {
    fn now_ms(&self) -> u64 {
        let off = self.offset.load(std::sync::atomic::Ordering::Relaxed);
        SystemClock.now_ms().saturating_add_signed(off)
    }
}

/// How long to wait for a wall-clock deadline. The wait never exceeds the `duration_ms` originally
/// asked for, so a clock that jumps backwards (a gateway booting in 1970) cannot stretch a timer.
pub fn remaining_ms(now_ms: u64, fire_at_ms: u64, duration_ms: u64) -> u64 {
    fire_at_ms.saturating_sub(now_ms).min(duration_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_jumps_neither_stretch_nor_skip_beyond_reason() {
        assert_eq!(remaining_ms(1_000, 31_000, 30_000), 30_000);
        assert_eq!(remaining_ms(20_000, 31_000, 30_000), 11_000);
        assert_eq!(remaining_ms(40_000, 31_000, 30_000), 0);
        // Booted in 1970 after the timer was set in 2026: wait at most the original length.
        assert_eq!(remaining_ms(5, 1_800_000_030_000, 30_000), 30_000);
    }
}
