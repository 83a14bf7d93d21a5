//! The README's quickstart command and the examples run as documented.

use outpost_tests::outpost_command;
use serde_json::Value;

fn run_once(workflow: &str, file: &str, input: &str) -> (Option<i32>, Value) {
    let dir = tempfile::tempdir().unwrap();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/");
    let out = outpost_command()
        .args(["run", "--data-dir"])
        .arg(dir.path())
        .args(
            file.split(',')
                .flat_map(|f| ["--apply".to_string(), format!("{examples}{f}")]),
        )
        .args(["--start", workflow, "--input", input, "--once"])
        .output()
        .expect("run outpost");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let v = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), v)
}

#[test]
fn quickstart_oven_cooling_vents_twice_then_completes() {
    let (code, v) = run_once("oven-cooling", "oven-cooling.yaml", r#"{"start_celsius": 110}"#);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["output"], serde_json::json!({"celsius": 80, "vents": 2}));
}

#[test]
fn oven_too_hot_raises_the_alarm_and_exits_6() {
    let (code, v) = run_once("oven-cooling", "oven-cooling.yaml", r#"{"start_celsius": 200}"#);
    assert_eq!(code, Some(6), "{v}");
    assert_eq!(v["status"], "failed");
    assert!(v["error"]["message"].as_str().unwrap().contains("oven.overheat"), "{v}");
}

#[test]
fn hello_and_flaky_retry_complete() {
    let (code, v) = run_once("hello", "hello.yaml", r#"{"name": "Ada"}"#);
    assert_eq!((code, &v["status"]), (Some(0), &Value::from("completed")), "{v}");
    assert!(v["output"]["text"].as_str().unwrap().starts_with("Hello, Ada, it is "));
    let (code, v) = run_once("flaky-retry", "flaky-retry.yaml", "{}");
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["output"], serde_json::json!({"setpoint": 42}));
}

#[test]
fn trip_saga_undoes_the_flight_when_the_hotel_is_full() {
    let (code, v) = run_once("trip-saga", "trip-saga.yaml", "{}");
    assert_eq!(code, Some(6), "{v}");
    assert_eq!(v["status"], "compensated", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("no rooms left"), "{v}");
}

#[test]
fn line_batches_maps_over_child_workflows_in_order() {
    let input =
        r#"{"batches": [{"recipe": "rye", "kg": 40}, {"recipe": "spelt", "kg": 25}, {"recipe": "oat", "kg": 5}]}"#;
    let (code, v) = run_once("line-batches", "batch.yaml,line-batches.yaml", input);
    assert_eq!(code, Some(0), "{v}");
    let made: Vec<&str> = v["output"]["made"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["recipe"].as_str().unwrap())
        .collect();
    assert_eq!(made, ["rye", "spelt", "oat"], "{v}");
}

#[test]
fn every_example_validates() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/");
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = outpost_command().arg("validate").arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
