//! iris-bench: criterion micro-benchmarks. Run them with `cargo bench -p iris-bench`.
//!
//! # Layout
//! - `benches/codec.rs`: frame encode and decode (with bytecheck validation).
//! - `benches/shard_map.rs`: user -> slot -> shard lookup.
//! - `benches/message_path.rs`: a Send through the shard core into a mailbox
//!   and out as a Deliver, without sockets.
