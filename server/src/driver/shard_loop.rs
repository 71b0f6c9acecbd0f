//! The per-core loop: one quinn-proto endpoint, all of its connections, the
//! shard's UDP socket, its timers and its cross-shard channels, driven by a
//! single task on the shard's glommio executor. No task or channel exists per
//! connection (QUIC-DRIVER-NOTES.md explains the measurements behind that).
//!
//! One iteration: receive a bounded number of datagram batches; take a
//! bounded number of cross-shard batches; fire expired connection timers;
//! process application events of the connections that changed (decoding
//! frames into the [`ShardCore`]); apply the core's outputs and pushes;
//! hand cross-shard batches to the channels; poll transmits and send them.
//! Then wait for the socket, the earliest timer or a channel, unless work is
//! left over, in which case the loop yields to the executor and goes on.

use super::connection::{Connection, ConnectionLimits};
use super::log_reader::{LogReader, ReadDone};
use super::log_writer::{WriterEvent, WriterQueue};
use super::reservations::Reservations;
use super::udp::UdpIo;
use crate::metrics::ShardMetrics;
use crate::shard::{ConnId, MailboxStore, Now, Output, ReadOutcome, ShardCore, ShardMessage, WriteOutcome};
use bytes::BytesMut;
use futures_lite::future;
use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender};
use quinn_proto::{ConnectionHandle, DatagramEvent, Endpoint, ServerConfig};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

/// Most time between two publications of the gauges that cost a walk.
const GAUGE_INTERVAL: Duration = Duration::from_millis(100);

/// Receive batches per iteration. With 32 datagrams per batch this is up to
/// 128 datagrams (or GRO batches) before timers and channels get a turn:
/// about 0.5-1 ms of work at the measured 6 us per packet, which keeps timer
/// lateness near the measured p99 of 80 us plus one iteration.
const RECEIVE_BATCHES_PER_ITERATION: usize = 4;
/// Cross-shard batches taken per iteration (each up to
/// `CROSS_SHARD_BATCH_MESSAGES_MAX` messages).
const SHARD_BATCHES_PER_ITERATION: usize = 16;
/// Messages per cross-shard batch: large enough to amortise the cross-core
/// wakeup (about 70 us here), small enough to keep one batch under 1 ms of work.
pub const CROSS_SHARD_BATCH_MESSAGES_MAX: usize = 256;
/// Transmits queued for the socket before connections stop being polled for
/// more and endpoint answers are dropped; each holds up to one GSO batch
/// (<= 64 KiB), so the queue holds at most 16 MiB (plus one connection's
/// last poll).
const TRANSMIT_QUEUE_MAX: usize = 256;
/// The loop iterates at least this often, even idle, so its heartbeat
/// (read by `/health`) shows it is alive; one wake a second costs nothing.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How long to wait before retrying when the kernel send buffer is full or a
/// channel is full.
const BACKOFF: Duration = Duration::from_micros(200);

/// A cross-shard batch.
pub type ShardBatch = Vec<ShardMessage>;

/// Wakes the loop when a cross-shard channel may hold a batch. glommio
/// keeps every waker that a poll of an empty channel hands it until a batch
/// arrives, so polling each channel once per loop iteration (as the loop
/// once did, in its wait and in its no-waker drain alike) piled up a waker
/// per iteration on an idle channel: memory that grew for as long as the
/// link stayed idle, and, once a shard's loop woke ~32,000 times between
/// two batches (reads of the log do that), an overflow of glommio's waker
/// count that aborted the process. Through this waker a channel is polled
/// again only once glommio has woken it (or after a poll returned a batch).
#[derive(Debug, Default)]
struct LinkWaker {
    /// glommio woke this channel's waker since the last poll.
    ready: std::sync::atomic::AtomicBool,
    /// The loop task's waker, while it waits.
    task: std::sync::Mutex<Option<Waker>>,
}

impl std::task::Wake for LinkWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        let task = self.task.lock().ok().and_then(|mut task| task.take());
        if let Some(task) = task {
            task.wake();
        }
    }
}

/// One inbound channel's waker and whether it is registered with glommio.
#[derive(Debug)]
struct LinkWake {
    shared: Arc<LinkWaker>,
    waker: Waker,
    /// A poll returned Pending and glommio has not woken the waker since.
    armed: bool,
}

impl LinkWake {
    fn new() -> LinkWake {
        let shared = Arc::new(LinkWaker::default());
        LinkWake { waker: Waker::from(Arc::clone(&shared)), shared, armed: false }
    }

    /// Whether the channel should be polled now.
    fn due(&mut self) -> bool {
        if self.shared.ready.swap(false, std::sync::atomic::Ordering::AcqRel) {
            self.armed = false;
        }
        !self.armed
    }
}

/// A datagram (or GSO batch) waiting for the socket.
#[derive(Debug)]
struct OutgoingDatagram {
    /// Where and how to send it.
    transmit: quinn_proto::Transmit,
    /// The bytes, `transmit.size` long.
    buffer: Vec<u8>,
}

/// Channels to and from the other shards of the node.
#[derive(Debug)]
pub struct ShardLinks {
    /// Sender to each shard, indexed by shard (`None` for this shard).
    pub senders: Vec<Option<ConnectedSender<ShardBatch>>>,
    /// Receivers from each other shard, with that shard's index.
    pub receivers: Vec<(u16, ConnectedReceiver<ShardBatch>)>,
}

/// The shard's log writer task, when the store is durable.
#[derive(Debug)]
pub struct WriterLink {
    /// Commands to the writer.
    pub commands: WriterQueue,
    /// Completions from the writer (capacity `WRITER_QUEUE_MAX`).
    pub events: flume::Receiver<WriterEvent>,
    /// Reads cold mailbox entries back.
    pub reader: LogReader,
}

/// What a shard loop needs besides its core and log writer.
#[derive(Debug)]
pub struct LoopParts {
    /// Endpoint settings (with the persistent stateless-reset key).
    pub endpoint_config: Arc<quinn_proto::EndpointConfig>,
    /// TLS and transport settings for client connections.
    pub server_config: Arc<ServerConfig>,
    /// The shard's socket.
    pub udp: UdpIo,
    /// Channels to the other shards.
    pub links: ShardLinks,
    /// Bound on live connections.
    pub connections_max: usize,
    /// Bound on live connections from one source address.
    pub connections_per_source_max: u32,
    /// Handshakes in progress above which new peers get a Retry first.
    pub handshakes_unvalidated_max: usize,
    /// Per-connection bounds.
    pub connection_limits: ConnectionLimits,
    /// This shard's counters, read by the admin endpoint.
    pub metrics: Arc<ShardMetrics>,
    /// The shard's durable message id and seq reservations.
    pub reservations: Reservations,
    /// Set once by the process on SIGTERM: drain ([`ShardCore::begin_drain`]).
    pub drain: Arc<std::sync::atomic::AtomicBool>,
}

/// Everything one shard's loop owns.
pub struct ShardLoop<S: MailboxStore> {
    /// The message path.
    core: ShardCore<S>,
    /// The QUIC endpoint (sans-IO).
    endpoint: Endpoint,
    /// Live connections, by quinn handle. Bounded by `connections_max`.
    /// Boxed: a connection is ~6.4 KB, and a table holding them inline
    /// touches every page of its (up to 2x oversized) bucket array; boxed, the
    /// table holds pointers and idle connections cost ~4 KiB less each
    /// (docs/performance.md, idle connections).
    connections: HashMap<ConnectionHandle, Box<Connection>>,
    /// Bound on `connections`; further handshakes are refused.
    connections_max: usize,
    /// Live connections per source address; bounded by `connections`.
    connections_by_source: HashMap<std::net::IpAddr, u32>,
    /// Bound on each entry of `connections_by_source`.
    connections_per_source_max: u32,
    /// Connections whose handshake has not completed.
    handshaking: usize,
    /// Above this many `handshaking`, unvalidated peers get a Retry.
    handshakes_unvalidated_max: usize,
    /// Per-connection buffer bounds.
    connection_limits: ConnectionLimits,
    /// Connection deadlines, ordered; each connection appears at most once.
    timers: BTreeSet<(Instant, ConnectionHandle)>,
    /// Connections with work since they were last driven.
    dirty: Vec<ConnectionHandle>,
    /// Datagrams waiting for the socket; bounded by `TRANSMIT_QUEUE_MAX`.
    transmits: VecDeque<OutgoingDatagram>,
    /// Empty send buffers for reuse.
    buffer_pool: Vec<Vec<u8>>,
    /// The socket.
    udp: UdpIo,
    /// Cross-shard channels.
    links: ShardLinks,
    /// Scratch buffer for endpoint responses.
    scratch: Vec<u8>,
    /// The log writer, if the store is durable.
    writer: Option<WriterLink>,
    /// Counters exported by the admin endpoint.
    metrics: Arc<ShardMetrics>,
    /// Test fault injection: panic on the first accepted connection.
    panic_on_connection: bool,
    /// Test fault injection: stop iterating at the first accepted connection.
    hang_on_connection: bool,
    /// The durable message id and seq reservations, extended as they are used.
    reservations: Reservations,
    /// The process asks the shard to drain.
    drain: Arc<std::sync::atomic::AtomicBool>,
    /// The socket readiness future, kept across waits until it resolves
    /// (see [`UdpIo::readable`]).
    readable: Option<Pin<Box<dyn Future<Output = ()>>>>,
    /// The waker of each inbound channel, by sending shard.
    link_wakes: HashMap<u16, LinkWake>,
    /// When the gauges that cost a walk (the outbox depth, O(shards)) were
    /// last published; they are published at most every [`GAUGE_INTERVAL`].
    gauges_published_at: Option<Instant>,
}

impl<S: MailboxStore> std::fmt::Debug for ShardLoop<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardLoop").field("connections", &self.connections.len()).finish_non_exhaustive()
    }
}

/// What ended a wait.
enum Wake {
    Socket,
    Timer,
    /// A cross-shard channel may hold a batch (taken by the next iteration).
    Link,
    Writer(Option<WriterEvent>),
    Read(Option<ReadDone>),
}

impl<S: MailboxStore> ShardLoop<S> {
    /// A loop over a bound socket.
    pub fn new(core: ShardCore<S>, parts: LoopParts, writer: Option<WriterLink>) -> ShardLoop<S> {
        let LoopParts {
            endpoint_config,
            server_config,
            udp,
            links,
            connections_max,
            connections_per_source_max,
            handshakes_unvalidated_max,
            connection_limits,
            metrics,
            reservations,
            drain,
        } = parts;
        let endpoint = Endpoint::new(endpoint_config, Some(server_config), true, None);
        let panic_on_connection = super::failpoint::armed(super::failpoint::PANIC_ON_CONNECTION, core.shard_index());
        let hang_on_connection = super::failpoint::armed(super::failpoint::HANG_ON_CONNECTION, core.shard_index());
        let mut shard_loop = ShardLoop {
            core,
            endpoint,
            connections: HashMap::new(),
            connections_max,
            connections_by_source: HashMap::new(),
            connections_per_source_max,
            handshaking: 0,
            handshakes_unvalidated_max,
            connection_limits,
            timers: BTreeSet::new(),
            dirty: Vec::new(),
            transmits: VecDeque::new(),
            buffer_pool: Vec::new(),
            udp,
            links,
            scratch: Vec::new(),
            writer,
            metrics,
            panic_on_connection,
            hang_on_connection,
            reservations,
            drain,
            readable: None,
            link_wakes: HashMap::new(),
            gauges_published_at: None,
        };
        // A loop that exists has a heartbeat: the node reports ready once
        // every loop is built, and /health must not see a zero beat then.
        shard_loop.publish_metrics();
        ShardMetrics::set(&shard_loop.metrics.serving, 1);
        shard_loop
    }

    /// Runs until the process exits.
    pub async fn run(mut self) {
        loop {
            let busy = self.iterate();
            if busy {
                future::yield_now().await;
                continue;
            }
            match self.wait().await {
                Wake::Link => {}
                Wake::Writer(event) => self.accept_writer_event(event),
                Wake::Read(done) => self.accept_read(done),
                Wake::Socket => self.readable = None,
                Wake::Timer => {}
            }
        }
    }

    /// One pass of the loop. Returns whether work is left over.
    fn iterate(&mut self) -> bool {
        let now = Instant::now();
        if !self.core.is_draining() && self.drain.load(std::sync::atomic::Ordering::Acquire) {
            self.core.begin_drain(Self::clock());
        }
        let mut busy = self.receive_datagrams(now);
        busy |= self.receive_shard_batches();
        self.receive_writer_events();
        self.receive_reads();
        self.fire_timers(now);
        self.core.handle_timeout(Self::clock());
        self.drive_dirty(now);
        self.apply_outputs();
        self.submit_writes();
        self.submit_reads();
        // Before anything leaves: a client that has seen an answer reads
        // metrics that count it (the thread may be preempted right after
        // its datagrams go; a test once scraped in that gap).
        self.publish_metrics();
        busy |= self.send_shard_batches();
        busy |= self.transmit_dirty(now);
        busy |= self.send_datagrams();
        self.reservations.drive(&mut self.core, now);
        if self.core.is_draining() {
            // Settled once every connection has its CONNECTION_CLOSE queued
            // or sent and nothing is owed; the process exits when every
            // shard is settled at once.
            let settled = self.core.drain_settled()
                && self.transmits.is_empty()
                && self.connections.values().all(|connection| connection.quic.is_closed());
            ShardMetrics::set(&self.metrics.drain_settled, u64::from(settled));
        }
        busy || !self.dirty.is_empty()
    }

    /// Copies the core's counters to the exported ones (a few relaxed stores).
    fn publish_metrics(&mut self) {
        let stats = self.core.stats();
        let metrics = &self.metrics;
        ShardMetrics::set(&metrics.heartbeat_ms, crate::metrics::monotonic_ms());
        ShardMetrics::set(&metrics.connections, self.connections.len() as u64);
        ShardMetrics::set(&metrics.sends_accepted_total, stats.sends_accepted);
        ShardMetrics::set(&metrics.messages_stored_total, stats.messages_stored);
        ShardMetrics::set(&metrics.duplicates_total, stats.duplicates);
        ShardMetrics::set(&metrics.sends_refused_total, stats.sends_refused);
        ShardMetrics::set(&metrics.sends_rate_limited_total, stats.rate_limited);
        ShardMetrics::set(&metrics.sends_unfair_share_total, stats.unfair_refusals);
        ShardMetrics::set(&metrics.rate_limit_untracked_total, stats.rate_untracked);
        ShardMetrics::set(&metrics.codel_refusals_total, stats.codel_refusals);
        ShardMetrics::set(&metrics.codel_episodes_total, stats.codel_episodes);
        ShardMetrics::set(&metrics.codel_dropping, stats.codel_dropping);
        for (counter, value) in metrics.sojourn_buckets.iter().zip(stats.sojourn_buckets) {
            ShardMetrics::set(counter, value);
        }
        ShardMetrics::set(&metrics.sojourn_ms_sum, stats.sojourn_ms_sum);
        for (counter, value) in metrics.deliver_buckets.iter().zip(stats.deliver_buckets) {
            ShardMetrics::set(counter, value);
        }
        ShardMetrics::set(&metrics.deliver_ms_sum, stats.deliver_ms_sum);
        for (counter, value) in metrics.frames_received_total.iter().zip(stats.frames_in) {
            ShardMetrics::set(counter, value);
        }
        for (counter, value) in metrics.frames_sent_total.iter().zip(stats.frames_out) {
            ShardMetrics::set(counter, value);
        }
        let now = Instant::now();
        if self.gauges_published_at.is_none_or(|at| now.duration_since(at) >= GAUGE_INTERVAL) {
            ShardMetrics::set(&metrics.outbox_messages, self.core.outbox_messages());
            self.gauges_published_at = Some(now);
        }
        for (counter, value) in metrics.refusals_by_code.iter().zip(stats.refused_by_code) {
            ShardMetrics::set(counter, value);
        }
        ShardMetrics::set(&metrics.deliveries_total, stats.deliveries);
        ShardMetrics::set(&metrics.devices_removed_total, stats.devices_removed);
        ShardMetrics::set(&metrics.devices_removed_overflow_total, stats.devices_removed_overflow);
        ShardMetrics::set(&metrics.sends_over_mailbox_share_total, stats.sends_over_mailbox_share);
        ShardMetrics::set(&metrics.devices_expired_total, stats.devices_expired);
        ShardMetrics::set(&metrics.presence_events_total, stats.presence_events);
        ShardMetrics::set(&metrics.ephemeral_shed_total, stats.ephemeral_shed);
        ShardMetrics::set(&metrics.typing_events_total, stats.typing_events);
        let store = self.core.store().stats();
        ShardMetrics::set(&metrics.mailbox_index_bytes, store.index_bytes);
        ShardMetrics::set(&metrics.mailbox_body_bytes, store.body_bytes);
        ShardMetrics::set(&metrics.mailbox_read_ahead_bytes, store.read_ahead_bytes);
        ShardMetrics::set(&metrics.mailbox_bodies_cooled_total, store.cooled_total);
        ShardMetrics::set(&metrics.log_compactions_total, store.compactions_total);
        ShardMetrics::set(&metrics.log_compacted_messages_total, store.compacted_messages_total);
        ShardMetrics::set(&metrics.log_reads_total, store.reads_total);
        ShardMetrics::set(&metrics.log_read_failures_total, store.read_failures_total);
        ShardMetrics::set(&metrics.log_unreadable_messages_total, store.unreadable_total);
        ShardMetrics::set(&metrics.log_disk_bytes, store.disk_bytes);
        ShardMetrics::set(&metrics.log_disk_budget_bytes, store.disk_budget_bytes);
    }

    async fn wait(&mut self) -> Wake {
        let core_deadline = self.core.poll_timeout().map(|at_us| Self::origin() + Duration::from_micros(at_us));
        let deadline = [self.timers.first().map(|(deadline, _)| *deadline), core_deadline].into_iter().flatten().min();
        let writer_backlog = self.writer.as_ref().is_some_and(|writer| writer.commands.backlogged());
        let backlog = !self.transmits.is_empty() || self.core.outbox_pending() || writer_backlog;
        let sleep_for = match (deadline, backlog) {
            (_, true) => Some(BACKOFF),
            (Some(deadline), false) => Some(deadline.saturating_duration_since(Instant::now()).min(HEARTBEAT_INTERVAL)),
            (None, false) => Some(HEARTBEAT_INTERVAL),
        };
        let udp = &self.udp;
        let readable = self.readable.get_or_insert_with(|| Box::pin(udp.readable()));
        let link_wakes = &mut self.link_wakes;
        let writer_events = self.writer.as_ref().map(|writer| writer.events.recv_async());
        let mut reads_done = self.writer.as_ref().map(|writer| writer.reader.done.recv_async());
        let socket = async {
            readable.as_mut().await;
            Wake::Socket
        };
        let timer = async {
            match sleep_for {
                Some(duration) => glommio::timer::sleep(duration).await,
                None => future::pending::<()>().await,
            }
            Wake::Timer
        };
        let mut writer_events = writer_events;
        let channels = future::poll_fn(|cx| {
            if let Some(events) = writer_events.as_mut() {
                if let Poll::Ready(event) = Pin::new(events).poll(cx) {
                    return Poll::Ready(Wake::Writer(event.ok()));
                }
            }
            if let Some(done) = reads_done.as_mut() {
                if let Poll::Ready(done) = Pin::new(done).poll(cx) {
                    return Poll::Ready(Wake::Read(done.ok()));
                }
            }
            for link in link_wakes.values_mut() {
                if let Ok(mut task) = link.shared.task.lock() {
                    *task = Some(cx.waker().clone());
                }
                if link.due() {
                    return Poll::Ready(Wake::Link);
                }
            }
            Poll::Pending
        });
        future::or(socket, future::or(timer, channels)).await
    }

    fn now_ms() -> u64 {
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    /// The origin of the core's monotonic clock, shared by every shard of
    /// the process.
    fn origin() -> Instant {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *ORIGIN.get_or_init(Instant::now)
    }

    /// The time, as the core takes it.
    fn clock() -> Now {
        Now { monotonic_us: Self::origin().elapsed().as_micros() as u64, wall_ms: Self::now_ms() }
    }

    /// Applies every completion the writer has reported.
    fn receive_writer_events(&mut self) {
        loop {
            let Some(writer) = self.writer.as_ref() else { return };
            match writer.events.try_recv() {
                Ok(event) => self.accept_writer_event(Some(event)),
                Err(flume::TryRecvError::Empty) => return,
                Err(flume::TryRecvError::Disconnected) => return self.accept_writer_event(None),
            }
        }
    }

    fn accept_writer_event(&mut self, event: Option<WriterEvent>) {
        match event {
            Some(WriterEvent::Durable { segment, first_ticket, last_ticket, bytes, took_us }) => {
                ShardMetrics::add(&self.metrics.log_writes_total, 1);
                let bucket = crate::metrics::bucket_of(&crate::metrics::LOG_SYNC_BUCKETS_US, took_us);
                ShardMetrics::add(&self.metrics.log_sync_buckets[bucket], 1);
                ShardMetrics::add(&self.metrics.log_sync_us_sum, took_us);
                ShardMetrics::add(&self.metrics.log_bytes_total, bytes);
                let outcome = WriteOutcome::Durable;
                self.core.handle_write_outcome(segment, first_ticket, last_ticket, outcome, Self::clock());
            }
            Some(WriterEvent::Failed { segment, first_ticket, last_ticket, .. }) => {
                ShardMetrics::add(&self.metrics.log_write_failures_total, 1);
                let outcome = WriteOutcome::Failed;
                self.core.handle_write_outcome(segment, first_ticket, last_ticket, outcome, Self::clock());
            }
            None => {
                tracing::error!("log writer stopped; no further sends can be acknowledged");
                self.writer = None;
            }
        }
    }

    /// Applies every read the reader has finished.
    fn receive_reads(&mut self) {
        loop {
            let Some(writer) = self.writer.as_ref() else { return };
            match writer.reader.done.try_recv() {
                Ok(done) => self.accept_read(Some(done)),
                Err(_) => return,
            }
        }
    }

    fn accept_read(&mut self, done: Option<ReadDone>) {
        let Some(ReadDone { at, result, gone }) = done else { return };
        let outcome = match &result {
            Ok(bytes) => ReadOutcome::Bytes(bytes),
            Err(error) if gone => ReadOutcome::SegmentGone(error),
            Err(error) => ReadOutcome::Failed(error),
        };
        self.core.handle_read(at, outcome, Self::clock());
    }

    /// Hands the reads the core asks for to the reader.
    fn submit_reads(&mut self) {
        let Some(writer) = &self.writer else { return };
        while let Some(at) = self.core.poll_read(Self::clock()) {
            writer.reader.submit(at);
        }
    }

    /// Hands the next chunk to the writer when the core's group-commit
    /// policy says so, and reclaimed segments for deletion.
    fn submit_writes(&mut self) {
        let Some(writer) = &mut self.writer else { return };
        writer.commands.pump();
        if let Some(chunk) = self.core.poll_write(Self::clock()) {
            // In flight from here on, even if it waits for a queue slot: the
            // core hands out the next chunk only after this one's outcome.
            writer.commands.submit_write(chunk);
        }
        for segment in self.core.poll_reclaim() {
            ShardMetrics::add(&self.metrics.log_segments_reclaimed_total, 1);
            writer.reader.forget(segment);
            writer.commands.submit_delete(segment);
        }
    }

    fn receive_datagrams(&mut self, now: Instant) -> bool {
        for _ in 0..RECEIVE_BATCHES_PER_ITERATION {
            let count = match self.udp.receive_batch() {
                Ok(count) => count,
                Err(error) => {
                    tracing::warn!(%error, "receive on the shard socket failed");
                    return false;
                }
            };
            if count == 0 {
                return false;
            }
            for index in 0..count {
                let (meta, bytes) = self.udp.received(index);
                // Copy out so the receive buffers can be reused while quinn
                // keeps the packet; a GRO batch splits into `stride` segments.
                let segments: Vec<BytesMut> = bytes.chunks(meta.stride).map(BytesMut::from).collect();
                for segment in segments {
                    self.handle_datagram(now, meta, segment);
                }
            }
        }
        true
    }

    fn handle_datagram(&mut self, now: Instant, meta: super::udp::Received, data: BytesMut) {
        self.scratch.clear();
        let event = self.endpoint.handle(now, meta.from, meta.local_ip, meta.ecn, data, &mut self.scratch);
        match event {
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                if let Some(connection) = self.connections.get_mut(&handle) {
                    connection.quic.handle_event(event);
                    self.mark_dirty(handle);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                let source = incoming.remote_address().ip();
                let from_source = self.connections_by_source.get(&source).copied().unwrap_or(0);
                let full =
                    self.connections.len() >= self.connections_max || from_source >= self.connections_per_source_max;
                // A draining shard takes no new connection: the client retries
                // (with backoff) until the restarted server answers.
                if full || self.core.is_draining() {
                    ShardMetrics::add(&self.metrics.handshakes_refused_total, 1);
                    let transmit = self.endpoint.refuse(incoming, &mut self.scratch);
                    self.queue_scratch(transmit);
                    return;
                }
                if self.handshaking >= self.handshakes_unvalidated_max && !incoming.remote_address_validated() {
                    if incoming.may_retry() {
                        ShardMetrics::add(&self.metrics.handshake_retries_total, 1);
                        match self.endpoint.retry(incoming, &mut self.scratch) {
                            Ok(transmit) => self.queue_scratch(transmit),
                            Err(error) => self.endpoint.ignore(error.into_incoming()),
                        }
                    } else {
                        self.endpoint.ignore(incoming);
                    }
                    return;
                }
                match self.endpoint.accept(incoming, now, &mut self.scratch, None) {
                    Ok((handle, quic)) => {
                        assert!(!self.panic_on_connection, "failpoint: a shard loop panics");
                        if self.hang_on_connection {
                            // Failpoint: a stalled shard (its thread never returns).
                            loop {
                                std::thread::sleep(Duration::from_secs(1));
                            }
                        }
                        ShardMetrics::add(&self.metrics.handshakes_total, 1);
                        *self.connections_by_source.entry(source).or_default() += 1;
                        self.handshaking += 1;
                        let mut connection = Connection::new(quic, self.core.frame_bytes_max(), self.connection_limits);
                        connection.source = source;
                        connection.handshaking = true;
                        self.connections.insert(handle, Box::new(connection));
                        self.core.handle_connection(ConnId(handle.0 as u64), Self::clock());
                        self.mark_dirty(handle);
                    }
                    Err(error) => {
                        tracing::debug!(cause = %error.cause, "handshake refused");
                        if let Some(transmit) = error.response {
                            self.queue_scratch(transmit);
                        }
                    }
                }
            }
            Some(DatagramEvent::Response(transmit)) => self.queue_scratch(transmit),
            None => {}
        }
    }

    fn queue_scratch(&mut self, transmit: quinn_proto::Transmit) {
        // Endpoint answers (refusals, Retry, stateless resets, version
        // negotiation) are stateless: past the queue's bound they are dropped
        // rather than queued without limit while the socket is blocked; the
        // peer retransmits.
        if self.transmits.len() >= TRANSMIT_QUEUE_MAX {
            return;
        }
        let mut buffer = self.buffer_pool.pop().unwrap_or_default();
        buffer.clear();
        buffer.extend_from_slice(&self.scratch[..transmit.size]);
        self.transmits.push_back(OutgoingDatagram { transmit, buffer });
    }

    fn receive_shard_batches(&mut self) -> bool {
        let mut taken = Vec::new();
        for (from, receiver) in self.links.receivers.iter_mut() {
            let link = self.link_wakes.entry(*from).or_insert_with(LinkWake::new);
            if !link.due() {
                continue;
            }
            let mut context = Context::from_waker(&link.waker);
            for _ in 0..SHARD_BATCHES_PER_ITERATION {
                match futures_lite::Stream::poll_next(Pin::new(&mut *receiver), &mut context) {
                    Poll::Ready(Some(batch)) => taken.push((*from, Some(batch))),
                    Poll::Ready(None) => {
                        taken.push((*from, None));
                        break;
                    }
                    Poll::Pending => {
                        // glommio holds our waker now; poll again once it fires.
                        link.armed = true;
                        break;
                    }
                }
            }
        }
        let busy = taken.len() >= SHARD_BATCHES_PER_ITERATION;
        for (from, batch) in taken {
            self.accept_batch(from, batch);
        }
        busy
    }

    fn accept_batch(&mut self, from: u16, batch: Option<ShardBatch>) {
        match batch {
            Some(batch) => {
                let clock = Self::clock();
                for message in batch {
                    self.core.handle_shard_message(from, message, clock);
                }
            }
            None => {
                tracing::error!(from, "channel from shard closed; that shard has stopped");
                self.links.receivers.retain(|(shard, _)| *shard != from);
                self.link_wakes.remove(&from);
            }
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&(deadline, handle)) = self.timers.first() {
            if deadline > now {
                break;
            }
            self.timers.pop_first();
            if let Some(connection) = self.connections.get_mut(&handle) {
                connection.deadline = None;
                connection.quic.handle_timeout(now);
                if connection.on_stall_deadline(now) {
                    ShardMetrics::add(&self.metrics.slow_reader_disconnects_total, 1);
                }
                self.mark_dirty(handle);
            }
        }
    }

    fn mark_dirty(&mut self, handle: ConnectionHandle) {
        if let Some(connection) = self.connections.get_mut(&handle) {
            if !connection.dirty {
                connection.dirty = true;
                self.dirty.push(handle);
            }
        }
    }

    /// Endpoint events, application events and request frames of every dirty connection.
    fn drive_dirty(&mut self, now: Instant) {
        let clock = Self::clock();
        for index in 0..self.dirty.len() {
            let handle = self.dirty[index];
            let Some(connection) = self.connections.get_mut(&handle) else {
                continue;
            };
            while let Some(event) = connection.quic.poll_endpoint_events() {
                if let Some(reply) = self.endpoint.handle_event(handle, event) {
                    connection.quic.handle_event(reply);
                }
            }
            let conn = ConnId(handle.0 as u64);
            // Every line logged while this connection's events and frames
            // are handled (by the driver or the core) carries its id and
            // peer. Disabled at the default level: one cached check.
            let span = tracing::debug_span!("conn", id = handle.0, peer = %connection.source);
            let _entered = span.enter();
            connection.poll_events(now, &mut self.core, conn, clock);
        }
    }

    /// Carries out the core's outputs and pushes.
    fn apply_outputs(&mut self) {
        while let Some(output) = self.core.poll_output() {
            let conn = match &output {
                Output::Frame { conn, .. }
                | Output::Encoded { conn, .. }
                | Output::Authenticated { conn }
                | Output::Close { conn, .. }
                | Output::CloseNow { conn, .. } => *conn,
            };
            let handle = ConnectionHandle(conn.0 as usize);
            let Some(connection) = self.connections.get_mut(&handle) else {
                continue;
            };
            connection.apply(output, Instant::now());
            self.mark_dirty(handle);
        }
        while let Some(conn) = self.core.poll_push_ready() {
            let handle = ConnectionHandle(conn.0 as usize);
            if let Some(connection) = self.connections.get_mut(&handle) {
                connection.push_wanted = true;
                self.mark_dirty(handle);
            }
        }
        while let Some(conn) = self.core.poll_ephemeral_ready() {
            let handle = ConnectionHandle(conn.0 as usize);
            if let Some(connection) = self.connections.get_mut(&handle) {
                connection.ephemeral_wanted = true;
                self.mark_dirty(handle);
            }
        }
        for index in 0..self.dirty.len() {
            let handle = self.dirty[index];
            if let Some(connection) = self.connections.get_mut(&handle) {
                connection.flush_streams(&mut self.core, ConnId(handle.0 as u64));
            }
        }
    }

    fn send_shard_batches(&mut self) -> bool {
        let mut blocked = false;
        for shard in 0..self.links.senders.len() {
            let Some(sender) = &self.links.senders[shard] else {
                continue;
            };
            let shard = shard as u16;
            loop {
                let batch = self.core.poll_outbox(shard, CROSS_SHARD_BATCH_MESSAGES_MAX);
                if batch.is_empty() {
                    break;
                }
                if let Err(error) = sender.try_send(batch) {
                    match error {
                        glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(batch)) => {
                            self.core.handle_outbox_refused(shard, batch);
                            blocked = true;
                        }
                        other => {
                            tracing::error!(shard, error = %other, "channel to shard closed; dropping its batch");
                        }
                    }
                    break;
                }
            }
        }
        blocked
    }

    /// Polls transmits of dirty connections, re-arms their timers and drops drained ones.
    fn transmit_dirty(&mut self, now: Instant) -> bool {
        let max_segments = self.udp.max_gso_segments().max(1);
        let mut starved = false;
        let dirty = std::mem::take(&mut self.dirty);
        for handle in dirty {
            let Some(connection) = self.connections.get_mut(&handle) else {
                continue;
            };
            connection.dirty = false;
            while self.transmits.len() < TRANSMIT_QUEUE_MAX {
                let mut buffer = self.buffer_pool.pop().unwrap_or_default();
                buffer.clear();
                match connection.quic.poll_transmit(now, max_segments, &mut buffer) {
                    Some(transmit) => self.transmits.push_back(OutgoingDatagram { transmit, buffer }),
                    None => {
                        self.buffer_pool.push(buffer);
                        break;
                    }
                }
            }
            if self.transmits.len() >= TRANSMIT_QUEUE_MAX {
                starved = true;
            }
            // Endpoint events raised by the transmit pass (e.g. Drained).
            while let Some(event) = connection.quic.poll_endpoint_events() {
                if let Some(reply) = self.endpoint.handle_event(handle, event) {
                    connection.quic.handle_event(reply);
                }
            }
            if connection.handshaking && !connection.quic.is_handshaking() {
                connection.handshaking = false;
                self.handshaking -= 1;
            }
            if connection.quic.is_drained() {
                if let Some(deadline) = connection.deadline.take() {
                    self.timers.remove(&(deadline, handle));
                }
                if connection.handshaking {
                    self.handshaking -= 1;
                }
                let source = connection.source;
                if let Some(count) = self.connections_by_source.get_mut(&source) {
                    *count -= 1;
                    if *count == 0 {
                        self.connections_by_source.remove(&source);
                    }
                }
                self.connections.remove(&handle);
                self.core.handle_connection_closed(ConnId(handle.0 as u64), Self::clock());
                continue;
            }
            let next = [connection.quic.poll_timeout(), connection.stall_deadline()].into_iter().flatten().min();
            if next != connection.deadline {
                if let Some(old) = connection.deadline {
                    self.timers.remove(&(old, handle));
                }
                if let Some(new) = next {
                    self.timers.insert((new, handle));
                }
                connection.deadline = next;
            }
            if connection.has_pending_work() && !connection.dirty {
                connection.dirty = true;
                self.dirty.push(handle);
            }
        }
        starved
    }

    fn send_datagrams(&mut self) -> bool {
        while let Some(outgoing) = self.transmits.front() {
            match self.udp.send(&outgoing.transmit, &outgoing.buffer[..outgoing.transmit.size]) {
                Ok(()) => {
                    if let Some(done) = self.transmits.pop_front() {
                        if self.buffer_pool.len() < TRANSMIT_QUEUE_MAX {
                            self.buffer_pool.push(done.buffer);
                        }
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(error) => {
                    tracing::warn!(%error, "send failed; dropping datagram (QUIC will retransmit)");
                    self.transmits.pop_front();
                }
            }
        }
        false
    }
}
