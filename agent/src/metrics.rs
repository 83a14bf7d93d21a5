//! Prometheus metrics of the agent (`GET /metrics` on the local API, and on `--metrics-listen`).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use crate::engine::RunStatus;
use crate::runtime::Runtime;

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// The metrics text (Prometheus exposition format 0.0.4).
pub fn render(rt: &Runtime) -> String {
    let mut out = String::new();
    let mut by_status = std::collections::BTreeMap::new();
    for s in RunStatus::ALL {
        by_status.insert(s.as_str(), 0u64);
    }
    if let Ok(runs) = rt.journal().runs(None, usize::MAX) {
        for (_, r) in runs {
            *by_status.entry(r.status.as_str()).or_default() += 1;
        }
    }
    let runs: Vec<(String, f64)> = by_status
        .iter()
        .map(|(s, n)| (format!("{{status=\"{s}\"}}"), *n as f64))
        .collect();
    metric(
        &mut out,
        "outpost_runs",
        "gauge",
        "Runs in the journal by status.",
        &runs,
    );
    let slots = rt.limits().run_slots(rt.active_count());
    metric(
        &mut out,
        "outpost_runs_active",
        "gauge",
        "Runs with a live driver, queued ones excluded.",
        &[(String::new(), slots.active as f64)],
    );
    metric(
        &mut out,
        "outpost_runs_queued",
        "gauge",
        "Runs waiting for a run slot.",
        &[(String::new(), slots.queued as f64)],
    );
    metric(
        &mut out,
        "outpost_activities_running",
        "gauge",
        "Activities running now.",
        &[(String::new(), rt.activities_running() as f64)],
    );
    let s = rt.journal().stats();
    let o = Ordering::Relaxed;
    let (commits, events) = (s.commits.load(o), s.events.load(o));
    metric(
        &mut out,
        "outpost_journal_commits_total",
        "counter",
        "Journal transactions committed (one fsync each).",
        &[(String::new(), commits as f64)],
    );
    metric(
        &mut out,
        "outpost_journal_events_total",
        "counter",
        "Events journaled.",
        &[(String::new(), events as f64)],
    );
    metric(
        &mut out,
        "outpost_journal_events_per_commit",
        "gauge",
        "Average commit batch size since start.",
        &[(
            String::new(),
            if commits == 0 {
                0.0
            } else {
                events as f64 / commits as f64
            },
        )],
    );
    metric(
        &mut out,
        "outpost_journal_file_bytes",
        "gauge",
        "Size of the journal file.",
        &[(String::new(), rt.journal_file_bytes() as f64)],
    );
    let next_seq = rt.journal().next_seq().unwrap_or(1);
    let (backlog, connected) = match rt.sync() {
        Some(sync) => (
            sync.backlog(next_seq) as f64,
            f64::from(u8::from(sync.connected.load(o))),
        ),
        None => (0.0, 0.0),
    };
    metric(
        &mut out,
        "outpost_outbox_events",
        "gauge",
        "Events not yet acknowledged by cloud-sync.",
        &[(String::new(), backlog)],
    );
    metric(
        &mut out,
        "outpost_sync_connected",
        "gauge",
        "1 while connected to the sync broker.",
        &[(String::new(), connected)],
    );
    rt.step_latency().render(
        "outpost_step_duration_seconds",
        "Duration of step attempts (the action's execution).",
        &mut out,
    );
    out
}
