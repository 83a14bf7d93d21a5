//! The chaos suite: SIGKILLs of the agent under a mixed workload, fault storms during a long
//! drain, a full disk under cloud-sync's store, and named hostile inputs against a running
//! system. Each part returns a [`Report`] of what it did and what it found; `outpost-chaos` runs
//! the long version and prints them, the e2e test `chaos` runs a short one and asserts them.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cloud::{Cloud, Proxy, http};
use crate::{Agent, Mosquitto, mqtt_publish, mqtt_try_publish, write};

/// What one part did (figures) and which of its invariants failed.
#[derive(Debug, Default)]
pub struct Report {
    /// The part's name.
    pub part: String,
    /// Named figures, in the order they were taken.
    pub figures: Vec<(String, String)>,
    /// Invariants that did not hold, each said in a sentence.
    pub failures: Vec<String>,
}

impl Report {
    fn new(part: &str) -> Report {
        Report {
            part: part.to_string(),
            ..Report::default()
        }
    }

    fn figure(&mut self, name: &str, value: impl std::fmt::Display) {
        self.figures.push((name.to_string(), value.to_string()));
    }

    /// Records a figure that must be zero.
    fn zero(&mut self, name: &str, value: u64) {
        self.figure(name, value);
        if value != 0 {
            self.failures.push(format!("{name}: {value} (must be 0)"));
        }
    }

    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failures.push(what.into());
        }
    }

    /// True when every invariant held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        writeln!(f, "== {}: {verdict}", self.part)?;
        let width = self.figures.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &self.figures {
            writeln!(f, "   {k:<width$}  {v}")?;
        }
        for e in &self.failures {
            writeln!(f, "   FAILED: {e}")?;
        }
        Ok(())
    }
}

/// Prints progress on long parts to stderr, at most every few seconds.
struct Progress {
    last: Instant,
    every: Duration,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            last: Instant::now(),
            every: Duration::from_secs(10),
        }
    }

    fn tick(&mut self, line: impl FnOnce() -> String) {
        if self.last.elapsed() >= self.every {
            self.last = Instant::now();
            eprintln!("   … {}", line());
        }
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `outpost CMD --json` on a running agent, or `None` when it fails.
fn try_json(agent: &Agent, args: &[&str]) -> Option<Value> {
    let mut all = args.to_vec();
    all.push("--json");
    let out = agent.cli(&all);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn agent_last_seq(agent: &Agent) -> Option<u64> {
    try_json(agent, &["status"])?["journal"]["next_seq"]
        .as_u64()
        .map(|n| n.saturating_sub(1))
}

fn stored_seq(cloud: &Cloud, device: &str) -> u64 {
    cloud.device(device).and_then(|d| d["stored_seq"].as_u64()).unwrap_or(0)
}

fn all_runs(agent: &Agent) -> Vec<Value> {
    try_json(agent, &["list", "--limit", "1000000"])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn running(agent: &Agent) -> Option<usize> {
    try_json(agent, &["list", "--status", "running", "--limit", "1000000"]).and_then(|v| v.as_array().map(Vec::len))
}

/// Waits until the cloud stores the agent's whole journal, then compares them run by run:
/// `(missing, duplicated)` events — what the agent journaled that the cloud lacks, and what the
/// cloud holds beyond the agent's journal.
fn compare_with_cloud(agent: &Agent, cloud: &Cloud, device: &str, timeout: Duration, r: &mut Report) -> (u64, u64) {
    let last = agent_last_seq(agent).unwrap_or(0);
    let caught_up = wait_for(timeout, || (stored_seq(cloud, device) >= last).then_some(()));
    r.check(
        caught_up.is_some(),
        format!(
            "the cloud did not catch up within {timeout:?}: stored {} of {last}",
            stored_seq(cloud, device)
        ),
    );
    let stored = stored_seq(cloud, device);
    r.figure("journal events (agent)", last);
    r.figure("stored events (cloud)", stored);
    let theirs: HashMap<String, u64> = cloud
        .get(&format!("/v1/devices/{device}/runs"))
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| Some((r["run_id"].as_str()?.to_string(), r["events"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    let (mut missing, mut duplicated) = (last.saturating_sub(stored), stored.saturating_sub(last));
    let mut seen = 0;
    for run in all_runs(agent) {
        let Some(id) = run["run_id"].as_str() else { continue };
        let ours = try_json(agent, &["show", id])
            .and_then(|s| s["history"].as_array().map(|h| h.len() as u64))
            .unwrap_or(0);
        let cloud_has = theirs.get(id).copied().unwrap_or(0);
        missing += ours.saturating_sub(cloud_has);
        duplicated += cloud_has.saturating_sub(ours);
        seen += 1;
    }
    duplicated += theirs.len().saturating_sub(seen) as u64;
    (missing, duplicated)
}

// ---------------------------------------------------------------------------------------------
// Part 1: SIGKILLs under a mixed workload.

const EFFECT: &str = r#"echo "$OUTPOST_RUN_ID,$OUTPOST_STEP,$OUTPOST_IDEMPOTENCY_KEY" >> LOG"#;

fn mixed_definitions(log: &Path) -> Vec<(&'static str, String)> {
    let effect = EFFECT.replace("LOG", &log.display().to_string());
    let undo = effect.replace("$OUTPOST_STEP", "undo");
    vec![
        (
            "leaf",
            format!(
                "name: leaf\nversion: 1\nsteps:\n  - id: work\n    action: exec\n    args: {{command: sh, args: ['-c', '{effect}; sleep 0.05']}}\n"
            ),
        ),
        (
            "mix",
            format!(
                r#"name: mix
version: 1
steps:
  - id: prep
    action: exec
    args: {{command: sh, args: ['-c', '{effect}; sleep 0.3']}}
  - id: nap
    action: sleep
    depends_on: [prep]
    args: {{duration: 300ms}}
  - id: gate
    action: wait_signal
    depends_on: [prep]
    args: {{signal: go}}
  - id: child
    action: workflow
    depends_on: [nap]
    args: {{workflow: leaf}}
  - id: fan
    action: map
    depends_on: [gate]
    args: {{items: "{{{{ input.items }}}}", workflow: leaf, concurrency: 2}}
  - id: done
    action: exec
    depends_on: [child, fan]
    args: {{command: sh, args: ['-c', '{effect}']}}
"#
            ),
        ),
        (
            "trip",
            format!(
                r#"name: trip
version: 1
kind: state_machine
steps:
  - id: book
    action: exec
    args: {{command: sh, args: ['-c', '{effect}; sleep 0.05']}}
    compensate: {{action: exec, args: {{command: sh, args: ['-c', '{undo}; sleep 0.05']}}}}
    next: pay
  - id: pay
    action: exec
    args: {{command: sh, args: ['-c', 'sleep 0.05; echo card declined >&2; exit 3']}}
    end: succeed
"#
            ),
        ),
    ]
}

/// The exec steps whose effects the log records, and how each run of a workflow must end.
const EXEC_STEPS: [&str; 4] = ["prep", "done", "work", "book"];

/// Part 1: `kills` SIGKILLs of a syncing agent while mixed runs execute. Runs lost, committed
/// steps re-executed, keys that changed on a re-run and events missing or duplicated in the cloud
/// must all be 0.
pub fn kills(work: &Path, kills: usize, seed: u64) -> Report {
    let mut r = Report::new(&format!("{kills} SIGKILLs of the agent under a mixed workload"));
    let t0 = Instant::now();
    let cloud = Cloud::embedded(&work.join("cloud"));
    let device = "chaos-gw";
    let mut agent = Agent::start(
        &work.join("agent"),
        &["--broker", &cloud.mqtt_url(), "--device-id", device],
    );
    let log = work.join("effects.log");
    for (name, text) in mixed_definitions(&log) {
        agent.json(&["apply", &write(work, &format!("{name}.yaml"), &text)]);
    }

    let mut rng = fastrand::Rng::with_seed(seed);
    let mut to_start: Vec<(String, &str)> = Vec::new();
    let mut to_signal: Vec<String> = Vec::new();
    let mut started: Vec<(String, &str)> = Vec::new();
    let mut in_flight_at_kill = 0usize;
    let mut kills_mid_run = 0usize;
    let mut progress = Progress::new();
    for k in 0..kills {
        to_start.push((format!("mix-{k:05}"), "mix"));
        if k % 3 == 0 {
            to_start.push((format!("trip-{k:05}"), "trip"));
        }
        to_start.retain(|(id, wf)| {
            let input = r#"{"items": [1, 2, 3]}"#;
            let ok = agent.cli(&["start", wf, "--id", id, "--input", input]).status.success();
            if ok {
                started.push((id.clone(), wf));
                if *wf == "mix" {
                    to_signal.push(id.clone());
                }
            }
            !ok
        });
        to_signal.retain(|id| {
            !agent
                .cli(&["signal", id, "go", "--id", &format!("go-{id}")])
                .status
                .success()
        });
        std::thread::sleep(Duration::from_millis(rng.u64(0..400)));
        let n = running(&agent).unwrap_or(0);
        in_flight_at_kill += n;
        kills_mid_run += usize::from(n > 0);
        agent.kill9();
        agent.restart();
        progress.tick(|| format!("{} kills, {} runs started, {:?}", k + 1, started.len(), t0.elapsed()));
    }
    // Whatever could not start or be signalled before the last kill goes now.
    for (id, wf) in std::mem::take(&mut to_start) {
        if agent
            .cli(&["start", wf, "--id", &id, "--input", r#"{"items": [1, 2, 3]}"#])
            .status
            .success()
        {
            started.push((id.clone(), wf));
            if wf == "mix" {
                to_signal.push(id);
            }
        }
    }
    for id in std::mem::take(&mut to_signal) {
        agent.cli(&["signal", &id, "go", "--id", &format!("go-{id}")]);
    }
    let settled = wait_for(Duration::from_secs(300), || (running(&agent)? == 0).then_some(()));
    r.check(settled.is_some(), "runs still running 300 s after the last kill");
    r.figure("kills", kills);
    r.figure("kills with runs in flight", kills_mid_run);
    r.figure(
        "runs in flight per kill (mean)",
        format!("{:.1}", in_flight_at_kill as f64 / kills.max(1) as f64),
    );
    r.figure("runs started (top level)", started.len());

    // Every started run exists and ended as its workflow must.
    let mut lost = 0;
    let mut wrong_outcome = Vec::new();
    for (id, wf) in &started {
        let want = if *wf == "trip" { "compensated" } else { "completed" };
        match try_json(&agent, &["show", id]) {
            None => lost += 1,
            Some(run) if run["status"] != want => wrong_outcome.push(format!("{id}: {}", run["status"])),
            Some(_) => {}
        }
    }
    r.zero("runs lost", lost);
    r.check(
        wrong_outcome.is_empty(),
        format!(
            "runs with another outcome: {:?}",
            wrong_outcome.iter().take(5).collect::<Vec<_>>()
        ),
    );

    // Effects: every exec step ran under one key, was journaled before it ran, and did not run
    // again once its completion was committed.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut effects: HashMap<(String, String), Vec<String>> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ',');
        if let (Some(run), Some(step), Some(key)) = (parts.next(), parts.next(), parts.next()) {
            effects
                .entry((run.to_string(), step.to_string()))
                .or_default()
                .push(key.to_string());
        }
    }
    let runs = all_runs(&agent);
    let (mut reexecuted, mut changed_keys, mut unjournaled, mut reran_in_flight) = (0u64, 0u64, 0u64, 0u64);
    let mut unseen = 0u64;
    let mut children = 0usize;
    for run in &runs {
        let Some(id) = run["run_id"].as_str() else { continue };
        children += usize::from(id.contains(':'));
        let Some(full) = try_json(&agent, &["show", id]) else {
            continue;
        };
        let history = full["history"].as_array().cloned().unwrap_or_default();
        let of = |kind: &str, step: &str| -> Vec<Value> {
            history
                .iter()
                .filter(|e| e["type"] == kind && e["step"] == step)
                .cloned()
                .collect()
        };
        for step in EXEC_STEPS {
            let starts = of("attempt_started", step);
            if starts.is_empty() {
                continue;
            }
            let completed = of("step_completed", step);
            if let Some(done) = completed.first().and_then(|e| e["seq"].as_u64()) {
                reexecuted += starts.iter().filter(|e| e["seq"].as_u64() > Some(done)).count() as u64;
            }
            reexecuted += completed.len().saturating_sub(1) as u64;
            let ran = effects
                .get(&(id.to_string(), step.to_string()))
                .cloned()
                .unwrap_or_default();
            // A completed step that left no effect would mean the log is not what it checks.
            unseen += u64::from(!completed.is_empty() && ran.is_empty());
            unjournaled += ran.len().saturating_sub(starts.len()) as u64;
            reran_in_flight += ran.len().saturating_sub(1) as u64;
            let key = starts.first().map(|e| e["key"].as_str().unwrap_or("").to_string());
            changed_keys += ran.iter().filter(|k| Some(*k) != key.as_ref()).count() as u64;
            changed_keys += starts.iter().filter(|e| e["key"].as_str() != key.as_deref()).count() as u64;
        }
        if let Some(undo) = effects.get(&(id.to_string(), "undo".to_string())) {
            changed_keys += undo
                .iter()
                .filter(|k| !k.ends_with("/compensate") || *k != &undo[0])
                .count() as u64;
        }
    }
    let expected_children = started.iter().filter(|(_, wf)| *wf == "mix").count() * 4;
    r.figure("child and map runs", children);
    r.check(
        children == expected_children,
        format!("{children} child runs, expected exactly {expected_children} (one per step visit and item)"),
    );
    r.figure("in-flight steps re-run with the same key", reran_in_flight);
    r.zero("completed exec steps with no recorded effect", unseen);
    r.zero("committed steps re-executed", reexecuted);
    r.zero("effects without a journaled attempt", unjournaled);
    r.zero("keys that changed on re-run", changed_keys);
    let (missing, duplicated) = compare_with_cloud(&agent, &cloud, device, Duration::from_secs(120), &mut r);
    r.zero("events missing in the cloud", missing);
    r.zero("events duplicated in the cloud", duplicated);
    r.figure("minutes", format!("{:.1}", t0.elapsed().as_secs_f64() / 60.0));
    r
}

// ---------------------------------------------------------------------------------------------
// Part 2: a long drain through fault storms.

/// Which broker the drain goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broker {
    /// cloud-sync's embedded broker: a cloud SIGKILL restarts the broker too.
    Embedded,
    /// Mosquitto, restarted on its own.
    Mosquitto,
}

const VISITS: u64 = 250;

fn burst_definition() -> String {
    format!(
        "name: burst\nversion: 1\nkind: state_machine\nsteps:\n  - id: tick\n    action: set\n    args: {{n: \"{{{{ steps.tick.visits }}}}\"}}\n    choices:\n      - when: steps.tick.visits >= {VISITS}\n        next: done\n    default: tick\n  - id: done\n    action: set\n    args: {{ticks: \"{{{{ steps.tick.visits }}}}\"}}\n    end: succeed\n"
    )
}

/// Part 2: at least `events` events drain from an agent to cloud-sync while cloud-sync is
/// SIGKILLed in storms, the link is cut and the broker restarts. Events lost or duplicated in the
/// cloud must be 0.
pub fn drain(work: &Path, events: u64, broker: Broker, seed: u64) -> Report {
    let mut r = Report::new(&format!(
        "{events}-event drain through fault storms ({broker:?} broker)"
    ));
    let t0 = Instant::now();
    let mut mosquitto = (broker == Broker::Mosquitto).then(Mosquitto::start);
    let mut cloud = match &mosquitto {
        Some(m) => Cloud::external(&work.join("cloud"), m.port),
        None => Cloud::embedded(&work.join("cloud")),
    };
    let proxy = Proxy::start(cloud.mqtt);
    let device = "drain-gw";
    let agent = Agent::start(&work.join("agent"), &["--broker", &proxy.url(), "--device-id", device]);
    agent.json(&["apply", &write(work, "burst.yaml", &burst_definition())]);

    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut cloud_kills, mut cuts, mut broker_restarts, mut refused) = (0u64, 0u64, 0u64, 0u64);
    let mut runs = 0u64;
    let mut next_fault = Instant::now() + Duration::from_millis(rng.u64(300..1000));
    let mut faults = 0u64;
    let mut progress = Progress::new();
    let mut produced = 0;
    while produced < events {
        // Keep a few runs going; a start refused by back-pressure (the outbox is full while the
        // link is down) is tried again.
        if running(&agent).unwrap_or(0) < 4 {
            if agent
                .cli(&["start", "burst", "--id", &format!("b{runs:06}")])
                .status
                .success()
            {
                runs += 1;
            } else {
                refused += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        produced = agent_last_seq(&agent).unwrap_or(produced);
        if Instant::now() >= next_fault {
            // Each kind once first, so even a short run sees all three.
            let kind = if faults < 3 { faults as u8 } else { rng.u8(0..3) };
            faults += 1;
            match kind {
                0 => {
                    // A storm: SIGKILL, restart, and again before it settles.
                    for _ in 0..rng.usize(1..4) {
                        cloud.kill9();
                        std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
                        cloud.restart();
                        cloud_kills += 1;
                    }
                }
                1 => {
                    proxy.cut();
                    std::thread::sleep(Duration::from_millis(rng.u64(200..2000)));
                    proxy.restore();
                    cuts += 1;
                }
                _ => match mosquitto.as_mut() {
                    Some(m) => {
                        m.stop();
                        std::thread::sleep(Duration::from_millis(rng.u64(100..1000)));
                        m.restart();
                        broker_restarts += 1;
                    }
                    None => {
                        // The embedded broker lives in cloud-sync: restarting it is a cloud kill.
                        cloud.kill9();
                        cloud.restart();
                        cloud_kills += 1;
                        broker_restarts += 1;
                    }
                },
            }
            next_fault = Instant::now() + Duration::from_millis(rng.u64(300..1500));
        }
        progress.tick(|| {
            format!(
                "{produced} events journaled, {} stored, {cloud_kills} cloud kills, {cuts} cuts, {broker_restarts} broker restarts",
                stored_seq(&cloud, device)
            )
        });
    }
    let settled = wait_for(Duration::from_secs(300), || (running(&agent)? == 0).then_some(()));
    r.check(settled.is_some(), "burst runs still running 300 s after the last start");
    r.figure("runs", runs);
    r.figure("starts refused by back-pressure (retried)", refused);
    r.figure("cloud-sync SIGKILLs", cloud_kills);
    r.figure("link cuts", cuts);
    r.figure("broker restarts", broker_restarts);
    let timeout = Duration::from_secs(120 + events / 2000);
    let (missing, duplicated) = compare_with_cloud(&agent, &cloud, device, timeout, &mut r);
    let stats = cloud.get("/v1/stats");
    r.figure("redeliveries the cloud recognised", &stats["duplicate_events"]);
    r.zero("events lost in the cloud", missing);
    r.zero("events duplicated in the cloud", duplicated);
    r.figure("minutes", format!("{:.1}", t0.elapsed().as_secs_f64() / 60.0));
    r
}

// ---------------------------------------------------------------------------------------------
// Part 3: a full disk under the cloud's store.

const ECHO: &str = "name: echo\nversion: 1\nsteps:\n  - {id: a, action: set, args: {x: '{{ input.x }}'}}\n";

fn health(cloud: &Cloud) -> u16 {
    http("GET", cloud.api, "/v1/health", None).map(|(c, _)| c).unwrap_or(0)
}

/// Part 3: cloud-sync's store fails like a full disk (the `fault-injection` backend) while a
/// gateway keeps syncing; once space returns ingest resumes and nothing acked is missing.
pub fn full_disk(work: &Path, runs: usize) -> Report {
    let mut r = Report::new("a full disk under cloud-sync's store");
    let marker = work.join("disk-full");
    let marker_s = marker.display().to_string();
    let mut cloud = Cloud::embedded_with_env(&work.join("cloud"), &[("OUTPOST_CLOUD_FULL_DISK_MARKER", &marker_s)]);
    let pid = cloud.pid();
    let device = "disk-gw";
    let agent = Agent::start(
        &work.join("agent"),
        &["--broker", &cloud.mqtt_url(), "--device-id", device],
    );
    agent.json(&["apply", &write(work, "echo.yaml", ECHO)]);
    let start = |i: usize| {
        agent.json(&["start", "echo", "--input", &format!(r#"{{"x": {i}}}"#), "--wait"]);
    };
    for i in 0..runs {
        start(i);
    }
    let before = agent_last_seq(&agent).unwrap_or(0);
    let synced = wait_for(Duration::from_secs(30), || {
        (stored_seq(&cloud, device) >= before).then_some(())
    });
    r.check(synced.is_some(), "the first runs did not sync");

    std::fs::write(&marker, b"").ok();
    let full_at = Instant::now();
    for i in runs..runs * 3 {
        start(i);
    }
    let unhealthy = wait_for(Duration::from_secs(30), || (health(&cloud) == 503).then_some(()));
    r.check(
        unhealthy.is_some(),
        "/v1/health did not answer 503 while the store was failing",
    );
    std::thread::sleep(Duration::from_secs(2));
    let backlog = try_json(&agent, &["status"])
        .and_then(|s| s["sync"]["backlog_events"].as_u64())
        .unwrap_or(0);
    let stored_while_full = stored_seq_raw(&cloud, device);
    r.figure(
        "events journaled while the disk was full",
        agent_last_seq(&agent).unwrap_or(0) - before,
    );
    r.figure("agent backlog while full (unacked)", backlog);
    r.check(
        backlog > 0,
        "the agent's events were acked while the store could not write them",
    );
    r.figure(
        "health while full",
        unhealthy.map_or("200".to_string(), |_| "503".to_string()),
    );
    r.figure(
        "stored while full",
        stored_while_full.map_or("API unavailable".to_string(), |s| s.to_string()),
    );

    std::fs::remove_file(&marker).ok();
    r.figure("seconds full", full_at.elapsed().as_secs());
    let healthy = wait_for(Duration::from_secs(30), || (health(&cloud) == 200).then_some(()));
    r.check(healthy.is_some(), "/v1/health did not recover after space returned");
    let (missing, duplicated) = compare_with_cloud(&agent, &cloud, device, Duration::from_secs(60), &mut r);
    r.zero("events missing after space returned", missing);
    r.zero("events duplicated", duplicated);
    r.check(cloud.alive() && cloud.pid() == pid, "outpost-cloud restarted");
    r
}

fn stored_seq_raw(cloud: &Cloud, device: &str) -> Option<u64> {
    cloud.device(device)?["stored_seq"].as_u64()
}

// ---------------------------------------------------------------------------------------------
// Part 4: named hostile inputs.

/// Where a hostile input's rejection is counted.
#[derive(Clone, Debug)]
enum Counter {
    /// cloud-sync's `/v1/stats` counter `rejected.REASON`.
    Cloud(&'static str),
    /// A counter in the agent's `status --json` under `sync`.
    Agent(&'static str),
    /// Refused at the door by the broker (the publisher's connection is closed).
    Broker,
    /// Refused by the CLI with a non-zero exit and a message naming `0`.
    Cli(&'static str),
    /// A trigger file set aside in `.failed/` with a `.error` file naming `0`.
    TriggerFile(&'static str),
}

impl Counter {
    fn label(&self) -> String {
        match self {
            Counter::Cloud(r) => format!("cloud rejected.{r}"),
            Counter::Agent(c) => format!("agent sync.{c}"),
            Counter::Broker => "refused by the broker".into(),
            Counter::Cli(_) => "refused by the CLI".into(),
            Counter::TriggerFile(_) => "trigger file set aside".into(),
        }
    }
}

struct System {
    cloud: Cloud,
    agent: Agent,
    work: std::path::PathBuf,
    inbox: std::path::PathBuf,
}

impl System {
    fn cloud_counter(&self, reason: &str) -> u64 {
        self.cloud.get("/v1/stats")["counters"][format!("rejected.{reason}")]
            .as_u64()
            .unwrap_or(0)
    }

    fn agent_counter(&self, name: &str) -> u64 {
        try_json(&self.agent, &["status"])
            .and_then(|s| s["sync"][name].as_u64())
            .unwrap_or(0)
    }

    fn failed_files(&self) -> usize {
        std::fs::read_dir(self.inbox.join(".failed"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "error"))
                    .count()
            })
            .unwrap_or(0)
    }
}

/// How a hostile input reaches the system.
enum Send {
    /// A raw MQTT publish on `outpost/v1/{device}/{channel}`.
    Publish(String, Vec<u8>),
    /// `outpost apply FILE` with this text.
    Apply(String),
    /// `outpost start echo --input TEXT`.
    Input(String),
    /// A file dropped in the watched directory.
    File(Vec<u8>),
}

fn hostile_inputs(agent_device: &str) -> Vec<(&'static str, Send, Counter)> {
    use outpost_shared::journal;
    use outpost_shared::protocol::{self, Ack, Birth, Body, CommandResult, EventBatch, Outcome, VERSION};
    let ev = |t: &str| format!("outpost/v1/{t}");
    let evil = |ch: &str| ev(&format!("evil-gw/{ch}"));
    let mine = |ch: &str| ev(&format!("{agent_device}/{ch}"));
    let batch = |b: EventBatch| protocol::encode(&Body::Events(b));
    // A batch of epoch 1 from sequence 1 with any count and compressed bytes.
    let raw_batch = |count: u32, compressed: Vec<u8>| {
        batch(EventBatch {
            epoch: 1,
            first_seq: 1,
            count,
            compressed,
        })
    };
    let good = journal::encode(&journal::Record {
        run_id: "r1".into(),
        at_ms: 1,
        event: journal::Event::RunCancelled { reason: "x".into() },
    });
    let valid_batch = batch(protocol::pack(1, 1, &[good.clone(), good.clone(), good.clone()]));
    let mut overflow = protocol::pack(1, u64::MAX, &[good.clone(), good.clone()]);
    overflow.epoch = 1;
    let mut short = protocol::pack(1, 1, &[good.clone(), good.clone()]);
    short.count = 10;
    let mut zero_seq = protocol::pack(1, 1, std::slice::from_ref(&good));
    zero_seq.first_seq = 0;
    let birth = Body::Birth(Birth {
        epoch: 1,
        last_seq: 0,
        agent_version: "evil".into(),
        labels: Vec::new(),
        journal_id: 1,
        announcement: 1,
        resend_from: 1,
        storage_error: String::new(),
        blocked_runs: Vec::new(),
        insecure: Vec::new(),
        refused: Vec::new(),
    });
    let nested_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let yaml_bomb = {
        let mut y = String::from("name: bomb\nversion: 1\nx0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..10 {
            let prev = i - 1;
            y.push_str(&format!("x{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"));
        }
        y.push_str("steps:\n  - {id: a, action: set, args: {x: *a9}}\n");
        y
    };
    let deep_yaml = format!(
        "name: deep\nversion: 1\nsteps:\n  - {{id: a, action: set, args: {{x: {}1{}}}}}\n",
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    let huge_def = format!(
        "name: huge\nversion: 1\nsteps:\n  - {{id: a, action: set, args: {{x: '{}'}}}}\n",
        "y".repeat(2 << 20)
    );
    vec![
        ("empty payload", Send::Publish(evil("events"), vec![]), Counter::Cloud("malformed")),
        ("4 KiB of 0xff", Send::Publish(evil("events"), vec![0xff; 4096]), Counter::Cloud("unknown_version")),
        (
            "this version's byte and then garbage",
            Send::Publish(evil("events"), [vec![VERSION], vec![0xff; 64]].concat()),
            Counter::Cloud("malformed"),
        ),
        ("protocol version 0", Send::Publish(evil("events"), vec![0, 1, 2, 3]), Counter::Cloud("unknown_version")),
        (
            "a message over the 1 MiB limit (under the packet limit)",
            Send::Publish(evil("events"), [vec![VERSION], vec![0; (1 << 20) + 1024]].concat()),
            Counter::Cloud("too_large"),
        ),
        ("a 2 MiB packet", Send::Publish(evil("events"), vec![1; 2 << 20]), Counter::Broker),
        (
            "an events batch cut in half",
            Send::Publish(evil("events"), valid_batch[..valid_batch.len() / 2].to_vec()),
            Counter::Cloud("malformed"),
        ),
        (
            "count bomb (u32::MAX events in 12 bytes)",
            Send::Publish(
                evil("events"),
                raw_batch(u32::MAX, miniz_oxide::deflate::compress_to_vec(&[1, 7], 6)),
            ),
            Counter::Cloud("malformed"),
        ),
        (
            "deflate bomb (64 MiB of zeros)",
            Send::Publish(
                evil("events"),
                raw_batch(1, miniz_oxide::deflate::compress_to_vec(&vec![0u8; 64 << 20], 10)),
            ),
            Counter::Cloud("malformed"),
        ),
        ("sequence numbers past u64::MAX", Send::Publish(evil("events"), batch(overflow)), Counter::Cloud("malformed")),
        ("a count above the records sent", Send::Publish(evil("events"), batch(short)), Counter::Cloud("malformed")),
        ("first sequence 0", Send::Publish(evil("events"), batch(zero_seq)), Counter::Cloud("malformed")),
        (
            "a compressed stream that is not deflate",
            Send::Publish(
                evil("events"),
                raw_batch(1, vec![0xff; 100]),
            ),
            Counter::Cloud("malformed"),
        ),
        (
            "an undecodable journal record",
            Send::Publish(evil("events"), batch(protocol::pack(1, 1, &[vec![0xee; 40], good.clone()]))),
            Counter::Cloud("undecodable_event"),
        ),
        ("a birth on the events channel", Send::Publish(evil("events"), protocol::encode(&birth)), Counter::Cloud("wrong_channel")),
        ("events on the birth channel", Send::Publish(evil("birth"), valid_batch.clone()), Counter::Cloud("wrong_channel")),
        (
            "an acknowledgement sent up the inventory channel",
            Send::Publish(evil("inventory"), protocol::encode(&Body::Ack(Ack { next_seq: 1 }))),
            Counter::Cloud("wrong_channel"),
        ),
        (
            "a result for a command never sent",
            Send::Publish(
                evil("cmd-result"),
                protocol::encode(&Body::CommandResult(CommandResult {
                    id: "never-sent".into(),
                    outcome: Outcome::Applied,
                    message: String::new(),
                    detail: String::new(),
                })),
            ),
            Counter::Cloud("unknown_command"),
        ),
        ("a 65-character device id", Send::Publish(ev(&format!("{}/events", "g".repeat(65))), valid_batch.clone()), Counter::Cloud("topic")),
        ("a device id with a space and non-ASCII", Send::Publish(ev("gw é/events"), valid_batch.clone()), Counter::Cloud("topic")),
        ("garbage birth", Send::Publish(evil("birth"), vec![VERSION, 0xff, 0xff]), Counter::Cloud("malformed")),
        ("garbage will", Send::Publish(evil("death"), vec![VERSION, 0xff, 0xff]), Counter::Cloud("malformed")),
        ("garbage inventory", Send::Publish(evil("inventory"), vec![VERSION, 0xff, 0xff]), Counter::Cloud("malformed")),
        ("garbage reported state", Send::Publish(evil("reported"), vec![VERSION, 0xff, 0xff]), Counter::Cloud("malformed")),
        ("garbage command result", Send::Publish(evil("cmd-result"), vec![VERSION, 0xff, 0xff]), Counter::Cloud("malformed")),
        ("garbage command to the gateway", Send::Publish(mine("cmd"), vec![VERSION, 0xff, 0xff]), Counter::Agent("bad_messages")),
        ("an events batch on the gateway's command topic", Send::Publish(mine("cmd"), valid_batch.clone()), Counter::Agent("bad_messages")),
        ("garbage desired state", Send::Publish(mine("desired"), vec![0xff; 16]), Counter::Agent("bad_messages")),
        (
            "an acknowledgement beyond the gateway's journal",
            Send::Publish(mine("ack"), protocol::encode(&Body::Ack(Ack { next_seq: u64::MAX }))),
            Counter::Agent("bad_acks"),
        ),
        ("a YAML alias bomb (a billion laughs)", Send::Apply(yaml_bomb), Counter::Cli("")),
        ("a definition nested 50,000 deep", Send::Apply(deep_yaml), Counter::Cli("")),
        ("a definition of 2 MiB", Send::Apply(huge_def), Counter::Cli("")),
        (
            "a dependency cycle",
            Send::Apply("name: cyc\nversion: 1\nsteps:\n  - {id: a, action: set, depends_on: [b]}\n  - {id: b, action: set, depends_on: [a]}\n".into()),
            Counter::Cli("cycle"),
        ),
        ("an unknown action", Send::Apply("name: unk\nversion: 1\nsteps:\n  - {id: a, action: launch_missiles}\n".into()), Counter::Cli("launch_missiles")),
        ("a run input nested 100,000 deep", Send::Input(nested_json.clone()), Counter::Cli("")),
        ("a trigger file that is not JSON", Send::File(b"{not json".to_vec()), Counter::TriggerFile("JSON")),
        ("a trigger file nested 100,000 deep", Send::File(nested_json.into_bytes()), Counter::TriggerFile("")),
        ("a trigger file of 8 MiB", Send::File(vec![b' '; 8 << 20]), Counter::TriggerFile("")),
    ]
}

/// Part 4: every named hostile input is sent to a running system (cloud-sync with its embedded
/// broker, a syncing agent with a watched directory); each must be refused and counted by reason,
/// neither process may restart, and the agent's runs must still sync exactly.
pub fn hostile(work: &Path) -> Report {
    let mut r = Report::new("hostile inputs against a running system");
    let device = "hostile-gw";
    let cloud = Cloud::embedded(&work.join("cloud"));
    let agent = Agent::start(
        &work.join("agent"),
        &["--broker", &cloud.mqtt_url(), "--device-id", device],
    );
    cloud.wait_presence(device, true, Duration::from_secs(30));
    let inbox = work.join("inbox");
    std::fs::create_dir_all(&inbox).ok();
    let drop_def = format!(
        "name: drop\nversion: 1\ntriggers:\n  - directory: {}\nsteps:\n  - {{id: s, action: set, args: {{kg: \"{{{{ input.kg }}}}\"}}}}\n",
        inbox.display()
    );
    agent.json(&["apply", &write(work, "drop.yaml", &drop_def)]);
    agent.json(&["apply", &write(work, "echo.yaml", ECHO)]);
    let mut sys = System {
        cloud,
        agent,
        work: work.to_path_buf(),
        inbox,
    };
    let (cloud_pid, agent_pid) = (sys.cloud.pid(), sys.agent.pid());
    let inputs = hostile_inputs(device);
    r.figure("named hostile inputs", inputs.len());
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    for (i, (name, send, counter)) in inputs.into_iter().enumerate() {
        let before = match &counter {
            Counter::Cloud(reason) => sys.cloud_counter(reason),
            Counter::Agent(c) => sys.agent_counter(c),
            Counter::TriggerFile(_) => sys.failed_files() as u64,
            Counter::Broker | Counter::Cli(_) => 0,
        };
        let refused = deliver(&mut sys, i, send, &counter);
        let counted = match &counter {
            Counter::Cloud(reason) => wait_for(Duration::from_secs(15), || {
                (sys.cloud_counter(reason) > before).then_some(())
            })
            .is_some(),
            Counter::Agent(c) => wait_for(Duration::from_secs(15), || {
                (sys.agent_counter(c) > before).then_some(())
            })
            .is_some(),
            Counter::TriggerFile(needle) => {
                let why = sys.inbox.join(format!(".failed/hostile-{i}.json.error"));
                wait_for(Duration::from_secs(15), || std::fs::read_to_string(&why).ok())
                    .is_some_and(|text| text.contains(needle) && sys.failed_files() as u64 > before)
            }
            Counter::Broker | Counter::Cli(_) => refused.is_ok(),
        };
        let alive = sys.cloud.alive()
            && sys.cloud.pid() == cloud_pid
            && sys.agent.cli(&["status"]).status.success()
            && sys.agent.pid() == agent_pid;
        let verdict = match (&refused, counted, alive) {
            (Ok(()), true, true) => "refused, counted".to_string(),
            (Err(e), _, _) => format!("NOT REFUSED: {e}"),
            (_, false, _) => "NOT COUNTED".to_string(),
            (_, _, false) => "A PROCESS DIED".to_string(),
        };
        r.check(verdict.starts_with("refused"), format!("{name}: {verdict}"));
        r.figure(
            &format!("{:>2}. {name}", i + 1),
            format!("{verdict} ({})", counter.label()),
        );
        *by_reason.entry(counter.label()).or_default() += 1;
    }
    for (reason, n) in &by_reason {
        r.figure(&format!("by reason: {reason}"), n);
    }
    r.check(
        sys.cloud.alive() && sys.cloud.pid() == cloud_pid,
        "outpost-cloud restarted",
    );
    r.check(sys.agent.pid() == agent_pid, "the agent restarted");
    let log = sys.cloud.log();
    r.figure("cloud log bytes", log.len());
    r.check(
        log.len() < 256 * 1024,
        format!(
            "{} bytes of cloud log for the hostile inputs (payloads echoed?)",
            log.len()
        ),
    );

    // The real agent's runs still sync exactly.
    for i in 0..5 {
        sys.agent
            .json(&["start", "echo", "--input", &format!(r#"{{"x": {i}}}"#), "--wait"]);
    }
    let (missing, duplicated) = compare_with_cloud(&sys.agent, &sys.cloud, device, Duration::from_secs(60), &mut r);
    r.zero("agent events missing in the cloud", missing);
    r.zero("agent events duplicated in the cloud", duplicated);
    r
}

fn deliver(sys: &mut System, i: usize, send: Send, counter: &Counter) -> Result<(), String> {
    match send {
        Send::Publish(topic, payload) => match counter {
            Counter::Broker => match mqtt_try_publish(sys.cloud.mqtt, &topic, payload) {
                Err(_) => Ok(()),
                Ok(()) => Err("the broker accepted it".into()),
            },
            _ => {
                mqtt_publish(sys.cloud.mqtt, &topic, payload);
                Ok(())
            }
        },
        Send::Apply(text) => {
            let file = write(&sys.work, &format!("hostile-{i}.yaml"), &text);
            cli_refused(&sys.agent.cli(&["apply", &file]), counter)
        }
        Send::Input(text) => {
            let file = write(&sys.work, &format!("hostile-{i}.json"), &text);
            cli_refused(&sys.agent.cli(&["start", "echo", "--input-file", &file]), counter)
        }
        Send::File(bytes) => {
            let tmp = sys.inbox.join(format!(".hostile-{i}.tmp"));
            std::fs::write(&tmp, bytes).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, sys.inbox.join(format!("hostile-{i}.json"))).map_err(|e| e.to_string())?;
            Ok(())
        }
    }
}

fn cli_refused(out: &std::process::Output, counter: &Counter) -> Result<(), String> {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        return Err(format!("accepted: {}", clip(&text)));
    }
    match counter {
        Counter::Cli(needle) if !text.contains(needle) => {
            Err(format!("refused without naming '{needle}': {}", clip(&text)))
        }
        _ if text.len() > 4096 => Err(format!("a {}-byte error (the input echoed?)", text.len())),
        _ => Ok(()),
    }
}

/// The first 300 characters of a message (errors here must not echo whole inputs).
fn clip(text: &str) -> String {
    text.chars().take(300).collect()
}

/// Serialises a report for machines (`--json`).
pub fn to_json(r: &Report) -> Value {
    json!({
        "part": r.part,
        "passed": r.passed(),
        "figures": r.figures.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
        "failures": r.failures,
    })
}
