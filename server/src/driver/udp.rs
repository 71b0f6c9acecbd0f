//! Batched UDP for one shard: `recvmmsg`/`sendmsg` with GRO and GSO through
//! quinn-udp on the raw socket, and glommio only for readiness.
//!
//! Readiness is a `peek_from` on the glommio view of the same socket: it
//! consumes nothing, so the wait can be raced against timers and channels
//! and dropped without losing a datagram (QUIC-DRIVER-NOTES.md, point 3).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

/// Datagrams (each up to a GRO batch) read per `recvmmsg` call. 32 keeps a
/// burst of one RTT's worth of client packets to one syscall while the
/// buffers stay at 32 x 64 KiB = 2 MiB per shard.
pub const RECV_BATCH_DATAGRAMS: usize = 32;
/// Bytes per receive buffer: room for a full GRO batch.
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Kernel socket buffers, so bursts queue in the kernel rather than drop.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// One received datagram (a GRO batch is split by the caller using `stride`).
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Sender address.
    pub from: SocketAddr,
    /// Local address it was sent to, if the kernel reported it.
    pub local_ip: Option<std::net::IpAddr>,
    /// ECN bits.
    pub ecn: Option<quinn_proto::EcnCodepoint>,
    /// Bytes in the buffer.
    pub len: usize,
    /// Size of each coalesced segment (== len without GRO).
    pub stride: usize,
}

/// A shard's socket.
#[derive(Debug)]
pub struct UdpIo {
    /// glommio view of the socket, used only to wait for readability
    /// (shared with the one readiness future in flight).
    readiness: std::rc::Rc<glommio::net::UdpSocket>,
    /// Plain view of the same socket (a dup of the fd) for quinn-udp I/O.
    socket: std::net::UdpSocket,
    /// quinn-udp's per-socket state (GSO/GRO capabilities, ECN).
    state: quinn_udp::UdpSocketState,
    /// Receive buffers, one per batch slot.
    buffers: Vec<Vec<u8>>,
    /// Metadata filled by the last receive.
    metas: Vec<quinn_udp::RecvMeta>,
}

/// Binds `address` exclusively (no SO_REUSEPORT: a second process on the same
/// port fails here instead of silently taking half the traffic).
pub fn bind_exclusive(address: SocketAddr) -> io::Result<socket2::Socket> {
    let domain = socket2::Domain::for_address(address);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if address.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES).ok();
    socket.set_send_buffer_size(SOCKET_BUFFER_BYTES).ok();
    Ok(socket)
}

impl UdpIo {
    /// Wraps a bound socket. Must run on the shard's executor (glommio registers it there).
    pub fn new(socket: socket2::Socket) -> io::Result<UdpIo> {
        let plain: std::net::UdpSocket = socket.try_clone()?.into();
        let state = quinn_udp::UdpSocketState::new((&plain).into())?;
        // glommio builds on an older socket2, so hand it the descriptor itself.
        let fd = std::os::fd::IntoRawFd::into_raw_fd(socket);
        // SAFETY: `fd` was just released by its only owner, so glommio's
        // socket becomes its sole owner and closes it on drop.
        let readiness = unsafe { <glommio::net::UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(UdpIo {
            readiness: std::rc::Rc::new(readiness),
            socket: plain,
            state,
            buffers: (0..RECV_BATCH_DATAGRAMS).map(|_| vec![0u8; RECV_BUFFER_BYTES]).collect(),
            metas: vec![quinn_udp::RecvMeta::default(); RECV_BATCH_DATAGRAMS],
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// How many datagrams one send may carry (1 without GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// A future that resolves once a datagram is waiting (consumes
    /// nothing). Keep it across waits until it resolves: a dropped one
    /// leaves its peek in flight in io_uring, holding a waker of the task,
    /// so making one per wait piled up a peek per wake-up (a loop woken
    /// ~32,000 times between two datagrams by reads of the log overflowed
    /// glommio's waker count and aborted the process).
    pub fn readable(&self) -> impl std::future::Future<Output = ()> + 'static {
        let readiness = std::rc::Rc::clone(&self.readiness);
        async move {
            let mut byte = [0u8; 1];
            if let Err(error) = readiness.peek_from(&mut byte).await {
                tracing::debug!(%error, "peek on the shard socket failed");
            }
        }
    }

    /// Reads one batch without blocking. Returns how many slots were filled
    /// (0 when nothing is waiting); read them with [`UdpIo::received`].
    pub fn receive_batch(&mut self) -> io::Result<usize> {
        let mut slices: Vec<IoSliceMut<'_>> = self.buffers.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        match self.state.recv((&self.socket).into(), &mut slices, &mut self.metas) {
            Ok(count) => Ok(count),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(error) => Err(error),
        }
    }

    /// Slot `index` of the last batch: metadata and bytes.
    pub fn received(&self, index: usize) -> (Received, &[u8]) {
        let meta = &self.metas[index];
        let received = Received {
            from: meta.addr,
            local_ip: meta.dst_ip,
            ecn: meta.ecn.and_then(|ecn| quinn_proto::EcnCodepoint::from_bits(ecn as u8)),
            len: meta.len,
            stride: meta.stride.max(1),
        };
        (received, &self.buffers[index][..meta.len])
    }

    /// Sends one transmit (several datagrams when `segment_size` is set).
    /// `Err(WouldBlock)` means the kernel buffer is full: keep it and retry.
    pub fn send(&self, transmit: &quinn_proto::Transmit, contents: &[u8]) -> io::Result<()> {
        let udp_transmit = quinn_udp::Transmit {
            destination: transmit.destination,
            ecn: transmit.ecn.and_then(|ecn| quinn_udp::EcnCodepoint::from_bits(ecn as u8)),
            contents,
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        };
        self.state.send((&self.socket).into(), &udp_transmit)
    }
}
