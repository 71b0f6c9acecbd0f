//! Starting the shards: one glommio `LocalExecutor` per shard, pinned to a
//! CPU of irisd's affinity mask, each with its own socket, QUIC endpoint,
//! store and core, plus one bounded channel per ordered pair of shards.

use super::connection::ConnectionLimits;
use super::shard_loop::{ShardBatch, ShardLinks, ShardLoop};
use super::udp::{bind_exclusive, UdpIo};
use crate::auth::TokenAuthority;
use crate::config::Config;
use crate::shard::mailbox::StoreLimits;
use crate::shard::{CoreLimits, MemoryStore, ShardCore, ShardIdentity};
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use iris_shard_map::{NodeId, ShardId, SlotTable};
use quinn_proto::crypto::rustls::QuicServerConfig;
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
    /// The slot table could not be built.
    #[error("shard map: {0}")]
    ShardMap(#[from] iris_shard_map::ShardMapError),
}

/// Everything shards share read-only.
pub struct NodeSetup {
    /// Validated configuration.
    pub config: Config,
    /// Token verifier.
    pub authority: TokenAuthority,
    /// rustls server configuration for QUIC.
    pub crypto: Arc<QuicServerConfig>,
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
    /// Executor handles, joined by [`RunningNode::wait`].
    executors: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl RunningNode {
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
pub fn start(setup: NodeSetup, shard_count: u16) -> Result<RunningNode, StartError> {
    let setup = Arc::new(setup);
    let config = &setup.config;
    let cpus = allowed_cpus()?;
    let addresses: Vec<SocketAddr> =
        (0..shard_count).map(|k| SocketAddr::new(config.listen.ip(), config.listen.port() + k)).collect();
    let mut sockets = Vec::new();
    for (shard, address) in addresses.iter().enumerate() {
        let socket = bind_exclusive(*address).map_err(|source| StartError::Bind {
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
        let executor = glommio::LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{shard}"))
            .io_memory(config.runtime.io_memory_bytes)
            .spawn(move || async move {
                run_shard(shard, setup, table, ports, socket, shard_senders, shard_receivers).await;
            })
            .map_err(|e| StartError::Executor { shard, detail: e.to_string() })?;
        executors.push(executor);
    }
    Ok(RunningNode { addresses, executors })
}

async fn run_shard(
    shard: u16,
    setup: Arc<NodeSetup>,
    table: SlotTable,
    ports: Vec<u16>,
    socket: socket2::Socket,
    senders: Vec<Option<SharedSender<ShardBatch>>>,
    receivers: Vec<(u16, SharedReceiver<ShardBatch>)>,
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
        Err(error) => {
            tracing::error!(shard, %error, "shard socket setup failed");
            std::process::exit(1);
        }
    };
    let store = MemoryStore::new(StoreLimits {
        devices_per_user_max: limits.devices_per_user_max,
        devices_per_shard_max: limits.devices_per_shard_max,
        mailbox_messages_max: limits.mailbox_messages_max,
        mailbox_bytes_max: limits.mailbox_bytes_max,
        stored_dedup_entries_max: limits.stored_dedup_entries_max,
    });
    let identity = ShardIdentity {
        node: NodeId(0),
        shard: ShardId(shard),
        advertised_host: config.advertised_host(),
        shard_ports: ports,
    };
    let core_limits = CoreLimits {
        dedup_entries_per_device_max: limits.dedup_entries_per_device_max,
        sends_in_flight_per_device_max: limits.sends_in_flight_per_device_max,
        shard_outbox_messages_max: limits.shard_outbox_messages_max,
    };
    let core = ShardCore::new(identity, table, setup.authority.clone(), core_limits, limits.frame_bytes_max, store);
    let server_config = quic_server_config(&setup);
    let links = ShardLinks { senders: connected_senders, receivers: connected_receivers };
    let connection_limits = ConnectionLimits {
        response_bytes_max: limits.connection_response_bytes_max as usize,
        hello_timeout: Duration::from_millis(u64::from(config.runtime.hello_timeout_ms)),
    };
    tracing::info!(shard, address = ?udp.local_addr().ok(), gso_segments = udp.max_gso_segments(), "shard running");
    ShardLoop::new(core, server_config, udp, links, limits.connections_per_shard_max as usize, connection_limits)
        .run()
        .await;
}

/// The QUIC transport settings of client connections.
fn quic_server_config(setup: &NodeSetup) -> Arc<quinn_proto::ServerConfig> {
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
    let mut server_config = quinn_proto::ServerConfig::with_crypto(setup.crypto.clone());
    server_config.transport_config(Arc::new(transport));
    Arc::new(server_config)
}
