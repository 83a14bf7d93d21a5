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
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let blocks = blocks(&readme, "Quickstart: the agent alone");
    assert_eq!(
        blocks.len(),
        2,
        "the section's blocks changed; update this walk-through: {blocks:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(repo().join("examples"), dir.path().join("examples")).unwrap();

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
