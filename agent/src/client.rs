//! A client of the local API over the agent's Unix socket (used by the CLI and the benchmark).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

/// A client failure (as opposed to an error answer from the agent).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("cannot reach the agent at {socket}: {source} (is `outpost run` running with this data directory?)")]
    Connect {
        /// Socket path.
        socket: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The connection broke or the answer is not HTTP.
    #[error("talking to the agent: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The answer is not JSON.
    #[error("the agent answered {status} with a body that is not JSON: {body}")]
    NotJson {
        /// HTTP status.
        status: StatusCode,
        /// Body text.
        body: String,
    },
}

/// An open HTTP/1.1 connection to the agent; requests on it are sequential.
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

impl Connection {
    /// Connects to the socket.
    pub async fn open(socket: &Path) -> Result<Connection, ClientError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // The connection ends when the sender is dropped; errors surface on requests.
            let _ = conn.await;
        });
        Ok(Connection { sender })
    }

    /// Sends one request; returns the status and the JSON body.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Value), ClientError> {
        self.sender.ready().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "outpost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if bytes.is_empty() {
            return Ok((status, Value::Null));
        }
        match serde_json::from_slice(&bytes) {
            Ok(v) => Ok((status, v)),
            Err(_) => Err(ClientError::NotJson {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            }),
        }
    }
}

/// A client that opens a connection per request.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client for the agent listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client { socket: socket.into() }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request on a fresh connection.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Value), ClientError> {
        Connection::open(&self.socket).await?.request(method, path, body).await
    }
}
