//! The `outpost-cloud` binary's command line. (Also makes `cargo test` build the binary that the
//! end-to-end tests in `tests/` start: cargo builds a package's binaries only for its own
//! integration tests.)

use std::process::Command;

/// Runs `outpost-cloud`, killing it after 60 s: every case here must exit on its own, and one
/// that starts serving instead must fail the test rather than hold CI until its time limit.
fn cloud(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost-cloud"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run outpost-cloud");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "outpost-cloud {args:?} did not exit within 60 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("run outpost-cloud")
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
        "--sync-prefix",
        "--demo",
        "--plain-http",
        "--insecure-http",
        "--http-cert",
        "--session-idle",
        "--console-host",
        "--auth-proxy-header",
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
fn a_broker_address_without_an_mqtt_scheme_or_with_a_bad_port_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (url, says) in [
        ("ws://example:8883", "'ws'"),
        ("mqtt://example:x", "'x'"),
        ("mqtt://example:1883", "--insecure-plaintext"),
        ("example:8883", "no scheme"),
    ] {
        let data = dir.path().to_str().unwrap();
        let out = cloud(&["--data-dir", data, "--broker", url, "--listen", "127.0.0.1:0"]);
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
