//! OPC UA end to end: the agent against `outpost opcua-sim` (a real OPC UA server over TCP):
//! every data type read, written and verified exactly; a clamped write rolled back by the recipe
//! saga; a server restart in the middle of a run; a SIGKILL of the agent mid-recipe; methods
//! called with typed arguments; refused connections and unknown nodes named; desired state on
//! OPC UA points.

use std::time::Duration;

use outpost_tests::cloud::Cloud;
use outpost_tests::{Agent, OpcuaSim, eventually, outpost_command, write};
use serde_json::{Value, json};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/");
const RECIPE: &str = r#"{"recipe": {"speed": 950, "setpoint": 80.25, "mode": "manual", "enabled": true}}"#;

fn press_nodes() -> Vec<&'static str> {
    vec![
        "--node",
        "Speed=UInt16=900",
        "--node",
        "Setpoint=Float=72.5",
        "--node",
        "Mode=String=auto",
        "--node",
        "Enabled=Boolean=false",
    ]
}

/// The example equipment file pointed at `sim`, with `extra` lines in its `opcua:` block.
fn equipment(dir: &std::path::Path, sim: &OpcuaSim, extra: &str) -> String {
    let text = std::fs::read_to_string(format!("{EXAMPLES}equipment/opcua.yaml")).unwrap();
    let pki = dir.join("pki");
    let text = text
        .replace("opc.tcp://127.0.0.1:4840/", &sim.url)
        .replace("/tmp/outpost-opcua-pki", pki.to_str().unwrap())
        .replace("      points:\n", &format!("{extra}      points:\n"));
    write(dir, "opcua.yaml", &text)
}

fn run_once(dir: &std::path::Path, equipment: &str, workflow: &str, input: &str) -> (Option<i32>, Value) {
    let out = outpost_command()
        .args(["run", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--equipment", equipment, "--apply", workflow, "--start"])
        .arg(std::path::Path::new(workflow).file_stem().unwrap().to_str().unwrap())
        .args(["--input", input, "--once"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), v)
}

#[test]
fn every_opcua_data_type_is_read_written_and_verified_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let types = [
        ("b", "Boolean", "false", json!(true)),
        ("sb", "SByte", "0", json!(-5)),
        ("by", "Byte", "0", json!(200)),
        ("i16", "Int16", "0", json!(-300)),
        ("u16", "UInt16", "0", json!(65535)),
        ("i32", "Int32", "0", json!(-70000)),
        ("u32", "UInt32", "0", json!(4_000_000_000u64)),
        ("i64", "Int64", "0", json!(-9_000_000_000_000i64)),
        ("u64", "UInt64", "0", json!(18_000_000_000_000_000_000u64)),
        ("f", "Float", "0", json!(72.5)),
        ("d", "Double", "0", json!(0.1)),
        ("s", "String", "x", json!("manual")),
        (
            "t",
            "DateTime",
            "\"2000-01-01T00:00:00Z\"",
            json!("2026-12-03T10:00:00Z"),
        ),
    ];
    let nodes: Vec<String> = types.iter().map(|(n, t, v, _)| format!("{n}={t}={v}")).collect();
    let mut flags = Vec::new();
    for n in &nodes {
        flags.extend(["--node", n.as_str()]);
    }
    let sim = OpcuaSim::start(0, &flags);
    let points: String = types
        .iter()
        .map(|(n, t, _, _)| format!("        {n}: {{node: \"ns=2;s={n}\", type: {t}}}\n"))
        .collect();
    let eq = write(
        dir.path(),
        "eq-types.yaml",
        &format!(
            "devices:\n  plc:\n    kind: opcua\n    opcua:\n      endpoint: {}\n      trust_any_server: true\n      pki_dir: {}\n      points:\n{points}",
            sim.url,
            dir.path().join("pki").display()
        ),
    );
    let values: serde_json::Map<String, Value> = types.iter().map(|(n, _, _, v)| (n.to_string(), v.clone())).collect();
    let wf = write(
        dir.path(),
        "types.yaml",
        "name: types\nversion: 1\nsteps:\n  - id: w\n    action: opcua.write\n    args: {device: plc, values: \"{{ input }}\"}\n  - id: v\n    action: opcua.verify\n    depends_on: [w]\n    args: {device: plc, expect: \"{{ input }}\"}\n  - id: r\n    action: opcua.read\n    depends_on: [v]\n    args: {device: plc, points: \"{{ input | list }}\"}\noutput: \"{{ steps.r.output.values }}\"\n",
    );
    let (code, v) = run_once(dir.path(), &eq, &wf, &Value::Object(values).to_string());
    assert_eq!(code, Some(0), "{v}");
    for (n, _, _, want) in &types {
        let got = &v["output"][n];
        if *n == "t" {
            assert!(got.as_str().unwrap().starts_with("2026-12-03T10:00:00"), "{n}: {got}");
        } else {
            assert_eq!(got, want, "{n}: {v}");
        }
    }
    assert_eq!(
        sim.writes().len(),
        types.len(),
        "each node written once: {:?}",
        sim.writes()
    );
    assert!(
        dir.path().join("pki/own/cert.der").exists(),
        "the gateway made its own application certificate"
    );
}

#[test]
fn a_clamped_opcua_write_is_a_mismatch_and_the_recipe_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut flags = press_nodes();
    flags.extend(["--clamp", "Speed=920"]);
    let sim = OpcuaSim::start(0, &flags);
    let eq = equipment(dir.path(), &sim, "");
    let (code, v) = run_once(dir.path(), &eq, &format!("{EXAMPLES}opcua-recipe.yaml"), RECIPE);
    assert_eq!(code, Some(6), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("recipe.mismatch") && msg.contains("speed") && msg.contains("920"),
        "{msg}"
    );
    let speed: Vec<Value> = sim.writes().into_iter().filter(|w| w["write"] == "Speed").collect();
    assert_eq!(
        speed.first().map(|w| (w["value"].clone(), w["requested"].clone())),
        Some((json!(920), json!(950))),
        "{speed:?}"
    );
    assert_eq!(
        speed.last().map(|w| w["value"].clone()),
        Some(json!(900)),
        "the previous speed was restored: {speed:?}"
    );
}

#[test]
fn an_opcua_server_restart_mid_recipe_is_retried_and_the_recipe_completes() {
    let dir = tempfile::tempdir().unwrap();
    let mut sim = OpcuaSim::start(0, &press_nodes());
    let eq = equipment(dir.path(), &sim, "");
    let agent = Agent::start(&dir.path().join("data"), &["--equipment", &eq]);
    agent.json(&["apply", &format!("{EXAMPLES}opcua-recipe.yaml")]);
    // A first session, then the server goes away before the recipe starts writing.
    agent.json(&[
        "start",
        "opcua-recipe",
        "--id",
        "warm",
        "--input",
        r#"{"recipe": {"speed": 900}}"#,
        "--wait",
    ]);
    let port = sim.port;
    sim.kill();
    agent.json(&["start", "opcua-recipe", "--id", "r1", "--input", RECIPE]);
    std::thread::sleep(Duration::from_millis(1500));
    let sim = OpcuaSim::start(port, &press_nodes());
    let run = eventually(Duration::from_secs(60), "the recipe to finish", || {
        let r = agent.json(&["show", "r1"]);
        (r["status"] != "running").then_some(r)
    });
    assert_eq!(run["status"], "completed", "{run}");
    let snapshot = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "snapshot")
        .cloned()
        .unwrap();
    assert!(
        snapshot["attempts"].as_u64().unwrap() >= 2,
        "the read was retried: {snapshot}"
    );
    let written: Vec<Value> = sim.writes().into_iter().map(|w| w["write"].clone()).collect();
    assert_eq!(
        written.len(),
        4,
        "every node written once on the new server: {written:?}"
    );
}

#[test]
fn refused_opcua_connections_and_unknown_nodes_name_the_device_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let read = |eq: &str| {
        let wf = write(
            dir.path(),
            "probe.yaml",
            "name: probe\nversion: 1\nsteps:\n  - id: r\n    action: opcua.read\n    args: {device: press, points: [speed]}\n    retry: {max_attempts: 1}\n",
        );
        let d = tempfile::tempdir().unwrap();
        let (code, v) = run_once(d.path(), eq, &wf, "{}");
        assert_eq!(code, Some(6), "{v}");
        v["error"]["message"].as_str().unwrap().to_string()
    };
    // The server offers only Basic256Sha256; the equipment file asks for no security.
    let secure = OpcuaSim::start(0, &["--node", "Speed=UInt16=1", "--only-secure"]);
    let msg = read(&equipment(dir.path(), &secure, ""));
    assert!(msg.contains("press") && msg.contains("security_policy None"), "{msg}");
    // Secure, but the server's certificate is not trusted.
    let strict = std::fs::read_to_string(equipment(dir.path(), &secure, ""))
        .unwrap()
        .replace(
            "security_policy: None",
            "security_policy: Basic256Sha256\n      security_mode: SignAndEncrypt",
        )
        .replace("      trust_any_server: true\n", "");
    let msg = read(&write(dir.path(), "strict.yaml", &strict));
    assert!(
        msg.contains("press") && (msg.contains("Certificate") || msg.contains("certificate")),
        "{msg}"
    );
    // A wrong password.
    let users = OpcuaSim::start(0, &["--node", "Speed=UInt16=1", "--user", "operator:right"]);
    let pw = write(dir.path(), "pw", "wrong\n");
    let msg = read(&equipment(
        dir.path(),
        &users,
        &format!("      user: operator\n      password_file: {pw}\n"),
    ));
    assert!(
        msg.contains("press") && (msg.contains("Identity") || msg.contains("UserAccessDenied")),
        "{msg}"
    );
    // An unknown node: named, and not retried.
    let sim = OpcuaSim::start(0, &["--node", "Other=UInt16=1"]);
    let msg = read(&equipment(dir.path(), &sim, ""));
    assert!(
        msg.contains("press") && msg.contains("speed") && msg.contains("BadNodeIdUnknown"),
        "{msg}"
    );
    // A bad equipment file names the field before anything connects.
    let bad = write(
        dir.path(),
        "bad.yaml",
        "devices:\n  press:\n    kind: opcua\n    opcua:\n      endpoint: tcp://x\n      security_mode: Loud\n      points: {speed: {node: \"nope\", type: UInt16}}\n",
    );
    let out = outpost_command()
        .args(["validate", "--equipment", &bad, &format!("{EXAMPLES}opcua-recipe.yaml")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    for field in [
        "devices.press.opcua.endpoint",
        "devices.press.opcua.security_mode",
        "devices.press.opcua.points.speed",
    ] {
        assert!(err.contains(field), "{field}: {err}");
    }
}

#[test]
fn desired_state_on_opcua_points_is_exact_on_the_variant() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let sim = OpcuaSim::start(0, &press_nodes());
    let eq = equipment(dir.path(), &sim, "");
    let remediation = write(
        dir.path(),
        "apply-press.yaml",
        "name: apply-press\nversion: 1\nsteps:\n  - id: w\n    action: opcua.write\n    args: {device: press, values: \"{{ input.desired.press }}\", verify: false}\n",
    );
    let (code, v) = cloud.send(
        "PUT",
        "/v1/devices/press-gw/desired",
        &json!({"document": {"press": {"speed": 950.0, "setpoint": 80.25, "mode": "manual"}}}),
    );
    assert_eq!(code, 200, "{v}");
    let _agent = Agent::start(
        &dir.path().join("agent"),
        &[
            "--broker",
            &cloud.mqtt_url(),
            "--device-id",
            "press-gw",
            "--equipment",
            &eq,
            "--remediation",
            "apply-press",
            "--apply",
            &remediation,
        ],
    );
    let r = eventually(Duration::from_secs(30), "the report", || {
        let s = cloud.get("/v1/devices/press-gw/state");
        (s["reported"]["desired_version"] == 1).then_some(s["reported"].clone())
    });
    assert_eq!(r["in_sync"], true, "{r}");
    let raw: Vec<Value> = r["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["found_raw"].clone())
        .collect();
    assert!(
        raw.contains(&json!("UInt16 950")) && raw.contains(&json!("Float 0x42A08000")),
        "{r}"
    );
    // 72.1 cannot be a Float exactly: refused, the point named, nothing written.
    let writes = sim.writes().len();
    cloud.send(
        "PUT",
        "/v1/devices/press-gw/desired",
        &json!({"document": {"press": {"setpoint": 72.1}}}),
    );
    let r = eventually(Duration::from_secs(30), "the refusal", || {
        let s = cloud.get("/v1/devices/press-gw/state");
        (s["reported"]["desired_version"] == 2).then_some(s["reported"].clone())
    });
    assert_eq!(r["in_sync"], false);
    assert!(r["message"].as_str().unwrap().contains("press.setpoint refused"), "{r}");
    assert_eq!(sim.writes().len(), writes);
}

#[test]
fn sigkill_mid_opcua_recipe_leaves_every_node_at_its_value_written_once() {
    let dir = tempfile::tempdir().unwrap();
    // A slow press: each node written takes 400 ms, so the write step takes over a second.
    let mut flags = press_nodes();
    flags.extend(["--delay-ms", "400"]);
    let sim = OpcuaSim::start(0, &flags);
    let eq = equipment(dir.path(), &sim, "");
    let text = std::fs::read_to_string(&eq)
        .unwrap()
        .replace("timeout: 2s", "timeout: 10s");
    let eq = write(dir.path(), "slow.yaml", &text);
    let mut agent = Agent::start(&dir.path().join("data"), &["--equipment", &eq]);
    agent.json(&["apply", &format!("{EXAMPLES}opcua-recipe.yaml")]);
    agent.json(&["start", "opcua-recipe", "--id", "r1", "--input", RECIPE]);
    eventually(Duration::from_secs(30), "the first node written", || {
        (!sim.writes().is_empty()).then_some(())
    });
    agent.kill9();
    let before = sim.writes().len();
    agent.restart();
    let run = eventually(Duration::from_secs(60), "the recipe to finish", || {
        let r = agent.json(&["show", "r1"]);
        (r["status"] != "running").then_some(r)
    });
    assert_eq!(run["status"], "completed", "{run}");
    let apply_started = run["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "attempt_started" && e["step"] == "apply")
        .count();
    assert!(
        apply_started >= 2,
        "the kill landed in the write step, which ran again: {run}"
    );
    let writes = sim.writes();
    let mut names: Vec<String> = writes
        .iter()
        .map(|w| w["write"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["Enabled", "Mode", "Setpoint", "Speed"],
        "each node written exactly once ({before} before the kill): {writes:?}"
    );
    let values: serde_json::Map<String, Value> = writes
        .iter()
        .map(|w| (w["write"].as_str().unwrap().to_string(), w["value"].clone()))
        .collect();
    assert_eq!(
        Value::Object(values),
        json!({"Speed": 950, "Setpoint": 80.25, "Mode": "manual", "Enabled": true})
    );
}

#[test]
fn an_opcua_method_is_called_with_typed_arguments_or_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut flags = press_nodes();
    flags.extend(["--method", "StartJob=String,UInt32"]);
    let sim = OpcuaSim::start(0, &flags);
    let eq = equipment(dir.path(), &sim, "");
    let wf = write(
        dir.path(),
        "job.yaml",
        "name: job\nversion: 1\nsteps:\n  - id: start\n    action: opcua.call\n    args: {device: press, method: \"{{ input.method }}\", args: \"{{ input.args }}\"}\n    retry: {max_attempts: 1}\noutput: \"{{ steps.start.output }}\"\n",
    );
    let (code, v) = run_once(
        dir.path(),
        &eq,
        &wf,
        r#"{"method": "start_job", "args": {"recipe": "A-17", "count": 3}}"#,
    );
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["output"]["outputs"], json!({"job": 1}), "{v}");
    assert_eq!(
        sim.calls(),
        vec![json!({"call": "StartJob", "args": ["A-17", 3], "calls": 1})]
    );

    for (input, kind, words) in [
        (
            r#"{"method": "start_job", "args": {"recipe": "A-17", "count": -1}}"#,
            "equipment.invalid",
            vec!["start_job", "input 'count'", "press"],
        ),
        (
            r#"{"method": "start_job", "args": {"recipe": "A-17"}}"#,
            "equipment.invalid",
            vec!["input 'count' is missing"],
        ),
        (
            r#"{"method": "stop", "args": {}}"#,
            "equipment.invalid",
            vec!["no method 'stop'", "start_job"],
        ),
    ] {
        let (code, v) = run_once(dir.path(), &eq, &wf, input);
        assert_eq!(code, Some(6), "{input}: {v}");
        let err = &v["error"];
        let text = err.to_string();
        assert!(
            text.contains(kind) && words.iter().all(|w| text.contains(w)),
            "{input}: {err}"
        );
    }
    assert_eq!(sim.calls().len(), 1, "a refused call reaches no machine");
}

/// The parts value of every run the `count` workflow has, by run id.
fn counted(agent: &Agent) -> Vec<(String, Value)> {
    counted_by(agent, "count")
}

fn counted_by(agent: &Agent, workflow: &str) -> Vec<(String, Value)> {
    let list = agent.json(&["list", "--limit", "1000"]);
    let mut out: Vec<(String, Value)> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["workflow"] == workflow)
        .map(|r| {
            let id = r["run_id"].as_str().unwrap().to_string();
            let run = agent.json(&["show", &id]);
            (id, run["input"]["value"].clone())
        })
        .collect();
    out.sort_by_key(|(_, v)| v.as_u64());
    out
}

#[test]
fn a_data_change_trigger_starts_one_run_per_change_across_an_agent_restart() {
    let dir = tempfile::tempdir().unwrap();
    // A part counter the PLC counts up every 2 s.
    let sim = OpcuaSim::start(0, &["--node", "Parts=UInt32=0", "--tick", "Parts=2s"]);
    let eq = write(
        dir.path(),
        "counter.yaml",
        &format!(
            "devices:\n  press:\n    kind: opcua\n    opcua:\n      endpoint: {}\n      trust_any_server: true\n      pki_dir: {}\n      points:\n        parts: {{node: \"ns=2;s=Parts\", type: UInt32}}\n",
            sim.url,
            dir.path().join("pki").display()
        ),
    );
    let wf = write(
        dir.path(),
        "count.yaml",
        "name: count\nversion: 1\ntriggers:\n  - opcua: {device: press, point: parts, sampling: 100ms}\nsteps:\n  - id: note\n    action: set\n    args: {parts: \"{{ input.value }}\", changed_at: \"{{ input.source_timestamp }}\"}\n",
    );
    // The same point with a deadband: a change of less than 1.5 parts starts nothing.
    let coarse = write(
        dir.path(),
        "coarse.yaml",
        "name: coarse\nversion: 1\ntriggers:\n  - opcua: {device: press, point: parts, sampling: 100ms, deadband: 1.5}\nsteps:\n  - id: note\n    action: set\n    args: {parts: \"{{ input.value }}\"}\n",
    );
    let mut agent = Agent::start(&dir.path().join("data"), &["--equipment", &eq]);
    agent.json(&["apply", &wf]);
    agent.json(&["apply", &coarse]);
    // Kill the agent just after a change started its run: the restarted agent subscribes
    // again and is sent that same value again (the counter has not moved on yet).
    let seen = eventually(Duration::from_secs(30), "runs for two changes", || {
        let runs = counted(&agent);
        let coarse = counted_by(&agent, "coarse");
        let two = |r: &[(String, Value)]| r.iter().any(|(_, v)| v.as_u64().unwrap_or(0) >= 2);
        (two(&runs) && two(&coarse)).then_some(runs)
    });
    agent.kill9();
    let at_kill = seen.last().unwrap().1.as_u64().unwrap();
    agent.restart();
    let runs = eventually(Duration::from_secs(30), "runs for two more changes", || {
        let runs = counted(&agent);
        runs.iter()
            .any(|(_, v)| v.as_u64().unwrap_or(0) >= at_kill + 2)
            .then_some(runs)
    });
    let values: Vec<u64> = runs.iter().map(|(_, v)| v.as_u64().unwrap()).collect();
    let mut distinct = values.clone();
    distinct.dedup();
    assert_eq!(values, distinct, "a value started two runs: {runs:?}");
    assert!(
        values.contains(&(at_kill + 1)) && values.contains(&(at_kill + 2)),
        "every change after the restart started a run: {runs:?}"
    );
    for (id, _) in &runs {
        assert!(id.starts_with("opcua:count:press.parts:"), "{id}");
    }
    // A new subscription reports the current value once (the restart's first run may be one
    // part after the last); within one subscription, only changes beyond the deadband.
    let coarse: Vec<u64> = counted_by(&agent, "coarse")
        .iter()
        .map(|(_, v)| v.as_u64().unwrap())
        .collect();
    let (before, after): (Vec<u64>, Vec<u64>) = coarse.iter().partition(|v| **v <= at_kill);
    for part in [&before, &after[1.min(after.len())..].to_vec()] {
        assert!(
            part.windows(2).all(|w| w[1] >= w[0] + 2),
            "no run for a change inside the deadband: {coarse:?} (every change: {values:?})"
        );
    }
    assert!(
        before.len() >= 2 && before.last() == Some(&(before[0] + 2 * (before.len() as u64 - 1))),
        "the deadband let every second change through: {coarse:?}"
    );
}

/// An RSA certificate and key made with openssl: `(cert.der, key.pem)`.
fn rsa_certificate(dir: &std::path::Path, name: &str, subject_alt: &str) -> (String, String) {
    let (cert, key) = (dir.join(format!("{name}.der")), dir.join(format!("{name}.pem")));
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-outform", "DER",
        ])
        .args(["-subj", &format!("/CN={name}")])
        .args(["-addext", &format!("subjectAltName={subject_alt}")])
        .args([
            "-addext",
            "keyUsage=critical,digitalSignature,nonRepudiation,keyEncipherment,dataEncipherment",
        ])
        .args(["-addext", "extendedKeyUsage=serverAuth,clientAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (cert.display().to_string(), key.display().to_string())
}

#[test]
fn a_secure_session_signs_in_with_a_user_certificate_and_a_plant_issued_application_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (user_cert, user_key) = rsa_certificate(dir.path(), "operator", "URI:urn:plant:operator");
    let (other_cert, other_key) = rsa_certificate(dir.path(), "intruder", "URI:urn:plant:intruder");
    let (app_cert, app_key) = rsa_certificate(dir.path(), "gateway", "URI:urn:outpost:gateway:press,DNS:localhost");
    let sim = OpcuaSim::start(
        0,
        &[
            "--node",
            "Speed=UInt16=900",
            "--only-secure",
            "--user-cert",
            &format!("operator:{user_cert}"),
        ],
    );
    let secure = |cert: &str, key: &str| {
        let text = std::fs::read_to_string(equipment(dir.path(), &sim, "")).unwrap().replace(
            "security_policy: None",
            &format!(
                "security_policy: Basic256Sha256\n      security_mode: SignAndEncrypt\n      identity_certificate: {cert}\n      identity_key: {key}\n      certificate: {app_cert}\n      private_key: {app_key}"
            ),
        );
        write(dir.path(), "secure.yaml", &text)
    };
    let wf = write(
        dir.path(),
        "probe.yaml",
        "name: probe\nversion: 1\nsteps:\n  - id: r\n    action: opcua.read\n    args: {device: press, points: [speed]}\n    retry: {max_attempts: 1}\noutput: \"{{ steps.r.output.values }}\"\n",
    );
    let d = tempfile::tempdir().unwrap();
    let (code, v) = run_once(d.path(), &secure(&user_cert, &user_key), &wf, "{}");
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["output"], json!({"speed": 900}), "{v}");
    // The plant-issued application certificate was used, not a generated one.
    assert!(
        !dir.path().join("pki/own/cert.der").exists(),
        "no certificate was generated"
    );

    let d = tempfile::tempdir().unwrap();
    let (code, v) = run_once(d.path(), &secure(&other_cert, &other_key), &wf, "{}");
    assert_eq!(code, Some(6), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("press") && msg.contains("Identity"), "{msg}");
}
