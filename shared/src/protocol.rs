//! The sync protocol between an agent and cloud-sync over MQTT (see `docs/protocol.md`).
//!
//! Every message is one version byte followed by a postcard-encoded [`Body`]. Postcard is not
//! self-describing, so the same rules as the journal hold: `Body` variants and message structs
//! are only appended (a change is a new version byte), JSON travels as strings, and events travel
//! as the journal's own record bytes, so the cloud decodes them with [`crate::journal::decode`].

// Decoders of untrusted bytes: no panics, no unchecked indexing (ARCHITECTURE.md, "Input").
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)
)]

use serde::{Deserialize, Serialize};

/// The first byte of an unsigned message (protocol v1): only between sides that both run with
/// `--insecure-unsigned`, and for the agent's own stored copies of messages.
pub const VERSION: u8 = 1;
/// The first byte of a signed message (protocol v2): the v1 body followed by an Ed25519
/// signature over the topic and the bytes before it (see [`crate::signing`]).
pub const SIGNED_VERSION: u8 = 2;
/// The version in the topic tree (`PREFIX/v1/DEVICE/CHANNEL`); both message versions use it.
pub const TOPIC_VERSION: u8 = 1;
/// Largest message accepted; larger payloads are rejected before decoding, and neither side
/// ever publishes one (see [`encode_checked`]).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Largest MQTT packet either side accepts or the shipped broker configurations let through:
/// a message plus room for the topic and the packet header. Brokers must not pass anything
/// larger (a client drops its connection on an oversized packet, and an unacked QoS 1 message
/// would then come back on every reconnect).
pub const MAX_PACKET_BYTES: usize = MAX_MESSAGE_BYTES + 4096;
/// Largest MQTT packet the clients read, four times what anyone may send: behind a broker
/// configured without the limit, a message somewhat over it is still read and refused by name
/// (counted, acked) instead of dropping the connection.
pub const MAX_INCOMING_PACKET_BYTES: usize = 4 * MAX_PACKET_BYTES;
/// Most uncompressed record bytes in one event batch. The agent packs under it (so the
/// compressed batch always fits a message) and the cloud refuses to inflate more, so a deflate
/// bomb costs at most this much memory.
pub const MAX_BATCH_RAW_BYTES: usize = MAX_MESSAGE_BYTES - 64 * 1024;
/// Most events in one batch; a batch claiming more is malformed before anything is allocated.
pub const MAX_BATCH_EVENTS: u32 = 65_536;
/// Most bytes of untrusted input quoted in an error or a log line.
pub const MAX_QUOTED_BYTES: usize = 64;
/// Default topic prefix.
pub const DEFAULT_PREFIX: &str = "outpost";

/// One journal event on the wire: its device-wide sequence and the record bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEvent {
    /// Device-wide sequence number.
    pub seq: u64,
    /// The journal record (`journal::encode`), compressed per batch.
    pub record: Vec<u8>,
}

/// The agent announces itself (on every connect).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Birth {
    /// Increases on every agent start; orders births and deaths.
    pub epoch: u64,
    /// The agent's newest journal sequence.
    pub last_seq: u64,
    /// Agent version.
    pub agent_version: String,
    /// Labels for deployments (`line=3`, `site=north`).
    pub labels: Vec<(String, String)>,
    /// Random, made once when the journal was created: under the same device id, another value
    /// is another journal (a wiped or replaced gateway), whose sequences start again at 1.
    pub journal_id: u64,
    /// Numbers the births of one epoch (from 1): a birth is repeated (retained, redelivered)
    /// unless its (epoch, announcement) is newer than the last one acted on.
    pub announcement: u64,
    /// The oldest sequence this journal can still send; retention has removed events before it.
    /// A cloud that expects an older one has lost them for good (a restored or lost store).
    pub resend_from: u64,
    /// Why the journal cannot be written right now (a full disk), or empty; runs wait meanwhile.
    /// The agent announces again when this changes, so the fleet view says it.
    pub storage_error: String,
    /// Runs waiting for the journal to take a write (at most [`MAX_BLOCKED_RUNS_LISTED`] ids).
    pub blocked_runs: Vec<String>,
    /// What is insecure about this gateway's link (plain text, unsigned messages), for the
    /// fleet view; empty when nothing is.
    pub insecure: Vec<String>,
    /// The newest messages this gateway refused for their signature (at most
    /// [`MAX_REFUSALS_LISTED`], "when: channel: why"), so the fleet view shows forgeries aimed
    /// at it.
    pub refused: Vec<String>,
}

/// Most refusals a birth lists.
pub const MAX_REFUSALS_LISTED: usize = 5;

/// Most blocked run ids a birth lists.
pub const MAX_BLOCKED_RUNS_LISTED: usize = 64;

/// The agent is gone (the MQTT Last Will, registered at connect).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Death {
    /// The epoch of the connection that died.
    pub epoch: u64,
}

/// A contiguous run of journal events, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    /// Sender's epoch.
    pub epoch: u64,
    /// Sequence of the first event; the rest follow without gaps.
    pub first_seq: u64,
    /// Number of events.
    pub count: u32,
    /// The events' records, each length-prefixed, deflate-compressed as one block.
    pub compressed: Vec<u8>,
}

/// Cloud → agent: every event before `next_seq` is stored durably; the agent may trim them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// First sequence not yet stored.
    pub next_seq: u64,
}

/// Cloud → agent: a gap was seen; send again from `from_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resend {
    /// First missing sequence.
    pub from_seq: u64,
}

/// What a command asks the agent to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandKind {
    /// Start a run.
    Start {
        /// Workflow.
        workflow: String,
        /// Version (latest when `None`).
        version: Option<u32>,
        /// Input as JSON text.
        input: String,
        /// Run id (the command id when `None`).
        run_id: Option<String>,
    },
    /// Cancel a run.
    Cancel {
        /// Run.
        run_id: String,
        /// Why.
        reason: String,
    },
    /// Signal a run.
    Signal {
        /// Run.
        run_id: String,
        /// Signal name.
        name: String,
        /// Payload as JSON text.
        payload: String,
        /// Who sent it (the signed-in user or token), journaled with it on the gateway.
        by: String,
    },
    /// Decide an approval step.
    Approve {
        /// Run.
        run_id: String,
        /// Step.
        step: String,
        /// Approve or reject.
        approved: bool,
        /// Who.
        by: String,
        /// Comment.
        comment: String,
    },
    /// Apply a definition (a deployment).
    Deploy {
        /// Deployment id.
        deployment: String,
        /// The definition document (YAML or JSON text).
        document: String,
    },
}

/// Cloud → agent: a command, applied at most once per id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Unique id; the agent remembers applied ids and ignores repeats.
    pub id: String,
    /// What to do.
    pub kind: CommandKind,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done.
    Applied,
    /// Refused (invalid, unknown run, …); `message` says why.
    Rejected,
    /// Already applied earlier (a redelivery); the first result stands.
    Duplicate,
}

/// Agent → cloud: the result of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The command.
    pub id: String,
    /// Outcome.
    pub outcome: Outcome,
    /// For people.
    pub message: String,
    /// Details as JSON text (e.g. the started run id).
    pub detail: String,
}

/// Cloud → agent (retained): the desired state document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// Increases with every change; older versions are ignored.
    pub version: u64,
    /// The document as JSON text.
    pub document: String,
}

/// Agent → cloud (retained): the reported state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    /// The desired version this report answers (0: none yet).
    pub desired_version: u64,
    /// The document as JSON text, as verified on the device.
    pub document: String,
    /// True when it equals the desired document exactly.
    pub in_sync: bool,
    /// Why not, or what is in progress.
    pub message: String,
}

/// Agent → cloud (retained): the reported state with the verdict of every equipment point it
/// names. Replaces [`Reported`] (which older agents still send) on the same channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReport {
    /// The desired version this report answers (0: none yet).
    pub desired_version: u64,
    /// The state found, as JSON text: the remediation workflow's output with every equipment
    /// point replaced by the value read back from the device.
    pub document: String,
    /// True when every point matched exactly on the wire and the rest equals the desired document.
    pub in_sync: bool,
    /// Why not, or what is in progress; names every point that is not a match.
    pub message: String,
    /// One entry per equipment point of the desired document.
    pub points: Vec<PointCheck>,
    /// When the device last read its points back (epoch ms).
    pub verified_ms: u64,
    /// When a state that had been verified was first seen to have drifted from it, while it stays so.
    pub drift_since_ms: Option<u64>,
}

/// One equipment point compared on the wire's terms: the desired value encoded with the point's
/// type, scale and word order against the raw words read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointCheck {
    /// Equipment device.
    pub device: String,
    /// Point of that device.
    pub point: String,
    /// The desired value, as JSON text.
    pub desired: String,
    /// The value read back, as JSON text (empty when it could not be read).
    pub found: String,
    /// The desired value as it goes on the wire: Modbus registers (`0x4291 0x0000`) or an OPC UA
    /// variant (`Float 0x42910000`, `UInt16 900`); empty when it cannot be encoded. Two values are
    /// a match exactly when these texts are equal.
    pub desired_raw: String,
    /// What was read back, in the same form.
    pub found_raw: String,
    /// The verdict.
    pub verdict: Verdict,
}

/// How a point compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The raw words read back are the desired ones.
    Match,
    /// The device holds other raw words.
    Differs,
    /// The point could not be read (the reason: exception, timeout, …).
    Unreadable(String),
    /// The desired value cannot be held exactly by the point, or names no such point; never written.
    Refused(String),
}

impl Verdict {
    /// A short name: `match`, `differs`, `unreadable`, `refused`.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Match => "match",
            Verdict::Differs => "differs",
            Verdict::Unreadable(_) => "unreadable",
            Verdict::Refused(_) => "refused",
        }
    }

    /// The reason of an unreadable or refused point.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Verdict::Unreadable(r) | Verdict::Refused(r) => Some(r),
            _ => None,
        }
    }
}

impl From<Reported> for StateReport {
    fn from(r: Reported) -> Self {
        StateReport {
            desired_version: r.desired_version,
            document: r.document,
            in_sync: r.in_sync,
            message: r.message,
            points: Vec::new(),
            verified_ms: 0,
            drift_since_ms: None,
        }
    }
}

/// A workflow definition the agent holds, so the console can draw its runs' graphs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefinitionInfo {
    /// Workflow name.
    pub workflow: String,
    /// Version.
    pub version: u32,
    /// The canonical JSON document.
    pub document: String,
}

/// What an agent has: its equipment and workflow definitions. Sent after every birth and
/// whenever a definition is stored; large catalogs come in several messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Equipment devices as (name, kind), in the first message of a catalog; `None` in the rest.
    pub equipment: Option<Vec<(String, String)>>,
    /// Definitions (upserted by workflow and version).
    pub definitions: Vec<DefinitionInfo>,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Agent up.
    Birth(Birth),
    /// Agent gone.
    Death(Death),
    /// Events up.
    Events(EventBatch),
    /// Stored up to.
    Ack(Ack),
    /// Gap: resend.
    Resend(Resend),
    /// A command down.
    Command(Command),
    /// A command's result up.
    CommandResult(CommandResult),
    /// Desired state down.
    Desired(Desired),
    /// Reported state up.
    Reported(Reported),
    /// Equipment and definitions up (appended: older decoders call it malformed).
    Inventory(Inventory),
    /// Reported state with per-point verdicts up (appended: older decoders call it malformed).
    StateReport(StateReport),
}

/// Why bytes are not a message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Empty payload.
    #[error("empty message")]
    Empty,
    /// Too large.
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    /// A version this build does not know.
    #[error("unknown protocol version {0} (this build speaks {VERSION} unsigned and {SIGNED_VERSION} signed)")]
    UnknownVersion(u8),
    /// An unsigned (v1) message where signatures are required.
    #[error("unsigned message (protocol v1): this side requires signed messages (protocol v2)")]
    Unsigned,
    /// A signed (v2) message where the sides run unsigned (`--insecure-unsigned`).
    #[error("signed message (protocol v2) while this side runs with --insecure-unsigned, which takes only v1")]
    SignedWhileInsecure,
    /// The signature is not the expected key's over this topic and these bytes.
    #[error(
        "bad signature: not signed by {signer} for this topic (forged, altered, or sent on another device's topic)"
    )]
    BadSignature {
        /// Whose key was expected (a device id or `the fleet key`).
        signer: String,
    },
    /// An encoded message would exceed [`MAX_MESSAGE_BYTES`]; it is never sent.
    #[error("a {kind} message of {len} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit; not sent")]
    WontFit {
        /// Which message.
        kind: &'static str,
        /// Its encoded length.
        len: usize,
    },
    /// Does not decode.
    #[error("malformed message ({len} bytes): {reason}")]
    Malformed {
        /// Length.
        len: usize,
        /// Why.
        reason: String,
    },
}

/// Encodes a message.
pub fn encode(body: &Body) -> Vec<u8> {
    let mut out = vec![VERSION];
    // Serialising owned strings, vectors and integers cannot fail.
    out.extend(postcard::to_allocvec(body).unwrap_or_default());
    out
}

/// Encodes a message, refusing one over [`MAX_MESSAGE_BYTES`]: the caller reports the refusal
/// instead of handing the broker a packet that wedges the link.
pub fn encode_checked(body: &Body) -> Result<Vec<u8>, ProtocolError> {
    let bytes = encode(body);
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::WontFit {
            kind: body.kind(),
            len: bytes.len(),
        });
    }
    Ok(bytes)
}

/// At most [`MAX_QUOTED_BYTES`] of untrusted text, for errors and logs (never the whole payload).
pub fn quote(text: &str) -> String {
    clip(text, MAX_QUOTED_BYTES)
}

/// At most `max` bytes of `text` (cut at a character boundary), saying how long it was.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", text.get(..end).unwrap_or(""), text.len())
}

impl Body {
    /// The message's name, for errors and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Birth(_) => "birth",
            Body::Death(_) => "death",
            Body::Events(_) => "events",
            Body::Ack(_) => "ack",
            Body::Resend(_) => "resend",
            Body::Command(_) => "command",
            Body::CommandResult(_) => "command result",
            Body::Desired(_) => "desired",
            Body::Reported(_) => "reported",
            Body::Inventory(_) => "inventory",
            Body::StateReport(_) => "reported",
        }
    }
}

/// Decodes a message of a known version.
pub fn decode(bytes: &[u8]) -> Result<Body, ProtocolError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::TooLarge(bytes.len()));
    }
    let (&version, rest) = bytes.split_first().ok_or(ProtocolError::Empty)?;
    if version != VERSION {
        return Err(ProtocolError::UnknownVersion(version));
    }
    postcard::from_bytes(rest).map_err(|e| ProtocolError::Malformed {
        len: bytes.len(),
        reason: e.to_string(),
    })
}

/// How one side seals what it publishes: signed with its key (the default), or unsigned v1
/// under `--insecure-unsigned`.
#[derive(Debug, Clone)]
pub enum Seal {
    /// Protocol v1, no signature.
    Unsigned,
    /// Protocol v2, signed with this key.
    Signed(std::sync::Arc<crate::signing::SigningKey>),
}

impl Seal {
    /// Encodes `body` for `topic`, refusing a message over [`MAX_MESSAGE_BYTES`] (signature
    /// included).
    pub fn encode(&self, topic: &str, body: &Body) -> Result<Vec<u8>, ProtocolError> {
        let mut bytes = encode(body);
        if let Seal::Signed(key) = self {
            if let Some(v) = bytes.first_mut() {
                *v = SIGNED_VERSION;
            }
            let sig = key.sign(topic, &bytes);
            bytes.extend_from_slice(&sig);
        }
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(ProtocolError::WontFit {
                kind: body.kind(),
                len: bytes.len(),
            });
        }
        Ok(bytes)
    }

    /// True when messages are signed.
    pub fn signs(&self) -> bool {
        matches!(self, Seal::Signed(_))
    }
}

/// Whose signature a received message must carry.
#[derive(Debug, Clone, Copy)]
pub enum Trust<'a> {
    /// `--insecure-unsigned`: v1 messages only.
    Unsigned,
    /// v2 messages signed by this key; `signer` names it in errors.
    Key {
        /// The key.
        key: &'a crate::signing::VerifyingKey,
        /// Whose it is.
        signer: &'a str,
    },
}

/// Decodes a message received on `topic`: the signature is checked before a byte of the body
/// is decoded, so unauthenticated input never reaches the decoder in the signed mode.
pub fn open(bytes: &[u8], topic: &str, trust: Trust<'_>) -> Result<Body, ProtocolError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::TooLarge(bytes.len()));
    }
    let &version = bytes.first().ok_or(ProtocolError::Empty)?;
    match (trust, version) {
        (Trust::Unsigned, VERSION) => decode(bytes),
        (Trust::Unsigned, SIGNED_VERSION) => Err(ProtocolError::SignedWhileInsecure),
        (Trust::Key { .. }, VERSION) => Err(ProtocolError::Unsigned),
        (Trust::Key { key, signer }, SIGNED_VERSION) => {
            let bad = || ProtocolError::BadSignature {
                signer: signer.to_string(),
            };
            let split = bytes
                .len()
                .checked_sub(crate::signing::SIGNATURE_BYTES)
                .ok_or_else(bad)?;
            let (message, sig) = bytes.split_at_checked(split).ok_or_else(bad)?;
            if message.is_empty() || !key.verify(topic, message, sig) {
                return Err(bad());
            }
            let body = message.get(1..).unwrap_or(&[]);
            postcard::from_bytes(body).map_err(|e| ProtocolError::Malformed {
                len: bytes.len(),
                reason: e.to_string(),
            })
        }
        (_, v) => Err(ProtocolError::UnknownVersion(v)),
    }
}

/// Packs journal records (oldest first) into a compressed batch body.
pub fn pack(epoch: u64, first_seq: u64, records: &[Vec<u8>]) -> EventBatch {
    let mut raw = Vec::with_capacity(records.iter().map(|r| r.len() + 3).sum());
    for r in records {
        let mut len = [0u8; 10];
        let n = varint(r.len() as u64, &mut len);
        raw.extend_from_slice(len.get(..n).unwrap_or(&[]));
        raw.extend_from_slice(r);
    }
    EventBatch {
        epoch,
        first_seq,
        count: u32::try_from(records.len()).unwrap_or(u32::MAX),
        compressed: miniz_oxide::deflate::compress_to_vec(&raw, 6),
    }
}

/// How many of `records` (oldest first) go in the next batch: as many as fit
/// [`MAX_BATCH_RAW_BYTES`] and [`MAX_BATCH_EVENTS`], and at least one (the caller makes sure a
/// single record fits, see `journal::elide_for_sync`).
pub fn batch_len<R: AsRef<[u8]>>(records: &[R]) -> usize {
    let mut bytes = 0usize;
    let mut n = 0usize;
    for r in records {
        let size = r.as_ref().len() + 10;
        if n > 0 && (bytes + size > MAX_BATCH_RAW_BYTES || n >= MAX_BATCH_EVENTS as usize) {
            break;
        }
        bytes += size;
        n += 1;
    }
    n
}

/// Unpacks a batch into (seq, record bytes), checking the count, the sequence range and the
/// inflated size before trusting any of them.
pub fn unpack(batch: &EventBatch) -> Result<Vec<WireEvent>, ProtocolError> {
    let malformed = |reason: String| ProtocolError::Malformed {
        len: batch.compressed.len(),
        reason,
    };
    if batch.count == 0 || batch.count > MAX_BATCH_EVENTS {
        return Err(malformed(format!(
            "a batch of {} events (1 to {MAX_BATCH_EVENTS} allowed)",
            batch.count
        )));
    }
    if batch.first_seq == 0 || batch.first_seq.checked_add(u64::from(batch.count)).is_none() {
        return Err(malformed(format!(
            "sequences {} + {} are out of range",
            batch.first_seq, batch.count
        )));
    }
    // The error's Debug form carries the whole partial output: name only its status.
    let raw =
        miniz_oxide::inflate::decompress_to_vec_with_limit(&batch.compressed, MAX_BATCH_RAW_BYTES).map_err(|e| {
            malformed(format!(
                "events do not inflate within {MAX_BATCH_RAW_BYTES} bytes ({:?})",
                e.status
            ))
        })?;
    // Every record takes at least its one length byte, so this bounds the allocation by input.
    let mut out = Vec::with_capacity((batch.count as usize).min(raw.len()));
    let mut rest = raw.as_slice();
    let mut seq = batch.first_seq;
    while !rest.is_empty() {
        let (len, n) = read_varint(rest).ok_or_else(|| malformed("bad record length".into()))?;
        let len = usize::try_from(len).map_err(|_| malformed("record length overflows".into()))?;
        let body = rest.get(n..).unwrap_or(&[]);
        let (record, tail) = body
            .split_at_checked(len)
            .ok_or_else(|| malformed("record runs past the end".into()))?;
        if out.len() >= batch.count as usize {
            return Err(malformed(format!(
                "more records than the {} the batch says",
                batch.count
            )));
        }
        out.push(WireEvent {
            seq,
            record: record.to_vec(),
        });
        seq += 1;
        rest = tail;
    }
    if out.len() != batch.count as usize {
        return Err(malformed(format!(
            "{} records where the batch says {}",
            out.len(),
            batch.count
        )));
    }
    Ok(out)
}

fn varint(mut v: u64, out: &mut [u8; 10]) -> usize {
    // A u64 takes at most 10 groups of 7 bits, so the loop ends within `out`.
    for (i, slot) in out.iter_mut().enumerate() {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            *slot = b;
            return i + 1;
        }
        *slot = b | 0x80;
    }
    out.len()
}

fn read_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        // The tenth group has room for one bit only; more is not a u64.
        if i == 9 && b & 0x7e != 0 {
            return None;
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Topic names under a prefix, one subtree per device.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

/// The channels of a device's subtree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Agent → cloud, retained: birth.
    Birth,
    /// Agent → cloud, retained: death (Last Will).
    Death,
    /// Agent → cloud: event batches.
    Events,
    /// Cloud → agent: acks and resend requests.
    Ack,
    /// Cloud → agent: commands.
    Command,
    /// Agent → cloud: command results.
    CommandResult,
    /// Cloud → agent, retained: desired state.
    Desired,
    /// Agent → cloud, retained: reported state.
    Reported,
    /// Agent → cloud: equipment and definitions.
    Inventory,
}

impl Channel {
    /// Every channel.
    pub const ALL: [Channel; 9] = [
        Channel::Birth,
        Channel::Death,
        Channel::Events,
        Channel::Ack,
        Channel::Command,
        Channel::CommandResult,
        Channel::Desired,
        Channel::Reported,
        Channel::Inventory,
    ];
    /// The last topic level.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Birth => "birth",
            Channel::Death => "death",
            Channel::Events => "events",
            Channel::Ack => "ack",
            Channel::Command => "cmd",
            Channel::CommandResult => "cmd-result",
            Channel::Desired => "desired",
            Channel::Reported => "reported",
            Channel::Inventory => "inventory",
        }
    }
    /// True for channels the agent publishes.
    pub fn is_up(self) -> bool {
        !matches!(self, Channel::Ack | Channel::Command | Channel::Desired)
    }
}

impl Topics {
    /// Topics under `prefix` (e.g. `outpost` or `plant-7/outpost`).
    pub fn new(prefix: &str) -> Topics {
        Topics {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }
    /// `PREFIX/v1/DEVICE/CHANNEL`.
    pub fn topic(&self, device: &str, channel: Channel) -> String {
        format!("{}/v{TOPIC_VERSION}/{device}/{}", self.prefix, channel.name())
    }
    /// `PREFIX/v1/+/CHANNEL`: one channel of every device.
    pub fn all_devices(&self, channel: Channel) -> String {
        format!("{}/v{TOPIC_VERSION}/+/{}", self.prefix, channel.name())
    }
    /// The device and channel of a topic under this prefix.
    pub fn parse<'a>(&self, topic: &'a str) -> Option<(&'a str, Channel)> {
        let rest = topic.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?;
        let rest = rest.strip_prefix(&format!("v{TOPIC_VERSION}/"))?;
        let (device, name) = rest.split_once('/')?;
        let ch = Channel::ALL.into_iter().find(|c| c.name() == name)?;
        valid_device_id(device).then_some((device, ch))
    }
}

/// Device ids: 1-64 of letters, digits, `-`, `_`, `.`; no MQTT wildcards or separators.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seal() -> (Seal, crate::signing::VerifyingKey) {
        let der = crate::signing::SigningKey::generate_pkcs8().unwrap();
        let key = crate::signing::SigningKey::from_pkcs8(&der, "t").unwrap();
        let public = key.public();
        (Seal::Signed(std::sync::Arc::new(key)), public)
    }

    #[test]
    fn signed_messages_open_only_with_their_key_on_their_topic() {
        let (seal, public) = seal();
        let trust = Trust::Key {
            key: &public,
            signer: "gw-1",
        };
        let body = Body::Ack(Ack { next_seq: 7 });
        let t = Topics::new("outpost");
        let topic = t.topic("gw-1", Channel::Ack);
        let bytes = seal.encode(&topic, &body).unwrap();
        assert_eq!(bytes.first(), Some(&SIGNED_VERSION));
        assert_eq!(bytes.len(), encode(&body).len() + crate::signing::SIGNATURE_BYTES);
        assert_eq!(open(&bytes, &topic, trust).unwrap(), body);
        // Another device's topic, a flipped bit, a cut signature, an unsigned copy.
        let other = t.topic("gw-2", Channel::Ack);
        assert!(matches!(
            open(&bytes, &other, trust),
            Err(ProtocolError::BadSignature { .. })
        ));
        let mut flipped = bytes.clone();
        flipped[1] ^= 1;
        assert!(matches!(
            open(&flipped, &topic, trust),
            Err(ProtocolError::BadSignature { .. })
        ));
        assert!(matches!(
            open(&bytes[..bytes.len() - 1], &topic, trust),
            Err(ProtocolError::BadSignature { .. })
        ));
        assert!(matches!(
            open(&[SIGNED_VERSION], &topic, trust),
            Err(ProtocolError::BadSignature { .. })
        ));
        assert!(matches!(
            open(&encode(&body), &topic, trust),
            Err(ProtocolError::Unsigned)
        ));
        let err = open(&bytes, &other, trust).unwrap_err().to_string();
        assert!(err.contains("gw-1"), "{err}");
        // The insecure mode takes v1 only.
        assert!(matches!(
            open(&bytes, &topic, Trust::Unsigned),
            Err(ProtocolError::SignedWhileInsecure)
        ));
        assert_eq!(
            open(&Seal::Unsigned.encode(&topic, &body).unwrap(), &topic, Trust::Unsigned).unwrap(),
            body
        );
        assert!(matches!(
            open(&[9, 0], &topic, trust),
            Err(ProtocolError::UnknownVersion(9))
        ));
    }

    proptest! {
        #[test]
        fn open_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (_, public) = seal();
            let _ = open(&bytes, "outpost/v1/gw/ack", Trust::Key { key: &public, signer: "x" });
            let _ = open(&bytes, "outpost/v1/gw/ack", Trust::Unsigned);
        }
    }

    #[test]
    fn batches_round_trip_and_compress() {
        let records: Vec<Vec<u8>> = (0..500)
            .map(|i| format!("run-0001/step-{}/attempt {}", i % 3, i).into_bytes())
            .collect();
        let b = pack(3, 41, &records);
        let raw: usize = records.iter().map(Vec::len).sum();
        assert!(b.compressed.len() * 4 < raw, "{} of {raw}", b.compressed.len());
        let msg = encode(&Body::Events(b.clone()));
        let Body::Events(back) = decode(&msg).unwrap() else {
            panic!()
        };
        let events = unpack(&back).unwrap();
        assert_eq!(events.len(), 500);
        assert_eq!(events[0].seq, 41);
        assert_eq!(events[499].seq, 540);
        assert_eq!(events[7].record, records[7]);
    }

    #[test]
    fn bad_messages_are_named() {
        assert!(matches!(decode(&[]), Err(ProtocolError::Empty)));
        assert!(matches!(decode(&[9, 1, 2]), Err(ProtocolError::UnknownVersion(9))));
        assert!(matches!(
            decode(&[1, 200, 200, 200]),
            Err(ProtocolError::Malformed { .. })
        ));
        let big = vec![1u8; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(decode(&big), Err(ProtocolError::TooLarge(_))));
        let mut b = pack(1, 1, &[b"abc".to_vec()]);
        b.count = 2;
        assert!(
            unpack(&b)
                .unwrap_err()
                .to_string()
                .contains("1 records where the batch says 2")
        );
    }

    #[test]
    fn a_huge_count_is_refused_before_anything_is_allocated() {
        // The 12-byte batch that used to abort outpost-cloud: count = u32::MAX.
        let b = EventBatch {
            epoch: 1,
            first_seq: 1,
            count: u32::MAX,
            compressed: miniz_oxide::deflate::compress_to_vec(&[1, 7], 6),
        };
        let e = unpack(&b).unwrap_err().to_string();
        assert!(e.contains("4294967295 events"), "{e}");
        let bytes = encode(&Body::Events(b));
        assert!(bytes.len() <= 16, "{}", bytes.len());
    }

    #[test]
    fn sequences_that_overflow_are_refused() {
        let mut b = pack(1, u64::MAX - 1, &[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert!(unpack(&b).unwrap_err().to_string().contains("out of range"));
        b.first_seq = 0;
        assert!(unpack(&b).is_err(), "sequence 0 does not exist");
    }

    #[test]
    fn a_deflate_bomb_is_refused_with_a_short_error() {
        let zeros = vec![0u8; 64 * 1024 * 1024];
        let b = EventBatch {
            epoch: 1,
            first_seq: 1,
            count: 1,
            compressed: miniz_oxide::deflate::compress_to_vec(&zeros, 10),
        };
        assert!(b.compressed.len() < 200_000);
        let e = unpack(&b).unwrap_err().to_string();
        assert!(e.contains("do not inflate"), "{e}");
        assert!(e.len() < 300, "the error quotes the payload: {} bytes", e.len());
    }

    #[test]
    fn overlong_varints_are_malformed() {
        let raw = [0xffu8; 11];
        let b = EventBatch {
            epoch: 1,
            first_seq: 1,
            count: 1,
            compressed: miniz_oxide::deflate::compress_to_vec(&raw, 6),
        };
        assert!(unpack(&b).unwrap_err().to_string().contains("bad record length"));
    }

    #[test]
    fn batches_are_sized_by_bytes() {
        let big = vec![vec![7u8; 200 * 1024]; 10];
        let n = batch_len(&big);
        assert_eq!(n, 4, "4 × 200 KiB fit under {MAX_BATCH_RAW_BYTES}");
        let b = pack(1, 1, &big[..n]);
        assert!(encode_checked(&Body::Events(b)).is_ok());
        let small = vec![vec![1u8; 3]; 100_000];
        assert_eq!(batch_len(&small), MAX_BATCH_EVENTS as usize);
        let huge = vec![vec![1u8; 2 * MAX_MESSAGE_BYTES]];
        assert_eq!(
            batch_len(&huge),
            1,
            "always progress; the caller elides what cannot fit"
        );
        assert_eq!(batch_len::<Vec<u8>>(&[]), 0);
    }

    #[test]
    fn oversized_messages_are_never_encoded_for_sending() {
        let d = Body::Desired(Desired {
            version: 1,
            document: "x".repeat(MAX_MESSAGE_BYTES),
        });
        let e = encode_checked(&d).unwrap_err().to_string();
        assert!(e.contains("desired message of"), "{e}");
        assert!(quote(&"é".repeat(100)).ends_with("(200 bytes)"));
        assert_eq!(quote("short"), "short");
    }

    #[test]
    fn topics_parse_back() {
        let t = Topics::new("plant/outpost/");
        let topic = t.topic("gw-7", Channel::CommandResult);
        assert_eq!(topic, "plant/outpost/v1/gw-7/cmd-result");
        assert_eq!(t.parse(&topic), Some(("gw-7", Channel::CommandResult)));
        assert_eq!(t.parse("plant/outpost/v2/gw-7/events"), None);
        assert_eq!(t.parse("plant/outpost/v1/gw+7/events"), None);
        assert_eq!(t.all_devices(Channel::Birth), "plant/outpost/v1/+/birth");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(Body::Events(b)) = decode(&bytes) {
                let _ = unpack(&b);
            }
        }

        #[test]
        fn state_reports_round_trip(
            version in any::<u64>(),
            doc in ".{0,64}",
            points in proptest::collection::vec((".{0,8}", ".{0,8}", ".{0,12}", ".{0,12}", 0u8..4, ".{0,16}"), 0..6),
            since in proptest::option::of(any::<u64>()),
        ) {
            let r = StateReport {
                desired_version: version,
                document: doc.clone(),
                in_sync: points.is_empty(),
                message: doc,
                points: points
                    .into_iter()
                    .map(|(device, point, desired_raw, found_raw, v, why)| PointCheck {
                        device,
                        point,
                        desired: "1".into(),
                        found: "2".into(),
                        desired_raw,
                        found_raw,
                        verdict: match v {
                            0 => Verdict::Match,
                            1 => Verdict::Differs,
                            2 => Verdict::Unreadable(why),
                            _ => Verdict::Refused(why),
                        },
                    })
                    .collect(),
                verified_ms: version / 2,
                drift_since_ms: since,
            };
            let bytes = encode(&Body::StateReport(r.clone()));
            prop_assert_eq!(decode(&bytes).unwrap(), Body::StateReport(r));
        }

        #[test]
        fn inventories_round_trip(
            eq in proptest::option::of(proptest::collection::vec((".{0,12}", ".{0,8}"), 0..6)),
            defs in proptest::collection::vec((".{1,16}", any::<u32>(), ".{0,200}"), 0..8),
        ) {
            let inv = Inventory {
                equipment: eq,
                definitions: defs
                    .into_iter()
                    .map(|(workflow, version, document)| DefinitionInfo { workflow, version, document })
                    .collect(),
            };
            let bytes = encode(&Body::Inventory(inv.clone()));
            prop_assert_eq!(decode(&bytes).unwrap(), Body::Inventory(inv));
        }

        #[test]
        fn any_records_round_trip(records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..40), first in 1u64..1_000_000) {
            let b = pack(1, first, &records);
            let back = unpack(&b).unwrap();
            prop_assert_eq!(back.len(), records.len());
            for (i, e) in back.iter().enumerate() {
                prop_assert_eq!(&e.record, &records[i]);
                prop_assert_eq!(e.seq, first + i as u64);
            }
        }
    }
}
