//! What the Debian packages install: the systemd units pass `systemd-analyze verify`, every
//! setting in the shipped environment files is one the binary reads, and outpost-cloud started
//! with its shipped settings serves HTTPS with its own PKI, as the README's production section
//! says.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_tests::{eventually, outpost_bin};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `KEY=VALUE` lines of an environment file, commented-out examples included (`#KEY=…`).
fn settings(text: &str, with_examples: bool) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = match l.strip_prefix('#') {
                Some(example) if with_examples => example,
                Some(_) => return None,
                None => l,
            };
            let (k, v) = l.split_once('=')?;
            k.chars()
                .all(|c| c.is_ascii_uppercase() || c == '_')
                .then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn help(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().expect("run --help");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cloud_bin() -> PathBuf {
    outpost_bin().with_file_name("outpost-cloud")
}

#[test]
fn the_systemd_units_verify_clean() {
    let dir = tempfile::tempdir().unwrap();
    for (file, unit, bin) in [
        ("outpost", "outpost", outpost_bin()),
        ("outpost-cloud", "outpost-cloud", cloud_bin()),
        // The replica template, verified as its instance 1.
        ("outpost-cloud@", "outpost-cloud", cloud_bin()),
    ] {
        let text = read(&format!("packaging/{file}.service"));
        let exec = format!("/usr/bin/{unit}");
        assert!(text.contains(&format!("ExecStart={exec}")), "{unit}: {text}");
        // The installed path does not exist here: point it at the built binary.
        let path = dir.path().join(format!("{}.service", file.replace('@', "@1")));
        std::fs::write(&path, text.replace(&exec, &bin.display().to_string())).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze (package systemd) is installed");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.trim().is_empty(), "{unit}.service: {err}");
        for hardening in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "CapabilityBoundingSet=\n",
        ] {
            assert!(text.contains(hardening), "{unit}.service lacks {hardening:?}");
        }
        assert!(
            text.contains(&format!("User={unit}")),
            "{unit}.service runs as its own user"
        );
    }
}

#[test]
fn every_shipped_setting_is_one_the_binary_reads() {
    let agent_help = help(&outpost_bin(), &["run", "--help"]);
    let cloud_help = help(&cloud_bin(), &["--help"]);
    for (file, help, own) in [
        ("packaging/outpost.default", &agent_help, &[][..]),
        (
            "packaging/outpost-cloud.default",
            &cloud_help,
            &["OUTPOST_CLOUD_ARGS"][..],
        ),
        (
            "packaging/outpost-cloud-replicas.default",
            &cloud_help,
            &["OUTPOST_CLOUD_ARGS"][..],
        ),
    ] {
        let found = settings(&read(file), true);
        assert!(found.len() >= 4, "{file}: {found:?}");
        for (key, _) in found {
            let known = key == "RUST_LOG" || own.contains(&key.as_str()) || help.contains(&format!("[env: {key}="));
            assert!(known, "{file} sets {key}, which the binary does not read");
        }
    }
    // The package metadata ships files that exist.
    for manifest in ["agent/Cargo.toml", "cloud-sync/Cargo.toml"] {
        let text = read(manifest);
        let crate_dir = repo().join(manifest).parent().unwrap().to_path_buf();
        let section = &text[text.find("[package.metadata.deb]").expect("deb metadata")..];
        for line in section.lines().filter(|l| l.trim_start().starts_with("[\"")) {
            let src = line.trim_start().trim_start_matches("[\"").split('"').next().unwrap();
            if src.starts_with("target/") {
                continue;
            }
            let pattern = crate_dir.join(src);
            let dir = pattern.parent().unwrap();
            let name = pattern.file_name().unwrap().to_string_lossy().into_owned();
            let exists = match name.strip_prefix('*') {
                Some(ext) => std::fs::read_dir(dir)
                    .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(ext)))
                    .unwrap_or(false),
                None => pattern.exists(),
            };
            assert!(exists, "{manifest} ships {src}, which does not exist");
        }
        let scripts = section
            .lines()
            .find_map(|l| l.strip_prefix("maintainer-scripts = \""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("maintainer-scripts");
        for script in ["postinst", "postrm"] {
            assert!(crate_dir.join(scripts).join(script).exists(), "{manifest}: no {script}");
        }
    }
}

#[test]
fn outpost_cloud_with_its_shipped_settings_serves_https_with_its_own_pki() {
    let dir = tempfile::tempdir().unwrap();
    let (api, mqtt) = (outpost_tests::cloud::free_port(), outpost_tests::cloud::free_port());
    let mut cmd = Command::new(cloud_bin());
    for (key, value) in settings(&read("packaging/outpost-cloud.default"), false) {
        // As shipped, but in a temporary directory and on free ports.
        let value = match key.as_str() {
            "OUTPOST_CLOUD_DATA_DIR" => dir.path().display().to_string(),
            "OUTPOST_CLOUD_LISTEN" => value.replace(":8443", &format!(":{api}")),
            "OUTPOST_CLOUD_MQTT_LISTEN" => value.replace(":8883", &format!(":{mqtt}")),
            _ => value,
        };
        cmd.env(key, value);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let health = eventually(Duration::from_secs(30), "HTTPS health", || {
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "2", &format!("https://127.0.0.1:{api}/v1/health")])
            .output()
            .ok()?;
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        body.contains("\"ok\":true").then_some(body)
    });
    assert!(health.contains("\"store\":\"ok\""), "{health}");
    // Plain HTTP is not served, and the fleet PKI was made in the data directory.
    let plain = Command::new("curl")
        .args(["-s", "--max-time", "2", &format!("http://127.0.0.1:{api}/v1/health")])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("\"ok\":true"));
    for f in ["pki/ca.crt", "pki/fleet.key", "cloud.redb"] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    let _ = child.kill();
    let _ = child.wait();
}
