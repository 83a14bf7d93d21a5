//! Prometheus metrics of the agent (`GET /metrics` on the local API, and on `--metrics-listen`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::RunStatus;
use crate::runtime::Runtime;

/// Upper bounds of the step latency buckets, in seconds.
const BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A fixed-bucket latency histogram, lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| s <= *b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

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
    let limits = rt.limits().view(rt.active_count());
    let g = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    metric(
        &mut out,
        "outpost_runs_active",
        "gauge",
        "Runs with a live driver, queued ones excluded.",
        &[(String::new(), g(&limits["runs"]["active"]))],
    );
    metric(
        &mut out,
        "outpost_runs_queued",
        "gauge",
        "Runs waiting for a run slot.",
        &[(String::new(), g(&limits["runs"]["queued"]))],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let h = Histogram::default();
        h.observe(std::time::Duration::from_millis(3));
        h.observe(std::time::Duration::from_millis(30));
        h.observe(std::time::Duration::from_secs(60));
        let mut out = String::new();
        h.render("x", "help", &mut out);
        assert!(out.contains("x_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.05\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }
}
