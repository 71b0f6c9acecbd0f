//! One client connection inside the shard loop: its quinn-proto state, the
//! request stream (frames in, responses out), the push stream (Deliver
//! frames out) and the ephemeral stream (Presence frames out, at a lower
//! priority than both), with bounded buffers on all three.
//!
//! Backpressure: every request frame is charged, before the core sees it,
//! with the most bytes of answers it can produce
//! ([`ShardCore::response_bytes_bound`]); a frame is handed in only while
//! the response buffer has that much room below `response_bytes_max`.
//! Otherwise it is held (one frame) and the request stream is not read, so
//! QUIC flow control stops the client. Small requests that make large
//! answers (a shard map is ~16 KiB from a ~6-byte request) therefore cannot
//! grow the buffer past its bound, however many are sent at once.
//! Deliver frames are pulled from the shard core only while the push stream
//! accepts bytes, so a slow reader holds at most one partly written frame
//! here; its messages stay in its mailbox. A reader whose push stream
//! accepts nothing for `push_stall_timeout` while pushes wait, and that
//! acknowledges nothing meanwhile, is closed with close code `SLOW_READER`
//! (its messages wait for its next connection).

use crate::shard::core::SMALL_RESPONSE_BYTES_MAX;
use crate::shard::{ConnId, MailboxStore, Now, Output, ShardCore};
use iris_protocol::{close_code, encode_into, Frame, FrameDecoder};
use quinn_proto::{Dir, Event, ReadError, StreamEvent, StreamId, VarInt, WriteError};
use std::time::{Duration, Instant};

/// Bytes read from the request stream per drive of one connection, so one
/// busy client cannot starve the others within an iteration.
const READ_BYTES_PER_DRIVE: usize = 64 * 1024;
/// Deliver frames written per drive of one connection (fairness, as above).
const PUSH_FRAMES_PER_DRIVE: usize = 256;
/// Presence frames written per drive of one connection.
const EPHEMERAL_FRAMES_PER_DRIVE: usize = 256;
/// The ephemeral stream's priority: below the request and push streams'
/// (0), so presence never takes a durable frame's place in a packet.
const EPHEMERAL_PRIORITY: i32 = -1;

/// Capacity a drained outgoing buffer may keep; larger ones are released.
const IDLE_BUFFER_BYTES_MAX: usize = 8 * 1024;

/// Per-connection bounds.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Response bytes buffered before the request stream is paused.
    pub response_bytes_max: usize,
    /// How long the push stream may accept nothing while pushes wait before
    /// the connection is closed (a stuck reader holds a session, its QUIC
    /// buffers and a share of the shard's attention for nothing).
    pub push_stall_timeout: Duration,
}

/// Bytes waiting for a stream, with the part already written.
#[derive(Debug, Default)]
struct Outgoing {
    /// Encoded frames.
    bytes: Vec<u8>,
    /// Prefix of `bytes` already accepted by the stream.
    written: usize,
    /// Bytes the stream accepted, ever (progress, for the stall deadline).
    accepted: u64,
    /// The stream refused more bytes; cleared by a Writable event.
    blocked: bool,
}

impl Outgoing {
    fn pending(&self) -> usize {
        self.bytes.len() - self.written
    }

    /// Writes as much as the stream takes. Returns false if the stream is gone.
    fn flush(&mut self, quic: &mut quinn_proto::Connection, stream: StreamId) -> bool {
        while self.pending() > 0 {
            match quic.send_stream(stream).write(&self.bytes[self.written..]) {
                Ok(count) => {
                    self.written += count;
                    self.accepted += count as u64;
                }
                Err(WriteError::Blocked) => {
                    self.blocked = true;
                    return true;
                }
                Err(_) => return false,
            }
        }
        // Drained: release a large buffer so idle connections stay small.
        if self.bytes.capacity() > IDLE_BUFFER_BYTES_MAX {
            self.bytes = Vec::new();
        }
        self.bytes.clear();
        self.written = 0;
        true
    }
}

/// A closing connection's state.
#[derive(Debug, Clone, Copy)]
struct Closing {
    /// Application close code for the final CONNECTION_CLOSE.
    close_code: u32,
    /// The request stream was finished after the last frame.
    finish_sent: bool,
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// quinn-proto's state machine.
    pub quic: quinn_proto::Connection,
    /// Listed in the loop's dirty list.
    pub dirty: bool,
    /// The deadline registered in the loop's timer set.
    pub deadline: Option<Instant>,
    /// The core has messages to push.
    pub push_wanted: bool,
    /// The core has presence frames for the ephemeral stream.
    pub ephemeral_wanted: bool,
    /// The peer's address (for the per-source connection bound).
    pub source: std::net::IpAddr,
    /// Counted among the shard's handshakes in progress.
    pub handshaking: bool,
    /// The client's request stream.
    request: Option<StreamId>,
    /// Data (or end of stream) may be waiting on the request stream.
    request_readable: bool,
    /// Decoder of the request stream.
    decoder: FrameDecoder,
    /// A decoded request waiting for room in the response buffer, with the
    /// bytes of answers it may produce.
    held: Option<(Frame, usize)>,
    /// Responses for the request stream.
    responses: Outgoing,
    /// The server's push stream, once opened.
    push: Option<StreamId>,
    /// Since when the push stream has accepted nothing while pushes wait.
    push_stalled_since: Option<Instant>,
    /// Highest `DeliveryAck` seen (progress for the stall timeout).
    acked_up_to: u64,
    /// Authenticated, but the stream limit did not allow opening the push stream yet.
    push_open_pending: bool,
    /// Deliver frames for the push stream (at most one partly written frame
    /// beyond what the stream accepted).
    pushes: Outgoing,
    /// The server's ephemeral stream, opened right after the push stream
    /// (so it is the second unidirectional stream the client accepts).
    ephemeral: Option<StreamId>,
    /// Presence frames for it (at most one partly written frame beyond what
    /// the stream accepted; the rest wait in the core, coalesced).
    ephemerals: Outgoing,
    /// Set once a fatal error or redirect was sent.
    closing: Option<Closing>,
    /// Frame bound for encoding.
    frame_bytes_max: u32,
    /// Buffer bounds.
    limits: ConnectionLimits,
}

impl Connection {
    /// Wraps a freshly accepted quinn connection.
    /// (The core times its Hello and its close grace.)
    pub fn new(quic: quinn_proto::Connection, frame_bytes_max: u32, limits: ConnectionLimits) -> Connection {
        Connection {
            quic,
            dirty: false,
            deadline: None,
            push_wanted: false,
            ephemeral_wanted: false,
            source: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            handshaking: false,
            request: None,
            request_readable: false,
            decoder: FrameDecoder::new(frame_bytes_max),
            held: None,
            responses: Outgoing::default(),
            push: None,
            push_stalled_since: None,
            acked_up_to: 0,
            push_open_pending: false,
            pushes: Outgoing::default(),
            ephemeral: None,
            ephemerals: Outgoing::default(),
            closing: None,
            frame_bytes_max,
            limits,
        }
    }

    /// Handles quinn's application events and feeds request frames to the core.
    pub fn poll_events<S: MailboxStore>(&mut self, now: Instant, core: &mut ShardCore<S>, conn: ConnId, clock: Now) {
        while let Some(event) = self.quic.poll() {
            match event {
                Event::Stream(StreamEvent::Opened { dir }) => self.accept_streams(dir),
                Event::Stream(StreamEvent::Readable { id }) if Some(id) == self.request => {
                    self.request_readable = true;
                }
                Event::Stream(StreamEvent::Writable { id }) => {
                    if Some(id) == self.request {
                        self.responses.blocked = false;
                    } else if Some(id) == self.push {
                        self.pushes.blocked = false;
                    } else if Some(id) == self.ephemeral {
                        self.ephemerals.blocked = false;
                    }
                }
                Event::Stream(StreamEvent::Finished { id }) if Some(id) == self.request && self.closing.is_some() => {
                    self.close_now(now);
                }
                Event::Stream(StreamEvent::Stopped { .. }) => self.close(now, close_code::NORMAL, "stream stopped"),
                Event::Stream(StreamEvent::Available { dir: Dir::Uni }) if self.push_open_pending => self.open_push(),
                Event::ConnectionLost { reason } => {
                    tracing::debug!(?conn, %reason, "connection lost");
                    // Stop routing pushes here now rather than when quinn
                    // finally drains the connection (3 PTOs later).
                    core.handle_connection_closed(conn, clock);
                }
                _ => {}
            }
        }
        self.read_requests(now, core, conn, clock);
    }

    fn accept_streams(&mut self, dir: Dir) {
        while let Some(id) = self.quic.streams().accept(dir) {
            if dir == Dir::Bi && self.request.is_none() {
                self.request = Some(id);
                self.request_readable = true;
            } else {
                // The transport allows one bidirectional and no unidirectional
                // client stream, so this is a misbehaving peer.
                let _ = self.quic.recv_stream(id).stop(VarInt::from_u32(close_code::PROTOCOL_ERROR));
            }
        }
    }

    fn read_requests<S: MailboxStore>(&mut self, now: Instant, core: &mut ShardCore<S>, conn: ConnId, clock: Now) {
        let Some(stream) = self.request else { return };
        if self.closing.is_some() {
            return;
        }
        let mut room = self.response_room();
        let mut frames = Vec::new();
        if let Some((frame, cost)) = self.held.take() {
            if cost > room {
                self.held = Some((frame, cost));
                return;
            }
            room -= cost;
            frames.push(frame);
        }
        let mut failure = None;
        let mut ended = false;
        let mut read_bytes = 0;
        // Frames already buffered go first; the stream is read only when the
        // decoder has no complete frame left and there is room for answers.
        'decode: loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    let cost = core.response_bytes_bound(&frame);
                    if cost > room {
                        self.held = Some((frame, cost));
                        break 'decode;
                    }
                    room -= cost;
                    frames.push(frame);
                    continue;
                }
                Ok(None) => {}
                Err(error) => {
                    failure = Some(error);
                    break 'decode;
                }
            }
            if !self.request_readable || read_bytes >= READ_BYTES_PER_DRIVE {
                break;
            }
            match self.quic.recv_stream(stream).read(true) {
                Ok(mut chunks) => {
                    match chunks.next(READ_BYTES_PER_DRIVE - read_bytes) {
                        Ok(Some(chunk)) => {
                            read_bytes += chunk.bytes.len();
                            self.decoder.feed(&chunk.bytes);
                        }
                        Ok(None) | Err(ReadError::Reset(_)) => ended = true,
                        Err(ReadError::Blocked) => self.request_readable = false,
                    }
                    // Flow-control credit goes out with the next transmit pass.
                    let _ = chunks.finalize();
                }
                Err(_) => ended = true,
            }
            if ended {
                break;
            }
        }
        for frame in frames {
            if let Frame::DeliveryAck(ack) = &frame {
                // The client processes what it was pushed: a slow reader, not
                // a stuck one (QUIC window updates come only every 1/8 of a
                // window, which a reader of small messages can take long
                // to consume). Only an ack that moves forward counts.
                if ack.up_to_seq > self.acked_up_to {
                    self.acked_up_to = ack.up_to_seq;
                    self.push_stalled_since = None;
                }
            }
            core.handle_frame(conn, frame, clock);
        }
        if let Some(error) = failure {
            self.request_readable = false;
            self.held = None;
            core.handle_decode_error(conn, error.code(), error.to_string(), clock);
        } else if ended && self.held.is_none() {
            self.request_readable = false;
            self.close(now, close_code::NORMAL, "request stream ended");
        }
    }

    /// Bytes of answers the response buffer can still take.
    fn response_room(&self) -> usize {
        self.limits.response_bytes_max.saturating_sub(self.responses.pending())
    }

    /// Applies one output of the core to this connection.
    pub fn apply(&mut self, output: Output, now: Instant) {
        match output {
            Output::Frame { frame, .. } => self.queue_response(&frame),
            Output::Encoded { bytes, .. } => self.responses.bytes.extend_from_slice(&bytes),
            Output::Authenticated { .. } => self.open_push(),
            Output::Close { frame, close_code, .. } => {
                if let Some(frame) = frame {
                    self.queue_response(&frame);
                }
                self.closing = Some(Closing { close_code, finish_sent: false });
                if self.request.is_none() {
                    self.close_now(now);
                }
            }
            Output::CloseNow { close_code, reason, .. } => self.close(now, close_code, reason),
        }
    }

    fn queue_response(&mut self, frame: &Frame) {
        if let Err(error) = encode_into(frame, self.frame_bytes_max, &mut self.responses.bytes) {
            tracing::error!(%error, kind = ?frame.kind(), "response frame not encodable; dropped");
        }
    }

    /// Opens the push stream, then the ephemeral stream (each once; what
    /// the peer's stream limit does not allow yet is opened when it does).
    fn open_push(&mut self) {
        if self.push.is_none() {
            match self.quic.streams().open(Dir::Uni) {
                Some(id) => self.push = Some(id),
                None => {
                    self.push_open_pending = true;
                    return;
                }
            }
        }
        if self.ephemeral.is_none() {
            match self.quic.streams().open(Dir::Uni) {
                Some(id) => {
                    // Only fails for a stream that is gone, which it is not.
                    let _ = self.quic.send_stream(id).set_priority(EPHEMERAL_PRIORITY);
                    self.ephemeral = Some(id);
                }
                None => {
                    self.push_open_pending = true;
                    return;
                }
            }
        }
        self.push_open_pending = false;
    }

    /// Writes buffered responses and pulls pushes from the core while the streams take them.
    pub fn flush_streams<S: MailboxStore>(&mut self, core: &mut ShardCore<S>, conn: ConnId) {
        let now = Instant::now();
        if let Some(stream) = self.request {
            if !self.responses.flush(&mut self.quic, stream) {
                return self.close(now, close_code::NORMAL, "request stream closed by peer");
            }
            if let Some(closing) = &mut self.closing {
                if self.responses.pending() == 0 && !closing.finish_sent {
                    closing.finish_sent = true;
                    if self.quic.send_stream(stream).finish().is_err() {
                        self.close_now(now);
                    }
                }
            }
        }
        if self.closing.is_some() {
            return;
        }
        self.flush_ephemeral(core, conn, now);
        let Some(stream) = self.push else { return };
        let accepted_before = self.pushes.accepted;
        if !self.pushes.flush(&mut self.quic, stream) {
            return self.close(now, close_code::NORMAL, "push stream stopped");
        }
        let mut written = 0;
        while self.push_wanted && !self.pushes.blocked && written < PUSH_FRAMES_PER_DRIVE {
            let Some(frame) = core.poll_push(conn) else {
                self.push_wanted = false;
                break;
            };
            // Every stored payload fits a Deliver: Sends are checked against
            // payload_bytes_max, and recovery refuses a log holding larger
            // ones. Skipping one instead would let the next DeliveryAck
            // delete a message that was never delivered.
            if let Err(error) = encode_into(&frame, self.frame_bytes_max, &mut self.pushes.bytes) {
                panic!("a stored message does not fit a Deliver frame: {error}");
            }
            written += 1;
            if !self.pushes.flush(&mut self.quic, stream) {
                return self.close(now, close_code::NORMAL, "push stream stopped");
            }
        }
        if self.pushes.accepted != accepted_before || !self.pushes.blocked {
            self.push_stalled_since = None;
        } else if self.push_stalled_since.is_none() {
            self.push_stalled_since = Some(now);
        }
    }

    /// Writes presence frames while the ephemeral stream takes them. A
    /// stream that takes nothing only makes the core's coalesced queue wait:
    /// no deadline, nothing grows here.
    fn flush_ephemeral<S: MailboxStore>(&mut self, core: &mut ShardCore<S>, conn: ConnId, now: Instant) {
        let Some(stream) = self.ephemeral else { return };
        if !self.ephemerals.flush(&mut self.quic, stream) {
            return self.close(now, close_code::NORMAL, "ephemeral stream stopped");
        }
        let mut written = 0;
        while self.ephemeral_wanted && !self.ephemerals.blocked && written < EPHEMERAL_FRAMES_PER_DRIVE {
            let Some(frame) = core.poll_ephemeral(conn) else {
                self.ephemeral_wanted = false;
                break;
            };
            if let Err(error) = encode_into(&frame, self.frame_bytes_max, &mut self.ephemerals.bytes) {
                tracing::error!(%error, "presence frame not encodable; dropped");
                continue;
            }
            written += 1;
            if !self.ephemerals.flush(&mut self.quic, stream) {
                return self.close(now, close_code::NORMAL, "ephemeral stream stopped");
            }
        }
    }

    /// When the push stream will have been stalled for too long, if it is stalled.
    pub fn stall_deadline(&self) -> Option<Instant> {
        // A closing connection has no stall to time: its own deadline ends it
        // (a stale one would re-arm a past timer on every iteration).
        if self.closing.is_some() || self.quic.is_closed() {
            return None;
        }
        self.push_stalled_since.map(|since| since + self.limits.push_stall_timeout)
    }

    /// Whether the connection can make progress without new input.
    pub fn has_pending_work(&self) -> bool {
        let room = self.response_room();
        let can_read = self.closing.is_none()
            && match &self.held {
                Some((_, cost)) => *cost <= room,
                None => self.request_readable && room >= SMALL_RESPONSE_BYTES_MAX,
            };
        let can_push = self.push_wanted && self.push.is_some() && !self.pushes.blocked && self.closing.is_none();
        let can_tell =
            self.ephemeral_wanted && self.ephemeral.is_some() && !self.ephemerals.blocked && self.closing.is_none();
        let can_respond = self.responses.pending() > 0 && !self.responses.blocked;
        can_read || can_push || can_tell || can_respond
    }

    /// Called when the loop's timer for this connection fires. Returns
    /// whether it closed the connection as a stuck reader.
    pub fn on_stall_deadline(&mut self, now: Instant) -> bool {
        if self.closing.is_none() && self.stall_deadline().is_some_and(|deadline| deadline <= now) {
            self.push_stalled_since = None;
            tracing::debug!("push stream stalled; closing the connection");
            self.close(now, close_code::SLOW_READER, "push stream accepted nothing for too long");
            return true;
        }
        false
    }

    fn close(&mut self, now: Instant, code: u32, reason: &'static str) {
        self.quic.close(now, VarInt::from_u32(code), bytes::Bytes::from_static(reason.as_bytes()));
    }

    fn close_now(&mut self, now: Instant) {
        let code = self.closing.map_or(close_code::NORMAL, |closing| closing.close_code);
        self.close(now, code, "closed by server");
    }
}
