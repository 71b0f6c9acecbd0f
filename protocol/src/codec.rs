//! Framing: header layout, encoding, and an incremental decoder.
//!
//! A frame on a stream is:
//!
//! ```text
//! +----------------+-----------+---------+------------------------+
//! | length: u32 LE | version:1 | kind:1  | rkyv body (length - 2) |
//! +----------------+-----------+---------+------------------------+
//! ```
//!
//! `length` counts every byte after the length field itself (version, kind
//! and body). It is checked against `frame_bytes_max` as soon as its four
//! bytes have arrived, before anything is allocated for the body. The body is
//! validated with rkyv's checked access (bytecheck) and then deserialized.

use crate::frames::{self, Frame, FrameKind};
use rkyv::rancor;

/// Protocol version carried in every frame header.
pub const PROTOCOL_VERSION: u8 = 2;

/// Bytes of the length field.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Bytes of the whole header (length, version, kind).
pub const HEADER_BYTES: usize = LENGTH_PREFIX_BYTES + 2;

/// Default bound on `length` (64 KiB). A frame above it is refused.
pub const FRAME_BYTES_MAX_DEFAULT: u32 = 64 * 1024;

/// Largest allowed `frame_bytes_max` on any server. Clients read the push
/// stream with this bound, so a message stored under a server's limit is
/// always deliverable whatever the client's own send limit is.
pub const FRAME_BYTES_MAX_CEILING: u32 = 16 * 1024 * 1024;

/// Smallest allowed `frame_bytes_max`: big enough for a full shard map of
/// 4096 slots (about 16 KiB) plus headroom.
pub const FRAME_BYTES_MAX_FLOOR: u32 = 20 * 1024;

/// Bytes a Deliver frame adds around its payload (header, fixed fields and
/// rkyv framing, rounded up). A Send payload is accepted only if it fits in a
/// Deliver under the same `frame_bytes_max`.
pub const DELIVER_OVERHEAD_BYTES: usize = 64;

/// The largest payload a Send may carry under `frame_bytes_max`.
pub fn payload_bytes_max(frame_bytes_max: u32) -> usize {
    (frame_bytes_max as usize).saturating_sub(DELIVER_OVERHEAD_BYTES)
}

/// Why bytes could not be turned into a frame. Every variant is caused by the
/// peer; the receiver answers with the matching [`crate::ErrorCode`] and
/// closes the stream, since the byte stream can no longer be trusted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix exceeds `frame_bytes_max`.
    #[error("frame of {length} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// The announced length.
        length: u32,
        /// The configured limit.
        limit: u32,
    },
    /// The length prefix is smaller than the version and kind bytes.
    #[error("frame length {0} is shorter than its header")]
    FrameTooShort(u32),
    /// The version byte is not one this build speaks.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The kind byte names no known frame.
    #[error("unknown frame kind {0}")]
    UnknownFrameKind(u8),
    /// The body failed rkyv validation for its kind.
    #[error("malformed {kind:?} frame: {detail}")]
    Malformed {
        /// The kind the header announced.
        kind: FrameKind,
        /// What bytecheck reported.
        detail: String,
    },
}

impl DecodeError {
    /// The wire error code to send back for this decode failure.
    pub fn code(&self) -> crate::ErrorCode {
        use crate::ErrorCode;
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::FrameTooShort(_) | DecodeError::Malformed { .. } => ErrorCode::BadFrame,
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownFrameKind(_) => ErrorCode::UnknownFrameType,
        }
    }
}

/// Why a frame could not be encoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded frame would exceed the limit; the caller must split or refuse it.
    #[error("encoded frame of {length} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// Encoded length (version + kind + body).
        length: usize,
        /// The limit it was checked against.
        limit: u32,
    },
    /// rkyv could not serialize the value (allocation failure).
    #[error("serialization failed: {0}")]
    Serialize(String),
}

/// Appends the encoding of `frame` to `out`. Fails, leaving `out` unchanged,
/// if the frame would exceed `frame_bytes_max`.
pub fn encode_into(frame: &Frame, frame_bytes_max: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let body = match frame {
        Frame::Hello(f) => to_bytes(f),
        Frame::Welcome(f) => to_bytes(f),
        Frame::Redirect(f) => to_bytes(f),
        Frame::ShardMapRequest(f) => to_bytes(f),
        Frame::ShardMap(f) => to_bytes(f),
        Frame::Send(f) => to_bytes(f),
        Frame::Ack(f) => to_bytes(f),
        Frame::Deliver(f) => to_bytes(f),
        Frame::DeliveryAck(f) => to_bytes(f),
        Frame::Error(f) => to_bytes(f),
        Frame::Ping(f) => to_bytes(f),
        Frame::Pong(f) => to_bytes(f),
        Frame::RemoveDevice(f) => to_bytes(f),
        Frame::DeviceRemoved(f) => to_bytes(f),
        Frame::PresenceSubscribe(f) => to_bytes(f),
        Frame::PresenceUnsubscribe(f) => to_bytes(f),
        Frame::PresencePrivacy(f) => to_bytes(f),
        Frame::Presence(f) => to_bytes(f),
        Frame::Typing(f) => to_bytes(f),
        Frame::TypingNotice(f) => to_bytes(f),
    }?;
    let length = body.len() + 2;
    if length > frame_bytes_max as usize {
        return Err(EncodeError::FrameTooLarge { length, limit: frame_bytes_max });
    }
    out.reserve(LENGTH_PREFIX_BYTES + length);
    // `length` fits in u32: it is at most `frame_bytes_max`, a u32.
    out.extend_from_slice(&(length as u32).to_le_bytes());
    out.push(PROTOCOL_VERSION);
    out.push(frame.kind() as u8);
    out.extend_from_slice(&body);
    Ok(())
}

/// Encodes `frame` into a new buffer.
pub fn encode(frame: &Frame, frame_bytes_max: u32) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(frame, frame_bytes_max, &mut out)?;
    Ok(out)
}

fn to_bytes<T>(value: &T) -> Result<rkyv::util::AlignedVec, EncodeError>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<rkyv::util::AlignedVec, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>,
    >,
{
    rkyv::to_bytes::<rancor::Error>(value).map_err(|e| EncodeError::Serialize(e.to_string()))
}

/// Decodes one frame body whose header has already been read.
pub fn decode_body(version: u8, kind_byte: u8, body: &[u8]) -> Result<Frame, DecodeError> {
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let kind = FrameKind::from_byte(kind_byte).ok_or(DecodeError::UnknownFrameKind(kind_byte))?;
    let malformed = |e: rancor::Error| DecodeError::Malformed { kind, detail: e.to_string() };
    Ok(match kind {
        FrameKind::Hello => Frame::Hello(rkyv::from_bytes::<frames::Hello, _>(body).map_err(malformed)?),
        FrameKind::Welcome => Frame::Welcome(rkyv::from_bytes::<frames::Welcome, _>(body).map_err(malformed)?),
        FrameKind::Redirect => Frame::Redirect(rkyv::from_bytes::<frames::Redirect, _>(body).map_err(malformed)?),
        FrameKind::ShardMapRequest => {
            Frame::ShardMapRequest(rkyv::from_bytes::<frames::ShardMapRequest, _>(body).map_err(malformed)?)
        }
        FrameKind::ShardMap => Frame::ShardMap(rkyv::from_bytes::<frames::ShardMap, _>(body).map_err(malformed)?),
        FrameKind::Send => Frame::Send(rkyv::from_bytes::<frames::Send, _>(body).map_err(malformed)?),
        FrameKind::Ack => Frame::Ack(rkyv::from_bytes::<frames::Ack, _>(body).map_err(malformed)?),
        FrameKind::Deliver => Frame::Deliver(rkyv::from_bytes::<frames::Deliver, _>(body).map_err(malformed)?),
        FrameKind::DeliveryAck => {
            Frame::DeliveryAck(rkyv::from_bytes::<frames::DeliveryAck, _>(body).map_err(malformed)?)
        }
        FrameKind::Error => Frame::Error(rkyv::from_bytes::<frames::Error, _>(body).map_err(malformed)?),
        FrameKind::Ping => Frame::Ping(rkyv::from_bytes::<frames::Ping, _>(body).map_err(malformed)?),
        FrameKind::Pong => Frame::Pong(rkyv::from_bytes::<frames::Pong, _>(body).map_err(malformed)?),
        FrameKind::RemoveDevice => {
            Frame::RemoveDevice(rkyv::from_bytes::<frames::RemoveDevice, _>(body).map_err(malformed)?)
        }
        FrameKind::DeviceRemoved => {
            Frame::DeviceRemoved(rkyv::from_bytes::<frames::DeviceRemoved, _>(body).map_err(malformed)?)
        }
        FrameKind::PresenceSubscribe => {
            Frame::PresenceSubscribe(rkyv::from_bytes::<frames::PresenceSubscribe, _>(body).map_err(malformed)?)
        }
        FrameKind::PresenceUnsubscribe => {
            Frame::PresenceUnsubscribe(rkyv::from_bytes::<frames::PresenceUnsubscribe, _>(body).map_err(malformed)?)
        }
        FrameKind::PresencePrivacy => {
            Frame::PresencePrivacy(rkyv::from_bytes::<frames::PresencePrivacy, _>(body).map_err(malformed)?)
        }
        FrameKind::Presence => Frame::Presence(rkyv::from_bytes::<frames::Presence, _>(body).map_err(malformed)?),
        FrameKind::Typing => Frame::Typing(rkyv::from_bytes::<frames::Typing, _>(body).map_err(malformed)?),
        FrameKind::TypingNotice => {
            Frame::TypingNotice(rkyv::from_bytes::<frames::TypingNotice, _>(body).map_err(malformed)?)
        }
    })
}

/// Capacity a drained decoder buffer may keep; larger ones are released.
const IDLE_BUFFER_BYTES_MAX: usize = 8 * 1024;

/// Incremental decoder for one byte stream.
///
/// Memory bound: the internal buffer never holds more than one partial frame
/// (at most `LENGTH_PREFIX_BYTES + frame_bytes_max` bytes) plus the bytes of
/// the last [`FrameDecoder::feed`] call, because the caller drains complete
/// frames with [`FrameDecoder::next_frame`] after every feed, and an oversized
/// length prefix is refused before its body is buffered.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Bytes received but not yet returned as frames.
    buffer: Vec<u8>,
    /// Read position in `buffer`; consumed bytes are compacted lazily.
    start: usize,
    /// Largest accepted `length` value.
    frame_bytes_max: u32,
    /// Set once a decode error was returned: the stream is unusable after it.
    failed: bool,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `frame_bytes_max`.
    pub fn new(frame_bytes_max: u32) -> FrameDecoder {
        FrameDecoder { buffer: Vec::new(), start: 0, frame_bytes_max, failed: false }
    }

    /// Appends received bytes. Call [`FrameDecoder::next_frame`] until it
    /// returns `Ok(None)` afterwards.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buffer.len() {
            // Everything was consumed: drop a large buffer so an idle
            // connection does not keep the memory of its largest frame.
            if self.buffer.capacity() > IDLE_BUFFER_BYTES_MAX {
                self.buffer = Vec::new();
            }
            self.buffer.clear();
            self.start = 0;
        } else if self.start > self.buffer.len() / 2 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len() - self.start
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed,
    /// or the error that makes the rest of the stream undecodable.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        assert!(!self.failed, "next_frame called after a decode error");
        let pending = &self.buffer[self.start..];
        if pending.len() < LENGTH_PREFIX_BYTES {
            return Ok(None);
        }
        let length = u32::from_le_bytes([pending[0], pending[1], pending[2], pending[3]]);
        let checked = self.check_length(length);
        if let Err(e) = checked {
            self.failed = true;
            return Err(e);
        }
        let total = LENGTH_PREFIX_BYTES + length as usize;
        if pending.len() < total {
            return Ok(None);
        }
        let version = pending[LENGTH_PREFIX_BYTES];
        let kind = pending[LENGTH_PREFIX_BYTES + 1];
        let result = decode_body(version, kind, &pending[HEADER_BYTES..total]);
        self.start += total;
        match result {
            Ok(frame) => Ok(Some(frame)),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    fn check_length(&self, length: u32) -> Result<(), DecodeError> {
        if length > self.frame_bytes_max {
            return Err(DecodeError::FrameTooLarge { length, limit: self.frame_bytes_max });
        }
        if (length as usize) < HEADER_BYTES - LENGTH_PREFIX_BYTES {
            return Err(DecodeError::FrameTooShort(length));
        }
        Ok(())
    }
}
