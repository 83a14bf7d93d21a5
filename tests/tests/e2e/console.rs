//! The web console in a real headless Chromium against the real `outpost-cloud` and a running
//! agent: the fleet page, a run's timeline and graph, an approval from the page that completes
//! the run on the agent, a deployment from the page, a start queued while the device is offline.
//! Every page is also saved as a screenshot under `target/console-screenshots/`.
//!
//! After each action the tests wait without reloading: what changes on the page arrives through
//! the console's live updates (server-sent events).

use std::time::Duration;

use outpost_tests::browser::Browser;
use outpost_tests::cloud::Cloud;
use outpost_tests::{Agent, eventually, write};
use serde_json::Value;

const QUALITY_GATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/quality-gate.yaml");
const WAIT: Duration = Duration::from_secs(30);

fn online(cloud: &Cloud, id: &str, want: bool) {
    cloud.wait_presence(id, want, WAIT);
}

#[test]
fn fleet_timeline_and_an_approval_from_the_page_complete_the_run_on_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let url = cloud.mqtt_url();
    let mut agent = Agent::start(
        &dir.path().join("agent"),
        &[
            "--broker",
            &url,
            "--device-id",
            "line-1",
            "--label",
            "line=1",
            "--apply",
            QUALITY_GATE,
        ],
    );
    online(&cloud, "line-1", true);
    assert!(agent.cli(&["start", "quality-gate", "--id", "lot-7"]).status.success());
    let out = agent.cli(&["signal", "lot-7", "lot-ready", "--payload", r#"{"lot": 7, "kg": 120}"#]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let b = Browser::start(1000);
    let password = cloud.user("alice", &["operator", "approver", "deployer"]);
    cloud.sign_in(&b, "alice", &password);
    let base = format!("http://127.0.0.1:{}", cloud.api);

    // Fleet: the device, online, with its labels.
    b.goto(&format!("{base}/"));
    b.wait_for(r#"tr[data-device="line-1"] [data-status="online"]"#, WAIT);
    let row = b.text_of(r#"tr[data-device="line-1"]"#);
    assert!(row.contains("line=1"), "fleet row: {row}");
    b.screenshot("fleet");

    // Run page: the approval form appears once the wait has synced (live, no reload).
    b.goto(&format!("{base}/devices/line-1/runs/lot-7"));
    b.wait_for(r#"form.approval[data-step="release"]"#, WAIT);
    b.wait_for(r#"#timeline tr[data-step="lot"][data-type="step_completed"]"#, WAIT);
    b.wait_for(r#"#timeline tr[data-step="release"][data-type="wait_started"]"#, WAIT);
    b.wait_for(r#"g[data-step="lot"][data-state="completed"]"#, WAIT);
    b.wait_for(r#"g[data-step="release"][data-state="waiting"]"#, WAIT);
    let timeline = b.text_of("#timeline");
    assert!(timeline.contains("waiting for approval"), "{timeline}");
    assert!(
        timeline.contains(r#""lot":7"#),
        "signal payload in the timeline: {timeline}"
    );
    b.screenshot("run-waiting");

    let comment = b.wait_for(r#"form.approval input[name="comment"]"#, WAIT);
    b.type_into(&comment, "moisture ok");
    // Events arriving while the operator types refresh the page but leave the form alone.
    let before = b.js("return document.body.dataset.refreshed || ''");
    let out = agent.cli(&["signal", "lot-7", "shift-change", "--payload", r#"{"shift": 2}"#]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually(WAIT, "a live refresh after the signal", || {
        let timeline = b.text_of("#timeline");
        let now = b.js("return document.body.dataset.refreshed || ''");
        (timeline.contains("signal shift-change") && now != before).then_some(())
    });
    let typed = b.js(r#"return document.querySelector('form.approval input[name="comment"]').value"#);
    assert_eq!(typed, "moisture ok", "the refresh replaced the form being typed in");
    let approve = b.wait_for(r#"form.approval button[value="approve"]"#, WAIT);
    b.click(&approve);
    b.wait_for(".flash.ok", WAIT);

    // The run completes on the agent, and the page shows it without a reload.
    b.wait_for(r#"#run-head [data-status="completed"]"#, WAIT);
    b.wait_for(r#"g[data-step="released"][data-state="completed"]"#, WAIT);
    assert!(
        b.all("form.approval").is_empty(),
        "the approval form is gone once decided"
    );
    let run = agent.json(&["show", "lot-7"]);
    assert_eq!(run["status"], "completed", "{run}");
    let output = run["output"].to_string();
    assert!(output.contains("alice") && output.contains("moisture ok"), "{output}");
    let timeline = b.text_of("#timeline");
    assert!(timeline.contains("run completed"), "{timeline}");
    b.screenshot("run");

    b.goto(&format!("{base}/devices/line-1"));
    b.wait_for(r#"tr[data-run="lot-7"] [data-status="completed"]"#, WAIT);
    b.wait_for(r#"#commands [data-state="applied"]"#, WAIT);
    b.screenshot("device");

    // Presence is live too: the fleet page turns the device offline when its agent dies.
    b.goto(&format!("{base}/"));
    b.wait_for(r#"tr[data-device="line-1"] [data-status="online"]"#, WAIT);
    agent.kill9();
    b.wait_for(r#"tr[data-device="line-1"] [data-status="offline"]"#, WAIT);
    b.screenshot("fleet-offline");
}

const HELLO: &str = r#"
name: console-hello
version: 1
steps:
  - id: greet
    action: set
    args: {greeting: "hello from the console"}
"#;

#[test]
fn a_deployment_and_a_start_from_the_page_reach_the_device_also_after_it_was_offline() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let url = cloud.mqtt_url();
    let mut agent = Agent::start(
        &dir.path().join("agent"),
        &["--broker", &url, "--device-id", "line-2", "--label", "line=2"],
    );
    online(&cloud, "line-2", true);
    let file = write(dir.path(), "console-hello.yaml", HELLO);

    let b = Browser::start(1000);
    let password = cloud.user("alice", &["operator", "approver", "deployer"]);
    cloud.sign_in(&b, "alice", &password);
    let base = format!("http://127.0.0.1:{}", cloud.api);

    // A definition file chosen in the form, one device ticked.
    b.goto(&format!("{base}/deployments"));
    let input = b.wait_for(r#"#deploy-form input[type="file"]"#, WAIT);
    b.type_into(&input, &file);
    eventually(WAIT, "the file to fill the form", || {
        let v = b.js(r#"return document.querySelector('textarea[name="document"]').value"#);
        v.as_str().filter(|t| t.contains("console-hello")).map(str::to_string)
    });
    let tick = b.wait_for(r#"input[name="device"][value="line-2"]"#, WAIT);
    b.click(&tick);
    let deploy = b.wait_for("#deploy-form button[type=submit]", WAIT);
    b.click(&deploy);
    b.wait_for(
        r#"#deployment-devices tr[data-device="line-2"][data-state="applied"]"#,
        WAIT,
    );
    assert!(b.url().contains("/deployments/d"), "{}", b.url());
    b.wait_for(r#"g[data-step="greet"][data-state="pending"]"#, WAIT);
    b.screenshot("deployment");
    let defs = agent.json(&["definitions"]);
    assert!(defs.to_string().contains("console-hello"), "{defs}");

    // A bad definition is refused with the reason, and the text stays in the form.
    b.goto(&format!("{base}/deployments"));
    let area = b.wait_for(r#"textarea[name="document"]"#, WAIT);
    b.type_into(&area, "name: broken\nversion: 1\nsteps: 7\n");
    let tick = b.wait_for(r#"input[name="device"][value="line-2"]"#, WAIT);
    b.click(&tick);
    let deploy = b.wait_for("#deploy-form button[type=submit]", WAIT);
    b.click(&deploy);
    let err = b.text(&b.wait_for(".flash.error", WAIT));
    assert!(err.contains("definition"), "{err}");
    let kept = b.js(r#"return document.querySelector('textarea[name="document"]').value"#);
    assert!(kept.to_string().contains("broken"), "{kept}");

    // Offline: a start from the device page is queued and shown pending.
    agent.kill9();
    online(&cloud, "line-2", false);
    b.goto(&format!("{base}/devices/line-2"));
    b.wait_for(r#"#device-head [data-status="offline"]"#, WAIT);
    let option = b.wait_for(r#"select[name="workflow"] option[value="console-hello"]"#, WAIT);
    b.click(&option);
    let run_id = b.wait_for(r#"#start-form input[name="run_id"]"#, WAIT);
    b.type_into(&run_id, "from-console");
    let start = b.wait_for("#start-form button[type=submit]", WAIT);
    b.click(&start);
    b.wait_for(".flash.ok", WAIT);
    b.wait_for(r#"#commands tr[data-state="pending"]"#, WAIT);
    b.screenshot("device-offline-pending");

    // Back online: it applies, and the page follows live.
    agent.restart();
    b.wait_for(r#"#device-head [data-status="online"]"#, WAIT);
    b.wait_for(r#"tr[data-run="from-console"] [data-status="completed"]"#, WAIT);
    assert!(b.all(r#"#commands tr[data-state="pending"]"#).is_empty());
    let run = agent.json(&["show", "from-console"]);
    assert_eq!(run["status"], "completed", "{run}");
    assert!(run["output"].to_string().contains("hello from the console"), "{run}");
    b.screenshot("device-back");
}

#[test]
fn signal_reject_cancel_and_desired_state_from_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let url = cloud.mqtt_url();
    let controller = dir.path().join("controller");
    let apply_state = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/apply-state.yaml");
    let agent = Agent::start_with_env(
        &dir.path().join("agent"),
        &[
            "--broker",
            &url,
            "--device-id",
            "line-3",
            "--apply",
            QUALITY_GATE,
            "--apply",
            apply_state,
            "--remediation",
            "apply-state",
        ],
        &[("OUTPOST_CONTROLLER_DIR", &controller.to_string_lossy())],
    );
    online(&cloud, "line-3", true);
    for lot in ["lot-8", "lot-9"] {
        assert!(agent.cli(&["start", "quality-gate", "--id", lot]).status.success());
    }
    let b = Browser::start(1000);
    let password = cloud.user("bob", &["operator", "approver", "deployer"]);
    cloud.sign_in(&b, "bob", &password);
    let base = format!("http://127.0.0.1:{}", cloud.api);

    // The signal the run waits for is filled in; the payload reaches the run.
    b.goto(&format!("{base}/devices/line-3/runs/lot-8"));
    b.wait_for(r#"g[data-step="lot"][data-state="waiting"]"#, WAIT);
    let name = b.wait_for(r#"#signal-form input[name="name"]"#, WAIT);
    let prefilled = b.js(r#"return document.querySelector('#signal-form input[name="name"]').value"#);
    assert_eq!(prefilled, "lot-ready");
    let _ = name;
    let payload = b.wait_for(r#"#signal-form input[name="payload"]"#, WAIT);
    b.type_into(&payload, r#"{"lot": 8, "kg": 95}"#);
    b.click(&b.wait_for("#signal-form button", WAIT));
    b.wait_for(r#"form.approval[data-step="release"]"#, WAIT);

    // Rejected, with who and why: the step and the run fail on the agent.
    b.type_into(&b.wait_for(r#"form.approval input[name="comment"]"#, WAIT), "too wet");
    b.click(&b.wait_for(r#"form.approval button[value="reject"]"#, WAIT));
    b.wait_for(r#"#run-head [data-status="failed"]"#, WAIT);
    b.wait_for(r#"g[data-step="release"][data-state="failed"]"#, WAIT);
    let timeline = b.text_of("#timeline");
    assert!(timeline.contains("rejected by bob: too wet"), "{timeline}");
    let run = agent.json(&["show", "lot-8"]);
    assert_eq!(run["status"], "failed", "{run}");
    // The signal sent from the page names its sender in the gateway's own history.
    let from = outpost_tests::events_of(&run, "signal_from");
    assert_eq!(from.len(), 1, "{run}");
    assert_eq!(from[0]["by"], "bob", "{run}");
    assert!(
        run.to_string().contains(r#"\"kg\":95"#) || run.to_string().contains(r#""kg":95"#),
        "{run}"
    );
    b.screenshot("run-rejected");

    // Cancelled from the page.
    b.goto(&format!("{base}/devices/line-3/runs/lot-9"));
    b.type_into(
        &b.wait_for(r#"#cancel-form input[name="reason"]"#, WAIT),
        "line stopped",
    );
    b.click(&b.wait_for("#cancel-form button", WAIT));
    b.wait_for(r#"#run-head [data-status="cancelled"]"#, WAIT);
    assert_eq!(agent.json(&["show", "lot-9"])["status"], "cancelled");

    // Desired state: remediated on the device, verified, reported in sync.
    b.goto(&format!("{base}/devices/line-3"));
    let doc = b.wait_for(r#"#desired-form textarea[name="document"]"#, WAIT);
    b.clear(&doc);
    b.type_into(&doc, r#"{"setpoint": 180, "fan": "auto"}"#);
    b.click(&b.wait_for("#desired-form button", WAIT));
    b.wait_for(".flash.ok", WAIT);
    let badge = b.wait_for(r#"#state [data-drift="in_sync"]"#, WAIT);
    assert!(b.text(&badge).contains("in sync v1"), "{}", b.text(&badge));
    let written = std::fs::read_to_string(controller.join("outpost-controller.json")).unwrap();
    let written: Value = serde_json::from_str(&written).unwrap();
    assert_eq!(written["setpoint"], 180);
    b.screenshot("device-desired");
    b.goto(&format!("{base}/"));
    b.wait_for(r#"tr[data-device="line-3"] [data-drift="in_sync"]"#, WAIT);
}

#[test]
fn times_show_in_the_browsers_time_zone_or_in_utc_as_the_operator_chooses() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let password = cloud.user("tz-admin", &["admin"]);
    // Tokyo: +09:00 all year, so the test does not depend on daylight saving.
    let b = Browser::start_in(900, Some("Asia/Tokyo"));
    cloud.sign_in(&b, "tz-admin", &password);
    b.goto(&format!("http://127.0.0.1:{}/audit", cloud.api));
    b.wait_for("#audit time.at", WAIT);
    // The sign-in is audited: its time is written in UTC and shown in Tokyo time.
    let (utc, shown) = eventually(WAIT, "the time in local form", || {
        let v = b.js(
            "const t = document.querySelector('#audit time.at'); return [t.getAttribute('datetime'), t.textContent];",
        );
        let utc = v[0].as_str()?.to_string();
        let shown = v[1].as_str()?.to_string();
        shown.ends_with("+09:00").then_some((utc, shown))
    });
    let hour = |t: &str, at: usize| t.get(at..at + 2).and_then(|h| h.parse::<u32>().ok()).unwrap();
    assert_eq!(hour(&shown, 11), (hour(&utc, 11) + 9) % 24, "{utc} shown as {shown}");
    assert_eq!(b.text_of("#clock"), "times: local");
    b.screenshot("audit-local-time");

    // UTC, chosen on the page, is remembered across pages.
    b.click(&b.wait_for("#clock", WAIT));
    eventually(WAIT, "the time in UTC", || {
        (b.text_of("#audit time.at") == utc).then_some(())
    });
    b.goto(&format!("http://127.0.0.1:{}/audit", cloud.api));
    b.wait_for("#audit time.at", WAIT);
    eventually(WAIT, "UTC after a reload", || {
        (b.text_of("#clock") == "times: UTC" && b.text_of("#audit time.at").ends_with('Z')).then_some(())
    });
}
