//! The per-shard storage interface, the in-memory mailbox index shared by
//! every store, and the memory-only store.
//!
//! The message path talks to storage only through [`MailboxStore`]. Stores
//! hand out a commit ticket for every change; the shard releases an Ack (and
//! pushes the message) only once [`MailboxStore::committed_ticket`] has
//! reached the message's ticket, and [`MailboxStore::next_after`] never
//! returns a message that is not committed. [`MemoryStore`] commits at once;
//! the durable log (`crate::storage::LogStore`) commits with group commit.

use super::messages::DeviceKey;
use super::recipient_dedup::RecipientDedup;
use super::StateMap;
use crate::storage::io::LogIo;
use iris_protocol::ErrorCode;
use std::collections::VecDeque;
use std::rc::Rc;

/// A message as stored: one body shared by every recipient device's mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxMessage {
    /// Sending user.
    pub from_user: u64,
    /// Sending device.
    pub from_device: u32,
    /// The sender's id (recipient-side dedup of retries after a crash).
    pub client_msg_id: u64,
    /// Server-wide id.
    pub server_msg_id: u64,
    /// Acceptance time, ms since the Unix epoch.
    pub sent_at_ms: u64,
    /// Recipient user.
    pub to_user: u64,
    /// Opaque payload.
    pub payload: Vec<u8>,
}

impl MailboxMessage {
    /// The sending device.
    pub fn sender(&self) -> DeviceKey {
        DeviceKey { user: self.from_user, device: self.from_device }
    }
}

/// Why the store refused an operation. Each maps to a wire code.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// A device mailbox is at its message or byte cap.
    #[error("mailbox of user {} device {} is full", .0.user, .0.device)]
    MailboxFull(DeviceKey),
    /// The sending user holds its whole share of a device's mailbox.
    #[error("user {sender} holds its share of the mailbox of user {} device {}", .device.user, .device.device)]
    SenderShareFull {
        /// The recipient device.
        device: DeviceKey,
        /// The sending user.
        sender: u64,
    },
    /// The user already has the maximum number of devices.
    #[error("user {0} has the maximum number of devices")]
    TooManyDevices(u64),
    /// The shard holds the maximum number of devices.
    #[error("shard device registry is full")]
    RegistryFull,
    /// The shard's mailboxes hold `shard_mailbox_bytes_max` together.
    #[error("shard mailbox memory budget is used up")]
    ShardMailboxesFull,
    /// The underlying medium failed or is full.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Too much is waiting to be written (the disk is slower than the load).
    #[error("log write backlog is full")]
    Backlog,
    /// The device was removed; it cannot register again under this id.
    #[error("user {} device {} was removed", .0.user, .0.device)]
    DeviceRemoved(DeviceKey),
    /// No such device of that user.
    #[error("user {} has no device {}", .0.user, .0.device)]
    UnknownDevice(DeviceKey),
    /// The log takes its disk budget until devices drain.
    #[error("the shard's log is at its disk budget")]
    DiskBudget,
    /// A device's next seq would reach the end of the shard's durable seq
    /// reservation (only while extending it fails: see
    /// [`MailboxStore::seq_reservation`]).
    #[error("the shard's seq reservation is used up")]
    SeqsUnreserved,
}

impl StoreError {
    /// The wire code a client sees for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::MailboxFull(_) | StoreError::SenderShareFull { .. } => ErrorCode::MailboxFull,
            StoreError::TooManyDevices(_) => ErrorCode::TooManyDevices,
            StoreError::RegistryFull => ErrorCode::Throttle,
            StoreError::ShardMailboxesFull => ErrorCode::Throttle,
            StoreError::Unavailable(_) => ErrorCode::StorageUnavailable,
            StoreError::Backlog => ErrorCode::Throttle,
            StoreError::DeviceRemoved(_) => ErrorCode::DeviceRemoved,
            StoreError::UnknownDevice(_) => ErrorCode::UnknownDevice,
            StoreError::DiskBudget => ErrorCode::Throttle,
            StoreError::SeqsUnreserved => ErrorCode::Throttle,
        }
    }
}

/// What a store holds and has done, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// [`MAILBOX_ENTRY_OVERHEAD_BYTES`] per mailbox entry.
    pub index_bytes: u64,
    /// Payload bytes of the bodies in the index (the body cache).
    pub body_bytes: u64,
    /// Bodies read back and not pushed yet, reads in flight, and bodies
    /// gathered for a compaction.
    pub read_ahead_bytes: u64,
    /// Records read back from the log.
    pub reads_total: u64,
    /// Reads that failed (asked again later).
    pub read_failures_total: u64,
    /// Undelivered messages whose record could not be decoded when read back (dropped).
    pub unreadable_total: u64,
    /// Bodies let go from the cache.
    pub cooled_total: u64,
    /// Compactions made durable (a mostly dead segment's live entries and
    /// device states copied forward).
    pub compactions_total: u64,
    /// Mailbox entries those compactions moved.
    pub compacted_messages_total: u64,
    /// Disk the log takes.
    pub disk_bytes: u64,
    /// Disk the log may take.
    pub disk_budget_bytes: u64,
}

/// Bounds every store enforces.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Devices per user.
    pub devices_per_user_max: u32,
    /// Devices per shard.
    pub devices_per_shard_max: u32,
    /// Undelivered messages per device.
    pub mailbox_messages_max: u32,
    /// Undelivered payload bytes per device.
    pub mailbox_bytes_max: u64,
    /// Undelivered messages one sending user may hold in one device's
    /// mailbox (its share): so that no single sender can fill a mailbox
    /// and have the device removed (or its user refused) for it.
    pub mailbox_sender_messages_max: u32,
    /// Undelivered payload bytes one sending user may hold in one device's mailbox.
    pub mailbox_sender_bytes_max: u64,
    /// Recipient-side dedup entries per shard (sender device, client_msg_id);
    /// the oldest is forgotten first. About 60 bytes each.
    pub stored_dedup_entries_max: u32,
    /// Memory all mailboxes of the shard may hold together:
    /// [`MAILBOX_ENTRY_OVERHEAD_BYTES`] per (device, message) entry plus the
    /// bodies in memory (a durable store keeps at most its body cache and
    /// read-ahead of them; a memory-only store keeps all). Over it, Sends
    /// get Throttle until devices drain.
    pub shard_mailbox_bytes_max: u64,
}

/// What one mailbox entry costs in memory besides its body, charged
/// against `shard_mailbox_bytes_max`: the entry (64 B) in its deque, its
/// segment membership (~32 B), at most one sender share (32 B with its
/// hash-table slot, when the entry is its sender's only one in the mailbox)
/// and a share of the mailbox's own slots; rounded up.
pub const MAILBOX_ENTRY_OVERHEAD_BYTES: u64 = 128;

/// Removed devices remembered per user (so their ids cannot register again):
/// the newest 16; an older one could register again as a new, empty device.
pub const REMOVED_DEVICES_PER_USER_MAX: usize = 16;

/// What a mailbox holds next for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// This message, at this seq, can be pushed now.
    Ready(u64, Rc<MailboxMessage>),
    /// The message at this seq is durable but its body is not in memory:
    /// ask for it with [`LogIo::want_bodies`].
    Cold(u64),
}

/// A commit ticket: changes are durable once the store's committed ticket
/// is at least their ticket. Tickets increase by one per change.
pub type Ticket = u64;

/// Storage of one shard: the device registry and the device mailboxes. Its
/// log side (writes, reads, reclaim) is [`LogIo`].
pub trait MailboxStore: LogIo {
    /// Registers `device` (idempotent). Returns whether it was new.
    fn register_device(&mut self, device: DeviceKey) -> Result<bool, StoreError>;
    /// Whether `device`'s registration is not yet durable (a durable store
    /// answers Hello only once it is; a failed write is retried by the store).
    fn registration_pending(&self, _device: DeviceKey) -> bool {
        false
    }
    /// Devices registered for `user`, in registration order.
    fn devices_of(&self, user: u64) -> &[u32];
    /// Every registered device (once, at start, to seed the inactivity
    /// tracking).
    fn registered_devices(&self) -> Vec<DeviceKey>;
    /// Removes a registered device: its mailbox goes, and it may never
    /// register again under this id (remembered for the newest
    /// [`REMOVED_DEVICES_PER_USER_MAX`] removals of its user).
    fn remove_device(&mut self, device: DeviceKey) -> Result<(), StoreError>;
    /// Whether `device` was removed.
    fn is_removed(&self, device: DeviceKey) -> bool;
    /// Whether `device`'s removal is not yet durable.
    fn removal_pending(&self, _device: DeviceKey) -> bool {
        false
    }
    /// `device` was seen at `at_s` (s since the epoch): a session of it
    /// started (`online`) or its last one ended. A durable store logs it,
    /// so the inactivity clock survives restarts.
    fn note_seen(&mut self, _device: DeviceKey, _at_s: u64, _online: bool) {}
    /// Since when `device` has been idle as recovered from the log (s since
    /// the epoch), if the log knows.
    fn recovered_idle_since(&self, _device: DeviceKey) -> Option<u64> {
        None
    }
    /// Whether `device` could take one more message of `payload_bytes` from
    /// user `sender`: `SenderShareFull` if that sender holds its share of the
    /// mailbox, `MailboxFull` if the mailbox is at its cap.
    fn has_room(&self, device: DeviceKey, sender: u64, payload_bytes: usize) -> Result<(), StoreError>;
    /// Whether the shard's mailbox budget can take a message of
    /// `payload_bytes` for `devices` devices.
    fn shard_has_room(&self, _payload_bytes: usize, _devices: usize) -> Result<(), StoreError> {
        Ok(())
    }
    /// If `sender` already stored `client_msg_id` here: its server_msg_id and ticket.
    fn find_stored(&self, sender: DeviceKey, client_msg_id: u64) -> Option<(u64, Ticket)>;
    /// Appends `message` to the mailboxes of `devices` (registered, with room).
    fn store_message(&mut self, message: Rc<MailboxMessage>, devices: &[DeviceKey]) -> Result<Ticket, StoreError>;
    /// Forgets every message of `device` with seq <= `up_to_seq`.
    fn acknowledge(&mut self, device: DeviceKey, up_to_seq: u64);
    /// The first committed message of `device` with seq > `after_seq`, if any.
    fn next_after(&self, device: DeviceKey, after_seq: u64) -> Option<Next>;
    /// Highest seq assigned to `device` (0 if none).
    fn last_seq(&self, device: DeviceKey) -> u64;
    /// Records that `seq` of `device` was written to one of its push streams.
    fn note_pushed(&mut self, device: DeviceKey, seq: u64);
    /// Highest seq a Hello of `device` may acknowledge: the highest one ever
    /// pushed to it since this process started, or acknowledged before. A
    /// client cannot have processed a message it was never sent, so a larger
    /// `resume_after_seq` deletes nothing it has not seen.
    fn pushed_seq(&self, device: DeviceKey) -> u64;
    /// Every ticket up to this one has an outcome (durable or failed).
    fn committed_ticket(&self) -> Ticket;
    /// What the store holds, for the metrics.
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
    /// Whether the change with this (committed) ticket failed to become durable.
    fn ticket_failed(&self, _ticket: Ticket) -> bool {
        false
    }
    /// Where the store's seqs stand against their durable reservation, for
    /// a store whose seqs outlive the process (`None` otherwise). No device
    /// is given a seq at or above the reservation's end (a send that would
    /// is refused with [`StoreError::SeqsUnreserved`]), so after damage a
    /// restart can start every device above every seq handed out before.
    fn seq_reservation(&self) -> Option<SeqReservation> {
        None
    }
    /// Moves the reservation's end to `end`, which the caller has reserved
    /// durably (`layout::reserve_seqs`).
    fn extend_seq_reservation(&mut self, _end: u64) {}
}

/// A store's seqs against their durable reservation ([`MailboxStore::seq_reservation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqReservation {
    /// The highest seq any device has been given.
    pub high: u64,
    /// No seq at or above this is handed out.
    pub end: u64,
}

impl SeqReservation {
    /// The end to reserve next once the busiest device is within half a
    /// `block` of this one's end: a whole block above the highest seq
    /// handed out. `None` while more than half a block is left.
    pub fn extension(&self, block: u64) -> Option<u64> {
        (self.end.saturating_sub(self.high) <= block / 2).then(|| self.high.saturating_add(1 + block))
    }
}

/// Where a message's record lies in the log: it can be read back from
/// there once its change is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordAt {
    /// Log segment (0 for memory-only stores).
    pub segment: u64,
    /// Offset of the record in the segment file ([`RecordAt::NOWHERE`]'s for memory-only stores).
    pub offset: u64,
    /// Bytes to read there to hold the whole record: its exact size when
    /// appended, an upper bound when recovered (the scan does not keep sizes).
    pub bytes: u32,
}

impl RecordAt {
    /// Not in any log (memory-only stores).
    pub const NOWHERE: RecordAt = RecordAt { segment: 0, offset: u64::MAX, bytes: 0 };
}

/// One stored message in one device's mailbox: what delivery needs (64
/// bytes), and the body while it is in memory.
#[derive(Debug, Clone)]
pub struct MailboxEntry {
    /// Seq in this mailbox.
    pub seq: u64,
    /// The sending user (its share of the mailbox is charged for this entry).
    pub from_user: u64,
    /// Ticket of the change that stored it.
    pub ticket: Ticket,
    /// Log segment holding it (0 for memory-only stores).
    pub segment: u64,
    /// Offset and size of its record in `segment` (see [`RecordAt`]).
    pub offset: u64,
    /// See [`RecordAt::bytes`].
    pub record_bytes: u32,
    /// Size of the payload (counted against the device's byte cap whether
    /// the body is in memory or not).
    pub payload_bytes: u32,
    /// Server-wide id of the message.
    pub server_msg_id: u64,
    /// The shared body while it is in memory ("hot"); `None` once a durable
    /// store has let it go ("cold": it is read back from the log to be pushed).
    pub body: Option<Rc<MailboxMessage>>,
}

// What the index costs per queued message starts here: keep it at 64 bytes.
const _: () = assert!(std::mem::size_of::<MailboxEntry>() == 64);

impl MailboxEntry {
    /// Where its record lies.
    pub fn record_at(&self) -> RecordAt {
        RecordAt { segment: self.segment, offset: self.offset, bytes: self.record_bytes }
    }
}

/// One device's mailbox.
#[derive(Debug, Default)]
pub struct Mailbox {
    /// Unacknowledged messages in seq order.
    pub entries: VecDeque<MailboxEntry>,
    /// Payload bytes held in `entries`.
    pub bytes: u64,
    /// Highest seq assigned.
    pub last_seq: u64,
    /// Highest seq acknowledged.
    pub acked_seq: u64,
    /// Highest seq written to a push stream of the device by this process.
    pub pushed_seq: u64,
    /// What each sending user holds in `entries` (only senders with at
    /// least one entry: at most one share per entry).
    senders: StateMap<u64, SenderShare>,
}

/// What one sending user holds in one mailbox.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SenderShare {
    /// Entries.
    pub messages: u32,
    /// Payload bytes.
    pub bytes: u64,
}

impl Mailbox {
    /// What `sender` holds here.
    pub fn share_of(&self, sender: u64) -> SenderShare {
        self.senders.get(&sender).copied().unwrap_or_default()
    }

    /// Counts `entry` in (it is being added to `entries`).
    fn charge(&mut self, entry: &MailboxEntry) {
        self.bytes += u64::from(entry.payload_bytes);
        let share = self.senders.entry(entry.from_user).or_default();
        share.messages += 1;
        share.bytes += u64::from(entry.payload_bytes);
    }

    /// Counts `entry` out (it was taken out of `entries`).
    fn discharge(&mut self, entry: &MailboxEntry) {
        self.bytes -= u64::from(entry.payload_bytes);
        if let Some(share) = self.senders.get_mut(&entry.from_user) {
            share.messages -= 1;
            share.bytes -= u64::from(entry.payload_bytes);
            if share.messages == 0 {
                self.senders.remove(&entry.from_user);
            }
        }
    }
}

/// The in-memory state every store keeps: registry, mailboxes and the
/// recipient-side dedup window. Stores add durability around it.
#[derive(Debug)]
pub struct MailboxIndex {
    /// Enforced bounds.
    limits: StoreLimits,
    /// Devices of each user homed here.
    users: StateMap<u64, Vec<u32>>,
    /// Mailbox of each registered device.
    mailboxes: StateMap<DeviceKey, Mailbox>,
    /// Removed devices of each user with their removal ordinals, oldest first (at most
    /// [`REMOVED_DEVICES_PER_USER_MAX`] each).
    removed: StateMap<u64, VecDeque<(u32, u64)>>,
    /// [`MAILBOX_ENTRY_OVERHEAD_BYTES`] per entry held.
    index_bytes: u64,
    /// Payload bytes of the entries whose body is in memory (counted per
    /// entry: a body shared by two devices counts twice).
    hot_bytes: u64,
    /// Entries whose body is in memory.
    hot_entries: u64,
    /// (sender, client_msg_id) -> (server_msg_id, ticket) of the last
    /// `stored_dedup_entries_max` stored messages.
    stored: RecipientDedup,
    /// No device's seq is below it ([`MailboxIndex::raise_seq_floor`]).
    seq_floor: u64,
    /// The highest seq any device of the shard has had since this index was
    /// built: a durable seq reservation (`layout::reserve_seqs`) must stay
    /// above it.
    seq_high: u64,
}

impl MailboxIndex {
    /// An empty index.
    pub fn new(limits: StoreLimits) -> MailboxIndex {
        MailboxIndex {
            users: StateMap::default(),
            mailboxes: StateMap::default(),
            removed: StateMap::default(),
            index_bytes: 0,
            hot_bytes: 0,
            hot_entries: 0,
            stored: RecipientDedup::new(limits.stored_dedup_entries_max),
            limits,
            seq_floor: 0,
            seq_high: 0,
        }
    }

    /// Raises every device's last seq to at least `floor`, and starts
    /// devices that register from now on there. After a recovery that
    /// skipped damaged records (one may have held a device's newest seq, or
    /// its registration) this keeps seqs from going backwards: `floor` is
    /// above every seq handed out before (see `layout::seq_floor`).
    pub fn raise_seq_floor(&mut self, floor: u64) {
        self.seq_floor = self.seq_floor.max(floor);
        self.seq_high = self.seq_high.max(floor);
        for mailbox in self.mailboxes.values_mut() {
            mailbox.last_seq = mailbox.last_seq.max(floor);
        }
    }

    /// The seq no device's last seq is below.
    pub fn seq_floor(&self) -> u64 {
        self.seq_floor
    }

    /// The highest seq any device has had since this index was built.
    pub fn seq_high(&self) -> u64 {
        self.seq_high
    }

    /// The bounds.
    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    /// Registers `device`; returns whether it was new.
    pub fn register(&mut self, device: DeviceKey) -> Result<bool, StoreError> {
        if self.mailboxes.contains_key(&device) {
            return Ok(false);
        }
        if self.is_removed(device) {
            return Err(StoreError::DeviceRemoved(device));
        }
        if self.mailboxes.len() >= self.limits.devices_per_shard_max as usize {
            return Err(StoreError::RegistryFull);
        }
        let devices = self.users.entry(device.user).or_default();
        if devices.len() >= self.limits.devices_per_user_max as usize {
            return Err(StoreError::TooManyDevices(device.user));
        }
        devices.push(device.device);
        self.mailboxes.insert(device, Mailbox { last_seq: self.seq_floor, ..Mailbox::default() });
        Ok(true)
    }

    /// Registers `device` during recovery, ignoring the per-user and
    /// per-shard bounds (they were enforced when it first registered).
    pub fn register_recovered(&mut self, device: DeviceKey) {
        if !self.mailboxes.contains_key(&device) && !self.is_removed(device) {
            self.users.entry(device.user).or_default().push(device.device);
            self.mailboxes.insert(device, Mailbox { last_seq: self.seq_floor, ..Mailbox::default() });
        }
    }

    /// Removes a registered `device` and remembers it as removed, with the
    /// next removal ordinal of its user. Returns its mailbox, the ordinal and
    /// the removal forgotten to keep [`REMOVED_DEVICES_PER_USER_MAX`], or
    /// `None` (nothing changed) if it is not registered.
    pub fn remove_registered(&mut self, device: DeviceKey) -> Option<(Mailbox, u64, Option<DeviceKey>)> {
        if !self.mailboxes.contains_key(&device) {
            return None;
        }
        let ordinal = self.removed.get(&device.user).and_then(|removed| removed.back()).map_or(1, |(_, last)| last + 1);
        let (mailbox, forgotten) = self.remember_removed(device, ordinal);
        Some((mailbox.unwrap_or_default(), ordinal, forgotten))
    }

    /// Remembers `device` as removed with `ordinal` (recovery replays
    /// removals in log order, which compaction copies can change: the
    /// ordinal, not the order, says which are the newest), dropping its
    /// mailbox if it has one. Returns the mailbox and the removal forgotten
    /// to keep at most [`REMOVED_DEVICES_PER_USER_MAX`] per user (possibly
    /// this one, if older than all those kept).
    pub fn remember_removed(&mut self, device: DeviceKey, ordinal: u64) -> (Option<Mailbox>, Option<DeviceKey>) {
        let mailbox = self.mailboxes.remove(&device);
        for entry in mailbox.iter().flat_map(|mailbox| mailbox.entries.iter()) {
            Self::uncharge(&mut self.index_bytes, &mut self.hot_bytes, &mut self.hot_entries, entry);
        }
        if let Some(devices) = self.users.get_mut(&device.user) {
            devices.retain(|known| *known != device.device);
            if devices.is_empty() {
                self.users.remove(&device.user);
            }
        }
        let removed = self.removed.entry(device.user).or_default();
        let mut forgotten = None;
        // Listed already (an older removal of the same id replayed first):
        // the newer ordinal wins, in its sorted place.
        let ordinal = match removed.iter().position(|(known, _)| *known == device.device) {
            Some(position) => removed.remove(position).map_or(ordinal, |(_, known)| known.max(ordinal)),
            None => ordinal,
        };
        let position = removed.partition_point(|(_, known)| *known < ordinal);
        removed.insert(position, (device.device, ordinal));
        if removed.len() > REMOVED_DEVICES_PER_USER_MAX {
            forgotten = removed.pop_front().map(|(oldest, _)| DeviceKey { user: device.user, device: oldest });
        }
        (mailbox, forgotten)
    }

    /// Forgets that `device` was removed (recovery: a registration logged
    /// after its removal means the removal had been forgotten, as only then
    /// can the id register again).
    pub fn forget_removed(&mut self, device: DeviceKey) {
        if let Some(removed) = self.removed.get_mut(&device.user) {
            removed.retain(|(known, _)| *known != device.device);
            if removed.is_empty() {
                self.removed.remove(&device.user);
            }
        }
    }

    /// The removal a new removal of one of `user`'s devices would forget.
    pub fn removal_to_forget(&self, user: u64) -> Option<DeviceKey> {
        let removed = self.removed.get(&user).filter(|removed| removed.len() >= REMOVED_DEVICES_PER_USER_MAX)?;
        removed.front().map(|(device, _)| DeviceKey { user, device: *device })
    }

    /// The ordinal of `device`'s removal, if it is remembered as removed.
    pub fn removal_ordinal(&self, device: DeviceKey) -> Option<u64> {
        let removed = self.removed.get(&device.user)?;
        removed.iter().find(|(known, _)| *known == device.device).map(|(_, ordinal)| *ordinal)
    }

    /// The mailbox of a registered device.
    pub fn mailbox(&self, device: DeviceKey) -> Option<&Mailbox> {
        self.mailboxes.get(&device)
    }

    /// Whether `device` is remembered as removed.
    pub fn is_removed(&self, device: DeviceKey) -> bool {
        self.removed.get(&device.user).is_some_and(|removed| removed.iter().any(|(known, _)| *known == device.device))
    }

    /// Every removed device remembered, for checkpoints.
    pub fn removed_devices(&self) -> impl Iterator<Item = DeviceKey> + '_ {
        self.removed
            .iter()
            .flat_map(|(user, devices)| devices.iter().map(|(device, _)| DeviceKey { user: *user, device: *device }))
    }

    /// Devices of `user`.
    pub fn devices_of(&self, user: u64) -> &[u32] {
        self.users.get(&user).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every registered device with its mailbox.
    pub fn mailboxes(&self) -> impl Iterator<Item = (&DeviceKey, &Mailbox)> {
        self.mailboxes.iter()
    }

    /// See [`MailboxStore::has_room`]. The sender's share is checked
    /// first: a sender over it is refused whether or not the mailbox is full.
    pub fn has_room(&self, device: DeviceKey, sender: u64, payload_bytes: usize) -> Result<(), StoreError> {
        let Some(mailbox) = self.mailboxes.get(&device) else { return Ok(()) };
        let share = mailbox.share_of(sender);
        if share.messages >= self.limits.mailbox_sender_messages_max
            || share.bytes + payload_bytes as u64 > self.limits.mailbox_sender_bytes_max
        {
            return Err(StoreError::SenderShareFull { device, sender });
        }
        if mailbox.entries.len() >= self.limits.mailbox_messages_max as usize
            || mailbox.bytes + payload_bytes as u64 > self.limits.mailbox_bytes_max
        {
            return Err(StoreError::MailboxFull(device));
        }
        Ok(())
    }

    /// See [`MailboxStore::shard_has_room`]; `elsewhere` is memory the
    /// store holds for mailboxes outside the index (read-ahead).
    pub fn shard_has_room(&self, payload_bytes: usize, devices: usize, elsewhere: u64) -> Result<(), StoreError> {
        let needed = (payload_bytes as u64 + MAILBOX_ENTRY_OVERHEAD_BYTES) * devices as u64;
        if self.charged_bytes() + elsewhere + needed > self.limits.shard_mailbox_bytes_max {
            return Err(StoreError::ShardMailboxesFull);
        }
        Ok(())
    }

    /// Bytes the index holds against the shard budget: entries and the bodies in memory.
    pub fn charged_bytes(&self) -> u64 {
        self.index_bytes + self.hot_bytes
    }

    /// [`MAILBOX_ENTRY_OVERHEAD_BYTES`] per entry held.
    pub fn index_bytes(&self) -> u64 {
        self.index_bytes
    }

    /// Payload bytes of entries whose body is in memory.
    pub fn hot_bytes(&self) -> u64 {
        self.hot_bytes
    }

    /// Entries whose body is in memory.
    pub fn hot_entries(&self) -> u64 {
        self.hot_entries
    }

    /// Takes `entry`'s charges off the counters (a free function of the
    /// fields, so callers can hold a mailbox borrowed meanwhile).
    fn uncharge(index_bytes: &mut u64, hot_bytes: &mut u64, hot_entries: &mut u64, entry: &MailboxEntry) {
        *index_bytes -= MAILBOX_ENTRY_OVERHEAD_BYTES;
        if entry.body.is_some() {
            *hot_bytes -= u64::from(entry.payload_bytes);
            *hot_entries -= 1;
        }
    }

    /// Lets the body of the entry (device, seq) go, if it is in memory and
    /// its ticket is `ticket` (the one the caller saw it stored with).
    /// Returns whether it did.
    pub fn cool(&mut self, device: DeviceKey, seq: u64, ticket: Ticket) -> bool {
        let Some(entry) = self.entry_mut(device, seq) else { return false };
        if entry.ticket != ticket || entry.body.is_none() {
            return false;
        }
        entry.body = None;
        let payload = u64::from(entry.payload_bytes);
        self.hot_bytes -= payload;
        self.hot_entries -= 1;
        true
    }

    /// Drops the single entry (device, seq) (its record cannot be read back).
    pub fn remove_entry(&mut self, device: DeviceKey, seq: u64) -> Option<MailboxEntry> {
        let mailbox = self.mailboxes.get_mut(&device)?;
        let position = mailbox.entries.binary_search_by_key(&seq, |entry| entry.seq).ok()?;
        let entry = mailbox.entries.remove(position)?;
        mailbox.discharge(&entry);
        Self::uncharge(&mut self.index_bytes, &mut self.hot_bytes, &mut self.hot_entries, &entry);
        Some(entry)
    }

    fn entry_mut(&mut self, device: DeviceKey, seq: u64) -> Option<&mut MailboxEntry> {
        let mailbox = self.mailboxes.get_mut(&device)?;
        let position = mailbox.entries.binary_search_by_key(&seq, |entry| entry.seq).ok()?;
        mailbox.entries.get_mut(position)
    }

    /// See [`MailboxStore::find_stored`].
    pub fn find_stored(&self, sender: DeviceKey, client_msg_id: u64) -> Option<(u64, Ticket)> {
        self.stored.find(sender, client_msg_id)
    }

    /// Remembers that `sender`'s `client_msg_id` was stored as `server_msg_id`.
    pub fn remember_stored(&mut self, sender: DeviceKey, client_msg_id: u64, server_msg_id: u64, ticket: Ticket) {
        self.stored.remember(sender, client_msg_id, server_msg_id, ticket);
    }

    /// Assigns the next seq of `device` to `message`. The device must be registered.
    pub fn append(&mut self, device: DeviceKey, message: &Rc<MailboxMessage>, ticket: Ticket, at: RecordAt) -> u64 {
        let mailbox = self.mailboxes.get_mut(&device).expect("append to a registered device");
        mailbox.last_seq += 1;
        let seq = mailbox.last_seq;
        self.insert(device, seq, message, ticket, at);
        seq
    }

    /// Puts `message` at `seq` in `device`'s mailbox (recovery: seqs come from the log,
    /// and a compacted copy may come after newer messages). Ignores seqs already
    /// acknowledged or already present; returns whether it was added.
    pub fn insert(
        &mut self,
        device: DeviceKey,
        seq: u64,
        message: &Rc<MailboxMessage>,
        ticket: Ticket,
        at: RecordAt,
    ) -> bool {
        self.register_recovered(device);
        // A removed device stays removed.
        let Some(mailbox) = self.mailboxes.get_mut(&device) else { return false };
        mailbox.last_seq = mailbox.last_seq.max(seq);
        self.seq_high = self.seq_high.max(seq);
        if seq <= mailbox.acked_seq {
            return false;
        }
        let payload_bytes = u32::try_from(message.payload.len()).expect("payloads are bounded by the frame size");
        let entry = MailboxEntry {
            seq,
            from_user: message.from_user,
            ticket,
            segment: at.segment,
            offset: at.offset,
            record_bytes: at.bytes,
            payload_bytes,
            server_msg_id: message.server_msg_id,
            body: Some(Rc::clone(message)),
        };
        let position = if mailbox.entries.back().is_none_or(|last| last.seq < seq) {
            mailbox.entries.len()
        } else {
            match mailbox.entries.binary_search_by_key(&seq, |entry| entry.seq) {
                Ok(_) => return false,
                Err(position) => position,
            }
        };
        mailbox.charge(&entry);
        mailbox.entries.insert(position, entry);
        self.index_bytes += MAILBOX_ENTRY_OVERHEAD_BYTES;
        self.hot_bytes += u64::from(payload_bytes);
        self.hot_entries += 1;
        true
    }

    /// The entry (device, seq), if the mailbox holds it.
    pub fn entry(&self, device: DeviceKey, seq: u64) -> Option<&MailboxEntry> {
        let mailbox = self.mailboxes.get(&device)?;
        let position = mailbox.entries.binary_search_by_key(&seq, |entry| entry.seq).ok()?;
        mailbox.entries.get(position)
    }

    /// Records that the entry (device, seq) now lives in segment `to` (it was
    /// copied there by compaction). Returns false if it is gone or elsewhere.
    pub fn relocate(&mut self, device: DeviceKey, seq: u64, from: u64, to: RecordAt) -> bool {
        let Some(mailbox) = self.mailboxes.get_mut(&device) else { return false };
        let Ok(position) = mailbox.entries.binary_search_by_key(&seq, |entry| entry.seq) else { return false };
        let entry = &mut mailbox.entries[position];
        if entry.segment != from {
            return false;
        }
        (entry.segment, entry.offset, entry.record_bytes) = (to.segment, to.offset, to.bytes);
        true
    }

    /// Raises `device`'s last seq (recovery from a checkpoint).
    pub fn raise_last_seq(&mut self, device: DeviceKey, last_seq: u64) {
        self.register_recovered(device);
        if let Some(mailbox) = self.mailboxes.get_mut(&device) {
            mailbox.last_seq = mailbox.last_seq.max(last_seq);
            self.seq_high = self.seq_high.max(mailbox.last_seq);
        }
    }

    /// Drops entries with seq <= `up_to_seq`; returns the dropped entries.
    pub fn acknowledge(&mut self, device: DeviceKey, up_to_seq: u64) -> Vec<MailboxEntry> {
        let Some(mailbox) = self.mailboxes.get_mut(&device) else { return Vec::new() };
        let up_to_seq = up_to_seq.min(mailbox.last_seq);
        mailbox.acked_seq = mailbox.acked_seq.max(up_to_seq);
        let mut dropped = Vec::new();
        while mailbox.entries.front().is_some_and(|entry| entry.seq <= up_to_seq) {
            if let Some(entry) = mailbox.entries.pop_front() {
                mailbox.discharge(&entry);
                Self::uncharge(&mut self.index_bytes, &mut self.hot_bytes, &mut self.hot_entries, &entry);
                dropped.push(entry);
            }
        }
        dropped
    }

    /// Removes the entries `entries` (device, seq) whose ticket is in
    /// `first..=last` (their change failed to become durable), and the dedup
    /// entries of that range. The caller names the entries (it keeps the
    /// uncommitted ones), so this costs what failed, not every mailbox.
    pub fn remove_failed(
        &mut self,
        entries: &[(DeviceKey, u64)],
        first: Ticket,
        last: Ticket,
    ) -> Vec<(DeviceKey, MailboxEntry)> {
        let mut removed = Vec::new();
        for &(device, seq) in entries {
            let Some(mailbox) = self.mailboxes.get_mut(&device) else { continue };
            let Ok(position) = mailbox.entries.binary_search_by_key(&seq, |entry| entry.seq) else { continue };
            if !(first..=last).contains(&mailbox.entries[position].ticket) {
                continue;
            }
            if let Some(entry) = mailbox.entries.remove(position) {
                mailbox.discharge(&entry);
                Self::uncharge(&mut self.index_bytes, &mut self.hot_bytes, &mut self.hot_entries, &entry);
                removed.push((device, entry));
            }
        }
        self.stored.forget_tickets(first, last);
        removed
    }

    /// The entries of `device` with seq > `after_seq`, in seq order.
    pub fn entries_after(&self, device: DeviceKey, after_seq: u64) -> impl Iterator<Item = &MailboxEntry> {
        let entries = self.mailboxes.get(&device).map(|mailbox| &mailbox.entries);
        let start = entries.map_or(0, |entries| {
            let Some(first) = entries.front() else { return 0 };
            // Seqs are increasing but may have gaps (failed writes), so
            // start at the position a gap-free mailbox would have and step
            // back if needed (almost always zero steps).
            let guess = usize::try_from(after_seq.saturating_add(1).saturating_sub(first.seq)).unwrap_or(usize::MAX);
            let mut index = guess.min(entries.len());
            while index > 0 && entries[index - 1].seq > after_seq {
                index -= 1;
            }
            index
        });
        entries.into_iter().flat_map(move |entries| entries.range(start..))
    }

    /// The first entry of `device` with seq > `after_seq` whose ticket is <= `committed`.
    pub fn next_after(&self, device: DeviceKey, after_seq: u64, committed: Ticket) -> Option<&MailboxEntry> {
        let entry = self.entries_after(device, after_seq).next()?;
        debug_assert!(entry.seq > after_seq);
        (entry.ticket <= committed).then_some(entry)
    }

    /// Highest seq assigned to `device`.
    pub fn last_seq(&self, device: DeviceKey) -> u64 {
        self.mailboxes.get(&device).map_or(0, |mailbox| mailbox.last_seq)
    }

    /// See [`MailboxStore::note_pushed`].
    pub fn note_pushed(&mut self, device: DeviceKey, seq: u64) {
        if let Some(mailbox) = self.mailboxes.get_mut(&device) {
            debug_assert!(seq <= mailbox.last_seq, "pushed a seq that was never assigned");
            mailbox.pushed_seq = mailbox.pushed_seq.max(seq);
        }
    }

    /// See [`MailboxStore::pushed_seq`].
    pub fn pushed_seq(&self, device: DeviceKey) -> u64 {
        self.mailboxes.get(&device).map_or(0, |mailbox| mailbox.pushed_seq.max(mailbox.acked_seq))
    }

    /// Highest seq acknowledged by `device`.
    pub fn acked_seq(&self, device: DeviceKey) -> u64 {
        self.mailboxes.get(&device).map_or(0, |mailbox| mailbox.acked_seq)
    }
}

/// Memory-only store (`durability = "none"`): every change is committed as
/// soon as it is made, and everything is lost when the process stops.
#[derive(Debug)]
pub struct MemoryStore {
    /// Registry, mailboxes and dedup window.
    index: MailboxIndex,
    /// Last ticket handed out (and committed).
    last_ticket: Ticket,
}

impl MemoryStore {
    /// An empty store with these bounds.
    pub fn new(limits: StoreLimits) -> MemoryStore {
        MemoryStore { index: MailboxIndex::new(limits), last_ticket: 0 }
    }
}

/// Writes and reads nothing: every default.
impl LogIo for MemoryStore {}

impl MailboxStore for MemoryStore {
    fn register_device(&mut self, device: DeviceKey) -> Result<bool, StoreError> {
        self.index.register(device)
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
        self.index.remove_registered(device).map(|_| ()).ok_or(StoreError::UnknownDevice(device))
    }

    fn is_removed(&self, device: DeviceKey) -> bool {
        self.index.is_removed(device)
    }

    fn has_room(&self, device: DeviceKey, sender: u64, payload_bytes: usize) -> Result<(), StoreError> {
        self.index.has_room(device, sender, payload_bytes)
    }

    fn shard_has_room(&self, payload_bytes: usize, devices: usize) -> Result<(), StoreError> {
        self.index.shard_has_room(payload_bytes, devices, 0)
    }

    fn find_stored(&self, sender: DeviceKey, client_msg_id: u64) -> Option<(u64, Ticket)> {
        self.index.find_stored(sender, client_msg_id)
    }

    fn store_message(&mut self, message: Rc<MailboxMessage>, devices: &[DeviceKey]) -> Result<Ticket, StoreError> {
        self.last_ticket += 1;
        for device in devices {
            self.index.append(*device, &message, self.last_ticket, RecordAt::NOWHERE);
        }
        self.index.remember_stored(message.sender(), message.client_msg_id, message.server_msg_id, self.last_ticket);
        Ok(self.last_ticket)
    }

    fn acknowledge(&mut self, device: DeviceKey, up_to_seq: u64) {
        self.index.acknowledge(device, up_to_seq);
    }

    fn next_after(&self, device: DeviceKey, after_seq: u64) -> Option<Next> {
        let entry = self.index.next_after(device, after_seq, self.last_ticket)?;
        // Nothing goes cold here: the memory is the only copy.
        let body = entry.body.as_ref().expect("a memory-only store keeps every body");
        Some(Next::Ready(entry.seq, Rc::clone(body)))
    }

    fn last_seq(&self, device: DeviceKey) -> u64 {
        self.index.last_seq(device)
    }

    fn note_pushed(&mut self, device: DeviceKey, seq: u64) {
        self.index.note_pushed(device, seq);
    }

    fn pushed_seq(&self, device: DeviceKey) -> u64 {
        self.index.pushed_seq(device)
    }

    fn committed_ticket(&self) -> Ticket {
        self.last_ticket
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            index_bytes: self.index.index_bytes(),
            body_bytes: self.index.hot_bytes(),
            ..StoreStats::default()
        }
    }
}
