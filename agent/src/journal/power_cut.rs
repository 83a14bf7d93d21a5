//! Power cuts at every write of a workload: a storage backend that keeps what was synced apart
//! from what was only written, and at its Nth write loses everything unsynced (and, every other
//! time, lands a torn first sector of that write). The journal opened on what survived must
//! hold every acknowledged event, and its index tables — checkpointed, or rebuilt from the
//! events after the checkpoint — must say exactly what the events say.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use outpost_shared::journal::{ErrorInfo, Event};

use super::*;

/// The disk: what a read sees, what survives a power cut, and when the power goes. It holds
/// two files, the redb file and the segment log, with one write counter and one power switch.
#[derive(Default)]
struct Disk {
    /// What reads see (written, maybe not synced), per file.
    live: [Vec<u8>; 2],
    /// What survives a cut: each file's bytes as of its last sync.
    synced: [Vec<u8>; 2],
    /// Writes so far, to either file.
    writes: usize,
    /// Of those, writes to the log.
    log_writes: usize,
    /// The write at which the power goes (1-based).
    cut_at: Option<usize>,
    /// The power is gone: every call fails.
    dead: bool,
}

/// One file on the disk: 0 is the redb file, 1 the log.
#[derive(Clone, Default)]
struct PowerCut(Arc<Mutex<Disk>>, usize);

impl std::fmt::Debug for PowerCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PowerCut")
    }
}

fn dead() -> std::io::Error {
    std::io::Error::other("power cut")
}

impl PowerCut {
    fn disk(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A disk holding `files`, with the power on.
    fn with(files: [Vec<u8>; 2], cut_at: Option<usize>) -> PowerCut {
        PowerCut(
            Arc::new(Mutex::new(Disk {
                live: files.clone(),
                synced: files,
                cut_at,
                ..Disk::default()
            })),
            0,
        )
    }

    /// The log file of the same disk.
    fn log(&self) -> PowerCut {
        PowerCut(self.0.clone(), 1)
    }
}

impl redb::StorageBackend for PowerCut {
    fn len(&self) -> std::io::Result<u64> {
        let d = self.disk();
        if d.dead {
            return Err(dead());
        }
        Ok(d.live[self.1].len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let d = self.disk();
        if d.dead {
            return Err(dead());
        }
        let start = offset as usize;
        let end = start + out.len();
        let live = &d.live[self.1];
        if end > live.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end",
            ));
        }
        out.copy_from_slice(&live[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut d = self.disk();
        if d.dead {
            return Err(dead());
        }
        d.live[self.1].resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        let mut d = self.disk();
        if d.dead {
            return Err(dead());
        }
        d.synced[self.1] = d.live[self.1].clone();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut d = self.disk();
        if d.dead {
            return Err(dead());
        }
        d.writes += 1;
        d.log_writes += self.1;
        let start = offset as usize;
        if d.cut_at == Some(d.writes) {
            d.dead = true;
            // Every other cut tears this write: its first sector reaches the platter.
            if d.writes.is_multiple_of(2) {
                let torn = data.len().min(512);
                let synced = &mut d.synced[self.1];
                if synced.len() < start + torn {
                    synced.resize(start + torn, 0);
                }
                synced[start..start + torn].copy_from_slice(&data[..torn]);
            }
            return Err(dead());
        }
        let live = &mut d.live[self.1];
        if live.len() < start + data.len() {
            live.resize(start + data.len(), 0);
        }
        live[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

fn config() -> JournalConfig {
    JournalConfig {
        // Checkpoints every few events, so cuts land before, in and after them.
        checkpoint_events: 5,
        // A small log, so the workload also fills it and checkpoints for room.
        log_bytes: 6 * super::wal::BLOCK,
        ..JournalConfig::default()
    }
}

fn open(disk: &PowerCut) -> Result<Journal, JournalError> {
    let d = disk.clone();
    Journal::open_backend(
        move || Ok(d.clone()),
        Some(Box::new(disk.log())),
        &config(),
        Arc::new(Fixed),
    )
}

fn started() -> Event {
    Event::RunStarted {
        workflow: "w".into(),
        version: 1,
        input: "{}".into(),
    }
}

fn step(s: &str) -> Event {
    Event::StepCompleted {
        step: s.into(),
        visit: 1,
        output: "1".into(),
    }
}

fn timer(set: bool, at: u64) -> Event {
    if set {
        Event::TimerSet {
            step: "t".into(),
            visit: 1,
            fire_at_ms: at,
            duration_ms: 1,
        }
    } else {
        Event::TimerFired {
            step: "t".into(),
            visit: 1,
            fire_at_ms: at,
        }
    }
}

fn done() -> Event {
    Event::RunCompleted { output: "null".into() }
}

/// Starts, steps, timers, an end, a failure and its retry, a continue-as-new and a run left
/// waiting, with cursors and kv rows between; stops at the first error (the power is gone).
/// Gives how many operations were acknowledged.
async fn workload(j: &Journal) -> usize {
    let mut acked = 0;
    macro_rules! op {
        ($e:expr) => {
            match $e.await {
                Ok(_) => acked += 1,
                Err(_) => return acked,
            }
        };
    }
    op!(j.put_definition("w", 1, "{}".into()));
    op!(j.start_run("r0", started()));
    op!(j.append("r0", vec![step("a"), timer(true, 1_000)]));
    let failed = Event::RunFailed {
        error: ErrorInfo::new("test", "boom"),
    };
    op!(j.append("r0", vec![failed]));
    op!(j.start_run("r1", started()));
    op!(j.put_cursor("schedule/x", 7));
    op!(j.append("r1", vec![step("a")]));
    let next = Event::RunContinued {
        next_run: "r1-next".into(),
        input: "{}".into(),
    };
    op!(j.append("r1", vec![next]));
    op!(j.append("r1-next", vec![step("a")]));
    op!(j.start_run("r2", started()));
    op!(j.append("r2", vec![timer(true, 2_000)]));
    op!(j.append("r2", vec![timer(false, 2_000), step("b"), done()]));
    op!(j.append("r0", vec![Event::RunRetried { by: "test".into() }, step("a")]));
    op!(j.start_run("r3", started()));
    op!(j.append("r3", vec![timer(true, 3_000)]));
    op!(j.put_kv("cmd/c1", b"applied".to_vec()));
    op!(j.append("r0", vec![done()]));
    for i in 4..8 {
        let id = format!("r{i}");
        op!(j.start_run(&id, started()));
        for s in ["a", "b", "c"] {
            op!(j.append(&id, vec![step(s)]));
        }
        op!(j.append(&id, vec![done()]));
    }
    op!(j.close());
    acked
}

/// What the events say the indexes must hold: each run's events, status, whether it is
/// active, and the pending timers.
#[derive(Debug, Default, PartialEq)]
struct Expected {
    runs: BTreeMap<String, (Vec<u64>, RunStatus)>,
    active: BTreeSet<String>,
    timers: BTreeSet<(u64, String, String)>,
}

fn expected(events: &[(u64, Record)]) -> Expected {
    let mut e = Expected::default();
    for (seq, r) in events {
        let run = r.run_id.clone();
        let entry = e.runs.entry(run.clone()).or_insert((Vec::new(), RunStatus::Running));
        entry.0.push(*seq);
        match &r.event {
            Event::RunStarted { .. } | Event::RunRetried { .. } => {
                entry.1 = RunStatus::Running;
                e.active.insert(run);
            }
            Event::TimerSet { step, fire_at_ms, .. } => {
                e.timers.insert((*fire_at_ms, run, step.clone()));
            }
            Event::TimerFired { step, fire_at_ms, .. } => {
                e.timers.remove(&(*fire_at_ms, run, step.clone()));
            }
            ev => {
                if let Some(status) = RunStatus::of_terminal(ev) {
                    entry.1 = status;
                    e.active.remove(&run);
                    e.timers.retain(|(_, r, _)| r != &run);
                }
            }
        }
    }
    e
}

fn observed(j: &Journal, runs: &BTreeMap<String, (Vec<u64>, RunStatus)>) -> Expected {
    let mut o = Expected::default();
    for id in runs.keys() {
        let seqs = j.history(id).unwrap().into_iter().map(|(s, _)| s).collect();
        let status = j.run(id).unwrap().map_or(RunStatus::Terminated, |r| r.status);
        o.runs.insert(id.clone(), (seqs, status));
    }
    o.active = j.active_runs().unwrap().into_iter().collect();
    o.timers = j.timers().unwrap().into_iter().collect();
    o
}

/// Opens what survived and checks it; then once more after a clean close, when every index row
/// must be in the tables themselves.
async fn check_recovery(bytes: [Vec<u8>; 2], acked_events: &[(u64, Record)], cut: usize) {
    let disk = PowerCut::with(bytes, None);
    for pass in ["after the cut", "after a clean close"] {
        let j = open(&disk).unwrap_or_else(|e| panic!("cut at write {cut}: does not open {pass}: {e}"));
        let events = j.events_since(1, usize::MAX).unwrap();
        for (seq, r) in acked_events {
            let found = events.iter().find(|(s, _)| s == seq).map(|(_, r)| r);
            assert_eq!(
                found,
                Some(r),
                "cut at write {cut}: acknowledged event #{seq} lost {pass}"
            );
        }
        assert!(
            events.windows(2).all(|w| w[1].0 == w[0].0 + 1),
            "cut at write {cut}: a gap in the events {pass}"
        );
        let want = expected(&events);
        assert_eq!(
            observed(&j, &want.runs),
            want,
            "cut at write {cut}: the indexes disagree with the events {pass}"
        );
        // The journal takes writes again after the cut.
        let next = j.next_seq().unwrap();
        j.start_run(&format!("after-{pass}"), started()).await.unwrap();
        assert_eq!(j.next_seq().unwrap(), next + 1);
        j.close().await.unwrap();
    }
}

/// A clock that stands still, so every run of the workload writes the same records.
struct Fixed;

impl crate::clock::Clock for Fixed {
    fn now_ms(&self) -> u64 {
        1_700_000_000_000
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_at_any_write_loses_nothing_acknowledged_and_the_indexes_follow_the_events() {
    // The whole workload once, to count its writes and record every event it journals.
    let disk = PowerCut::default();
    let j = open(&disk).unwrap();
    let ops = workload(&j).await;
    let (writes, log_writes) = {
        let d = disk.disk();
        (d.writes, d.log_writes)
    };
    assert!(log_writes > 10, "the log took {log_writes} of {writes} writes");
    drop(j);
    let all = open(&disk).unwrap().events_since(1, usize::MAX).unwrap();
    assert!(
        ops > 30 && writes > 30 && all.len() > 30,
        "{ops} operations, {writes} writes"
    );

    for cut in 1..=writes {
        let disk = PowerCut::with(Default::default(), Some(cut));
        let Ok(j) = open(&disk) else {
            // The power went while the file was being made: nothing was acknowledged.
            let synced = disk.disk().synced.clone();
            check_recovery(synced, &[], cut).await;
            continue;
        };
        workload(&j).await;
        // The commit watch moves only after a commit's sync returned: every event below it
        // was acknowledged to its writer.
        let next = *j.commits().borrow();
        let acked: Vec<(u64, Record)> = all.iter().filter(|(s, _)| *s < next).cloned().collect();
        drop(j);
        let bytes = disk.disk().synced.clone();
        check_recovery(bytes, &acked, cut).await;
    }
}
