//! iris-protocol: the Iris wire protocol, pure and sans-IO.
//!
//! # Layout
//! - [`frames`]: the frame structs (rkyv-archived) and the [`Frame`] enum.
//! - [`codec`]: the frame header, encoding, and the incremental
//!   [`FrameDecoder`] that enforces `frame_bytes_max` before allocating.
//! - [`errors`]: the stable [`ErrorCode`] values sent in Error frames.
//!
//! # Streams
//! A client opens one bidirectional *request stream* and sends Hello (or
//! ShardMapRequest) first; the server answers requests on it (Welcome, Ack,
//! Error, ShardMap, Redirect, Pong). After Welcome the server opens one
//! unidirectional *push stream* carrying Deliver frames. See docs/protocol.md.

#![forbid(unsafe_code)]

pub mod codec;
pub mod errors;
pub mod frames;

pub use codec::{
    decode_body, encode, encode_into, payload_bytes_max, DecodeError, EncodeError, FrameDecoder,
    DELIVER_OVERHEAD_BYTES, FRAME_BYTES_MAX_CEILING, FRAME_BYTES_MAX_DEFAULT, FRAME_BYTES_MAX_FLOOR, HEADER_BYTES,
    PROTOCOL_VERSION,
};
pub use errors::ErrorCode;
pub use frames::Frame;

/// ALPN protocol id negotiated by Iris clients and servers.
pub const ALPN: &[u8] = b"iris/2";

/// QUIC application close codes used by Iris (the Error frame sent before the
/// close carries the detail).
pub mod close_code {
    /// Normal close by either side.
    pub const NORMAL: u32 = 0;
    /// The peer violated the protocol (bad frame, auth failure, ...).
    pub const PROTOCOL_ERROR: u32 = 1;
    /// The server is shutting down.
    pub const SHUTTING_DOWN: u32 = 2;
    /// The connection was redirected to another shard.
    pub const REDIRECTED: u32 = 3;
    /// A newer connection of the same device replaced this one.
    pub const REPLACED: u32 = 4;
    /// The device of this session was removed (error `DeviceRemoved`).
    pub const REMOVED: u32 = 5;
    /// The push stream accepted nothing for the server's stall timeout while
    /// messages waited; they stay in the mailbox. Reconnect when able to read.
    pub const SLOW_READER: u32 = 6;
}
