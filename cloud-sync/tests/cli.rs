//! The `outpost-cloud` binary's command line. (Also makes `cargo test` build the binary that the
//! end-to-end tests in `tests/` start: cargo builds a package's binaries only for its own
//! integration tests.)

use std::process::Command;

fn cloud(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_outpost-cloud"))
        .args(args)
        .output()
        .expect("run outpost-cloud")
}

#[test]
fn help_names_every_setting_and_the_demo() {
    let out = cloud(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--data-dir",
        "--listen",
        "--broker",
        "--mqtt-listen",
        "--prefix",
        "--demo",
    ] {
        assert!(text.contains(flag), "--help does not mention {flag}:\n{text}");
    }
}

#[test]
fn a_data_dir_that_is_a_file_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("outpost-cloud-cli-{}", std::process::id()));
    std::fs::write(&dir, b"not a directory").expect("write file");
    let path = dir.to_string_lossy().into_owned();
    let out = cloud(&[
        "--data-dir",
        &path,
        "--listen",
        "127.0.0.1:0",
        "--mqtt-listen",
        "127.0.0.1:0",
    ]);
    let _ = std::fs::remove_file(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&path), "error does not name {path}: {err}");
}

#[test]
fn a_broker_address_with_another_scheme_or_a_bad_port_is_refused() {
    for (url, says) in [("mqtts://example:8883", "mqtts"), ("mqtt://example:x", "'x'")] {
        let out = cloud(&["--broker", url, "--listen", "127.0.0.1:0"]);
        assert!(!out.status.success(), "{url} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--broker") && err.contains(says), "{url}: {err}");
    }
}

#[test]
fn a_damaged_store_is_named_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cloud.redb"), vec![0x5a; 8192]).unwrap();
    let out = cloud(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--broker",
        "mqtt://127.0.0.1:1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cloud.redb") && err.contains("move it aside"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
