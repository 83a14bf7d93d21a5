//! Staged rollouts with real agents, a real cloud-sync (killed mid-wave) and Chromium: canaries,
//! waves at a pace, a health gate from the mirrored runs, halt and rollback, offline devices.

use std::time::Duration;

use outpost_tests::browser::Browser;
use outpost_tests::cloud::Cloud;
use outpost_tests::{Agent, eventually, ts_ms};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn start_fleet(dir: &std::path::Path, cloud: &Cloud, n: usize) -> Vec<Agent> {
    let agents: Vec<Agent> = (1..=n)
        .map(|i| {
            let id = format!("gw{i:02}");
            let site = format!("site={}", if i % 2 == 0 { "north" } else { "south" });
            let flags = [
                "--broker",
                &cloud.mqtt_url(),
                "--device-id",
                &id,
                "--label",
                &site,
                "--label",
                "fleet=plant",
            ];
            Agent::start(&dir.join(&id), &flags)
        })
        .collect();
    for i in 1..=n {
        cloud.wait_presence(&format!("gw{i:02}"), true, Duration::from_secs(60));
    }
    agents
}

fn deployment(cloud: &Cloud, id: &str) -> Value {
    cloud.get(&format!("/v1/deployments/{id}"))
}

fn device<'a>(d: &'a Value, id: &str) -> &'a Value {
    d["devices"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["device"] == id))
        .unwrap_or_else(|| panic!("{id} is not in {d}"))
}

fn wave(d: &Value, i: usize) -> Vec<String> {
    d["rollout"]["waves"][i]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn versions(agent: &Agent) -> Vec<u64> {
    let defs = agent.json(&["definitions"]);
    defs.as_array()
        .unwrap()
        .iter()
        .filter(|d| d["name"] == "recipe")
        .map(|d| d["version"].as_u64().unwrap())
        .collect()
}

const GOOD: &str =
    "name: recipe\nversion: 1\nschedules:\n  - {id: t, every: 1s}\nsteps:\n  - {id: s, action: set, args: {v: 1}}\n";
const SLOW: &str = "name: recipe\nversion: 1\nschedules:\n  - {id: t, every: 1s}\nsteps:\n  - {id: s, action: sleep, args: {duration: 1h}}\n";
const BAD: &str = "name: recipe\nversion: 2\nschedules:\n  - {id: t, every: 1s}\nsteps:\n  - {id: s, action: fail, args: {message: broken recipe}}\n";

#[test]
fn a_good_version_rolls_out_in_waves_through_a_kill_and_a_bad_one_halts_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::embedded(&dir.path().join("cloud"));
    let mut agents = start_fleet(dir.path(), &cloud, 20);
    // One canary is offline when the rollout starts.
    agents[2].kill9();
    cloud.wait_presence("gw03", false, Duration::from_secs(60));

    let (code, d) = cloud.send(
        "POST",
        "/v1/deployments",
        &json!({"document": GOOD, "labels": {"fleet": "plant"}, "rollout": {
            "canary": ["gw01", "gw02", "gw03"], "wave": "50%", "pace": "6s", "bake": "2s",
            "gate": {"min_runs": 2}}}),
    );
    assert_eq!(code, 201, "{d}");
    let id = d["id"].as_str().unwrap().to_string();
    let names: Vec<&str> = d["rollout"]["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["canary", "wave 1", "wave 2"], "{d}");
    assert_eq!((wave(&d, 0).len(), wave(&d, 1).len(), wave(&d, 2).len()), (3, 10, 7));
    assert_eq!(d["rollout"]["waves_sent"], 1, "the canaries go at once: {d}");
    let (wave1, wave2) = (wave(&d, 1), wave(&d, 2));
    for dev in wave1.iter().chain(&wave2) {
        assert_eq!(device(&d, dev)["state"], "waiting", "{d}");
    }

    // SIGKILL of cloud-sync once wave 1 is out: the rollout goes on from its stored state.
    let mut killed = false;
    let done = eventually(Duration::from_secs(150), "the rollout to complete", || {
        let d = deployment(&cloud, &id);
        if !killed && d["rollout"]["waves_sent"] == 2 {
            for dev in &wave2 {
                assert_eq!(device(&d, dev)["state"], "waiting", "wave 2 waits for wave 1: {d}");
            }
            cloud.kill9();
            cloud.restart();
            killed = true;
            return None;
        }
        (d["rollout"]["state"] == "completed").then_some(d)
    });
    assert!(killed);
    let r = &done["rollout"];
    let started: Vec<(String, u64)> = r["log"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["text"].as_str().unwrap().contains(" started: "))
        .map(|l| (l["text"].as_str().unwrap().to_string(), ts_ms(&l["at"])))
        .collect();
    assert_eq!(started.len(), 3, "each wave started once, also across the kill: {r}");
    assert!(
        started[0].0.starts_with("canary") && started[1].0.starts_with("wave 1") && started[2].0.starts_with("wave 2"),
        "{started:?}"
    );
    assert!(started[1].1 - started[0].1 >= 6000, "the pace was kept: {started:?}");
    assert!(started[2].1 - started[1].1 >= 6000, "the pace was kept: {started:?}");
    // The offline canary did not hold anything; it is counted and still pending.
    assert_eq!(device(&done, "gw03")["state"], "pending", "{done}");
    assert_eq!(r["evidence"]["offline"], json!(["gw03"]), "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("1 device offline, updated when they return"),
        "{r}"
    );
    assert_eq!(done["counts"]["applied"], 19, "{done}");
    assert!(r["evidence"]["runs_completed"].as_u64().unwrap() >= 2, "{r}");
    assert!(cloud.log().contains("rollout"), "the rollout's steps are logged");
    // It returns and gets the version.
    agents[2].restart();
    eventually(WAIT, "gw03 to apply on return", || {
        (device(&deployment(&cloud, &id), "gw03")["state"] == "applied").then_some(())
    });
    assert_eq!(versions(&agents[2]), [1]);

    // A bad version: its runs fail on the canaries, so it halts there and they are rolled back.
    let (code, d) = cloud.send(
        "POST",
        "/v1/deployments",
        &json!({"document": BAD, "labels": {"fleet": "plant"}, "rollout": {
            "canary": ["gw01", "gw02"], "wave": "50%", "pace": "5s", "bake": "2m", "on_failure": "rollback"}}),
    );
    assert_eq!(code, 201, "{d}");
    let bad = d["id"].as_str().unwrap().to_string();
    let halted = eventually(Duration::from_secs(60), "the bad version to halt", || {
        let d = deployment(&cloud, &bad);
        (d["rollout"]["state"] == "rolled_back").then_some(d)
    });
    let r = &halted["rollout"];
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.starts_with("halted at canary: "), "{r}");
    assert!(reason.contains("ended runs of v2 failed (at most 0 allowed)"), "{r}");
    assert!(reason.contains("v1 deployed back as v3 to 2 devices updated"), "{r}");
    assert!(
        !r["evidence"]["failed_runs"].as_array().unwrap().is_empty(),
        "the evidence names the failed runs: {r}"
    );
    assert_eq!(r["waves_sent"], 1, "{r}");
    for dev in wave(&halted, 1).iter().chain(&wave(&halted, 2)) {
        let row = device(&halted, dev);
        assert_eq!(row["state"], "not_sent", "{halted}");
        assert_eq!(row["reason"], "the rollout is rolled back", "{row}");
    }
    let rollback = r["rollback_deployment"].as_str().unwrap().to_string();
    let back = eventually(WAIT, "the rollback to be applied", || {
        let d = deployment(&cloud, &rollback);
        (d["counts"]["applied"] == 2).then_some(d)
    });
    assert_eq!(back["version"], 3, "{back}");
    // The canaries run the old recipe again, as v3; the rest never saw v2.
    for i in [0, 1] {
        eventually(WAIT, "v3 on the canaries", || {
            versions(&agents[i]).contains(&3).then_some(())
        });
    }
    for agent in &agents[2..] {
        assert_eq!(versions(agent), [1], "only the canaries received the bad version");
    }
    eventually(WAIT, "v3 runs to complete on a canary", || {
        let runs = cloud.get("/v1/devices/gw01/runs");
        runs.as_array()
            .unwrap()
            .iter()
            .any(|r| r["workflow"] == "recipe" && r["version"] == 3 && r["status"] == "completed")
            .then_some(())
    });
    let page = deployment(&cloud, &bad);
    assert!(page["active_runs"].is_object(), "{page}");
}

#[test]
fn a_rollout_is_made_paused_resumed_and_aborted_from_the_console() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let _agents = start_fleet(dir.path(), &cloud, 3);
    let b = Browser::start(1000);
    let password = cloud.user("dora", &["deployer"]);
    cloud.sign_in(&b, "dora", &password);
    let base = format!("http://127.0.0.1:{}", cloud.api);

    b.goto(&format!("{base}/deployments"));
    let area = b.wait_for(r#"textarea[name="document"]"#, WAIT);
    // Its runs take a while, so the page has active runs to count.
    b.type_into(&area, SLOW);
    let labels = b.wait_for(r#"#deploy-form input[name="labels"]"#, WAIT);
    b.type_into(&labels, "fleet=plant");
    b.click(&b.wait_for(r#"#rollout-plan input[name="staged"]"#, WAIT));
    for (field, value) in [("canary", "gw02"), ("wave", "1"), ("pace", "1h"), ("bake", "1s")] {
        let input = b.wait_for(&format!(r#"#rollout-plan input[name="{field}"]"#), WAIT);
        b.type_into(&input, value);
    }
    b.click(&b.wait_for("#deploy-form button[type=submit]", WAIT));
    b.wait_for(r#"#rollout[data-rollout-state="running"]"#, WAIT);
    assert!(b.url().contains("/deployments/d"), "{}", b.url());
    let id = b.url().rsplit('/').next().unwrap().to_string();
    // The canary applies and passes its gate; the next wave waits for the pace.
    eventually(WAIT, "the canary to pass", || {
        b.text_of("#rollout-reason")
            .contains("passed its gate; waiting for wave 1 at")
            .then_some(())
    });
    b.wait_for(
        r#"#deployment-devices tr[data-device="gw02"][data-state="applied"]"#,
        WAIT,
    );
    b.wait_for(r#"#active-runs span[data-version="1"]"#, WAIT);
    assert!(
        b.text_of("#active-runs").contains("v1: 1"),
        "{}",
        b.text_of("#active-runs")
    );
    b.screenshot("rollout-running");

    b.click(&b.wait_for("#rollout-pause", WAIT));
    b.wait_for(r#"#rollout[data-rollout-state="paused"]"#, WAIT);
    assert!(
        b.text_of("#rollout-reason").contains("paused by dora"),
        "{}",
        b.text_of("#rollout-reason")
    );
    b.click(&b.wait_for("#rollout-resume", WAIT));
    b.wait_for(r#"#rollout[data-rollout-state="running"]"#, WAIT);
    b.click(&b.wait_for("#rollout-abort", WAIT));
    b.wait_for(r#"#rollout[data-rollout-state="aborted"]"#, WAIT);
    assert!(b.text_of("#rollout-reason").contains("aborted by dora"));
    assert!(
        b.all("#rollout-actions").is_empty(),
        "an aborted rollout has no controls"
    );
    b.wait_for(
        r#"#deployment-devices tr[data-device="gw01"][data-state="not_sent"]"#,
        WAIT,
    );
    b.screenshot("rollout-aborted");
    let d = deployment(&cloud, &id);
    assert_eq!(d["rollout"]["waves_sent"], 1, "nothing went out after the canary: {d}");

    let kinds: Vec<(String, String)> = cloud
        .audit()
        .into_iter()
        .filter(|a| a["kind"].as_str().unwrap_or("").starts_with("rollout.") && a["target"] == id.as_str())
        .map(|a| {
            (
                a["kind"].as_str().unwrap().to_string(),
                a["who"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = ["rollout.pause", "rollout.resume", "rollout.abort"]
        .iter()
        .map(|k| (k.to_string(), "dora".to_string()))
        .collect();
    assert_eq!(kinds, want);
    // An order that does not apply is refused with the reason.
    let (code, v) = cloud.send("POST", &format!("/v1/deployments/{id}/resume"), &json!({}));
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the rollout is aborted: nothing to resume"),
        "{v}"
    );
}

fn health(healthy: bool, version: u32) -> String {
    format!(
        "name: recipe-health\nversion: {version}\nschedules:\n  - {{id: t, every: 1s}}\nsteps:\n  - {{id: check, action: set, args: {{healthy: {healthy}}}}}\n"
    )
}

fn deploy_at_once(cloud: &Cloud, document: &str) {
    let (code, d) = cloud.send(
        "POST",
        "/v1/deployments",
        &json!({"document": document, "labels": {"fleet": "plant"}}),
    );
    assert_eq!(code, 201, "{d}");
    let id = d["id"].as_str().unwrap().to_string();
    eventually(WAIT, "a deployment to every device", || {
        let d = deployment(cloud, &id);
        (d["counts"]["applied"] == 4).then_some(())
    });
}

#[test]
fn waves_go_site_by_site_and_a_health_workflow_gates_them() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let _agents = start_fleet(dir.path(), &cloud, 4);
    deploy_at_once(&cloud, &health(true, 1));
    let plan = json!({"wave_by_label": "site", "pace": "1s", "bake": "1s", "gate": {"workflow": "recipe-health"}});
    let (code, d) = cloud.send(
        "POST",
        "/v1/deployments",
        &json!({"document": GOOD, "labels": {"fleet": "plant"}, "rollout": plan}),
    );
    assert_eq!(code, 201, "{d}");
    let id = d["id"].as_str().unwrap().to_string();
    assert_eq!(wave(&d, 0), ["gw02", "gw04"], "{d}");
    assert_eq!(d["rollout"]["waves"][0]["name"], "site=north");
    assert_eq!(wave(&d, 1), ["gw01", "gw03"]);
    let done = eventually(Duration::from_secs(60), "the rollout to complete", || {
        let d = deployment(&cloud, &id);
        (d["rollout"]["state"] == "completed").then_some(d)
    });
    let checks = done["rollout"]["evidence"]["health"].as_array().unwrap().clone();
    assert_eq!(checks.len(), 4, "a health verdict from every updated device: {done}");
    assert!(checks.iter().all(|c| c[1] == true), "{done}");

    // The health workflow now says unhealthy: the next version halts after the first site.
    deploy_at_once(&cloud, &health(false, 2));
    let v2 = GOOD.replace("version: 1", "version: 2");
    let (code, d) = cloud.send(
        "POST",
        "/v1/deployments",
        &json!({"document": v2, "labels": {"fleet": "plant"}, "rollout": plan}),
    );
    assert_eq!(code, 201, "{d}");
    let id = d["id"].as_str().unwrap().to_string();
    let halted = eventually(Duration::from_secs(60), "the unhealthy gate to halt", || {
        let d = deployment(&cloud, &id);
        (d["rollout"]["state"] == "halted").then_some(d)
    });
    let reason = halted["rollout"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("halted at site=north: health check recipe-health on gw0"),
        "{reason}"
    );
    assert!(reason.contains("says unhealthy"), "{reason}");
    for dev in ["gw01", "gw03"] {
        assert_eq!(device(&halted, dev)["state"], "not_sent", "{halted}");
    }
}
