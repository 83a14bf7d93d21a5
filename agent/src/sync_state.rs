//! Sync's live counters and link state, shared with the runtime (the outbox gate, retention),
//! `status` and `/metrics`. Separate from `sync`, so the runtime reads it without importing the
//! sync service that writes it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use outpost_shared::protocol;
use serde::{Deserialize, Serialize};

/// Live sync counters, shared with the runtime (outbox gate, retention) and `status`.
#[derive(Debug, Default)]
pub struct SyncState {
    /// First sequence the cloud has not acknowledged.
    pub acked: AtomicU64,
    /// Next sequence to send.
    pub sent: AtomicU64,
    /// Connected to the broker now.
    pub connected: AtomicBool,
    /// This start's epoch.
    pub epoch: AtomicU64,
    /// Outbox cap.
    pub max_events: AtomicU64,
    /// Starts refused because the outbox was full.
    pub refused_starts: AtomicU64,
    /// Batches published.
    pub batches: AtomicU64,
    /// Commands applied / ignored as repeats.
    pub commands: AtomicU64,
    /// Repeated commands ignored.
    pub duplicate_commands: AtomicU64,
    /// Messages from the cloud that did not decode.
    pub bad_messages: AtomicU64,
    /// Messages from the cloud refused for their signature: unsigned, or not the fleet key's
    /// for this topic (forged, altered, or meant for another gateway).
    pub bad_signatures: AtomicU64,
    /// Messages not sent because they would exceed the protocol's message limit.
    pub oversized_messages: AtomicU64,
    /// Acknowledgements refused because they claim events this journal never wrote.
    pub bad_acks: AtomicU64,
    /// This journal's random id (see `Birth::journal_id`).
    pub journal_id: AtomicU64,
    /// A resend asked from before the acknowledged cursor (the cloud lost events): the drain
    /// starts there instead of at the cursor; 0 when none is pending.
    pub rewind: AtomicU64,
    /// Resend requests the journal could not serve from where they asked, answered with a birth
    /// that says where it can.
    pub reannounced: AtomicU64,
    /// Births published in this epoch.
    pub announcements: AtomicU64,
    /// Connections made (each gets the full inventory once).
    pub connects: AtomicU64,
    /// Inventory messages published.
    pub inventories: AtomicU64,
    /// Notified when the acknowledged cursor moves or the link goes down: the drain sleeps on it.
    pub wake: tokio::sync::Notify,
    /// Asked (by `outpost enroll`) to reconnect, so a newly installed certificate and key are
    /// used now rather than at the next outage.
    pub reconnect: tokio::sync::Notify,
    /// The newest messages refused for their signature, for the birth (`Birth::refused`).
    pub refusals: std::sync::Mutex<std::collections::VecDeque<String>>,
    /// Notified on every refusal, so the fleet hears of it.
    pub refused: tokio::sync::Notify,
    /// The broker, as `host:port`, for `status`.
    pub broker: std::sync::Mutex<String>,
    /// Why the link last went down, and when (ms since the epoch), for `status`.
    pub last_error: std::sync::Mutex<Option<(String, u64)>>,
}

impl SyncState {
    /// Remembers a refused message for the next announcement and wakes its task.
    pub(crate) fn note_refusal(&self, topic: &str, why: &str) {
        let channel = topic.rsplit('/').next().unwrap_or(topic);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let line = format!(
            "{}: {}: {}",
            outpost_shared::journal::rfc3339(now),
            protocol::quote(channel),
            protocol::clip(why, 200)
        );
        let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        r.push_back(line);
        while r.len() > protocol::MAX_REFUSALS_LISTED {
            r.pop_front();
        }
        drop(r);
        self.refused.notify_one();
    }
}

impl SyncState {
    /// Events written but not acknowledged, given the journal's next sequence.
    pub fn backlog(&self, next_seq: u64) -> u64 {
        next_seq.saturating_sub(self.acked.load(Ordering::Relaxed).max(1))
    }

    /// For `outpost status`.
    pub fn view(&self, next_seq: u64) -> SyncView {
        let o = Ordering::Relaxed;
        let broker = self.broker.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let last_error = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(e, at)| SyncErrorView {
                error: e.clone(),
                at: outpost_shared::journal::rfc3339(*at),
            });
        SyncView {
            broker,
            last_error,
            connected: self.connected.load(o),
            epoch: self.epoch.load(o),
            acked_seq: self.acked.load(o).saturating_sub(1),
            backlog_events: self.backlog(next_seq),
            outbox_max_events: self.max_events.load(o),
            refused_starts: self.refused_starts.load(o),
            batches_sent: self.batches.load(o),
            commands_applied: self.commands.load(o),
            duplicate_commands: self.duplicate_commands.load(o),
            bad_messages: self.bad_messages.load(o),
            bad_signatures: self.bad_signatures.load(o),
            oversized_messages: self.oversized_messages.load(o),
            bad_acks: self.bad_acks.load(o),
            reannounced: self.reannounced.load(o),
            inventory_messages: self.inventories.load(o),
        }
    }
}

/// Sync as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncView {
    /// The broker's address.
    pub broker: String,
    /// The latest link error and when.
    pub last_error: Option<SyncErrorView>,
    /// Connected now.
    pub connected: bool,
    /// This start's birth epoch.
    pub epoch: u64,
    /// The newest sequence the cloud acknowledged.
    pub acked_seq: u64,
    /// Events the cloud has not acknowledged.
    pub backlog_events: u64,
    /// The outbox cap.
    pub outbox_max_events: u64,
    /// Starts refused because the outbox was full.
    pub refused_starts: u64,
    /// Batches published.
    pub batches_sent: u64,
    /// Commands applied.
    pub commands_applied: u64,
    /// Repeated commands ignored.
    pub duplicate_commands: u64,
    /// Messages that did not decode.
    pub bad_messages: u64,
    /// Messages whose signature did not verify.
    pub bad_signatures: u64,
    /// Messages over the size limit.
    pub oversized_messages: u64,
    /// Acks refused (beyond what was sent).
    pub bad_acks: u64,
    /// Births sent again.
    pub reannounced: u64,
    /// Inventory messages sent.
    pub inventory_messages: u64,
}

/// A link error and when it happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncErrorView {
    /// The error.
    pub error: String,
    /// When (RFC 3339).
    pub at: String,
}
