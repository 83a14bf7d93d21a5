//! The README's agent quickstart, run as written: its command blocks in order, on a fresh data
//! directory, with `cargo run … --` standing for the binary under test. The one step a reader
//! does by hand — leaving the agent running between the blocks — the test does for them.

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_tests::{Agent, outpost_bin};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The ```sh blocks of the README section headed `heading`.
fn blocks(readme: &str, heading: &str) -> Vec<String> {
    let section = readme.split(&format!("\n## {heading}\n")).nth(1).unwrap_or_default();
    let section = section.split("\n## ").next().unwrap_or_default();
    section
        .split("```sh\n")
        .skip(1)
        .filter_map(|b| b.split("```").next().map(str::to_string))
        .collect()
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md")
}

/// The blocks of a README section, which must be `count` (a new one needs a walk-through).
fn section_blocks(heading: &str, count: usize) -> Vec<String> {
    let blocks = blocks(&readme(), heading);
    assert_eq!(
        blocks.len(),
        count,
        "the section's blocks changed; update this walk-through: {blocks:?}"
    );
    blocks
}

/// A fresh directory to run blocks in, with the examples where the README expects them.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(repo().join("examples"), dir.path().join("examples")).unwrap();
    dir
}

/// Runs a README block with bash as a reader's shell would (aliases on, stop at the first
/// failing command), `cargo run … -p outpost-agent --` being the binary under test.
fn run_block(dir: &Path, block: &str) -> String {
    let script = format!(
        "set -euo pipefail\nshopt -s expand_aliases\n\
         cargo() {{ while [ \"$1\" != \"--\" ]; do shift; done; shift; \"{bin}\" \"$@\"; }}\n{block}",
        bin = outpost_bin().display()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir)
        .env_remove("OUTPOST_DATA_DIR")
        .output()
        .expect("bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "README block failed ({}):\n{block}\n---\n{text}",
        out.status
    );
    text
}

#[test]
fn the_agent_quickstart_runs_as_written() {
    let blocks = section_blocks("Quickstart: the agent alone", 2);
    let dir = workdir();

    let first = run_block(dir.path(), &blocks[0]);
    assert!(first.contains(r#""status":"completed""#), "{first}");

    // "Leave out --once to keep the agent running, then, from another terminal:"
    let agent = Agent::start(&dir.path().join("outpost-data"), &[]);
    let second = run_block(dir.path(), &blocks[1]);
    for shown in [
        "run greet-1 completed",
        "already existed, same input",
        "warning: no step of run lot-7 waits for signal 'lot-raedy'",
        "sync:",
    ] {
        assert!(second.contains(shown), "no '{shown}' in:\n{second}");
    }
    assert_eq!(agent.json(&["show", "lot-7"])["status"], "cancelled");
}

#[test]
fn the_cloud_quickstart_runs_as_written() {
    let blocks = section_blocks("Quickstart: a gateway and its cloud", 2);
    let dir = workdir();
    // `./target/release/…` is the build under test; `cargo build` has been done.
    std::fs::create_dir(dir.path().join("target")).unwrap();
    std::os::unix::fs::symlink(outpost_bin().parent().unwrap(), dir.path().join("target/release")).unwrap();
    // The one change: free ports instead of 8080 and 8883, which another test may hold.
    let (api, mqtt) = (outpost_tests::cloud::free_port(), outpost_tests::cloud::free_port());
    let script = format!("set -euo pipefail\ncargo() {{ :; }}\n{}", blocks[0]);
    let mut demo = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("OUTPOST_CLOUD_LISTEN", format!("127.0.0.1:{api}"))
        .env("OUTPOST_CLOUD_MQTT_LISTEN", format!("127.0.0.1:{mqtt}"))
        .env_remove("OUTPOST_CLOUD_DATA_DIR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("bash");
    let stop = |demo: &mut std::process::Child| {
        // outpost-cloud (bash's child, or bash itself when it exec'd the last command) stops
        // its demo gateway on SIGTERM.
        let pid = demo.id().to_string();
        let _ = Command::new("pkill").args(["-TERM", "-P", &pid]).status();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = demo.wait();
    };
    let second = block_on_demo(
        dir.path(),
        api,
        &blocks[1].replace("127.0.0.1:8080", &format!("127.0.0.1:{api}")),
    );
    stop(&mut demo);
    let mut printed = String::new();
    use std::io::Read;
    demo.stdout.take().unwrap().read_to_string(&mut printed).unwrap();
    assert!(
        printed.contains("alice") && printed.contains("bob"),
        "the demo prints its users: {printed}"
    );
    let second = second.unwrap_or_else(|e| panic!("{e}\n--- the demo printed:\n{printed}"));
    for shown in ["\"id\":\"demo-gw\"", "oven-plant", "\"state\":\"pending\""] {
        assert!(second.contains(shown), "no '{shown}' in:\n{second}");
    }
}

/// Runs the API block once, when the demo gateway's runs are mirrored (a reader would look at
/// the console first); the block's output, or why it failed.
fn block_on_demo(dir: &Path, api: u16, block: &str) -> Result<String, String> {
    let data = dir.join("cloud-data");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let mut token = None;
    loop {
        if std::time::Instant::now() > deadline {
            return Err("the demo's runs were not mirrored within 90 s".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        if token.is_none() && data.join("admin.sock").exists() {
            token = Some(outpost_tests::cloud::create_token(&data, "readme-probe", &["viewer"]));
        }
        let Some(t) = &token else { continue };
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "2", "-H", &format!("Authorization: Bearer {t}")])
            .arg(format!("https://127.0.0.1:{api}/v1/devices/demo-gw/runs"))
            .output()
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&out.stdout).contains("oven-plant") {
            break;
        }
    }
    let script = format!("set -euo pipefail\nshopt -s expand_aliases\n{block}");
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir)
        .env_remove("OUTPOST_CLOUD_DATA_DIR")
        .output()
        .map_err(|e| e.to_string())?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("README block failed ({}):\n{block}\n---\n{text}", out.status))
    }
}

/// Runs a block with `outpost` and `outpost-cloud` standing for the binaries under test, in
/// `dir`; background jobs are stopped when it ends. Returns the exit code and the output.
fn run_with_binaries(dir: &Path, block: &str) -> (Option<i32>, String) {
    // On PATH as links, not shell functions: a background `outpost … &` is then the binary
    // itself, which the EXIT trap can stop.
    let bin_dir = dir.join(".bin");
    if !bin_dir.exists() {
        std::fs::create_dir(&bin_dir).expect("bin dir");
        std::os::unix::fs::symlink(outpost_bin(), bin_dir.join("outpost")).expect("link");
        std::os::unix::fs::symlink(
            outpost_bin().with_file_name("outpost-cloud"),
            bin_dir.join("outpost-cloud"),
        )
        .expect("link");
    }
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let script = format!("set -uo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null' EXIT\n{block}");
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("OUTPOST_DATA_DIR")
        .env_remove("OUTPOST_CLOUD_DATA_DIR")
        .output()
        .expect("bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// The README's ```sh blocks anywhere, by their first line.
fn all_blocks(readme: &str) -> Vec<String> {
    readme
        .split("```sh\n")
        .skip(1)
        .filter_map(|b| b.split("```").next().map(str::to_string))
        .collect()
}

/// Where each README block is exercised, by its first line's start: a walk-through in this file,
/// another test, CI, or why a test machine cannot run it. A new block fails
/// `every_readme_block_is_run_somewhere_or_says_why_not` until it is listed here.
const WHERE_RUN: &[(&str, &str)] = &[
    (
        "cargo build --release && ./target/release/outpost-cloud --demo",
        "readme::the_cloud_quickstart_runs_as_written",
    ),
    (
        "TOKEN=$(./target/release/outpost-cloud tokens create",
        "readme::the_cloud_quickstart_runs_as_written",
    ),
    (
        "cargo run --release -p outpost-agent -- run --data-dir",
        "readme::the_agent_quickstart_runs_as_written",
    ),
    (
        "export OUTPOST_DATA_DIR=./outpost-data",
        "readme::the_agent_quickstart_runs_as_written",
    ),
    (
        "# the cloud, against Mosquitto",
        "names a plant's broker; security:: runs cloud-sync and enrolled agents on Mosquitto with TLS and the ACL",
    ),
    (
        "outpost keygen --device-id line3-gw1",
        "readme::the_fleet_blocks_run_as_written",
    ),
    ("cargo test --workspace", ".ci/run runs it"),
    ("cargo install cargo-fuzz", ".ci/run runs bash fuzz/run.sh 30"),
    (
        "cargo build --release -p outpost-agent -p outpost-cloud-sync",
        "the chaos suite: its short version is chaos:: in this suite, the long one a benchmark",
    ),
    (
        "outpost run --apply examples/trip-saga.yaml",
        "readme::the_fleet_blocks_run_as_written",
    ),
    (
        "outpost signal RUN lot-ready",
        "RUN stands for a run id; signals:: runs these commands",
    ),
    (
        "# The oven workflow on the simulated plant",
        "readme::the_fleet_blocks_run_as_written",
    ),
    (
        "# A recipe on an OPC UA press",
        "opcua:: runs examples/opcua-recipe.yaml with examples/equipment/opcua.yaml against opcua-sim on a free port",
    ),
    (
        "cargo run --release -p outpost-agent -- bench",
        "a benchmark (figures, minutes); bench --json is tested short",
    ),
    (
        "sudo apt-get install gcc-aarch64-linux-gnu",
        ".ci/run installs the cross toolchains and builds for both ARM targets",
    ),
    (
        "cargo test -p outpost-agent --lib --target aarch64",
        ".ci/run runs these under qemu",
    ),
    (
        "cargo install cargo-deb",
        "needs cargo-deb; packaging:: checks what the package ships",
    ),
    (
        "sudo apt install ./outpost_0.1.0-1_arm64.deb",
        "needs root on a gateway; packaging:: checks the unit and settings",
    ),
    (
        "cargo deb -p outpost-cloud-sync",
        "needs cargo-deb; packaging:: checks what the package ships",
    ),
    (
        "sudo apt install ./outpost-cloud_0.1.0-1_amd64.deb",
        "needs root; packaging:: starts outpost-cloud with the shipped settings",
    ),
];

#[test]
fn every_readme_block_is_run_somewhere_or_says_why_not() {
    let blocks = all_blocks(&readme());
    for b in &blocks {
        let first = b.lines().next().unwrap_or_default();
        assert!(
            WHERE_RUN.iter().any(|(start, _)| first.starts_with(start)),
            "README block not run anywhere (add a walk-through, or say why in WHERE_RUN):\n{b}"
        );
    }
    for (start, _) in WHERE_RUN {
        assert!(
            blocks.iter().any(|b| b.starts_with(start)),
            "WHERE_RUN lists a block the README no longer has: {start}"
        );
    }
}

#[test]
fn the_fleet_blocks_run_as_written() {
    let readme = readme();
    let block = |start: &str| {
        all_blocks(&readme)
            .into_iter()
            .find(|b| b.starts_with(start))
            .unwrap_or_else(|| panic!("no README block starts with {start}"))
    };
    let dir = workdir();

    // Enrolment: the fleet's PKI exists (the first start makes it; `pki init` here), the
    // gateway got ca.crt and fleet.pub from it.
    let (code, out) = run_with_binaries(
        dir.path(),
        "outpost-cloud pki init\ncp cloud-data/pki/ca.crt cloud-data/pki/fleet.pub .\n",
    );
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = run_with_binaries(dir.path(), &block("outpost keygen --device-id line3-gw1"));
    assert_eq!(code, Some(0), "{out}");
    assert!(dir.path().join("outpost-data/identity/device.crt").exists(), "{out}");

    // A saga that ends compensated: exit 6, as the comment says.
    let (code, out) = run_with_binaries(dir.path(), &block("outpost run --apply examples/trip-saga.yaml"));
    assert_eq!(code, Some(6), "{out}");
    assert!(out.contains("compensated"), "{out}");

    // Equipment without hardware, on a fresh directory instead of /tmp.
    let equipment = block("# The oven workflow on the simulated plant")
        .replace("/tmp/", &format!("{}/", dir.path().display()))
        .replace("outpost run ", "sleep 0.5; outpost run ");
    let (code, out) = run_with_binaries(dir.path(), &equipment);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.matches("completed").count() >= 2, "both runs complete: {out}");
}
