//! Durable storage: the per-shard log. docs/storage.md describes the format,
//! group commit, recovery and reclaim.
//!
//! # Layout
//! - [`record`]: the record format and the segment scanner (pure).
//! - [`log_store`]: [`LogStore`], the durable `MailboxStore` (pure: it
//!   produces write chunks and learns their outcome from the driver).
//! - [`state_homes`]: which segment holds each device's durable state, so
//!   reclaim never deletes it and compaction carries it forward.
//! - [`last_seen`]: when each device was last seen, kept in the log so the
//!   inactivity expiry survives restarts.
//! - [`io`]: [`io::LogIo`], the log side of a store (chunks to write, records
//!   to read back, segments to delete) and [`io::WriteChunk`].
//! - [`schedule`]: when the log's I/O may go (group commit, back-off after
//!   failures), over time the caller passes in (pure).
//! - [`layout`]: the data directory's layout file, format version and shard
//!   count checks, boot counters, and reading segments at start (blocking
//!   file I/O, run before a shard serves).

pub mod io;
pub mod last_seen;
pub mod layout;
pub mod log_store;
pub mod record;
pub mod schedule;
pub mod state_homes;

pub use log_store::{message_record_bytes_max, LogLimits, LogStore, RecoveryReport, READS_OUTSTANDING_MAX};
