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
//!
//! The same trim also lets go of code. The kernel maps an executable's pages into the process
//! as they first run, and in large folios and fault-around windows, so start-up (argument
//! parsing, journal recovery, TLS set-up, the first sync exchange) leaves most of the 6 MB of
//! machine code mapped although an idle agent runs little of it: 7.6 MB of the 9.0 MB an idle
//! agent with sync held were mapped files. [`release_unused_code`] unmaps the code mappings that
//! hold no private pages; the pages stay in the page cache, shared, and what runs
//! next is mapped again by an ordinary minor fault. The agent asks for a trim once it is ready
//! and once the sync link is up, besides after parks.

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
            let _ = tokio::task::spawn_blocking(|| {
                release_freed();
                release_unused_code();
            })
            .await;
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

/// Unmaps the machine code this process mapped from files and holds no page of its own in.
///
/// Only mappings that are executable, readable, not writable, private, backed by a file, with
/// resident pages and no anonymous, dirty or swapped ones qualify: their content is exactly the
/// file's, so `MADV_DONTNEED` only drops page-table entries and the next instruction fetched
/// maps the same page-cache page again. Linux only; elsewhere nothing.
pub fn release_unused_code() {
    #[cfg(target_os = "linux")]
    {
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return;
        };
        for (start, end) in clean_file_mappings(&smaps) {
            // SAFETY: the range is a whole mapping of this process that, when /proc read it, held
            // only pages identical to its file (no anonymous or swapped pages); dropping them
            // changes no byte any thread reads, it only makes the next read fault them in.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

/// The ranges of `/proc/PID/smaps` mappings that [`release_unused_code`] may unmap.
fn clean_file_mappings(smaps: &str) -> Vec<(usize, usize)> {
    struct Mapping {
        range: (usize, usize),
        eligible: bool,
        private_pages: bool,
        resident: bool,
    }
    let mut found = Vec::new();
    let mut current: Option<Mapping> = None;
    let mut finish = |m: Option<Mapping>| {
        if let Some(m) = m.filter(|m| m.eligible && m.resident && !m.private_pages) {
            found.push(m.range);
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-') {
            let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16)) else {
                // An address this process cannot have: not its own memory map (qemu-user shows a
                // 32-bit guest the host's 64-bit mappings too). Trust none of it.
                return Vec::new();
            };
            finish(current.take());
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            current = Some(Mapping {
                range: (start, end),
                // "r-xp": machine code, private; a path, not [vdso]. Constants ("r--p") would
                // qualify on a kernel's own smaps, but a relocated RELRO page is "r--p" too, and
                // an emulator's smaps (qemu-user) reports it with no anonymous pages: code only.
                eligible: perms == "r-xp" && path.starts_with('/') && end > start,
                private_pages: false,
                resident: false,
            });
        } else if let Some(m) = current.as_mut() {
            let nonzero = fields.next().is_some_and(|v| v != "0");
            match first {
                "Anonymous:" | "Swap:" | "SwapPss:" | "Private_Dirty:" | "Shared_Dirty:" => {
                    m.private_pages |= nonzero;
                }
                // Nothing resident, nothing to release. This also makes a /proc that does not
                // report pages (qemu-user's emulated smaps says "Rss: 0" and "Anonymous: 0" even
                // for the relocated RELRO pages) a reason to do nothing, not to drop them.
                "Rss:" => m.resident = nonzero,
                _ => {}
            }
        }
    }
    finish(current.take());
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clean_read_only_file_mappings_are_unmapped() {
        // Addresses that fit a 32-bit usize too: the tests also run on armv7.
        let smaps = "\
55d00000-55d10000 r--p 00000000 fe:00 42 /usr/bin/outpost
Rss:                  64 kB
Size:               1024 kB
Anonymous:             0 kB
Swap:                  0 kB
55d10000-55d60000 r-xp 00100000 fe:00 42 /usr/bin/outpost
Rss:                  64 kB
Anonymous:             0 kB
Swap:                  0 kB
55d60000-55d64000 r--p 00600000 fe:00 42 /usr/bin/outpost
Rss:                  64 kB
Anonymous:           188 kB
55d64000-55d65000 rw-p 00640000 fe:00 42 /usr/bin/outpost
Rss:                  64 kB
Anonymous:            16 kB
7f000000-7f010000 r--p 00000000 fe:00 43 /usr/lib/libc.so.6
Rss:                  64 kB
Anonymous:             0 kB
Swap:                  8 kB
7f010000-7f020000 r-xp 00000000 00:00 0 [vdso]
Rss:                  64 kB
Anonymous:             0 kB
7f020000-7f030000 rw-p 00000000 00:00 0 [heap]
Rss:                  64 kB
Anonymous:            64 kB
7f030000-7f040000 r-xs 00000000 fe:00 44 /dev/shm/shared
Rss:                  64 kB
Anonymous:             0 kB
7f040000-7f050000 r-xp 00000000 fe:00 45 /usr/lib/libm.so.6
Rss:                  64 kB
Anonymous:             0 kB
7f050000-7f060000 r--p 00010000 fe:00 45 /usr/lib/libm.so.6
Rss:                   0 kB
Anonymous:             0 kB
7f060000-7f070000 r--p 00020000 fe:00 45 /usr/lib/libm.so.6
Rss:                  64 kB
Private_Dirty:         4 kB
Anonymous:             0 kB
";
        assert_eq!(
            clean_file_mappings(smaps),
            vec![(0x55d10000, 0x55d60000), (0x7f040000, 0x7f050000)]
        );
        // A header that is no address of this process: the whole map is someone else's.
        let foreign =
            format!("{smaps}10000000000000000-10000000000001000 r-xp 00000000 fe:00 9 /usr/bin/qemu\nRss: 4 kB\n");
        assert!(clean_file_mappings(&foreign).is_empty());
    }

    /// This process's resident file pages, in kB.
    #[cfg(target_os = "linux")]
    fn rss_file_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap_or_default();
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn code_released_runs_again() {
        // Unmap this process's own code, then keep running it.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        // Under qemu-user /proc reports no resident pages, and the release does nothing.
        let emulated = clean_file_mappings(&smaps).is_empty();
        let before = rss_file_kib();
        release_unused_code();
        let after = rss_file_kib();
        // The ARM tests run under qemu-user, whose madvise leaves the host's pages where they
        // are: the drop is checked where the tests run natively.
        assert!(
            emulated || cfg!(not(target_arch = "x86_64")) || after < before,
            "resident file pages: {before} kB before, {after} kB after"
        );
        let words: Vec<String> = "still runs after the release".split(' ').map(str::to_owned).collect();
        assert_eq!(words.len(), 5);
        release_unused_code();
        assert_eq!(format!("{:?}", words.last()), "Some(\"release\")");
    }

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
