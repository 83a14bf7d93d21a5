//! `exec`: runs a command. Output: `{exit_code, stdout, stderr}` (and `json` when stdout parses
//! as JSON). A non-zero exit is the retryable error `exec.nonzero_exit`; a command that cannot be
//! started is the non-retryable `exec.spawn_failed`. The idempotency key is in the environment as
//! `OUTPOST_IDEMPOTENCY_KEY`, next to `OUTPOST_RUN_ID`, `OUTPOST_STEP` and `OUTPOST_ATTEMPT`.

use std::process::Stdio;

use outpost_shared::definition::Signature;
use serde_json::{Map, Value, json};

use super::{Action, ActionError, ActionFuture, Call, str_arg, truncate};

/// Most bytes of stdout/stderr kept in a step's output.
pub const MAX_CAPTURE: usize = 64 * 1024;

/// The `exec` action.
pub struct Exec;

impl Action for Exec {
    fn signature(&self) -> Signature {
        Signature {
            required: &["command"],
            optional: &["args", "env", "cwd", "stdin"],
        }
    }

    fn check(&self, args: &Map<String, Value>) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(a) = args.get("args")
            && !a.is_array()
            && !a.as_str().is_some_and(outpost_shared::expr::is_template)
        {
            p.push("'args' must be a list".to_string());
        }
        if let Some(e) = args.get("env")
            && !e.is_object()
        {
            p.push("'env' must be a map of names to values".to_string());
        }
        p
    }

    fn execute(&self, call: Call) -> ActionFuture {
        Box::pin(async move {
            let command = str_arg(&call.args, "command")?.to_string();
            let path_override = call.args.get("env").and_then(|e| e.get("PATH")).and_then(Value::as_str);
            let program = resolve(&command, path_override).map_err(|why| {
                ActionError::permanent("exec.spawn_failed", format!("cannot start '{command}': {why}"))
            })?;
            let mut cmd = tokio::process::Command::new(&program);
            if let Some(list) = call.args.get("args") {
                let list = list
                    .as_array()
                    .ok_or_else(|| ActionError::permanent("invalid_argument", "'args' must be a list"))?;
                for a in list {
                    cmd.arg(a.as_str().map(str::to_string).unwrap_or_else(|| a.to_string()));
                }
            }
            if let Some(Value::Object(env)) = call.args.get("env") {
                for (k, v) in env {
                    cmd.env(k, v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
                }
            }
            if let Some(cwd) = call.args.get("cwd").and_then(Value::as_str) {
                cmd.current_dir(cwd);
            }
            cmd.env("OUTPOST_IDEMPOTENCY_KEY", &call.key)
                .env("OUTPOST_RUN_ID", &call.run_id)
                .env("OUTPOST_STEP", &call.step)
                .env("OUTPOST_ATTEMPT", call.attempt.to_string())
                .stdin(if call.args.get("stdin").is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // A timed-out or cancelled step must not leave its process running.
                .kill_on_drop(true);
            // Nor may a killed agent: the re-run after restart must not race a leftover process.
            // SAFETY: prctl is async-signal-safe and touches only the child's own state.
            #[cfg(target_os = "linux")]
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| ActionError::permanent("exec.spawn_failed", format!("cannot start '{command}': {e}")))?;
            if let Some(input) = call.args.get("stdin")
                && let Some(mut stdin) = child.stdin.take()
            {
                use tokio::io::AsyncWriteExt;
                let text = input.as_str().map(str::to_string).unwrap_or_else(|| input.to_string());
                // A child that exits without reading stdin is not an error of ours.
                let _ = stdin.write_all(text.as_bytes()).await;
            }
            let out = child
                .wait_with_output()
                .await
                .map_err(|e| ActionError::retryable("exec.io", format!("waiting for '{command}': {e}")))?;
            let stdout = truncate(String::from_utf8_lossy(&out.stdout).into_owned(), MAX_CAPTURE);
            let stderr = truncate(String::from_utf8_lossy(&out.stderr).into_owned(), MAX_CAPTURE);
            let code = out.status.code();
            if !out.status.success() {
                let how = match code {
                    Some(c) => format!("exit code {c}"),
                    None => "killed by a signal".to_string(),
                };
                let tail: String = stderr
                    .trim()
                    .chars()
                    .rev()
                    .take(300)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                return Err(ActionError::retryable(
                    "exec.nonzero_exit",
                    if tail.is_empty() {
                        format!("'{command}' failed with {how}")
                    } else {
                        format!("'{command}' failed with {how}: {tail}")
                    },
                ));
            }
            let mut output = json!({"exit_code": code, "stdout": stdout, "stderr": stderr});
            if let Ok(parsed) = serde_json::from_str::<Value>(stdout.trim())
                && (parsed.is_object() || parsed.is_array() || parsed.is_number())
            {
                output["json"] = parsed;
            }
            Ok(output)
        })
    }
}

/// Finds the program to run: a path as given, or a name searched in `PATH`. Done before spawning
/// so a missing command is the same clear error everywhere (emulators report it differently).
fn resolve(command: &str, path_override: Option<&str>) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &std::path::Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if command.is_empty() {
        return Err("the command is empty".into());
    }
    if command.contains('/') {
        let p = std::path::PathBuf::from(command);
        return if runnable(&p) {
            Ok(p)
        } else {
            Err("no such executable file".into())
        };
    }
    let path = path_override
        .map(str::to_string)
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(command))
        .find(|p| runnable(p))
        .ok_or_else(|| format!("not found in PATH ({path})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::actions::test_call as call;

    #[tokio::test]
    async fn captures_output_key_and_json() {
        let out = Exec
            .execute(call(
                json!({"command": "sh", "args": ["-c", "echo \"{\\\"k\\\": \\\"$OUTPOST_IDEMPOTENCY_KEY\\\"}\""]}),
            ))
            .await
            .unwrap();
        assert_eq!(out["exit_code"], json!(0));
        assert_eq!(out["json"]["k"], json!("r/s/1"));
    }

    #[tokio::test]
    async fn nonzero_exit_and_missing_command_are_classified() {
        let e = Exec
            .execute(call(json!({"command": "sh", "args": ["-c", "echo boom >&2; exit 3"]})))
            .await
            .unwrap_err();
        assert_eq!(e.info.kind, "exec.nonzero_exit");
        assert!(
            e.retryable && e.info.message.contains("exit code 3") && e.info.message.contains("boom"),
            "{e:?}"
        );
        let e = Exec
            .execute(call(json!({"command": "/no/such/binary"})))
            .await
            .unwrap_err();
        assert_eq!(e.info.kind, "exec.spawn_failed");
        assert!(!e.retryable);
    }
}
