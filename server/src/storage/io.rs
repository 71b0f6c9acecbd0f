//! The log side of a mailbox store ([`LogIo`]): the chunks it wants written,
//! the records it wants read back, the segments it no longer needs, and what
//! became of each. The shard core hands these to the driver
//! (`ShardCore::poll_write` and friends) with the timing of
//! [`super::schedule`]; a memory-only store keeps every default (it writes
//! and reads nothing).

use crate::shard::mailbox::{RecordAt, Ticket};
use crate::shard::DeviceKey;

/// Encoded log records for one segment, handed by a durable store to the
/// driver: one write and one fdatasync each.
#[derive(Debug)]
pub struct WriteChunk {
    /// Target segment.
    pub segment: u64,
    /// The offset in the segment file where the store expects the chunk to
    /// start (where the writer's durable bytes end): record positions are
    /// computed from it, so a writer that finds its file elsewhere must
    /// fail the chunk rather than write it.
    pub start: u64,
    /// Records, back to back.
    pub bytes: Vec<u8>,
    /// First ticket in the chunk.
    pub first_ticket: Ticket,
    /// Last ticket in the chunk.
    pub last_ticket: Ticket,
}

/// What a durable store asks of the disk, and learns back. Every method
/// has the default of a store without a log.
pub trait LogIo {
    /// `device`'s push met a cold entry after `after_seq`: read its body
    /// back, and those of a bounded number of the cold entries after it
    /// (read-ahead). Once the first is in memory, [`LogIo::on_read`]
    /// names `device`.
    fn want_bodies(&mut self, _device: DeviceKey, _after_seq: u64) {}
    /// The next record to read back for the driver, if any.
    fn take_read(&mut self) -> Option<RecordAt> {
        None
    }
    /// The driver read `at` (its bytes, or why it could not). Returns the
    /// devices whose push may go on now.
    fn on_read(&mut self, _at: RecordAt, _result: Result<&[u8], String>) -> Vec<DeviceKey> {
        Vec::new()
    }
    /// The oldest chunk of encoded records to write, if any.
    fn take_write(&mut self) -> Option<WriteChunk> {
        None
    }
    /// Bytes waiting to be written.
    fn pending_write_bytes(&self) -> usize {
        0
    }
    /// The driver made the chunk `first_ticket..=last_ticket` durable. Chunks
    /// complete in the order they were taken, each right after the previous.
    fn on_write_durable(&mut self, _segment: u64, _first_ticket: Ticket, _last_ticket: Ticket) {}
    /// The driver failed to make the chunk durable; its changes are dropped.
    fn on_write_failed(&mut self, _segment: u64, _first_ticket: Ticket, _last_ticket: Ticket) {}
    /// Segments that may be deleted now.
    fn take_reclaimable(&mut self) -> Vec<u64> {
        Vec::new()
    }
    /// Background upkeep between writes (log compaction).
    fn maintain(&mut self) {}
}
