//! Shard logic: plain, single-threaded state machines with no I/O, no clock
//! and no runtime. The I/O driver (`crate::driver`) feeds them decoded frames,
//! cross-shard messages, log I/O outcomes and the current time, and carries
//! out their outputs (decision 0016).
//!
//! # Layout
//! - [`core`]: [`ShardCore`], one per shard: sessions, routing, dedup,
//!   acks and pushes.
//! - [`mailbox`]: the per-shard storage interface ([`MailboxStore`]) and its
//!   in-memory implementation.
//! - [`dedup`]: the bounded per-device window of recent client_msg_ids.
//! - [`messages`]: the owned messages shards exchange.
//! - [`recipient_dedup`]: which (sender device, client_msg_id) the shard
//!   stored lately, so a retry is answered with the original id.

pub mod codel;
pub mod core;
pub mod dedup;
pub mod inactivity;
pub mod mailbox;
pub mod messages;
pub mod presence;
pub mod rate;
pub mod recipient_dedup;

/// The hash map of shard state. Some keys are chosen by clients
/// (`client_msg_id`), so the hasher is seeded randomly per process
/// (foldhash), which keeps collisions unpredictable to a client at a
/// fraction of SipHash's cost: SipHash was about 10% of server CPU with 10
/// connections x 16 messages in flight (docs/performance.md, "Profiles").
pub type StateMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub use self::core::{
    ConnId, CoreLimits, CoreStats, Now, Output, ReadOutcome, SendRates, ShardCore, ShardIdentity, WriteOutcome,
};
pub use mailbox::{MailboxStore, MemoryStore};
pub use messages::{DeviceKey, ShardMessage};
