//! Triggers: start runs from files dropped in a watched directory, from MQTT messages on a
//! local broker and (feature `opcua`) from data changes of OPC UA points. (The local API and
//! CLI are one more.)
//!
//! Every trigger maps what it received to a deterministic run id (its dedupe key), and starting
//! a run with an existing id starts nothing, so a file seen again after a crash or a message
//! redelivered by the broker never starts a second run. A file is moved out of the directory
//! only after its run is durably started; an MQTT message is acknowledged only then (manual
//! acks on a persistent session), so the broker redelivers whatever a crash interrupted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::runtime::{MAX_INPUT_BYTES, Runtime, RuntimeError, StartRequest};

#[cfg(feature = "opcua")]
pub mod opcua;

/// How often watched directories are scanned.
pub const POLL: Duration = Duration::from_secs(1);

/// The local broker MQTT triggers subscribe on.
#[derive(Debug, Clone)]
pub struct MqttTriggerConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id; fixed so the broker keeps the session (and unacked messages) across restarts.
    pub client_id: String,
    /// TLS (`mqtts://`), or plain text.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0u8]) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// MQTT topic filter → workflows it starts.
type TopicFilters = BTreeMap<String, Vec<String>>;

/// The triggers of the latest version of every stored workflow: MQTT filters and directories.
fn load(rt: &Runtime) -> (TopicFilters, Vec<(String, PathBuf)>) {
    let mut mqtt = TopicFilters::new();
    let mut dirs = Vec::new();
    for def in rt.latest_definitions() {
        for t in &def.doc.triggers {
            if let Some(f) = &t.mqtt {
                mqtt.entry(f.clone()).or_default().push(def.name().to_string());
            }
            if let Some(d) = &t.directory {
                dirs.push((def.name().to_string(), PathBuf::from(d)));
            }
        }
    }
    (mqtt, dirs)
}

/// Outcome of one trigger delivery.
pub(crate) enum Delivery {
    /// Started now, or already started earlier (a duplicate).
    Done,
    /// Rejected by run limits: try again later.
    Deferred,
    /// Can never start (bad input, unknown workflow): set aside with the reason.
    Refused(String),
}

pub(crate) async fn deliver(rt: &Runtime, workflow: &str, run_id: String, input: Value, source: &str) -> Delivery {
    let req = StartRequest {
        workflow: workflow.to_string(),
        version: None,
        input: Some(input),
        id: Some(run_id),
    };
    match rt.start(req).await {
        Ok(r) if r.created => {
            info!(run_id = %r.run_id, workflow, source, "run started by trigger");
            Delivery::Done
        }
        Ok(r) => {
            info!(run_id = %r.run_id, workflow, source, "trigger delivered again; run already exists");
            Delivery::Done
        }
        Err(e @ (RuntimeError::Busy(_) | RuntimeError::Journal(_))) => {
            warn!(workflow, source, error = %e, "trigger deferred");
            Delivery::Deferred
        }
        Err(e) => {
            warn!(workflow, source, error = %e, "trigger refused");
            Delivery::Refused(e.to_string())
        }
    }
}

/// Watches the directories named by `directory` triggers until the process ends.
pub async fn run_directories(rt: Runtime, mut changed: watch::Receiver<u64>) {
    let mut dirs = load(&rt).1;
    loop {
        if dirs.is_empty() {
            if changed.changed().await.is_err() {
                return;
            }
            dirs = load(&rt).1;
            continue;
        }
        for (workflow, dir) in &dirs {
            scan(&rt, workflow, dir).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            Ok(()) = changed.changed() => dirs = load(&rt).1,
        }
    }
}

/// One pass over a watched directory: every `*.json` file starts (at most) one run.
async fn scan(rt: &Runtime, workflow: &str, dir: &Path) {
    if let Err(e) = tokio::fs::create_dir_all(dir).await {
        warn!(dir = %dir.display(), error = %e, "cannot create watched directory");
        return;
    }
    let mut names = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".json") && !name.starts_with('.') && e.path().is_file() {
                    names.push(name);
                }
            }
        }
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot read watched directory");
            return;
        }
    }
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let source = path.display().to_string();
        let outcome = match read_limited(&path).await {
            Err(why) => Delivery::Refused(why),
            Ok(bytes) => match file_input(workflow, &name, &bytes) {
                Err(why) => Delivery::Refused(why),
                Ok((id, input)) => deliver(rt, workflow, id, input, &source).await,
            },
        };
        match outcome {
            Delivery::Done => set_aside(dir, &name, ".done", None).await,
            Delivery::Refused(why) => set_aside(dir, &name, ".failed", Some(why)).await,
            Delivery::Deferred => {}
        }
    }
}

/// Reads a trigger file, refusing one over the input limit before reading it (a file of
/// gigabytes must not land in memory first).
async fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    let too_big = |n: u64| format!("{n} bytes; the limit is {MAX_INPUT_BYTES} bytes");
    let len = file.metadata().await.map_err(|e| format!("cannot read: {e}"))?.len();
    if len > MAX_INPUT_BYTES as u64 {
        return Err(too_big(len));
    }
    // The file may still grow while we read: never take more than one byte past the limit.
    let mut bytes = Vec::new();
    file.take(MAX_INPUT_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() > MAX_INPUT_BYTES {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// A trigger file's run id and input: the file must hold JSON; the id is a hash of its name and
/// content, so the same file dropped again starts no second run.
pub fn file_input(workflow: &str, name: &str, bytes: &[u8]) -> Result<(String, Value), String> {
    let input = serde_json::from_slice::<Value>(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let id = format!("file:{workflow}:{:016x}", fnv1a(&[name.as_bytes(), bytes]));
    Ok((id, input))
}

/// Moves a handled file into `DIR/SUB/`, with a `NAME.error` file beside it when refused.
async fn set_aside(dir: &Path, name: &str, sub: &str, why: Option<String>) {
    let to = dir.join(sub);
    let moved = async {
        tokio::fs::create_dir_all(&to).await?;
        if let Some(why) = &why {
            tokio::fs::write(to.join(format!("{name}.error")), format!("{why}\n")).await?;
        }
        tokio::fs::rename(dir.join(name), to.join(name)).await
    };
    if let Err(e) = moved.await {
        warn!(file = %dir.join(name).display(), error = %e, "cannot move a handled trigger file");
    }
}

/// True when MQTT topic `topic` matches filter `filter` (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !topic.starts_with('$') || !filter.starts_with(['#', '+']),
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The run id of a message: the payload's own `id` when it has one, else a hash of topic and
/// payload, so a redelivery maps to the same run.
pub fn message_run_id(workflow: &str, topic: &str, payload: &[u8]) -> String {
    let own = serde_json::from_slice::<Value>(payload).ok().and_then(|v| {
        v.get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty() && id.len() <= 64)
            .filter(|id| {
                id.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            })
            .map(str::to_string)
    });
    match own {
        Some(id) => format!("mqtt:{workflow}:{id}"),
        None => format!("mqtt:{workflow}:{:016x}", fnv1a(&[topic.as_bytes(), payload])),
    }
}

/// A message's run input: a JSON object as is, any other payload under `payload`.
pub fn message_input(payload: &[u8]) -> Value {
    match serde_json::from_slice::<Value>(payload) {
        Ok(v @ Value::Object(_)) => v,
        Ok(v) => json!({ "payload": v }),
        Err(_) => json!({ "payload": String::from_utf8_lossy(payload) }),
    }
}

/// Subscribes to the topics of `mqtt` triggers on the local broker until the process ends.
pub async fn run_mqtt(rt: Runtime, mut changed: watch::Receiver<u64>, config: MqttTriggerConfig) {
    let mut opts = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    opts.set_keep_alive(Duration::from_secs(30));
    // A persistent session keeps unacked messages at the broker across our restarts.
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    // rumqttc drops the connection on a packet over its limit (10 KiB by default) and the broker
    // redelivers it on every reconnect: read well past the input limit and refuse by name.
    opts.set_max_packet_size(4 * MAX_INPUT_BYTES, 64 * 1024);
    if let Some(tls) = config.tls.clone() {
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            tls,
        )));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    // Unbounded so the poll task never waits on the handler while the handler waits on the
    // poll task to take its ack; the broker's in-flight window bounds the unacked messages.
    let (tx, mut rx) = mpsc::unbounded_channel::<rumqttc::Publish>();
    let filters = std::sync::Arc::new(std::sync::Mutex::new(load(&rt).0));

    // Handler: starts runs and acks, off the polling task (rumqttc must be polled continuously).
    let handler = {
        let (rt, client, filters) = (rt.clone(), client.clone(), filters.clone());
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                let workflows: Vec<String> = {
                    let f = filters.lock().unwrap_or_else(|e| e.into_inner());
                    f.iter()
                        .filter(|(filter, _)| topic_matches(filter, &p.topic))
                        .flat_map(|(_, w)| w.clone())
                        .collect()
                };
                for w in workflows {
                    let id = message_run_id(&w, &p.topic, &p.payload);
                    let source = format!("mqtt {}", p.topic);
                    if p.payload.len() > MAX_INPUT_BYTES {
                        warn!(topic = %p.topic, bytes = p.payload.len(), limit = MAX_INPUT_BYTES, "trigger message larger than a run input; dropped");
                        continue;
                    }
                    // A start refused for now (a full limit, a failing journal) is tried again
                    // here, unacked, while later messages wait behind it: acks go in order, and
                    // the broker would redeliver it only after a reconnect that may never come.
                    let mut delay = Duration::from_millis(500);
                    while let Delivery::Deferred =
                        deliver(&rt, &w, id.clone(), message_input(&p.payload), &source).await
                    {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
                if let Err(e) = client.ack(&p).await {
                    warn!(error = %e, "cannot ack trigger message");
                }
            }
        })
    };

    let mut backoff = Duration::from_millis(500);
    loop {
        tokio::select! {
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    info!(broker = %format!("{}:{}", config.host, config.port), session_present = ack.session_present, "MQTT trigger connected");
                    backoff = Duration::from_millis(500);
                    subscribe_all(&client, &filters);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let wait = backoff.mul_f64(0.5 + fastrand::f64());
                    warn!(error = %e, retry_in = ?wait, "MQTT trigger broker unreachable");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            },
            Ok(()) = changed.changed() => {
                *filters.lock().unwrap_or_else(|e| e.into_inner()) = load(&rt).0;
                subscribe_all(&client, &filters);
            }
        }
    }
    handler.abort();
}

fn subscribe_all(client: &AsyncClient, filters: &std::sync::Mutex<TopicFilters>) {
    let list: Vec<String> = filters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    for f in list {
        // try_subscribe: never block the polling task on the request channel.
        if let Err(e) = client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
            warn!(filter = %f, error = %e, "cannot subscribe");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_match_like_mqtt() {
        assert!(topic_matches("plant/+/lot", "plant/line1/lot"));
        assert!(!topic_matches("plant/+/lot", "plant/line1/lot/x"));
        assert!(topic_matches("plant/#", "plant/line1/lot"));
        assert!(topic_matches("plant/#", "plant"));
        assert!(!topic_matches("#", "$SYS/broker"));
        assert!(topic_matches("a/b", "a/b") && !topic_matches("a/b", "a/c"));
    }

    #[test]
    fn redelivered_messages_map_to_the_same_run() {
        let a = message_run_id("w", "t", br#"{"kg": 1}"#);
        assert_eq!(a, message_run_id("w", "t", br#"{"kg": 1}"#));
        assert_ne!(a, message_run_id("w", "t", br#"{"kg": 2}"#));
        assert_eq!(message_run_id("w", "t", br#"{"id": "lot-7"}"#), "mqtt:w:lot-7");
        // An id that is not a safe run id falls back to the hash.
        assert!(message_run_id("w", "t", br#"{"id": "a/b"}"#).starts_with("mqtt:w:"));
        assert_eq!(message_input(b"42"), json!({"payload": 42}));
        assert_eq!(message_input(b"hot"), json!({"payload": "hot"}));
    }
}
