//! The session task: owns the QUIC connection of one [`crate::Client`].
//!
//! It connects (following Redirect to the home shard and remembering it),
//! sends Hello with the processed seq, then multiplexes: sends from the
//! application (at most `SEND_WINDOW_MAX` unacknowledged), responses on the
//! request stream, Deliver frames on the push stream (deduplicated by seq),
//! and a periodic cumulative DeliveryAck. When the connection is lost it
//! reconnects with backoff and resends every unacknowledged send with its
//! original client_msg_id, in the original order.
//!
//! Order per recipient: each Send names the previous unacknowledged send to
//! the same user (`after`), so the server never stores it ahead of that one.
//! A refused send is retried after `retry_after_ms` (jittered); the later
//! sends to the same recipient wait behind it and go out again, in order,
//! right after it (their `OutOfOrder` refusals are expected and never reach
//! the application).

use crate::{Acked, ClientConfig, ClientError, Command, Delivered, PresenceEvent, PresenceState, Shared};
use iris_protocol::frames::{self, Frame};
use iris_protocol::{encode, ErrorCode, FrameDecoder};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Unacknowledged sends kept in flight. Below the server's default
/// `sends_in_flight_per_device_max` (256) so a single client is never throttled
/// for its window alone.
pub const SEND_WINDOW_MAX: usize = 128;
/// Decoded deliveries waiting for room in the application's queue; the push
/// stream is not read while this many wait.
const READY_DELIVERIES_MAX: usize = 256;
/// Cadence of cumulative DeliveryAcks and of due retries.
const TICK: Duration = Duration::from_millis(20);
/// Redirects followed in one connection attempt before giving up.
const REDIRECTS_MAX: usize = 3;
/// Longest wait between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Bytes read from a stream per call.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Users per PresenceSubscribe frame when the watched set is sent again
/// after a reconnect: small, so that a set past the server's bound loses
/// only the chunks that do not fit (each request is refused whole).
const SUBSCRIBE_CHUNK_USERS: usize = 100;
/// Presence changes waiting for room in the application's queue, one per
/// watched user (a newer state replaces an older one not yet taken).
const READY_PRESENCE_MAX: usize = 65_536;
/// Typing notices waiting for room there.
const READY_TYPING_MAX: usize = 256;

/// A send not yet acknowledged.
#[derive(Debug)]
struct PendingSend {
    /// Recipient.
    to_user: u64,
    /// Payload, kept for resending.
    payload: Vec<u8>,
    /// Where the outcome goes.
    reply: oneshot::Sender<Result<Acked, ClientError>>,
    /// Set after a retryable refusal (or while an earlier send to the same
    /// recipient waits): resend at this time, in order behind the earlier ones.
    retry_at: Option<Instant>,
    /// When the server first refused it (OutOfOrder aside).
    first_refused_at: Option<Instant>,
}

/// A live, authenticated connection.
struct Live {
    connection: quinn::Connection,
    request_send: quinn::SendStream,
    request_recv: quinn::RecvStream,
    decoder: FrameDecoder,
    /// `ClientConfig::answer_timeout`: also how long a write may wait for
    /// flow control (a dead server never opens the window again).
    answer_timeout: Duration,
}

/// Why `serve` returned.
enum Ended {
    /// Closed on request (or the Client was dropped).
    Closed,
    /// Connection lost; reconnect.
    Lost(String),
    /// Unrecoverable (e.g. token refused).
    Fatal(ClientError),
}

/// The task state.
pub(crate) struct Session {
    config: ClientConfig,
    tls: quinn::ClientConfig,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    deliveries: mpsc::Sender<Delivered>,
    /// Home shard address and TLS name, once known.
    home: Option<(SocketAddr, String)>,
    /// Next client_msg_id (random start, so ids of earlier runs of the same
    /// device do not collide within the server's dedup window).
    next_client_msg_id: u64,
    /// Unacknowledged sends by id; bounded by `SEND_WINDOW_MAX`.
    pending: HashMap<u64, PendingSend>,
    /// Ids of `pending` in send order.
    pending_order: VecDeque<u64>,
    /// Highest seq handed to the application queue.
    forwarded_seq: u64,
    /// Highest seq acknowledged to the server.
    acknowledged_seq: u64,
    /// Decoded deliveries waiting for queue room.
    ready: VecDeque<Delivered>,
    /// Connections made.
    connections: u64,
    /// The RemoveDevice awaiting its answer (one at a time: the server's
    /// answers do not name the request they refuse), then those queued.
    removal: Option<(u32, oneshot::Sender<Result<(), ClientError>>)>,
    /// RemoveDevice requests waiting for `removal` to be answered.
    queued_removals: VecDeque<(u32, oneshot::Sender<Result<(), ClientError>>)>,
    /// Users this device watches: subscriptions belong to a server session,
    /// so they are sent again after every reconnect.
    watched: std::collections::BTreeSet<u64>,
    /// The presence privacy last set (sent again after a reconnect).
    privacy: Option<u8>,
    /// To the application's presence queue.
    presence: mpsc::Sender<PresenceEvent>,
    /// Presence events waiting for room there, coalesced per user.
    presence_order: VecDeque<u64>,
    presence_latest: HashMap<u64, PresenceState>,
    /// Refusals waiting for room there.
    presence_refusals: VecDeque<ClientError>,
    /// Typing notices waiting for room there (the oldest go first when full).
    presence_typing: VecDeque<PresenceEvent>,
}

impl Session {
    pub(crate) fn new(
        config: ClientConfig,
        tls: quinn::ClientConfig,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        deliveries: mpsc::Sender<Delivered>,
        presence: mpsc::Sender<PresenceEvent>,
    ) -> Session {
        let resume = config.resume_after_seq;
        Session {
            config,
            tls,
            shared,
            commands,
            deliveries,
            home: None,
            next_client_msg_id: rand::random::<u64>() >> 1,
            pending: HashMap::new(),
            pending_order: VecDeque::new(),
            forwarded_seq: resume,
            acknowledged_seq: resume,
            ready: VecDeque::new(),
            connections: 0,
            removal: None,
            queued_removals: VecDeque::new(),
            watched: std::collections::BTreeSet::new(),
            privacy: None,
            presence,
            presence_order: VecDeque::new(),
            presence_latest: HashMap::new(),
            presence_refusals: VecDeque::new(),
            presence_typing: VecDeque::new(),
        }
    }

    pub(crate) async fn run(mut self, ready: oneshot::Sender<Result<(), ClientError>>) -> Result<(), ClientError> {
        let mut ready = Some(ready);
        let mut attempt: u32 = 0;
        loop {
            match self.connect_once().await {
                Ok(live) => {
                    attempt = 0;
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Ok(()));
                    }
                    match self.serve(live).await {
                        Ended::Closed => return Ok(()),
                        Ended::Lost(reason) => {
                            tracing::debug!(%reason, "connection lost; reconnecting")
                        }
                        Ended::Fatal(error) => return Err(self.fail_all(error)),
                    }
                }
                Err(error) => {
                    attempt += 1;
                    let fatal = matches!(
                        error,
                        ClientError::Server { .. } | ClientError::Ca { .. } | ClientError::SeqWentBackwards { .. }
                    );
                    let first_failed = ready.is_some() && attempt >= self.config.connect_attempts;
                    if fatal || first_failed {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(Err(error.clone()));
                        }
                        return Err(self.fail_all(error));
                    }
                    tracing::debug!(%error, attempt, "connect failed; retrying");
                    // A redirect target that stopped answering may be stale.
                    if attempt % 3 == 0 {
                        self.home = None;
                    }
                }
            }
            let backoff = Duration::from_millis(50 << attempt.min(6)).min(BACKOFF_MAX);
            tokio::time::sleep(backoff).await;
            if self.commands.is_closed() {
                return Ok(());
            }
        }
    }

    fn fail_all(&mut self, error: ClientError) -> ClientError {
        if let Ok(mut ended) = self.shared.ended.lock() {
            *ended = Some(error.clone());
        }
        for (_, pending) in self.pending.drain() {
            let _ = pending.reply.send(Err(error.clone()));
        }
        self.pending_order.clear();
        // Removing this very device ends its session with DeviceRemoved (the
        // answer may have been lost with the connection): that is success.
        let own = self.shared.info.lock().map(|info| info.device_id).ok();
        let removed_itself = matches!(&error, ClientError::Server { code: Some(ErrorCode::DeviceRemoved), .. });
        for (device_id, reply) in self.removal.take().into_iter().chain(self.queued_removals.drain(..)) {
            let outcome = if removed_itself && Some(device_id) == own { Ok(()) } else { Err(error.clone()) };
            let _ = reply.send(outcome);
        }
        error
    }

    async fn connect_once(&mut self) -> Result<Live, ClientError> {
        let mut target = match &self.home {
            Some(home) => home.clone(),
            None => resolve(&self.config.server).await?,
        };
        for _ in 0..=REDIRECTS_MAX {
            let attempt = tokio::time::timeout(self.config.connect_timeout, self.hello(&target)).await;
            let outcome = attempt
                .map_err(|_| ClientError::Connect { server: target.0.to_string(), detail: "timed out".into() })??;
            match outcome {
                HelloOutcome::Welcome(live, welcome) => {
                    let processed_seq = self.shared.processed_seq.load(Ordering::Relaxed).max(self.forwarded_seq);
                    if welcome.last_seq < processed_seq {
                        live.connection.close(quinn::VarInt::from_u32(iris_protocol::close_code::NORMAL), b"seq");
                        return Err(ClientError::SeqWentBackwards { processed_seq, server_last_seq: welcome.last_seq });
                    }
                    self.home = Some(target);
                    self.connections += 1;
                    if let Ok(mut info) = self.shared.info.lock() {
                        *info = crate::SessionInfo {
                            user_id: welcome.user_id,
                            device_id: welcome.device_id,
                            shard: welcome.shard,
                            connections: self.connections,
                        };
                    }
                    return Ok(live);
                }
                HelloOutcome::Redirect(redirect) => {
                    let host = redirect.address.clone();
                    target = resolve(&join_host_port(&host, redirect.port)).await?;
                }
            }
        }
        Err(ClientError::Protocol("too many redirects".into()))
    }

    async fn hello(&self, target: &(SocketAddr, String)) -> Result<HelloOutcome, ClientError> {
        let connect_error = |detail: String| ClientError::Connect { server: target.0.to_string(), detail };
        let endpoint = match &self.config.endpoint {
            Some(shared) => shared.clone(),
            None => {
                let bind: SocketAddr = if target.0.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
                    .parse()
                    .map_err(|_| connect_error("bad bind address".into()))?;
                quinn::Endpoint::client(bind).map_err(|e| connect_error(e.to_string()))?
            }
        };
        let connection = endpoint
            .connect_with(self.tls.clone(), target.0, &target.1)
            .map_err(|e| connect_error(e.to_string()))?
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let (mut request_send, request_recv) = connection.open_bi().await.map_err(|e| connect_error(e.to_string()))?;
        let hello = Frame::Hello(frames::Hello {
            token: self.config.token.clone(),
            resume_after_seq: self.shared.processed_seq.load(Ordering::Relaxed),
        });
        let bytes = encode(&hello, self.config.frame_bytes_max).map_err(|e| ClientError::Protocol(e.to_string()))?;
        request_send.write_all(&bytes).await.map_err(|e| connect_error(e.to_string()))?;
        let mut live = Live {
            connection,
            request_send,
            request_recv,
            decoder: FrameDecoder::new(self.config.frame_bytes_max),
            answer_timeout: self.config.answer_timeout,
        };
        let mut buffer = vec![0u8; READ_CHUNK_BYTES];
        loop {
            match live.decoder.next_frame().map_err(|e| ClientError::Protocol(e.to_string()))? {
                Some(Frame::Welcome(welcome)) => return Ok(HelloOutcome::Welcome(live, welcome)),
                Some(Frame::Redirect(redirect)) => {
                    live.connection.close(quinn::VarInt::from_u32(iris_protocol::close_code::REDIRECTED), b"redirect");
                    return Ok(HelloOutcome::Redirect(redirect));
                }
                Some(Frame::Error(error)) => return Err(server_error(&error)),
                Some(other) => {
                    return Err(ClientError::Protocol(format!("unexpected {:?} before Welcome", other.kind())))
                }
                None => {}
            }
            match live.request_recv.read(&mut buffer).await {
                Ok(Some(count)) => live.decoder.feed(&buffer[..count]),
                Ok(None) => return Err(connect_error("server closed the stream before Welcome".into())),
                Err(error) => return Err(connect_error(error.to_string())),
            }
        }
    }

    async fn serve(&mut self, mut live: Live) -> Ended {
        // Resend everything unacknowledged, in order, with the same ids.
        for pending in self.pending.values_mut() {
            pending.retry_at = Some(Instant::now());
        }
        if let Err(ended) = self.resend_due(&mut live).await {
            return ended;
        }
        // A removal in flight is asked again (removing is idempotent).
        if let Some((device_id, _)) = &self.removal {
            let frame = Frame::RemoveDevice(frames::RemoveDevice { device_id: *device_id });
            if let Err(ended) = write_frame(&mut live, &frame, self.config.frame_bytes_max).await {
                return ended;
            }
        }
        // Presence lives in the server's session: watch and set privacy again.
        if let Err(ended) = self.resubscribe(&mut live).await {
            return ended;
        }
        let mut push: Option<quinn::RecvStream> = None;
        // The second unidirectional stream the server opens: Presence frames.
        let mut ephemeral: Option<quinn::RecvStream> = None;
        let mut ephemeral_decoder = FrameDecoder::new(iris_protocol::FRAME_BYTES_MAX_CEILING);
        let mut ephemeral_buffer = vec![0u8; READ_CHUNK_BYTES];
        let presence_queue = self.presence.clone();
        // Deliver frames are bounded by the server's limit, which may be
        // larger than ours: a message we could not decode would come back
        // on every reconnect and stop this device's push stream for good.
        let mut push_decoder = FrameDecoder::new(iris_protocol::FRAME_BYTES_MAX_CEILING);
        let mut request_buffer = vec![0u8; READ_CHUNK_BYTES];
        let mut push_buffer = vec![0u8; READ_CHUNK_BYTES];
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deliveries = self.deliveries.clone();
        // Since when the server has been silent while something waits for
        // its answer (refreshed by every read, and by every tick with
        // nothing outstanding).
        let mut quiet_since = Instant::now();
        let mut last_tick = Instant::now();
        loop {
            let window_open = self.pending.len() < SEND_WINDOW_MAX;
            let can_read_push = push.is_some() && self.ready.len() < READY_DELIVERIES_MAX;
            let can_read_ephemeral = ephemeral.is_some();
            let presence_waiting = !self.presence_order.is_empty()
                || !self.presence_refusals.is_empty()
                || !self.presence_typing.is_empty();
            tokio::select! {
                // In order: an answer already read never loses to the tick
                // that would give the connection up.
                biased;
                command = self.commands.recv(), if window_open => match command {
                    None => {
                        self.flush_delivery_ack(&mut live).await.ok();
                        live.connection.close(quinn::VarInt::from_u32(0), b"client dropped");
                        return Ended::Closed;
                    }
                    Some(Command::Send { to_user, payload, reply }) => {
                        let id = self.next_client_msg_id;
                        self.next_client_msg_id = self.next_client_msg_id.wrapping_add(1);
                        // The previous unacknowledged send to this recipient,
                        // and whether it (or one before it) waits for a retry.
                        let mut after = None;
                        let mut held = false;
                        for earlier in self.pending_order.iter().rev() {
                            let Some(earlier_send) = self.pending.get(earlier) else { continue };
                            if earlier_send.to_user == to_user {
                                after = after.or(Some(*earlier));
                                held |= earlier_send.retry_at.is_some() || earlier_send.first_refused_at.is_some();
                            }
                        }
                        let retry_at = held.then(Instant::now);
                        let pending = PendingSend { to_user, payload, reply, retry_at, first_refused_at: None };
                        let frame = send_frame(id, after, &pending);
                        self.pending.insert(id, pending);
                        self.pending_order.push_back(id);
                        if !held {
                            if let Err(ended) = write_frame(&mut live, &frame, self.config.frame_bytes_max).await {
                                return ended;
                            }
                        }
                    }
                    Some(Command::Close { reply }) => {
                        self.flush_delivery_ack(&mut live).await.ok();
                        let _ = live.request_send.finish();
                        // Give the ack a moment to leave before closing.
                        let _ = tokio::time::timeout(Duration::from_millis(200), live.request_send.stopped()).await;
                        live.connection.close(quinn::VarInt::from_u32(0), b"client closed");
                        let _ = reply.send(());
                        return Ended::Closed;
                    }
                    Some(Command::Reconnect) => {
                        live.connection.close(quinn::VarInt::from_u32(0), b"reconnect");
                        return Ended::Lost("reconnect requested".into());
                    }
                    Some(Command::RemoveDevice { device_id, reply }) => {
                        self.queued_removals.push_back((device_id, reply));
                        if let Err(ended) = self.start_removal(&mut live).await {
                            return ended;
                        }
                    }
                    Some(Command::WatchPresence { users }) => {
                        // All of them, watched already or not: the server
                        // counts each once, and a request it refused (past
                        // its bound) is kept whole nowhere but here, so
                        // asking again must reach it.
                        self.watched.extend(users.iter().copied());
                        let frame = Frame::PresenceSubscribe(frames::PresenceSubscribe { users });
                        if let Err(ended) = write_frame(&mut live, &frame, self.config.frame_bytes_max).await {
                            return ended;
                        }
                    }
                    Some(Command::UnwatchPresence { users }) => {
                        // All of them: the server's contact list outlives
                        // this process, so one watched by an earlier run
                        // is unknown here and must still be removed.
                        for user in &users {
                            self.watched.remove(user);
                        }
                        for user in &users {
                            if self.presence_latest.remove(user).is_some() {
                                self.presence_order.retain(|waiting| waiting != user);
                            }
                        }
                        let frame = Frame::PresenceUnsubscribe(frames::PresenceUnsubscribe { users });
                        if let Err(ended) = write_frame(&mut live, &frame, self.config.frame_bytes_max).await {
                            return ended;
                        }
                    }
                    Some(Command::Typing { to_user, active }) => {
                        let frame = Frame::Typing(frames::Typing { to_user, active });
                        if let Err(ended) = write_frame(&mut live, &frame, self.config.frame_bytes_max).await {
                            return ended;
                        }
                    }
                    Some(Command::PresencePrivacy { privacy }) => {
                        self.privacy = Some(privacy);
                        let frame = Frame::PresencePrivacy(frames::PresencePrivacy { privacy });
                        if let Err(ended) = write_frame(&mut live, &frame, self.config.frame_bytes_max).await {
                            return ended;
                        }
                    }
                },
                read = live.request_recv.read(&mut request_buffer) => match read {
                    Ok(Some(count)) => {
                        quiet_since = Instant::now();
                        live.decoder.feed(&request_buffer[..count]);
                        loop {
                            match live.decoder.next_frame() {
                                Ok(Some(frame)) => {
                                    if let Some(ended) = self.on_response(frame) {
                                        return ended;
                                    }
                                    if let Err(ended) = self.start_removal(&mut live).await {
                                        return ended;
                                    }
                                }
                                Ok(None) => break,
                                Err(error) => return Ended::Fatal(ClientError::Protocol(error.to_string())),
                            }
                        }
                    }
                    Ok(None) => return Ended::Lost("server finished the request stream".into()),
                    Err(error) => return Ended::Lost(error.to_string()),
                },
                stream = live.connection.accept_uni(), if push.is_none() || ephemeral.is_none() => match stream {
                    // In the order the server opens them: push, then ephemeral.
                    Ok(stream) if push.is_none() => push = Some(stream),
                    Ok(stream) => ephemeral = Some(stream),
                    Err(error) => return Ended::Lost(error.to_string()),
                },
                read = read_optional(&mut ephemeral, &mut ephemeral_buffer), if can_read_ephemeral => match read {
                    Ok(Some(count)) => {
                        ephemeral_decoder.feed(&ephemeral_buffer[..count]);
                        loop {
                            match ephemeral_decoder.next_frame() {
                                Ok(Some(Frame::Presence(presence))) => self.on_presence(presence),
                                Ok(Some(Frame::TypingNotice(notice))) => {
                                    // One waiting notice per typing device: the newest.
                                    self.presence_typing.retain(|waiting| {
                                        !matches!(waiting, PresenceEvent::Typing { from_user, from_device, .. }
                                            if *from_user == notice.from_user && *from_device == notice.from_device)
                                    });
                                    if self.presence_typing.len() >= READY_TYPING_MAX {
                                        self.presence_typing.pop_front();
                                    }
                                    self.presence_typing.push_back(PresenceEvent::Typing {
                                        from_user: notice.from_user,
                                        from_device: notice.from_device,
                                        active: notice.active,
                                    });
                                }
                                Ok(Some(other)) => {
                                    let detail = format!("unexpected {:?} on the ephemeral stream", other.kind());
                                    return Ended::Fatal(ClientError::Protocol(detail));
                                }
                                Ok(None) => break,
                                Err(error) => return Ended::Fatal(ClientError::Protocol(error.to_string())),
                            }
                        }
                    }
                    Ok(None) => return Ended::Lost("server finished the ephemeral stream".into()),
                    Err(error) => return Ended::Lost(error.to_string()),
                },
                permit = presence_queue.reserve(), if presence_waiting => match permit {
                    Ok(permit) => {
                        if let Some(refusal) = self.presence_refusals.pop_front() {
                            permit.send(PresenceEvent::Refused(refusal));
                        } else if let Some(typing) = self.presence_typing.pop_front() {
                            permit.send(typing);
                        } else if let Some(user) = self.presence_order.pop_front() {
                            if let Some(state) = self.presence_latest.remove(&user) {
                                permit.send(PresenceEvent::Changed { user, state });
                            }
                        }
                    }
                    Err(_) => {
                        // The application dropped its receiver.
                        self.presence_order.clear();
                        self.presence_latest.clear();
                        self.presence_refusals.clear();
                        self.presence_typing.clear();
                    }
                },
                read = read_optional(&mut push, &mut push_buffer), if can_read_push => match read {
                    Ok(Some(count)) => {
                        quiet_since = Instant::now();
                        push_decoder.feed(&push_buffer[..count]);
                        loop {
                            match push_decoder.next_frame() {
                                Ok(Some(Frame::Deliver(deliver))) => self.on_deliver(deliver),
                                Ok(Some(other)) => {
                                    let detail = format!("unexpected {:?} on the push stream", other.kind());
                                    return Ended::Fatal(ClientError::Protocol(detail));
                                }
                                Ok(None) => break,
                                Err(error) => return Ended::Fatal(ClientError::Protocol(error.to_string())),
                            }
                        }
                    }
                    Ok(None) => return Ended::Lost("server finished the push stream".into()),
                    Err(error) => return Ended::Lost(error.to_string()),
                },
                permit = deliveries.reserve(), if !self.ready.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(delivered) = self.ready.pop_front() {
                            permit.send(delivered);
                        }
                    }
                    Err(_) => {
                        // The application dropped its receiver; keep serving sends.
                        self.ready.clear();
                    }
                },
                _ = tick.tick() => {
                    let timeout = self.config.answer_timeout;
                    // A tick long overdue means this task did not run (a
                    // branch waited, or the process was descheduled): that
                    // time is not the server's silence.
                    let overdue = last_tick.elapsed() > 10 * TICK;
                    last_tick = Instant::now();
                    if !self.awaiting_answer() || timeout.is_zero() || overdue {
                        quiet_since = Instant::now();
                    } else if quiet_since.elapsed() > timeout {
                        live.connection.close(quinn::VarInt::from_u32(0), b"no answer");
                        return Ended::Lost(format!("no answer from the server for {timeout:?}"));
                    }
                    if let Err(ended) = self.flush_delivery_ack(&mut live).await {
                        return ended;
                    }
                    if let Err(ended) = self.resend_due(&mut live).await {
                        return ended;
                    }
                },
            }
        }
    }

    /// Whether a request on the connection waits for its answer (a send not
    /// held back for a retry, or a removal).
    fn awaiting_answer(&self) -> bool {
        self.removal.is_some() || self.pending.values().any(|pending| pending.retry_at.is_none())
    }

    /// Sends the next queued RemoveDevice if none is awaiting its answer.
    async fn start_removal(&mut self, live: &mut Live) -> Result<(), Ended> {
        if self.removal.is_some() {
            return Ok(());
        }
        let Some((device_id, reply)) = self.queued_removals.pop_front() else { return Ok(()) };
        self.removal = Some((device_id, reply));
        let frame = Frame::RemoveDevice(frames::RemoveDevice { device_id });
        write_frame(live, &frame, self.config.frame_bytes_max).await
    }

    /// Handles a frame on the request stream; returns `Some` to end the connection.
    fn on_response(&mut self, frame: Frame) -> Option<Ended> {
        match frame {
            Frame::DeviceRemoved(removed) => {
                if let Some((_, reply)) = self.removal.take_if(|(device_id, _)| *device_id == removed.device_id) {
                    let _ = reply.send(Ok(()));
                }
                let own = self.shared.info.lock().map(|info| info.device_id).ok();
                if own == Some(removed.device_id) {
                    let message = "this device was removed".to_string();
                    return Some(Ended::Fatal(ClientError::Server { code: Some(ErrorCode::DeviceRemoved), message }));
                }
                None
            }
            Frame::Ack(ack) => {
                if let Some(pending) = self.pending.remove(&ack.client_msg_id) {
                    self.pending_order.retain(|id| *id != ack.client_msg_id);
                    let _ = pending
                        .reply
                        .send(Ok(Acked { client_msg_id: ack.client_msg_id, server_msg_id: ack.server_msg_id }));
                }
                None
            }
            Frame::Error(error) => {
                let code = ErrorCode::from_u16(error.code);
                match error.client_msg_id {
                    Some(id) => {
                        // OutOfOrder only says an earlier send is not stored
                        // yet: this one goes again behind it, whatever the
                        // application's retry policy.
                        let behind = code == Some(ErrorCode::OutOfOrder);
                        let now = Instant::now();
                        let retry_for = self.config.refusal_retry_for;
                        let within = |pending: &mut PendingSend| {
                            behind || now.duration_since(*pending.first_refused_at.get_or_insert(now)) < retry_for
                        };
                        let retryable = behind
                            || self.config.retry_refusals
                                && code.is_some_and(ErrorCode::is_retryable)
                                && self.pending.get_mut(&id).is_some_and(within);
                        if retryable {
                            if let Some(pending) = self.pending.get_mut(&id) {
                                // Never past the deadline: the refusal that
                                // answers the last retry ends the send in time.
                                let left = pending
                                    .first_refused_at
                                    .map_or(retry_for, |first| retry_for.saturating_sub(now.duration_since(first)));
                                let delay = retry_delay(error.retry_after_ms);
                                pending.retry_at = Some(now + if behind { delay } else { delay.min(left) });
                            }
                        } else if let Some(pending) = self.pending.remove(&id) {
                            self.pending_order.retain(|pending_id| *pending_id != id);
                            let _ = pending.reply.send(Err(server_error(&error)));
                        }
                        None
                    }
                    None if code == Some(ErrorCode::ShuttingDown) => Some(Ended::Lost(error.message)),
                    // A PresenceSubscribe past the server's bound: nothing of
                    // it was kept; the application hears it on its presence
                    // queue and the session goes on.
                    None if code == Some(ErrorCode::TooManySubscriptions) => {
                        if self.presence_refusals.len() < READY_PRESENCE_MAX {
                            self.presence_refusals.push_back(server_error(&error));
                        }
                        None
                    }
                    // Refusals of the RemoveDevice in flight (one at a time).
                    None if matches!(code, Some(ErrorCode::UnknownDevice | ErrorCode::Throttle))
                        && self.removal.is_some() =>
                    {
                        if let Some((_, reply)) = self.removal.take() {
                            let _ = reply.send(Err(server_error(&error)));
                        }
                        None
                    }
                    None => Some(Ended::Fatal(server_error(&error))),
                }
            }
            Frame::Pong(_) => None,
            other => Some(Ended::Fatal(ClientError::Protocol(format!("unexpected {:?} response", other.kind())))),
        }
    }

    /// A Presence frame: the latest state per user waits for the application.
    fn on_presence(&mut self, presence: frames::Presence) {
        if !self.watched.contains(&presence.user) {
            return; // Unwatched since: the server's update crossed the unsubscribe.
        }
        let state = match presence.state {
            frames::PRESENCE_ONLINE => PresenceState::Online,
            frames::PRESENCE_OFFLINE => {
                PresenceState::Offline { last_seen_ms: (presence.last_seen_ms > 0).then_some(presence.last_seen_ms) }
            }
            frames::PRESENCE_HIDDEN => PresenceState::Hidden,
            _ => PresenceState::Unavailable,
        };
        if self.presence_latest.insert(presence.user, state).is_none() {
            if self.presence_order.len() >= READY_PRESENCE_MAX {
                self.presence_latest.remove(&presence.user);
                return;
            }
            self.presence_order.push_back(presence.user);
        }
    }

    /// After a reconnect: the watched users and the privacy again.
    async fn resubscribe(&mut self, live: &mut Live) -> Result<(), Ended> {
        let watched: Vec<u64> = self.watched.iter().copied().collect();
        for users in watched.chunks(SUBSCRIBE_CHUNK_USERS) {
            let frame = Frame::PresenceSubscribe(frames::PresenceSubscribe { users: users.to_vec() });
            write_frame(live, &frame, self.config.frame_bytes_max).await?;
        }
        if let Some(privacy) = self.privacy {
            let frame = Frame::PresencePrivacy(frames::PresencePrivacy { privacy });
            write_frame(live, &frame, self.config.frame_bytes_max).await?;
        }
        Ok(())
    }

    fn on_deliver(&mut self, deliver: frames::Deliver) {
        if deliver.seq <= self.forwarded_seq {
            return; // Already handed to the application (redelivery after reconnect).
        }
        self.forwarded_seq = deliver.seq;
        self.ready.push_back(Delivered {
            seq: deliver.seq,
            from_user: deliver.from_user,
            from_device: deliver.from_device,
            server_msg_id: deliver.server_msg_id,
            sent_at_ms: deliver.sent_at_ms,
            payload: deliver.payload,
        });
    }

    async fn flush_delivery_ack(&mut self, live: &mut Live) -> Result<(), Ended> {
        let processed = self.shared.processed_seq.load(Ordering::Relaxed);
        if processed > self.acknowledged_seq {
            let frame = Frame::DeliveryAck(frames::DeliveryAck { up_to_seq: processed });
            write_frame(live, &frame, self.config.frame_bytes_max).await?;
            self.acknowledged_seq = processed;
        }
        Ok(())
    }

    /// Resends, in send order, every waiting send whose time has come and
    /// that no earlier waiting send to the same recipient holds back; each
    /// names the send before it to that recipient as `after`.
    async fn resend_due(&mut self, live: &mut Live) -> Result<(), Ended> {
        let now = Instant::now();
        let mut previous: HashMap<u64, u64> = HashMap::new();
        let mut held: HashSet<u64> = HashSet::new();
        let mut due = Vec::new();
        for &id in &self.pending_order {
            let Some(pending) = self.pending.get(&id) else { continue };
            let after = previous.insert(pending.to_user, id);
            let refused_before = pending.first_refused_at.is_some();
            let Some(at) = pending.retry_at else {
                // The retry of a refused send is out: the later sends to its
                // recipient wait for its outcome rather than follow it into
                // a likely refusal (and each spend a rate token).
                if refused_before {
                    held.insert(pending.to_user);
                }
                continue;
            };
            if at > now || held.contains(&pending.to_user) {
                held.insert(pending.to_user);
            } else {
                due.push((id, after));
                if refused_before {
                    held.insert(pending.to_user);
                }
            }
        }
        for (id, after) in due {
            if let Some(pending) = self.pending.get_mut(&id) {
                pending.retry_at = None;
                let frame = send_frame(id, after, pending);
                write_frame(live, &frame, self.config.frame_bytes_max).await?;
            }
        }
        Ok(())
    }
}

enum HelloOutcome {
    Welcome(Live, frames::Welcome),
    Redirect(frames::Redirect),
}

fn send_frame(client_msg_id: u64, after: Option<u64>, pending: &PendingSend) -> Frame {
    Frame::Send(frames::Send { client_msg_id, to_user: pending.to_user, after, payload: pending.payload.clone() })
}

/// How long to wait before retrying a refused send: the server's
/// `retry_after_ms` (at least 10 ms) plus up to half of it again at random,
/// so senders refused together do not all come back at the same moment.
fn retry_delay(retry_after_ms: u32) -> Duration {
    let base = u64::from(retry_after_ms.max(10));
    Duration::from_millis(base + rand::random::<u64>() % (base / 2 + 1))
}

async fn write_frame(live: &mut Live, frame: &Frame, frame_bytes_max: u32) -> Result<(), Ended> {
    let bytes = encode(frame, frame_bytes_max).map_err(|e| Ended::Fatal(ClientError::Protocol(e.to_string())))?;
    let write = live.request_send.write_all(&bytes);
    if live.answer_timeout.is_zero() {
        return write.await.map_err(|e| Ended::Lost(e.to_string()));
    }
    match tokio::time::timeout(live.answer_timeout, write).await {
        Ok(written) => written.map_err(|e| Ended::Lost(e.to_string())),
        Err(_) => {
            live.connection.close(quinn::VarInt::from_u32(0), b"no answer");
            Err(Ended::Lost(format!("a write waited {:?} for the server", live.answer_timeout)))
        }
    }
}

async fn read_optional(
    stream: &mut Option<quinn::RecvStream>,
    buffer: &mut [u8],
) -> Result<Option<usize>, quinn::ReadError> {
    match stream {
        Some(stream) => stream.read(buffer).await,
        None => std::future::pending().await,
    }
}

fn server_error(error: &frames::Error) -> ClientError {
    ClientError::Server { code: ErrorCode::from_u16(error.code), message: error.message.clone() }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Resolves `host:port` to an address and the TLS server name.
pub(crate) async fn resolve(server: &str) -> Result<(SocketAddr, String), ClientError> {
    let (host, _port) = server.rsplit_once(':').ok_or_else(|| ClientError::Resolve(server.to_string()))?;
    let name = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let mut addresses = tokio::net::lookup_host(server).await.map_err(|_| ClientError::Resolve(server.to_string()))?;
    let address = addresses.next().ok_or_else(|| ClientError::Resolve(server.to_string()))?;
    Ok((address, name))
}
