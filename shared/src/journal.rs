//! Journal records: what happened to a run, one event per record.
//!
//! Records are postcard inside a versioned envelope. Postcard is not self-describing, so the
//! format rules are strict: the envelope's variants and [`Event`]'s variants are only ever
//! appended, a record struct never changes once released (a new one becomes `V2`), and JSON
//! payloads travel as strings. `tests/golden.rs` pins the bytes of the current format.

// Decodes untrusted bytes: no panics, no unchecked indexing (ARCHITECTURE.md, "Input").
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)
)]

use serde::{Deserialize, Serialize};

/// Largest encoded record accepted by [`decode`]; larger bytes are corrupt by definition.
pub const MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;

/// An error as recorded: a machine-readable kind and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Dotted kind, e.g. `exec.nonzero_exit`, `timeout`, `http.server_error`.
    pub kind: String,
    /// What happened.
    pub message: String,
}

impl ErrorInfo {
    /// Builds an error.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorInfo {
            kind: kind.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// Something that happened to a run. Variants are only appended, never reordered or changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A run was created, pinned to one definition version.
    RunStarted {
        /// Workflow name.
        workflow: String,
        /// Workflow version.
        version: u32,
        /// Run input as JSON text.
        input: String,
    },
    /// An attempt of a step is about to run; written before any side effect.
    AttemptStarted {
        /// Step id.
        step: String,
        /// Which visit of the step (loops revisit steps), from 1.
        visit: u32,
        /// Attempt number within the visit, from 1.
        attempt: u32,
        /// Idempotency key handed to the action; the same for every attempt of the visit.
        key: String,
    },
    /// An attempt failed; `retry_at_ms` says when the next one runs, `None` means no retry.
    AttemptFailed {
        /// Step id.
        step: String,
        /// Visit.
        visit: u32,
        /// Attempt number.
        attempt: u32,
        /// What went wrong.
        error: ErrorInfo,
        /// Wall-clock time of the next attempt (ms since the Unix epoch).
        retry_at_ms: Option<u64>,
    },
    /// A step finished with an output.
    StepCompleted {
        /// Step id.
        step: String,
        /// Visit.
        visit: u32,
        /// Output as JSON text.
        output: String,
    },
    /// A step failed for good (retries exhausted or a non-retryable error).
    StepFailed {
        /// Step id.
        step: String,
        /// Visit.
        visit: u32,
        /// The final error.
        error: ErrorInfo,
    },
    /// A DAG step was skipped because its condition was false or a dependency was skipped.
    StepSkipped {
        /// Step id.
        step: String,
        /// Why.
        reason: String,
    },
    /// A durable timer was set.
    TimerSet {
        /// Step id.
        step: String,
        /// Visit.
        visit: u32,
        /// Wall-clock deadline (ms since the Unix epoch).
        fire_at_ms: u64,
        /// Requested length, kept so a clock jump cannot stretch the wait beyond it.
        duration_ms: u64,
    },
    /// A durable timer fired.
    TimerFired {
        /// Step id.
        step: String,
        /// Visit.
        visit: u32,
        /// The deadline it was set for.
        fire_at_ms: u64,
    },
    /// The run completed.
    RunCompleted {
        /// Output as JSON text.
        output: String,
    },
    /// The run failed.
    RunFailed {
        /// Why, naming the step.
        error: ErrorInfo,
    },
    /// The run was cancelled.
    RunCancelled {
        /// Who or what asked.
        reason: String,
    },
    /// The run failed and its completed steps' compensations begin, newest first (a saga).
    CompensationStarted {
        /// The failure that started it.
        error: ErrorInfo,
    },
    /// An attempt of a step's compensation is about to run; written before any side effect.
    CompensationAttemptStarted {
        /// The step being compensated.
        step: String,
        /// The visit being compensated.
        visit: u32,
        /// Attempt number, from 1.
        attempt: u32,
        /// Idempotency key of the compensation.
        key: String,
    },
    /// A compensation attempt failed; `retry_at_ms` is `None` when it will not be retried.
    CompensationAttemptFailed {
        /// Step.
        step: String,
        /// Visit.
        visit: u32,
        /// Attempt.
        attempt: u32,
        /// What went wrong.
        error: ErrorInfo,
        /// When the next attempt runs.
        retry_at_ms: Option<u64>,
    },
    /// A step's compensation succeeded.
    StepCompensated {
        /// Step.
        step: String,
        /// Visit.
        visit: u32,
        /// Output as JSON text.
        output: String,
    },
    /// A step's compensation failed for good.
    CompensationFailed {
        /// Step.
        step: String,
        /// Visit.
        visit: u32,
        /// The final error.
        error: ErrorInfo,
    },
    /// The run ended after every compensation succeeded.
    RunCompensated {
        /// The failure that was compensated.
        error: ErrorInfo,
    },
    /// The run ended because a compensation failed.
    RunCompensationFailed {
        /// The step whose compensation failed.
        step: String,
        /// Why it failed.
        error: ErrorInfo,
    },
    /// A signal reached the run (kept until a step consumes it).
    SignalReceived {
        /// Signal name (`approval:STEP` for approvals).
        name: String,
        /// Sender's id; a repeated id is ignored.
        id: String,
        /// Payload as JSON text.
        payload: String,
    },
    /// A step began waiting for a signal or an approval.
    WaitStarted {
        /// Step.
        step: String,
        /// Visit.
        visit: u32,
        /// The signal it waits for.
        signal: String,
        /// Deadline (ms since the Unix epoch), if it has a timeout.
        fire_at_ms: Option<u64>,
        /// Timeout length, kept so a clock jump cannot stretch the wait.
        duration_ms: u64,
    },
    /// An operator resumed a failed run from its failed steps.
    RunRetried {
        /// Who asked.
        by: String,
    },
    /// An operator stopped the run without compensation.
    RunTerminated {
        /// Why.
        reason: String,
    },
    /// The run ended by continuing as a new run with fresh history (bounded history).
    RunContinued {
        /// The new run's id.
        next_run: String,
        /// The new run's input as JSON text.
        input: String,
    },
    /// An attempt is held back because its target's circuit breaker is open.
    AttemptDeferred {
        /// Step.
        step: String,
        /// Visit.
        visit: u32,
        /// The attempt held back.
        attempt: u32,
        /// The target (host, device, bus).
        target: String,
        /// When the attempt may run.
        until_ms: u64,
    },
    /// Who sent the signal journaled just before with this id: a console user, `token:NAME`, or
    /// `local:UNIX_USER` (written in the same batch as its `SignalReceived`).
    SignalFrom {
        /// The signal's id.
        id: String,
        /// Who sent it.
        by: String,
    },
    /// The agent started again (after a crash, a power cut or a restart) and resumed this run
    /// from its history: a marker for people reading it, no effect on the run.
    RunResumed {
        /// Events replayed to resume it.
        replayed: u64,
    },
}

impl Event {
    /// The step this event belongs to, if any.
    pub fn step(&self) -> Option<&str> {
        match self {
            Event::AttemptStarted { step, .. }
            | Event::AttemptFailed { step, .. }
            | Event::StepCompleted { step, .. }
            | Event::StepFailed { step, .. }
            | Event::StepSkipped { step, .. }
            | Event::TimerSet { step, .. }
            | Event::TimerFired { step, .. }
            | Event::CompensationAttemptStarted { step, .. }
            | Event::CompensationAttemptFailed { step, .. }
            | Event::StepCompensated { step, .. }
            | Event::CompensationFailed { step, .. }
            | Event::RunCompensationFailed { step, .. }
            | Event::WaitStarted { step, .. }
            | Event::AttemptDeferred { step, .. } => Some(step),
            _ => None,
        }
    }

    /// The visit of the step this event runs (compensations refer to a visit but do not run it).
    pub fn visit(&self) -> Option<u32> {
        match self {
            Event::AttemptStarted { visit, .. }
            | Event::AttemptFailed { visit, .. }
            | Event::StepCompleted { visit, .. }
            | Event::StepFailed { visit, .. }
            | Event::TimerSet { visit, .. }
            | Event::TimerFired { visit, .. }
            | Event::WaitStarted { visit, .. }
            | Event::AttemptDeferred { visit, .. } => Some(*visit),
            _ => None,
        }
    }

    /// True for the events that end a run.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::RunCompleted { .. }
                | Event::RunFailed { .. }
                | Event::RunCancelled { .. }
                | Event::RunCompensated { .. }
                | Event::RunCompensationFailed { .. }
                | Event::RunTerminated { .. }
                | Event::RunContinued { .. }
        )
    }

    /// A short snake_case name, for tables and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Event::RunStarted { .. } => "run_started",
            Event::AttemptStarted { .. } => "attempt_started",
            Event::AttemptFailed { .. } => "attempt_failed",
            Event::StepCompleted { .. } => "step_completed",
            Event::StepFailed { .. } => "step_failed",
            Event::StepSkipped { .. } => "step_skipped",
            Event::TimerSet { .. } => "timer_set",
            Event::TimerFired { .. } => "timer_fired",
            Event::RunCompleted { .. } => "run_completed",
            Event::RunFailed { .. } => "run_failed",
            Event::RunCancelled { .. } => "run_cancelled",
            Event::CompensationStarted { .. } => "compensation_started",
            Event::CompensationAttemptStarted { .. } => "compensation_attempt_started",
            Event::CompensationAttemptFailed { .. } => "compensation_attempt_failed",
            Event::StepCompensated { .. } => "step_compensated",
            Event::CompensationFailed { .. } => "compensation_failed",
            Event::RunCompensated { .. } => "run_compensated",
            Event::RunCompensationFailed { .. } => "run_compensation_failed",
            Event::SignalReceived { .. } => "signal_received",
            Event::WaitStarted { .. } => "wait_started",
            Event::RunRetried { .. } => "run_retried",
            Event::RunTerminated { .. } => "run_terminated",
            Event::RunContinued { .. } => "run_continued",
            Event::AttemptDeferred { .. } => "attempt_deferred",
            Event::SignalFrom { .. } => "signal_from",
            Event::RunResumed { .. } => "run_resumed",
        }
    }
}

/// Version 1 of a journal record: one event of one run, with its wall-clock time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordV1 {
    /// The run.
    pub run_id: String,
    /// Wall-clock time the event was recorded (ms since the Unix epoch).
    pub at_ms: u64,
    /// What happened.
    pub event: Event,
}

/// Latest time RFC 3339 can write (its years have four digits): 9999-12-31T23:59:59.999Z.
pub const MAX_RFC3339_MS: u64 = 253_402_300_799_999;

/// RFC 3339 text (UTC, milliseconds) of a wall-clock time in ms since the Unix epoch. Times past
/// the year 9999 (a `sleep: 8000y` deadline is valid) are written as [`MAX_RFC3339_MS`].
pub fn rfc3339(ms: u64) -> String {
    let ms = ms.min(MAX_RFC3339_MS);
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// Text fields longer than this are elided by [`elide_large`].
pub const MAX_SYNCED_FIELD_BYTES: usize = 16 * 1024;

/// Replaces every payload of `event` longer than `limit` bytes with a marker carrying its length
/// and SHA-256, so that an event too large for one sync message still syncs with its kind, its
/// step and its digest (the full payload stays in the device's journal). JSON payloads become
/// `{"outpost_elided": {"bytes": N, "sha256": "…"}}`, which is still JSON; texts become
/// `[elided: N bytes, sha256 …]`. Returns whether anything was elided.
pub fn elide_large(event: &mut Event, limit: usize) -> bool {
    fn digest(s: &str) -> String {
        ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
    let json = |s: &mut String| {
        if s.len() <= limit {
            return false;
        }
        *s = serde_json::json!({"outpost_elided": {"bytes": s.len(), "sha256": digest(s)}}).to_string();
        true
    };
    let text = |s: &mut String| {
        if s.len() <= limit {
            return false;
        }
        *s = format!("[elided: {} bytes, sha256 {}]", s.len(), digest(s));
        true
    };
    let error = |e: &mut ErrorInfo| text(&mut e.message) | text(&mut e.kind);
    match event {
        Event::RunStarted { input, .. } | Event::RunContinued { input, .. } => json(input),
        Event::StepCompleted { output, .. }
        | Event::RunCompleted { output }
        | Event::StepCompensated { output, .. } => json(output),
        Event::SignalReceived { payload, .. } => json(payload),
        Event::AttemptFailed { error: e, .. }
        | Event::StepFailed { error: e, .. }
        | Event::RunFailed { error: e }
        | Event::CompensationStarted { error: e }
        | Event::CompensationAttemptFailed { error: e, .. }
        | Event::CompensationFailed { error: e, .. }
        | Event::RunCompensated { error: e }
        | Event::RunCompensationFailed { error: e, .. } => error(e),
        Event::StepSkipped { reason, .. } | Event::RunCancelled { reason } | Event::RunTerminated { reason } => {
            text(reason)
        }
        _ => false,
    }
}

/// Records larger than this are shrunk by [`for_sync`] before they go on the wire.
pub const MAX_SYNCED_RECORD_BYTES: usize = 320 * 1024;

/// A journal record's bytes as sent to the cloud: unchanged when it is at most
/// [`MAX_SYNCED_RECORD_BYTES`], otherwise with its large payloads elided ([`elide_large`]).
/// An undecodable record goes as it is, cut to the limit: the cloud quarantines it.
pub fn for_sync(raw: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use std::borrow::Cow;
    if raw.len() <= MAX_SYNCED_RECORD_BYTES {
        return Cow::Borrowed(raw);
    }
    match decode(raw) {
        Ok(mut r) => {
            elide_large(&mut r.event, MAX_SYNCED_FIELD_BYTES);
            Cow::Owned(encode(&r))
        }
        Err(_) => Cow::Borrowed(raw.get(..MAX_SYNCED_RECORD_BYTES).unwrap_or(raw)),
    }
}

/// One event as shown to people and APIs: `{"seq", "at", "type", …fields}`, with JSON payloads
/// (input, output, signal payload) parsed rather than quoted.
pub fn history_row(seq: u64, r: &Record) -> serde_json::Value {
    use serde_json::Value;
    // Event serialises as {"Variant": {fields}}; flatten to {"type": ..., fields}.
    let mut fields = match serde_json::to_value(&r.event) {
        Ok(Value::Object(m)) => match m.into_iter().next() {
            Some((_, Value::Object(f))) => f,
            _ => serde_json::Map::new(),
        },
        _ => serde_json::Map::new(),
    };
    for k in ["input", "output", "payload"] {
        if let Some(Value::String(s)) = fields.get(k)
            && let Ok(v) = serde_json::from_str::<Value>(s)
        {
            fields.insert(k.to_string(), v);
        }
    }
    // The API speaks RFC 3339 for points in time (durations stay `_ms` numbers).
    for (ms_key, key) in [
        ("fire_at_ms", "fire_at"),
        ("retry_at_ms", "retry_at"),
        ("until_ms", "until"),
    ] {
        if let Some(v) = fields.remove(ms_key) {
            fields.insert(key.into(), v.as_u64().map_or(Value::Null, |ms| rfc3339(ms).into()));
        }
    }
    fields.insert("seq".into(), seq.into());
    fields.insert("at".into(), rfc3339(r.at_ms).into());
    fields.insert("type".into(), r.event.name().into());
    Value::Object(fields)
}

/// The current record version.
pub type Record = RecordV1;

/// The versioned envelope; the postcard variant index is the format version.
#[derive(Serialize, Deserialize)]
enum Envelope {
    V1(RecordV1),
}

#[derive(Serialize)]
enum EnvelopeRef<'a> {
    V1(&'a RecordV1),
}

/// Why bytes are not a record.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes do not decode.
    #[error("corrupt journal record ({len} bytes): {source}")]
    Corrupt {
        /// Length of the bytes.
        len: usize,
        /// Postcard's reason.
        source: postcard::Error,
    },
    /// Larger than [`MAX_RECORD_BYTES`].
    #[error("journal record of {0} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge(usize),
}

/// Encodes a record in the current format.
pub fn encode(record: &Record) -> Vec<u8> {
    // Serialising owned strings and integers into a Vec cannot fail.
    postcard::to_allocvec(&EnvelopeRef::V1(record)).unwrap_or_default()
}

/// Decodes a record of any known version.
pub fn decode(bytes: &[u8]) -> Result<Record, CodecError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    match postcard::from_bytes::<Envelope>(bytes) {
        Ok(Envelope::V1(r)) => Ok(r),
        Err(source) => Err(CodecError::Corrupt {
            len: bytes.len(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_error() -> impl Strategy<Value = ErrorInfo> {
        (".{0,12}", ".{0,40}").prop_map(|(k, m)| ErrorInfo::new(k, m))
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        let s = ".{0,16}";
        prop_oneof![
            (s, any::<u32>(), s).prop_map(|(w, v, i)| Event::RunStarted {
                workflow: w,
                version: v,
                input: i
            }),
            (s, any::<u32>(), any::<u32>(), s).prop_map(|(st, v, a, k)| Event::AttemptStarted {
                step: st,
                visit: v,
                attempt: a,
                key: k
            }),
            (s, any::<u32>(), any::<u32>(), arb_error(), any::<Option<u64>>()).prop_map(|(st, v, a, e, r)| {
                Event::AttemptFailed {
                    step: st,
                    visit: v,
                    attempt: a,
                    error: e,
                    retry_at_ms: r,
                }
            }),
            (s, any::<u32>(), s).prop_map(|(st, v, o)| Event::StepCompleted {
                step: st,
                visit: v,
                output: o
            }),
            (s, any::<u32>(), arb_error()).prop_map(|(st, v, e)| Event::StepFailed {
                step: st,
                visit: v,
                error: e
            }),
            (s, s).prop_map(|(st, r)| Event::StepSkipped { step: st, reason: r }),
            (s, any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(st, v, f, d)| Event::TimerSet {
                step: st,
                visit: v,
                fire_at_ms: f,
                duration_ms: d
            }),
            (s, any::<u32>(), any::<u64>()).prop_map(|(st, v, f)| Event::TimerFired {
                step: st,
                visit: v,
                fire_at_ms: f
            }),
            s.prop_map(|o| Event::RunCompleted { output: o }),
            arb_error().prop_map(|e| Event::RunFailed { error: e }),
            s.prop_map(|r| Event::RunCancelled { reason: r }),
            arb_error().prop_map(|e| Event::CompensationStarted { error: e }),
            (s, any::<u32>(), any::<u32>(), s).prop_map(|(st, v, a, k)| Event::CompensationAttemptStarted {
                step: st,
                visit: v,
                attempt: a,
                key: k
            }),
            (s, any::<u32>(), any::<u32>(), arb_error(), any::<Option<u64>>()).prop_map(|(st, v, a, e, r)| {
                Event::CompensationAttemptFailed {
                    step: st,
                    visit: v,
                    attempt: a,
                    error: e,
                    retry_at_ms: r,
                }
            }),
            (s, any::<u32>(), s).prop_map(|(st, v, o)| Event::StepCompensated {
                step: st,
                visit: v,
                output: o
            }),
            (s, any::<u32>(), arb_error()).prop_map(|(st, v, e)| Event::CompensationFailed {
                step: st,
                visit: v,
                error: e
            }),
            arb_error().prop_map(|e| Event::RunCompensated { error: e }),
            (s, arb_error()).prop_map(|(st, e)| Event::RunCompensationFailed { step: st, error: e }),
            (s, s, s).prop_map(|(n, i, p)| Event::SignalReceived {
                name: n,
                id: i,
                payload: p
            }),
            (s, any::<u32>(), s, any::<Option<u64>>(), any::<u64>()).prop_map(|(st, v, n, f, d)| {
                Event::WaitStarted {
                    step: st,
                    visit: v,
                    signal: n,
                    fire_at_ms: f,
                    duration_ms: d,
                }
            }),
            s.prop_map(|b| Event::RunRetried { by: b }),
            s.prop_map(|r| Event::RunTerminated { reason: r }),
            (s, s).prop_map(|(n, i)| Event::RunContinued { next_run: n, input: i }),
            (s, any::<u32>(), any::<u32>(), s, any::<u64>()).prop_map(|(st, v, a, t, u)| Event::AttemptDeferred {
                step: st,
                visit: v,
                attempt: a,
                target: t,
                until_ms: u
            }),
            (s, s).prop_map(|(i, b)| Event::SignalFrom { id: i, by: b }),
        ]
    }

    proptest! {
        #[test]
        fn roundtrip(run_id in ".{0,24}", at_ms in any::<u64>(), event in arb_event()) {
            let r = Record { run_id, at_ms, event };
            prop_assert_eq!(decode(&encode(&r)).unwrap(), r);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn times_past_year_9999_are_written_as_its_last_millisecond() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(MAX_RFC3339_MS), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn large_records_sync_with_their_digest() {
        let big = serde_json::json!({"blob": "x".repeat(600 * 1024)}).to_string();
        let r = Record {
            run_id: "r1".into(),
            at_ms: 5,
            event: Event::StepCompleted {
                step: "read".into(),
                visit: 1,
                output: big.clone(),
            },
        };
        let raw = encode(&r);
        let wire = for_sync(&raw);
        assert!(wire.len() < 1024, "{}", wire.len());
        let back = decode(&wire).unwrap();
        let Event::StepCompleted { step, output, .. } = back.event else {
            panic!("kind kept")
        };
        assert_eq!(step, "read");
        let v: serde_json::Value = serde_json::from_str(&output).unwrap();
        assert_eq!(v["outpost_elided"]["bytes"], big.len());
        assert_eq!(v["outpost_elided"]["sha256"].as_str().unwrap().len(), 64);
        let small = encode(&Record {
            run_id: "r1".into(),
            at_ms: 5,
            event: Event::RunCancelled { reason: "x".into() },
        });
        assert!(matches!(for_sync(&small), std::borrow::Cow::Borrowed(_)));
        let garbage = vec![0xffu8; MAX_SYNCED_RECORD_BYTES * 2];
        assert_eq!(for_sync(&garbage).len(), MAX_SYNCED_RECORD_BYTES);
    }

    #[test]
    fn unknown_version_is_rejected() {
        let r = Record {
            run_id: "r".into(),
            at_ms: 1,
            event: Event::RunCancelled { reason: "x".into() },
        };
        let mut bytes = encode(&r);
        bytes[0] = 7;
        assert!(matches!(decode(&bytes), Err(CodecError::Corrupt { .. })));
    }
}
