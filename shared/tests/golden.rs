//! Pins the journal's on-disk bytes: a change to the record format fails here first.
//! If the change is intended, it needs a new envelope version, not a new golden file.

use outpost_shared::journal::{self, ErrorInfo, Event, Record};

fn sample() -> Vec<Record> {
    let ev = |at_ms, event| Record {
        run_id: "run-1".into(),
        at_ms,
        event,
    };
    vec![
        ev(
            1_700_000_000_000,
            Event::RunStarted {
                workflow: "oven".into(),
                version: 3,
                input: r#"{"limit":80}"#.into(),
            },
        ),
        ev(
            1_700_000_000_001,
            Event::AttemptStarted {
                step: "read".into(),
                visit: 1,
                attempt: 1,
                key: "run-1/read/1".into(),
            },
        ),
        ev(
            1_700_000_000_002,
            Event::AttemptFailed {
                step: "read".into(),
                visit: 1,
                attempt: 1,
                error: ErrorInfo::new("timeout", "after 5s"),
                retry_at_ms: Some(1_700_000_001_002),
            },
        ),
        ev(
            1_700_000_000_003,
            Event::StepCompleted {
                step: "read".into(),
                visit: 1,
                output: r#"{"celsius":85}"#.into(),
            },
        ),
        ev(
            1_700_000_000_004,
            Event::StepFailed {
                step: "vent".into(),
                visit: 2,
                error: ErrorInfo::new("exec.nonzero_exit", "exit 1"),
            },
        ),
        ev(
            1_700_000_000_005,
            Event::StepSkipped {
                step: "alarm".into(),
                reason: "when was false".into(),
            },
        ),
        ev(
            1_700_000_000_006,
            Event::TimerSet {
                step: "wait".into(),
                visit: 1,
                fire_at_ms: 1_700_000_030_006,
                duration_ms: 30_000,
            },
        ),
        ev(
            1_700_000_000_007,
            Event::TimerFired {
                step: "wait".into(),
                visit: 1,
                fire_at_ms: 1_700_000_030_006,
            },
        ),
        ev(1_700_000_000_008, Event::RunCompleted { output: "null".into() }),
        ev(
            1_700_000_000_009,
            Event::RunFailed {
                error: ErrorInfo::new("step_failed", "vent"),
            },
        ),
        ev(
            1_700_000_000_010,
            Event::RunCancelled {
                reason: "operator".into(),
            },
        ),
        ev(
            1_700_000_000_011,
            Event::CompensationStarted {
                error: ErrorInfo::new("step_failed", "hotel"),
            },
        ),
        ev(
            1_700_000_000_012,
            Event::CompensationAttemptStarted {
                step: "flight".into(),
                visit: 1,
                attempt: 1,
                key: "run-1/flight/1/compensate".into(),
            },
        ),
        ev(
            1_700_000_000_013,
            Event::CompensationAttemptFailed {
                step: "flight".into(),
                visit: 1,
                attempt: 1,
                error: ErrorInfo::new("timeout", "after 5s"),
                retry_at_ms: Some(1_700_000_001_013),
            },
        ),
        ev(
            1_700_000_000_014,
            Event::StepCompensated {
                step: "flight".into(),
                visit: 1,
                output: "null".into(),
            },
        ),
        ev(
            1_700_000_000_015,
            Event::CompensationFailed {
                step: "card".into(),
                visit: 1,
                error: ErrorInfo::new("http.server_error", "503"),
            },
        ),
        ev(
            1_700_000_000_016,
            Event::RunCompensated {
                error: ErrorInfo::new("step_failed", "hotel"),
            },
        ),
        ev(
            1_700_000_000_017,
            Event::RunCompensationFailed {
                step: "card".into(),
                error: ErrorInfo::new("http.server_error", "503"),
            },
        ),
        ev(
            1_700_000_000_018,
            Event::SignalReceived {
                name: "go".into(),
                id: "sig-1".into(),
                payload: r#"{"lot":7}"#.into(),
            },
        ),
        ev(
            1_700_000_000_019,
            Event::WaitStarted {
                step: "gate".into(),
                visit: 1,
                signal: "approval:gate".into(),
                fire_at_ms: Some(1_700_000_060_019),
                duration_ms: 60_000,
            },
        ),
        ev(1_700_000_000_020, Event::RunRetried { by: "alice".into() }),
        ev(
            1_700_000_000_021,
            Event::RunTerminated {
                reason: "operator".into(),
            },
        ),
        ev(
            1_700_000_000_022,
            Event::RunContinued {
                next_run: "run-1~2".into(),
                input: "{}".into(),
            },
        ),
        ev(
            1_700_000_000_023,
            Event::AttemptDeferred {
                step: "read".into(),
                visit: 1,
                attempt: 2,
                target: "plc-1".into(),
                until_ms: 1_700_000_010_023,
            },
        ),
        ev(
            1_700_000_000_024,
            Event::SignalFrom {
                id: "s-1".into(),
                by: "alice".into(),
            },
        ),
        ev(1_700_000_000_025, Event::RunResumed { replayed: 12 }),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn journal_v1_golden_bytes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/journal_v1.hex");
    let actual: String = sample().iter().map(|r| hex(&journal::encode(r)) + "\n").collect();
    if std::env::var_os("OUTPOST_BLESS").is_some() {
        std::fs::write(path, &actual).expect("write golden file");
    }
    let expected = std::fs::read_to_string(path).expect("golden file is checked in");
    assert_eq!(
        actual, expected,
        "journal record bytes changed: add an envelope version instead"
    );

    // Old bytes must keep decoding to the same values.
    for (line, record) in expected.lines().zip(sample()) {
        let bytes: Vec<u8> = (0..line.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&line[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(journal::decode(&bytes).unwrap(), record);
    }
}
