//! `exec`: runs a command. Output: `{exit_code, stdout, stderr}` (and `json` when stdout parses
//! as JSON). A non-zero exit is the retryable error `exec.nonzero_exit`; a command that cannot be
//! started is the non-retryable `exec.spawn_failed`. The idempotency key is in the environment as
//! `OUTPOST_IDEMPOTENCY_KEY`, next to `OUTPOST_RUN_ID`, `OUTPOST_STEP` and `OUTPOST_ATTEMPT`.
//!
//! Each command runs in a process group of its own, and the whole group is killed when the step
//! ends (done, timed out or cancelled): `sh -c "…; sleep 30"` leaves no `sleep` behind. At most
//! [`MAX_CAPTURE`] bytes of each stream are kept; the rest is read and dropped as it comes.

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
                .kill_on_drop(true)
                // Nor its children: the group is killed with the step (`GroupGuard`).
                .process_group(0);
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
            let _group = GroupGuard(child.id());
            if let Some(input) = call.args.get("stdin")
                && let Some(mut stdin) = child.stdin.take()
            {
                use tokio::io::AsyncWriteExt;
                let text = input.as_str().map(str::to_string).unwrap_or_else(|| input.to_string());
                // A child that exits without reading stdin is not an error of ours.
                let _ = stdin.write_all(text.as_bytes()).await;
            }
            let (out, err) = (child.stdout.take(), child.stderr.take());
            let (status, stdout, stderr) = tokio::try_join!(child.wait(), read_capped(out), read_capped(err))
                .map_err(|e| ActionError::retryable("exec.io", format!("waiting for '{command}': {e}")))?;
            let stdout = truncate(String::from_utf8_lossy(&stdout).into_owned(), MAX_CAPTURE);
            let stderr = truncate(String::from_utf8_lossy(&stderr).into_owned(), MAX_CAPTURE);
            let code = status.code();
            if !status.success() {
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

/// Kills the command's whole process group when the step is over, however it ends (the future
/// is dropped on a timeout or a cancel).
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: killpg only sends a signal. The group id is the child's pid (process_group(0)).
            // Linux does not hand out a pid still in use as a group id, so while any member lives
            // this reaches exactly them; an empty group fails with ESRCH.
            unsafe {
                libc::killpg(pid, libc::SIGKILL);
            }
        }
    }
}

/// Reads a stream to its end, keeping at most [`MAX_CAPTURE`] bytes (plus a few for a
/// character cut at the edge) so a chatty command cannot fill the agent's memory.
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut kept = Vec::new();
    let Some(mut r) = r else { return Ok(kept) };
    let mut buf = [0u8; 8192];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(kept);
        }
        let room = (MAX_CAPTURE + 4).saturating_sub(kept.len());
        kept.extend_from_slice(buf.get(..n.min(room)).unwrap_or(&[]));
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

    fn alive(marker: &str) -> usize {
        // Processes whose command line carries the marker (a sleep length nobody else uses).
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).replace('\0', " ").trim() == format!("sleep {marker}"))
            .count()
    }

    #[tokio::test]
    async fn a_timed_out_command_takes_its_whole_process_group_with_it() {
        let script = "sleep 31.7 & sleep 31.7 & sleep 31.7";
        let run = Exec.execute(call(json!({"command": "sh", "args": ["-c", script]})));
        let timed_out = tokio::time::timeout(std::time::Duration::from_millis(500), run).await;
        assert!(timed_out.is_err());
        // SIGKILL is delivered at once, but the kernel reaps asynchronously.
        for _ in 0..50 {
            if alive("31.7") == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("{} 'sleep 31.7' processes outlived their step", alive("31.7"));
    }

    #[tokio::test]
    async fn output_is_kept_up_to_the_cap_while_the_rest_is_drained() {
        let out = Exec
            .execute(call(
                json!({"command": "sh", "args": ["-c", "head -c 5000000 /dev/zero | tr '\\0' x"]}),
            ))
            .await
            .unwrap();
        let stdout = out["stdout"].as_str().unwrap();
        assert!(
            (MAX_CAPTURE - 4..MAX_CAPTURE + 64).contains(&stdout.len()),
            "{}",
            stdout.len()
        );
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
