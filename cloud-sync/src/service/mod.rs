//! The service: ingest of what devices send, delivery of what they are sent.
//!
//! One task polls the MQTT event loop and hands every message to the ingest task, which stores
//! it (durably, for events) and only then acknowledges it: at the application level with an
//! `Ack` carrying the device's next expected sequence, and at the MQTT level. A gap makes it ask
//! the device to resend from the gap. Commands wait in the store until their device is online
//! (a birth newer than its death) and are sent again on every new birth until answered; the
//! agent applies each id once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_shared::protocol::{
    self, Ack, Body, Channel, Command, CommandKind, Desired, ProtocolError, Resend, Topics,
};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::store::{CommandRecord, Deployment, ReportedRow, Store, StoreError};

mod rollouts;

/// Wall-clock now in ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Ingest counters since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages received.
    pub messages: AtomicU64,
    /// Events newly stored.
    pub events: AtomicU64,
    /// Events received again (already stored).
    pub duplicate_events: AtomicU64,
    /// Resend requests sent.
    pub resends: AtomicU64,
    /// Messages rejected.
    pub rejected: AtomicU64,
    /// Events set aside because the device's journal no longer has them (see `lineage`).
    pub archived_events: AtomicU64,
    /// Events a device's journal deleted before this store got them.
    pub lost_events: AtomicU64,
}

/// How the service signs what it sends and checks what it receives.
#[derive(Debug, Clone)]
pub enum Security {
    /// Protocol v2: orders signed with the fleet key, device messages checked against each
    /// device's enrolled key.
    Signed {
        /// The fleet signing key.
        fleet: Arc<outpost_shared::signing::SigningKey>,
        /// Enrolled devices and revocations.
        keyring: Arc<crate::pki::Keyring>,
    },
    /// `--insecure-unsigned`: protocol v1, nothing signed or checked.
    Unsigned,
}

/// How much of each device's mirrored history cloud-sync keeps (docs/scale-out.md, *Retention*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Most events kept per device: the oldest ended runs go first.
    pub events_per_device: u64,
    /// Ended runs are kept this long after they ended; `None`: no age limit.
    pub ended_runs_for: Option<Duration>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            events_per_device: 100_000,
            ended_runs_for: Some(Duration::from_secs(90 * 24 * 3600)),
        }
    }
}

/// How often retention looks at every device.
const RETENTION_EVERY: Duration = Duration::from_secs(600);

fn retention_every() -> Duration {
    std::env::var("OUTPOST_CLOUD_RETENTION_EVERY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(RETENTION_EVERY, Duration::from_millis)
}

/// Forgets what retention allows, device by device, until the service is gone. One replica at
/// a time (a lock across replicas), so two never prune the same device at once.
async fn retain(service: std::sync::Weak<Service>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(s) = service.upgrade() else { return };
        let (store, policy) = (s.store.clone(), s.retention);
        drop(s);
        let done = blocking(move || {
            let _across = store.lock_across_replicas("retention")?;
            let limits = crate::store::Retention {
                events: policy.events_per_device,
                ended_before_ms: policy.ended_runs_for.map_or(0, |d| {
                    now_ms().saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                }),
            };
            let mut total = crate::store::Pruned::default();
            for (id, _) in store.devices()? {
                let p = store.prune(&id, &limits)?;
                total.runs += p.runs;
                total.events += p.events;
            }
            Ok(total)
        })
        .await;
        match done {
            Ok(p) if p.runs > 0 => info!(runs = p.runs, events = p.events, "retention forgot ended runs"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "retention failed; trying again at the next round"),
        }
    }
}

/// How the service reaches its broker.
#[derive(Debug, Clone)]
pub struct Link {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Topic prefix.
    pub prefix: String,
    /// MQTT client id.
    pub client_id: String,
    /// TLS (with this service's client certificate), or plain text.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Signatures.
    pub security: Security,
    /// Queue commands for devices never seen and never enrolled (pre-provisioning); without
    /// it such a command is refused, since it would wait forever for a typo.
    pub allow_unknown_devices: bool,
    /// How much mirrored history is kept per device.
    pub retention: RetentionPolicy,
    /// The MQTT shared-subscription group of the replicas (`$share/GROUP/…`): each device
    /// message goes to one of them. `None`: this process alone takes every message.
    pub shared_group: Option<String>,
}

/// The cloud-sync service.
pub struct Service {
    /// The store.
    pub store: Arc<Store>,
    client: AsyncClient,
    topics: Topics,
    seal: protocol::Seal,
    security: Security,
    /// Counters.
    pub stats: Stats,
    /// Bumped whenever the store may have changed; the console's live updates follow it.
    changes: watch::Sender<u64>,
    /// Set when the message being handled hit a storage failure (see `handle`).
    retry: std::sync::atomic::AtomicBool,
    /// Counts not yet written to the store; `flush_counts` writes them once a second.
    unsaved_counts: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// The embedded broker's gate, when there is one (its refusals are counters too).
    gate: std::sync::OnceLock<Arc<crate::acl::GateStats>>,
    allow_unknown_devices: bool,
    /// Held while a rollout is read, decided on and stored, so the ticker and an operator's
    /// order never both move one from the same state.
    rollout_lock: tokio::sync::Mutex<()>,
    /// True while the MQTT connection is up (`/v1/health` reports it).
    broker_up: std::sync::atomic::AtomicBool,
    /// This replica's MQTT client id (`/v1/health` names it).
    pub client_id: String,
    shared_group: Option<String>,
    retention: RetentionPolicy,
}

/// How often batched counters reach the store.
const COUNT_FLUSH: Duration = Duration::from_secs(1);

/// How often commands still unanswered are sent again to online devices. A birth sends them
/// too, but a command can be lost without a reconnect (the device could not store its result,
/// a broker dropped it): this bounds how long it waits.
const COMMAND_RESEND: Duration = Duration::from_secs(30);

fn command_resend() -> Duration {
    std::env::var("OUTPOST_CLOUD_COMMAND_RESEND_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(COMMAND_RESEND, Duration::from_millis)
}

/// Which pending commands to send again: those issued at least `every` ago (a newer one was
/// just sent and may be in flight). The agent applies a command once per id, so a repeat is safe.
fn due_for_resend(pending: &[(String, CommandRecord)], now_ms: u64, every: Duration) -> Vec<(String, CommandKind)> {
    let cutoff = now_ms.saturating_sub(u64::try_from(every.as_millis()).unwrap_or(u64::MAX));
    pending
        .iter()
        .filter(|(_, c)| c.created_ms <= cutoff)
        .map(|(id, c)| (id.clone(), c.kind.clone()))
        .collect()
}

/// Sends unanswered commands again to online devices every `every`, until the service is gone.
async fn resend_pending(service: std::sync::Weak<Service>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(s) = service.upgrade() else { return };
        let store = s.store.clone();
        let Ok(devices) = blocking(move || store.devices()).await else {
            continue;
        };
        for (id, _) in devices.into_iter().filter(|(_, d)| d.online()) {
            let store = s.store.clone();
            let dev = id.clone();
            let Ok(pending) = blocking(move || store.pending(&dev)).await else {
                continue;
            };
            let due = due_for_resend(&pending, now_ms(), every);
            if !due.is_empty() {
                info!(device = %id, commands = due.len(), "sending unanswered commands again");
            }
            for (cid, kind) in due {
                s.publish(&id, Channel::Command, &Body::Command(Command { id: cid, kind }), false)
                    .await;
            }
        }
    }
}

/// Writes the service's batched counters to the store once a second, until the service is gone.
async fn flush_counts(service: std::sync::Weak<Service>) {
    loop {
        tokio::time::sleep(COUNT_FLUSH).await;
        let Some(s) = service.upgrade() else { return };
        s.save_counts().await;
    }
}

impl Service {
    /// True while the service's MQTT connection is up.
    pub fn broker_connected(&self) -> bool {
        self.broker_up.load(Ordering::SeqCst)
    }
}

/// Runs blocking store work off the async workers (the service, the API and the console).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

/// Why an approval was not queued.
#[derive(Debug, thiserror::Error)]
pub enum ApproveError {
    /// The store failed, or the run or step is unknown.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The caller may not decide the step; says who may.
    #[error("{0}")]
    Refused(String),
}

/// The `approvers:` of approval step `step` in the definition `run` runs (from the device's
/// inventory); empty when the step lists none.
fn approvers_of(store: &Store, device: &str, run: &str, step: &str) -> Result<Vec<String>, StoreError> {
    let (mirror, _) = store
        .run(device, run)?
        .ok_or_else(|| StoreError::NotFound(format!("device '{device}' has no run '{run}'")))?;
    let text = store.definition(device, &mirror.workflow, mirror.version)?.ok_or_else(|| {
        StoreError::Invalid(format!(
            "the device has not sent definition {} v{} yet, so who may approve is not known: try again once it has synced",
            mirror.workflow, mirror.version
        ))
    })?;
    let doc = outpost_shared::definition::parse_document(&text)
        .map_err(|e| StoreError::Invalid(format!("definition {} v{}: {e}", mirror.workflow, mirror.version)))?;
    let s = doc
        .steps
        .iter()
        .find(|s| s.id == step)
        .ok_or_else(|| StoreError::NotFound(format!("workflow {} has no step '{step}'", mirror.workflow)))?;
    if s.action != "approval" {
        return Err(StoreError::Invalid(format!(
            "step '{step}' is a {} step, not an approval",
            s.action
        )));
    }
    Ok(s.args
        .get("approvers")
        .and_then(serde_json::Value::as_array)
        .map(|l| l.iter().filter_map(|a| a.as_str().map(str::to_string)).collect())
        .unwrap_or_default())
}

impl Service {
    /// Connects to the broker at `host:port` and starts ingesting. Returns at once; the
    /// connection is (re)made in the background.
    pub fn start(store: Store, link: Link) -> Arc<Service> {
        let mut opts = MqttOptions::new(link.client_id.clone(), link.host.clone(), link.port);
        if let Some(tls) = link.tls.clone() {
            opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                tls,
            )));
        }
        opts.set_keep_alive(Duration::from_secs(15));
        opts.set_clean_session(false);
        opts.set_manual_acks(true);
        opts.set_max_packet_size(protocol::MAX_INCOMING_PACKET_BYTES, protocol::MAX_PACKET_BYTES);
        opts.set_inflight(200);
        let (client, eventloop) = AsyncClient::new(opts, 256);
        let service = Arc::new(Service {
            store: Arc::new(store),
            client,
            topics: Topics::new(&link.prefix),
            seal: match &link.security {
                Security::Signed { fleet, .. } => protocol::Seal::Signed(fleet.clone()),
                Security::Unsigned => protocol::Seal::Unsigned,
            },
            security: link.security,
            stats: Stats::default(),
            changes: watch::channel(0).0,
            retry: std::sync::atomic::AtomicBool::new(false),
            unsaved_counts: std::sync::Mutex::new(Default::default()),
            gate: std::sync::OnceLock::new(),
            allow_unknown_devices: link.allow_unknown_devices,
            rollout_lock: tokio::sync::Mutex::new(()),
            broker_up: std::sync::atomic::AtomicBool::new(false),
            client_id: link.client_id.clone(),
            shared_group: link.shared_group.clone(),
            retention: link.retention,
        });
        tokio::spawn(flush_counts(Arc::downgrade(&service)));
        tokio::spawn(resend_pending(Arc::downgrade(&service), command_resend()));
        tokio::spawn(rollouts::tick(Arc::downgrade(&service)));
        tokio::spawn(retain(Arc::downgrade(&service), retention_every()));
        // Unbounded, so the poll task never waits on ingest while ingest waits on the poll task
        // to take its publishes (a birth answered with hundreds of pending commands deadlocked
        // here). The broker bounds it: every message in it is still unacked, and a broker
        // sends no more than its in-flight window of unacked messages to one client.
        // Replicas on one Postgres store: a change another replica ingested refreshes the
        // consoles served here too.
        let weak = Arc::downgrade(&service);
        service.store.on_change(Box::new(move || {
            if let Some(s) = weak.upgrade() {
                s.changes.send_modify(|n| *n = n.wrapping_add(1));
            }
        }));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(poll(eventloop, service.clone(), tx));
        tokio::spawn(ingest(service.clone(), rx));
        service
    }

    /// A receiver that sees a new value after every change to the store.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn notify(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        self.store.announce_change();
    }

    async fn publish(&self, device: &str, channel: Channel, body: &Body, retain: bool) {
        let topic = self.topics.topic(device, channel);
        // Checked before anything is stored (`fits`); this guard keeps an oversized QoS 1
        // publish from ever reaching the client, which would replay it on every reconnect.
        let bytes = match self.seal.encode(&topic, body) {
            Ok(b) => b,
            Err(e) => return warn!(device, error = %e, "message not sent"),
        };
        if let Err(e) = self.client.publish(topic, QoS::AtLeastOnce, retain, bytes).await {
            warn!(device, error = %e, "cannot publish");
        }
    }

    async fn reject(&self, device: &str, topic: &str, reason: &'static str, detail: String) {
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        let (device, topic, detail) = (
            protocol::quote(device),
            protocol::quote(topic),
            protocol::clip(&detail, 512),
        );
        warn!(device, topic, reason, %detail, "message rejected");
        *self
            .unsaved_counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(format!("rejected.{reason}"))
            .or_default() += 1;
    }

    /// Writes the batched counters now (every second, and at shutdown so a SIGTERM loses
    /// none); a failed write keeps them for the next try.
    pub async fn save_counts(&self) {
        let counts: Vec<(String, u64)> =
            std::mem::take(&mut *self.unsaved_counts.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        if counts.is_empty() {
            return;
        }
        let store = self.store.clone();
        let batch = counts.clone();
        if let Err(e) = blocking(move || store.add_counts(&batch)).await {
            warn!(error = %e, "cannot store counters; kept for the next try");
            let mut unsaved = self.unsaved_counts.lock().unwrap_or_else(|p| p.into_inner());
            for (k, v) in counts {
                *unsaved.entry(k).or_default() += v;
            }
        }
    }

    /// When a device's certificate expires (ms), if this fleet's PKI issued it.
    pub fn certificate_expiry(&self, device: &str) -> Option<u64> {
        match &self.security {
            Security::Signed { keyring, .. } => keyring.pki().device_expiry_ms(device),
            Security::Unsigned => None,
        }
    }

    /// Reports the embedded broker gate's refusals among the counters (since this start).
    pub fn attach_gate(&self, stats: Arc<crate::acl::GateStats>) {
        let _ = self.gate.set(stats);
    }

    /// Every counter: the stored ones plus those not yet flushed.
    pub async fn counters(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let store = self.store.clone();
        let mut all: std::collections::BTreeMap<String, u64> =
            blocking(move || store.counters()).await?.into_iter().collect();
        for (k, v) in self.unsaved_counts.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            *all.entry(k.clone()).or_default() += v;
        }
        if let Some(g) = self.gate.get() {
            let o = Ordering::Relaxed;
            all.insert("broker.refused_handshakes".into(), g.handshakes.load(o));
            all.insert("broker.denied_connections".into(), g.denied.load(o));
            all.insert("broker.accepted_connections".into(), g.accepted.load(o));
        }
        Ok(all.into_iter().collect())
    }

    /// Handles one message from a device; false when the store failed and the message must stay
    /// unacked (the broker delivers it again after the next reconnect).
    pub async fn handle(&self, topic: &str, payload: &[u8]) -> bool {
        self.retry.store(false, Ordering::SeqCst);
        self.handle_message(topic, payload).await;
        !self.retry.swap(false, Ordering::SeqCst)
    }

    /// A store error while handling a message: a storage failure closes the store for a reopen
    /// and keeps the message unacked; other errors are the message's own.
    fn store_failed(&self, device: &str, what: &str, e: &StoreError) {
        warn!(device, error = %e, "cannot store {what}");
        if matches!(
            e,
            StoreError::Storage(_) | StoreError::Task(_) | StoreError::Unavailable(_) | StoreError::Conflict(_)
        ) {
            self.store.storage_failed();
            self.retry.store(true, Ordering::SeqCst);
        }
    }

    /// Stores a device's report (older agents' `Reported` arrives converted, without points).
    async fn on_reported(&self, device: &str, r: protocol::StateReport, now: u64) {
        let row = ReportedRow {
            desired_version: r.desired_version,
            document: r.document,
            in_sync: r.in_sync,
            message: r.message,
            updated_ms: now,
            points: r.points,
            verified_ms: if r.verified_ms == 0 { now } else { r.verified_ms },
            drift_since_ms: r.drift_since_ms,
        };
        let (store, d) = (self.store.clone(), device.to_string());
        match blocking(move || store.set_reported(&d, &row)).await {
            Ok(true) => {}
            Ok(false) => info!(device = %device, "report for an older desired version ignored"),
            Err(e) => self.store_failed(device, "reported state", &e),
        }
    }

    async fn handle_message(&self, topic: &str, payload: &[u8]) {
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        let Some((device, channel)) = self.topics.parse(topic) else {
            return self
                .reject("?", topic, "topic", "not a device topic of this prefix".into())
                .await;
        };
        let device = device.to_string();
        if !channel.is_up() {
            return; // our own messages (acks, commands, desired) echoed by the broker
        }
        let body = match self.open(&device, topic, payload) {
            Ok(b) => b,
            Err((reason, why)) => return self.reject(&device, topic, reason, why).await,
        };
        let now = now_ms();
        let store = self.store.clone();
        match (channel, body) {
            (Channel::Birth, Body::Birth(b)) => {
                let d = device.clone();
                let res = blocking(move || store.birth(&d, &b, now)).await;
                match res {
                    Ok(o) if o.verdict.fresh => {
                        let dev = &o.device;
                        if let Some((from, reason)) = o.verdict.archive_from {
                            self.stats.archived_events.fetch_add(o.archived, Ordering::Relaxed);
                            warn!(device = %device, from_seq = from, events = o.archived, reason, "stored events set aside");
                        }
                        if let Some((from, to)) = o.verdict.lost {
                            self.stats.lost_events.fetch_add(to - from, Ordering::Relaxed);
                            warn!(device = %device, from_seq = from, to_seq = to, "events lost: the device's journal deleted them before this store got them (was the store restored?)");
                        }
                        info!(device = %device, epoch = dev.epoch, next_seq = dev.next_seq, last_seq = dev.reported_last_seq, "device online");
                        // Tell it where we are and to send from there (what it sent before we were
                        // listening is lost), then send what waits for it.
                        self.publish(&device, Channel::Ack, &Body::Ack(Ack { next_seq: dev.next_seq }), false)
                            .await;
                        let resend = Body::Resend(Resend { from_seq: dev.next_seq });
                        self.publish(&device, Channel::Ack, &resend, false).await;
                        self.deliver_pending(&device).await;
                    }
                    Ok(_) => info!(device = %device, "stale birth ignored"),
                    Err(StoreError::DeviceLimit(why)) => self.reject(&device, topic, "device_limit", why).await,
                    Err(e) => self.store_failed(&device, "birth", &e),
                }
            }
            (Channel::Death, Body::Death(dm)) => {
                let d = device.clone();
                match blocking(move || store.death(&d, dm.epoch, now)).await {
                    Ok(true) => info!(device = %device, epoch = dm.epoch, "device offline"),
                    Ok(false) => info!(device = %device, epoch = dm.epoch, "stale will from an older epoch ignored"),
                    Err(e) => self.store_failed(&device, "death", &e),
                }
            }
            (Channel::Events, Body::Events(batch)) => {
                let events = match protocol::unpack(&batch) {
                    Ok(e) => e,
                    Err(e) => return self.reject(&device, topic, "malformed", e.to_string()).await,
                };
                let d = device.clone();
                match blocking(move || store.store_events(&d, &events, now)).await {
                    Ok(s) => {
                        for (seq, why) in &s.quarantined {
                            let what = format!("event {seq} quarantined: {why}");
                            self.reject(&device, topic, "undecodable_event", what).await;
                        }
                        self.stats.events.fetch_add(s.new, Ordering::Relaxed);
                        self.stats.duplicate_events.fetch_add(s.duplicates, Ordering::Relaxed);
                        if let Some(from) = s.diverged_from {
                            warn!(device = %device, from_seq = from, "a resent event differs from the stored one: the device's journal was restored; stored events from here set aside");
                        }
                        self.publish(&device, Channel::Ack, &Body::Ack(Ack { next_seq: s.next_seq }), false)
                            .await;
                        if let Some(from) = s.gap_from {
                            self.stats.resends.fetch_add(1, Ordering::Relaxed);
                            info!(device = %device, from, got = batch.first_seq, "gap in events; asking to resend");
                            self.publish(&device, Channel::Ack, &Body::Resend(Resend { from_seq: from }), false)
                                .await;
                        }
                    }
                    Err(StoreError::Invalid(why)) => self.reject(&device, topic, "malformed_event", why).await,
                    Err(StoreError::DeviceLimit(why)) => self.reject(&device, topic, "device_limit", why).await,
                    Err(e) => self.store_failed(&device, "events (the device will resend)", &e),
                }
            }
            (Channel::CommandResult, Body::CommandResult(r)) => {
                let (d, id) = (device.clone(), r.id.clone());
                match blocking(move || store.answer(&d, &r, now)).await {
                    Ok(true) => info!(device = %device, command = %id, "command answered"),
                    Ok(false) => {
                        self.reject(
                            &device,
                            topic,
                            "unknown_command",
                            format!("no command '{id}' for this device"),
                        )
                        .await
                    }
                    Err(e) => self.store_failed(&device, "a command result", &e),
                }
            }
            (Channel::Reported, Body::Reported(r)) => self.on_reported(&device, r.into(), now).await,
            (Channel::Reported, Body::StateReport(r)) => self.on_reported(&device, r, now).await,
            (Channel::Inventory, Body::Inventory(inv)) => {
                let d = device.clone();
                let n = inv.definitions.len();
                match blocking(move || store.put_inventory(&d, &inv)).await {
                    Ok(()) => info!(device = %device, definitions = n, "inventory stored"),
                    Err(e) => self.store_failed(&device, "an inventory", &e),
                }
            }
            (ch, other) => {
                let what = format!("{} message on the {} channel", other.kind(), ch.name());
                self.reject(&device, topic, "wrong_channel", what).await
            }
        }
    }

    /// Checks and decodes a device's message: its signature must be one of the device's
    /// enrolled keys over this topic (nothing of an unauthenticated message is decoded).
    fn open(&self, device: &str, topic: &str, payload: &[u8]) -> Result<Body, (&'static str, String)> {
        let reason = |e: &ProtocolError| match e {
            ProtocolError::UnknownVersion(_) => "unknown_version",
            ProtocolError::TooLarge(_) => "too_large",
            ProtocolError::Unsigned => "unsigned",
            ProtocolError::SignedWhileInsecure => "signed_while_insecure",
            ProtocolError::BadSignature { .. } => "bad_signature",
            _ => "malformed",
        };
        let keys = match &self.security {
            Security::Unsigned => {
                return protocol::open(payload, topic, protocol::Trust::Unsigned)
                    .map_err(|e| (reason(&e), e.to_string()));
            }
            Security::Signed { keyring, .. } => match keyring.trust(device) {
                crate::pki::DeviceTrust::Keys(k) => k,
                crate::pki::DeviceTrust::Unknown => {
                    return Err((
                        "unknown_device",
                        "no enrolled key for this device id (not signed by `outpost-cloud pki sign`)".into(),
                    ));
                }
                crate::pki::DeviceTrust::Revoked => {
                    return Err((
                        "revoked",
                        "this device is revoked (`outpost-cloud devices revoke`)".into(),
                    ));
                }
            },
        };
        let mut last = None;
        // Newest key first: after a rotation the old one only covers what was in flight.
        for key in keys.iter().rev() {
            match protocol::open(payload, topic, protocol::Trust::Key { key, signer: device }) {
                Ok(b) => return Ok(b),
                Err(e @ ProtocolError::BadSignature { .. }) => last = Some(e),
                Err(e) => return Err((reason(&e), e.to_string())),
            }
        }
        let e = last.unwrap_or(ProtocolError::Empty);
        Err((reason(&e), e.to_string()))
    }

    /// Sends every unanswered command of an online device, oldest first.
    pub async fn deliver_pending(&self, device: &str) {
        let store = self.store.clone();
        let d = device.to_string();
        let pending = blocking(move || store.pending(&d)).await.unwrap_or_default();
        for (id, c) in pending {
            let body = Body::Command(Command { id, kind: c.kind });
            self.publish(device, Channel::Command, &body, false).await;
        }
    }

    /// Stores a command for a device and sends it if the device is online.
    pub async fn command(&self, device: &str, id: Option<String>, kind: CommandKind) -> Result<String, StoreError> {
        if !protocol::valid_device_id(device) {
            return Err(StoreError::Invalid(format!("'{device}' is not a valid device id")));
        }
        if !self.allow_unknown_devices && self.certificate_expiry(device).is_none() {
            let (store, d) = (self.store.clone(), device.to_string());
            if blocking(move || store.device(&d)).await?.is_none() {
                return Err(StoreError::NotFound(format!(
                    "device '{device}' is not known: it never connected and no certificate was signed for it \
                     (start outpost-cloud with --allow-unknown-devices to queue commands for devices not yet enrolled)"
                )));
            }
        }
        let id = id.unwrap_or_else(|| format!("c{:x}{:04x}", now_ms(), fastrand::u16(..)));
        fits(&Body::Command(Command {
            id: id.clone(),
            kind: kind.clone(),
        }))?;
        let store = self.store.clone();
        let (d, i, k) = (device.to_string(), id.clone(), kind.clone());
        blocking(move || store.add_command(&d, &i, k, now_ms())).await?;
        self.notify();
        if self.online(device).await {
            self.publish(
                device,
                Channel::Command,
                &Body::Command(Command { id: id.clone(), kind }),
                false,
            )
            .await;
        }
        Ok(id)
    }

    /// Queues `who`'s decision on approval step `step` of `run`, after checking the step's
    /// `approvers:` list (names and `role:NAME`); the decision names `who`, so the run's history
    /// on the gateway says who decided. `Err(Refused)` when `who` may not decide it.
    pub async fn approve(
        &self,
        device: &str,
        run: &str,
        step: &str,
        approved: bool,
        comment: String,
        who: &crate::operators::Principal,
    ) -> Result<String, ApproveError> {
        let store = self.store.clone();
        let (d, r, st) = (device.to_string(), run.to_string(), step.to_string());
        let approvers = blocking(move || approvers_of(&store, &d, &r, &st)).await?;
        crate::operators::may_approve(who, &approvers).map_err(ApproveError::Refused)?;
        let kind = CommandKind::Approve {
            run_id: run.to_string(),
            step: step.to_string(),
            approved,
            by: who.name.clone(),
            comment,
        };
        Ok(self.command(device, None, kind).await?)
    }

    async fn online(&self, device: &str) -> bool {
        let store = self.store.clone();
        let d = device.to_string();
        matches!(blocking(move || store.device(&d)).await, Ok(Some(dev)) if dev.online())
    }

    /// Deploys a definition to devices (by id and/or by labels), at once or wave by wave when
    /// `plan` is given; older unanswered deployments of the same workflow to those devices are
    /// superseded, and rollouts of the workflow still going are ended.
    pub async fn deploy(
        &self,
        document: String,
        devices: Vec<String>,
        labels: Vec<(String, String)>,
        plan: Option<crate::rollout::PlanRequest>,
    ) -> Result<(String, Deployment), StoreError> {
        let doc = outpost_shared::definition::parse_document(&document)
            .map_err(|e| StoreError::Invalid(format!("definition: {e}")))?;
        fits(&Body::Command(Command {
            id: format!("d{:x}{:04x}.{}", u64::MAX, 0, "x".repeat(64)),
            kind: CommandKind::Deploy {
                deployment: format!("d{:x}{:04x}", u64::MAX, 0),
                document: document.clone(),
            },
        }))?;
        let store = self.store.clone();
        let all = blocking(move || store.devices()).await?;
        let mut targets: Vec<String> = devices;
        for (id, d) in &all {
            if !labels.is_empty() && labels.iter().all(|l| d.labels.contains(l)) && !targets.contains(id) {
                targets.push(id.clone());
            }
        }
        if targets.is_empty() {
            return Err(StoreError::Invalid(
                "no device matches the deployment's devices and labels".into(),
            ));
        }
        let id = format!("d{:x}{:04x}", now_ms(), fastrand::u16(..));
        let staged = match plan {
            None => None,
            Some(p) => {
                let labelled: Vec<(String, Vec<(String, String)>)> = targets
                    .iter()
                    .map(|t| {
                        let labels = all.iter().find(|(d, _)| d == t).map(|(_, d)| d.labels.clone());
                        (t.clone(), labels.unwrap_or_default())
                    })
                    .collect();
                Some(p.resolve(&doc.name, &labelled).map_err(StoreError::Invalid)?)
            }
        };
        let dep = Deployment {
            workflow: doc.name.clone(),
            version: doc.version,
            devices: targets.clone(),
            created_ms: now_ms(),
        };
        let _rollouts = self.rollout_lock.lock().await;
        let (store, i, d) = (self.store.clone(), id.clone(), dep.clone());
        blocking(move || store.put_deployment(&i, &d)).await?;
        self.end_rollouts_of(&doc.name, &id).await?;
        match staged {
            None => {
                for device in targets {
                    self.send_deploy(&id, &doc.name, &document, &device).await?;
                }
            }
            Some((plan, waves)) => {
                let (store, wf, version) = (self.store.clone(), doc.name.clone(), doc.version);
                let previous = blocking(move || rollouts::previous_version(&store, &wf, version)).await?;
                let r = crate::rollout::Rollout::new(
                    doc.name.clone(),
                    doc.version,
                    document.clone(),
                    plan,
                    waves,
                    previous,
                    now_ms(),
                );
                // The canaries are sent now, so the answer already shows them.
                self.advance(&id, r).await?;
            }
        }
        info!(deployment = %id, workflow = %dep.workflow, version = dep.version, devices = dep.devices.len(), "deployment created");
        Ok((id, dep))
    }

    /// Queues deployment `id`'s command for one device, superseding older unanswered
    /// deployments of the workflow there. Idempotent: the command's id is the deployment's and
    /// the device's.
    async fn send_deploy(&self, id: &str, workflow: &str, document: &str, device: &str) -> Result<(), StoreError> {
        let store = self.store.clone();
        let (dv, wf, by) = (device.to_string(), workflow.to_string(), id.to_string());
        blocking(move || {
            for (cid, c) in store.pending(&dv)? {
                if let CommandKind::Deploy { deployment, document } = &c.kind
                    && deployment != &by
                    && outpost_shared::definition::parse_document(document).is_ok_and(|d| d.name == wf)
                {
                    store.supersede(&dv, &cid, &by, now_ms())?;
                }
            }
            Ok(())
        })
        .await?;
        let kind = CommandKind::Deploy {
            deployment: id.to_string(),
            document: document.to_string(),
        };
        self.command(device, Some(format!("{id}.{device}")), kind).await?;
        Ok(())
    }

    /// Per-device state of a deployment.
    pub async fn deployment_status(&self, id: &str) -> Result<Value, StoreError> {
        let store = self.store.clone();
        let i = id.to_string();
        blocking(move || {
            let dep = store
                .deployment(&i)?
                .ok_or_else(|| StoreError::NotFound(format!("deployment '{i}' does not exist")))?;
            deployment_json(&store, &i, &dep, Detail::Full)
        })
        .await
    }

    /// The newest `limit` deployments, newest first, each with its devices' states.
    pub async fn deployments_status(&self, limit: usize) -> Result<Value, StoreError> {
        let store = self.store.clone();
        blocking(move || {
            let mut out = Vec::new();
            for (id, dep) in store.deployments()?.into_iter().take(limit) {
                out.push(deployment_json(&store, &id, &dep, Detail::List)?);
            }
            Ok(Value::Array(out))
        })
        .await
    }

    /// Forgets an offline device (`Store::remove_device`) and clears its retained desired
    /// document on the broker, so a device enrolled again under that id starts afresh.
    /// Returns how many events were removed, or `None` while the device is online: it would
    /// reappear at once with a history the store no longer has.
    pub async fn remove_device(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let store = self.store.clone();
        let d = id.to_string();
        let removed = blocking(move || match store.device(&d)? {
            Some(dev) if dev.online() => Ok(None),
            Some(_) => store.remove_device(&d).map(Some),
            None => Err(StoreError::NotFound(format!("device '{d}' is not known"))),
        })
        .await?;
        if removed.is_some() {
            let topic = self.topics.topic(id, Channel::Desired);
            if let Err(e) = self.client.publish(topic, QoS::AtLeastOnce, true, Vec::new()).await {
                warn!(device = id, error = %e, "cannot clear the retained desired document");
            }
            info!(device = id, "device removed");
            self.notify();
        }
        Ok(removed)
    }

    /// Sets a device's desired document and publishes it (retained, so a device that connects
    /// later receives it).
    pub async fn set_desired(&self, device: &str, document: Value) -> Result<u64, StoreError> {
        if !protocol::valid_device_id(device) {
            return Err(StoreError::Invalid(format!("'{device}' is not a valid device id")));
        }
        let text = document.to_string();
        // The version is not known yet; the largest one costs 10 bytes.
        fits(&Body::Desired(Desired {
            version: u64::MAX,
            document: text.clone(),
        }))?;
        let store = self.store.clone();
        let d = device.to_string();
        let row = blocking(move || store.set_desired(&d, text, now_ms())).await?;
        self.notify();
        let body = Body::Desired(Desired {
            version: row.version,
            document: row.document,
        });
        self.publish(device, Channel::Desired, &body, true).await;
        Ok(row.version)
    }
}

/// A deployment as the API and the console show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeploymentView {
    /// Its id.
    pub id: String,
    /// The workflow.
    pub workflow: String,
    /// The version deployed.
    pub version: u32,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// When it was made (ms).
    #[serde(skip)]
    pub created_ms: u64,
    /// Each targeted device's state.
    pub devices: Vec<DeploymentDevice>,
    /// How many devices are in each state.
    pub counts: std::collections::BTreeMap<String, u64>,
    /// Per version of the workflow, how many runs are still active on the deployment's devices
    /// (runs keep the version they started on); not in lists.
    pub active_runs: std::collections::BTreeMap<u32, u64>,
    /// How it is rolled out, when wave by wave.
    pub rollout: Option<RolloutView>,
}

/// One device of a deployment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeploymentDevice {
    /// The device.
    pub device: String,
    /// `pending`, `applied`, `rejected`, `superseded`, `withdrawn`, `waiting` for its wave, or
    /// `not_sent` (its wave never started).
    pub state: String,
    /// Why, unless applied.
    pub reason: Option<String>,
    /// Its wave, in a rollout.
    pub wave: Option<String>,
}

/// A rollout as shown.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RolloutView {
    /// `running`, `paused`, `halted`, `rolled_back`, `aborted` or `completed`.
    pub state: &'static str,
    /// Why, in words.
    pub reason: String,
    /// The plan in words.
    pub plan: String,
    /// Waves sent so far.
    pub waves_sent: u32,
    /// The waves.
    pub waves: Vec<WaveView>,
    /// What the gate saw last.
    pub evidence: crate::rollout::Evidence,
    /// The version a rollback goes back to, if any.
    pub previous_version: Option<u32>,
    /// The deployment that rolled it back.
    pub rollback_deployment: Option<String>,
    /// What happened, oldest first.
    pub log: Vec<LogLine>,
}

/// One wave as shown.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WaveView {
    /// Its name.
    pub name: String,
    /// Its devices.
    pub devices: Vec<String>,
    /// Sent yet.
    pub sent: bool,
}

/// A line of a rollout's history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogLine {
    /// When (RFC 3339).
    pub at: String,
    /// What.
    pub text: String,
}

/// How much of a deployment to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Everything, with the active runs per version (reads every device's runs).
    Full,
    /// For a list: no active runs.
    List,
}

/// A deployment as shown: each device's state (from its command, or its wave not sent yet),
/// active runs per version, and the rollout's state and evidence.
pub fn deployment_view(
    store: &Store,
    id: &str,
    dep: &Deployment,
    detail: Detail,
) -> Result<DeploymentView, StoreError> {
    let rollout = store.rollout(id)?;
    let mut devices = Vec::new();
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    let mut active_runs = std::collections::BTreeMap::<u32, u64>::new();
    for d in &dep.devices {
        let c = store.command(d, &format!("{id}.{d}"))?;
        let wave = rollout.as_ref().and_then(|r| r.wave_of(d).map(|w| (w, r)));
        let (state, reason) = match (&c, wave) {
            (Some(c), _) => (c.state.clone(), (c.state != "applied").then(|| c.message.clone())),
            (None, Some((w, r))) if w >= r.sent as usize => {
                if r.phase.is_final() {
                    (
                        "not_sent".to_string(),
                        Some(format!("the rollout is {}", r.phase.as_str().replace('_', " "))),
                    )
                } else {
                    ("waiting".to_string(), Some("its wave has not started".to_string()))
                }
            }
            (None, _) => ("unknown".to_string(), None),
        };
        *counts.entry(state.clone()).or_default() += 1;
        if detail == Detail::Full {
            for (_, m) in store.runs(d)? {
                if m.workflow == dep.workflow && !m.status.is_terminal() {
                    *active_runs.entry(m.version).or_default() += 1;
                }
            }
        }
        devices.push(DeploymentDevice {
            device: d.clone(),
            state,
            reason,
            wave: wave.and_then(|(w, r)| r.waves.get(w).map(|w| w.name.clone())),
        });
    }
    let rollout = rollout.map(|r| RolloutView {
        state: r.phase.as_str(),
        reason: r.reason.clone(),
        plan: r.plan.summary.clone(),
        waves_sent: r.sent,
        waves: r
            .waves
            .iter()
            .enumerate()
            .map(|(i, w)| WaveView {
                name: w.name.clone(),
                devices: w.devices.clone(),
                sent: i < r.sent as usize,
            })
            .collect(),
        evidence: r.evidence.clone(),
        previous_version: r.previous.as_ref().map(|p| p.version),
        rollback_deployment: r.rollback_deployment.clone(),
        log: r
            .log
            .iter()
            .map(|l| LogLine {
                at: outpost_shared::journal::rfc3339(l.at_ms),
                text: l.text.clone(),
            })
            .collect(),
    });
    Ok(DeploymentView {
        id: id.to_string(),
        workflow: dep.workflow.clone(),
        version: dep.version,
        created_at: outpost_shared::journal::rfc3339(dep.created_ms),
        created_ms: dep.created_ms,
        devices,
        counts,
        active_runs,
        rollout,
    })
}

fn deployment_json(store: &Store, id: &str, dep: &Deployment, detail: Detail) -> Result<Value, StoreError> {
    serde_json::to_value(deployment_view(store, id, dep, detail)?).map_err(|e| StoreError::Invalid(e.to_string()))
}

/// Refuses, before it is stored, a message that could never be sent to its device.
fn fits(body: &Body) -> Result<(), StoreError> {
    let len = protocol::encode(body).len() + outpost_shared::signing::SIGNATURE_BYTES;
    if len > protocol::MAX_MESSAGE_BYTES {
        return Err(StoreError::Invalid(
            ProtocolError::WontFit { kind: body.kind(), len }.to_string(),
        ));
    }
    Ok(())
}

async fn poll(mut eventloop: rumqttc::EventLoop, service: Arc<Service>, tx: mpsc::UnboundedSender<rumqttc::Publish>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match eventloop.poll().await {
            Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(250);
                service.broker_up.store(true, Ordering::SeqCst);
                info!(session_present = ack.session_present, "connected to the broker");
                for ch in [
                    Channel::Birth,
                    Channel::Death,
                    Channel::Events,
                    Channel::CommandResult,
                    Channel::Reported,
                    Channel::Inventory,
                ] {
                    let filter = match &service.shared_group {
                        Some(group) => format!("$share/{group}/{}", service.topics.all_devices(ch)),
                        None => service.topics.all_devices(ch),
                    };
                    if let Err(e) = service.client.try_subscribe(filter, QoS::AtLeastOnce) {
                        warn!(error = %e, "cannot subscribe");
                    }
                }
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                if tx.send(p).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                service.broker_up.store(false, Ordering::SeqCst);
                let wait = backoff.mul_f64(0.5 + fastrand::f64());
                warn!(error = %e, retry_in = ?wait, "broker connection lost");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Stores each message, then acknowledges it (after a crash it is redelivered). After a storage
/// failure the message stays unacked: ingest waits until the store reopens, then reconnects so
/// that the broker delivers every unacked message again (MQTT redelivers only on a new
/// connection of the persistent session).
async fn ingest(service: Arc<Service>, mut rx: mpsc::UnboundedReceiver<rumqttc::Publish>) {
    while let Some(p) = rx.recv().await {
        if !service.handle(&p.topic, &p.payload).await {
            let mut wait = Duration::from_millis(500);
            loop {
                tokio::time::sleep(wait).await;
                let store = service.store.clone();
                if blocking(move || Ok(store.recover())).await.unwrap_or(false) {
                    break;
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
            info!("store usable again; reconnecting for the broker to deliver what was not acked");
            // What is still queued came on the old connection; the broker sends it again.
            while rx.try_recv().is_ok() {}
            if let Err(e) = service.client.disconnect().await {
                warn!(error = %e, "cannot reconnect to the broker");
            }
            continue;
        }
        service.notify();
        if let Err(e) = service.client.ack(&p).await {
            warn!(error = %e, "cannot ack to the broker");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(created_ms: u64) -> CommandRecord {
        CommandRecord {
            order: 1,
            kind: CommandKind::Cancel {
                run_id: "r".into(),
                reason: "x".into(),
            },
            created_ms,
            state: "pending".into(),
            message: String::new(),
            detail: String::new(),
            answered_ms: None,
        }
    }

    #[test]
    fn only_commands_older_than_the_interval_are_sent_again() {
        let pending = vec![("old".to_string(), cmd(1_000)), ("new".to_string(), cmd(40_000))];
        let due = due_for_resend(&pending, 45_000, Duration::from_secs(30));
        assert_eq!(due.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), vec!["old"]);
        assert!(due_for_resend(&pending, 0, Duration::from_secs(30)).is_empty());
    }
}
