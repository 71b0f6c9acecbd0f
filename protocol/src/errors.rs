//! Stable wire error codes carried in [`crate::frames::Error::code`].
//!
//! The numeric values are part of the protocol: never renumber a variant.
//! docs/protocol.md lists them with the server's behaviour for each.

/// What went wrong, and (per variant) what the client should do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The bytes did not validate as the announced frame. The server closes
    /// the stream's connection; the client has a bug and must not retry as is.
    BadFrame = 1,
    /// The length prefix exceeded `frame_bytes_max`. Connection closed; the
    /// client must send smaller payloads.
    FrameTooLarge = 2,
    /// The kind byte names no frame this server knows. Connection closed.
    UnknownFrameType = 3,
    /// The version byte is not spoken here. Connection closed; upgrade.
    UnsupportedVersion = 4,
    /// The token is malformed or its signature does not verify. Connection
    /// closed; obtain a new token.
    InvalidToken = 5,
    /// The token's expiry has passed. Connection closed; obtain a new token.
    TokenExpired = 6,
    /// A frame arrived that is not allowed in this state (Send before Hello,
    /// a second Hello, a server-only frame). Connection closed.
    ProtocolViolation = 7,
    /// The recipient has no registered device. The Send is refused and not
    /// stored; the connection stays open.
    UnknownRecipient = 8,
    /// The user already has `devices_per_user_max` devices. Connection closed.
    TooManyDevices = 9,
    /// A recipient device's mailbox is at its cap. Not stored; retry after
    /// `retry_after_ms`.
    MailboxFull = 10,
    /// The server sheds load. Not stored; retry after `retry_after_ms`.
    Throttle = 11,
    /// Durable storage failed (disk full, I/O error). Not stored; retry later.
    StorageUnavailable = 12,
    /// The server is draining; reconnect (to another node if there is one).
    ShuttingDown = 13,
    /// A bug on the server. Not stored; the client may retry.
    Internal = 14,
    /// A newer connection of the same device took over this session (the app
    /// runs twice, or reconnected before the old connection timed out). The
    /// connection is closed with close code `REPLACED`; the client must not
    /// reconnect on its own, or two instances would take turns forever.
    SessionReplaced = 15,
    /// A Hello's `resume_after_seq` is above the highest seq the server ever
    /// assigned to the device: the client claims messages that do not exist
    /// (a client bug, or a server that lost the device's state). Connection
    /// closed; the message names the server's last seq. Never retry the same
    /// Hello: acknowledging seqs that were never assigned would delete
    /// messages stored later.
    ResumeBeyondLastSeq = 16,
    /// The device was removed (by itself, by another device of its user, or
    /// because its mailbox overflowed while another device of the user kept
    /// up). A Hello of it, or its live session, is refused and closed with
    /// close code `REMOVED`; its undelivered messages are gone. The app must
    /// link again as a new device (a new device id) and must not retry.
    DeviceRemoved = 17,
    /// A RemoveDevice named a device its user does not have.
    UnknownDevice = 18,
    /// A Send named an `after` send that is not stored (refused, still being
    /// retried, or abandoned). Not stored; send it again once the earlier one
    /// is acknowledged (with the same `after`) or abandoned (with the `after`
    /// of the send before it). Never a reason to give up on the message, but
    /// `after` must name a send to the same user: one naming a send to
    /// another user, or an id never sent, is refused every time.
    OutOfOrder = 19,
    /// A PresenceSubscribe would make the device watch more users than the
    /// server's bound (`presence_subscriptions_max`). Nothing of the request
    /// is kept; the connection stays open. Unsubscribe from some first.
    TooManySubscriptions = 20,
}

impl ErrorCode {
    /// Parses a wire value; `None` for a code this build does not know
    /// (clients treat unknown codes as fatal for the request).
    pub fn from_u16(value: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match value {
            1 => BadFrame,
            2 => FrameTooLarge,
            3 => UnknownFrameType,
            4 => UnsupportedVersion,
            5 => InvalidToken,
            6 => TokenExpired,
            7 => ProtocolViolation,
            8 => UnknownRecipient,
            9 => TooManyDevices,
            10 => MailboxFull,
            11 => Throttle,
            12 => StorageUnavailable,
            13 => ShuttingDown,
            14 => Internal,
            15 => SessionReplaced,
            16 => ResumeBeyondLastSeq,
            17 => DeviceRemoved,
            18 => UnknownDevice,
            19 => OutOfOrder,
            20 => TooManySubscriptions,
            _ => return None,
        })
    }

    /// Whether a Send refused with this code may be retried unchanged later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::MailboxFull
                | ErrorCode::Throttle
                | ErrorCode::StorageUnavailable
                | ErrorCode::ShuttingDown
                | ErrorCode::Internal
                | ErrorCode::OutOfOrder
        )
    }
}
