//! The local API's reply bodies, in one place: the handlers build them, the CLI and the
//! offline reader read them back. A field renamed here is renamed on both sides at once.

use outpost_shared::run::StepRow;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An error reply: `{"error": {"code", "message", "problems"}}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The body of an [`ErrorReply`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable code (`invalid_request`, `not_found`, `id_reused`, …).
    #[serde(default)]
    pub code: String,
    /// For a person.
    #[serde(default)]
    pub message: String,
    /// Every problem found (a definition's), each naming where.
    #[serde(default)]
    pub problems: Vec<String>,
}

/// How a run is shown: its journaled status, or `queued` while admission holds it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShownStatus {
    /// Journaled as running, not yet admitted by the run limits.
    Queued,
    /// Still going.
    Running,
    /// Finished successfully.
    Completed,
    /// Finished with an error.
    Failed,
    /// Stopped by a cancel request.
    Cancelled,
    /// Failed, and every compensation succeeded.
    Compensated,
    /// Failed, and a compensation failed too.
    CompensationFailed,
    /// Stopped by an operator without compensation.
    Terminated,
    /// Ended by continuing as a new run.
    Continued,
    /// Failed and running its compensations.
    Compensating,
}

impl ShownStatus {
    /// As the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ShownStatus::Queued => "queued",
            ShownStatus::Running => "running",
            ShownStatus::Completed => "completed",
            ShownStatus::Failed => "failed",
            ShownStatus::Cancelled => "cancelled",
            ShownStatus::Compensated => "compensated",
            ShownStatus::CompensationFailed => "compensation_failed",
            ShownStatus::Terminated => "terminated",
            ShownStatus::Continued => "continued",
            ShownStatus::Compensating => "compensating",
        }
    }

    /// Not begun or not yet ended: a caller waiting for the end goes on waiting.
    pub fn is_pending(self) -> bool {
        matches!(self, ShownStatus::Queued | ShownStatus::Running)
    }
}

impl From<outpost_shared::run::RunStatus> for ShownStatus {
    fn from(s: outpost_shared::run::RunStatus) -> ShownStatus {
        use outpost_shared::run::RunStatus as S;
        match s {
            S::Running => ShownStatus::Running,
            S::Completed => ShownStatus::Completed,
            S::Failed => ShownStatus::Failed,
            S::Cancelled => ShownStatus::Cancelled,
            S::Compensated => ShownStatus::Compensated,
            S::CompensationFailed => ShownStatus::CompensationFailed,
            S::Terminated => ShownStatus::Terminated,
            S::Continued => ShownStatus::Continued,
            S::Compensating => ShownStatus::Compensating,
        }
    }
}

/// The error a run ended with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunError {
    /// Error kind (`modbus.timeout`, `cancelled`, …).
    pub kind: String,
    /// For a person.
    pub message: String,
    /// The step whose compensation failed, for `compensation_failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// A run as the list, `wait`, `cancel`, `terminate` and `retry` answer it: its summary and, once
/// it ended, its output or error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReply {
    /// Run id.
    pub run_id: String,
    /// Workflow name.
    pub workflow: String,
    /// The version the run is pinned to.
    pub version: u32,
    /// Status.
    pub status: ShownStatus,
    /// When it started (RFC 3339).
    pub created_at: String,
    /// When it ended (RFC 3339).
    pub finished_at: Option<String>,
    /// How long it ran (so far).
    pub duration_ms: u64,
    /// What it waits for, while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Its output, once ended (`null` when it has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Its error, once ended unsuccessfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RunError>,
}

/// The reply to a start: the run, whether this call created it, and (with `?wait=`) how it ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartReply {
    /// Run id.
    pub run_id: String,
    /// False when the id already existed and nothing new was started.
    pub created: bool,
    /// Workflow name.
    pub workflow: String,
    /// The version the run is pinned to.
    pub version: u32,
    /// For an existing id: whether the stored input is the one asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_input: Option<bool>,
    /// With `?wait=`: the run when the wait ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ShownStatus>,
    /// With `?wait=`: when it started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// With `?wait=`: when it ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// With `?wait=`: how long it ran (so far).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// With `?wait=`: what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// With `?wait=`: its output, once ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// With `?wait=`: its error, once ended unsuccessfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RunError>,
}

/// One event of a run's history: sequence, time, type, step, and the event's own fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryRow {
    /// Journal sequence.
    pub seq: u64,
    /// When (RFC 3339).
    pub at: String,
    /// Event type (`attempt_started`, `step_completed`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// The step it concerns, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The event's other fields (JSON payloads parsed, times as RFC 3339).
    #[serde(flatten)]
    pub detail: Map<String, Value>,
}

impl HistoryRow {
    /// The row of journaled event `seq`.
    pub fn of(seq: u64, record: &outpost_shared::journal::Record) -> HistoryRow {
        let mut detail = match outpost_shared::journal::history_row(seq, record) {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        for k in ["seq", "at", "type"] {
            detail.remove(k);
        }
        let step = match detail.remove("step") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        HistoryRow {
            seq,
            at: outpost_shared::journal::rfc3339(record.at_ms),
            kind: record.event.name().to_string(),
            step,
            detail,
        }
    }

    /// A text field of the event (`signal`, `target`, `by`, …).
    pub fn text(&self, key: &str) -> &str {
        self.detail.get(key).and_then(Value::as_str).unwrap_or_default()
    }

    /// The message of the event's `error`, if it has one.
    pub fn error_message(&self) -> &str {
        self.detail
            .get("error")
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// Why a run does not move: the journal cannot be written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Blocked {
    /// `journal_storage`.
    pub reason: String,
    /// The storage error.
    pub error: String,
    /// Since when (RFC 3339).
    pub since: String,
}

/// A run as `show` answers it: the summary, the fold of its history and the history itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunDetail {
    /// Run id.
    pub run_id: String,
    /// Workflow name.
    pub workflow: String,
    /// The version the run is pinned to.
    pub version: u32,
    /// Status.
    pub status: ShownStatus,
    /// When it started (RFC 3339).
    pub created_at: String,
    /// When it ended (RFC 3339).
    pub finished_at: Option<String>,
    /// How long it ran (so far).
    pub duration_ms: u64,
    /// Events in its history.
    pub events: usize,
    /// Its input.
    pub input: Value,
    /// Its output (`null` until it completed).
    pub output: Value,
    /// The error it ended with.
    pub error: Option<RunError>,
    /// Every step: status, attempts, times, output or error.
    pub steps: Vec<StepRow>,
    /// What it waits for.
    pub waiting: Option<String>,
    /// Set while the journal cannot be written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<Blocked>,
    /// Its history.
    pub history: Vec<HistoryRow>,
}

/// A page of a run's events (`GET /v1/runs/ID/events`, a long poll).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventsPage {
    /// Run id.
    pub run_id: String,
    /// The run's status when the page was read.
    pub status: ShownStatus,
    /// Events after the sequence asked for.
    pub events: Vec<HistoryRow>,
    /// The newest sequence in the page (or the one asked for).
    pub last_seq: u64,
}

/// The reply to a signal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalReply {
    /// Run id.
    pub run_id: String,
    /// Signal name.
    pub signal: String,
    /// Journaled now.
    pub accepted: bool,
    /// A repeat of an id already received (ignored).
    pub duplicate: bool,
    /// Some step of the run's workflow waits for this name.
    pub awaited: bool,
    /// The names the run's steps wait for.
    pub receivable: Vec<String>,
}

/// The reply to an approval decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApproveReply {
    /// Run id.
    pub run_id: String,
    /// The approval step.
    pub step: String,
    /// The decision.
    pub approved: bool,
    /// Journaled now.
    pub accepted: bool,
    /// A repeat of a decision already made (ignored).
    pub duplicate: bool,
}

/// The reply to applying a definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppliedReply {
    /// Workflow name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// Stored as a new version (false: the same version and content were there).
    pub created: bool,
    /// Steps in the definition.
    pub steps: usize,
}

/// One stored definition version, as the list shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DefinitionRow {
    /// Workflow name.
    pub name: String,
    /// Version.
    pub version: u32,
    /// When it was applied (RFC 3339).
    pub applied_at: String,
    /// Steps in the definition.
    pub steps: usize,
}

/// The reply to `POST /v1/sync/reconnect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReconnectReply {
    /// Sync reconnects now (with the identity files as they are now).
    pub reconnecting: bool,
    /// Why not, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The reply to `POST /v1/journal/checkpoint`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointReply {
    /// Every index row is written through this sequence.
    pub indexed_through: u64,
}

/// `GET /v1/status`: the agent at a glance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// Agent version.
    pub version: String,
    /// Process id.
    pub pid: u32,
    /// Runs with a live driver.
    pub active_runs: usize,
    /// Of those, runs parked on a far timer, a signal or an approval: state only in the journal.
    #[serde(default)]
    pub parked_runs: usize,
    /// Activities running and the agent-wide limit.
    pub activities: ActivitiesView,
    /// Run and activity limits.
    pub limits: crate::limits::LimitsView,
    /// Circuit breakers by target.
    pub breakers: Vec<crate::breaker::BreakerView>,
    /// Cloud sync, when configured.
    pub sync: Option<crate::sync_state::SyncView>,
    /// The journal.
    pub journal: JournalView,
    /// Durable timers.
    pub timers: TimersView,
    /// Triggers the latest definitions declare.
    pub triggers: TriggersView,
    /// Configured equipment.
    pub equipment: EquipmentView,
    /// The latest retention pass.
    pub retention: Option<RetentionView>,
}

/// Activities running and the agent-wide limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActivitiesView {
    /// Running now.
    pub running: usize,
    /// Agent-wide limit.
    pub limit: usize,
}

/// The journal in `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalView {
    /// Next sequence to assign.
    pub next_seq: u64,
    /// File size.
    pub file_bytes: u64,
    /// Commits since start.
    pub commits: u64,
    /// Events since start.
    pub events: u64,
    /// Writes since start.
    pub ops: u64,
    /// Events whose index rows wait in memory for the next checkpoint (see docs/journal.md).
    #[serde(default)]
    pub unindexed_events: u64,
    /// Set while the journal cannot be written.
    pub storage_error: Option<StorageErrorView>,
}

/// Why the journal cannot be written, since when, and how many runs wait for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageErrorView {
    /// The storage error.
    pub error: String,
    /// Since when (RFC 3339).
    pub since: String,
    /// Runs waiting for the journal.
    pub blocked_runs: usize,
}

/// Durable timers in `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimersView {
    /// Timers set and not fired.
    pub pending: usize,
    /// The earliest deadline (RFC 3339).
    pub next_at: Option<String>,
}

/// Triggers in `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TriggersView {
    /// Schedules.
    pub schedules: usize,
    /// MQTT triggers.
    pub mqtt: usize,
    /// Watched directories.
    pub directories: usize,
}

/// Equipment in `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EquipmentView {
    /// Devices by name and kind.
    pub devices: Vec<DeviceView>,
}

/// One configured device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceView {
    /// Name in the equipment file.
    pub name: String,
    /// Kind (`modbus`, `sim`, `opcua`, …).
    pub kind: String,
}

/// The latest retention pass.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetentionView {
    /// When (RFC 3339).
    pub last_at: String,
    /// Runs deleted.
    pub runs_deleted: u64,
    /// Events deleted.
    pub events_deleted: u64,
    /// Applied-command rows forgotten.
    pub commands_forgotten: u64,
    /// Definition versions deleted.
    pub definitions_deleted: u64,
    /// Bytes in use before the pass.
    pub bytes_in_use_before: u64,
}
