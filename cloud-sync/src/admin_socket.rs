//! The admin socket (`DATA_DIR/admin.sock`, mode 0600): while the service runs it holds the
//! store, so `outpost-cloud users …` and `tokens …` send their command here instead, one JSON
//! line each way. The caller is named from the socket's peer credentials (`local:USER`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::access::Access;
use crate::operators::admin::{self, AdminReply, AdminRequest};
use crate::service::now_ms;

/// The socket's path in a data directory.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// One answer on the socket.
#[derive(serde::Serialize, serde::Deserialize)]
enum Answer {
    Ok(AdminReply),
    Err(String),
}

/// Most bytes of one request line.
const MAX_LINE: usize = 64 * 1024;

/// The user name of a uid.
pub fn user_name(uid: u32) -> String {
    outpost_shared::unix_user_name(uid)
}

/// Listens on `path` (replacing a stale socket), answering admin commands until the runtime
/// stops. Only the service's own user can connect (0600).
pub async fn serve(path: &Path, access: Arc<Access>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors and the like: wait rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let access = access.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, access).await {
                    tracing::warn!(error = %e, "admin socket: a request failed");
                }
            });
        }
    }))
}

async fn answer(stream: UnixStream, access: Arc<Access>) -> std::io::Result<()> {
    let who = stream
        .peer_cred()
        .map(|c| format!("local:{}", user_name(c.uid())))
        .unwrap_or_else(|_| "local:unknown".into());
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).take(MAX_LINE as u64).read_line(&mut line).await?;
    let answer = match serde_json::from_str::<AdminRequest>(&line) {
        Err(e) => Answer::Err(format!("admin socket: not a command: {e}")),
        Ok(req) => {
            let store = access.store().clone();
            let done = tokio::task::spawn_blocking(move || admin::execute(&store, &req, &who, "local", now_ms())).await;
            match done {
                Ok(Ok(reply)) => {
                    for u in &reply.end_sessions_of {
                        access.end_sessions_of(u);
                    }
                    Answer::Ok(reply)
                }
                Ok(Err(e)) => Answer::Err(e.to_string()),
                Err(e) => Answer::Err(e.to_string()),
            }
        }
    };
    let mut out = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

/// Sends `req` to a running service's socket: `None` when no service listens there.
pub fn request(path: &Path, req: &AdminRequest) -> Option<Result<AdminReply, String>> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path).ok()?;
    let mut line = serde_json::to_vec(req).ok()?;
    line.push(b'\n');
    if let Err(e) = stream.write_all(&line) {
        return Some(Err(format!("admin socket {}: {e}", path.display())));
    }
    let mut reply = String::new();
    if let Err(e) = std::io::BufReader::new(stream).read_line(&mut reply) {
        return Some(Err(format!("admin socket {}: {e}", path.display())));
    }
    Some(match serde_json::from_str::<Answer>(&reply) {
        Ok(Answer::Ok(r)) => Ok(r),
        Ok(Answer::Err(e)) => Err(e),
        Err(e) => Err(format!("admin socket {}: bad answer: {e}", path.display())),
    })
}
