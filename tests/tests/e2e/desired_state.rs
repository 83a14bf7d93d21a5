//! Desired state on Modbus points, compared on the wire's terms: a real cloud-sync, a real
//! agent with the example PLC equipment and `examples/apply-recipe.yaml`, and the Modbus
//! simulator (clamping one register, refusing addresses past a limit).

use std::time::Duration;

use outpost_tests::browser::Browser;
use outpost_tests::cloud::Cloud;
use outpost_tests::{Agent, ModbusSim, eventually, outpost_command, write};
use serde_json::{Value, json};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/");
const WAIT: Duration = Duration::from_secs(30);

/// The example PLC, pointed at `sim`, with a point at an address the simulated PLC lacks.
fn equipment(dir: &std::path::Path, sim: &ModbusSim) -> String {
    let text = std::fs::read_to_string(format!("{EXAMPLES}equipment/plc.yaml")).unwrap();
    let text = text.replace("127.0.0.1:5020", &sim.addr) + "      ghost: {table: holding, address: 300, type: u16}\n";
    write(dir, "plc.yaml", &text)
}

/// Waits for the report of desired `version` (and, if given, one that satisfies `ok`).
fn report(cloud: &Cloud, device: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    eventually(WAIT, what, || {
        let s = cloud.get(&format!("/v1/devices/{device}/state"));
        ok(&s["reported"]).then_some(s["reported"].clone())
    })
}

fn point<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["point"] == name)
        .unwrap_or_else(|| panic!("no point {name} in {r}"))
}

/// Another Modbus client changes a register behind the agent's back.
fn write_behind_the_agents_back(dir: &std::path::Path, eq: &str, values: Value) {
    let wf = write(
        dir,
        "poke.yaml",
        "name: poke\nversion: 1\nsteps:\n  - id: w\n    action: modbus.write\n    args: {device: mixer, values: \"{{ input }}\"}\n",
    );
    let out = outpost_command()
        .args(["run", "--data-dir"])
        .arg(dir.join("poke"))
        .args([
            "--equipment",
            eq,
            "--apply",
            &wf,
            "--start",
            "poke",
            "--once",
            "--input",
        ])
        .arg(values.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn desired_points_are_in_sync_only_on_the_registers_and_drift_is_reported_and_remediated() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let sim = ModbusSim::start(&["--clamp", "102=1000", "--limit", "200"]);
    let eq = equipment(dir.path(), &sim);
    let recipe = format!("{EXAMPLES}apply-recipe.yaml");
    let flags = |on_drift: &'static str| {
        vec![
            "--broker".to_string(),
            cloud.mqtt_url(),
            "--device-id".into(),
            "mixer-gw".into(),
            "--equipment".into(),
            eq.clone(),
            "--remediation".into(),
            "apply-recipe".into(),
            "--apply".into(),
            recipe.clone(),
            "--verify-every".into(),
            "500ms".into(),
            "--on-drift".into(),
            on_drift.into(),
        ]
    };
    let put = |doc: Value| {
        let (code, v) = cloud.send("PUT", "/v1/devices/mixer-gw/desired", &json!({ "document": doc }));
        assert_eq!(code, 200, "{v}");
        v["version"].as_u64().unwrap()
    };

    // 900.0 for an integer register is the register value 900: in sync.
    let v1 = put(json!({"mixer": {"mixer_speed": 900.0, "setpoint_temp": 72.5, "dose_ml": 250.5, "agitate": true}}));
    let f: Vec<String> = flags("report");
    let args: Vec<&str> = f.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&dir.path().join("agent"), &args);
    let r = report(&cloud, "mixer-gw", "v1 reported", |r| r["desired_version"] == v1);
    assert_eq!(r["in_sync"], true, "{r}");
    assert_eq!(point(&r, "mixer_speed")["found_raw"], "0x0384", "{r}");
    assert_eq!(point(&r, "setpoint_temp")["desired_raw"], "0x4291 0x0000", "{r}");
    assert_eq!(point(&r, "setpoint_temp")["verdict"], "match");
    assert!(r["verified_at"].is_string());

    // Offline with a newer desired version: not in sync with it, and says which version was verified when.
    agent.kill9();
    let v2 = put(json!({"mixer": {"mixer_speed": 800}}));
    let s = cloud.get("/v1/devices/mixer-gw/state");
    let r = &s["reported"];
    assert_eq!(
        (r["in_sync"].clone(), r["verified_in_sync"].clone()),
        (json!(false), json!(true)),
        "{s}"
    );
    assert_eq!(r["verified_version"], v1);
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains(&format!("desired v{v2} not applied yet; v{v1} was verified at")),
        "{s}"
    );
    agent.restart();
    let r = report(&cloud, "mixer-gw", "v2 reported", |r| r["desired_version"] == v2);
    assert_eq!(r["in_sync"], true, "{r}");

    // Drift: another client writes the register; seen within a verification interval.
    write_behind_the_agents_back(dir.path(), &eq, json!({"mixer_speed": 950}));
    let r = report(&cloud, "mixer-gw", "the drift", |r| r["in_sync"] == false);
    assert!(r["drift_since"].is_string(), "{r}");
    let msg = r["message"].as_str().unwrap();
    assert!(msg.starts_with("drift: mixer.mixer_speed wanted 800 found 950"), "{r}");
    assert_eq!(point(&r, "mixer_speed")["verdict"], "differs");
    let since = r["drift_since"].clone();
    std::thread::sleep(Duration::from_millis(1200));
    let r = cloud.get("/v1/devices/mixer-gw/state")["reported"].clone();
    assert_eq!(r["drift_since"], since, "first seen stays while the drift lasts: {r}");

    // The console shows the drift per device and per point, with when it was first seen.
    let password = cloud.user("drift-viewer", &["viewer"]);
    let b = Browser::start(900);
    cloud.sign_in(&b, "drift-viewer", &password);
    b.goto(&format!("http://127.0.0.1:{}/devices/mixer-gw", cloud.api));
    // The page refreshes itself on every change: read by selector, never through a held element.
    b.wait_for(r#"#state [data-drift="drift"]"#, WAIT);
    assert_eq!(
        b.js("return document.querySelector('#state [data-drift]').getAttribute('data-drift-since')"),
        since
    );
    let badge = b.text_of(r#"#state [data-drift="drift"]"#);
    assert!(badge.starts_with("drift since"), "{badge}");
    let row = r#"#points tr[data-point="mixer.mixer_speed"][data-verdict="differs"]"#;
    b.wait_for(row, WAIT);
    let text = b.text_of(row);
    assert!(
        text.contains("800") && text.contains("950") && text.contains("0x03B6"),
        "{text}"
    );
    b.screenshot("device-drift");
    b.goto(&format!("http://127.0.0.1:{}/", cloud.api));
    b.wait_for(
        r#"tr[data-device="mixer-gw"] [data-drift="drift"][data-drift-since]"#,
        WAIT,
    );
    drop(b);

    // With `--on-drift remediate`, the drift is remediated once, by a run named after it.
    agent.stop();
    let f = flags("remediate");
    let args: Vec<&str> = f.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&dir.path().join("agent"), &args);
    let r = report(&cloud, "mixer-gw", "the drift remediated", |r| r["in_sync"] == true);
    assert!(r["drift_since"].is_null(), "{r}");
    let runs = agent.json(&["list", "--limit", "20"]);
    let drift_runs: Vec<&Value> = runs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["run_id"].as_str().unwrap().contains("-drift-"))
        .collect();
    assert_eq!(drift_runs.len(), 1, "{runs}");
    let last = sim.writes().last().cloned().unwrap();
    assert_eq!(
        (last["address"].clone(), last["values"].clone()),
        (json!(102), json!([800])),
        "{last}"
    );

    // A value an f32 cannot hold exactly is refused up front, the point named, nothing written.
    let writes = sim.writes().len();
    let v3 = put(json!({"mixer": {"setpoint_temp": 72.1, "mixer_speed": 700}}));
    let r = report(&cloud, "mixer-gw", "v3 refused", |r| r["desired_version"] == v3);
    assert_eq!(r["in_sync"], false);
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains("refused") && msg.contains("mixer.setpoint_temp") && msg.contains("72.0999984741211"),
        "{r}"
    );
    assert_eq!(point(&r, "setpoint_temp")["verdict"], "refused");
    assert_eq!(sim.writes().len(), writes, "nothing written: {:?}", sim.writes());
    assert!(
        !agent.cli(&["show", &format!("remediate-{v3}")]).status.success(),
        "no remediation run"
    );

    // A register the PLC clamps: the point named with what it holds; the simulator logs the stored value.
    let v4 = put(json!({"mixer": {"mixer_speed": 1500}}));
    let r = report(&cloud, "mixer-gw", "v4 reported", |r| r["desired_version"] == v4);
    assert_eq!(r["in_sync"], false);
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("mixer.mixer_speed wanted 1500 found 1000"),
        "{r}"
    );
    assert_eq!(point(&r, "mixer_speed")["found_raw"], "0x03E8");
    let last = sim.writes().last().cloned().unwrap();
    assert_eq!(
        (last["values"].clone(), last["requested"].clone()),
        (json!([1000]), json!([1500])),
        "{last}"
    );

    // A point the PLC does not have: the point and the exception, not just "run failed".
    let v5 = put(json!({"mixer": {"ghost": 5}}));
    let r = report(&cloud, "mixer-gw", "v5 reported", |r| r["desired_version"] == v5);
    assert_eq!(r["in_sync"], false);
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains("modbus.illegal_address") && msg.contains("mixer.ghost unreadable"),
        "{r}"
    );
    assert_eq!(point(&r, "ghost")["verdict"], "unreadable");
    assert!(
        point(&r, "ghost")["reason"]
            .as_str()
            .unwrap()
            .contains("IllegalDataAddress"),
        "{r}"
    );
    agent.stop();
}
