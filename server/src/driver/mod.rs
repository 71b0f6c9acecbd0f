//! The I/O driver layer: everything that touches the runtime (glommio
//! executors, sockets, timers, cross-core channels). Shard logic above it
//! (`crate::shard`) is plain Rust and never sees these types.
//!
//! # Layout
//! - [`runtime`]: starts one pinned glommio executor per shard and wires the
//!   bounded shard-to-shard channels.
//! - [`shard_loop`]: the per-core loop over the QUIC endpoint.
//! - [`connection`]: one client connection's streams and buffers.
//! - [`udp`]: batched UDP I/O (GSO/GRO) with glommio readiness.
//! - [`log_writer`]: the shard's log writer task (buffered appends, fdatasync).
//! - [`reservations`]: extends the durable id and seq reservations off the
//!   shard thread.
//! - [`admin`]: the metrics and health HTTP endpoint.
//! - [`systemd`]: READY/STATUS/WATCHDOG/STOPPING notifications.
//! - [`failpoint`]: fault injection for tests (debug builds only).

pub mod admin;
pub mod connection;
pub mod failpoint;
pub mod journal;
pub mod log_reader;
pub mod log_writer;
pub mod reservations;
pub mod runtime;
pub mod shard_loop;
pub mod systemd;
pub mod udp;
