//! The per-shard storage interface and its in-memory implementation.
//!
//! The message path talks to storage only through [`MailboxStore`]. Appends
//! return a commit ticket; the shard releases an Ack (and pushes the message)
//! only once [`MailboxStore::committed_ticket`] has reached that ticket. The
//! in-memory store commits at once; the durable log (a later capability)
//! implements the same trait with group commit, without touching the message
//! path.

use super::messages::DeviceKey;
use iris_protocol::ErrorCode;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

/// A message as stored: one body shared by every recipient device's mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Sending user.
    pub from_user: u64,
    /// Sending device.
    pub from_device: u32,
    /// Server-wide id.
    pub server_msg_id: u64,
    /// Acceptance time, ms since the Unix epoch.
    pub sent_at_ms: u64,
    /// Opaque payload.
    pub payload: Vec<u8>,
}

/// Why the store refused an operation. Each maps to a wire code.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// A device mailbox is at its message or byte cap.
    #[error("mailbox of user {} device {} is full", .0.user, .0.device)]
    MailboxFull(DeviceKey),
    /// The user already has the maximum number of devices.
    #[error("user {0} has the maximum number of devices")]
    TooManyDevices(u64),
    /// The shard holds the maximum number of devices.
    #[error("shard device registry is full")]
    RegistryFull,
    /// The underlying medium failed (durable stores only).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// The wire code a client sees for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::MailboxFull(_) => ErrorCode::MailboxFull,
            StoreError::TooManyDevices(_) => ErrorCode::TooManyDevices,
            StoreError::RegistryFull => ErrorCode::Throttle,
            StoreError::Unavailable(_) => ErrorCode::StorageUnavailable,
        }
    }
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
}

/// A commit ticket: appends are durable once the store's committed ticket
/// is at least the append's ticket.
pub type Ticket = u64;

/// Storage of one shard: the device registry and the device mailboxes.
pub trait MailboxStore {
    /// Registers `device` (idempotent). Returns whether it was new.
    fn register_device(&mut self, device: DeviceKey) -> Result<bool, StoreError>;
    /// Devices registered for `user`, in registration order.
    fn devices_of(&self, user: u64) -> &[u32];
    /// Whether `device` could take one more message of `payload_bytes`.
    fn has_room(&self, device: DeviceKey, payload_bytes: usize) -> Result<(), StoreError>;
    /// Appends to a registered device's mailbox; returns its new seq and the ticket.
    fn append(&mut self, device: DeviceKey, message: Rc<StoredMessage>) -> Result<(u64, Ticket), StoreError>;
    /// Forgets every message of `device` with seq <= `up_to_seq`.
    fn acknowledge(&mut self, device: DeviceKey, up_to_seq: u64);
    /// The first message with seq > `after_seq`, if any is stored.
    fn next_after(&self, device: DeviceKey, after_seq: u64) -> Option<(u64, Rc<StoredMessage>)>;
    /// Highest seq assigned to `device` (0 if none).
    fn last_seq(&self, device: DeviceKey) -> u64;
    /// Highest ticket that is durable.
    fn committed_ticket(&self) -> Ticket;
}

/// One device's mailbox.
#[derive(Debug, Default)]
struct Mailbox {
    /// Unacknowledged messages in seq order; seqs are consecutive.
    messages: VecDeque<(u64, Rc<StoredMessage>)>,
    /// Payload bytes held in `messages`.
    bytes: u64,
    /// Highest seq assigned.
    last_seq: u64,
}

/// In-memory store: everything is "committed" as soon as it is appended.
/// Memory: bounded by the registry bound times the per-device mailbox bounds;
/// see docs/decisions/0004-mailbox-semantics.md.
#[derive(Debug)]
pub struct MemoryStore {
    /// Enforced bounds.
    limits: StoreLimits,
    /// Devices of each user homed here.
    users: HashMap<u64, Vec<u32>>,
    /// Mailbox of each registered device.
    mailboxes: HashMap<DeviceKey, Mailbox>,
    /// Last ticket handed out (and committed).
    last_ticket: Ticket,
}

impl MemoryStore {
    /// An empty store with these bounds.
    pub fn new(limits: StoreLimits) -> MemoryStore {
        MemoryStore { limits, users: HashMap::new(), mailboxes: HashMap::new(), last_ticket: 0 }
    }
}

impl MailboxStore for MemoryStore {
    fn register_device(&mut self, device: DeviceKey) -> Result<bool, StoreError> {
        if self.mailboxes.contains_key(&device) {
            return Ok(false);
        }
        if self.mailboxes.len() >= self.limits.devices_per_shard_max as usize {
            return Err(StoreError::RegistryFull);
        }
        let devices = self.users.entry(device.user).or_default();
        if devices.len() >= self.limits.devices_per_user_max as usize {
            return Err(StoreError::TooManyDevices(device.user));
        }
        devices.push(device.device);
        self.mailboxes.insert(device, Mailbox::default());
        Ok(true)
    }

    fn devices_of(&self, user: u64) -> &[u32] {
        self.users.get(&user).map(Vec::as_slice).unwrap_or(&[])
    }

    fn has_room(&self, device: DeviceKey, payload_bytes: usize) -> Result<(), StoreError> {
        let Some(mailbox) = self.mailboxes.get(&device) else {
            return Ok(());
        };
        if mailbox.messages.len() >= self.limits.mailbox_messages_max as usize
            || mailbox.bytes + payload_bytes as u64 > self.limits.mailbox_bytes_max
        {
            return Err(StoreError::MailboxFull(device));
        }
        Ok(())
    }

    fn append(&mut self, device: DeviceKey, message: Rc<StoredMessage>) -> Result<(u64, Ticket), StoreError> {
        self.has_room(device, message.payload.len())?;
        let mailbox = self.mailboxes.get_mut(&device).ok_or(StoreError::Unavailable("unregistered device".into()))?;
        mailbox.last_seq += 1;
        mailbox.bytes += message.payload.len() as u64;
        mailbox.messages.push_back((mailbox.last_seq, message));
        self.last_ticket += 1;
        Ok((mailbox.last_seq, self.last_ticket))
    }

    fn acknowledge(&mut self, device: DeviceKey, up_to_seq: u64) {
        let Some(mailbox) = self.mailboxes.get_mut(&device) else {
            return;
        };
        while let Some((seq, message)) = mailbox.messages.front() {
            if *seq > up_to_seq {
                break;
            }
            mailbox.bytes -= message.payload.len() as u64;
            mailbox.messages.pop_front();
        }
    }

    fn next_after(&self, device: DeviceKey, after_seq: u64) -> Option<(u64, Rc<StoredMessage>)> {
        let mailbox = self.mailboxes.get(&device)?;
        let (first_seq, _) = mailbox.messages.front()?;
        let index = after_seq.saturating_add(1).saturating_sub(*first_seq);
        let (seq, message) = mailbox.messages.get(usize::try_from(index).ok()?)?;
        debug_assert!(*seq > after_seq);
        Some((*seq, Rc::clone(message)))
    }

    fn last_seq(&self, device: DeviceKey) -> u64 {
        self.mailboxes.get(&device).map_or(0, |m| m.last_seq)
    }

    fn committed_ticket(&self) -> Ticket {
        self.last_ticket
    }
}
