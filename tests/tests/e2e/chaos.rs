//! The chaos suite's short version (the long one is `outpost-chaos`): each part runs against
//! real processes and must find nothing.

use outpost_tests::chaos::{self, Broker, Report};

fn assert_passed(r: Report) {
    eprintln!("{r}");
    assert!(r.passed(), "{r}");
}

#[test]
fn chaos_sigkills_under_a_mixed_workload() {
    let dir = tempfile::tempdir().unwrap();
    assert_passed(chaos::kills(dir.path(), 25, 11));
}

#[test]
fn chaos_drain_through_fault_storms_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    assert_passed(chaos::drain(dir.path(), 50_000, Broker::Embedded, 12));
}

#[test]
fn chaos_drain_through_fault_storms_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    assert_passed(chaos::drain(dir.path(), 50_000, Broker::Mosquitto, 13));
}

#[test]
fn chaos_full_disk_under_the_cloud_store() {
    let dir = tempfile::tempdir().unwrap();
    assert_passed(chaos::full_disk(dir.path(), 5));
}

#[test]
fn chaos_hostile_inputs_against_a_running_system() {
    let dir = tempfile::tempdir().unwrap();
    assert_passed(chaos::hostile(dir.path()));
}
