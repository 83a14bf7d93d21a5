//! The `outpost` binary's offline commands. (Also makes `cargo test` build the binary that the
//! end-to-end tests in `tests/` start.)

use std::process::Command;

fn outpost(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .output()
        .expect("run outpost")
}

#[test]
fn help_lists_every_command_and_exit_codes() {
    let out = outpost(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "run", "validate", "apply", "start", "list", "show", "wait", "cancel", "status", "bench",
    ] {
        assert!(text.contains(cmd), "--help does not mention {cmd}:\n{text}");
    }
    assert!(text.contains("Exit codes"), "{text}");
}

#[test]
fn validate_examples_and_reject_bad_documents() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut files: Vec<String> = std::fs::read_dir(examples)
        .expect("examples dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path().to_string_lossy().into_owned())
        .filter(|p| p.ends_with(".yaml") || p.ends_with(".json"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut args = vec!["validate"];
    args.extend(files.iter().map(String::as_str));
    let out = outpost(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: bad\nversion: 1\nsteps:\n  - id: a\n    action: teleport\n").unwrap();
    let out = outpost(&["validate", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("steps[0] (a).action: unknown action 'teleport'"), "{err}");

    // A syntax error names the parser's error and every other line it would stop at next.
    let tabs = dir.path().join("tabs.yaml");
    std::fs::write(
        &tabs,
        "name: t\nversion: 1\nsteps:\n  - id: a\n\taction: set\n  - id: b\n\taction: set\n",
    )
    .unwrap();
    let out = outpost(&["validate", tabs.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("YAML error") && err.contains("also line 5: a tab") && err.contains("also line 7: a tab"),
        "{err}"
    );
}

#[test]
fn talking_to_no_agent_exits_5() {
    let dir = tempfile::tempdir().unwrap();
    let out = outpost(&["list", "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the agent"));
}

#[test]
fn a_wait_timeout_takes_a_duration_like_every_other_option() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for t in ["5s", "2m", "1h30m", "90", "0.5"] {
        let out = outpost(&["wait", "r1", "--timeout", t, "--data-dir", d]);
        // Accepted: the command gets as far as looking for the agent.
        assert_eq!(
            out.status.code(),
            Some(5),
            "--timeout {t}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = outpost(&["start", "w", "--wait", "--timeout", t, "--data-dir", d]);
        assert_eq!(
            out.status.code(),
            Some(5),
            "--timeout {t}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = outpost(&["wait", "r1", "--timeout", "soon", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--timeout") && err.contains("try 30s"), "{err}");
}

#[test]
fn one_step_is_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.yaml");
    std::fs::write(
        &one,
        "name: one\nversion: 1\nsteps:\n  - {id: a, action: set, args: {x: 1}}\n",
    )
    .unwrap();
    let out = outpost(&["validate", one.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(1 step, dag)"), "{text}");
}

/// The subcommands `outpost --help` lists.
fn subcommands() -> Vec<String> {
    let out = outpost(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("Commands:")
        .nth(1)
        .unwrap_or_default()
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .lines()
        // Continuation lines of a wrapped description are indented further.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

#[test]
fn every_option_of_every_command_has_help_and_at_most_one_default() {
    let commands = subcommands();
    assert!(commands.len() > 10, "{commands:?}");
    for cmd in &commands {
        let out = outpost(&[cmd, "--help"]);
        assert!(out.status.success(), "{cmd} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        for block in text.split("\n\n") {
            let lines: Vec<&str> = block.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            let Some(first) = lines.first() else { continue };
            if !first.starts_with('-') {
                continue;
            }
            assert!(lines.len() >= 2, "`outpost {cmd}`: option {first} has no help text");
            assert!(
                block.matches("[default:").count() <= 1,
                "`outpost {cmd}`: option {first} shows its default twice:\n{block}"
            );
        }
    }
}

#[test]
fn run_help_groups_its_options_and_has_examples() {
    let out = outpost(&["run", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for heading in [
        "Run limits:",
        "Cloud sync:",
        "Security:",
        "Journal and retention:",
        "Examples:",
    ] {
        assert!(text.contains(heading), "no {heading} in run --help:\n{text}");
    }
}
