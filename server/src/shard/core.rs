//! [`ShardCore`]: the message path of one shard as a sans-IO state machine,
//! shaped like quinn-proto's `Connection` (decision 0016).
//!
//! Inputs are `handle_*` calls, each with the current time ([`Now`]):
//! connections opening and closing, request frames, cross-shard messages,
//! outcomes of log writes and reads, and [`ShardCore::handle_timeout`] once
//! [`ShardCore::poll_timeout`] has passed. Outputs are `poll_*` calls:
//! frames and closes for connections ([`ShardCore::poll_output`]), pushes
//! pulled per connection ([`ShardCore::poll_push`]), batches for other
//! shards ([`ShardCore::poll_outbox`]), and the log's chunks to write, records
//! to read back and segments to delete ([`ShardCore::poll_write`],
//! [`ShardCore::poll_read`], [`ShardCore::poll_reclaim`]). Nothing here reads
//! a clock, touches a socket or a file.
//!
//! The path of a Send (docs/architecture.md has the picture):
//! 1. the sender's home shard checks the session, the dedup window and the
//!    in-flight bound, assigns a server_msg_id and routes a
//!    [`ShardMessage::Store`] to the recipient's home shard (maybe itself);
//! 2. the recipient's shard appends to every device mailbox and, once the
//!    store has committed, answers [`ShardMessage::StoreOutcome`] and marks the
//!    online devices for push;
//! 3. the sender's shard records the outcome in the dedup window and sends
//!    Ack (or Error) to the sender device's current connection.

use super::codel::CoDel;
use super::dedup::{Seen, SenderWindows};
use super::inactivity::Inactivity;
use super::mailbox::{MailboxMessage, MailboxStore, Next, StoreError, Ticket};
use super::messages::{DeviceKey, Refusal, ShardMessage};
use super::presence::{PresenceLimits, PresenceTable};
use super::rate::{Rate, RateTable};
use super::StateMap;
use crate::auth::{TokenError, TokenVerifier};
use crate::storage::schedule::IoSchedule;
use iris_protocol::frames::{self, Frame, FrameKind};
use iris_protocol::{close_code, ErrorCode};
use iris_shard_map::{NodeId, ShardId, SlotTable, UserId};
use std::collections::VecDeque;
use std::rc::Rc;

mod drain;
mod presence;
mod schedule;

use schedule::Deadlines;
pub use schedule::{Now, ReadOutcome, WriteOutcome};

/// A connection, as named by the driver. Unique among the shard's live connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Who this shard is and how clients reach each shard of the node.
#[derive(Debug, Clone)]
pub struct ShardIdentity {
    /// This node.
    pub node: NodeId,
    /// This shard.
    pub shard: ShardId,
    /// Host clients use to reach this node.
    pub advertised_host: String,
    /// UDP port of every shard of this node, indexed by shard.
    pub shard_ports: Vec<u16>,
    /// Message sequence numbers this shard may use, reserved durably in its
    /// data directory (`layout::reserve_message_ids`) so that no
    /// server_msg_id repeats across restarts; the driver extends the range
    /// before it runs out ([`ShardCore::extend_message_ids`]).
    pub message_ids: std::ops::Range<u64>,
}

/// Upper bounds (ms, inclusive) of the sojourn histogram's buckets.
pub const SOJOURN_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

/// Upper bounds (ms, inclusive) of the Deliver latency histogram's buckets:
/// an online device's milliseconds up to an offline one's day.
pub const DELIVER_BUCKETS_MS: [u64; 16] = [
    1, 5, 10, 50, 100, 500, 1_000, 5_000, 10_000, 60_000, 300_000, 900_000, 3_600_000, 14_400_000, 43_200_000,
    86_400_000,
];

impl CoreStats {
    fn record_sojourn(&mut self, sojourn_ms: u64) {
        let bucket = SOJOURN_BUCKETS_MS.partition_point(|bound| *bound < sojourn_ms);
        self.sojourn_buckets[bucket] += 1;
        self.sojourn_ms_sum += sojourn_ms;
    }
}

/// Size of [`CoreStats::refused_by_code`]: above every wire error code.
pub const REFUSAL_CODES: usize = 32;

/// server_msg_id layout: shard (10 bits) | sequence (54 bits). Sequences
/// are reserved in blocks that survive restarts, so ids never repeat: 2^54
/// is 570 years at a million messages per second on one shard.
pub const MESSAGE_SEQUENCE_BITS: u32 = 54;

/// Bounds enforced by the core (storage bounds live in the store).
#[derive(Debug, Clone, Copy)]
pub struct CoreLimits {
    /// Acknowledged ids remembered per sending device.
    pub dedup_entries_per_device_max: u32,
    /// Acknowledged ids remembered by all sending devices of the shard; past
    /// it the least recent sender's are forgotten.
    pub sender_dedup_entries_max: u32,
    /// Unanswered Sends per device; over it: Throttle.
    pub sends_in_flight_per_device_max: u32,
    /// Messages buffered per destination shard, and sends in flight to
    /// each destination shard; over either: Throttle.
    pub shard_outbox_messages_max: u32,
    /// A device with no session for this long is removed; 0: never.
    pub device_inactive_expiry_s: u64,
    /// Per-sender rate limits.
    pub rates: SendRates,
    /// CoDel target sojourn of a Send (arrival to answer), ms; 0 disables.
    pub codel_target_ms: u64,
    /// CoDel interval, ms.
    pub codel_interval_ms: u64,
    /// How long a connection may take to authenticate before it is closed,
    /// so an idle unauthenticated peer cannot hold a connection slot, ms.
    pub hello_timeout_ms: u64,
    /// Group commit: how long records may wait for more before an idle log
    /// writes them, µs (0: at once).
    pub commit_delay_us: u64,
    /// Group commit: write at once when this many bytes wait.
    pub commit_bytes_max: usize,
    /// The presence table's bounds and grace period.
    pub presence: PresenceLimits,
}

/// Per-sender rate limits (token buckets, [`super::rate`]), applied on the
/// sender's home shard.
#[derive(Debug, Clone, Copy)]
pub struct SendRates {
    /// Sends of one device.
    pub device_sends: Rate,
    /// Payload bytes of one device.
    pub device_bytes: Rate,
    /// Sends of one device to one user.
    pub pair_sends: Rate,
    /// Keys each table tracks at most (devices; device -> user pairs).
    pub keys_max: u32,
}

impl SendRates {
    /// No limits (tests and benchmarks that measure the rest).
    pub const OFF: SendRates =
        SendRates { device_sends: Rate::OFF, device_bytes: Rate::OFF, pair_sends: Rate::OFF, keys_max: 0 };
}

/// Something the driver must do for a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// Write `frame` on the connection's request stream.
    Frame {
        /// Target connection.
        conn: ConnId,
        /// The frame.
        frame: Frame,
    },
    /// The connection authenticated: open its push stream.
    Authenticated {
        /// The connection.
        conn: ConnId,
    },
    /// Write these already encoded frame bytes on the connection's request
    /// stream. Answers that are the same for every client (the shard map of
    /// an epoch) are encoded once and shared.
    Encoded {
        /// Target connection.
        conn: ConnId,
        /// One or more encoded frames.
        bytes: Rc<[u8]>,
    },
    /// Finish the request stream (after `frame`, if any) and close the
    /// connection with `close_code` once the client has received it (at
    /// most [`CLOSE_GRACE_MS`] later: then [`Output::CloseNow`] follows).
    Close {
        /// Target connection.
        conn: ConnId,
        /// Error (or Redirect) to deliver before closing.
        frame: Option<Frame>,
        /// QUIC application close code ([`iris_protocol::close_code`]).
        close_code: u32,
    },
    /// Close the connection now, with `close_code`: its Hello did not come
    /// in time, or the client did not take its final frame within the grace.
    CloseNow {
        /// Target connection.
        conn: ConnId,
        /// QUIC application close code.
        close_code: u32,
        /// Why, for the CONNECTION_CLOSE reason.
        reason: &'static str,
    },
}

/// How long a closing connection waits for the client to receive the final
/// Error or Redirect before it is closed regardless.
pub const CLOSE_GRACE_MS: u64 = 1000;

/// State of a connection on this shard.
#[derive(Debug)]
pub(super) enum Session {
    /// Connected, no valid Hello yet: only Hello, ShardMapRequest and Ping
    /// are allowed, and at most [`PRE_HELLO_REQUESTS_MAX`] of the latter two.
    AwaitingHello {
        /// ShardMapRequests and Pings answered so far.
        requests: u32,
    },
    /// Authenticated as `device`, whose registration is not yet durable:
    /// Welcome waits for it (a Welcome means registered, across a crash too).
    Registering {
        /// The device.
        device: DeviceKey,
        /// When its token expires (s since the epoch).
        expires_at_s: u64,
        /// From the Hello.
        resume_after_seq: u64,
    },
    /// Authenticated as `device`.
    Active {
        /// The device.
        device: DeviceKey,
        /// When its token expires (s since the epoch): the session ends then.
        expires_at_s: u64,
        /// Highest seq written to the push stream.
        pushed_up_to: u64,
        /// Whether the connection is in `push_ready` already.
        push_queued: bool,
    },
    /// Closing after a fatal error: further frames are ignored.
    Closing,
}

/// What the recipient's shard owes once a commit covers `ticket`.
#[derive(Debug)]
struct Completion {
    /// The commit ticket that must be durable first.
    ticket: Ticket,
    /// Shard that waits for the outcome.
    origin_shard: u16,
    /// The outcome message for the origin.
    outcome: ShardMessage,
    /// Recipient devices whose sessions should be pushed to.
    devices: Vec<DeviceKey>,
}

/// Counters of the message path (exported as metrics by the driver).
#[derive(Debug, Default, Clone, Copy)]
pub struct CoreStats {
    /// Sends accepted from devices homed here.
    pub sends_accepted: u64,
    /// Messages stored in this shard's mailboxes.
    pub messages_stored: u64,
    /// Retries answered from a dedup window instead of being stored again.
    pub duplicates: u64,
    /// Sends refused with an Error.
    pub sends_refused: u64,
    /// Sends refused by a rate limit (also counted as Throttle refusals).
    pub rate_limited: u64,
    /// Sends refused because their device had its fair share in flight
    /// (also counted as Throttle refusals).
    pub unfair_refusals: u64,
    /// Sends let through unlimited because a rate table was at its bound.
    pub rate_untracked: u64,
    /// Sends refused by CoDel admission (also counted as Throttle refusals).
    pub codel_refusals: u64,
    /// CoDel dropping states entered.
    pub codel_episodes: u64,
    /// Destination shards whose CoDel controller is dropping now.
    pub codel_dropping: u64,
    /// Sojourns of this shard's answered sends (arrival to answer), counted
    /// per bucket of [`SOJOURN_BUCKETS_MS`] (the last counts the rest).
    pub sojourn_buckets: [u64; SOJOURN_BUCKETS_MS.len() + 1],
    /// Sum of those sojourns, ms.
    pub sojourn_ms_sum: u64,
    /// Sends refused, by error code (index: the code's wire value).
    pub refused_by_code: [u64; REFUSAL_CODES],
    /// Deliver frames handed to push streams.
    pub deliveries: u64,
    /// Devices removed by a RemoveDevice.
    pub devices_removed: u64,
    /// Devices removed after `device_inactive_expiry_s` without a session.
    pub devices_expired: u64,
    /// Offline devices removed because their mailbox was full while another
    /// device of the user took the message.
    pub devices_removed_overflow: u64,
    /// Sends refused because their sending user held its whole share of a
    /// recipient device's mailbox.
    pub sends_over_mailbox_share: u64,
    /// Frames handled, by kind (index: the kind's byte; below [`FRAME_KIND_SLOTS`]).
    pub frames_in: [u64; FRAME_KIND_SLOTS],
    /// Frames handed to the driver for clients, by kind (pushes included).
    pub frames_out: [u64; FRAME_KIND_SLOTS],
    /// Deliver latencies (the message's acceptance to its push), per bucket
    /// of [`DELIVER_BUCKETS_MS`] (the last counts the rest).
    pub deliver_buckets: [u64; DELIVER_BUCKETS_MS.len() + 1],
    /// Sum of those latencies, ms.
    pub deliver_ms_sum: u64,
    /// Presence frames queued for this shard's sessions.
    pub presence_events: u64,
    /// Ephemeral events shed (an overloaded path, a full outbox or queue).
    pub ephemeral_shed: u64,
    /// Typing notices queued for this shard's sessions.
    pub typing_events: u64,
}

/// Slots of the per-kind frame counters ([`CoreStats::frames_in`]).
pub const FRAME_KIND_SLOTS: usize = 32;

/// A removal waiting to be durable before anyone is told: until then the
/// removed device's sessions are parked (Closing) rather than told
/// `DeviceRemoved`, which a crash could still make untrue.
#[derive(Debug)]
struct PendingRemoval {
    /// The device removed.
    device: DeviceKey,
    /// The connection that asked, and its device (ids are reused once a
    /// connection is gone: the answer goes only to the same session).
    requester: Option<(ConnId, DeviceKey)>,
    /// Sessions of the removed device to close with `DeviceRemoved`.
    closing: Vec<ConnId>,
}

/// The message path of one shard.
#[derive(Debug)]
pub struct ShardCore<S: MailboxStore> {
    /// Counters.
    stats: CoreStats,
    /// Placement and addresses.
    identity: ShardIdentity,
    /// Slot table copy; all shards of a node share the same epoch.
    table: SlotTable,
    /// Verifies Hello tokens.
    authority: TokenVerifier,
    /// Core bounds.
    limits: CoreLimits,
    /// Frame size bound, for building Deliver frames that fit.
    frame_bytes_max: u32,
    /// Registry and mailboxes.
    store: S,
    /// Every connection of this shard. Bounded by the driver's connection bound.
    sessions: StateMap<ConnId, Session>,
    /// Device -> its current connection. At most one per device.
    online: StateMap<DeviceKey, ConnId>,
    /// Sending devices' dedup windows, within `sender_dedup_entries_max`.
    senders: SenderWindows,
    /// Each sending device's message and byte buckets.
    device_rates: RateTable<DeviceKey, 2>,
    /// Each (sending device, recipient user)'s message bucket.
    pair_rates: RateTable<(DeviceKey, u64), 1>,
    /// Pending outputs for the driver; drained every loop iteration.
    outputs: VecDeque<Output>,
    /// Connections with messages to push; each appears once (`push_queued`).
    push_ready: VecDeque<ConnId>,
    /// Messages for other shards, by shard index; each bounded by
    /// `shard_outbox_messages_max`.
    outbox: Vec<Vec<ShardMessage>>,
    /// Outcomes waiting for a commit, in ticket order.
    awaiting_commit: VecDeque<Completion>,
    /// Connections in `Session::Registering`, oldest first; each is checked
    /// after every commit. Bounded by the connections.
    registering: VecDeque<ConnId>,
    /// RemoveDevice requests waiting for the removal to be durable:
    /// (requesting connection, removed device). One per request in flight.
    removals: VecDeque<PendingRemoval>,
    /// Offline devices by how long they have been away.
    inactivity: Inactivity,
    /// The latest wall-clock time seen (s since the epoch).
    now_s: u64,
    /// The latest wall-clock time seen (ms since the epoch): `sent_at_ms`.
    wall_ms: u64,
    /// Monotonic ms ([`Now`]): sojourns and rate limits.
    clock_ms: u64,
    /// Monotonic µs: deadlines.
    clock_us: u64,
    /// Hello deadlines and close graces of connections.
    deadlines: Deadlines,
    /// When the log's next write and reads may go.
    io: IoSchedule,
    /// When inactive devices are looked for next (monotonic µs).
    upkeep_at_us: u64,
    /// Admission control over the sojourn of this shard's sends, one
    /// controller per destination shard.
    codels: Vec<CoDel>,
    /// Sends accepted here and not yet answered, per destination shard
    /// (each controller's queue).
    sends_in_flight: Vec<u64>,
    /// The committed ticket when `registering` was last checked.
    registering_checked_at: Ticket,
    /// Sequence part of the next server_msg_id.
    next_message_sequence: u64,
    /// End (exclusive) of the reserved sequences.
    message_sequence_end: u64,
    /// The ShardMap answer, encoded once (the table does not change within
    /// an epoch; one node has one epoch).
    shard_map_encoded: Rc<[u8]>,
    /// While draining ([`ShardCore::begin_drain`]): sessions that close once
    /// their Sends in flight are answered.
    draining: Option<Vec<ConnId>>,
    /// Presence of this shard's users (docs/presence.md).
    presence: PresenceTable,
    presence_limits: PresenceLimits,
    /// Presence frames waiting for each session's ephemeral stream.
    ephemeral: StateMap<ConnId, presence::EphemeralQueue>,
    /// Connections with presence frames waiting; each once.
    ephemeral_ready: VecDeque<ConnId>,
    /// Presence updates for other shards, by shard index.
    ephemeral_outbox: Vec<presence::EphemeralOutbox>,
    /// Watch and unwatch requests for other shards, by shard index.
    presence_control: Vec<presence::ControlOutbox>,
    /// Typing notices for other shards, by shard index.
    typing_outbox: Vec<presence::EphemeralOutbox>,
    /// Whether the table has the last-seen times the log recovered.
    presence_seeded: bool,
}

/// ShardMapRequests and Pings a connection may send before its Hello. A
/// client needs one shard map at most; an unauthenticated peer gets no more
/// than this many answers (~16 KiB each for the map) before it is closed.
pub const PRE_HELLO_REQUESTS_MAX: u32 = 4;
/// Upper bound on the encoded size of every answer other than the shard
/// map: Welcome, Ack, Pong, Redirect (advertised host <= 253 bytes) and Error
/// (messages are short, fixed texts with a few numbers). The driver charges
/// it against the connection's response budget before handing a frame in.
pub const SMALL_RESPONSE_BYTES_MAX: usize = 512;

/// How long a throttled client should wait before retrying, in ms.
const THROTTLE_RETRY_AFTER_MS: u32 = 100;
/// Sends in flight a device always may have, whatever its fair share.
const FAIR_SHARE_MIN: u64 = 8;
/// How long a client should wait after a storage failure, in ms.
const STORAGE_RETRY_AFTER_MS: u32 = 500;
/// How long a client should wait when a mailbox is full, in ms.
const MAILBOX_FULL_RETRY_AFTER_MS: u32 = 1000;
/// RemoveDevice requests waiting for durability per shard; past it, Throttle.
/// Each is a device, the asking connection and the removed device's
/// sessions (at most a few); removals are rare.
const REMOVALS_IN_FLIGHT_MAX: usize = 1024;

impl<S: MailboxStore> ShardCore<S> {
    /// A shard core over `store`.
    pub fn new(
        identity: ShardIdentity,
        table: SlotTable,
        authority: TokenVerifier,
        limits: CoreLimits,
        frame_bytes_max: u32,
        store: S,
    ) -> ShardCore<S> {
        assert!(usize::from(identity.shard.0) < identity.shard_ports.len(), "shard index outside the port list");
        assert!(identity.shard.0 < 1 << 10, "shard index does not fit the server_msg_id layout");
        assert!(identity.message_ids.end <= 1 << MESSAGE_SEQUENCE_BITS, "message ids beyond the layout");
        let message_ids = identity.message_ids.clone();
        let shard_count = identity.shard_ports.len();
        let shard_map = Self::shard_map_frame(&identity, &table);
        let shard_map_encoded: Rc<[u8]> = iris_protocol::encode(&shard_map, frame_bytes_max)
            .expect("the shard map fits FRAME_BYTES_MAX_FLOOR, which bounds frame_bytes_max from below")
            .into();
        ShardCore {
            stats: CoreStats::default(),
            identity,
            table,
            authority,
            limits,
            frame_bytes_max,
            store,
            sessions: StateMap::default(),
            online: StateMap::default(),
            senders: SenderWindows::new(limits.dedup_entries_per_device_max, limits.sender_dedup_entries_max),
            device_rates: RateTable::new(
                [limits.rates.device_sends, limits.rates.device_bytes],
                limits.rates.keys_max as usize,
            ),
            pair_rates: RateTable::new([limits.rates.pair_sends], limits.rates.keys_max as usize),
            outputs: VecDeque::new(),
            push_ready: VecDeque::new(),
            outbox: (0..shard_count).map(|_| Vec::new()).collect(),
            awaiting_commit: VecDeque::new(),
            registering: VecDeque::new(),
            removals: VecDeque::new(),
            inactivity: Inactivity::new(limits.device_inactive_expiry_s),
            now_s: 0,
            wall_ms: 0,
            clock_ms: 0,
            clock_us: 0,
            deadlines: Deadlines::default(),
            io: IoSchedule::new(limits.commit_delay_us, limits.commit_bytes_max),
            upkeep_at_us: 0,
            codels: vec![CoDel::new(limits.codel_target_ms, limits.codel_interval_ms); shard_count],
            sends_in_flight: vec![0; shard_count],
            registering_checked_at: 0,
            next_message_sequence: message_ids.start,
            message_sequence_end: message_ids.end,
            shard_map_encoded,
            draining: None,
            presence: PresenceTable::new(limits.presence),
            presence_limits: limits.presence,
            ephemeral: StateMap::default(),
            ephemeral_ready: VecDeque::new(),
            ephemeral_outbox: (0..shard_count).map(|_| presence::EphemeralOutbox::default()).collect(),
            presence_control: (0..shard_count).map(|_| presence::ControlOutbox::default()).collect(),
            typing_outbox: (0..shard_count).map(|_| presence::EphemeralOutbox::default()).collect(),
            presence_seeded: false,
        }
    }

    /// The most bytes of answers `frame` can make this core emit at once
    /// (later Acks of a Send are bounded by the in-flight limit instead).
    /// The driver hands a frame in only while the connection's response
    /// buffer has this much room, so no peer can make it grow past its bound.
    pub fn response_bytes_bound(&self, frame: &Frame) -> usize {
        match frame {
            Frame::ShardMapRequest(_) => self.shard_map_encoded.len(),
            _ => SMALL_RESPONSE_BYTES_MAX,
        }
    }

    /// The store (for inspection).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Counters of the message path.
    pub fn stats(&self) -> CoreStats {
        let mut stats = self.stats;
        stats.rate_untracked = self.device_rates.untracked() + self.pair_rates.untracked();
        stats.codel_refusals = self.codels.iter().map(CoDel::refusals).sum();
        stats.codel_episodes = self.codels.iter().map(CoDel::episodes).sum();
        stats.codel_dropping = self.codels.iter().filter(|codel| codel.dropping()).count() as u64;
        stats
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.sessions.len()
    }

    /// A new connection exists: it has `hello_timeout_ms` to authenticate.
    pub fn handle_connection(&mut self, conn: ConnId, now: Now) {
        self.advance(now);
        let previous = self.sessions.insert(conn, Session::AwaitingHello { requests: 0 });
        assert!(previous.is_none(), "connection id {conn:?} reused while live");
        let deadline = self.clock_us + self.limits.hello_timeout_ms * 1000;
        self.deadlines.set(conn, deadline, schedule::Deadline::Hello);
        if self.draining.is_some() {
            self.close_for_drain(conn);
        }
    }

    /// The connection is gone (closed by either side or timed out).
    pub fn handle_connection_closed(&mut self, conn: ConnId, now: Now) {
        self.advance(now);
        self.deadlines.clear(conn);
        // Connection ids are reused: a pending removal must not answer or
        // close a later connection under the same id.
        for pending in &mut self.removals {
            pending.closing.retain(|closing| *closing != conn);
            if pending.requester.is_some_and(|(asking, _)| asking == conn) {
                pending.requester = None;
            }
        }
        let session = self.sessions.remove(&conn);
        self.session_ended(conn, session);
        self.drop_ephemeral(conn);
    }

    /// `conn`'s session `session` is over (the connection closed, or is
    /// being closed): its device goes offline if this was its session.
    pub(super) fn session_ended(&mut self, conn: ConnId, session: Option<Session>) {
        match session {
            Some(Session::Active { device, .. }) if self.online.get(&device) == Some(&conn) => {
                self.online.remove(&device);
                self.device_offline(device);
            }
            // A new device whose Welcome never came is idle as well.
            Some(Session::Registering { device, .. })
                if !self.online.contains_key(&device)
                    && self.store.devices_of(device.user).contains(&device.device) =>
            {
                self.device_offline(device);
            }
            _ => {}
        }
    }

    /// `device`'s last session ended now: it is idle from now, durably.
    fn device_offline(&mut self, device: DeviceKey) {
        self.presence_offline(device);
        self.inactivity.offline(device, self.now_s);
        if self.now_s > 0 {
            self.store.note_seen(device, self.now_s, false);
        }
    }

    /// Removes devices that have had no session for
    /// `device_inactive_expiry_s` (checked at most once a minute, a bounded
    /// number per check); runs from [`ShardCore::handle_timeout`].
    fn expire_inactive(&mut self) {
        if self.inactivity.needs_seeding() {
            // Devices recovered from the log are idle since the log last saw
            // them (or, for logs without that, from now on).
            for device in self.store.registered_devices() {
                if !self.online.contains_key(&device) {
                    let since = self.store.recovered_idle_since(device).unwrap_or(self.now_s).min(self.now_s);
                    self.inactivity.seed(device, since);
                }
            }
        }
        if !self.inactivity.check_due(self.now_s) {
            return;
        }
        for device in self.inactivity.take_expired(self.now_s) {
            if self.online.contains_key(&device) {
                continue;
            }
            if let Err(error) = self.store.remove_device(device) {
                if matches!(error, StoreError::Backlog) {
                    // Another removal of its user is still being written: later.
                    self.inactivity.offline(device, self.now_s.saturating_sub(self.limits.device_inactive_expiry_s));
                }
                continue;
            }
            tracing::info!(user = device.user, device = device.device, "inactive device removed");
            self.stats.devices_expired += 1;
            let closing = self.forget_device(device, ConnId(u64::MAX));
            self.removals.push_back(PendingRemoval { device, requester: None, closing });
        }
    }

    /// The connection sent bytes that do not decode; answer and close.
    pub fn handle_decode_error(&mut self, conn: ConnId, code: ErrorCode, detail: String, now: Now) {
        self.advance(now);
        self.fail(conn, code, detail);
    }

    /// A frame arrived on `conn`'s request stream.
    pub fn handle_frame(&mut self, conn: ConnId, frame: Frame, now: Now) {
        self.advance(now);
        let now_ms = self.wall_ms;
        let Some(session) = self.sessions.get(&conn) else {
            return;
        };
        if matches!(session, Session::Closing) {
            return;
        }
        let active = matches!(session, Session::Active { .. });
        if let Session::Active { expires_at_s, .. } = session {
            // A session lives no longer than the token that opened it.
            if now_ms / 1000 >= *expires_at_s {
                let detail = format!("token expired at {expires_at_s} during the session");
                return self.fail(conn, ErrorCode::TokenExpired, detail);
            }
        }
        if let Some(Session::AwaitingHello { requests }) = self.sessions.get_mut(&conn) {
            if matches!(frame, Frame::Ping(_) | Frame::ShardMapRequest(_)) {
                *requests += 1;
                if *requests > PRE_HELLO_REQUESTS_MAX {
                    let detail = format!("more than {PRE_HELLO_REQUESTS_MAX} requests before Hello");
                    return self.fail(conn, ErrorCode::ProtocolViolation, detail);
                }
            }
        }
        self.stats.frames_in[usize::from(frame.kind() as u8) % FRAME_KIND_SLOTS] += 1;
        match frame {
            Frame::Ping(ping) => self.emit(conn, Frame::Pong(frames::Pong { nonce: ping.nonce })),
            Frame::ShardMapRequest(_) => {
                let bytes = Rc::clone(&self.shard_map_encoded);
                self.outputs.push_back(Output::Encoded { conn, bytes });
            }
            Frame::Hello(hello) if matches!(self.sessions.get(&conn), Some(Session::AwaitingHello { .. })) => {
                self.on_hello(conn, hello, now_ms)
            }
            // Draining: not taken, and not answered; the SDK sends it again
            // after it reconnects (order holds: every later one waits too).
            Frame::Send(_) | Frame::RemoveDevice(_) if active && self.draining.is_some() => {}
            Frame::Send(send) if active => self.on_send(conn, send, now_ms),
            Frame::DeliveryAck(ack) if active => self.on_delivery_ack(conn, ack.up_to_seq),
            Frame::RemoveDevice(remove) if active => self.on_remove_device(conn, remove.device_id),
            Frame::PresenceSubscribe(subscribe) if active => {
                if let Some(device) = self.active_device(conn) {
                    self.on_presence_subscribe(conn, device, &subscribe.users);
                }
            }
            Frame::PresenceUnsubscribe(unsubscribe) if active => {
                if let Some(device) = self.active_device(conn) {
                    self.on_presence_unsubscribe(device, Some(&unsubscribe.users));
                }
            }
            Frame::Typing(typing) if active => {
                if let Some(device) = self.active_device(conn) {
                    self.on_typing(device, typing.to_user, typing.active);
                }
            }
            Frame::PresencePrivacy(privacy) if active => {
                if let Some(device) = self.active_device(conn) {
                    self.on_presence_privacy(conn, device.user, privacy.privacy);
                }
            }
            Frame::Pong(_) => {}
            other => {
                let detail = format!("{:?} frame not allowed here", other.kind());
                self.fail(conn, ErrorCode::ProtocolViolation, detail);
            }
        }
    }

    fn on_hello(&mut self, conn: ConnId, hello: frames::Hello, now_ms: u64) {
        let claims = match self.authority.verify(&hello.token, now_ms / 1000) {
            Ok(claims) => claims,
            Err(TokenError::Expired { expires_at_s }) => {
                return self.fail(conn, ErrorCode::TokenExpired, format!("token expired at {expires_at_s}"));
            }
            Err(error) => return self.fail(conn, ErrorCode::InvalidToken, error.to_string()),
        };
        let home = self.table.home(UserId(claims.user_id));
        if home.node != self.identity.node || home.shard != self.identity.shard {
            let redirect = self.redirect_to(home.shard);
            self.sessions.insert(conn, Session::Closing);
            self.outputs.push_back(Output::Close { conn, frame: Some(redirect), close_code: close_code::REDIRECTED });
            return;
        }
        let device = DeviceKey { user: claims.user_id, device: claims.device_id };
        if self.store.removal_pending(device) && self.park_until_removed(conn, device) {
            return;
        }
        if let Err(error) = self.store.register_device(device) {
            return self.fail(conn, error.code(), error.to_string());
        }
        if self.store.registration_pending(device) {
            let resume_after_seq = hello.resume_after_seq;
            let expires_at_s = claims.expires_at_s;
            self.sessions.insert(conn, Session::Registering { device, expires_at_s, resume_after_seq });
            self.registering.push_back(conn);
            return;
        }
        self.welcome(conn, device, claims.expires_at_s, hello.resume_after_seq);
    }

    /// Completes a Hello whose device is durably registered.
    fn welcome(&mut self, conn: ConnId, device: DeviceKey, expires_at_s: u64, resume_after_seq: u64) {
        // Authenticated: its hello deadline ends here, whatever is polled when.
        self.deadlines.clear(conn);
        let last_seq = self.store.last_seq(device);
        if resume_after_seq > last_seq {
            // Never clamp silently: a seq the server never assigned means the
            // client (or the server's state) is wrong, and acknowledging it
            // would delete messages stored later under that seq.
            let detail = format!("resume_after_seq {resume_after_seq} is beyond this device's last seq {last_seq}");
            return self.fail(conn, ErrorCode::ResumeBeyondLastSeq, detail);
        }
        if let Some(previous) = self.online.insert(device, conn) {
            // A device has one session: the newer connection replaces the older.
            self.sessions.insert(previous, Session::Closing);
            self.outputs.push_back(Output::Close {
                conn: previous,
                frame: Some(Frame::error(ErrorCode::SessionReplaced, "replaced by a newer connection of this device")),
                close_code: close_code::REPLACED,
            });
        }
        // What the client processed can only be what some connection of it
        // was pushed; anything above is pushed again (the SDK drops repeats).
        self.inactivity.online(device);
        self.presence_online(device);
        if self.now_s > 0 {
            self.store.note_seen(device, self.now_s, true);
        }
        let resume = resume_after_seq.min(self.store.pushed_seq(device));
        self.store.acknowledge(device, resume);
        let session = Session::Active { device, expires_at_s, pushed_up_to: resume, push_queued: false };
        self.sessions.insert(conn, session);
        self.emit(
            conn,
            Frame::Welcome(frames::Welcome {
                user_id: device.user,
                device_id: device.device,
                shard: self.identity.shard.0,
                epoch: self.table.epoch(),
                last_seq,
            }),
        );
        self.outputs.push_back(Output::Authenticated { conn });
        self.queue_push(conn);
    }

    fn on_send(&mut self, conn: ConnId, send: frames::Send, now_ms: u64) {
        let Some(Session::Active { device: sender, .. }) = self.sessions.get(&conn) else {
            return;
        };
        let sender = *sender;
        let payload_max = iris_protocol::payload_bytes_max(self.frame_bytes_max);
        if send.payload.len() > payload_max {
            let detail = format!("payload of {} bytes exceeds {payload_max} bytes", send.payload.len());
            return self.refuse(conn, send.client_msg_id, ErrorCode::FrameTooLarge, 0, &detail);
        }
        match self.senders.check(sender, send.client_msg_id) {
            Seen::Acknowledged(server_msg_id) => {
                self.stats.duplicates += 1;
                let ack = Frame::Ack(frames::Ack { client_msg_id: send.client_msg_id, server_msg_id });
                return self.emit(conn, ack);
            }
            Seen::Pending => return,
            Seen::New => {}
        }
        if self.senders.pending(sender) >= self.limits.sends_in_flight_per_device_max {
            return self.refuse(
                conn,
                send.client_msg_id,
                ErrorCode::Throttle,
                THROTTLE_RETRY_AFTER_MS,
                "too many sends in flight",
            );
        }
        // Fair shares: while the shard's sends in flight fill half of what
        // one of its queues holds, a device may have only its share of
        // that half in flight (at least FAIR_SHARE_MIN), so that heavy
        // senders together cannot fill the queues and shut the light ones
        // out (docs/overload.md, "Fairness").
        let (in_flight, in_flight_devices) = self.senders.pending_totals();
        let half = u64::from(self.limits.shard_outbox_messages_max / 2);
        if in_flight >= half
            && u64::from(self.senders.pending(sender)) >= (half / in_flight_devices.max(1)).max(FAIR_SHARE_MIN)
        {
            self.stats.unfair_refusals += 1;
            let detail = "this device has its share of the shard's sends in flight";
            return self.refuse(conn, send.client_msg_id, ErrorCode::Throttle, THROTTLE_RETRY_AFTER_MS, detail);
        }
        let home = self.table.home(UserId(send.to_user));
        if home.node != self.identity.node {
            return self.refuse(conn, send.client_msg_id, ErrorCode::Internal, 0, "recipient is on another node");
        }
        let destination = home.shard.0;
        // Every send in flight to a shard gets one StoreOutcome back, which
        // that shard queues to this one outside its own Send bound: capping
        // the sends in flight per destination bounds those replies too
        // (docs/architecture.md, bounds table).
        if self.sends_in_flight[usize::from(destination)] >= u64::from(self.limits.shard_outbox_messages_max) {
            return self.refuse(
                conn,
                send.client_msg_id,
                ErrorCode::Throttle,
                THROTTLE_RETRY_AFTER_MS,
                "too many sends in flight to the recipient's shard",
            );
        }
        if destination != self.identity.shard.0
            && self.outbox[usize::from(destination)].len() >= self.limits.shard_outbox_messages_max as usize
        {
            return self.refuse(
                conn,
                send.client_msg_id,
                ErrorCode::Throttle,
                THROTTLE_RETRY_AFTER_MS,
                "shard queue full",
            );
        }
        if self.next_message_sequence >= self.message_sequence_end {
            // The driver reserves more long before this; only a disk that
            // refuses the reservation gets here.
            return self.refuse(
                conn,
                send.client_msg_id,
                ErrorCode::Throttle,
                STORAGE_RETRY_AFTER_MS,
                "message ids exhausted until the next reservation",
            );
        }
        // CoDel: while this shard's sends to the recipient's shard wait too
        // long, refuse new ones there (never one already accepted); sends to
        // other shards are not held up by one slow shard.
        let codel = &mut self.codels[usize::from(destination)];
        if !codel.admit(self.clock_ms) {
            let retry_after_ms = codel.retry_after_ms();
            let detail = "the server is overloaded (send latency above target)";
            return self.refuse(conn, send.client_msg_id, ErrorCode::Throttle, retry_after_ms, detail);
        }
        // Rate limits last, so that a send refused for anything else is not
        // charged (docs/overload.md, "Rate limits").
        let costs = [1, send.payload.len() as u64];
        if let Err(wait_ms) = self.device_rates.charge(sender, self.clock_ms, costs) {
            self.stats.rate_limited += 1;
            let detail = "this device's send rate is over its limit";
            return self.refuse(conn, send.client_msg_id, ErrorCode::Throttle, wait_ms, detail);
        }
        if let Err(wait_ms) = self.pair_rates.charge((sender, send.to_user), self.clock_ms, [1]) {
            self.device_rates.refund(sender, costs);
            self.stats.rate_limited += 1;
            let detail = "this device's send rate to this user is over its limit";
            return self.refuse(conn, send.client_msg_id, ErrorCode::Throttle, wait_ms, detail);
        }
        self.senders.begin(sender, send.client_msg_id);
        self.sends_in_flight[usize::from(destination)] += 1;
        self.stats.sends_accepted += 1;
        let server_msg_id = (u64::from(self.identity.shard.0) << MESSAGE_SEQUENCE_BITS) | self.next_message_sequence;
        self.next_message_sequence += 1;
        let store = ShardMessage::Store {
            origin_shard: self.identity.shard.0,
            sender,
            client_msg_id: send.client_msg_id,
            server_msg_id,
            sent_at_ms: now_ms,
            accepted_at_ms: self.clock_ms,
            to_user: send.to_user,
            after: send.after,
            payload: send.payload,
        };
        self.route(destination, store);
    }

    fn on_delivery_ack(&mut self, conn: ConnId, up_to_seq: u64) {
        let Some(Session::Active { device, pushed_up_to, .. }) = self.sessions.get(&conn) else {
            return;
        };
        // A client cannot acknowledge what it was never sent.
        let up_to_seq = up_to_seq.min(*pushed_up_to);
        self.store.acknowledge(*device, up_to_seq);
    }

    /// Removes a device of the session's user (itself or a sibling); the
    /// answer waits until the removal is durable.
    fn on_remove_device(&mut self, conn: ConnId, device_id: u32) {
        let Some(&Session::Active { device: own, .. }) = self.sessions.get(&conn) else { return };
        let target = DeviceKey { user: own.user, device: device_id };
        if self.removals.len() >= REMOVALS_IN_FLIGHT_MAX {
            let error = frames::Error {
                code: ErrorCode::Throttle as u16,
                message: "too many device removals in flight".into(),
                retry_after_ms: STORAGE_RETRY_AFTER_MS,
                client_msg_id: None,
            };
            return self.emit(conn, Frame::Error(error));
        }
        if let Err(error) = self.store.remove_device(target) {
            return self.emit(conn, Frame::error(error.code(), error.to_string()));
        }
        self.stats.devices_removed += 1;
        let closing = self.forget_device(target, conn);
        if target == own {
            // Nothing more is accepted on it; the answer closes it.
            self.online.remove(&own);
            self.presence_offline(own);
            self.sessions.insert(conn, Session::Closing);
        }
        self.removals.push_back(PendingRemoval { device: target, requester: Some((conn, own)), closing });
        self.answer_removals();
    }

    /// Forgets a removed device's sender state and parks its sessions other
    /// than `except` (its mailbox is gone); returns them, to be closed with
    /// `DeviceRemoved` once the removal is durable.
    fn forget_device(&mut self, device: DeviceKey, except: ConnId) -> Vec<ConnId> {
        self.senders.forget(device);
        self.inactivity.forget(device);
        let mut closing = Vec::new();
        if let Some(&conn) = self.online.get(&device) {
            if conn != except {
                self.online.remove(&device);
                self.presence_offline(device);
                self.sessions.insert(conn, Session::Closing);
                closing.push(conn);
            }
        }
        // A removed device's contact list goes with it.
        self.on_presence_unsubscribe(device, None);
        for index in 0..self.registering.len() {
            let conn = self.registering[index];
            if matches!(self.sessions.get(&conn), Some(Session::Registering { device: waiting, .. }) if *waiting == device)
            {
                self.sessions.insert(conn, Session::Closing);
                closing.push(conn);
            }
        }
        closing
    }

    /// A Hello of a device whose removal is not durable yet waits for it
    /// (then gets `DeviceRemoved`); returns false if there is no such removal.
    fn park_until_removed(&mut self, conn: ConnId, device: DeviceKey) -> bool {
        let Some(pending) = self.removals.iter_mut().find(|pending| pending.device == device) else { return false };
        pending.closing.push(conn);
        self.sessions.insert(conn, Session::Closing);
        true
    }

    /// Tells everyone concerned by removals that are now durable.
    fn answer_removals(&mut self) {
        for _ in 0..self.removals.len() {
            let Some(pending) = self.removals.pop_front() else { break };
            if self.store.removal_pending(pending.device) {
                self.removals.push_back(pending);
                continue;
            }
            let device = pending.device;
            for conn in pending.closing {
                if matches!(self.sessions.get(&conn), Some(Session::Closing)) {
                    self.outputs.push_back(Output::Close {
                        conn,
                        frame: Some(Frame::error(ErrorCode::DeviceRemoved, "this device was removed")),
                        close_code: close_code::REMOVED,
                    });
                }
            }
            let Some((conn, requester)) = pending.requester else { continue };
            let answer = Frame::DeviceRemoved(frames::DeviceRemoved { device_id: device.device });
            match self.sessions.get(&conn) {
                Some(Session::Active { device: asking, .. }) if *asking == requester => self.emit(conn, answer),
                // The device removed itself: the answer ends the session.
                Some(Session::Closing) if requester == device => {
                    self.outputs.push_back(Output::Close { conn, frame: Some(answer), close_code: close_code::REMOVED })
                }
                _ => {} // closed meanwhile
            }
        }
    }

    /// A message from shard `from`.
    pub fn handle_shard_message(&mut self, from: u16, message: ShardMessage, now: Now) {
        self.advance(now);
        self.on_shard_message(from, message);
    }

    /// A message from shard `from` (or from this shard itself).
    fn on_shard_message(&mut self, from: u16, message: ShardMessage) {
        match message {
            message @ (ShardMessage::PresenceWatch { .. }
            | ShardMessage::PresenceUnwatch { .. }
            | ShardMessage::PresenceUpdate { .. }
            | ShardMessage::Typing { .. }) => self.on_presence_message(message),
            ShardMessage::Store {
                origin_shard,
                sender,
                client_msg_id,
                server_msg_id,
                sent_at_ms,
                accepted_at_ms,
                to_user,
                after,
                payload,
            } => {
                debug_assert_eq!(origin_shard, from);
                let home = self.table.home(UserId(to_user));
                assert_eq!(home.shard, self.identity.shard, "Store for user {to_user} routed to the wrong shard");
                let stored = MailboxMessage {
                    from_user: sender.user,
                    from_device: sender.device,
                    client_msg_id,
                    server_msg_id,
                    sent_at_ms,
                    to_user,
                    payload,
                };
                let payload_bytes = u32::try_from(stored.payload.len()).unwrap_or(u32::MAX);
                let (result, ticket, devices) = self.store_for_user(sender, to_user, after, stored);
                let outcome = ShardMessage::StoreOutcome {
                    sender,
                    accepted_at_ms,
                    to_user,
                    payload_bytes,
                    client_msg_id,
                    result,
                };
                self.awaiting_commit.push_back(Completion { ticket, origin_shard, outcome, devices });
            }
            ShardMessage::StoreOutcome { sender, accepted_at_ms, to_user, payload_bytes, client_msg_id, result } => {
                // `from` is the recipient's shard: its controller sees the sojourn.
                let destination = usize::from(from);
                let sojourn_ms = self.clock_ms.saturating_sub(accepted_at_ms);
                if let Some(codel) = self.codels.get_mut(destination) {
                    codel.on_sojourn(self.clock_ms, sojourn_ms, result.is_ok());
                }
                self.stats.record_sojourn(sojourn_ms);
                if let Some(in_flight) = self.sends_in_flight.get_mut(destination) {
                    *in_flight = in_flight.saturating_sub(1);
                    if *in_flight == 0 {
                        self.codels[destination].on_idle();
                    }
                }
                if result.is_err_and(|refusal| refusal.code.is_retryable()) {
                    // Not stored, for a reason that passes (a full mailbox,
                    // an earlier send not stored yet, the server's load): it
                    // costs the sender no rate tokens, its retry is charged
                    // again. Final refusals (an unknown recipient) keep them.
                    self.device_rates.refund(sender, [1, u64::from(payload_bytes)]);
                    self.pair_rates.refund((sender, to_user), [1]);
                }
                self.senders.finish(sender, client_msg_id, result.ok());
                let Some(&conn) = self.online.get(&sender) else {
                    return;
                };
                match result {
                    Ok(server_msg_id) => self.emit(conn, Frame::Ack(frames::Ack { client_msg_id, server_msg_id })),
                    Err(refusal) => {
                        let message = format!("send refused: {:?}", refusal.code);
                        self.refuse(conn, client_msg_id, refusal.code, refusal.retry_after_ms, &message)
                    }
                }
            }
        }
    }

    /// Appends one message to every device of `to_user`, all or nothing.
    /// Returns the outcome, the ticket that must commit before answering, and
    /// the devices to push to.
    fn store_for_user(
        &mut self,
        sender: DeviceKey,
        to_user: u64,
        after: Option<u64>,
        message: MailboxMessage,
    ) -> (Result<u64, Refusal>, Ticket, Vec<DeviceKey>) {
        let committed = self.store.committed_ticket();
        let mut devices: Vec<DeviceKey> = self
            .store
            .devices_of(to_user)
            .iter()
            .map(|&device| DeviceKey { user: to_user, device })
            .filter(|device| *device != sender)
            .collect();
        // A retry of a message this shard already stored (the sender may have
        // lost its Ack to a crash or a reconnect): answer with the original
        // id once the original is committed.
        if let Some((server_msg_id, ticket)) = self.store.find_stored(sender, message.client_msg_id) {
            self.stats.duplicates += 1;
            return (Ok(server_msg_id), ticket, devices);
        }
        let refuse = |code, retry_after_ms| (Err(Refusal { code, retry_after_ms }), committed, Vec::new());
        // Order per sender device -> recipient (docs/protocol.md, "Order"):
        // a Send waits for the earlier one it names. That one is in the
        // index from the moment it was appended; if its write fails, every
        // change appended before the store learned of it fails too (the log
        // store's failure fence), this one included.
        if after.is_some_and(|after| self.store.find_stored(sender, after).is_none()) {
            return refuse(ErrorCode::OutOfOrder, 0);
        }
        if devices.is_empty() {
            return refuse(ErrorCode::UnknownRecipient, 0);
        }
        // The shard-wide budget first: when every mailbox together is at it,
        // no device is to blame (and none is removed).
        if self.store.shard_has_room(message.payload.len(), devices.len()).is_err() {
            return refuse(ErrorCode::Throttle, MAILBOX_FULL_RETRY_AFTER_MS);
        }
        // A full mailbox of one device must not make its user unreachable
        // (decision 0012): an offline device whose mailbox is full is removed
        // when another device of the user takes the message (like a
        // messenger unlinking a companion device that stopped syncing).
        // When every device is full, or a full one is online (draining),
        // the send is refused: explicit backpressure, retried later.
        //
        // One sender cannot bring that about alone: each sending user may
        // hold only its share of a mailbox, and a sender over its share is
        // refused (it is the one flooding) while nobody is removed for it.
        let mut full = Vec::new();
        for device in &devices {
            match self.store.has_room(*device, message.from_user, message.payload.len()) {
                Ok(()) => {}
                Err(StoreError::SenderShareFull { .. }) => {
                    self.stats.sends_over_mailbox_share += 1;
                    return refuse(ErrorCode::MailboxFull, MAILBOX_FULL_RETRY_AFTER_MS);
                }
                Err(_) => full.push(*device),
            }
        }
        if !full.is_empty() {
            let keeps_up = full.iter().any(|device| self.online.contains_key(device));
            if keeps_up || full.len() == devices.len() {
                return refuse(ErrorCode::MailboxFull, MAILBOX_FULL_RETRY_AFTER_MS);
            }
            devices.retain(|device| !full.contains(device));
        }
        let server_msg_id = message.server_msg_id;
        let ticket = match self.store.store_message(Rc::new(message), &devices) {
            Ok(ticket) => ticket,
            // Not taken by anyone: nobody is removed for it either.
            Err(error) => return refuse(error.code(), STORAGE_RETRY_AFTER_MS),
        };
        self.stats.messages_stored += 1;
        for device in full {
            if self.store.remove_device(device).is_ok() {
                tracing::warn!(
                    user = device.user,
                    device = device.device,
                    "offline device with a full mailbox removed"
                );
                self.stats.devices_removed_overflow += 1;
                let closing = self.forget_device(device, ConnId(u64::MAX));
                self.removals.push_back(PendingRemoval { device, requester: None, closing });
            }
        }
        (Ok(server_msg_id), ticket, devices)
    }

    /// Releases everything the store has committed: answers to origins and
    /// pushes to online recipients. Runs before outputs are polled, so one
    /// pass covers every commit since the last.
    fn flush_commits(&mut self) {
        // Registrations become durable only with a commit: look again only then.
        let committed = self.store.committed_ticket();
        let commit_moved = committed != self.registering_checked_at;
        self.registering_checked_at = committed;
        for _ in 0..if commit_moved { self.registering.len() } else { 0 } {
            let Some(conn) = self.registering.pop_front() else { break };
            let Some(&Session::Registering { device, expires_at_s, resume_after_seq }) = self.sessions.get(&conn)
            else {
                continue; // closed meanwhile
            };
            if self.store.registration_pending(device) {
                self.registering.push_back(conn);
            } else {
                self.welcome(conn, device, expires_at_s, resume_after_seq);
            }
        }
        if !self.removals.is_empty() {
            self.answer_removals();
        }
        let committed = self.store.committed_ticket();
        while self.awaiting_commit.front().is_some_and(|c| c.ticket <= committed) {
            let Some(mut completion) = self.awaiting_commit.pop_front() else {
                break;
            };
            if self.store.ticket_failed(completion.ticket) {
                // The write that held this message failed: nothing was
                // stored, so the sender is told to retry.
                if let ShardMessage::StoreOutcome { result, .. } = &mut completion.outcome {
                    if result.is_ok() {
                        *result = Err(Refusal {
                            code: ErrorCode::StorageUnavailable,
                            retry_after_ms: STORAGE_RETRY_AFTER_MS,
                        });
                    }
                }
                completion.devices.clear();
            }
            for device in &completion.devices {
                if let Some(&conn) = self.online.get(device) {
                    self.queue_push(conn);
                }
            }
            self.route(completion.origin_shard, completion.outcome);
        }
    }

    fn route(&mut self, shard: u16, message: ShardMessage) {
        if shard == self.identity.shard.0 {
            self.on_shard_message(shard, message);
        } else {
            self.outbox[usize::from(shard)].push(message);
        }
    }

    /// Takes up to `messages_max` queued messages for `shard`, oldest first.
    pub fn poll_outbox(&mut self, shard: u16, messages_max: usize) -> Vec<ShardMessage> {
        self.flush_commits();
        let queue = &mut self.outbox[usize::from(shard)];
        let count = queue.len().min(messages_max);
        let mut batch: Vec<ShardMessage> = queue.drain(..count).collect();
        self.take_ephemeral(shard, &mut batch, messages_max);
        batch
    }

    /// The channel to `shard` refused `batch`: it goes back ahead of newer
    /// messages, each class into its own queue (presence coalesces again).
    pub fn handle_outbox_refused(&mut self, shard: u16, batch: Vec<ShardMessage>) {
        let (presence, durable): (Vec<ShardMessage>, Vec<ShardMessage>) =
            batch.into_iter().partition(presence::is_presence_message);
        let queue = &mut self.outbox[usize::from(shard)];
        let newer = std::mem::replace(queue, durable);
        queue.extend(newer);
        self.requeue_presence(shard, presence);
    }

    /// Whether any shard has messages waiting.
    pub fn outbox_pending(&self) -> bool {
        self.outbox.iter().any(|queue| !queue.is_empty()) || self.presence_pending()
    }

    /// The device of `conn`'s session, if it is active.
    fn active_device(&self, conn: ConnId) -> Option<DeviceKey> {
        match self.sessions.get(&conn) {
            Some(Session::Active { device, .. }) => Some(*device),
            _ => None,
        }
    }

    /// Next output for the driver. A close starts the connection's grace.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.flush_commits();
        let output = self.outputs.pop_front()?;
        let kind = match &output {
            Output::Frame { frame, .. } | Output::Close { frame: Some(frame), .. } => Some(frame.kind()),
            Output::Encoded { .. } => Some(frames::FrameKind::ShardMap),
            _ => None,
        };
        if let Some(kind) = kind {
            self.stats.frames_out[usize::from(kind as u8) % FRAME_KIND_SLOTS] += 1;
        }
        match &output {
            Output::Close { conn, close_code, .. } => {
                let grace = schedule::Deadline::Grace { close_code: *close_code };
                self.deadlines.set(*conn, self.clock_us + CLOSE_GRACE_MS * 1000, grace);
            }
            Output::CloseNow { conn, .. } => self.deadlines.clear(*conn),
            _ => {}
        }
        Some(output)
    }

    /// Next connection with messages to push.
    pub fn poll_push_ready(&mut self) -> Option<ConnId> {
        self.flush_commits();
        let conn = self.push_ready.pop_front()?;
        if let Some(Session::Active { push_queued, .. }) = self.sessions.get_mut(&conn) {
            *push_queued = false;
        }
        Some(conn)
    }

    /// The next committed message for `conn`'s push stream, or `None` when
    /// it is up to date. The driver calls this while the stream has room.
    pub fn poll_push(&mut self, conn: ConnId) -> Option<Frame> {
        let Some(Session::Active { device, pushed_up_to, .. }) = self.sessions.get_mut(&conn) else {
            return None;
        };
        let (seq, message) = match self.store.next_after(*device, *pushed_up_to)? {
            Next::Ready(seq, message) => (seq, message),
            Next::Cold(_) => {
                // Read back from the log; `on_read` queues this push again.
                let (device, after) = (*device, *pushed_up_to);
                self.store.want_bodies(device, after);
                return None;
            }
        };
        *pushed_up_to = seq;
        let device = *device;
        self.store.note_pushed(device, seq);
        self.stats.deliveries += 1;
        self.stats.frames_out[FrameKind::Deliver as usize] += 1;
        let latency_ms = self.wall_ms.saturating_sub(message.sent_at_ms);
        self.stats.deliver_buckets[DELIVER_BUCKETS_MS.partition_point(|bound| *bound < latency_ms)] += 1;
        self.stats.deliver_ms_sum += latency_ms;
        Some(Frame::Deliver(frames::Deliver {
            seq,
            from_user: message.from_user,
            from_device: message.from_device,
            server_msg_id: message.server_msg_id,
            sent_at_ms: message.sent_at_ms,
            payload: message.payload.clone(),
        }))
    }

    fn queue_push(&mut self, conn: ConnId) {
        if let Some(Session::Active { push_queued, .. }) = self.sessions.get_mut(&conn) {
            if !*push_queued {
                *push_queued = true;
                self.push_ready.push_back(conn);
            }
        }
    }

    fn emit(&mut self, conn: ConnId, frame: Frame) {
        self.outputs.push_back(Output::Frame { conn, frame });
    }

    fn refuse(&mut self, conn: ConnId, client_msg_id: u64, code: ErrorCode, retry_after_ms: u32, message: &str) {
        self.stats.sends_refused += 1;
        if let Some(count) = self.stats.refused_by_code.get_mut(code as usize) {
            *count += 1;
        }
        self.emit(
            conn,
            Frame::Error(frames::Error {
                code: code as u16,
                message: message.into(),
                retry_after_ms,
                client_msg_id: Some(client_msg_id),
            }),
        );
    }

    /// Sends a fatal error and closes the connection.
    fn fail(&mut self, conn: ConnId, code: ErrorCode, detail: String) {
        // In the connection's span (the driver's), so it names the peer.
        tracing::debug!(?code, %detail, "closing the connection");
        if let Some(Session::Active { device, .. }) = self.sessions.get(&conn) {
            if self.online.get(device) == Some(&conn) {
                let device = *device;
                self.online.remove(&device);
                self.device_offline(device);
            }
        }
        if self.sessions.contains_key(&conn) {
            self.sessions.insert(conn, Session::Closing);
        }
        let close_code = match code {
            ErrorCode::DeviceRemoved => close_code::REMOVED,
            _ => close_code::PROTOCOL_ERROR,
        };
        self.outputs.push_back(Output::Close { conn, frame: Some(Frame::error(code, detail)), close_code });
    }

    fn redirect_to(&self, shard: ShardId) -> Frame {
        Frame::Redirect(frames::Redirect {
            epoch: self.table.epoch(),
            address: self.identity.advertised_host.clone(),
            port: self.identity.shard_ports[usize::from(shard.0)],
        })
    }

    fn shard_map_frame(identity: &ShardIdentity, table: &SlotTable) -> Frame {
        Frame::ShardMap(frames::ShardMap {
            epoch: table.epoch(),
            nodes: vec![frames::NodeEntry {
                node_id: identity.node.0,
                address: identity.advertised_host.clone(),
                shard_ports: identity.shard_ports.clone(),
            }],
            slots: table
                .owners()
                .iter()
                .map(|owner| frames::SlotOwner { node: owner.node.0, shard: owner.shard.0 })
                .collect(),
        })
    }

    /// Message ids left in the current reservation.
    pub fn message_ids_left(&self) -> u64 {
        self.message_sequence_end - self.next_message_sequence
    }

    /// The sequence the next server_msg_id gets.
    pub fn next_message_sequence(&self) -> u64 {
        self.next_message_sequence
    }

    /// The end of the current message id reservation.
    pub fn message_id_end(&self) -> u64 {
        self.message_sequence_end
    }

    /// The end of the current message id reservation once fewer than half
    /// of a `block` of ids is left in it (time to reserve the next block
    /// from there), `None` before.
    pub fn message_id_extension(&self, block: u64) -> Option<u64> {
        (self.message_ids_left() < block / 2).then_some(self.message_sequence_end)
    }

    /// Continues the reservation up to `end` (durably reserved by the caller).
    pub fn extend_message_ids(&mut self, end: u64) {
        assert!(end >= self.message_sequence_end, "a reservation only grows");
        assert!(end <= 1 << MESSAGE_SEQUENCE_BITS, "message ids beyond the layout");
        self.message_sequence_end = end;
    }

    /// Messages waiting in the outboxes for other shards.
    pub fn outbox_messages(&self) -> u64 {
        self.outbox.iter().map(|messages| messages.len() as u64).sum()
    }

    /// The store's seqs against their durable reservation
    /// ([`MailboxStore::seq_reservation`]).
    pub fn seq_reservation(&self) -> Option<crate::shard::mailbox::SeqReservation> {
        self.store.seq_reservation()
    }

    /// Moves the seq reservation's end to `end` (durably reserved by the caller).
    pub fn extend_seq_reservation(&mut self, end: u64) {
        self.store.extend_seq_reservation(end);
    }

    /// This shard's index on its node.
    pub fn shard_index(&self) -> u16 {
        self.identity.shard.0
    }

    /// The frame size bound this core was built with.
    pub fn frame_bytes_max(&self) -> u32 {
        self.frame_bytes_max
    }
}

#[cfg(test)]
mod tests;
