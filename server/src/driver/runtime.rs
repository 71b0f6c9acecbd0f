//! Starting the shards: one glommio `LocalExecutor` per shard, pinned to a
//! CPU of irisd's affinity mask, each with its own socket, QUIC endpoint,
//! store and core, plus one bounded channel per ordered pair of shards.

use super::connection::ConnectionLimits;
use super::log_reader::LogReader;
use super::log_writer::{run_writer, WriterQueue, WriterStart, WRITER_QUEUE_MAX};
use super::shard_loop::WriterLink;
use super::shard_loop::{LoopParts, ShardBatch, ShardLinks, ShardLoop};
use super::udp::{bind_exclusive, UdpIo};
use crate::auth::TokenVerifier;
use crate::config::Config;
use crate::config::Durability;
use crate::metrics::ShardMetrics;
use crate::shard::mailbox::StoreLimits;
use crate::shard::{CoreLimits, MailboxStore, MemoryStore, ShardCore, ShardIdentity};
use crate::storage::layout;
use crate::storage::log_store::Recovery;
use crate::storage::LogLimits;
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use iris_shard_map::{NodeId, ShardId, SlotTable};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Errors starting the shards. Each is printed and irisd exits non-zero.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A shard port could not be bound (in use, no permission, bad address).
    #[error("cannot bind shard {shard} to {address}: {source} (is another irisd running? pick another --listen port)")]
    Bind {
        /// Shard index.
        shard: u16,
        /// The address.
        address: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The CPU affinity mask could not be read.
    #[error("reading the CPU affinity mask: {0}")]
    Affinity(std::io::Error),
    /// glommio could not start an executor (often: locked-memory limit too low).
    #[error("starting shard {shard}: {detail} (raise LimitMEMLOCK / ulimit -l, or lower runtime.io_memory_bytes)")]
    Executor {
        /// Shard index.
        shard: u16,
        /// glommio's message.
        detail: String,
    },
    /// A shard could not recover its storage or set up its socket.
    #[error("{0}")]
    Shard(String),
    /// The admin endpoint could not be bound.
    #[error("cannot bind the admin endpoint to {address}: {source}")]
    Admin {
        /// The address.
        address: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The slot table could not be built.
    #[error("shard map: {0}")]
    ShardMap(#[from] iris_shard_map::ShardMapError),
}

/// Everything shards share read-only.
pub struct NodeSetup {
    /// Validated configuration.
    pub config: Config,
    /// Token verifier (public key only).
    pub verifier: TokenVerifier,
    /// The certificate and key; each shard builds its own rustls
    /// configuration from them (its own session cache: no lock across cores).
    pub tls: crate::tls::TlsFiles,
    /// Key for QUIC stateless reset tokens, persisted in the data directory so
    /// that after a restart clients of the previous process are reset at once
    /// instead of waiting for their idle timeout.
    pub reset_secret: [u8; 32],
}

impl std::fmt::Debug for NodeSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSetup").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The CPUs irisd may run on, from its affinity mask.
pub fn allowed_cpus() -> Result<Vec<usize>, StartError> {
    // SAFETY: `set` is a plain bitmask owned by this frame; sched_getaffinity
    // writes at most size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the pointer and size describe `set`.
    let result = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if result != 0 {
        return Err(StartError::Affinity(std::io::Error::last_os_error()));
    }
    // SAFETY: CPU_ISSET reads the bitmask initialised above.
    Ok((0..libc::CPU_SETSIZE as usize).filter(|cpu| unsafe { libc::CPU_ISSET(*cpu, &set) }).collect())
}

/// A running node: the shard threads and the addresses they serve.
#[derive(Debug)]
pub struct RunningNode {
    /// Shard k listens on `addresses[k]`.
    pub addresses: Vec<SocketAddr>,
    /// Where the admin endpoint (metrics, health) listens, if enabled.
    pub admin: Option<SocketAddr>,
    /// Executor handles, joined by [`RunningNode::wait`].
    executors: Vec<glommio::ExecutorJoinHandle<()>>,
    /// Asks every shard to drain.
    drain: Arc<std::sync::atomic::AtomicBool>,
    /// Every shard's counters (their `drain_settled` flags).
    shard_metrics: Vec<Arc<ShardMetrics>>,
}

/// How a drain ended ([`RunningNode::drain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every shard settled: each client was told to reconnect after its
    /// Sends in flight were answered, and every log is synced.
    Settled,
    /// The time ran out first; what was not acknowledged, clients send
    /// again (nothing acknowledged is lost: an Ack follows the sync).
    TimedOut,
}

impl RunningNode {
    /// Every shard's counters, in shard order.
    pub fn shard_metrics(&self) -> Vec<Arc<ShardMetrics>> {
        self.shard_metrics.clone()
    }

    /// Drains every shard ([`crate::shard::ShardCore::begin_drain`]) and
    /// waits, at most `timeout`, until all of them are settled at once.
    pub fn drain(&self, timeout: Duration) -> DrainOutcome {
        use std::sync::atomic::Ordering;
        self.drain.store(true, Ordering::Release);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.shard_metrics.iter().all(|metrics| metrics.drain_settled.load(Ordering::Acquire) == 1) {
                return DrainOutcome::Settled;
            }
            if std::time::Instant::now() >= deadline {
                return DrainOutcome::TimedOut;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Blocks until every shard stops.
    pub fn wait(self) {
        for executor in self.executors {
            if let Err(error) = executor.join() {
                tracing::error!(%error, "shard executor failed");
            }
        }
    }
}

/// Binds every shard port and starts the shards.
pub fn start(mut setup: NodeSetup, shard_count: u16) -> Result<RunningNode, StartError> {
    // The writer's directory syncs need absolute paths (see
    // `files::prepare_data_dir`, which `irisd serve` has applied already).
    setup.config.data_dir = std::path::absolute(&setup.config.data_dir)
        .map_err(|error| StartError::Shard(format!("data directory: {error}")))?;
    let setup = Arc::new(setup);
    let config = &setup.config;
    let cpus = allowed_cpus()?;
    let addresses: Vec<SocketAddr> =
        (0..shard_count).map(|k| SocketAddr::new(config.listen.ip(), config.listen.port() + k)).collect();
    let mut sockets = Vec::new();
    for (shard, address) in addresses.iter().enumerate() {
        let socket = bind_with_retry(*address).map_err(|source| StartError::Bind {
            shard: shard as u16,
            address: *address,
            source,
        })?;
        sockets.push(socket);
    }
    let table = SlotTable::single_node(NodeId(0), shard_count, 1)?;

    // One bounded channel per ordered pair (from, to).
    let capacity = config.limits.shard_channel_batches_max as usize;
    let count = usize::from(shard_count);
    let mut senders: Vec<Vec<Option<SharedSender<ShardBatch>>>> = (0..count).map(|_| Vec::new()).collect();
    let mut receivers: Vec<Vec<(u16, SharedReceiver<ShardBatch>)>> = (0..count).map(|_| Vec::new()).collect();
    for (from, from_senders) in senders.iter_mut().enumerate() {
        for (to, to_receivers) in receivers.iter_mut().enumerate() {
            if from == to {
                from_senders.push(None);
                continue;
            }
            let (sender, receiver) = shared_channel::new_bounded(capacity);
            from_senders.push(Some(sender));
            to_receivers.push((from as u16, receiver));
        }
    }

    crate::metrics::record_process_start();
    let (ready_sender, ready_receiver) = std::sync::mpsc::channel();
    let shard_metrics: Vec<Arc<ShardMetrics>> = (0..shard_count).map(|_| Arc::default()).collect();
    // Up before recovery, so that an operator sees a long one (`/readyz`
    // answers 503 until every shard serves).
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin = match config.admin_listen {
        Some(address) => Some(
            super::admin::serve_admin(
                address,
                super::admin::Readiness {
                    shards: shard_metrics.clone(),
                    serving: Arc::clone(&serving),
                    shard_dirs: match config.storage.durability {
                        Durability::Fsync => {
                            (0..shard_count).map(|shard| layout::shard_dir(&config.data_dir, shard)).collect()
                        }
                        Durability::None => Vec::new(),
                    },
                    draining: Arc::clone(&drain),
                },
            )
            .map_err(|source| StartError::Admin { address, source })?,
        ),
        None => None,
    };
    let mut executors = Vec::new();
    let mut shard_inputs: Vec<_> = sockets.into_iter().zip(senders).zip(receivers).collect();
    for (index, ((socket, shard_senders), shard_receivers)) in shard_inputs.drain(..).enumerate() {
        let shard = index as u16;
        let placement = if config.runtime.pin_cores && !cpus.is_empty() {
            glommio::Placement::Fixed(cpus[index % cpus.len()])
        } else {
            glommio::Placement::Unbound
        };
        let setup = Arc::clone(&setup);
        let table = table.clone();
        let ports: Vec<u16> = addresses.iter().map(SocketAddr::port).collect();
        let ready = ready_sender.clone();
        let metrics = Arc::clone(&shard_metrics[index]);
        let drain = Arc::clone(&drain);
        let executor = glommio::LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{shard}"))
            .io_memory(config.runtime.io_memory_bytes)
            .spawn(move || async move {
                let links = (shard_senders, shard_receivers);
                run_shard(shard, setup, table, ports, socket, links, ready, metrics, drain).await;
            })
            .map_err(|e| StartError::Executor { shard, detail: e.to_string() })?;
        executors.push(executor);
    }
    // Serve only once every shard has recovered and is running.
    drop(ready_sender);
    super::systemd::progress(&format!("recovering the logs of {shard_count} shard(s)"));
    for recovered in 1..=shard_count {
        match ready_receiver.recv() {
            Ok(Ok(_)) => super::systemd::progress(&format!("recovered {recovered} of {shard_count} shard(s)")),
            Ok(Err(detail)) => return Err(StartError::Shard(detail)),
            Err(_) => return Err(StartError::Shard("a shard stopped during start".into())),
        }
    }
    serving.store(true, std::sync::atomic::Ordering::Release);
    Ok(RunningNode { addresses, admin, executors, drain, shard_metrics })
}

/// How long a busy shard port is retried at start. After a SIGKILL the
/// kernel tears the dead process's io_uring instances down asynchronously and
/// its UDP ports stay bound for another 0.1-0.2 s here, so an immediate
/// restart by systemd would otherwise fail with EADDRINUSE. Two seconds is
/// ten times that; a port held longer belongs to a live process.
const BIND_RETRY_FOR: Duration = Duration::from_secs(2);
/// Pause between bind attempts.
const BIND_RETRY_INTERVAL: Duration = Duration::from_millis(25);

/// Binds `address`, retrying while it is in use for up to [`BIND_RETRY_FOR`].
fn bind_with_retry(address: SocketAddr) -> std::io::Result<socket2::Socket> {
    let deadline = std::time::Instant::now() + BIND_RETRY_FOR;
    let mut logged = false;
    loop {
        match bind_exclusive(address) {
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                if !logged {
                    tracing::warn!(%address, "port busy (a process that just died may still hold it); retrying for up to 2 s");
                    logged = true;
                }
                std::thread::sleep(BIND_RETRY_INTERVAL);
            }
            result => return result,
        }
    }
}

/// A shard's ends of the cross-shard channels, before they are connected:
/// a sender to every other shard (`None` for itself) and a receiver from each.
type UnconnectedLinks = (Vec<Option<SharedSender<ShardBatch>>>, Vec<(u16, SharedReceiver<ShardBatch>)>);

#[allow(clippy::too_many_arguments)]
async fn run_shard(
    shard: u16,
    setup: Arc<NodeSetup>,
    table: SlotTable,
    ports: Vec<u16>,
    socket: socket2::Socket,
    (senders, receivers): UnconnectedLinks,
    ready: std::sync::mpsc::Sender<Result<u16, String>>,
    metrics: Arc<ShardMetrics>,
    drain: Arc<std::sync::atomic::AtomicBool>,
) {
    let config = &setup.config;
    let limits = &config.limits;
    // A connect waits for the other side to connect too, so all of them run
    // as concurrent tasks (connecting one by one would deadlock the shards).
    let sender_tasks: Vec<_> =
        senders.into_iter().map(|sender| glommio::spawn_local(async move { Some(sender?.connect().await) })).collect();
    let receiver_tasks: Vec<_> = receivers
        .into_iter()
        .map(|(from, receiver)| glommio::spawn_local(async move { (from, receiver.connect().await) }))
        .collect();
    let mut connected_senders = Vec::new();
    for task in sender_tasks {
        connected_senders.push(task.await);
    }
    let mut connected_receivers = Vec::new();
    for task in receiver_tasks {
        connected_receivers.push(task.await);
    }
    let udp = match UdpIo::new(socket) {
        Ok(udp) => udp,
        Err(error) => return report_failure(&ready, shard, format!("socket setup: {error}")),
    };
    let store_limits = StoreLimits {
        devices_per_user_max: limits.devices_per_user_max,
        devices_per_shard_max: limits.devices_per_shard_max,
        mailbox_messages_max: limits.mailbox_messages_max,
        mailbox_bytes_max: limits.mailbox_bytes_max,
        mailbox_sender_messages_max: limits.sender_share_messages(),
        mailbox_sender_bytes_max: limits.sender_share_bytes(),
        stored_dedup_entries_max: limits.stored_dedup_entries_max,
        shard_mailbox_bytes_max: limits.shard_mailbox_bytes_max,
    };
    let core_limits = CoreLimits {
        dedup_entries_per_device_max: limits.dedup_entries_per_device_max,
        sender_dedup_entries_max: limits.sender_dedup_entries_max,
        sends_in_flight_per_device_max: limits.sends_in_flight_per_device_max,
        shard_outbox_messages_max: limits.shard_outbox_messages_max,
        device_inactive_expiry_s: limits.device_inactive_expiry_s,
        rates: send_rates(&config.rate_limits),
        codel_target_ms: config.admission.codel_target_ms,
        codel_interval_ms: config.admission.codel_interval_ms,
        hello_timeout_ms: u64::from(config.runtime.hello_timeout_ms),
        commit_delay_us: u64::from(config.storage.commit_delay_us),
        commit_bytes_max: config.storage.commit_bytes_max as usize,
        presence: crate::shard::presence::PresenceLimits {
            subscriptions_per_device_max: config.presence.subscriptions_per_device_max as usize,
            watchers_per_user_max: config.presence.watchers_per_user_max as usize,
            grace_ms: u64::from(config.presence.grace_ms),
        },
    };
    let dir = layout::shard_dir(&config.data_dir, shard);
    let (message_id_block, seq_block) = super::reservations::block_sizes(shard);
    let message_ids = match layout::reserve_message_ids(&dir, message_id_block, 0) {
        Ok(ids) => ids,
        Err(error) => return report_failure(&ready, shard, error.to_string()),
    };
    let first_message_id = message_ids.start;
    // Every shard's log shares the data directory's filesystem.
    let shards_on_disk = ports.len().max(1) as u64;
    let identity = ShardIdentity {
        node: NodeId(0),
        shard: ShardId(shard),
        advertised_host: config.advertised_host(),
        shard_ports: ports,
        message_ids,
    };
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &setup.reset_secret);
    let parts = LoopParts {
        endpoint_config: Arc::new(quinn_proto::EndpointConfig::new(Arc::new(reset_key))),
        server_config: match setup.tls.quic_server_config() {
            Ok(crypto) => quic_server_config(&setup, crypto),
            Err(error) => return report_failure(&ready, shard, error.to_string()),
        },
        udp,
        links: ShardLinks { senders: connected_senders, receivers: connected_receivers },
        connections_max: limits.connections_per_shard_max as usize,
        connections_per_source_max: limits.connections_per_source_max,
        handshakes_unvalidated_max: limits.handshakes_unvalidated_max as usize,
        connection_limits: ConnectionLimits {
            response_bytes_max: limits.connection_response_bytes_max as usize,
            push_stall_timeout: Duration::from_millis(u64::from(config.runtime.push_stall_timeout_ms)),
        },
        metrics: Arc::clone(&metrics),
        reservations: super::reservations::Reservations::new(dir.clone(), (message_id_block, seq_block)),
        drain: Arc::clone(&drain),
    };
    let authority = setup.verifier.clone();
    match config.storage.durability {
        Durability::None => {
            let store = MemoryStore::new(store_limits);
            let core = ShardCore::new(identity, table, authority, core_limits, limits.frame_bytes_max, store);
            serve(shard, core, parts, None, &ready).await;
        }
        Durability::Fsync => {
            let started = std::time::Instant::now();
            let log_limits = LogLimits {
                segment_bytes_max: config.storage.segment_bytes_max,
                commit_bytes_max: config.storage.commit_bytes_max as usize,
                body_cache_bytes_max: config.storage.body_cache_bytes_max,
                read_ahead_bytes_max: config.storage.read_ahead_bytes_max,
                disk_bytes_max: config.storage.disk_bytes_max,
            };
            assert!(!super::failpoint::armed(super::failpoint::PANIC_IN_RECOVERY, shard), "failpoint: recovery");
            if super::failpoint::armed(super::failpoint::SLOW_RECOVERY, shard) {
                std::thread::sleep(Duration::from_secs(3));
            }
            let key_path = layout::log_key_path(&config.data_dir);
            let key = match layout::load_log_key(&config.data_dir) {
                Ok(key) => key,
                Err(error) => return report_failure(&ready, shard, error.to_string()),
            };
            // Damage may have hidden a device's newest seq: devices then
            // start at the end of the last seq reservation, above every seq
            // handed out before. A directory from before reservations uses
            // this start's first message sequence (docs/storage.md, "Damage").
            let damage_floor = match layout::seq_reserved(&dir) {
                Ok(reserved) => reserved.unwrap_or(first_message_id),
                Err(error) => return report_failure(&ready, shard, error.to_string()),
            };
            let mut recovery = Recovery::new(store_limits, log_limits);
            let replay = |segment, scan: &_| {
                recovery.replay_segment(segment, scan);
                // systemctl status shows how far a long recovery is.
                super::systemd::progress(&format!("shard {shard}: recovered log segment {segment}"));
            };
            let last = match layout::scan_segments(&dir, &key, &key_path, damage_floor, replay) {
                Ok(last) => last,
                Err(error) => return report_failure(&ready, shard, error.to_string()),
            };
            let start = last.map(|(segment, valid_end)| WriterStart { segment, valid_end: valid_end as u64 });
            let (mut store, report) = recovery.finish();
            match layout::seq_floor(&dir, report.lost_bytes(), damage_floor) {
                Ok(floor) => {
                    if report.corrupt_records > 0 {
                        tracing::warn!(
                            shard,
                            floor,
                            "damaged log chunks skipped; every device's seq starts at the floor"
                        );
                    }
                    store.raise_seq_floor(floor);
                }
                Err(error) => return report_failure(&ready, shard, error.to_string()),
            }
            // Before the shard serves: no seq at or above this end is handed out.
            let seq_high = store.seq_reservation().map_or(0, |reservation| reservation.high);
            match layout::reserve_seqs(&dir, seq_high.saturating_add(1 + seq_block)) {
                Ok(end) => store.extend_seq_reservation(end),
                Err(error) => return report_failure(&ready, shard, error.to_string()),
            }
            if config.storage.disk_bytes_max == 0 {
                // 90% of what the log holds now plus its share of the free
                // space: Throttle comes well before the disk is full.
                let free = crate::files::free_bytes(&dir).unwrap_or_else(|error| {
                    tracing::warn!(%error, "cannot read the free space; the disk budget is 90% of the log as it is");
                    0
                }) / shards_on_disk;
                let budget = store.disk_bytes().saturating_add(free) / 10 * 9;
                store.set_disk_budget(budget.max(8 * config.storage.segment_bytes_max));
            }
            let payload_max = iris_protocol::payload_bytes_max(limits.frame_bytes_max);
            if report.live_payload_bytes_max > payload_max {
                // Such a message could never be pushed; refusing to start
                // beats skipping it (it would then be acknowledged away).
                let detail = format!(
                    "the log holds an undelivered message of {} bytes, more than limits.frame_bytes_max = {}                      can carry ({payload_max} bytes of payload); start with limits.frame_bytes_max >= {}",
                    report.live_payload_bytes_max,
                    limits.frame_bytes_max,
                    report.live_payload_bytes_max + iris_protocol::DELIVER_OVERHEAD_BYTES
                );
                return report_failure(&ready, shard, detail);
            }
            ShardMetrics::set(&metrics.log_corrupt_records, report.corrupt_records);
            ShardMetrics::set(&metrics.log_torn_bytes, report.torn_bytes);
            ShardMetrics::set(&metrics.log_recovery_ms, started.elapsed().as_millis() as u64);
            tracing::info!(
                shard,
                first_message_id,
                segments = report.segments,
                records = report.records,
                devices = report.devices,
                undelivered = report.live_entries,
                corrupt_records = report.corrupt_records,
                torn_bytes = report.torn_bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "log recovered"
            );
            let (commands, command_receiver) = flume::bounded(WRITER_QUEUE_MAX);
            let (event_sender, events) = flume::bounded(WRITER_QUEUE_MAX);
            let spare_bytes = config.storage.segment_bytes_max;
            glommio::spawn_local(run_writer(dir.clone(), key, start, spare_bytes, command_receiver, event_sender))
                .detach();
            let reader = LogReader::new(dir.clone());
            let writer = WriterLink { reader, commands: WriterQueue::new(commands), events };
            let core = ShardCore::new(identity, table, authority, core_limits, limits.frame_bytes_max, store);
            serve(shard, core, parts, Some(writer), &ready).await;
        }
    }
}

async fn serve<S: MailboxStore>(
    shard: u16,
    core: ShardCore<S>,
    parts: LoopParts,
    writer: Option<WriterLink>,
    ready: &std::sync::mpsc::Sender<Result<u16, String>>,
) {
    tracing::info!(
        shard,
        address = ?parts.udp.local_addr().ok(),
        gso_segments = parts.udp.max_gso_segments(),
        durable = writer.is_some(),
        "shard running"
    );
    let shard_loop = ShardLoop::new(core, parts, writer);
    let _ = ready.send(Ok(shard));
    shard_loop.run().await;
}

fn report_failure(ready: &std::sync::mpsc::Sender<Result<u16, String>>, shard: u16, error: String) {
    tracing::error!(shard, %error, "shard failed to start");
    let _ = ready.send(Err(format!("shard {shard}: {error}")));
}

/// Ack-eliciting packets a client may receive before it must send an ACK.
const CLIENT_ACK_ELICITING_THRESHOLD: u32 = 8;
/// Longest a client may delay an ACK (below quinn's 25 ms default, so loss
/// detection on the server is no slower than without the extension).
const CLIENT_MAX_ACK_DELAY: Duration = Duration::from_millis(10);

/// The QUIC transport settings of client connections.
fn quic_server_config(
    setup: &NodeSetup,
    crypto: Arc<quinn_proto::crypto::rustls::QuicServerConfig>,
) -> Arc<quinn_proto::ServerConfig> {
    let mut transport = quinn_proto::TransportConfig::default();
    // One request stream per connection; the server opens the push stream.
    transport.max_concurrent_bidi_streams(quinn_proto::VarInt::from_u32(1));
    transport.max_concurrent_uni_streams(quinn_proto::VarInt::from_u32(0));
    let idle = Duration::from_millis(u64::from(setup.config.runtime.idle_timeout_ms));
    transport.max_idle_timeout(idle.try_into().ok());
    // Memory a peer can pin per connection (quinn's defaults allow 1.25 MiB
    // of receive buffer per stream and 10 MiB of send buffer):
    // - receive: one request stream, 256 KiB (four maximum-size frames in flight);
    // - send: 256 KiB across the request and push streams; Deliver frames are
    //   pulled from the mailbox only while this has room, so a slow reader
    //   costs at most this much here, its backlog stays in its mailbox;
    // - unreliable datagrams are not used, so none are buffered.
    // Worst case ~0.5 MiB per connection; idle connections use far less.
    let window = quinn_proto::VarInt::from_u32(256 * 1024);
    transport.stream_receive_window(window);
    transport.receive_window(window);
    transport.send_window(256 * 1024);
    transport.datagram_receive_buffer_size(None);
    // Ask clients (QUIC ACK frequency extension, which quinn clients support)
    // to acknowledge every CLIENT_ACK_ELICITING_THRESHOLD-th ack-eliciting
    // packet or within CLIENT_MAX_ACK_DELAY, instead of every second packet:
    // an ACK-only datagram costs the server a receive, a decryption and a
    // loop wake like any other. Measured side by side (docs/performance.md):
    // -30% server CPU per delivered message with 100 connections x 1 in
    // flight, -8% with 10 x 16.
    let mut ack_frequency = quinn_proto::AckFrequencyConfig::default();
    ack_frequency.ack_eliciting_threshold(quinn_proto::VarInt::from_u32(CLIENT_ACK_ELICITING_THRESHOLD));
    ack_frequency.max_ack_delay(Some(CLIENT_MAX_ACK_DELAY));
    transport.ack_frequency_config(Some(ack_frequency));
    let mut server_config = quinn_proto::ServerConfig::with_crypto(crypto);
    server_config.transport_config(Arc::new(transport));
    Arc::new(server_config)
}

/// The core's rate limits from the configuration.
fn send_rates(rates: &crate::config::RateLimits) -> crate::shard::SendRates {
    use crate::shard::rate::Rate;
    crate::shard::SendRates {
        device_sends: Rate { per_s: rates.device_sends_per_s, burst: rates.device_sends_burst },
        device_bytes: Rate { per_s: rates.device_bytes_per_s, burst: rates.device_bytes_burst },
        pair_sends: Rate { per_s: rates.pair_sends_per_s, burst: rates.pair_sends_burst },
        keys_max: rates.tracked_keys_max,
    }
}
