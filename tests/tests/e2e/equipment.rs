//! Equipment end to end: the oven workflow on the simulated plant, and the recipe workflow
//! against the Modbus simulator with busy answers, a clamped register, illegal addresses,
//! timeouts and a SIGKILL in the middle of writing.

use std::collections::HashMap;
use std::time::Duration;

use outpost_tests::{Agent, ModbusSim, events, eventually, outpost_command, write};
use serde_json::{Value, json};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/");
const RECIPE: &str = r#"{"recipe": {"setpoint_temp": 72.5, "mixer_speed": 1200, "dose_ml": 250.5, "agitate": true}}"#;

/// The example PLC equipment file pointed at a simulator.
fn plc_equipment(dir: &std::path::Path, sim: &ModbusSim) -> String {
    let text = std::fs::read_to_string(format!("{EXAMPLES}equipment/plc.yaml")).unwrap();
    write(dir, "plc.yaml", &text.replace("127.0.0.1:5020", &sim.addr))
}

fn run_once(dir: &std::path::Path, equipment: &str, workflow: &str, input: &str) -> (Option<i32>, Value) {
    let out = outpost_command()
        .args(["run", "--data-dir"])
        .arg(dir.join("data"))
        .args([
            "--equipment",
            equipment,
            "--apply",
            &format!("{EXAMPLES}{workflow}.yaml"),
        ])
        .args(["--start", workflow, "--input", input, "--once"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), v)
}

/// Writes per register address, and the last raw values written to each.
fn writes_by_address(sim: &ModbusSim) -> (HashMap<u64, usize>, HashMap<u64, Value>) {
    let (mut count, mut last) = (HashMap::new(), HashMap::new());
    for w in sim.writes() {
        let a = w["address"].as_u64().unwrap();
        *count.entry(a).or_insert(0) += 1;
        last.insert(a, w.get("values").or(w.get("value")).cloned().unwrap());
    }
    (count, last)
}

fn recipe_raw() -> HashMap<u64, Value> {
    // setpoint 72.5 as f32 = 0x4291_0000; 250.5 ml at scale 0.1, low word first.
    HashMap::from([
        (0, json!(true)),
        (100, json!([0x4291, 0])),
        (102, json!([1200])),
        (103, json!([2505, 0])),
    ])
}

#[test]
fn oven_workflow_vents_the_simulated_oven() {
    let dir = tempfile::tempdir().unwrap();
    let (code, v) = run_once(
        dir.path(),
        &format!("{EXAMPLES}equipment/sim.yaml"),
        "oven-plant",
        r#"{"wait": "3s"}"#,
    );
    assert_eq!(code, Some(0), "{v}");
    let out = &v["output"];
    assert!(out["celsius"].as_f64().unwrap() <= 80.0, "{v}");
    assert!(
        out["vents"].as_u64().unwrap() >= 1,
        "the oven started at 95 °C and had to be vented: {v}"
    );
}

#[test]
fn recipe_writes_each_register_once_through_busy_answers() {
    let dir = tempfile::tempdir().unwrap();
    let sim = ModbusSim::start(&["--busy-first", "3"]);
    let (code, v) = run_once(dir.path(), &plc_equipment(dir.path(), &sim), "recipe", RECIPE);
    assert_eq!(code, Some(0), "{v}");
    let (count, last) = writes_by_address(&sim);
    assert!(
        count.values().all(|&n| n == 1),
        "a register was written twice: {:?}",
        sim.writes()
    );
    assert_eq!(last, recipe_raw());
}

#[test]
fn recipe_rolls_back_when_the_plc_clamps_a_setpoint() {
    let dir = tempfile::tempdir().unwrap();
    let sim = ModbusSim::start(&["--clamp", "102=1000"]);
    let (code, v) = run_once(dir.path(), &plc_equipment(dir.path(), &sim), "recipe", RECIPE);
    assert_eq!(code, Some(6), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("recipe.mismatch") && msg.contains("mixer_speed") && msg.contains("1000"),
        "{msg}"
    );
    let (_, last) = writes_by_address(&sim);
    assert_eq!(last[&102], json!([0]), "the previous setpoint was restored");
    assert_eq!(last[&0], json!(false));
}

#[test]
fn sigkill_mid_recipe_never_applies_a_write_twice() {
    let dir = tempfile::tempdir().unwrap();
    // A slow PLC: every answer takes 150 ms, so the recipe takes a few seconds.
    let sim = ModbusSim::start(&["--delay-ms", "150"]);
    let equipment = plc_equipment(dir.path(), &sim);
    let mut agent = Agent::start(&dir.path().join("data"), &["--equipment", &equipment]);
    agent.json(&["apply", &format!("{EXAMPLES}recipe.yaml")]);
    agent.json(&["start", "recipe", "--id", "recipe-1", "--input", RECIPE]);
    // Kill once the first register has been written, in the middle of the recipe.
    eventually(Duration::from_secs(20), "the first write", || {
        (!sim.writes().is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_millis(200));
    agent.kill9();
    let before = sim.writes().len();
    agent.restart();
    let run = eventually(Duration::from_secs(60), "the recipe to finish", || {
        let r = agent.json(&["show", "recipe-1"]);
        (r["status"] != "running").then_some(r)
    });
    assert_eq!(run["status"], "completed", "{run}");
    assert!(
        before < 4,
        "the kill landed after all {before} writes; the test proved nothing"
    );
    let (count, last) = writes_by_address(&sim);
    assert!(
        count.values().all(|&n| n == 1),
        "a register was written twice: {:?}",
        sim.writes()
    );
    assert_eq!(last, recipe_raw(), "every register ends exactly at the recipe value");
    assert!(
        events(&run, "attempt_started", "apply").len() >= 2,
        "the interrupted write step ran again"
    );
}

/// Starts the recipe on an agent with this equipment and returns the finished run.
fn recipe_run(equipment: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &["--equipment", equipment]);
    agent.json(&["apply", &format!("{EXAMPLES}recipe.yaml")]);
    let out = agent.cli(&["start", "recipe", "--input", RECIPE, "--wait", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    agent.json(&["show", v["run_id"].as_str().unwrap()])
}

#[test]
fn illegal_address_fails_at_once_and_timeouts_retry() {
    let dir = tempfile::tempdir().unwrap();
    // The PLC has registers 0-100 only: the recipe's f32 at 100-101 and u32 at 103 do not exist.
    let small = ModbusSim::start(&["--limit", "101"]);
    let r = recipe_run(&plc_equipment(dir.path(), &small));
    assert_eq!(r["status"], "failed");
    assert_eq!(r["steps"][0]["error"]["kind"], "modbus.illegal_address", "{r}");
    assert_eq!(
        events(&r, "attempt_started", "snapshot").len(),
        1,
        "an illegal address is not retried"
    );

    let slow = ModbusSim::start(&["--delay-ms", "1500"]);
    let text = std::fs::read_to_string(plc_equipment(dir.path(), &slow)).unwrap();
    let eq = write(dir.path(), "slow.yaml", &text.replace("timeout: 1s", "timeout: 300ms"));
    let r = recipe_run(&eq);
    assert_eq!(r["status"], "failed");
    assert_eq!(r["steps"][0]["error"]["kind"], "equipment.timeout", "{r}");
    assert_eq!(
        events(&r, "attempt_started", "snapshot").len(),
        5,
        "timeouts are retried"
    );
}

#[test]
fn a_plc_answering_too_few_registers_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let sim = ModbusSim::start(&["--short-reads"]);
    let equipment = plc_equipment(dir.path(), &sim);
    let agent = Agent::start(&dir.path().join("data"), &["--equipment", &equipment]);
    let pid = agent.pid();
    agent.json(&["apply", &format!("{EXAMPLES}recipe.yaml")]);
    let out = agent.cli(&["start", "recipe", "--input", RECIPE, "--wait", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = agent.json(&["show", v["run_id"].as_str().unwrap()]);
    assert_eq!(r["status"], "failed", "{r}");
    let err = &r["steps"][0]["error"];
    assert_eq!(err["kind"], "modbus.bad_response", "{r}");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("device 'mixer'") && msg.contains("for a point of"),
        "{msg}"
    );
    assert_eq!(agent.pid(), pid);
    assert!(agent.cli(&["status"]).status.success(), "the agent is still up");
}

#[test]
fn bad_equipment_files_name_the_device_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.yaml",
        "devices:\n  a: {kind: laser, backend: sim}\n  b: {kind: output, backend: linux, pin: {chip: /dev/gpiochip99, line: 3}}\n  f: {kind: sht3x, backend: can}\n  g: {kind: sht3x, backend: linux, bus: /dev/i2c-99}\n  c: {kind: modbus, tcp: nohost, points: {}}\n  d: {kind: modbus, tcp: 'h:1', points: {p: {table: coil, address: 0, type: f32}}}\n  e: {kind: output, backend: sim, pin: flux}\n",
    );
    let out = outpost_command()
        .args(["validate", "--equipment", &bad, &format!("{EXAMPLES}hello.yaml")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    for expect in [
        "devices.a.kind: unknown kind 'laser'",
        "devices.b.pin: cannot open /dev/gpiochip99",
        "devices.f.backend: 'can' is not available",
        "devices.g.bus: cannot open /dev/i2c-99",
        "devices.c.tcp: 'nohost' is not host:port",
        "devices.d.points.p",
        "devices.e.pin: sim output 'flux'",
    ] {
        assert!(err.contains(expect), "expected {expect:?} in:\n{err}");
    }
    let wrong = write(
        dir.path(),
        "wrong.yaml",
        "name: w\nversion: 1\nsteps:\n  - {id: a, action: gpio.write, args: {device: oven_temp, value: true}}\n  - {id: b, action: sensor.read, args: {device: nothere}, depends_on: [a]}\n",
    );
    let out = outpost_command()
        .args([
            "validate",
            "--equipment",
            &format!("{EXAMPLES}equipment/sim.yaml"),
            &wrong,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("device 'oven_temp' is a sht3x; this action needs a output"),
        "{err}"
    );
    assert!(err.contains("unknown device 'nothere'"), "{err}");
}

#[test]
fn recipe_over_modbus_rtu_on_a_serial_line() {
    let dir = tempfile::tempdir().unwrap();
    let (plc, gw) = (dir.path().join("plc"), dir.path().join("gw"));
    // A linked pseudo-terminal pair stands in for the RS-485 line (socat is installed by .ci/run).
    let mut socat = std::process::Command::new("socat")
        .arg(format!("pty,raw,echo=0,link={}", plc.display()))
        .arg(format!("pty,raw,echo=0,link={}", gw.display()))
        .spawn()
        .expect("socat is needed for the RTU test: apt-get install socat");
    eventually(Duration::from_secs(5), "the serial pair", || {
        (plc.exists() && gw.exists()).then_some(())
    });
    let sim = ModbusSim::start(&["--rtu", plc.to_str().unwrap(), "--baud", "19200", "--busy-first", "1"]);
    let text = std::fs::read_to_string(format!("{EXAMPLES}equipment/plc.yaml")).unwrap();
    let eq = write(
        dir.path(),
        "rtu.yaml",
        &text.replace(
            "tcp: 127.0.0.1:5020",
            &format!("rtu: {{port: {}, baud: 19200}}", gw.display()),
        ),
    );
    let (code, v) = run_once(dir.path(), &eq, "recipe", RECIPE);
    let _ = socat.kill();
    let _ = socat.wait();
    assert_eq!(code, Some(0), "{v}");
    let (count, last) = writes_by_address(&sim);
    assert!(count.values().all(|&n| n == 1), "{:?}", sim.writes());
    assert_eq!(last, recipe_raw());
}
