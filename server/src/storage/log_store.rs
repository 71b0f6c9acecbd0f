//! [`LogStore`]: the durable [`MailboxStore`]. Pure: it encodes every change
//! as a log record into pending write chunks, decides the segment layout,
//! and learns from the driver which chunks reached the disk. The driver
//! (`crate::driver::log_writer`) does the I/O.
//!
//! Segments: records never span segments. When appending a record would push
//! the current segment past `segment_bytes_max`, the store starts the next
//! one. A sealed segment is deleted once it holds no undelivered message, no
//! device's newest durable state ([`StateHomes`]) and no dedup key still in
//! the window; compaction copies what a mostly dead segment still holds
//! (messages, and a `DeviceState` or `DeviceRemoved` per device whose state
//! lives there) to the head of the log so it can go. Checkpointing is
//! incremental: no write ever covers every device.

use super::io::{LogIo, WriteChunk};
use super::last_seen::{LastSeen, Seen};
use super::record::{
    chunk_framing_bytes, decode_record, encode_record, Acknowledged, DeviceRegistered, DeviceRemoved, DeviceSeen,
    DeviceState, MessageStored, RecipientSeq, Record, Scan, RECORD_HEADER_BYTES,
};
use super::state_homes::{StateHomes, StateKind};
use crate::shard::mailbox::{
    MailboxEntry, MailboxIndex, MailboxMessage, MailboxStore, Next, RecordAt, SeqReservation, StoreError, StoreLimits,
    StoreStats, Ticket,
};
use crate::shard::DeviceKey;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

/// Layout bounds of the log.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    /// A segment is closed once it holds this many bytes.
    pub segment_bytes_max: u64,
    /// A write chunk is closed once it holds this many bytes (one write + one
    /// fdatasync each).
    pub commit_bytes_max: usize,
    /// Payload bytes of durable mailbox entries kept in memory (the body
    /// cache); past it the bodies held longest go ("cold") and are read back
    /// from the log when they are pushed.
    pub body_cache_bytes_max: u64,
    /// Bodies read back and not pushed yet, plus reads in flight, at most
    /// (the read-ahead); past it the oldest read-back bodies are let go.
    pub read_ahead_bytes_max: u64,
    /// Disk the log may take (its segments and the spare being prepared);
    /// new messages are refused with Throttle once it does.
    pub disk_bytes_max: u64,
}

impl LogLimits {
    /// Layout bounds with every body kept in memory and no disk budget
    /// (tests that look at the layout alone).
    pub const fn keep_bodies(segment_bytes_max: u64, commit_bytes_max: usize) -> LogLimits {
        LogLimits {
            segment_bytes_max,
            commit_bytes_max,
            body_cache_bytes_max: u64::MAX,
            read_ahead_bytes_max: 16 << 20,
            disk_bytes_max: u64::MAX,
        }
    }
}

/// What recovery found, for the start-up log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments read.
    pub segments: usize,
    /// Valid records replayed.
    pub records: u64,
    /// Corrupt records skipped.
    pub corrupt_records: u64,
    /// Bytes cut off torn tails.
    pub torn_bytes: u64,
    /// Registered devices after replay.
    pub devices: u64,
    /// Undelivered (device, message) entries after replay.
    pub live_entries: u64,
    /// Largest payload among the undelivered messages: a configuration whose
    /// frames cannot carry it is refused at start (it could never be pushed).
    pub live_payload_bytes_max: usize,
}

impl RecoveryReport {
    /// Recovery skipped damaged chunks or cut a torn tail. After a crash a
    /// torn tail holds unacknowledged writes only, but bit rot in the last
    /// chunks looks the same, so either may have lost a device's newest seq
    /// (the seq floor rises: `layout::seq_floor`).
    pub fn lost_bytes(&self) -> bool {
        self.corrupt_records > 0 || self.torn_bytes > 0
    }
}

/// The durable store of one shard.
#[derive(Debug)]
pub struct LogStore {
    /// Registry, mailboxes, dedup window.
    index: MailboxIndex,
    /// Layout bounds.
    limits: LogLimits,
    /// Segment that new records go to.
    current_segment: u64,
    /// Bytes assigned to `current_segment` (written or pending).
    current_segment_bytes: u64,
    /// Chunks not yet handed to the writer, oldest first.
    pending: VecDeque<WriteChunk>,
    /// Bytes in `pending`; new messages are refused past `PENDING_BYTES_MAX`.
    pending_bytes: usize,
    /// Last ticket handed out.
    last_ticket: Ticket,
    /// Every ticket up to here has an outcome.
    committed: Ticket,
    /// Where each device's newest durable state lives.
    homes: StateHomes,
    /// The last ticket appended to each segment on disk: a segment is
    /// reclaimed or compacted only once all of it has an outcome.
    segment_last_ticket: BTreeMap<u64, Ticket>,
    /// Ticket ranges whose chunk failed, kept until the core has seen them.
    failed: VecDeque<(Ticket, Ticket)>,
    /// Mailbox entries whose change is not durable yet, oldest first:
    /// (ticket, device, seq). A failed chunk removes exactly these (it once
    /// scanned every mailbox); bounded by the records waiting for the writer.
    uncommitted_entries: VecDeque<(Ticket, DeviceKey, u64)>,
    /// Undelivered mailbox entries per segment, for reclaim and compaction.
    /// Segments with no entry here but on disk hold no live message.
    live_by_segment: BTreeMap<u64, SegmentLive>,
    /// The compaction whose copies are being written, if any.
    compaction: Option<Compaction>,
    /// Segments that exist on disk (recovered or written), ascending.
    on_disk: std::collections::BTreeSet<u64>,
    /// (segment, offset) where the last durable chunk ended: where the
    /// writer appends next in that segment (a failed write is cut back to it).
    durable_end: (u64, u64),
    /// (last ticket, segment, file end) of each chunk taken by the writer
    /// and not yet answered, oldest first.
    taken_ends: VecDeque<(Ticket, u64, u64)>,
    /// Corrupt records seen (recovery), for the metric.
    corrupt_records: u64,
    /// Messages remembered by the recipient-side dedup window so far.
    stored_count: u64,
    /// Per segment, the `stored_count` of the newest message whose record
    /// (and so whose dedup key) is in it. A segment is not reclaimed while
    /// that message is still in the in-memory window: otherwise a retry after
    /// a restart would not be recognised and would be stored twice (found by
    /// the simulation). Holds at most one entry per segment on disk.
    newest_stored_by_segment: BTreeMap<u64, u64>,
    /// Registrations not yet durable, with the ticket of their record.
    /// Bounded by the Hellos of new devices in flight.
    registrations_pending: VecDeque<(Ticket, DeviceKey)>,
    /// Removals not yet durable, with the ticket of their record.
    removals_pending: VecDeque<(Ticket, DeviceKey)>,
    /// How many records in `removals_pending` each device has, so that
    /// `removal_pending` is one lookup (the core asks once per pending
    /// removal on every pass).
    removing_devices: std::collections::HashMap<DeviceKey, u32, foldhash::fast::RandomState>,
    /// The devices in `registrations_pending` (each at most once).
    registering_devices: std::collections::HashSet<DeviceKey, foldhash::fast::RandomState>,
    /// Bodies read back from the log, their reads and the body cache.
    bodies: Bodies,
    /// When each device was last seen.
    last_seen: LastSeen,
    /// [`LogStore::held_disk_bytes`] as of (committed ticket, segments on
    /// disk, segments with live entries): recounted only when one moves,
    /// not on every send made at the budget.
    held_disk_cache: Option<((Ticket, usize, usize), u64)>,
    /// End of the durable seq reservation ([`MailboxStore::seq_reservation`]);
    /// `u64::MAX` until the driver sets one (a store no start reserved for).
    seq_end: u64,
}

/// The bodies of mailbox entries that are not in the index: the order in
/// which entries' bodies came into memory (for cooling), the bodies read
/// back and not pushed yet (read-ahead), and the reads in flight.
#[derive(Debug, Default)]
struct Bodies {
    /// Entries whose body is in memory, oldest first: (device, seq, ticket).
    /// Entries acknowledged or cooled since stay until they reach the front
    /// or the queue is compacted (when it holds twice the hot entries).
    hot_order: VecDeque<(DeviceKey, u64, Ticket)>,
    /// Bodies read back, by (device, seq).
    staged: HashMap<(DeviceKey, u64), Rc<MailboxMessage>>,
    /// Keys of `staged`, oldest first (stale keys are skipped).
    staged_order: VecDeque<(DeviceKey, u64)>,
    /// Payload bytes in `staged`.
    staged_bytes: u64,
    /// Reads asked for and not answered, by (segment, offset).
    reading: HashMap<(u64, u64), Reading>,
    /// Record bytes of the reads in `reading` that pushes asked for first.
    reading_bytes: u64,
    /// Record bytes of the reads in `reading` that a compaction asked for
    /// first (kept here, not in the `Loading`, so that replacing one never
    /// loses track of its reads).
    compaction_reading_bytes: u64,
    /// Reads not yet taken by the driver, oldest first.
    queue: VecDeque<RecordAt>,
    /// Devices whose push waits for a read slot, oldest first (each once:
    /// `starving`); a few are woken per completed read.
    starved: VecDeque<DeviceKey>,
    starving: HashSet<DeviceKey>,
    /// A compaction waiting for the bodies of its cold entries.
    loading: Option<Loading>,
    /// The generation the next `Loading` gets.
    next_generation: u64,
    /// Segments whose compaction gave up on failing reads (until reclaimed).
    compaction_skips: std::collections::BTreeSet<u64>,
    /// Reads completed, failed, and messages dropped as unreadable.
    reads_total: u64,
    read_failures_total: u64,
    unreadable_total: u64,
    /// Bodies let go from the cache.
    cooled_total: u64,
    /// Compactions made durable.
    compactions_total: u64,
    /// Mailbox entries those compactions moved.
    compacted_messages_total: u64,
}

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// One read in flight.
#[derive(Debug)]
struct Reading {
    /// Its record bytes.
    bytes: u32,
    /// The entries it was asked for: (device, seq, whether the device's
    /// push waits for it).
    wanted: Vec<(DeviceKey, u64, bool)>,
    /// The generation of the `Loading` that waits for it, if any.
    compaction: Option<u64>,
    /// Whether its bytes count in `compaction_reading_bytes` (a compaction
    /// asked for it first) rather than against the read-ahead.
    compaction_bytes: bool,
}

/// Bodies gathered for compacting segment `from` (at most a quarter
/// segment of live data: what makes a segment a candidate).
#[derive(Debug)]
struct Loading {
    from: u64,
    /// Bodies read, by (segment, offset) of their record.
    bodies: HashMap<(u64, u64), Rc<MailboxMessage>>,
    /// Payload bytes of `bodies`.
    bytes: u64,
    /// Tells its reads from those of a `Loading` it replaced.
    generation: u64,
    /// Cold records still to ask for, in offset order.
    pending: VecDeque<RecordAt>,
    /// Reads of it in flight.
    in_flight: usize,
    /// Reads of it that failed; past [`COMPACTION_READ_FAILURES_MAX`] the
    /// segment is left alone until it is reclaimed.
    failures: u32,
}

/// Reads in flight at most (each one record).
const READS_IN_FLIGHT_MAX: usize = 256;
/// Cold entries of one device asked for at once: the first, which its
/// push waits for, and the next ones (read-ahead).
const READ_AHEAD_ENTRIES: usize = 64;
/// Reads a compaction keeps in flight (beside the pushes' 256).
const COMPACTION_READS_IN_FLIGHT: usize = 64;
/// Reads a store asks for at most at once: pushes stop asking at
/// `READS_IN_FLIGHT_MAX + COMPACTION_READS_IN_FLIGHT` reads in all, and a
/// compaction adds at most `COMPACTION_READS_IN_FLIGHT` of its own. The
/// driver's completion channel holds this many.
pub const READS_OUTSTANDING_MAX: usize = READS_IN_FLIGHT_MAX + 2 * COMPACTION_READS_IN_FLIGHT;
/// Starved devices woken per completed read (each read frees one slot;
/// waking a few more keeps the queue moving without a herd). All are woken
/// once no push's read is left in flight, as none of them can starve then.
const STARVED_WOKEN_PER_READ: usize = 4;
/// Failed reads after which a compaction gives its segment up (a sector
/// that keeps failing must not stop every other compaction).
const COMPACTION_READ_FAILURES_MAX: u32 = 8;

/// The log record of `message` stored for `recipients`.
/// At least the encoded size of a `MessageStored` record with
/// `payload_bytes` and `recipients` (what recovery reads back for one,
/// since the scan keeps offsets, not sizes). Checked against the encoder
/// by `a_message_record_fits_its_size_bound`.
pub fn message_record_bytes_max(payload_bytes: usize, recipients: usize) -> u32 {
    let bound = RECORD_HEADER_BYTES + 96 + payload_bytes + 16 * recipients;
    u32::try_from(bound).unwrap_or(u32::MAX)
}

/// The message a `MessageStored` record holds, with `payload` (its own,
/// moved or copied out by the caller).
fn stored_message(record: &MessageStored, payload: Vec<u8>) -> MailboxMessage {
    MailboxMessage {
        from_user: record.from_user,
        from_device: record.from_device,
        client_msg_id: record.client_msg_id,
        server_msg_id: record.server_msg_id,
        sent_at_ms: record.sent_at_ms,
        to_user: record.to_user,
        payload,
    }
}

/// The record of `message` stored for `recipients`; a compaction's copy
/// (`copied`) is a `MessageCopied`.
fn message_record(message: &MailboxMessage, recipients: Vec<RecipientSeq>, copied: bool) -> Record {
    let record = MessageStored {
        server_msg_id: message.server_msg_id,
        from_user: message.from_user,
        from_device: message.from_device,
        client_msg_id: message.client_msg_id,
        sent_at_ms: message.sent_at_ms,
        to_user: message.to_user,
        recipients,
        payload: message.payload.clone(),
    };
    if copied {
        Record::MessageCopied(record)
    } else {
        Record::MessageStored(record)
    }
}

/// What one undelivered (device, message) entry counts as live in its
/// segment: the payload plus the record around it (header, CRC, fields, a
/// recipient entry; 128 bytes bounds them). Counting the payload alone made
/// segments of small messages look almost empty, so their compacted copies
/// filled the head segment, which looked almost empty in turn: compaction
/// copied the same messages forward forever (found by the simulation).
fn live_bytes(payload_bytes: usize) -> u64 {
    payload_bytes as u64 + LIVE_RECORD_OVERHEAD_BYTES
}

/// See [`live_bytes`].
const LIVE_RECORD_OVERHEAD_BYTES: u64 = 128;

/// Live data of one segment.
#[derive(Debug, Default, Clone)]
struct SegmentLive {
    /// The undelivered (device, seq) entries it holds, so compaction visits
    /// only these (it once scanned every mailbox of the shard). About 30
    /// bytes per undelivered entry.
    members: hashbrown::HashSet<(DeviceKey, u64), foldhash::fast::RandomState>,
    /// Their [`live_bytes`] (a message for two devices counts twice).
    bytes: u64,
}

/// A segment whose live messages are being copied to the head of the log.
#[derive(Debug)]
struct Compaction {
    /// The mostly dead segment.
    from: u64,
    /// The last ticket of the copies; when it is durable the entries move.
    last_ticket: Ticket,
    /// (device, seq, payload bytes, where the copy went).
    moves: Vec<(DeviceKey, u64, u64, RecordAt)>,
}

/// A sealed segment whose live payload is below this fraction of
/// `segment_bytes_max` (1/4) is compacted: copying at most a quarter segment
/// frees a whole one, so disk use stays under ~1.33x the live data plus the
/// segments still filling.
const COMPACT_LIVE_FRACTION_DIVISOR: u64 = 4;

/// What carrying one device's state forward costs in a compaction pass
/// (a `DeviceState` record with its header), for choosing what to compact.
const CARRIED_STATE_BYTES: u64 = 64;

/// Bytes of records waiting for the writer beyond which new messages are
/// refused with Throttle: 64 MiB is about 20 s of a disk that stalls at
/// full load before memory would grow further; acks and registrations are
/// still logged (they are small and bounded by the sessions).
const PENDING_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Failed ranges remembered; the core checks them in the same loop
/// iteration in which a failure is reported, so a few are plenty.
const FAILED_RANGES_MAX: usize = 256;

/// Removes from `pending` the devices whose record has a ticket in
/// `first..=last` (a failed chunk) and returns them, in order.
fn take_tickets_in(pending: &mut VecDeque<(Ticket, DeviceKey)>, first: Ticket, last: Ticket) -> Vec<DeviceKey> {
    let failed =
        pending.iter().filter(|(ticket, _)| (first..=last).contains(ticket)).map(|(_, device)| *device).collect();
    pending.retain(|(ticket, _)| !(first..=last).contains(ticket));
    failed
}

impl LogStore {
    /// An empty log (first start).
    pub fn new(store_limits: StoreLimits, limits: LogLimits) -> LogStore {
        LogStore {
            index: MailboxIndex::new(store_limits),
            limits,
            current_segment: 1,
            current_segment_bytes: 0,
            pending: VecDeque::new(),
            pending_bytes: 0,
            last_ticket: 0,
            committed: 0,
            homes: StateHomes::default(),
            segment_last_ticket: BTreeMap::new(),
            failed: VecDeque::new(),
            uncommitted_entries: VecDeque::new(),
            live_by_segment: BTreeMap::new(),
            compaction: None,
            on_disk: Default::default(),
            durable_end: (0, 0),
            taken_ends: VecDeque::new(),
            corrupt_records: 0,
            registrations_pending: VecDeque::new(),
            removals_pending: VecDeque::new(),
            removing_devices: Default::default(),
            registering_devices: Default::default(),
            stored_count: 0,
            newest_stored_by_segment: BTreeMap::new(),
            bodies: Bodies::default(),
            last_seen: LastSeen::default(),
            held_disk_cache: None,
            seq_end: u64::MAX,
        }
    }

    /// Rebuilds the store from scanned segments (ascending ids); see
    /// [`Recovery`], which does the same one segment at a time.
    pub fn recover(
        store_limits: StoreLimits,
        limits: LogLimits,
        segments: &[(u64, Scan)],
    ) -> (LogStore, RecoveryReport) {
        let mut recovery = Recovery::new(store_limits, limits);
        for (segment, scan) in segments {
            recovery.replay_segment(*segment, scan);
        }
        recovery.finish()
    }

    /// The end of recovery: appending resumes in a new segment.
    fn finish_recovery(mut self, mut report: RecoveryReport, last_segment: Option<u64>) -> (LogStore, RecoveryReport) {
        let store = &mut self;
        if let Some(segment) = last_segment {
            // Appending resumes in a new segment, never in the last one:
            // whatever lies after its valid end (a zeroed block, stale bytes)
            // stays untouched.
            store.current_segment = segment;
            store.start_segment();
        }
        store.corrupt_records = report.corrupt_records;
        // A time read before the device's registration was replayed (its
        // seqs were carried past the segment of its last-seen record) is
        // kept; one of a device that is gone or never registered is not.
        for device in store.last_seen.devices() {
            if store.index.mailbox(device).is_none() || store.index.is_removed(device) {
                store.last_seen.forget(device);
                store.homes.forget_seen(device);
            }
        }
        report.devices = store.index.mailboxes().count() as u64;
        report.live_entries = store.live_by_segment.values().map(|live| live.members.len() as u64).sum();
        report.live_payload_bytes_max = store
            .index
            .mailboxes()
            .flat_map(|(_, mailbox)| mailbox.entries.iter().map(|entry| entry.payload_bytes as usize))
            .max()
            .unwrap_or(0);
        store.cool_bodies();
        (self, report)
    }

    /// Applies one recovered record. A record of a device's life (its
    /// registration, a message for it, its acks or state) that comes after
    /// its removal in the log means the removal had been forgotten (16 newer
    /// ones pushed it out, and only then can the id register again), even
    /// when compaction moved the records that pushed it out further on.
    fn replay(&mut self, segment: u64, offset: usize, record: &Record) {
        match record {
            Record::DeviceRegistered(r) => {
                let device = DeviceKey { user: r.user, device: r.device };
                self.index.forget_removed(device);
                self.index.register_recovered(device);
                if !self.index.is_removed(device) && self.index.last_seq(device) == 0 {
                    self.homes.set(device, StateKind::Seqs, segment);
                }
            }
            Record::MessageStored(r) | Record::MessageCopied(r) => {
                let copied = matches!(record, Record::MessageCopied(_));
                let message = Rc::new(stored_message(r, r.payload.clone()));
                let at = RecordAt {
                    segment,
                    offset: offset as u64,
                    bytes: message_record_bytes_max(r.payload.len(), r.recipients.len()),
                };
                for recipient in &r.recipients {
                    let device = DeviceKey { user: r.to_user, device: recipient.device };
                    self.index.forget_removed(device);
                    let newest = recipient.seq >= self.index.last_seq(device);
                    if self.index.insert(device, recipient.seq, &message, 0, at) {
                        self.live_add(segment, device, recipient.seq, live_bytes(r.payload.len()));
                        self.bodies.hot_order.push_back((device, recipient.seq, 0));
                    }
                    // A compaction copy of an older message is not where the seq lives.
                    if newest && !self.index.is_removed(device) {
                        self.homes.set(device, StateKind::Seqs, segment);
                    }
                }
                if !copied {
                    self.index.remember_stored(message.sender(), r.client_msg_id, r.server_msg_id, 0);
                    self.note_stored_in(segment);
                }
                self.last_seen.recovered_time(r.sent_at_ms / 1000);
            }
            Record::Acknowledged(r) => {
                let device = DeviceKey { user: r.user, device: r.device };
                self.index.forget_removed(device);
                // An ack proves the seqs up to it were assigned (the record of
                // the highest may be in a later segment, or reclaimed).
                self.index.raise_last_seq(device, r.up_to_seq);
                let newest = r.up_to_seq >= self.index.acked_seq(device);
                let dropped = self.index.acknowledge(device, r.up_to_seq);
                self.forget_entries(device, &dropped);
                if newest && !self.index.is_removed(device) {
                    self.homes.set(device, StateKind::Acked, segment);
                }
            }
            Record::DeviceState(r) => {
                let device = DeviceKey { user: r.user, device: r.device };
                self.index.forget_removed(device);
                let newest_seq = r.last_seq >= self.index.last_seq(device);
                let newest_ack = r.acked_seq >= self.index.acked_seq(device);
                self.index.raise_last_seq(device, r.last_seq);
                let dropped = self.index.acknowledge(device, r.acked_seq);
                self.forget_entries(device, &dropped);
                if !self.index.is_removed(device) {
                    if newest_seq {
                        self.homes.set(device, StateKind::Seqs, segment);
                    }
                    if newest_ack {
                        self.homes.set(device, StateKind::Acked, segment);
                    }
                }
            }
            // Written by earlier builds of this format version; still honoured.
            Record::DedupEntry(r) => {
                let sender = DeviceKey { user: r.from_user, device: r.from_device };
                self.index.remember_stored(sender, r.client_msg_id, r.server_msg_id, 0);
                self.note_stored_in(segment);
            }
            Record::DeviceRemoved(r) => {
                let device = DeviceKey { user: r.user, device: r.device };
                let (mailbox, forgotten) = self.index.remember_removed(device, r.ordinal);
                if let Some(mailbox) = mailbox {
                    let entries: Vec<MailboxEntry> = mailbox.entries.into_iter().collect();
                    self.forget_entries(device, &entries);
                }
                if self.index.is_removed(device) {
                    self.homes.set(device, StateKind::Removed, segment);
                }
                if let Some(forgotten) = forgotten {
                    self.homes.forget(forgotten);
                }
            }
            Record::DeviceSeen(r) => {
                let device = DeviceKey { user: r.user, device: r.device };
                // Not a proof of life (it is never written for a removed
                // device): one that recovery finds removed loses it at the end.
                self.last_seen.recovered(device, Seen { at_s: r.at_s, online: r.online });
                self.homes.set(device, StateKind::Seen, segment);
            }
            // Framing: the scanner keeps these out of its records.
            Record::ChunkEnd(_) | Record::ChunkSeal(_) | Record::SegmentHeader(_) => {}
        }
    }

    fn forget_entries(&mut self, device: DeviceKey, entries: &[MailboxEntry]) {
        for entry in entries {
            self.live_remove(entry.segment, device, entry.seq, live_bytes(entry.payload_bytes as usize));
            self.unstage(device, entry.seq);
        }
    }

    /// Lets the bodies held longest go until the cache is within its bound
    /// (only durable ones: the others cannot be read back yet).
    fn cool_bodies(&mut self) {
        let bodies = &mut self.bodies;
        while self.index.hot_bytes() > self.limits.body_cache_bytes_max {
            let Some(&(device, seq, ticket)) = bodies.hot_order.front() else { break };
            if ticket > self.committed {
                break;
            }
            bodies.hot_order.pop_front();
            if self.index.cool(device, seq, ticket) {
                bodies.cooled_total += 1;
            }
        }
        if bodies.hot_order.len() as u64 > 2 * self.index.hot_entries() + 1024 {
            let index = &self.index;
            bodies.hot_order.retain(|&(device, seq, ticket)| {
                index.entry(device, seq).is_some_and(|entry| entry.ticket == ticket && entry.body.is_some())
            });
        }
    }

    /// The body of (device, seq), if it is in memory (hot or read back).
    fn body_of(&self, device: DeviceKey, entry: &MailboxEntry) -> Option<Rc<MailboxMessage>> {
        entry.body.clone().or_else(|| self.bodies.staged.get(&(device, entry.seq)).cloned())
    }

    /// Keeps a body read back for (device, seq) until it is pushed.
    fn stage(&mut self, device: DeviceKey, seq: u64, body: Rc<MailboxMessage>) {
        let bodies = &mut self.bodies;
        let bytes = body.payload.len() as u64;
        if bodies.staged.insert((device, seq), body).is_none() {
            bodies.staged_bytes += bytes;
            bodies.staged_order.push_back((device, seq));
        }
    }

    /// Drops the body read back for (device, seq), if any.
    fn unstage(&mut self, device: DeviceKey, seq: u64) {
        let bodies = &mut self.bodies;
        if let Some(body) = bodies.staged.remove(&(device, seq)) {
            bodies.staged_bytes -= body.payload.len() as u64;
        }
    }

    /// Lets the oldest bodies read back go until the read-ahead (with the
    /// reads in flight and `room` more) is within its bound.
    fn trim_staged(&mut self, room: u64) {
        let bound = self.limits.read_ahead_bytes_max;
        loop {
            let bodies = &mut self.bodies;
            if bodies.staged_bytes + bodies.reading_bytes + room <= bound {
                break;
            }
            let Some(key) = bodies.staged_order.pop_front() else { break };
            self.unstage(key.0, key.1);
        }
        let bodies = &mut self.bodies;
        if bodies.staged_order.len() > 2 * bodies.staged.len() + 1024 {
            let staged = &bodies.staged;
            bodies.staged_order.retain(|key| staged.contains_key(key));
        }
    }

    /// Asks the driver to read the record at `at` (once) for the entry
    /// (device, seq) (`blocking`: its push waits for it), or for compaction.
    fn ask_read(&mut self, at: RecordAt, wanted: Option<(DeviceKey, u64, bool)>) {
        let bodies = &mut self.bodies;
        let reading = bodies.reading.entry((at.segment, at.offset)).or_insert_with(|| {
            let compaction_bytes = wanted.is_none();
            if compaction_bytes {
                bodies.compaction_reading_bytes += u64::from(at.bytes);
            } else {
                bodies.reading_bytes += u64::from(at.bytes);
            }
            bodies.queue.push_back(at);
            Reading { bytes: at.bytes, wanted: Vec::new(), compaction: None, compaction_bytes }
        });
        match wanted {
            Some((device, seq, blocking)) => match reading.wanted.iter_mut().find(|w| (w.0, w.1) == (device, seq)) {
                Some(known) => known.2 |= blocking,
                None => reading.wanted.push((device, seq, blocking)),
            },
            None => {
                if let Some(loading) = bodies.loading.as_mut() {
                    if reading.compaction != Some(loading.generation) {
                        reading.compaction = Some(loading.generation);
                        loading.in_flight += 1;
                    }
                }
            }
        }
    }

    /// Asks for the next cold records of the compaction being loaded, up
    /// to [`COMPACTION_READS_IN_FLIGHT`].
    fn top_up_compaction_reads(&mut self) {
        loop {
            let Some(loading) = self.bodies.loading.as_mut() else { return };
            if loading.in_flight >= COMPACTION_READS_IN_FLIGHT {
                return;
            }
            let Some(at) = loading.pending.pop_front() else { return };
            self.ask_read(at, None);
        }
    }

    /// The live entries whose record lies at `at` (a walk of its segment's
    /// members: only on the rare paths of records that do not read back).
    fn entries_at(&self, at: RecordAt) -> Vec<(DeviceKey, u64)> {
        let Some(live) = self.live_by_segment.get(&at.segment) else { return Vec::new() };
        live.members
            .iter()
            .copied()
            .filter(|(device, seq)| self.index.entry(*device, *seq).is_some_and(|entry| entry.offset == at.offset))
            .collect()
    }

    /// Notes that `device`'s push waits for a read slot.
    fn starve(&mut self, device: DeviceKey) {
        let bodies = &mut self.bodies;
        if bodies.starving.insert(device) {
            bodies.starved.push_back(device);
        }
        // Entries of devices woken another way stay in the queue until
        // popped; once they outnumber the live ones, drop them (and
        // repeats), so the queue stays within twice the starving devices.
        if bodies.starved.len() > 2 * bodies.starving.len() + 64 {
            let mut kept = HashSet::default();
            let starving = &bodies.starving;
            bodies.starved.retain(|device| starving.contains(device) && kept.insert(*device));
        }
    }

    /// Drops the cold entry (device, seq), whose record does not hold it:
    /// it cannot be delivered (recovery would skip such a record too).
    fn drop_unreadable(&mut self, device: DeviceKey, seq: u64, error: &str) {
        if let Some(entry) = self.index.remove_entry(device, seq) {
            self.live_remove(entry.segment, device, seq, live_bytes(entry.payload_bytes as usize));
            self.bodies.unreadable_total += 1;
            tracing::error!(
                user = device.user,
                device = device.device,
                seq,
                error,
                "an undelivered message cannot be read back from the log; it is dropped"
            );
        }
    }

    /// The message in a record read back from `at`, with its recipients.
    fn decode_read(at: RecordAt, bytes: &[u8]) -> Result<(Rc<MailboxMessage>, Vec<RecipientSeq>), String> {
        match decode_record(bytes) {
            Ok((Record::MessageStored(mut r), _)) | Ok((Record::MessageCopied(mut r), _)) => {
                let payload = std::mem::take(&mut r.payload);
                Ok((Rc::new(stored_message(&r, payload)), r.recipients))
            }
            Ok((other, _)) => {
                Err(format!("segment {} offset {} holds {other:?}, not a message", at.segment, at.offset))
            }
            Err(error) => Err(format!("segment {} offset {}: {error}", at.segment, at.offset)),
        }
    }

    /// Whether the entry (device, seq) is cold, not read back, committed
    /// and its record lies at `at` (holding `server_msg_id` if given).
    fn is_cold_at(&self, device: DeviceKey, seq: u64, at: (u64, u64), server_msg_id: Option<u64>) -> bool {
        self.index.entry(device, seq).is_some_and(|entry| {
            entry.body.is_none()
                && entry.ticket <= self.committed
                && (entry.segment, entry.offset) == at
                && server_msg_id.is_none_or(|id| id == entry.server_msg_id)
                && !self.bodies.staged.contains_key(&(device, seq))
        })
    }

    fn live_add(&mut self, segment: u64, device: DeviceKey, seq: u64, bytes: u64) {
        let live = self.live_by_segment.entry(segment).or_default();
        if live.members.insert((device, seq)) {
            live.bytes += bytes;
        }
    }

    fn live_remove(&mut self, segment: u64, device: DeviceKey, seq: u64, bytes: u64) {
        if let Some(live) = self.live_by_segment.get_mut(&segment) {
            if live.members.remove(&(device, seq)) {
                live.bytes = live.bytes.saturating_sub(bytes);
            }
            if live.members.is_empty() {
                self.live_by_segment.remove(&segment);
            }
        }
    }

    /// Starts compacting one mostly dead sealed segment: its live messages
    /// are appended again (same seqs) at the head of the log. Once those
    /// copies are durable the entries count against the new segment, and the
    /// old one is reclaimed like any delivered segment.
    fn start_compaction(&mut self) {
        let threshold = self.limits.segment_bytes_max / COMPACT_LIVE_FRACTION_DIVISOR;
        let candidate = self.on_disk.iter().copied().find(|segment| {
            let live = self.live_by_segment.get(segment).map_or(0, |live| live.bytes);
            let states = self.homes.count_in(*segment) as u64 * CARRIED_STATE_BYTES;
            *segment < self.current_segment
                && (live > 0 || states > 0)
                && live + states < threshold
                && self.segment_settled(*segment)
                // Its dedup keys would keep it anyway: copying now is wasted.
                && !self.holds_recent_dedup_keys(*segment)
                && !self.bodies.compaction_skips.contains(segment)
        });
        let Some(from) = candidate else {
            self.bodies.loading = None;
            return;
        };
        if self.bodies.loading.as_ref().is_some_and(|loading| loading.from != from) {
            self.bodies.loading = None;
        }
        // One record per message, listing the devices that still hold it.
        let mut by_message: BTreeMap<u64, (Rc<MailboxMessage>, Vec<RecipientSeq>)> = BTreeMap::new();
        let mut members: Vec<(DeviceKey, u64)> =
            self.live_by_segment.get(&from).map(|live| live.members.iter().copied().collect()).unwrap_or_default();
        // In a fixed order, not the hash set's (seeded per process): the
        // records written, and so a simulated run, must not depend on it.
        members.sort_unstable();
        let mut cold = Vec::new();
        let mut unreadable = Vec::new();
        for (device, seq) in members {
            let Some(entry) = self.index.entry(device, seq) else { continue };
            // Only committed entries: a copy of one whose own write then
            // failed would bring back, at the next recovery, a message its
            // sender was told was not stored (found by the simulation).
            if entry.segment != from || entry.ticket > self.committed {
                continue;
            }
            let loaded = self.bodies.loading.as_ref().and_then(|loading| loading.bodies.get(&(from, entry.offset)));
            let message = match (self.body_of(device, entry), loaded) {
                (Some(body), _) => body,
                (None, Some(body)) if body.server_msg_id == entry.server_msg_id => Rc::clone(body),
                (None, Some(_)) => {
                    // Another message lies where its record should: it can
                    // be neither copied nor delivered (reading it again
                    // would not help).
                    unreadable.push((device, seq));
                    continue;
                }
                (None, None) => {
                    cold.push(entry.record_at());
                    continue;
                }
            };
            let slot = by_message.entry(message.server_msg_id).or_insert_with(|| (Rc::clone(&message), Vec::new()));
            slot.1.push(RecipientSeq { device: device.device, seq });
        }
        for (device, seq) in unreadable {
            self.drop_unreadable(device, seq, "the record there holds another message");
        }
        if !cold.is_empty() {
            // Its cold entries are read back first (at most a quarter
            // segment of live data), a few at a time; the pass runs once
            // they are all in.
            cold.sort_by_key(|at| at.offset);
            cold.dedup_by_key(|at| at.offset);
            let generation = self.bodies.next_generation;
            self.bodies.next_generation += 1;
            let (bodies, bytes) = match self.bodies.loading.take() {
                Some(loading) => (loading.bodies, loading.bytes),
                None => (HashMap::default(), 0),
            };
            let pending = cold.into();
            self.bodies.loading = Some(Loading { from, bodies, bytes, generation, pending, in_flight: 0, failures: 0 });
            self.top_up_compaction_reads();
            return;
        }
        self.bodies.loading = None;
        let mut moves = Vec::new();
        let mut last_ticket = self.last_ticket;
        for (_, (message, recipients)) in by_message {
            let record = message_record(&message, recipients.clone(), true);
            let (ticket, at) = self.append(&record);
            last_ticket = ticket;
            // The copy is not a new message: its dedup key left the window
            // before the segment could be compacted, and neither the window
            // nor its count (`note_stored_in`) takes it again, here or in
            // recovery. (Counting copies let compaction churn push recent
            // keys out: a retry well inside the window was stored twice,
            // found by the SIGKILL test.)
            for recipient in recipients {
                let device = DeviceKey { user: message.to_user, device: recipient.device };
                moves.push((device, recipient.seq, live_bytes(message.payload.len()), at));
            }
        }
        // The state of devices whose newest record is in `from` goes forward
        // too: one record each, moved once durable.
        for device in self.homes.devices_in(from) {
            if let Some(ordinal) = self.index.removal_ordinal(device).filter(|_| self.homes.is_removal(device)) {
                last_ticket = self.append_removal_record(device, ordinal);
            } else if self.index.mailbox(device).is_some() {
                if self.homes.state_in(device, from) {
                    let state = DeviceState {
                        user: device.user,
                        device: device.device,
                        last_seq: self.index.last_seq(device),
                        acked_seq: self.index.acked_seq(device),
                    };
                    let (ticket, RecordAt { segment, .. }) = self.append(&Record::DeviceState(state));
                    self.homes.move_when_durable(ticket, device, StateKind::Both, segment);
                    last_ticket = ticket;
                }
                if self.homes.seen_in(device, from) {
                    last_ticket = last_ticket.max(self.append_seen(device));
                }
            }
        }
        last_ticket = last_ticket.max(self.last_ticket);
        tracing::debug!(from, copies = moves.len(), "compacting log segment");
        self.compaction = Some(Compaction { from, last_ticket, moves });
    }

    /// Appends `record`; returns its ticket and where it will lie.
    fn append(&mut self, record: &Record) -> (Ticket, RecordAt) {
        let mut bytes = Vec::new();
        encode_record(record, &mut bytes);
        // With room for the commit marker of a chunk it may open, so a
        // segment stays within the spare the writer prepared for it.
        let needed = (bytes.len() + chunk_framing_bytes(false)) as u64;
        if self.current_segment_bytes > 0 && self.current_segment_bytes + needed > self.limits.segment_bytes_max {
            self.start_segment();
        }
        self.push_bytes(&bytes)
    }

    /// Appends encoded records to the open chunk (or a new one). The store
    /// knows every record's file offset in advance: chunks are written back
    /// to back from where the durable ones end, framed as `frame_chunk`
    /// frames them (a failed write resets the count to the durable end,
    /// `on_write_failed`), and the writer refuses a chunk that would start
    /// anywhere else.
    fn push_bytes(&mut self, bytes: &[u8]) -> (Ticket, RecordAt) {
        self.last_ticket += 1;
        let ticket = self.last_ticket;
        let reuse = self.pending.back().is_some_and(|chunk| {
            chunk.segment == self.current_segment && chunk.bytes.len() < self.limits.commit_bytes_max
        });
        if !reuse {
            // The writer frames each chunk (commit marker, and the segment
            // header before the first): counted so rotation sees file bytes.
            let start = self.current_segment_bytes;
            self.current_segment_bytes += chunk_framing_bytes(start == 0) as u64;
            self.pending.push_back(WriteChunk {
                segment: self.current_segment,
                start,
                bytes: Vec::new(),
                first_ticket: ticket,
                last_ticket: ticket,
            });
        }
        self.segment_last_ticket.insert(self.current_segment, ticket);
        let chunk = self.pending.back_mut().expect("a chunk was ensured above");
        let header = if chunk.start == 0 { chunk_framing_bytes(true) - chunk_framing_bytes(false) } else { 0 };
        let offset = chunk.start + (header + chunk.bytes.len()) as u64;
        chunk.bytes.extend_from_slice(bytes);
        chunk.last_ticket = ticket;
        self.pending_bytes += bytes.len();
        self.current_segment_bytes += bytes.len() as u64;
        let at =
            RecordAt { segment: self.current_segment, offset, bytes: u32::try_from(bytes.len()).unwrap_or(u32::MAX) };
        (ticket, at)
    }

    /// Opens the next segment.
    fn start_segment(&mut self) {
        self.current_segment += 1;
        self.current_segment_bytes = 0;
    }

    /// Whether every record appended to `segment` has an outcome.
    fn segment_settled(&self, segment: u64) -> bool {
        self.segment_last_ticket.get(&segment).is_none_or(|last| *last <= self.committed)
    }

    fn note_stored_in(&mut self, segment: u64) {
        self.stored_count += 1;
        self.newest_stored_by_segment.insert(segment, self.stored_count);
    }

    /// Whether `segment` holds the dedup key of a message still in the
    /// recipient-side window (the newest `stored_dedup_entries_max`).
    fn holds_recent_dedup_keys(&self, segment: u64) -> bool {
        let window = u64::from(self.index.limits().stored_dedup_entries_max);
        self.newest_stored_by_segment.get(&segment).is_some_and(|newest| newest + window > self.stored_count)
    }

    /// Appends a `DeviceRemoved` for `device`; its removal moves there once durable.
    fn append_removal_record(&mut self, device: DeviceKey, ordinal: u64) -> Ticket {
        let record = Record::DeviceRemoved(DeviceRemoved { user: device.user, device: device.device, ordinal });
        let (ticket, RecordAt { segment, .. }) = self.append(&record);
        self.homes.move_when_durable(ticket, device, StateKind::Removed, segment);
        ticket
    }

    /// Appends `device`'s newest last-seen time; it moves there once durable.
    fn append_seen(&mut self, device: DeviceKey) -> Ticket {
        let Some(seen) = self.last_seen.get(device) else { return self.last_ticket };
        let record = Record::DeviceSeen(DeviceSeen {
            user: device.user,
            device: device.device,
            at_s: seen.at_s,
            online: seen.online,
        });
        let (ticket, RecordAt { segment, .. }) = self.append(&record);
        self.homes.move_when_durable(ticket, device, StateKind::Seen, segment);
        self.last_seen.appended(ticket, device);
        ticket
    }

    /// One record of `device`'s removal left `removals_pending`.
    fn not_removing(&mut self, device: DeviceKey) {
        if let Some(count) = self.removing_devices.get_mut(&device) {
            *count -= 1;
            if *count == 0 {
                self.removing_devices.remove(&device);
            }
        }
    }

    /// Logs `device`'s removal (its ordinal from the index), answered once durable.
    fn append_removal(&mut self, device: DeviceKey) {
        // A removal forgotten meanwhile (16 newer ones) is not written again.
        let Some(ordinal) = self.index.removal_ordinal(device) else { return };
        let ticket = self.append_removal_record(device, ordinal);
        self.removals_pending.push_back((ticket, device));
        *self.removing_devices.entry(device).or_default() += 1;
    }

    fn append_registration(&mut self, device: DeviceKey) {
        let record = Record::DeviceRegistered(DeviceRegistered { user: device.user, device: device.device });
        let (ticket, RecordAt { segment, .. }) = self.append(&record);
        self.homes.move_when_durable(ticket, device, StateKind::Seqs, segment);
        self.registrations_pending.push_back((ticket, device));
        self.registering_devices.insert(device);
    }

    /// Raises every device's seq (and that of devices registering later) to
    /// at least `floor`: after a recovery that skipped damaged chunks, which
    /// may have held a device's newest seq or its registration, a seq must
    /// still never go backwards. The floor is durable apart from the log
    /// (`layout::seq_floor`), so no record is written for it.
    pub fn raise_seq_floor(&mut self, floor: u64) {
        self.index.raise_seq_floor(floor);
    }

    /// Every mailbox entry with its device (for checks: the simulation reads
    /// each committed one back from where its record lies).
    pub fn mailbox_entries(&self) -> impl Iterator<Item = (DeviceKey, &MailboxEntry)> {
        self.index.mailboxes().flat_map(|(device, mailbox)| mailbox.entries.iter().map(|entry| (*device, entry)))
    }

    /// Bytes the mailboxes hold against `shard_mailbox_bytes_max`, as
    /// counted incrementally (checks compare it with a recount).
    pub fn charged_bytes(&self) -> u64 {
        self.index.charged_bytes()
    }

    /// Memory held for mailboxes outside the index: bodies read back,
    /// reads in flight and bodies gathered for a compaction.
    pub fn read_ahead_bytes(&self) -> u64 {
        let loaded = self.bodies.loading.as_ref().map_or(0, |loading| loading.bytes);
        self.read_back_bytes() + self.bodies.compaction_reading_bytes + loaded
    }

    /// Bodies read back for pushes and reads in flight, as counted as they change.
    pub fn read_back_bytes(&self) -> u64 {
        self.bodies.staged_bytes + self.bodies.reading_bytes
    }

    /// A recount of [`LogStore::read_back_bytes`] (checks compare the two).
    pub fn recount_read_back_bytes(&self) -> u64 {
        let staged: u64 = self.bodies.staged.values().map(|body| body.payload.len() as u64).sum();
        let reading: u64 = self
            .bodies
            .reading
            .values()
            .filter(|reading| !reading.compaction_bytes)
            .map(|reading| u64::from(reading.bytes))
            .sum();
        staged + reading
    }

    /// The disk the log takes: its segments (the one being written
    /// included) and the spare prepared for the next.
    pub fn disk_bytes(&self) -> u64 {
        let current = u64::from(!self.on_disk.contains(&self.current_segment));
        (self.on_disk.len() as u64 + current + 1).saturating_mul(self.limits.segment_bytes_max)
    }

    /// The disk the budget counts: [`LogStore::disk_bytes`] less the sealed
    /// segments kept only for the dedup keys of recent messages. Those go
    /// as new messages move the window on, so counting them would refuse
    /// the very sends that free them (found by the simulation); they add at
    /// most the window's span of the log to the budget.
    fn held_disk_bytes(&self) -> u64 {
        let held = self
            .on_disk
            .iter()
            .filter(|segment| {
                **segment >= self.current_segment
                    || self.live_by_segment.contains_key(segment)
                    || self.homes.holds(**segment)
                    || !self.segment_settled(**segment)
            })
            .count() as u64;
        let current = u64::from(!self.on_disk.contains(&self.current_segment));
        (held + current + 1).saturating_mul(self.limits.segment_bytes_max)
    }

    fn held_disk_bytes_cached(&mut self) -> u64 {
        let key = (self.committed, self.on_disk.len(), self.live_by_segment.len());
        match self.held_disk_cache {
            Some((cached, bytes)) if cached == key => bytes,
            _ => {
                let bytes = self.held_disk_bytes();
                self.held_disk_cache = Some((key, bytes));
                bytes
            }
        }
    }

    /// Sets the disk budget (at start, when it is derived from the free space).
    pub fn set_disk_budget(&mut self, bytes: u64) {
        self.limits.disk_bytes_max = bytes;
    }

    /// The disk budget in force.
    pub fn disk_budget(&self) -> u64 {
        self.limits.disk_bytes_max
    }

    /// Reads asked for and not answered.
    pub fn reads_pending(&self) -> usize {
        self.bodies.reading.len()
    }

    /// Segments believed to be on disk.
    pub fn segments_on_disk(&self) -> usize {
        self.on_disk.len()
    }

    /// Corrupt records skipped during recovery.
    pub fn corrupt_records(&self) -> u64 {
        self.corrupt_records
    }
}

/// Recovery one segment at a time, so that only one segment's bytes and
/// records are in memory at once besides the store itself (reading every
/// segment first held the whole log in memory).
#[derive(Debug)]
pub struct Recovery {
    /// The store being rebuilt.
    store: LogStore,
    /// What was found so far.
    report: RecoveryReport,
    /// The newest segment replayed.
    last_segment: Option<u64>,
}

impl Recovery {
    /// An empty store to replay into.
    pub fn new(store_limits: StoreLimits, limits: LogLimits) -> Recovery {
        Recovery { store: LogStore::new(store_limits, limits), report: RecoveryReport::default(), last_segment: None }
    }

    /// Replays one scanned segment; segments come in ascending order.
    pub fn replay_segment(&mut self, segment: u64, scan: &Scan) {
        assert!(self.last_segment.is_none_or(|last| last < segment), "segments replay in ascending order");
        self.last_segment = Some(segment);
        self.store.on_disk.insert(segment);
        self.report.segments += 1;
        self.report.corrupt_records += scan.corrupt.len() as u64;
        self.report.torn_bytes += scan.torn_tail.as_ref().map_or(0, |tail| tail.length as u64);
        for (offset, record) in &scan.records {
            self.store.replay(segment, *offset, record);
            self.report.records += 1;
        }
        // A restart holds no more bodies than the cache does.
        self.store.cool_bodies();
    }

    /// The recovered store, ready to append, and what recovery found.
    pub fn finish(self) -> (LogStore, RecoveryReport) {
        self.store.finish_recovery(self.report, self.last_segment)
    }
}

impl MailboxStore for LogStore {
    fn register_device(&mut self, device: DeviceKey) -> Result<bool, StoreError> {
        let new = self.index.register(device)?;
        if new {
            self.append_registration(device);
        }
        Ok(new)
    }

    fn registration_pending(&self, device: DeviceKey) -> bool {
        self.registering_devices.contains(&device)
    }

    fn devices_of(&self, user: u64) -> &[u32] {
        self.index.devices_of(user)
    }

    fn registered_devices(&self) -> Vec<DeviceKey> {
        self.index.mailboxes().map(|(device, _)| *device).collect()
    }

    fn remove_device(&mut self, device: DeviceKey) -> Result<(), StoreError> {
        if self.index.is_removed(device) {
            return Ok(());
        }
        if self.index.mailbox(device).is_none() {
            return Err(StoreError::UnknownDevice(device));
        }
        // The removal it would push out of memory must be durable first:
        // otherwise a crash could bring back a device someone was told is gone.
        if self.index.removal_to_forget(device.user).is_some_and(|oldest| self.removal_pending(oldest)) {
            return Err(StoreError::Backlog);
        }
        let Some((mailbox, _, forgotten)) = self.index.remove_registered(device) else {
            return Err(StoreError::UnknownDevice(device));
        };
        if let Some(forgotten) = forgotten {
            self.homes.forget(forgotten);
        }
        let entries: Vec<MailboxEntry> = mailbox.entries.into_iter().collect();
        self.forget_entries(device, &entries);
        self.last_seen.forget(device);
        self.registrations_pending.retain(|(_, pending)| *pending != device);
        self.registering_devices.remove(&device);
        self.append_removal(device);
        Ok(())
    }

    fn is_removed(&self, device: DeviceKey) -> bool {
        self.index.is_removed(device)
    }

    fn note_seen(&mut self, device: DeviceKey, at_s: u64, online: bool) {
        // A removed device logs nothing more (replay would take it as alive).
        if self.index.mailbox(device).is_none() || self.index.is_removed(device) {
            return;
        }
        if self.last_seen.note(device, at_s, online) {
            self.append_seen(device);
        }
    }

    fn recovered_idle_since(&self, device: DeviceKey) -> Option<u64> {
        self.last_seen.idle_since(device)
    }

    fn removal_pending(&self, device: DeviceKey) -> bool {
        self.removing_devices.contains_key(&device)
    }

    fn has_room(&self, device: DeviceKey, sender: u64, payload_bytes: usize) -> Result<(), StoreError> {
        self.index.has_room(device, sender, payload_bytes)
    }

    fn shard_has_room(&self, payload_bytes: usize, devices: usize) -> Result<(), StoreError> {
        self.index.shard_has_room(payload_bytes, devices, self.read_ahead_bytes())
    }

    fn seq_reservation(&self) -> Option<SeqReservation> {
        Some(SeqReservation { high: self.index.seq_high(), end: self.seq_end })
    }

    fn extend_seq_reservation(&mut self, end: u64) {
        assert!(end >= self.seq_end || self.seq_end == u64::MAX, "a seq reservation only grows");
        self.seq_end = end;
    }

    fn find_stored(&self, sender: DeviceKey, client_msg_id: u64) -> Option<(u64, Ticket)> {
        self.index.find_stored(sender, client_msg_id)
    }

    fn store_message(&mut self, message: Rc<MailboxMessage>, devices: &[DeviceKey]) -> Result<Ticket, StoreError> {
        if self.pending_bytes > PENDING_BYTES_MAX {
            return Err(StoreError::Backlog);
        }
        if self.disk_bytes() >= self.limits.disk_bytes_max
            && self.held_disk_bytes_cached() >= self.limits.disk_bytes_max
        {
            return Err(StoreError::DiskBudget);
        }
        // Every recipient's next seq is at most one above the highest.
        if self.index.seq_high().saturating_add(1) >= self.seq_end {
            return Err(StoreError::SeqsUnreserved);
        }
        let recipients: Vec<RecipientSeq> = devices
            .iter()
            .map(|device| {
                debug_assert_eq!(device.user, message.to_user);
                RecipientSeq { device: device.device, seq: self.index.last_seq(*device) + 1 }
            })
            .collect();
        let record = message_record(&message, recipients.clone(), false);
        let (ticket, at) = self.append(&record);
        let segment = at.segment;
        for (device, recipient) in devices.iter().zip(&recipients) {
            let seq = self.index.append(*device, &message, ticket, at);
            assert_eq!(seq, recipient.seq, "seq logged differs from seq assigned");
            self.live_add(segment, *device, seq, live_bytes(message.payload.len()));
            self.bodies.hot_order.push_back((*device, seq, ticket));
            self.uncommitted_entries.push_back((ticket, *device, seq));
            self.homes.move_when_durable(ticket, *device, StateKind::Seqs, segment);
        }
        self.index.remember_stored(message.sender(), message.client_msg_id, message.server_msg_id, ticket);
        self.note_stored_in(segment);
        Ok(ticket)
    }

    fn acknowledge(&mut self, device: DeviceKey, up_to_seq: u64) {
        // A removed device logs nothing more (replay would take it as alive).
        if up_to_seq <= self.index.acked_seq(device) || self.index.mailbox(device).is_none() {
            return;
        }
        let dropped = self.index.acknowledge(device, up_to_seq);
        self.forget_entries(device, &dropped);
        let up_to_seq = self.index.acked_seq(device);
        let record = Record::Acknowledged(Acknowledged { user: device.user, device: device.device, up_to_seq });
        let (ticket, RecordAt { segment, .. }) = self.append(&record);
        self.homes.move_when_durable(ticket, device, StateKind::Acked, segment);
    }

    fn next_after(&self, device: DeviceKey, after_seq: u64) -> Option<Next> {
        let entry = self.index.next_after(device, after_seq, self.committed)?;
        Some(match self.body_of(device, entry) {
            Some(body) => Next::Ready(entry.seq, body),
            None => Next::Cold(entry.seq),
        })
    }

    fn last_seq(&self, device: DeviceKey) -> u64 {
        self.index.last_seq(device)
    }

    fn note_pushed(&mut self, device: DeviceKey, seq: u64) {
        self.index.note_pushed(device, seq);
        // A body read back has done its work once pushed; a redelivery reads it again.
        self.unstage(device, seq);
    }

    fn pushed_seq(&self, device: DeviceKey) -> u64 {
        self.index.pushed_seq(device)
    }

    fn committed_ticket(&self) -> Ticket {
        self.committed
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            index_bytes: self.index.index_bytes(),
            body_bytes: self.index.hot_bytes(),
            read_ahead_bytes: self.read_ahead_bytes(),
            reads_total: self.bodies.reads_total,
            read_failures_total: self.bodies.read_failures_total,
            unreadable_total: self.bodies.unreadable_total,
            cooled_total: self.bodies.cooled_total,
            compactions_total: self.bodies.compactions_total,
            compacted_messages_total: self.bodies.compacted_messages_total,
            disk_bytes: self.disk_bytes(),
            disk_budget_bytes: self.limits.disk_bytes_max,
        }
    }

    fn ticket_failed(&self, ticket: Ticket) -> bool {
        self.failed.iter().any(|(first, last)| (*first..=*last).contains(&ticket))
    }
}

impl LogIo for LogStore {
    fn want_bodies(&mut self, device: DeviceKey, after_seq: u64) {
        let committed = self.committed;
        let cold: Vec<(u64, RecordAt)> = self
            .index
            .entries_after(device, after_seq)
            .take(READ_AHEAD_ENTRIES)
            .take_while(|entry| entry.ticket <= committed)
            .filter(|entry| entry.body.is_none() && !self.bodies.staged.contains_key(&(device, entry.seq)))
            .map(|entry| (entry.seq, entry.record_at()))
            .collect();
        let first_seq = self.index.entries_after(device, after_seq).next().map(|entry| entry.seq);
        let bound = self.limits.read_ahead_bytes_max;
        for (seq, at) in cold {
            let blocking = Some(seq) == first_seq;
            let bodies = &self.bodies;
            if !bodies.reading.contains_key(&(at.segment, at.offset)) {
                let bytes = u64::from(at.bytes);
                let pushes_reading = bodies.reading_bytes > 0;
                let slots_full = bodies.reading.len() >= READS_IN_FLIGHT_MAX + COMPACTION_READS_IN_FLIGHT;
                if slots_full || (pushes_reading && bodies.reading_bytes + bytes > bound) {
                    // Reads in flight alone fill the read-ahead: wait for one.
                    if blocking {
                        self.starve(device);
                    }
                    break;
                }
                if blocking {
                    // The read the push waits for makes room for itself
                    // among the bodies read back.
                    self.trim_staged(bytes);
                } else if bodies.staged_bytes + bodies.reading_bytes + bytes > bound {
                    break;
                }
            }
            self.ask_read(at, Some((device, seq, blocking)));
        }
    }

    fn take_read(&mut self) -> Option<RecordAt> {
        self.bodies.queue.pop_front()
    }

    fn on_read(&mut self, at: RecordAt, result: Result<&[u8], String>) -> Vec<DeviceKey> {
        let key = (at.segment, at.offset);
        let Some(reading) = self.bodies.reading.remove(&key) else { return Vec::new() };
        let bodies = &mut self.bodies;
        if reading.compaction_bytes {
            bodies.compaction_reading_bytes -= u64::from(reading.bytes);
        } else {
            bodies.reading_bytes -= u64::from(reading.bytes);
        }
        let loading = bodies.loading.as_mut().filter(|loading| Some(loading.generation) == reading.compaction);
        let for_loading = loading.is_some();
        if let Some(loading) = loading {
            loading.in_flight -= 1;
        }
        // The pushes this read blocked go first, then a few starved ones
        // (all of them once no push's read is in flight: none can starve then).
        let mut ready: Vec<DeviceKey> = Vec::new();
        for device in reading.wanted.iter().filter(|wanted| wanted.2).map(|wanted| wanted.0) {
            bodies.starving.remove(&device);
            if !ready.contains(&device) {
                ready.push(device);
            }
        }
        let wake = if bodies.reading_bytes == 0 { usize::MAX } else { STARVED_WOKEN_PER_READ };
        let mut woken = 0;
        while woken < wake {
            let Some(device) = bodies.starved.pop_front() else { break };
            // Entries for devices woken another way meanwhile are stale.
            if bodies.starving.remove(&device) {
                woken += 1;
                if !ready.contains(&device) {
                    ready.push(device);
                }
            }
        }
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(error) => {
                // Asked again by the next push (the driver waits a while
                // after failed reads), or by the compaction.
                if let Some(loading) = self.bodies.loading.as_mut().filter(|_| for_loading) {
                    loading.failures += 1;
                    if loading.failures > COMPACTION_READ_FAILURES_MAX {
                        tracing::warn!(
                            segment = loading.from,
                            "compaction gives the segment up: its reads keep failing"
                        );
                        self.bodies.compaction_skips.insert(loading.from);
                        self.bodies.loading = None;
                    } else {
                        loading.pending.push_back(at);
                    }
                }
                if !self.on_disk.contains(&at.segment) {
                    // Reclaimed meanwhile: nothing there to compact either.
                    if self.bodies.loading.as_ref().is_some_and(|loading| loading.from == at.segment) {
                        self.bodies.loading = None;
                    }
                }
                // A segment reclaimed meanwhile (its entries moved or were
                // delivered) is not a failing disk.
                if self.on_disk.contains(&at.segment) {
                    self.bodies.read_failures_total += 1;
                    tracing::warn!(segment = at.segment, offset = at.offset, %error, "reading a message back failed");
                }
                return ready;
            }
        };
        self.bodies.reads_total += 1;
        match Self::decode_read(at, bytes) {
            Ok((message, recipients)) => {
                for (device, seq, _) in reading.wanted {
                    if !self.is_cold_at(device, seq, key, None) {
                        continue; // delivered, moved or read back meanwhile
                    }
                    let listed = device.user == message.to_user
                        && recipients.iter().any(|recipient| (recipient.device, recipient.seq) == (device.device, seq));
                    let same = self.index.entry(device, seq).is_some_and(|e| e.server_msg_id == message.server_msg_id);
                    if listed && same {
                        self.stage(device, seq, Rc::clone(&message));
                    } else {
                        // Another message lies where this entry's record should.
                        self.drop_unreadable(device, seq, "the record there holds another message");
                    }
                }
                if let Some(loading) = self.bodies.loading.as_mut().filter(|loading| loading.from == at.segment) {
                    let bytes = message.payload.len() as u64;
                    if loading.bodies.insert(key, message).is_none() {
                        loading.bytes += bytes;
                    }
                }
                self.trim_staged(0);
            }
            Err(error) => {
                // The bytes on disk are not the message the index expects
                // there: it cannot be delivered. Every entry whose record
                // lies there goes, loudly (all of them, so that a compaction
                // does not ask for it again and again).
                let mut holders: Vec<(DeviceKey, u64)> = reading.wanted.iter().map(|w| (w.0, w.1)).collect();
                holders.extend(self.entries_at(at));
                for (device, seq) in holders {
                    if self.is_cold_at(device, seq, key, None) {
                        self.drop_unreadable(device, seq, &error);
                    }
                }
            }
        }
        ready
    }

    /// The oldest chunk to write, if any.
    fn take_write(&mut self) -> Option<WriteChunk> {
        let chunk = self.pending.pop_front()?;
        self.pending_bytes -= chunk.bytes.len();
        let end = chunk.start + (chunk_framing_bytes(chunk.start == 0) + chunk.bytes.len()) as u64;
        self.taken_ends.push_back((chunk.last_ticket, chunk.segment, end));
        Some(chunk)
    }

    /// Bytes waiting to be written.
    fn pending_write_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// The writer made `chunk` durable.
    fn on_write_durable(&mut self, segment: u64, first_ticket: Ticket, last_ticket: Ticket) {
        // Durability is recorded as one prefix of tickets: a chunk that never
        // reached the writer must not be counted by the next one's success.
        assert_eq!(first_ticket, self.committed + 1, "write chunks must complete contiguously, in order");
        assert!(last_ticket >= first_ticket, "a chunk's tickets are ascending");
        self.committed = last_ticket;
        while let Some((taken_last, taken_segment, end)) = self.taken_ends.pop_front() {
            if taken_last == last_ticket {
                debug_assert_eq!(taken_segment, segment);
                self.durable_end = (segment, end);
                break;
            }
        }
        while self.uncommitted_entries.front().is_some_and(|(ticket, _, _)| *ticket <= last_ticket) {
            self.uncommitted_entries.pop_front();
        }
        self.homes.on_durable(last_ticket);
        self.last_seen.on_durable(last_ticket);
        while self.registrations_pending.front().is_some_and(|(ticket, _)| *ticket <= last_ticket) {
            if let Some((_, device)) = self.registrations_pending.pop_front() {
                self.registering_devices.remove(&device);
            }
        }
        while self.removals_pending.front().is_some_and(|(ticket, _)| *ticket <= last_ticket) {
            if let Some((_, device)) = self.removals_pending.pop_front() {
                self.not_removing(device);
            }
        }
        self.on_disk.insert(segment);
        self.cool_bodies();
        if self.compaction.as_ref().is_some_and(|compaction| compaction.last_ticket <= last_ticket) {
            let compaction = self.compaction.take().expect("checked above");
            self.bodies.compactions_total += 1;
            self.bodies.compacted_messages_total += compaction.moves.len() as u64;
            for (device, seq, bytes, to) in compaction.moves {
                // Entries acknowledged meanwhile are gone: nothing to move.
                if self.index.relocate(device, seq, compaction.from, to) {
                    self.live_remove(compaction.from, device, seq, bytes);
                    self.live_add(to.segment, device, seq, bytes);
                }
            }
        }
    }

    /// The writer could not make the chunk durable: its changes are dropped,
    /// and so are those of every chunk not written yet (the failure fence).
    /// What stays is a prefix of the changes in the order they were made:
    /// a later change (a Send appended after an earlier one of the same
    /// sender, which it names as `after`) is never durable while an earlier
    /// one was lost, so a retry of the earlier one cannot land behind it.
    /// Changes made after this call are written normally.
    fn on_write_failed(&mut self, segment: u64, first_ticket: Ticket, chunk_last_ticket: Ticket) {
        assert_eq!(first_ticket, self.committed + 1, "write chunks must complete contiguously, in order");
        assert!(chunk_last_ticket >= first_ticket, "a chunk's tickets are ascending");
        // One chunk is written at a time, so every other change made so far
        // is in a chunk the writer has not seen.
        let last_ticket = self.last_ticket;
        for chunk in self.pending.drain(..) {
            debug_assert!(chunk.first_ticket > chunk_last_ticket && chunk.last_ticket <= last_ticket);
            // Tracked like a written segment (a later chunk may create it;
            // if none does, reclaiming it deletes a file that never was).
            self.on_disk.insert(chunk.segment);
        }
        self.pending_bytes = 0;
        self.taken_ends.clear();
        // The writer cuts the file back to its last durable chunk and writes
        // the next one there; so do the offsets handed out from now on.
        self.current_segment_bytes = match self.durable_end {
            (durable_segment, end) if durable_segment == self.current_segment => end,
            _ => 0,
        };
        let mut failed_entries = Vec::new();
        while self.uncommitted_entries.front().is_some_and(|(ticket, _, _)| *ticket <= last_ticket) {
            if let Some((_, device, seq)) = self.uncommitted_entries.pop_front() {
                failed_entries.push((device, seq));
            }
        }
        for (device, entry) in self.index.remove_failed(&failed_entries, first_ticket, last_ticket) {
            self.live_remove(entry.segment, device, entry.seq, live_bytes(entry.payload_bytes as usize));
        }
        if self.compaction.as_ref().is_some_and(|compaction| compaction.last_ticket >= first_ticket) {
            // Some copies did not reach the disk: the entries stay where they
            // are, and a later pass tries again.
            self.compaction = None;
        }
        self.failed.push_back((first_ticket, last_ticket));
        while self.failed.len() > FAILED_RANGES_MAX {
            self.failed.pop_front();
        }
        self.committed = last_ticket;
        // Device state stays where it was durable.
        self.homes.on_failed(last_ticket);
        // The segment may exist partially; the writer rewrites from its last
        // durable end, so it is tracked like any other.
        self.on_disk.insert(segment);
        // A registration in the failed chunk is written again: the device
        // stays registered in memory, and its Hello waits for the new record.
        for device in take_tickets_in(&mut self.registrations_pending, first_ticket, last_ticket) {
            self.append_registration(device);
        }
        // Likewise a removal: the device stays removed in memory.
        for device in take_tickets_in(&mut self.removals_pending, first_ticket, last_ticket) {
            self.not_removing(device);
            self.append_removal(device);
        }
        // And a last-seen time, with its newest value: the durable one must
        // not lag behind (a lagging one would hasten the expiry).
        for device in self.last_seen.take_failed(first_ticket, last_ticket) {
            if self.index.mailbox(device).is_some() && !self.index.is_removed(device) {
                self.append_seen(device);
            }
        }
    }

    /// Segments that can be deleted now: sealed and settled, holding no
    /// undelivered message, no device's newest state and no dedup key still
    /// in the window. They are forgotten once returned.
    fn take_reclaimable(&mut self) -> Vec<u64> {
        let reclaimable: Vec<u64> = self
            .on_disk
            .iter()
            .copied()
            .filter(|segment| *segment < self.current_segment && self.segment_settled(*segment))
            .filter(|segment| !self.live_by_segment.contains_key(segment) && !self.homes.holds(*segment))
            .filter(|segment| !self.holds_recent_dedup_keys(*segment))
            .filter(|segment| self.compaction.as_ref().is_none_or(|compaction| compaction.from != *segment))
            .collect();
        for segment in &reclaimable {
            self.bodies.compaction_skips.remove(segment);
            self.on_disk.remove(segment);
            self.newest_stored_by_segment.remove(segment);
            self.segment_last_ticket.remove(segment);
        }
        reclaimable
    }

    fn maintain(&mut self) {
        if self.compaction.is_some() || self.pending_write_bytes() >= self.limits.commit_bytes_max {
            return;
        }
        if self.bodies.loading.as_ref().is_some_and(|loading| !self.on_disk.contains(&loading.from)) {
            self.bodies.loading = None;
        }
        if self.bodies.loading.as_ref().is_some_and(|loading| !loading.pending.is_empty() || loading.in_flight > 0) {
            self.top_up_compaction_reads();
        } else {
            self.start_compaction();
        }
    }
}

#[cfg(test)]
mod tests;
