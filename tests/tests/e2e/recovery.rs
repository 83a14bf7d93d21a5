//! Restores and replacements (docs/protocol.md, "Restores, rollbacks and replaced gateways"): a
//! cloud store restored from an older copy, a gateway wiped and started again under its id, and
//! a gateway journal restored from a backup. Each ends with the cloud holding exactly what the
//! device's journal holds, with nothing in a resend loop.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use outpost_tests::cloud::Cloud;
use outpost_tests::{Agent, eventually, write};
use serde_json::Value;

const ECHO: &str = "name: echo\nversion: 1\nsteps:\n  - {id: a, action: set, args: {x: 1}}\n";

fn run_some(agent: &Agent, n: usize) {
    for _ in 0..n {
        agent.json(&["start", "echo", "--wait"]);
    }
}

/// Waits until the cloud stores exactly the agent's journal; returns the cloud's device view.
fn in_step(cloud: &Cloud, agent: &Agent, device: &str) -> Value {
    eventually(Duration::from_secs(40), "the cloud to hold the agent's journal", || {
        let ours = agent.json(&["status"])["journal"]["next_seq"].as_u64()? - 1;
        let d = cloud.device(device)?;
        (d["stored_seq"].as_u64()? == ours && d["online"] == true).then_some(d)
    })
}

fn run_ids(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["run_id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn same_runs(cloud: &Cloud, agent: &Agent, device: &str) {
    let ours = run_ids(&agent.json(&["list", "--limit", "1000"]));
    let theirs = run_ids(&cloud.get(&format!("/v1/devices/{device}/runs")));
    assert_eq!(ours, theirs, "the cloud's runs are not the agent's");
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {} → {}: {e}", from.display(), to.display()));
}

#[test]
fn a_cloud_store_restored_from_an_older_copy_gets_back_what_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let cdir = dir.path().join("cloud");
    let mut cloud = Cloud::embedded(&cdir);
    let port = cloud.mqtt;
    let agent = Agent::start(
        &dir.path().join("agent"),
        &["--broker", &cloud.mqtt_url(), "--device-id", "gw1"],
    );
    agent.json(&["apply", &write(dir.path(), "echo.yaml", ECHO)]);
    run_some(&agent, 3);
    in_step(&cloud, &agent, "gw1");
    cloud.kill9();
    let backup = dir.path().join("cloud-backup.redb");
    copy(&cdir.join("cloud.redb"), &backup);
    cloud.restart();
    run_some(&agent, 3);
    in_step(&cloud, &agent, "gw1");

    // The store comes back from the older copy; the agent has acknowledged events it lacks.
    cloud.kill9();
    copy(&backup, &cdir.join("cloud.redb"));
    let cloud = Cloud::start_on(&cdir, port);
    let d = in_step(&cloud, &agent, "gw1");
    assert_eq!(d["journal"]["lost_events"], 0, "the journal still had them: {d}");
    same_runs(&cloud, &agent, "gw1");
    assert_eq!(agent.json(&["status"])["sync"]["bad_acks"], 0);
}

#[test]
fn a_wiped_gateway_under_the_same_id_syncs_again_and_the_old_history_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let args = ["--broker", &cloud.mqtt_url(), "--device-id", "gw2"];
    let def = write(dir.path(), "echo.yaml", ECHO);
    let mut old = Agent::start(&dir.path().join("old"), &args);
    old.json(&["apply", &def]);
    run_some(&old, 4);
    let before = in_step(&cloud, &old, "gw2");
    old.kill9();

    // The same device id on an empty journal: epochs and sequences start again at 1.
    let new = Agent::start(&dir.path().join("new"), &args);
    new.json(&["apply", &def]);
    run_some(&new, 2);
    let d = in_step(&cloud, &new, "gw2");
    assert_eq!(
        d["journal"]["archived_events"], before["stored_seq"],
        "the old journal's events are kept aside: {d}"
    );
    assert_ne!(d["journal"]["id"], before["journal"]["id"]);
    same_runs(&cloud, &new, "gw2");
}

#[test]
fn a_gateway_journal_restored_from_a_backup_replaces_the_history_it_no_longer_has() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::embedded(&dir.path().join("cloud"));
    let adir = dir.path().join("agent");
    let mut agent = Agent::start(&adir, &["--broker", &cloud.mqtt_url(), "--device-id", "gw3"]);
    agent.json(&["apply", &write(dir.path(), "echo.yaml", ECHO)]);
    run_some(&agent, 2);
    in_step(&cloud, &agent, "gw3");
    agent.kill9();
    // A backup is both files: events acknowledged since the last checkpoint are only in the log.
    let backup = dir.path().join("journal-backup.redb");
    copy(&adir.join("journal.redb"), &backup);
    copy(&adir.join("journal.log"), &backup.with_extension("log"));
    agent.restart();
    run_some(&agent, 3);
    in_step(&cloud, &agent, "gw3");

    // Back to the backup: the cloud holds three runs this journal never had, and the journal's
    // next events reuse their sequences.
    agent.kill9();
    copy(&backup, &adir.join("journal.redb"));
    copy(&backup.with_extension("log"), &adir.join("journal.log"));
    agent.restart();
    run_some(&agent, 2);
    let d = in_step(&cloud, &agent, "gw3");
    assert!(d["journal"]["archived_events"].as_u64().unwrap_or(0) > 0, "{d}");
    same_runs(&cloud, &agent, "gw3");
    assert!(
        cloud.log().contains("differs from the stored one"),
        "the divergence is logged"
    );
}

#[test]
fn events_retention_deleted_before_a_restored_store_got_them_are_recorded_as_lost() {
    let dir = tempfile::tempdir().unwrap();
    let cdir = dir.path().join("cloud");
    let mut cloud = Cloud::embedded(&cdir);
    let port = cloud.mqtt;
    // Finished runs go a second after they end, once the cloud has acknowledged them.
    let agent = Agent::start(
        &dir.path().join("agent"),
        &[
            "--broker",
            &cloud.mqtt_url(),
            "--device-id",
            "gw-lost",
            "--retention",
            "1s",
            "--prune-interval",
            "1s",
        ],
    );
    agent.json(&["apply", &write(dir.path(), "echo.yaml", ECHO)]);
    run_some(&agent, 2);
    in_step(&cloud, &agent, "gw-lost");
    cloud.kill9();
    let backup = dir.path().join("cloud-backup.redb");
    copy(&cdir.join("cloud.redb"), &backup);
    cloud.restart();
    run_some(&agent, 3);
    let d = in_step(&cloud, &agent, "gw-lost");
    let acked = d["stored_seq"].as_u64().unwrap();
    // Retention deletes the acknowledged runs from the gateway's journal.
    eventually(Duration::from_secs(20), "retention to delete the finished runs", || {
        let runs = agent.json(&["list", "--limit", "100"]);
        runs.as_array()?.is_empty().then_some(())
    });

    // The store comes back from the copy made before the last three runs: the gateway no longer
    // has them, so cloud-sync must record them as lost rather than ask for them forever.
    cloud.kill9();
    let stored_in_backup = {
        copy(&backup, &cdir.join("cloud.redb"));
        let c = Cloud::start_on(&cdir, port);
        let d = eventually(
            Duration::from_secs(30),
            "the restored cloud to judge the journal",
            || {
                let d = c.device("gw-lost")?;
                (d["journal"]["lost_events"].as_u64()? > 0).then_some(d)
            },
        );
        let lost = d["journal"]["lost_events"].as_u64().unwrap();
        let stored = d["stored_seq"].as_u64().unwrap();
        assert!(
            lost > 0 && stored == acked,
            "lost {lost}, stored {stored}, acked before {acked}: {d}"
        );
        let stats = c.get("/v1/stats");
        assert_eq!(stats["lost_events"].as_u64(), Some(lost), "{stats}");
        assert!(c.log().contains("events lost"), "the loss is not logged");
        // No resend loop: the gateway is not asked again and again.
        let resends = stats["resend_requests"].as_u64().unwrap_or(0);
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            c.get("/v1/stats")["resend_requests"].as_u64().unwrap_or(0),
            resends,
            "a resend loop"
        );
        stored
    };
    assert_eq!(stored_in_backup, acked);
}
