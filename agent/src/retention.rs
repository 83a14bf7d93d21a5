//! Retention: finished runs are deleted once older than the retention window, or sooner,
//! oldest first, while the journal holds more than its size budget. Unfinished runs are never
//! touched, so a workflow that loops forever stays bounded by continuing as new: each link of
//! the chain is a finished run that retention can delete.

use std::time::Duration;

use tracing::{info, warn};

use crate::journal::{Pruned, Retention};
use crate::runtime::Runtime;

/// Retention settings.
#[derive(Debug, Clone, Copy)]
pub struct RetentionConfig {
    /// Finished runs older than this are deleted.
    pub keep_for: Duration,
    /// Oldest finished runs are deleted while the journal holds more than this many bytes.
    pub max_bytes: u64,
    /// How often to check.
    pub every: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_for: Duration::from_secs(7 * 86_400),
            max_bytes: 64 * 1024 * 1024,
            every: Duration::from_secs(60),
        }
    }
}

/// One pass; repeats while a pass hits its per-pass run limit.
pub async fn prune_once(rt: &Runtime, config: RetentionConfig) -> Pruned {
    let mut total = Pruned::default();
    loop {
        let policy = Retention {
            finished_before_ms: rt
                .clock_ms()
                .saturating_sub(u64::try_from(config.keep_for.as_millis()).unwrap_or(u64::MAX)),
            max_bytes: config.max_bytes,
            // With cloud sync, only what the cloud acknowledged may go.
            keep_from_seq: rt
                .sync()
                .map(|s| s.acked.load(std::sync::atomic::Ordering::Relaxed))
                .unwrap_or(u64::MAX),
            max_runs: 500,
        };
        match rt.journal().prune(policy).await {
            Ok(p) => {
                if total.runs == 0 {
                    total.bytes_before = p.bytes_before;
                }
                total.runs += p.runs;
                total.events += p.events;
                if p.runs < policy.max_runs as u64 {
                    break;
                }
            }
            Err(e) => {
                warn!(error = %e, "retention pass failed; will retry");
                break;
            }
        }
    }
    if total.runs > 0 {
        info!(
            runs = total.runs,
            events = total.events,
            bytes_before = total.bytes_before,
            "retention deleted finished runs"
        );
    }
    total
}

/// Prunes every `config.every` until the process ends.
pub async fn run(rt: Runtime, config: RetentionConfig) {
    loop {
        let p = prune_once(&rt, config).await;
        rt.record_prune(p);
        tokio::time::sleep(config.every).await;
    }
}
