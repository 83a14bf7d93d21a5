//! The first hour's papercuts: what a new user's plausible mistakes get from the CLI, with the
//! same exit code for the same condition in every command.

use std::process::{Output, Stdio};
use std::time::Duration;

use outpost_tests::{Agent, eventually, outpost_command, write};

const HELLO: &str = r#"
name: hello
version: 1
steps:
  - id: greet
    action: set
    args: {greeting: "hello {{ input.name }}"}
"#;

const GATE: &str = r#"
name: gate
version: 1
kind: state_machine
steps:
  - id: lot
    action: wait_signal
    args: {signal: lot-ready}
    next: release
  - id: release
    action: approval
    next: done
  - id: done
    action: set
    args: {ok: true}
    end: succeed
"#;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn reusing_a_run_id_with_another_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &[]);
    let file = write(dir.path(), "hello.yaml", HELLO);
    assert!(agent.cli(&["apply", &file]).status.success());

    let first = agent.cli(&["start", "hello", "--input", r#"{"name": "Ada"}"#, "--id", "greet-1"]);
    assert!(first.status.success(), "{}", text(&first));
    assert_eq!(String::from_utf8_lossy(&first.stdout).trim(), "greet-1");

    // The same start again is the safe retry it is meant to be, and says so.
    let again = agent.cli(&["start", "hello", "--input", r#"{"name":"Ada"}"#, "--id", "greet-1"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("already existed, same input"), "{}", text(&again));

    let other = agent.cli(&["start", "hello", "--input", r#"{"name": "Bob"}"#, "--id", "greet-1"]);
    assert_eq!(other.status.code(), Some(7), "{}", text(&other));
    let msg = text(&other);
    assert!(msg.contains("greet-1") && msg.contains("different input"), "{msg}");

    // Nothing new was started: the run still has Ada's input.
    let run = agent.json(&["show", "greet-1"]);
    assert_eq!(run["input"]["name"], "Ada");
    assert_eq!(agent.json(&["list"]).as_array().map(Vec::len), Some(1));
}

#[test]
fn a_signal_no_step_waits_for_warns_and_strict_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &[]);
    let file = write(dir.path(), "gate.yaml", GATE);
    assert!(agent.cli(&["apply", &file]).status.success());
    assert!(agent.cli(&["start", "gate", "--id", "g1"]).status.success());

    let strict = agent.cli(&["signal", "g1", "lot-raedy", "--strict"]);
    assert_eq!(strict.status.code(), Some(3), "{}", text(&strict));
    assert!(text(&strict).contains("it can receive: lot-ready"), "{}", text(&strict));
    let run = agent.json(&["show", "g1", "--history"]);
    assert!(
        !run.to_string().contains("lot-raedy"),
        "a refused signal was journaled: {run}"
    );

    let typo = agent.cli(&["signal", "g1", "lot-raedy"]);
    assert!(typo.status.success(), "{}", text(&typo));
    let err = String::from_utf8_lossy(&typo.stderr);
    assert!(
        err.contains("warning") && err.contains("lot-raedy") && err.contains("lot-ready"),
        "{err}"
    );

    let right = agent.cli(&["signal", "g1", "lot-ready", "--strict"]);
    assert!(right.status.success(), "{}", text(&right));
    assert!(
        !String::from_utf8_lossy(&right.stderr).contains("warning"),
        "{}",
        text(&right)
    );
}

#[test]
fn the_same_condition_gets_the_same_exit_code_in_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &[]);
    let file = write(dir.path(), "hello.yaml", HELLO);
    assert!(agent.cli(&["apply", &file]).status.success());
    let done = agent.cli(&[
        "start",
        "hello",
        "--id",
        "h1",
        "--input",
        r#"{"name": "Ada"}"#,
        "--wait",
    ]);
    assert!(done.status.success(), "{}", text(&done));

    // A finished run: conflict (7) for retry and approve alike.
    let retry = agent.cli(&["retry", "h1"]);
    assert_eq!(retry.status.code(), Some(7), "retry: {}", text(&retry));
    let approve = agent.cli(&["approve", "h1", "greet"]);
    assert_eq!(approve.status.code(), Some(7), "approve: {}", text(&approve));

    // An unknown workflow: not found (4) for `start` and for `run --start`, which also stops
    // instead of running on with a run that never began.
    let start = agent.cli(&["start", "nosuch"]);
    assert_eq!(start.status.code(), Some(4), "start: {}", text(&start));
    drop(agent);
    let other = tempfile::tempdir().unwrap();
    let mut daemon = outpost_command()
        .args(["run", "--start", "nosuch", "--data-dir"])
        .arg(other.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let code = eventually(Duration::from_secs(30), "run --start nosuch to exit", || {
        daemon.try_wait().ok().flatten()
    });
    let out = daemon.wait_with_output().unwrap();
    assert_eq!(code.code(), Some(4), "run --start: {}", text(&out));
    assert!(text(&out).contains("'nosuch' is not defined"), "{}", text(&out));
}

#[test]
fn apply_json_reports_every_bad_file_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &[]);
    let good = write(dir.path(), "hello.yaml", HELLO);
    let bad = write(
        dir.path(),
        "bad.yaml",
        "name: bad\nversion: 1\nsteps:\n  - {id: a, action: teleport}\n  - {id: a, action: set}\n",
    );
    let out = agent.cli(&["apply", &bad, &good, "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let items = v.as_array().expect("an array, one item per file");
    assert_eq!(items.len(), 2, "{v}");
    assert_eq!(items[0]["ok"], false);
    assert_eq!(items[0]["file"], bad.as_str());
    assert!(items[0]["problems"].as_array().is_some_and(|p| p.len() >= 2), "{v}");
    assert_eq!(items[1]["ok"], true);
    assert_eq!(items[1]["name"], "hello");
}

const STEPS: &str = r#"
name: steps
version: 1
steps:
  - id: first
    action: set
    args: {n: 1}
  - id: nap
    action: sleep
    args: {duration: 1s}
    depends_on: [first]
  - id: last
    action: set
    args: {n: 2}
    depends_on: [nap]
"#;

#[test]
fn start_wait_prints_the_id_at_once_then_each_step_and_show_follow_streams() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), &[]);
    let file = write(dir.path(), "steps.yaml", STEPS);
    assert!(agent.cli(&["apply", &file]).status.success());

    let out = agent.cli(&["start", "steps", "--id", "s1", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("run s1 started (steps v1)")),
        "{err}"
    );
    for want in ["step first completed", "step nap sleeping", "step last completed"] {
        assert!(lines.iter().any(|l| l.ends_with(want)), "no '{want}' in:\n{err}");
    }
    // stdout still carries just the result, for scripts.
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("run s1 completed"),
        "{}",
        text(&out)
    );

    assert!(agent.cli(&["start", "steps", "--id", "s2"]).status.success());
    let out = agent.cli(&["show", "s2", "--follow"]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("step last completed"), "{shown}");
    assert!(
        shown.trim_end().ends_with("output: {\"n\":2}") || shown.contains("run s2 completed"),
        "{shown}"
    );
}

#[test]
fn human_status_has_a_line_per_subsystem_with_the_sync_link_and_its_last_error() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: the link stays down and says why.
    let agent = Agent::start(dir.path(), &["--broker", "mqtt://127.0.0.1:1", "--device-id", "gw-s"]);
    let file = write(dir.path(), "hello.yaml", HELLO);
    assert!(agent.cli(&["apply", &file]).status.success());
    let out = eventually(Duration::from_secs(20), "status to show the last sync error", || {
        let out = agent.cli(&["status"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("last error")
            .then_some(out)
    });
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    for subsystem in ["journal:", "sync:", "triggers:", "equipment:", "timers:"] {
        assert!(
            shown.lines().any(|l| l.starts_with(subsystem)),
            "no {subsystem} line:\n{shown}"
        );
    }
    let sync = shown.lines().find(|l| l.starts_with("sync:")).unwrap_or_default();
    assert!(
        sync.contains("DISCONNECTED from 127.0.0.1:1")
            && sync.contains("acknowledged through seq")
            && sync.contains("backlog"),
        "{sync}"
    );
}

#[test]
fn deployments_are_listed_an_offline_device_can_be_removed_and_the_api_describes_itself() {
    use outpost_tests::cloud::{Cloud, http};
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let mut agent = Agent::start(
        &dir.path().join("agent"),
        &["--broker", &cloud.mqtt_url(), "--device-id", "gw-rm"],
    );
    cloud.wait_presence("gw-rm", true, Duration::from_secs(30));
    let (code, d) = cloud.send(
        "POST",
        "/v1/deployments",
        &json!({"document": HELLO, "devices": ["gw-rm"]}),
    );
    assert_eq!(code, 201, "{d}");
    let listed = eventually(
        Duration::from_secs(20),
        "the deployment to be listed as applied",
        || {
            let list = cloud.get("/v1/deployments");
            (list[0]["counts"]["applied"] == 1).then_some(list)
        },
    );
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"], d["id"], "{listed}");
    assert_eq!(listed[0]["workflow"], "hello");
    assert!(
        listed[0]["created_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "created_at is RFC 3339: {listed}"
    );

    let start = json!({"type": "start", "workflow": "hello", "input": {"name": "x"}, "id": "c1", "run_id": "hello-1"});
    assert_eq!(cloud.send("POST", "/v1/devices/gw-rm/commands", &start).0, 202);
    eventually(Duration::from_secs(20), "the run to be mirrored", || {
        let (_, r) = http("GET", cloud.api, "/v1/devices/gw-rm/runs/hello-1", None).ok()?;
        (r["status"] == "completed").then_some(())
    });

    // An idle online device is still seen: its broker session stands for it.
    let seen = |cloud: &Cloud| outpost_tests::ts_ms(&cloud.device("gw-rm").unwrap()["last_seen"]);
    let before = seen(&cloud);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(seen(&cloud) >= before + 1000, "last_seen stood still while online");

    // Online: refused, it would come straight back with a history the store forgot.
    let (code, v) = http("DELETE", cloud.api, "/v1/devices/gw-rm", None).unwrap();
    assert_eq!(code, 409, "{v}");
    assert!(v.to_string().contains("is online"), "{v}");
    agent.stop();
    cloud.wait_presence("gw-rm", false, Duration::from_secs(30));
    let (code, v) = http("DELETE", cloud.api, "/v1/devices/gw-rm", None).unwrap();
    assert_eq!(code, 200, "{v}");
    assert!(v["events"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert!(cloud.device("gw-rm").is_none(), "still listed after removal");
    let (code, runs) = http("GET", cloud.api, "/v1/devices/gw-rm/runs", None).unwrap();
    assert_eq!((code, runs.clone()), (200, json!([])), "{runs}");
    let (code, _) = http("DELETE", cloud.api, "/v1/devices/gw-rm", None).unwrap();
    assert_eq!(code, 404, "a second removal finds nothing");
    let audit = outpost_tests::cloud::http_text(cloud.api, "/v1/audit");
    assert!(audit.contains("\"remove_device\""), "{audit}");
    // The API describes itself, to anyone (no token).
    let (code, doc) =
        outpost_tests::cloud::http_raw("GET", cloud.api, "/v1/openapi.json", None, "", "application/json").unwrap();
    assert_eq!(code, 200, "{doc}");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{doc}");
    assert!(doc["paths"]["/v1/deployments"]["get"].is_object(), "{doc}");
}

#[test]
fn list_and_show_read_the_journal_offline_and_piped_tables_are_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), &[]);
    agent.json(&["apply", &write(dir.path(), "hello.yaml", HELLO)]);
    let name = "Ada ".repeat(30);
    let input = serde_json::json!({"name": name}).to_string();
    let out = agent.cli(&["start", "hello", "--id", "long-1", "--input", &input, "--wait"]);
    assert!(out.status.success(), "{}", text(&out));

    // Piped (as here): the 120-character greeting is printed whole, in every table format.
    for format in [&[][..], &["-o", "wide"][..], &["-o", "table"][..]] {
        let mut args = vec!["show", "long-1"];
        args.extend_from_slice(format);
        let shown = agent.cli(&args);
        let t = text(&shown);
        assert!(t.contains(&format!("hello {name}")), "{format:?}: {t}");
        assert!(!t.contains('…'), "{format:?}: {t}");
    }
    let listed = agent.cli(&["list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("-o json is JSON");
    assert_eq!(v[0]["run_id"], "long-1", "{v}");

    // While the agent runs, it owns the file: --offline says to ask it.
    let busy = agent.cli(&["list", "--offline"]);
    assert_eq!(busy.status.code(), Some(9), "{}", text(&busy));
    assert!(text(&busy).contains("drop --offline"), "{}", text(&busy));

    // Stopped: the journal is read as the agent would answer.
    let online_view = agent.json(&["show", "long-1"]);
    agent.stop();
    let offline = agent.json(&["list", "--offline"]);
    assert_eq!(offline[0]["run_id"], "long-1", "{offline}");
    assert_eq!(offline[0]["status"], "completed", "{offline}");
    let shown = agent.json(&["show", "long-1", "--offline"]);
    for key in ["status", "input", "output", "steps", "history", "events"] {
        assert_eq!(shown[key], online_view[key], "{key} differs offline");
    }
    let human = agent.cli(&["show", "long-1", "--offline", "--history"]);
    assert!(
        human.status.success() && text(&human).contains("completed"),
        "{}",
        text(&human)
    );
    let missing = agent.cli(&["show", "nosuch", "--offline"]);
    assert_eq!(missing.status.code(), Some(4), "{}", text(&missing));
    // Nothing was written: the agent starts on the same journal as before.
    let mut again = Agent::start(dir.path(), &[]);
    assert_eq!(again.json(&["show", "long-1"])["events"], online_view["events"]);
    // Killed (power cut): the file needs a repair only the agent may do; --offline reads a
    // repaired copy and leaves the file as it was.
    again.kill9();
    let file = dir.path().join("journal.redb");
    let before = std::fs::read(&file).unwrap();
    let after_crash = again.cli(&["list", "--offline", "--json"]);
    assert!(after_crash.status.success(), "{}", text(&after_crash));
    let v: serde_json::Value = serde_json::from_slice(&after_crash.stdout).unwrap();
    assert_eq!(v[0]["run_id"], "long-1", "{v}");
    assert!(
        text(&after_crash).contains("not closed cleanly") && text(&after_crash).contains("repaired copy"),
        "{}",
        text(&after_crash)
    );
    assert!(
        std::fs::read(&file).unwrap() == before,
        "--offline wrote to the journal"
    );
    let empty = tempfile::tempdir().unwrap();
    let none = outpost_command()
        .args(["list", "--offline", "--data-dir"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(
        text(&none).contains("journal.redb") && text(&none).contains("does not exist"),
        "{}",
        text(&none)
    );
}

#[test]
fn the_benchmark_runs_both_workloads_and_counts_every_byte_including_the_index_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let out = outpost_command()
        .args(["bench", "--runs", "40", "--concurrency", "8", "--json", "--dir"])
        .arg(dir.path().join("bench"))
        .output()
        .expect("outpost bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for w in ["W1", "W2"] {
        let bytes = v[format!("{w} bytes written per durable step")]
            .as_str()
            .unwrap_or_default();
        assert!(bytes.ends_with("per commit)"), "{w}: {v}");
        assert!(v[format!("{w} durable steps/s")].is_string(), "{v}");
    }
}
