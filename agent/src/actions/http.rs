//! `http`: one HTTP request (http or https, system CA store). Sends `Idempotency-Key` with the
//! step's key. Output: `{status, headers, body}` plus `json` when the body is JSON. A 5xx, 408 or
//! 429 answer is the retryable `http.server_error` / `http.client_error`; any other 4xx is the
//! non-retryable `http.client_error`; no connection is the retryable `http.connect`.

use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use outpost_shared::definition::Signature;
use serde_json::{Map, Value, json};

use super::{Action, ActionError, ActionFuture, Call, str_arg, truncate};

/// Largest response body read, in bytes.
pub const MAX_BODY: usize = 1024 * 1024;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The `http` action.
pub struct Http {
    client: Arc<Result<HttpsClient, String>>,
}

impl Http {
    /// A client using the system's CA certificates.
    pub fn new() -> Self {
        let built = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map(|b| {
                let conn = b.https_or_http().enable_http1().build();
                Client::builder(TokioExecutor::new()).build(conn)
            })
            .map_err(|e| format!("no usable CA certificates in the system store: {e}"));
        Http {
            client: Arc::new(built),
        }
    }
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

impl Action for Http {
    fn signature(&self) -> Signature {
        Signature {
            required: &["url"],
            optional: &["method", "headers", "body"],
        }
    }

    fn check(&self, args: &Map<String, Value>) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(Value::String(m)) = args.get("method")
            && !outpost_shared::expr::is_template(m)
            && !METHODS.contains(&m.to_ascii_uppercase().as_str())
        {
            p.push(format!("method '{m}' is not one of {}", METHODS.join(", ")));
        }
        if let Some(Value::String(u)) = args.get("url")
            && !outpost_shared::expr::is_template(u)
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            p.push(format!("url '{u}' must start with http:// or https://"));
        }
        if let Some(h) = args.get("headers")
            && !h.is_object()
        {
            p.push("'headers' must be a map".into());
        }
        p
    }

    fn execute(&self, call: Call) -> ActionFuture {
        let client = self.client.clone();
        Box::pin(async move {
            let client = client
                .as_ref()
                .as_ref()
                .map_err(|e| ActionError::permanent("http.tls", e.clone()))?;
            let url = str_arg(&call.args, "url")?;
            let uri: hyper::Uri = url
                .parse()
                .map_err(|e| ActionError::permanent("invalid_argument", format!("url '{url}': {e}")))?;
            let method = call
                .args
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or("GET")
                .to_ascii_uppercase();
            let method = hyper::Method::from_bytes(method.as_bytes())
                .map_err(|_| ActionError::permanent("invalid_argument", format!("method '{method}'")))?;
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(uri)
                .header("Idempotency-Key", &call.key);
            let body = match call.args.get("body") {
                None | Some(Value::Null) => Bytes::new(),
                Some(Value::String(s)) => Bytes::from(s.clone()),
                Some(v) => {
                    req = req.header("Content-Type", "application/json");
                    Bytes::from(v.to_string())
                }
            };
            if let Some(Value::Object(h)) = call.args.get("headers") {
                for (k, v) in h {
                    req = req.header(
                        k.as_str(),
                        v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()),
                    );
                }
            }
            let req = req
                .body(Full::new(body))
                .map_err(|e| ActionError::permanent("invalid_argument", format!("request: {e}")))?;
            let resp = client
                .request(req)
                .await
                .map_err(|e| ActionError::retryable("http.connect", format!("{url}: {}", error_chain(&e))))?;
            let status = resp.status().as_u16();
            let headers: Map<String, Value> = resp
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value::from(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                    )
                })
                .collect();
            let bytes = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| ActionError::retryable("http.body", format!("{url}: reading the body: {e}")))?
                .to_bytes();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if !(200..300).contains(&status) {
                let msg = format!("{url} answered {status}: {}", truncate(text, 300));
                return Err(match status {
                    408 | 429 => ActionError::retryable("http.client_error", msg),
                    400..=499 => ActionError::permanent("http.client_error", msg),
                    _ => ActionError::retryable("http.server_error", msg),
                });
            }
            let mut out = json!({"status": status, "headers": headers, "body": text});
            if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
                out["json"] = v;
            }
            Ok(out)
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};

    async fn serve() -> String {
        let app = Router::new()
            .route(
                "/echo",
                post(|h: HeaderMap, body: String| async move {
                    let key = h
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    axum::Json(json!({"key": key, "body": body}))
                }),
            )
            .route(
                "/missing",
                get(|| async { (StatusCode::NOT_FOUND, "no such setpoint") }),
            )
            .route("/busy", get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "busy") }))
            .route(
                "/throttled",
                get(|| async { (StatusCode::TOO_MANY_REQUESTS, "slow down") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    use crate::actions::test_call as call;

    #[tokio::test]
    async fn sends_idempotency_key_and_parses_json() {
        let base = serve().await;
        let out = Http::new()
            .execute(call(
                json!({"url": format!("{base}/echo"), "method": "post", "body": {"valve": 3}}),
            ))
            .await
            .unwrap();
        assert_eq!(out["status"], json!(200));
        assert_eq!(out["json"]["key"], json!("r/s/1"));
        assert_eq!(out["json"]["body"], json!("{\"valve\":3}"));
    }

    #[tokio::test]
    async fn classifies_failures() {
        let base = serve().await;
        let http = Http::new();
        let e = http
            .execute(call(json!({"url": format!("{base}/missing")})))
            .await
            .unwrap_err();
        assert_eq!((e.info.kind.as_str(), e.retryable), ("http.client_error", false));
        assert!(
            e.info.message.contains("404") && e.info.message.contains("no such setpoint"),
            "{e:?}"
        );
        let e = http
            .execute(call(json!({"url": format!("{base}/busy")})))
            .await
            .unwrap_err();
        assert_eq!((e.info.kind.as_str(), e.retryable), ("http.server_error", true));
        let e = http
            .execute(call(json!({"url": format!("{base}/throttled")})))
            .await
            .unwrap_err();
        assert_eq!((e.info.kind.as_str(), e.retryable), ("http.client_error", true));
        // Nothing listens on port 9 of loopback.
        let e = http
            .execute(call(json!({"url": "http://127.0.0.1:9/"})))
            .await
            .unwrap_err();
        assert_eq!((e.info.kind.as_str(), e.retryable), ("http.connect", true));
    }

    #[test]
    fn rejects_bad_literal_arguments_at_validation() {
        let args: Map<String, Value> =
            serde_json::from_value(json!({"url": "ftp://x", "method": "FETCH", "headers": 3})).unwrap();
        let p = Http::new().check(&args);
        assert_eq!(p.len(), 3, "{p:?}");
    }
}
