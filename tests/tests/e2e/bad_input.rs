//! Bad input gets a clear message and a non-zero exit, and changes nothing in the journal.

use outpost_tests::{Agent, write};

#[test]
fn bad_definitions_and_inputs_are_rejected_without_touching_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "good.yaml",
        "name: good\nversion: 1\nsteps:\n  - {id: a, action: set, args: {x: '{{ input.x }}'}}\n",
    );
    let agent = Agent::start(&dir.path().join("data"), &[]);
    agent.json(&["apply", &good]);
    let before = agent.json(&["status"])["journal"]["next_seq"].clone();
    let defs_before = agent.json(&["definitions"]);

    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed.yaml", "name: x\nversion: 1\nsteps:\n  - id: a\n   action: set\n".into(), "YAML error"),
        ("unknown.yaml", "name: x\nversion: 1\nsteps:\n  - {id: a, action: teleport}\n".into(), "steps[0] (a).action: unknown action 'teleport'"),
        ("cycle.yaml", "name: x\nversion: 1\nsteps:\n  - {id: a, action: set, depends_on: [b]}\n  - {id: b, action: set, depends_on: [a]}\n".into(), "dependency cycle"),
        ("missing.yaml", "name: x\nversion: 1\nsteps:\n  - {id: a, action: set, depends_on: [ghost]}\n".into(), "steps[0] (a).depends_on: unknown step 'ghost'"),
        ("args.yaml", "name: x\nversion: 1\nsteps:\n  - {id: a, action: exec, args: {cmd: ls}}\n".into(), "missing required argument 'command'"),
        ("duration.yaml", "name: x\nversion: 1\nsteps:\n  - {id: a, action: set, timeout: soonish}\n".into(), "steps[0] (a).timeout: 'soonish' is not a duration"),
        ("huge.yaml", format!("name: x\nversion: 1\n# {}\nsteps: []\n", "p".repeat(1024 * 1024)), "a definition may be at most 1048576 bytes"),
        ("conflict.yaml", "name: good\nversion: 1\nsteps:\n  - {id: b, action: set}\n".into(), "good version 1 already exists with different content"),
    ];
    for (name, text, expect) in &cases {
        let f = write(dir.path(), name, text);
        let out = agent.cli(&["apply", &f]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(err.contains(expect), "{name}: expected {expect:?} in:\n{err}");
        assert!(err.contains(name), "{name}: the message does not name the file:\n{err}");
    }

    // Too big for a command-line argument, so it travels as a file.
    let big = write(
        dir.path(),
        "big.json",
        &format!(r#"{{"x": "{}"}}"#, "y".repeat(300 * 1024)),
    );
    let starts: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["start", "good", "--input", "{not json"],
            3,
            "--input is not valid JSON",
        ),
        (
            vec!["start", "good", "--input-file", &big],
            3,
            "the limit is 262144 bytes",
        ),
        (vec!["start", "nope"], 4, "workflow 'nope' is not defined"),
        (vec!["start", "good", "--id", "bad id!"], 3, "run id 'bad id!'"),
        (vec!["start", "good", "--version", "9"], 4, "version 9"),
    ];
    for (args, code, expect) in &starts {
        let out = agent.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: expected {expect:?} in {err}");
    }

    assert_eq!(
        agent.json(&["status"])["journal"]["next_seq"],
        before,
        "a rejected request wrote to the journal"
    );
    assert_eq!(agent.json(&["definitions"]), defs_before);
    assert!(agent.json(&["list"]).as_array().unwrap().is_empty());
}

#[test]
fn broker_addresses_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    for (flag, url, says) in [
        (
            "--broker",
            "mqtts://broker.plant:8883",
            "this gateway is not enrolled: run `outpost keygen",
        ),
        (
            "--broker",
            "mqtt://broker.plant:1883",
            "plain-text MQTT to another machine is refused",
        ),
        ("--broker", "http://broker:1883", "scheme 'http' is not an MQTT broker"),
        (
            "--broker",
            "broker:1883",
            "--broker broker:1883: no scheme (write mqtts://broker:1883",
        ),
        (
            "--mqtt-broker",
            "mqtt://broker:x",
            "'x' in --mqtt-broker mqtt://broker:x is not a port",
        ),
    ] {
        let out = outpost_tests::outpost_command()
            .args(["run", "--data-dir", data, "--device-id", "gw", flag, url])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{url}: {err}");
        assert!(err.contains(says), "{url}: expected {says:?} in {err}");
    }
}

#[test]
fn a_damaged_journal_is_named_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("journal.redb"), vec![0x5a; 8192]).unwrap();
    let out = outpost_tests::outpost_command()
        .args(["run", "--once", "--start", "x", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("journal.redb") && err.contains("move it aside"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_run_blocked_by_a_full_disk_says_so_everywhere_even_the_console_and_goes_on_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("disk-full");
    let marker_s = marker.display().to_string();
    let def = write(
        dir.path(),
        "slow.yaml",
        "name: slow\nversion: 1\nsteps:\n  - {id: work, action: exec, args: {command: sh, args: ['-c', 'sleep 1; yes x | head -c 900000']}}\n  - {id: after, action: set, depends_on: [work], args: {ok: true}}\n",
    );
    let cloud = outpost_tests::cloud::Cloud::embedded(&dir.path().join("cloud"));
    let agent = Agent::start_with_env(
        &dir.path().join("data"),
        // Without the segment log: its pages are preallocated, so a disk that is only full
        // takes the log's group commits until a checkpoint needs the journal file to grow
        // (`journal::tests::full_disk…` covers a log that cannot be written).
        &[
            "--broker",
            &cloud.mqtt_url(),
            "--device-id",
            "gw-full",
            "--journal-log-kb",
            "0",
        ],
        &[("OUTPOST_JOURNAL_FULL_DISK_MARKER", &marker_s)],
    );
    cloud.wait_presence("gw-full", true, std::time::Duration::from_secs(20));
    agent.json(&["apply", &def]);
    agent.json(&["start", "slow", "--id", "r1"]);
    // The step is running; its completion cannot be journaled.
    std::fs::write(&marker, b"grow").unwrap();
    let run = outpost_tests::eventually(
        std::time::Duration::from_secs(15),
        "the run to be shown blocked",
        || {
            let r = agent.json(&["show", "r1"]);
            (!r["blocked"].is_null()).then_some(r)
        },
    );
    assert_eq!(run["status"], "running");
    assert_eq!(run["blocked"]["reason"], "journal_storage", "{run}");
    let waiting = run["waiting"].as_str().unwrap();
    assert!(
        waiting.contains("journal cannot be written") && waiting.contains("No space left"),
        "{waiting}"
    );
    let text = String::from_utf8_lossy(&agent.cli(&["show", "r1"]).stdout).into_owned();
    assert!(text.contains("blocked: the journal cannot be written"), "{text}");
    let list = String::from_utf8_lossy(&agent.cli(&["list"]).stdout).into_owned();
    assert!(list.contains("blocked: the journal cannot be written"), "{list}");
    let status = agent.json(&["status"]);
    assert_eq!(status["journal"]["storage_error"]["blocked_runs"], 1, "{status}");
    let text = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).into_owned();
    assert!(
        text.contains("CANNOT WRITE") && text.contains("1 runs blocked"),
        "{text}"
    );
    // The console says it too: the gateway announces its storage failure and blocked runs.
    let dev = outpost_tests::eventually(std::time::Duration::from_secs(15), "the cloud to hear of it", || {
        cloud.device("gw-full").filter(|d| !d["storage"].is_null())
    });
    assert_eq!(dev["storage"]["blocked_runs"], serde_json::json!(["r1"]), "{dev}");
    let page = |path: &str| {
        let (code, body) = outpost_tests::cloud::http("GET", cloud.api, path, None).unwrap();
        assert_eq!(code, 200, "{path}");
        body.to_string()
    };
    assert!(
        page("/devices/gw-full").contains("journal cannot be written"),
        "device page"
    );
    assert!(page("/devices/gw-full/runs/r1").contains("Blocked:"), "run page");
    // The cause is said once (it used to read `journal storage error: I/O error: journal storage
    // error: I/O error: No space left on device`).
    let cause = run["blocked"]["error"].as_str().unwrap();
    assert!(cause.contains("No space left"), "{cause}");
    assert_eq!(cause.matches("I/O error").count(), 1, "doubled: {cause}");
    // A start that fits in the file's free pages still works (as on a real full disk); one that
    // does not is refused with the cause said once.
    let out = agent.cli(&["start", "slow", "--id", "r2"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() || err.matches("I/O error").count() == 1, "{err}");

    std::fs::remove_file(&marker).unwrap();
    let run = outpost_tests::eventually(std::time::Duration::from_secs(60), "the runs to finish", || {
        let r = agent.json(&["show", "r1"]);
        let done = agent.json(&["list", "--status", "running"]).as_array()?.is_empty();
        (r["status"] == "completed" && done).then_some(r)
    });
    assert!(run["blocked"].is_null(), "{run}");
    assert!(agent.json(&["status"])["journal"]["storage_error"].is_null());
    assert!(
        agent.log().contains("No space left on device"),
        "the failure was not the injected one"
    );
    outpost_tests::eventually(
        std::time::Duration::from_secs(15),
        "the cloud to hear it is over",
        || cloud.device("gw-full").filter(|d| d["storage"].is_null()),
    );
    assert!(!page("/devices/gw-full").contains("journal cannot be written"));
}

/// What `outpost run` did with a damaged journal: started and served every run, or refused.
fn open_damaged(data: &std::path::Path) -> Result<usize, String> {
    let mut child = outpost_tests::outpost_command()
        .args(["run", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            return Err(format!("{status}\n{err}"));
        }
        if outpost_tests::cli(data, &["status"]).status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent neither started nor refused"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // It started: every run and its whole history must read back, and it must still be alive.
    let out = outpost_tests::cli(data, &["list", "--limit", "1000", "--json"]);
    let mut read = 0;
    let ok = out.status.success();
    if ok {
        let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for r in runs.as_array().cloned().unwrap_or_default() {
            let id = r["run_id"].as_str().unwrap_or_default().to_string();
            if outpost_tests::cli(data, &["show", &id, "--json"]).status.success() {
                read += 1;
            }
        }
    }
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let status = child.wait().unwrap();
    let mut err = String::new();
    use std::io::Read;
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    if !alive {
        return Err(format!("DIED while serving: {status}\n{err}"));
    }
    Ok(read)
}

#[test]
fn every_kind_of_journal_damage_is_refused_by_name_or_reads_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let mut agent = Agent::start(&base, &[]);
    let def = write(
        dir.path(),
        "echo.yaml",
        "name: echo\nversion: 1\nsteps:\n  - {id: a, action: set, args: {x: '{{ input.x }}'}}\n  - {id: b, action: set, depends_on: [a], args: {y: '{{ input.x }}'}}\n",
    );
    agent.json(&["apply", &def]);
    for i in 0..60 {
        agent.json(&[
            "start",
            "echo",
            "--input",
            &format!(r#"{{"x": "{}"}}"#, "v".repeat(i * 40)),
            "--wait",
        ]);
    }
    let status = agent.stop().unwrap();
    assert!(status.success(), "SIGTERM: {status}");
    let clean = std::fs::read(base.join("journal.redb")).unwrap();
    let mut rng = fastrand::Rng::with_seed(99);
    let mut outcomes = Vec::new();
    for kind in ["bit flips", "a random 4 KiB block", "truncated", "zeroed header"] {
        for seed in 0..6 {
            let mut bytes = clean.clone();
            match kind {
                "bit flips" => {
                    for _ in 0..(1 + seed * 20) {
                        let i = rng.usize(..bytes.len());
                        bytes[i] ^= 1 << rng.u8(0..8);
                    }
                }
                "a random 4 KiB block" => {
                    let blocks = bytes.len() / 4096;
                    let b = rng.usize(0..blocks.max(1));
                    for x in &mut bytes[b * 4096..((b + 1) * 4096).min(clean.len())] {
                        *x = rng.u8(..);
                    }
                }
                "truncated" => bytes.truncate(rng.usize(0..clean.len())),
                _ => {
                    let n = 512.min(bytes.len());
                    bytes[..n].fill(0);
                }
            }
            let data = dir.path().join(format!("{kind}-{seed}").replace(' ', "_"));
            std::fs::create_dir_all(&data).unwrap();
            std::fs::write(data.join("journal.redb"), &bytes).unwrap();
            let got = open_damaged(&data);
            if let Ok(n) = &got {
                assert_eq!(*n, 60, "{kind} (seed {seed}): started but served only {n} of 60 runs");
            }
            if let Err(e) = &got {
                // The agent itself must exit with a refusal; its check child may crash (redb
                // panics on some files, and the packaged build aborts), which is the point.
                let status = e.lines().next().unwrap_or_default();
                assert!(
                    !e.contains("DIED") && !status.contains("signal") && status.contains("exit status: 1"),
                    "{kind} (seed {seed}): a crash, not a refusal:\n{e}"
                );
                assert!(
                    e.contains("journal.redb") && e.contains("move it aside"),
                    "{kind} (seed {seed}): the refusal does not name the file and what to do:\n{e}"
                );
            }
            outcomes.push(format!(
                "{kind}/{seed}: {}",
                match got {
                    Ok(n) => format!("read {n} runs"),
                    Err(_) => "refused".into(),
                }
            ));
        }
    }
    eprintln!("{outcomes:#?}");
}

#[test]
fn sigterm_and_once_close_the_journal_cleanly_and_sigkill_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let def = write(
        dir.path(),
        "echo.yaml",
        "name: echo\nversion: 1\nsteps:\n  - {id: a, action: set, args: {x: 1}}\n",
    );
    let repaired = |what: &str| -> bool {
        let out = outpost_tests::cli(&data, &["journal-check", "--json"]);
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["repaired"].as_bool().unwrap()
    };
    for round in 0..3 {
        let mut agent = Agent::start(&data, &[]);
        agent.json(&["apply", &def]);
        agent.json(&["start", "echo", "--wait"]);
        let status = agent.stop().unwrap();
        assert!(status.success(), "round {round}: SIGTERM exit {status}");
        assert!(
            !repaired("after SIGTERM"),
            "round {round}: SIGTERM left the journal needing a repair"
        );
    }
    let out = outpost_tests::outpost_command()
        .args(["run", "--once", "--start", "echo", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!repaired("after --once"), "--once left the journal needing a repair");
    // An error after the journal is open (a bad --apply file) closes it too.
    let bad = write(
        dir.path(),
        "bad.yaml",
        "name: bad\nversion: 1\nsteps:\n  - {id: a, action: teleport}\n",
    );
    let out = outpost_tests::outpost_command()
        .args(["run", "--apply", &bad, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !repaired("after a refused --apply"),
        "an error exit left the journal needing a repair"
    );
    // The check can tell: a SIGKILL does leave it unclean.
    let mut agent = Agent::start(&data, &[]);
    agent.json(&["start", "echo", "--wait"]);
    agent.kill9();
    assert!(
        repaired("after SIGKILL"),
        "a killed agent's journal read as clean; the check proves nothing"
    );
}
