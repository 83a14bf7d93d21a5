//! Offline-first sync with cloud-sync over MQTT (protocol: `docs/protocol.md`).
//!
//! The journal is the outbox: events go up in order of their device-wide sequence, in batches,
//! and the durable cursor `sync/acked` moves only when cloud-sync acknowledges that it stored
//! them; retention never deletes an event past that cursor. rumqttc's own queue is not trusted
//! for delivery (it drops unacked publishes on a fresh session): after every (re)connect the
//! agent sends again from the acknowledged cursor, and the cloud deduplicates by sequence.
//!
//! Tasks: the MQTT event loop (only polls and routes; rumqttc must be polled continuously), the
//! drain (reads the journal, publishes batches under a rate limit and an in-flight window), and
//! the command handler (applies each command once, persists its result, reports it).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outpost_shared::protocol::{
    self, Ack, Birth, Body, Channel, Command, CommandKind, CommandResult, Death, DefinitionInfo, Desired, Inventory,
    Outcome, Resend, StateReport, Topics,
};
use rumqttc::{AsyncClient, Event as MqttEvent, LastWill, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::outbox::{Next, Outbox};
use crate::runtime::{Decision, Runtime, RuntimeError, StartRequest};

/// Sync settings.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// This device's id (also the MQTT client id, so the broker keeps its session).
    pub device: String,
    /// Topic prefix.
    pub prefix: String,
    /// Labels sent in the birth message (deployments target them).
    pub labels: Vec<(String, String)>,
    /// Most events sent but not yet acknowledged; past it, new runs are refused.
    pub outbox_max_events: u64,
    /// Drain rate limit, events per second.
    pub drain_rate: u64,
    /// Events per batch message.
    pub batch: usize,
    /// Events in flight (sent, not acknowledged) at most.
    pub window: u64,
    /// How desired state is applied and verified (`--remediation`, `--verify-every`, `--on-drift`).
    pub desired: crate::desired::DesiredConfig,
    /// Equipment devices as (name, kind), reported in the inventory.
    pub equipment: Vec<(String, String)>,
    /// TLS, this gateway's signing key and the fleet's key.
    pub security: Arc<crate::identity::Security>,
    /// What deployed definitions may do (`--policy`).
    pub policy: Arc<crate::policy::Policy>,
}

impl SyncConfig {
    /// Defaults for a broker at `host:port`.
    pub fn new(host: String, port: u16, device: String) -> SyncConfig {
        SyncConfig {
            host,
            port,
            device,
            prefix: protocol::DEFAULT_PREFIX.to_string(),
            labels: Vec::new(),
            outbox_max_events: 2_000_000,
            drain_rate: 100_000,
            batch: 500,
            window: 4_000,
            desired: crate::desired::DesiredConfig::default(),
            equipment: Vec::new(),
            security: Arc::new(crate::identity::Security::unsigned_plaintext()),
            policy: Arc::new(crate::policy::Policy::default()),
        }
    }
}

pub use crate::sync_state::SyncState;

const ACKED: &str = "sync/acked";
const JOURNAL_ID: &str = "sync/journal_id";
const DESIRED: &str = "sync/desired";
const REPORTED: &str = "sync/reported";

fn stored_desired(rt: &Runtime) -> Option<Desired> {
    match protocol::decode(&rt.journal().kv(DESIRED).ok()??) {
        Ok(Body::Desired(d)) => Some(d),
        _ => None,
    }
}

fn stored_reported(rt: &Runtime) -> Option<StateReport> {
    match protocol::decode(&rt.journal().kv(REPORTED).ok()??) {
        Ok(Body::StateReport(r)) => Some(r),
        // Stored by an agent from before per-point verdicts.
        Ok(Body::Reported(r)) => Some(r.into()),
        _ => None,
    }
}

/// Brings the device to each new desired state (`desired::DesiredConfig::remediate`), then
/// keeps checking it is still there: on every reconnect and every `--verify-every`, a drift is
/// reported as soon as it is seen. Sleeps without a timer when the document sets no points.
async fn reconcile(
    rt: Runtime,
    config: SyncConfig,
    state: Arc<SyncState>,
    client: AsyncClient,
    mut desired: watch::Receiver<Option<Desired>>,
    mut session: watch::Receiver<u64>,
) {
    let topic = Topics::new(&config.prefix).topic(&config.device, Channel::Reported);
    let cfg = &config.desired;
    let mut reverify = false;
    loop {
        let want = desired.borrow_and_update().clone();
        let mut has_points = false;
        if let Some(d) = want {
            has_points = cfg.plan(&d).is_some_and(|p| !p.targets.is_empty());
            let prev = stored_reported(&rt).filter(|r| r.desired_version >= d.version);
            let mut next = match &prev {
                None => Some(cfg.remediate(&rt, &d, &format!("remediate-{}", d.version)).await),
                Some(prev) if reverify => cfg.reverify(&d, prev, rt.clock_ms()).await,
                Some(_) => None,
            };
            // Once per drift: the run id names the drift, so neither a restart nor the next
            // check runs it twice; a drift that outlives its run is reported as such.
            let current = next.as_ref().or(prev.as_ref());
            if let (crate::desired::OnDrift::Remediate, Some(since)) =
                (cfg.on_drift, current.and_then(|r| r.drift_since_ms))
            {
                let run = format!("remediate-{}-drift-{since}", d.version);
                if rt.journal().run(&run).ok().flatten().is_none() {
                    if let Some(r) = next.take() {
                        save_report(&rt, &config, &state, &client, &topic, r).await;
                    }
                    let mut fixed = cfg.remediate(&rt, &d, &run).await;
                    if !fixed.in_sync {
                        fixed.drift_since_ms = Some(since);
                        fixed.message = format!("drift persists after run {run}: {}", fixed.message);
                    }
                    next = Some(fixed);
                }
            }
            if let Some(report) = next {
                info!(version = d.version, in_sync = report.in_sync, message = %report.message, "desired state reconciled");
                save_report(&rt, &config, &state, &client, &topic, report).await;
            }
        }
        reverify = false;
        let every = cfg.verify_every.filter(|_| has_points);
        tokio::select! {
            r = desired.changed() => if r.is_err() { return },
            r = session.changed() => {
                if r.is_err() { return }
                reverify = true;
            }
            () = sleep_or_forever(every) => reverify = true,
        }
    }
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Keeps a report (so a restart neither remediates again nor forgets a drift) and publishes it, retained.
async fn save_report(
    rt: &Runtime,
    config: &SyncConfig,
    state: &SyncState,
    client: &AsyncClient,
    topic: &str,
    report: StateReport,
) {
    let body = Body::StateReport(report);
    if let Err(e) = rt.journal().put_kv(REPORTED, protocol::encode(&body)).await {
        warn!(error = %e, "cannot store reported state");
    }
    publish(client, config, state, topic, &body, true).await;
}
const EPOCH: &str = "sync/epoch";

/// Publishes a message unless it exceeds the protocol's limit: an oversized QoS 1 publish would
/// be refused by the broker and replayed by the client on every reconnect, wedging the link.
async fn publish(
    client: &AsyncClient,
    config: &SyncConfig,
    state: &SyncState,
    topic: &str,
    body: &Body,
    retain: bool,
) -> bool {
    let bytes = match config.security.seal().encode(topic, body) {
        Ok(b) => b,
        Err(e) => {
            state.oversized_messages.fetch_add(1, Ordering::Relaxed);
            warn!(topic, error = %e, "message not sent");
            return false;
        }
    };
    match client.publish(topic, QoS::AtLeastOnce, retain, bytes).await {
        Ok(()) => true,
        Err(e) => {
            warn!(topic, kind = body.kind(), error = %e, "cannot publish");
            false
        }
    }
}

/// How to answer a `Resend { from_seq }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResendPlan {
    /// Send again from this sequence (possibly before the acknowledged cursor).
    From(u64),
    /// Retention deleted events it asks for: publish a birth that says where this journal
    /// starts; the cloud records the rest as lost and asks again.
    Announce,
    /// It asks from past this journal's newest event: the cloud holds events this journal no
    /// longer has (it was restored from a backup). Nothing to send; the first new event under
    /// one of those sequences shows the cloud where the histories part.
    Ahead,
}

/// Decides how to answer a resend request, given the journal's floor and next sequence.
fn plan_resend(from_seq: u64, floor: u64, next_seq: u64) -> ResendPlan {
    if from_seq < floor {
        ResendPlan::Announce
    } else if from_seq > next_seq {
        ResendPlan::Ahead
    } else {
        ResendPlan::From(from_seq)
    }
}

/// Publishes a retained birth: what this journal is and holds. From the poll task, so it never
/// waits on the client.
fn announce(rt: &Runtime, config: &SyncConfig, state: &SyncState, topics: &Topics, client: &AsyncClient) {
    let journal = rt.journal();
    let birth = Body::Birth(Birth {
        epoch: state.epoch.load(Ordering::Relaxed),
        last_seq: journal.next_seq().unwrap_or(1).saturating_sub(1),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        labels: config.labels.clone(),
        journal_id: state.journal_id.load(Ordering::Relaxed),
        announcement: state.announcements.fetch_add(1, Ordering::Relaxed) + 1,
        resend_from: journal.resend_floor().unwrap_or(1),
        storage_error: rt.storage_failure().map(|(e, _, _)| e).unwrap_or_default(),
        blocked_runs: rt.blocked_runs(protocol::MAX_BLOCKED_RUNS_LISTED),
        insecure: config.security.warnings(),
        refused: state
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect(),
    });
    let topic = topics.topic(&config.device, Channel::Birth);
    match config.security.seal().encode(&topic, &birth) {
        Ok(bytes) => {
            if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, true, bytes) {
                warn!(error = %e, "cannot publish birth");
            }
        }
        Err(e) => {
            state.oversized_messages.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "birth not sent (too many labels?)");
        }
    }
}

/// The Last Will of the connection with this epoch, signed now: the broker publishes it for us.
fn will(topics: &Topics, config: &SyncConfig, epoch: u64) -> LastWill {
    let topic = topics.topic(&config.device, Channel::Death);
    let body = Body::Death(Death { epoch });
    let bytes = config
        .security
        .seal()
        .encode(&topic, &body)
        .unwrap_or_else(|_| protocol::encode(&body));
    LastWill::new(topic, bytes, QoS::AtLeastOnce, true)
}

/// Starts sync; returns its shared state. The agent runs the same whether or not the broker is
/// reachable: sync only reads the journal and moves its own cursor.
/// Its tasks are spawned into `tasks`, which the daemon stops on shutdown.
pub async fn start(
    rt: Runtime,
    config: SyncConfig,
    tasks: &mut crate::tasks::Tasks,
) -> Result<Arc<SyncState>, RuntimeError> {
    let journal = rt.journal();
    // Past every epoch this journal used, and past the wall clock: a journal restored from a
    // backup would otherwise reuse epochs the cloud has seen die, and show offline.
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let epoch = (journal.cursor(EPOCH)?.unwrap_or(0) + 1).max(wall_ms);
    journal.put_cursor(EPOCH, epoch).await?;
    let acked = journal.cursor(ACKED)?.unwrap_or(1).max(1);
    let journal_id = match journal
        .kv(JOURNAL_ID)?
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
    {
        Some(b) => u64::from_le_bytes(b),
        None => {
            // Never 0: the cloud reads 0 as "unknown" (a row from before journal ids).
            let id = fastrand::u64(1..);
            journal.put_kv(JOURNAL_ID, id.to_le_bytes().to_vec()).await?;
            id
        }
    };
    let state = Arc::new(SyncState::default());
    *state.broker.lock().unwrap_or_else(|p| p.into_inner()) = format!("{}:{}", config.host, config.port);
    state.journal_id.store(journal_id, Ordering::Relaxed);
    state.acked.store(acked, Ordering::Relaxed);
    state.sent.store(acked, Ordering::Relaxed);
    state.epoch.store(epoch, Ordering::Relaxed);
    state.max_events.store(config.outbox_max_events, Ordering::Relaxed);
    rt.attach_sync(state.clone());

    let topics = Topics::new(&config.prefix);
    let mut opts = MqttOptions::new(config.device.clone(), config.host.clone(), config.port);
    opts.set_keep_alive(Duration::from_secs(15));
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    opts.set_max_packet_size(protocol::MAX_INCOMING_PACKET_BYTES, protocol::MAX_PACKET_BYTES);
    opts.set_last_will(will(&topics, &config, epoch));
    if let Some(tls) = config.security.tls_config().map_err(RuntimeError::Invalid)? {
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            tls,
        )));
    }
    let (client, eventloop) = AsyncClient::new(opts, 64);
    let (session_tx, session_rx) = watch::channel(0u64);
    // Unbounded, so the poll task never waits on the command handler while the handler waits
    // on the poll task to take its publish (a deadlock). The broker bounds it: commands are
    // acked only after they are routed, and no broker has more than its in-flight window
    // of unacked messages out to one client.
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (desired_tx, desired_rx) = watch::channel(stored_desired(&rt));
    info!(device = %config.device, broker = %format!("{}:{}", config.host, config.port), epoch, acked, "sync starting");
    let routes = Routes {
        session: session_tx,
        commands: cmd_tx,
        desired: desired_tx,
    };
    tasks.spawn(
        "sync.poll",
        poll(
            eventloop,
            rt.clone(),
            config.clone(),
            state.clone(),
            routes,
            client.clone(),
        ),
    );
    tasks.spawn(
        "sync.reconcile",
        reconcile(
            rt.clone(),
            config.clone(),
            state.clone(),
            client.clone(),
            desired_rx,
            session_rx.clone(),
        ),
    );
    tasks.spawn(
        "sync.inventory",
        inventory(
            rt.clone(),
            config.clone(),
            state.clone(),
            client.clone(),
            session_rx.clone(),
        ),
    );
    tasks.spawn(
        "sync.drain",
        drain(rt.clone(), config.clone(), state.clone(), client.clone(), session_rx),
    );
    tasks.spawn(
        "sync.storage_announcements",
        storage_announcements(rt.clone(), config.clone(), state.clone(), client.clone()),
    );
    tasks.spawn("sync.reconnect", reconnect_on_request(state.clone(), client.clone()));
    tasks.spawn(
        "sync.refusals",
        refusal_announcements(rt.clone(), config.clone(), state.clone(), client.clone()),
    );
    tasks.spawn("sync.commands", commands(rt, config, state.clone(), client, cmd_rx));
    Ok(state)
}

/// Ends the connection when asked: the poll task then reloads the identity and reconnects
/// (the outbox is the journal, so whatever was in flight is sent again).
async fn reconnect_on_request(state: Arc<SyncState>, client: AsyncClient) {
    loop {
        state.reconnect.notified().await;
        info!("reconnecting to use the newly installed identity");
        if let Err(e) = client.disconnect().await {
            warn!(error = %e, "cannot end the connection; the new identity is used at the next reconnect");
        }
    }
}

/// Announces again whenever the journal starts or stops failing, so cloud-sync's view of the
/// gateway (and the console) says when its runs wait for storage.
async fn storage_announcements(rt: Runtime, config: SyncConfig, state: Arc<SyncState>, client: AsyncClient) {
    let topics = Topics::new(&config.prefix);
    let mut changes = rt.storage_changes();
    while changes.changed().await.is_ok() {
        if state.connected.load(Ordering::Relaxed) {
            announce(&rt, &config, &state, &topics, &client);
        }
    }
}

/// Announces again after messages were refused for their signature (at most every 2 s, so a
/// flood of forgeries costs one birth per 2 s), so the console shows them.
async fn refusal_announcements(rt: Runtime, config: SyncConfig, state: Arc<SyncState>, client: AsyncClient) {
    let topics = Topics::new(&config.prefix);
    loop {
        state.refused.notified().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        if state.connected.load(Ordering::Relaxed) {
            announce(&rt, &config, &state, &topics, &client);
        }
    }
}

/// Where the poll task hands what arrives.
struct Routes {
    /// Bumped on every new session and resend request: the drain starts again from the ack.
    session: watch::Sender<u64>,
    /// Commands to apply, in arrival order.
    commands: mpsc::UnboundedSender<Command>,
    /// The newest desired state.
    desired: watch::Sender<Option<Desired>>,
}

/// Polls the MQTT event loop and routes what arrives; never publishes with `.await` here.
async fn poll(
    mut eventloop: rumqttc::EventLoop,
    rt: Runtime,
    config: SyncConfig,
    state: Arc<SyncState>,
    routes: Routes,
    client: AsyncClient,
) {
    let Routes {
        session,
        commands: cmd_tx,
        desired: desired_tx,
    } = routes;
    let topics = Topics::new(&config.prefix);
    let mut backoff = Duration::from_millis(250);
    let mut clock_warned = false;
    loop {
        // The agent's clock, the one certificates are checked against (see `Security`).
        if config.security.uses_tls() && !outpost_shared::tls::clock_plausible(rt.clock_ms() / 1000) {
            // Every certificate looks not yet valid at 1970: wait for NTP (or GPS, or an
            // operator) instead of failing handshakes; runs go on offline meanwhile.
            if !clock_warned {
                let why = "the wall clock is before 2026-01-01: not connecting until it is set (certificates cannot be checked)";
                warn!("{why}");
                *state.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some((why.to_string(), rt.clock_ms()));
                clock_warned = true;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        }
        match eventloop.poll().await {
            Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(250);
                state.connected.store(true, Ordering::Relaxed);
                info!(session_present = ack.session_present, "sync connected");
                rt.trim_soon();
                // Subscriptions and unacked publishes may be gone: resubscribe, resend from the ack.
                for ch in [Channel::Ack, Channel::Command, Channel::Desired] {
                    if let Err(e) = client.try_subscribe(topics.topic(&config.device, ch), QoS::AtLeastOnce) {
                        warn!(error = %e, "cannot subscribe");
                    }
                }
                state.connects.fetch_add(1, Ordering::Relaxed);
                announce(&rt, &config, &state, &topics, &client);
                session.send_modify(|n| *n += 1);
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                let body = match &config.security.fleet {
                    Some(key) => protocol::open(
                        &p.payload,
                        &p.topic,
                        protocol::Trust::Key {
                            key,
                            signer: "the fleet key",
                        },
                    ),
                    None => protocol::open(&p.payload, &p.topic, protocol::Trust::Unsigned),
                };
                match (topics.parse(&p.topic), body) {
                    (Some((dev, _)), _) if dev != config.device => {
                        state.bad_messages.fetch_add(1, Ordering::Relaxed);
                        warn!(topic = %p.topic, "message for another device ignored");
                    }
                    (Some((_, Channel::Command)), Ok(Body::Command(c))) => {
                        // Acked below, in order (MQTT requires it). A crash before the result is
                        // stored leaves the command pending at cloud-sync, which sends it again
                        // after the next birth.
                        if cmd_tx.send(c).is_err() {
                            return;
                        }
                    }
                    (Some((_, Channel::Ack)), Ok(Body::Ack(Ack { next_seq }))) => {
                        let ours = rt.journal().next_seq().unwrap_or(1);
                        if next_seq > ours {
                            // Moving the cursor past our own journal would let retention delete
                            // runs the cloud never stored.
                            state.bad_acks.fetch_add(1, Ordering::Relaxed);
                            warn!(
                                next_seq,
                                journal_next = ours,
                                "acknowledgement beyond this journal refused"
                            );
                        } else {
                            acked(&rt, &state, next_seq).await;
                        }
                    }
                    (Some((_, Channel::Ack)), Ok(Body::Resend(Resend { from_seq }))) => {
                        let journal = rt.journal();
                        let floor = journal.resend_floor().unwrap_or(1);
                        let next = journal.next_seq().unwrap_or(1);
                        match plan_resend(from_seq, floor, next) {
                            ResendPlan::From(from) => {
                                info!(from_seq, "cloud asks to resend");
                                state.rewind.store(from, Ordering::Relaxed);
                                session.send_modify(|n| *n += 1);
                            }
                            ResendPlan::Announce => {
                                state.reannounced.fetch_add(1, Ordering::Relaxed);
                                warn!(
                                    from_seq,
                                    floor,
                                    "resend asked for events retention deleted; announcing where this journal starts"
                                );
                                announce(&rt, &config, &state, &topics, &client);
                            }
                            ResendPlan::Ahead => {
                                warn!(
                                    from_seq,
                                    journal_next = next,
                                    "the cloud holds events past this journal (restored from a backup?)"
                                );
                            }
                        }
                    }
                    (Some((_, Channel::Desired)), Ok(Body::Desired(d))) => {
                        let known = stored_desired(&rt).map(|k| k.version).unwrap_or(0);
                        if d.version <= known {
                            info!(version = d.version, known, "desired state not newer; ignored");
                        } else if let Err(e) = rt
                            .journal()
                            .put_kv(DESIRED, protocol::encode(&Body::Desired(d.clone())))
                            .await
                        {
                            // Not acked below? It is: the retained copy comes again on reconnect.
                            warn!(error = %e, "cannot store desired state");
                        } else {
                            info!(version = d.version, "desired state received");
                            let _ = desired_tx.send(Some(d));
                        }
                    }
                    (_, Err(e)) => {
                        let counter = match e {
                            protocol::ProtocolError::Unsigned
                            | protocol::ProtocolError::BadSignature { .. }
                            | protocol::ProtocolError::SignedWhileInsecure => &state.bad_signatures,
                            _ => &state.bad_messages,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        if std::ptr::eq(counter, &state.bad_signatures) {
                            state.note_refusal(&p.topic, &e.to_string());
                        }
                        warn!(topic = %p.topic, error = %e, "message from the cloud refused; nothing of it is applied");
                    }
                    (_, Ok(other)) => {
                        state.bad_messages.fetch_add(1, Ordering::Relaxed);
                        warn!(topic = %p.topic, kind = ?std::mem::discriminant(&other), "unexpected message ignored");
                    }
                }
                let _ = client.try_ack(&p);
            }
            Ok(_) => {}
            Err(e) => {
                let was_connected = state.connected.swap(false, Ordering::Relaxed);
                state.wake.notify_one();
                if was_connected {
                    // Every connection has its own epoch (Sparkplug's bdSeq): the broker may
                    // publish this connection's will after the next connection's birth, and a
                    // will must never mark that newer connection offline.
                    let next = state.epoch.load(Ordering::Relaxed) + 1;
                    match rt.journal().put_cursor(EPOCH, next).await {
                        Ok(()) => {
                            state.epoch.store(next, Ordering::Relaxed);
                            state.announcements.store(0, Ordering::Relaxed);
                            eventloop.mqtt_options.set_last_will(will(&topics, &config, next));
                        }
                        Err(e) => warn!(error = %e, "cannot store the next epoch; reconnecting with this one"),
                    }
                }
                match config.security.reload_if_changed() {
                    Ok(None) => {}
                    Ok(Some(tls)) => {
                        info!("new certificate and key installed: connecting with them (rotation)");
                        if let Some(tls) = tls {
                            eventloop
                                .mqtt_options
                                .set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                                    tls,
                                )));
                        }
                        let epoch = state.epoch.load(Ordering::Relaxed);
                        eventloop.mqtt_options.set_last_will(will(&topics, &config, epoch));
                    }
                    Err(e) => warn!(error = %e, "the new certificate or key cannot be used; keeping the old ones"),
                }
                let wait = backoff.mul_f64(0.5 + fastrand::f64());
                warn!(error = %e, retry_in = ?wait, "sync disconnected");
                *state.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some((e.to_string(), rt.clock_ms()));
                tokio::time::sleep(wait).await;
                // Capped low: a gateway should be back within seconds of its link.
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Most definition bytes per inventory message, well under the protocol's message limit.
const INVENTORY_CHUNK: usize = 256 * 1024;

/// Publishes the equipment and every stored definition after each new session and whenever a
/// definition is stored, so the console can draw the graph of any run.
async fn inventory(
    rt: Runtime,
    config: SyncConfig,
    state: Arc<SyncState>,
    client: AsyncClient,
    mut session: watch::Receiver<u64>,
) {
    let topic = Topics::new(&config.prefix).topic(&config.device, Channel::Inventory);
    let mut changed = rt.definitions_changed();
    // What this connection has already been sent: a new connection gets everything once (the
    // cloud may have lost it), later changes only what is new, and a resend request nothing.
    let mut sent: std::collections::HashSet<(String, u32)> = std::collections::HashSet::new();
    let mut connection = 0;
    loop {
        tokio::select! {
            r = session.changed() => if r.is_err() { return },
            r = changed.changed() => if r.is_err() { return },
        }
        // A birth is answered with a resend request, which bumps the session again: settle
        // first, so one connect sends one inventory.
        tokio::time::sleep(Duration::from_millis(500)).await;
        session.borrow_and_update();
        changed.borrow_and_update();
        let defs = match rt.journal().definitions() {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot read definitions for the inventory");
                continue;
            }
        };
        let defs = defs
            .into_iter()
            .filter_map(|(workflow, version, rec)| {
                if rec.json.len() > INVENTORY_CHUNK {
                    // Alone it would not fit a message either; the console draws no graph for it.
                    state.oversized_messages.fetch_add(1, Ordering::Relaxed);
                    warn!(%workflow, version, bytes = rec.json.len(), "definition too large for the inventory; left out");
                    return None;
                }
                Some(DefinitionInfo {
                    workflow,
                    version,
                    document: rec.json,
                })
            })
            .collect();
        let now = state.connects.load(Ordering::Relaxed);
        let full = now != connection;
        if full {
            connection = now;
            sent.clear();
        }
        let Some(messages) = plan_inventory(full, &sent, config.equipment.clone(), defs) else {
            continue;
        };
        for m in messages {
            for d in &m.definitions {
                sent.insert((d.workflow.clone(), d.version));
            }
            state.inventories.fetch_add(1, Ordering::Relaxed);
            publish(&client, &config, &state, &topic, &Body::Inventory(m), false).await;
        }
    }
}

/// What to send: after a new connection the whole inventory; otherwise only definitions this
/// connection has not had yet, and nothing (`None`) when there are none.
fn plan_inventory(
    full: bool,
    sent: &std::collections::HashSet<(String, u32)>,
    equipment: Vec<(String, String)>,
    defs: Vec<DefinitionInfo>,
) -> Option<Vec<Inventory>> {
    if full {
        return Some(inventory_messages(equipment, defs, INVENTORY_CHUNK));
    }
    let new: Vec<DefinitionInfo> = defs
        .into_iter()
        .filter(|d| !sent.contains(&(d.workflow.clone(), d.version)))
        .collect();
    if new.is_empty() {
        return None;
    }
    let mut messages = inventory_messages(Vec::new(), new, INVENTORY_CHUNK);
    // The equipment went with the connection's first inventory; a change carries definitions.
    for m in &mut messages {
        m.equipment = None;
    }
    messages.retain(|m| !m.definitions.is_empty());
    Some(messages)
}

/// Splits an inventory into messages: the equipment in the first, then definitions up to
/// `chunk` document bytes per message (a larger document goes alone).
fn inventory_messages(
    equipment: Vec<(String, String)>,
    definitions: Vec<DefinitionInfo>,
    chunk: usize,
) -> Vec<Inventory> {
    let mut messages = vec![Inventory {
        equipment: Some(equipment),
        definitions: Vec::new(),
    }];
    let mut size = 0;
    for d in definitions {
        let full = messages.last().is_some_and(|m| !m.definitions.is_empty());
        if full && size + d.document.len() > chunk {
            messages.push(Inventory {
                equipment: None,
                definitions: Vec::new(),
            });
            size = 0;
        }
        size += d.document.len();
        if let Some(m) = messages.last_mut() {
            m.definitions.push(d);
        }
    }
    messages
}

/// Moves the acknowledged cursor forward (never back) and persists it.
async fn acked(rt: &Runtime, state: &SyncState, next_seq: u64) {
    let prev = state.acked.fetch_max(next_seq, Ordering::Relaxed);
    if next_seq > prev {
        if let Err(e) = rt.journal().put_cursor(ACKED, next_seq).await {
            warn!(error = %e, "cannot store the acknowledged cursor");
        }
        // A resend may have moved `sent` below the new ack.
        state.sent.fetch_max(next_seq, Ordering::Relaxed);
        state.wake.notify_one();
    }
}

/// Publishes the journal from the acknowledged cursor on, in order, in batches, doing what the
/// pure `Outbox` decides; between decisions it sleeps until an event (a commit, an ack, a new
/// session, the link going down) or the one deadline the outbox names, never on a polling timer.
async fn drain(
    rt: Runtime,
    config: SyncConfig,
    state: Arc<SyncState>,
    client: AsyncClient,
    mut session: watch::Receiver<u64>,
) {
    let topic = Topics::new(&config.prefix).topic(&config.device, Channel::Events);
    let mut commits = rt.journal().commits();
    let mut outbox = Outbox::new(
        state.acked.load(Ordering::Relaxed),
        crate::outbox::Limits {
            window: config.window,
            batch: config.batch,
            drain_rate: config.drain_rate,
        },
    );
    loop {
        // The poll task moves these; the outbox decides from them.
        outbox.set_connected(state.connected.load(Ordering::Relaxed));
        outbox.on_ack(state.acked.load(Ordering::Relaxed), Instant::now());
        if session.has_changed().unwrap_or(false) {
            session.borrow_and_update();
            // New session or a resend request: from the cursor, or from before it when the
            // cloud lost what it had acknowledged.
            let acked = outbox.acked();
            let rewind = state.rewind.swap(0, Ordering::Relaxed);
            outbox.on_session(if rewind > 0 { rewind.min(acked) } else { acked });
        }
        let journal_end = *commits.borrow_and_update();
        let before = outbox.sent();
        let (from, max) = match outbox.next(Instant::now(), journal_end) {
            Next::Send { from, max } => (from, max),
            decided => {
                state.sent.store(outbox.sent(), Ordering::Relaxed);
                let deadline = match decided {
                    Next::WaitUntil(t) => Some(tokio::time::Instant::from_std(t)),
                    _ => None,
                };
                tokio::select! {
                    // Closed: the journal or the poll task has stopped, and so does the drain.
                    r = commits.changed() => if r.is_err() { return },
                    r = session.changed() => {
                        if r.is_err() {
                            return;
                        }
                        // Seen at the top of the loop.
                        session.mark_changed();
                    }
                    _ = state.wake.notified() => {}
                    _ = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
                continue;
            }
        };
        if outbox.sent() < before {
            info!(from, "no acknowledgement for a while; sending again");
        }
        let events = match rt.journal().raw_events_since(from, max, protocol::MAX_BATCH_RAW_BYTES) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "cannot read the outbox; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // Retention may have removed acknowledged events only, so the first is `from` itself.
        let Some(&(first, _)) = events.first() else {
            // Committed but not readable yet (a reopen): look again shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut contiguous: Vec<Vec<u8>> = events
            .iter()
            .enumerate()
            .take_while(|(i, (seq, _))| *seq == first + *i as u64)
            .map(|(_, (_, r))| outpost_shared::journal::for_sync(r).into_owned())
            .collect();
        // Sized by bytes, so every batch fits one message whatever the events carry.
        contiguous.truncate(protocol::batch_len(&contiguous));
        let count = contiguous.len() as u64;
        let batch = protocol::pack(state.epoch.load(Ordering::Relaxed), first, &contiguous);
        if !publish(&client, &config, &state, &topic, &Body::Events(batch), false).await {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        outbox.on_sent(first, count, Instant::now());
        state.sent.store(outbox.sent(), Ordering::Relaxed);
        state.batches.fetch_add(1, Ordering::Relaxed);
    }
}

/// Applies cloud commands once each, persisting every result before reporting it.
async fn commands(
    rt: Runtime,
    config: SyncConfig,
    state: Arc<SyncState>,
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<Command>,
) {
    let topic = Topics::new(&config.prefix).topic(&config.device, Channel::CommandResult);
    while let Some(cmd) = rx.recv().await {
        let key = format!("cmd/{}", cmd.id);
        let result = match rt.journal().kv(&key) {
            Ok(Some(stored)) => {
                state.duplicate_commands.fetch_add(1, Ordering::Relaxed);
                info!(command = %cmd.id, "repeated command ignored");
                // The first result stands: report it again (its report may have been lost).
                match protocol::decode(&stored) {
                    Ok(Body::CommandResult(r)) => r,
                    _ => result(&cmd.id, Outcome::Duplicate, "already applied".into(), json!({})),
                }
            }
            _ => {
                let Some(r) = apply(&rt, &config.policy, &cmd).await else {
                    continue;
                };
                info!(command = %cmd.id, outcome = ?r.outcome, message = %r.message, "command applied");
                if let Err(e) = rt
                    .journal()
                    .put_kv(&key, protocol::encode(&Body::CommandResult(r.clone())))
                    .await
                {
                    // Not remembered: report nothing, so it stays pending and comes again.
                    warn!(error = %e, "cannot store a command result");
                    continue;
                }
                // Retention forgets command rows by age through this index; without it the row
                // stays until a later command writes one (never lost, only kept longer).
                let index = crate::journal::command_index_key(rt.clock_ms(), &cmd.id);
                if let Err(e) = rt.journal().put_kv(&index, Vec::new()).await {
                    warn!(error = %e, "cannot index a command result for retention");
                }
                state.commands.fetch_add(1, Ordering::Relaxed);
                r
            }
        };
        publish(&client, &config, &state, &topic, &Body::CommandResult(result), false).await;
    }
}

/// Most bytes of a command result's message: a result must always fit its message, or the
/// command would stay pending and come back forever.
const MAX_RESULT_MESSAGE: usize = 4096;

fn result(id: &str, outcome: Outcome, message: String, detail: Value) -> CommandResult {
    CommandResult {
        id: id.to_string(),
        outcome,
        message: crate::actions::truncate(message, MAX_RESULT_MESSAGE),
        detail: detail.to_string(),
    }
}

/// Applies one command; `None` when it could not be tried now (the journal is failing).
async fn apply(rt: &Runtime, policy: &crate::policy::Policy, cmd: &Command) -> Option<CommandResult> {
    let json_of =
        |text: &str| serde_json::from_str::<Value>(text).map_err(|e| RuntimeError::Invalid(format!("not JSON: {e}")));
    let outcome: Result<Value, RuntimeError> = async {
        match &cmd.kind {
            CommandKind::Start {
                workflow,
                version,
                input,
                run_id,
            } => {
                let req = StartRequest {
                    workflow: workflow.clone(),
                    version: *version,
                    input: Some(json_of(input)?),
                    id: Some(run_id.clone().unwrap_or_else(|| cmd.id.clone())),
                };
                let r = rt.start(req).await?;
                Ok(json!({"run_id": r.run_id, "created": r.created, "version": r.version}))
            }
            CommandKind::Cancel { run_id, reason } => {
                let rec = rt.cancel(run_id, reason).await?;
                Ok(json!({"run_id": run_id, "status": rec.status.as_str()}))
            }
            CommandKind::Signal {
                run_id,
                name,
                payload,
                by,
            } => {
                let by = Some(by.clone()).filter(|b| !b.is_empty());
                let fresh = rt
                    .signal_from(run_id, name, Some(cmd.id.clone()), json_of(payload)?, by)
                    .await?;
                Ok(json!({"run_id": run_id, "accepted": fresh}))
            }
            CommandKind::Approve {
                run_id,
                step,
                approved,
                by,
                comment,
            } => {
                let d = Decision {
                    step: step.clone(),
                    approved: *approved,
                    by: by.clone(),
                    comment: comment.clone(),
                    id: Some(cmd.id.clone()),
                    vouched: true,
                };
                let fresh = rt.approve(run_id, d).await?;
                Ok(json!({"run_id": run_id, "accepted": fresh}))
            }
            CommandKind::Deploy { deployment, document } => {
                // Checked before anything is stored: a refused definition leaves no trace.
                let doc = outpost_shared::definition::parse_document(document)
                    .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
                if let Err(v) = policy.check(&doc) {
                    warn!(deployment = %deployment, step = %v.step, reason = %v, "deployment refused by the local policy");
                    return Err(RuntimeError::Invalid(v.to_string()));
                }
                let (def, applied) = rt.apply(document).await?;
                Ok(json!({
                    "deployment": deployment, "workflow": def.name(), "version": def.version(),
                    "created": applied == crate::journal::Applied::Created,
                }))
            }
        }
    }
    .await;
    match outcome {
        Ok(detail) => Some(result(&cmd.id, Outcome::Applied, "applied".into(), detail)),
        // The journal could not be written (a full disk, a reopen in progress): the command was
        // not refused, it could not be tried. Nothing is recorded, so the cloud sends it again.
        Err(RuntimeError::Journal(
            e @ (crate::journal::JournalError::Storage(_)
            | crate::journal::JournalError::Reopening
            | crate::journal::JournalError::Closed),
        )) => {
            warn!(command = %cmd.id, error = %e, "command not applied: the journal cannot be written; it stays pending");
            None
        }
        Err(e) => Some(result(&cmd.id, Outcome::Rejected, e.to_string(), json!({}))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resends_are_served_inside_the_journal_and_announced_outside_it() {
        // Journal holds 40..=99 without holes (retention deleted up to 39).
        assert_eq!(plan_resend(40, 40, 100), ResendPlan::From(40));
        assert_eq!(
            plan_resend(70, 40, 100),
            ResendPlan::From(70),
            "before the ack: a restored cloud"
        );
        assert_eq!(plan_resend(100, 40, 100), ResendPlan::From(100), "nothing missing");
        assert_eq!(plan_resend(39, 40, 100), ResendPlan::Announce, "retention deleted it");
        assert_eq!(
            plan_resend(101, 40, 100),
            ResendPlan::Ahead,
            "the cloud is past this journal"
        );
    }

    fn def(name: &str, bytes: usize) -> DefinitionInfo {
        DefinitionInfo {
            workflow: name.into(),
            version: 1,
            document: "x".repeat(bytes),
        }
    }

    #[test]
    fn a_connection_gets_the_inventory_once_and_then_only_what_is_new() {
        let eq = vec![("heater".to_string(), "output".to_string())];
        let mut sent = std::collections::HashSet::new();
        let all = plan_inventory(true, &sent, eq.clone(), vec![def("a", 10), def("b", 10)]).unwrap();
        assert_eq!(all[0].equipment.as_ref(), Some(&eq));
        assert_eq!(all[0].definitions.len(), 2);
        sent.insert(("a".to_string(), 1));
        sent.insert(("b".to_string(), 1));
        // A resend request (same connection, nothing new): nothing goes out.
        assert!(plan_inventory(false, &sent, eq.clone(), vec![def("a", 10), def("b", 10)]).is_none());
        // A new definition: only it, without the equipment.
        let delta = plan_inventory(false, &sent, eq.clone(), vec![def("a", 10), def("b", 10), def("c", 10)]).unwrap();
        assert_eq!(delta.len(), 1);
        assert!(delta[0].equipment.is_none());
        assert_eq!(
            delta[0]
                .definitions
                .iter()
                .map(|d| d.workflow.as_str())
                .collect::<Vec<_>>(),
            vec!["c"]
        );
        // A new connection: everything again.
        assert_eq!(
            plan_inventory(true, &sent, eq, vec![def("a", 10)]).unwrap()[0]
                .definitions
                .len(),
            1
        );
    }

    #[test]
    fn inventories_carry_the_equipment_once_and_split_definitions_by_size() {
        let eq = vec![("heater".to_string(), "output".to_string())];
        let msgs = inventory_messages(
            eq.clone(),
            vec![def("a", 60), def("b", 60), def("c", 200), def("d", 10)],
            100,
        );
        let names: Vec<Vec<&str>> = msgs
            .iter()
            .map(|m| m.definitions.iter().map(|d| d.workflow.as_str()).collect())
            .collect();
        assert_eq!(names, vec![vec!["a"], vec!["b"], vec!["c"], vec!["d"]]);
        assert_eq!(msgs[0].equipment.as_ref(), Some(&eq));
        assert!(msgs[1..].iter().all(|m| m.equipment.is_none()));
        let one = inventory_messages(Vec::new(), vec![def("a", 10), def("b", 10)], 100);
        assert_eq!(one.len(), 1, "small catalogs fit one message");
        assert_eq!(one[0].definitions.len(), 2);
    }
}
