//! Handing freed heap memory back to the system after a burst of frees.
//!
//! glibc's allocator keeps what a process frees for its own reuse; only the top of each arena
//! goes back on its own. When runs park (issue 15), each frees its folded state and its driver's
//! future, kilobytes scattered through the heap: 20,000 parked runs left about 3.6 MB resident
//! that nothing would reuse until the next burst of work. `malloc_trim` returns the free pages
//! inside the arenas too. A [`Trimmer`] runs it once, a second after the first free it is told
//! of, so a burst costs one trim and an idle agent none. Runs that end do not trim: under load
//! their memory is reused at once, and a trim every second would only hand pages back to fault
//! them in again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long after the first free of a burst the trim runs: the rest of the burst comes first.
const DELAY: Duration = Duration::from_secs(1);

/// Schedules at most one trim at a time, [`DELAY`] after it is told memory was freed.
#[derive(Debug, Default)]
pub struct Trimmer {
    scheduled: AtomicBool,
}

impl Trimmer {
    /// Much memory was just freed: trim soon, unless a trim is already due. Needs a tokio runtime.
    pub fn freed(self: &Arc<Self>) {
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(DELAY).await;
            // Cleared first: frees during the trim schedule the next one.
            me.scheduled.store(false, Ordering::Release);
            // Takes the arenas' locks and walks their free lists: not on a worker thread.
            let _ = tokio::task::spawn_blocking(release_freed).await;
        });
    }
}

/// Gives the allocator's free pages back to the system (glibc only; other allocators and
/// platforms return freed memory on their own terms, and this does nothing there).
fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only walks the allocator's own state under its
    // locks, which every thread's malloc and free also take.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_of_frees_schedules_one_trim() {
        let t = Arc::new(Trimmer::default());
        t.freed();
        assert!(t.scheduled.load(Ordering::Acquire));
        t.freed();
        t.freed();
        tokio::time::sleep(DELAY + Duration::from_millis(200)).await;
        // The trim ran (or is running): the next free schedules a new one.
        assert!(!t.scheduled.load(Ordering::Acquire));
        t.freed();
        assert!(t.scheduled.load(Ordering::Acquire));
    }
}
