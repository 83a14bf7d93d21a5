//! The rollout state machine, without I/O: a fleet simulated as an `Observation`.

use super::*;

const S: u64 = 1000;

fn plan(json: &str, n: usize) -> Rollout {
    let targets: Vec<(String, Vec<(String, String)>)> = (1..=n).map(|i| (format!("gw{i:02}"), Vec::new())).collect();
    let req: PlanRequest = serde_json::from_str(json).unwrap();
    let (p, waves) = req.resolve("recipe", &targets).unwrap();
    let previous = Some(Previous {
        version: 1,
        document: "name: recipe\nversion: 1\nsteps: []".into(),
        as_version: 3,
    });
    Rollout::new("recipe".into(), 2, "doc".into(), p, waves, previous, 0)
}

/// A fleet: every device online, nothing sent yet.
struct Fleet {
    obs: Observation,
}

impl Fleet {
    fn new(r: &Rollout) -> Fleet {
        let mut obs = Observation::default();
        for w in &r.waves {
            for d in &w.devices {
                obs.devices.insert(
                    d.clone(),
                    DeviceView {
                        state: DeviceState::Missing,
                        online: true,
                        message: String::new(),
                    },
                );
            }
        }
        Fleet { obs }
    }

    /// Carries out the actions as the service would, every online device applying at once.
    fn act(&mut self, actions: &[Action]) {
        for a in actions {
            match a {
                Action::Send { devices } => {
                    for d in devices {
                        let v = self.obs.devices.get_mut(d).unwrap();
                        if v.state == DeviceState::Missing {
                            v.state = if v.online {
                                DeviceState::Applied
                            } else {
                                DeviceState::Pending
                            };
                        }
                    }
                }
                Action::Withdraw { devices, .. } => {
                    for d in devices {
                        let v = self.obs.devices.get_mut(d).unwrap();
                        if v.state == DeviceState::Pending {
                            v.state = DeviceState::Closed;
                        }
                    }
                }
                Action::RollBack { .. } => {}
            }
        }
    }

    fn step(&mut self, r: &mut Rollout, now: u64) -> Vec<Action> {
        let s = decide(r, &self.obs, now);
        self.act(&s.actions);
        *r = s.rollout;
        s.actions
    }
}

fn sends(actions: &[Action]) -> Vec<Vec<String>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { devices } => Some(devices.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_good_version_goes_canary_then_waves_at_the_pace_then_completes() {
    let mut r = plan(r#"{"canary": 2, "wave": "50%", "pace": "10s", "bake": "3s"}"#, 10);
    let mut f = Fleet::new(&r);
    let a = f.step(&mut r, 0);
    assert_eq!(sends(&a), [r.waves[0].devices.clone()], "the canaries first");
    assert_eq!(r.sent, 1);
    // Applied at once; the bake starts when the wave settles.
    assert!(sends(&f.step(&mut r, S)).is_empty());
    assert_eq!(r.settled_ms, Some(S));
    assert!(r.reason.contains("watching its runs until"), "{}", r.reason);
    f.obs.runs.completed = 4;
    assert!(sends(&f.step(&mut r, 4 * S)).is_empty());
    assert!(
        r.reason.contains("waiting for wave 1 at"),
        "bake over, pace not: {}",
        r.reason
    );
    let a = f.step(&mut r, 10 * S);
    assert_eq!(sends(&a), [r.waves[1].devices.clone()]);
    assert_eq!((r.sent, r.wave_started_ms, r.settled_ms), (2, 10 * S, None));
    f.step(&mut r, 11 * S);
    f.step(&mut r, 14 * S);
    assert!(
        sends(&f.step(&mut r, 19 * S)).is_empty(),
        "the pace counts from the wave's start"
    );
    let a = f.step(&mut r, 20 * S);
    assert_eq!(sends(&a), [r.waves[2].devices.clone()]);
    f.step(&mut r, 21 * S);
    f.step(&mut r, 24 * S);
    assert_eq!(r.phase, Phase::Completed, "{}", r.reason);
    assert_eq!(r.reason, "all 3 waves done: 10 applied");
    // Final: nothing more happens.
    assert!(f.step(&mut r, 99 * S).is_empty());
}

#[test]
fn failed_canary_runs_halt_and_roll_back_only_the_updated_devices() {
    let mut r = plan(
        r#"{"canary": 3, "pace": "10s", "bake": "5s", "on_failure": "rollback"}"#,
        10,
    );
    let mut f = Fleet::new(&r);
    let canaries = r.waves[0].devices.clone();
    // One canary is offline: queued, not applied.
    f.obs.devices.get_mut(&canaries[2]).unwrap().online = false;
    f.step(&mut r, 0);
    assert_eq!(f.obs.devices[&canaries[2]].state, DeviceState::Pending);
    f.obs.runs.completed = 5;
    f.obs.runs.failed = 1;
    f.obs.runs.failed_runs = vec![(canaries[0].clone(), "recipe-7".into())];
    // A failure halts at once, before the bake ends.
    let a = f.step(&mut r, 2 * S);
    assert_eq!(r.phase, Phase::RolledBack);
    assert!(
        r.reason
            .starts_with("halted at canary: 1 of 6 ended runs of v2 failed (at most 0 allowed)"),
        "{}",
        r.reason
    );
    assert!(
        r.reason.contains("v1 deployed back as v3 to 2 devices updated"),
        "{}",
        r.reason
    );
    assert_eq!(a.len(), 2, "{a:?}");
    assert!(matches!(&a[0], Action::Withdraw { devices, .. } if devices == &canaries));
    assert_eq!(
        a[1],
        Action::RollBack {
            devices: canaries[..2].to_vec()
        }
    );
    assert_eq!(
        f.obs.devices[&canaries[2]].state,
        DeviceState::Closed,
        "the offline canary never gets it"
    );
    assert_eq!(r.evidence.failed_runs, [(canaries[0].clone(), "recipe-7".to_string())]);
    // No other device was ever sent anything.
    assert!(
        r.waves[1]
            .devices
            .iter()
            .all(|d| f.obs.devices[d].state == DeviceState::Missing)
    );
}

#[test]
fn a_rejection_halts_and_without_rollback_nothing_is_deployed_back() {
    let mut r = plan(r#"{"canary": 2}"#, 4);
    let mut f = Fleet::new(&r);
    f.step(&mut r, 0);
    let d = r.waves[0].devices[1].clone();
    let v = f.obs.devices.get_mut(&d).unwrap();
    v.state = DeviceState::Rejected;
    v.message = "definition: bad".into();
    let a = f.step(&mut r, S);
    assert_eq!(r.phase, Phase::Halted);
    assert_eq!(
        r.reason,
        format!("halted at canary: device {d} rejected the deployment: definition: bad")
    );
    assert!(!a.iter().any(|a| matches!(a, Action::RollBack { .. })));
}

#[test]
fn offline_and_silent_devices_never_hold_a_wave() {
    let mut r = plan(
        r#"{"canary": 2, "bake": "0s", "pace": "0s", "device_deadline": "30s"}"#,
        4,
    );
    let mut f = Fleet::new(&r);
    let c = r.waves[0].devices.clone();
    f.obs.devices.get_mut(&c[0]).unwrap().online = false;
    f.step(&mut r, 0);
    // c[1] is online but does not answer.
    f.obs.devices.get_mut(&c[1]).unwrap().state = DeviceState::Pending;
    f.step(&mut r, S);
    assert!(
        r.reason.contains("waiting for 1 device online to answer"),
        "{}",
        r.reason
    );
    assert!(
        r.reason.contains("1 device offline, updated when they return"),
        "{}",
        r.reason
    );
    assert_eq!(r.sent, 1);
    // Its deadline passes: the wave settles without it, and the next one starts.
    let a = f.step(&mut r, 30 * S);
    assert_eq!(r.evidence.timed_out, [c[1].clone()]);
    assert_eq!(sends(&a), [r.waves[1].devices.clone()], "{}", r.reason);
    f.step(&mut r, 32 * S);
    f.step(&mut r, 33 * S);
    assert_eq!(r.phase, Phase::Completed);
    assert!(
        r.reason.contains("1 device offline, updated when they return"),
        "{}",
        r.reason
    );
    // Skip policy: an offline device is withdrawn when its wave starts.
    let mut r = plan(r#"{"canary": 1, "offline": "skip"}"#, 2);
    let mut f = Fleet::new(&r);
    let c0 = r.waves[0].devices[0].clone();
    f.obs.devices.get_mut(&c0).unwrap().online = false;
    let a = f.step(&mut r, 0);
    assert!(a.iter().any(
        |a| matches!(a, Action::Withdraw { devices, why } if devices.as_slice() == std::slice::from_ref(&c0) && why.starts_with("skipped"))
    ));
    assert_eq!(f.obs.devices[&c0].state, DeviceState::Closed);
}

#[test]
fn a_gate_without_evidence_waits_then_halts_saying_why() {
    let mut r = plan(
        r#"{"canary": 1, "bake": "5s", "device_deadline": "60s", "gate": {"min_runs": 3}}"#,
        3,
    );
    let mut f = Fleet::new(&r);
    f.step(&mut r, 0);
    f.step(&mut r, S);
    f.obs.runs.completed = 2;
    f.step(&mut r, 10 * S);
    assert_eq!(r.phase, Phase::Running);
    assert!(
        r.reason
            .contains("waiting for evidence: 2 of the 3 runs of v2 the gate needs have ended"),
        "{}",
        r.reason
    );
    f.step(&mut r, 60 * S);
    assert_eq!(r.phase, Phase::Halted);
    assert!(r.reason.contains("no verdict by"), "{}", r.reason);
    // A low completion share fails the gate at the end of the bake.
    let mut r = plan(r#"{"canary": 1, "bake": "5s"}"#, 3);
    let mut f = Fleet::new(&r);
    f.step(&mut r, 0);
    f.step(&mut r, S);
    f.obs.runs.completed = 8;
    f.obs.runs.failed = 0;
    f.obs.runs.active = 5;
    f.step(&mut r, 7 * S);
    assert_eq!(r.phase, Phase::Running, "active runs are not judged: {}", r.reason);
}

#[test]
fn the_custom_gate_waits_for_every_updated_device_and_halts_on_unhealthy() {
    let mut r = plan(
        r#"{"canary": 2, "bake": "0s", "pace": "0s", "gate": {"workflow": "health"}}"#,
        4,
    );
    let mut f = Fleet::new(&r);
    f.step(&mut r, 0);
    let c = r.waves[0].devices.clone();
    f.obs.health.insert(c[0].clone(), (true, "h-1".into()));
    f.step(&mut r, S);
    assert!(
        r.reason.contains("waiting for health check health on 1 device"),
        "{}",
        r.reason
    );
    f.obs.health.insert(c[1].clone(), (false, "h-2".into()));
    f.step(&mut r, 2 * S);
    assert_eq!(r.phase, Phase::Halted);
    assert!(
        r.reason
            .contains(&format!("health check health on {} says unhealthy (run h-2)", c[1])),
        "{}",
        r.reason
    );
}

#[test]
fn orders_pause_resume_promote_and_abort() {
    let mut r = plan(r#"{"canary": 1, "wave": 1, "pace": "1h", "bake": "1h"}"#, 3);
    let mut f = Fleet::new(&r);
    f.step(&mut r, 0);
    let s = order(&r, Order::Pause, "alice", S).unwrap();
    r = s.rollout;
    assert_eq!(r.phase, Phase::Paused);
    assert!(order(&r, Order::Pause, "alice", S).is_err());
    // Paused: even a promoted wave is not followed by the next.
    r = order(&r, Order::Promote, "alice", S).unwrap().rollout;
    assert!(sends(&f.step(&mut r, 2 * S)).is_empty());
    assert!(r.reason.starts_with("promoted by alice"), "{}", r.reason);
    r = order(&r, Order::Resume, "bob", 3 * S).unwrap().rollout;
    let a = f.step(&mut r, 4 * S);
    assert_eq!(
        sends(&a),
        [r.waves[1].devices.clone()],
        "promoted: no bake, no pace: {}",
        r.reason
    );
    assert!(!r.promoted, "promotion is for one wave");
    let w2 = r.waves[2].devices.clone();
    // Abort withdraws what is pending and ends it.
    f.obs.devices.get_mut(&r.waves[1].devices[0]).unwrap().state = DeviceState::Pending;
    let s = order(&r, Order::Abort, "carol", 5 * S).unwrap();
    assert_eq!(s.rollout.phase, Phase::Aborted);
    assert!(matches!(&s.actions[0], Action::Withdraw { why, .. } if why == "rollout aborted by carol"));
    let e = order(&s.rollout, Order::Resume, "bob", 6 * S).unwrap_err();
    assert_eq!(e, "the rollout is aborted: nothing to resume");
    assert!(sends(&decide(&s.rollout, &f.obs, 99 * S).actions).is_empty());
    assert!(w2.iter().all(|d| f.obs.devices[d].state == DeviceState::Missing));
    let names: Vec<&str> = s.rollout.log.iter().map(|l| l.text.as_str()).collect();
    assert!(
        names.contains(&"pause by alice") && names.contains(&"abort by carol"),
        "{names:?}"
    );
}

#[test]
fn a_device_whose_command_could_not_be_queued_is_sent_again() {
    let mut r = plan(r#"{"canary": 1}"#, 2);
    let mut f = Fleet::new(&r);
    let s = decide(&r, &f.obs, 0);
    r = s.rollout; // the commands were never queued (say the outbox was full)
    let a = f.step(&mut r, S);
    assert_eq!(sends(&a), [r.waves[0].devices.clone()]);
}
