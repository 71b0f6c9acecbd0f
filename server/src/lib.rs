//! irisd: the Iris shard server.
//!
//! # Layout
//! - [`shard`]: shard logic as sans-IO state machines (sessions, routing,
//!   dedup, mailboxes). No sockets, no clock, no runtime.
//! - [`driver`]: the I/O driver layer: glommio executors, the per-core QUIC
//!   loop over quinn-proto, batched UDP, timers and cross-shard channels.
//! - [`auth`]: Ed25519 access tokens.
//! - [`tls`]: certificate creation and the rustls server configuration.
//! - [`config`]: TOML configuration and its validation.
//! - [`files`]: crash-safe small-file writes for the data directory.
//! - [`storage`]: the durable log (format, store, data-directory layout).
//! - [`metrics`]: per-shard counters and their Prometheus rendering.

pub mod auth;
pub mod config;
pub mod driver;
pub mod files;
pub mod metrics;
pub mod shard;
pub mod storage;
pub mod tls;
