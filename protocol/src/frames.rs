//! The frame types of protocol version 1.
//!
//! Each frame is one rkyv-archived struct. On the wire it is preceded by the
//! header described in [`crate::codec`], whose kind byte says which struct
//! follows. Field types are fixed-width integers, `String` and `Vec<u8>`: the
//! archived form is pinned to little-endian, unaligned, 32-bit relative
//! pointers (see the crate's rkyv features), so it does not depend on the host.

use rkyv::{Archive, Deserialize, Serialize};

/// First frame on a connection's request stream: authenticates the device.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Access token minted by `irisd token` (user id, device id, expiry, Ed25519 signature).
    pub token: String,
    /// The highest seq this device has durably processed; everything at or
    /// below it is treated as acknowledged, everything above it is redelivered.
    pub resume_after_seq: u64,
}

/// Answer to a valid Hello on the device's home shard.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The authenticated user, from the token.
    pub user_id: u64,
    /// The authenticated device, from the token.
    pub device_id: u32,
    /// Index of the shard that serves this connection.
    pub shard: u16,
    /// Epoch of the shard map the shard used to decide it is the home shard.
    pub epoch: u64,
    /// The highest seq assigned so far to this device (0 if none).
    pub last_seq: u64,
}

/// Answer to a Hello that reached a shard which is not the user's home shard.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// Epoch of the shard map that says where the home shard is.
    pub epoch: u64,
    /// Host (IP address or name) of the node that owns the home shard.
    pub address: String,
    /// UDP port of the home shard on that node.
    pub port: u16,
}

/// Asks for the current shard map; allowed before Hello.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ShardMapRequest {}

/// One node of the shard map.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    /// Node id, the index used by [`SlotOwner::node`].
    pub node_id: u16,
    /// Host clients connect to.
    pub address: String,
    /// UDP port of each shard of that node, indexed by shard.
    pub shard_ports: Vec<u16>,
}

/// Owner of one slot.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotOwner {
    /// Node id (see [`NodeEntry::node_id`]).
    pub node: u16,
    /// Shard index on that node.
    pub shard: u16,
}

/// The shard map: slot table plus node addresses.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    /// Version of the table; a client keeps the newest one it has seen.
    pub epoch: u64,
    /// Nodes of the cluster (one on a single-node install).
    pub nodes: Vec<NodeEntry>,
    /// Owner of every slot, indexed by slot; its length is the slot count.
    pub slots: Vec<SlotOwner>,
}

/// Sends an opaque payload to every device of `to_user`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Send {
    /// Chosen by the sending device, unique per device; a retry reuses it and
    /// is deduplicated by the server.
    pub client_msg_id: u64,
    /// Recipient user.
    pub to_user: u64,
    /// The `client_msg_id` of this device's previous Send to `to_user` if
    /// that one was not yet acknowledged when this one was (re)sent: the
    /// server stores this Send only once that one is stored, and refuses it
    /// with `OutOfOrder` otherwise, so a refusal of an earlier send can never
    /// let a later one overtake it. `None` when every earlier send to
    /// `to_user` is acknowledged or abandoned.
    pub after: Option<u64>,
    /// Opaque bytes (end-to-end ciphertext in production).
    pub payload: Vec<u8>,
}

/// Confirms that a Send is stored in every recipient device's mailbox.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The client_msg_id of the Send being confirmed.
    pub client_msg_id: u64,
    /// Server-wide unique id of the stored message.
    pub server_msg_id: u64,
}

/// A message from the device's mailbox, sent on the push stream.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    /// Per-device sequence number, strictly increasing, without gaps except
    /// where messages were acknowledged.
    pub seq: u64,
    /// Sending user.
    pub from_user: u64,
    /// Sending device.
    pub from_device: u32,
    /// Same id as in the sender's Ack.
    pub server_msg_id: u64,
    /// Server wall-clock time of acceptance, milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
    /// The payload exactly as sent.
    pub payload: Vec<u8>,
}

/// Cumulative delivery acknowledgement: the device has processed every seq up
/// to and including `up_to_seq`; the server may forget them.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeliveryAck {
    /// Highest processed seq.
    pub up_to_seq: u64,
}

/// A typed failure. See [`crate::ErrorCode`] for the meaning of each code.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// A stable [`crate::ErrorCode`] value.
    pub code: u16,
    /// Human-readable detail; never parsed by clients.
    pub message: String,
    /// For Throttle and similar codes: how long to wait before retrying (0: not given).
    pub retry_after_ms: u32,
    /// The Send this error answers, if it answers one.
    pub client_msg_id: Option<u64>,
}

/// Liveness probe; answered by Pong with the same nonce.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    /// Echoed back in Pong.
    pub nonce: u64,
}

/// Answer to Ping.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Pong {
    /// The nonce of the Ping being answered.
    pub nonce: u64,
}

/// Asks the server to unlink a device of the session's own user: the
/// session's device itself, or another device of the same user (a phone
/// unlinking a lost laptop). Answered with [`DeviceRemoved`] once the removal
/// is durable; the device's undelivered messages are dropped, its live
/// session (if any) is closed with `DeviceRemoved`, and later Hellos of it are
/// refused with `DeviceRemoved`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RemoveDevice {
    /// The device of the session's user to remove.
    pub device_id: u32,
}

/// Answer to [`RemoveDevice`]: the device is durably removed.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeviceRemoved {
    /// The device removed.
    pub device_id: u32,
}

/// Watch the presence of `users` (docs/presence.md): they join the device's
/// contact list (which outlives its sessions) and its session watches them;
/// the watches end with the session, and the client subscribes again after
/// a reconnect. The current state of each arrives at once as a [`Presence`]
/// frame on the ephemeral stream, and every change after it. A device has
/// at most `presence.subscriptions_per_device_max` contacts; a request past
/// it is refused as a whole with `TooManySubscriptions`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PresenceSubscribe {
    /// Users to watch (repeats and users already watched count once).
    pub users: Vec<u64>,
}

/// Stop watching `users` (unknown ones are ignored). Not answered.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PresenceUnsubscribe {
    /// Users to stop watching.
    pub users: Vec<u64>,
}

/// Who may see this user's presence and last-seen time (for all its
/// devices; the last one set wins). Not answered; watchers whose view
/// changes are told at once.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PresencePrivacy {
    /// [`PRIVACY_EVERYONE`], [`PRIVACY_CONTACTS`] or [`PRIVACY_NOBODY`].
    pub privacy: u8,
}

/// Every watcher may see it (the default).
pub const PRIVACY_EVERYONE: u8 = 0;
/// Only users this user watches itself, from any of its devices.
pub const PRIVACY_CONTACTS: u8 = 1;
/// No watcher may see it.
pub const PRIVACY_NOBODY: u8 = 2;

/// A watched user's presence, on the ephemeral stream: the state at
/// subscription, then each change. Ephemeral: a later one replaces an
/// earlier one not yet sent, and none is stored or replayed.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// The watched user.
    pub user: u64,
    /// [`PRESENCE_OFFLINE`], [`PRESENCE_ONLINE`], [`PRESENCE_HIDDEN`] or
    /// [`PRESENCE_UNAVAILABLE`].
    pub state: u8,
    /// With [`PRESENCE_OFFLINE`]: when its last device left, ms since the
    /// Unix epoch; 0 if it was never seen (or with any other state).
    pub last_seen_ms: u64,
}

/// No device of the user is connected.
pub const PRESENCE_OFFLINE: u8 = 0;
/// A device of the user is connected.
pub const PRESENCE_ONLINE: u8 = 1;
/// The user's privacy setting hides its presence from this watcher.
pub const PRESENCE_HIDDEN: u8 = 2;
/// The user has the most watchers the server keeps; this subscription is
/// not kept (subscribe again later).
pub const PRESENCE_UNAVAILABLE: u8 = 3;

/// This user is typing to `to_user` (`active`), or stopped. Forwarded to
/// the recipient's devices that have a session now, as [`TypingNotice`] on
/// their ephemeral stream; never stored, never replayed. A client renews
/// an active state every few seconds; a receiver treats one not renewed
/// within [`TYPING_EXPIRES_MS`] as stopped. Not answered.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Typing {
    /// The user typed to.
    pub to_user: u64,
    /// Typing (true) or stopped (false).
    pub active: bool,
}

/// How long a receiver shows an active [`TypingNotice`] without a renewal.
pub const TYPING_EXPIRES_MS: u64 = 6_000;

/// Server -> client, on the ephemeral stream: `from_user`'s device is
/// typing to this user (or stopped). A later one from the same device
/// replaces one not yet sent.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TypingNotice {
    /// Who types.
    pub from_user: u64,
    /// On which of its devices.
    pub from_device: u32,
    /// Typing (true) or stopped (false).
    pub active: bool,
}

/// Any frame of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// Client -> server.
    Hello(Hello),
    /// Server -> client.
    Welcome(Welcome),
    /// Server -> client.
    Redirect(Redirect),
    /// Client -> server.
    ShardMapRequest(ShardMapRequest),
    /// Server -> client.
    ShardMap(ShardMap),
    /// Client -> server.
    Send(Send),
    /// Server -> client.
    Ack(Ack),
    /// Server -> client, on the push stream.
    Deliver(Deliver),
    /// Client -> server.
    DeliveryAck(DeliveryAck),
    /// Server -> client.
    Error(Error),
    /// Either direction.
    Ping(Ping),
    /// Either direction.
    Pong(Pong),
    /// Client -> server.
    RemoveDevice(RemoveDevice),
    /// Server -> client.
    DeviceRemoved(DeviceRemoved),
    /// Client -> server.
    PresenceSubscribe(PresenceSubscribe),
    /// Client -> server.
    PresenceUnsubscribe(PresenceUnsubscribe),
    /// Client -> server.
    PresencePrivacy(PresencePrivacy),
    /// Server -> client, on the ephemeral stream.
    Presence(Presence),
    /// Client -> server.
    Typing(Typing),
    /// Server -> client, on the ephemeral stream.
    TypingNotice(TypingNotice),
}

/// The kind byte of the frame header. Values are stable wire constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum FrameKind {
    /// [`Hello`]
    Hello = 1,
    /// [`Welcome`]
    Welcome = 2,
    /// [`Redirect`]
    Redirect = 3,
    /// [`ShardMapRequest`]
    ShardMapRequest = 4,
    /// [`ShardMap`]
    ShardMap = 5,
    /// [`Send`]
    Send = 6,
    /// [`Ack`]
    Ack = 7,
    /// [`Deliver`]
    Deliver = 8,
    /// [`DeliveryAck`]
    DeliveryAck = 9,
    /// [`Error`]
    Error = 10,
    /// [`Ping`]
    Ping = 11,
    /// [`Pong`]
    Pong = 12,
    /// [`RemoveDevice`]
    RemoveDevice = 13,
    /// [`DeviceRemoved`]
    DeviceRemoved = 14,
    /// [`PresenceSubscribe`]
    PresenceSubscribe = 15,
    /// [`PresenceUnsubscribe`]
    PresenceUnsubscribe = 16,
    /// [`PresencePrivacy`]
    PresencePrivacy = 17,
    /// [`Presence`]
    Presence = 18,
    /// [`Typing`]
    Typing = 19,
    /// [`TypingNotice`]
    TypingNotice = 20,
}

impl FrameKind {
    /// Parses a kind byte; `None` for a kind this version does not know.
    pub fn from_byte(byte: u8) -> Option<FrameKind> {
        Some(match byte {
            1 => FrameKind::Hello,
            2 => FrameKind::Welcome,
            3 => FrameKind::Redirect,
            4 => FrameKind::ShardMapRequest,
            5 => FrameKind::ShardMap,
            6 => FrameKind::Send,
            7 => FrameKind::Ack,
            8 => FrameKind::Deliver,
            9 => FrameKind::DeliveryAck,
            10 => FrameKind::Error,
            11 => FrameKind::Ping,
            12 => FrameKind::Pong,
            13 => FrameKind::RemoveDevice,
            14 => FrameKind::DeviceRemoved,
            15 => FrameKind::PresenceSubscribe,
            16 => FrameKind::PresenceUnsubscribe,
            17 => FrameKind::PresencePrivacy,
            18 => FrameKind::Presence,
            19 => FrameKind::Typing,
            20 => FrameKind::TypingNotice,
            _ => return None,
        })
    }
}

impl Frame {
    /// The kind byte that announces this frame on the wire.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::Welcome(_) => FrameKind::Welcome,
            Frame::Redirect(_) => FrameKind::Redirect,
            Frame::ShardMapRequest(_) => FrameKind::ShardMapRequest,
            Frame::ShardMap(_) => FrameKind::ShardMap,
            Frame::Send(_) => FrameKind::Send,
            Frame::Ack(_) => FrameKind::Ack,
            Frame::Deliver(_) => FrameKind::Deliver,
            Frame::DeliveryAck(_) => FrameKind::DeliveryAck,
            Frame::Error(_) => FrameKind::Error,
            Frame::Ping(_) => FrameKind::Ping,
            Frame::Pong(_) => FrameKind::Pong,
            Frame::RemoveDevice(_) => FrameKind::RemoveDevice,
            Frame::DeviceRemoved(_) => FrameKind::DeviceRemoved,
            Frame::PresenceSubscribe(_) => FrameKind::PresenceSubscribe,
            Frame::PresenceUnsubscribe(_) => FrameKind::PresenceUnsubscribe,
            Frame::PresencePrivacy(_) => FrameKind::PresencePrivacy,
            Frame::Presence(_) => FrameKind::Presence,
            Frame::Typing(_) => FrameKind::Typing,
            Frame::TypingNotice(_) => FrameKind::TypingNotice,
        }
    }

    /// Builds an Error frame from a code and a message.
    pub fn error(code: crate::ErrorCode, message: impl Into<String>) -> Frame {
        Frame::Error(Error { code: code as u16, message: message.into(), retry_after_ms: 0, client_msg_id: None })
    }
}
