//! Messages exchanged between shards. They are owned and `Send`: they are the
//! only data that crosses cores.

use iris_protocol::ErrorCode;

/// A device, globally: (user, device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    /// The user.
    pub user: u64,
    /// The device within the user.
    pub device: u32,
}

/// A refusal carried back to the sender's shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The wire code for the client.
    pub code: ErrorCode,
    /// Backoff hint for retryable codes.
    pub retry_after_ms: u32,
}

/// One cross-shard message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShardMessage {
    /// Sender's shard -> recipient's home shard: store this for every device of `to_user`.
    Store {
        /// Shard to answer with [`ShardMessage::StoreOutcome`].
        origin_shard: u16,
        /// The sending device.
        sender: DeviceKey,
        /// The sender's id, echoed in the answer.
        client_msg_id: u64,
        /// Assigned by the origin shard.
        server_msg_id: u64,
        /// Acceptance time, ms since the Unix epoch.
        sent_at_ms: u64,
        /// Acceptance time on the origin's monotonic clock (CoDel's sojourn).
        accepted_at_ms: u64,
        /// The recipient user.
        to_user: u64,
        /// The sender's earlier Send to `to_user` that must be stored first
        /// (`frames::Send::after`).
        after: Option<u64>,
        /// The opaque payload.
        payload: Vec<u8>,
    },
    /// Recipient's shard -> sender's shard: the outcome of a Store, sent only
    /// once the message is committed in every recipient mailbox.
    StoreOutcome {
        /// The sending device.
        sender: DeviceKey,
        /// When the origin shard accepted the Send, on its monotonic clock
        /// (echoed, so the origin measures the whole sojourn for CoDel).
        accepted_at_ms: u64,
        /// The recipient user and the payload's size (a refused send's rate
        /// tokens are given back).
        to_user: u64,
        /// See `to_user`.
        payload_bytes: u32,
        /// The sender's id.
        client_msg_id: u64,
        /// `Ok(server_msg_id)` or why it was refused.
        result: Result<u64, Refusal>,
    },
    /// Watcher's home shard -> watched user's home shard: `watcher` watches
    /// `user` (answered with a [`ShardMessage::PresenceUpdate`] at once).
    /// In the durable class of the channel: a lost one would leave the
    /// watcher without state.
    PresenceWatch {
        /// The watching device.
        watcher: crate::shard::presence::Watcher,
        /// The watched user.
        user: u64,
    },
    /// Watcher's home shard -> watched user's home shard: stop.
    PresenceUnwatch {
        /// The watching device.
        watcher: crate::shard::presence::Watcher,
        /// The watched user.
        user: u64,
    },
    /// Watched user's home shard -> watcher's home shard: what `watcher`
    /// now sees of `user`. Ephemeral: coalesced per (watcher, user) in the
    /// outbox, and shed first under load.
    PresenceUpdate {
        /// The watching device.
        watcher: crate::shard::presence::Watcher,
        /// The watched user.
        user: u64,
        /// What it sees.
        state: crate::shard::presence::Visible,
    },
    /// Typing device's home shard -> recipient's home shard: `from` types
    /// to `to_user` (or stopped). Ephemeral, like [`ShardMessage::PresenceUpdate`].
    Typing {
        /// The typing device.
        from: DeviceKey,
        /// The user typed to.
        to_user: u64,
        /// Typing or stopped.
        active: bool,
    },
}
