//! The shard's log writer: a glommio task that appends write chunks to the
//! current segment (glommio `BufferedFile`, io_uring on the executor's main
//! ring) and makes each durable with `fdatasync` before reporting it.
//!
//! Why not O_DIRECT (`DmaFile`): glommio sends O_DIRECT reads and writes to
//! its I/O-polling ring whenever a probe read on the device succeeds, and an
//! executor with a request on that ring never sleeps: it spins in
//! `io_uring_enter` until the write completes. On a device without poll
//! queues (virtio here, and most cloud disks) that spin cost about 230 us of
//! CPU per write, five times the rest of the message path at low load
//! (docs/decisions/0007-buffered-log-writes.md has the measurements).
//! Buffered writes go to the main ring, which sleeps while they are in
//! flight; the page-cache copy is one memcpy of the chunk.
//!
//! Each chunk goes out framed (`record::frame_chunk`): a segment header
//! before the first one, a commit marker with the chunk's offset and CRC
//! after every one; recovery keeps only chunks whose marker checks. A failed
//! write or sync leaves the writer's position unchanged, and the file is cut
//! back to it and synced before any other write (retried until it works);
//! the next chunk goes to the same offset, and a marker the failed chunk may
//! have left further on names a start the scan has already passed, so it
//! certifies nothing.
//!
//! Spare segments: while segment N is in use, a background task writes
//! `seg-(N+1).prep` full of zeros and syncs it (and at the start of a fresh
//! log, the one for segment 1); opening N+1 renames it into place. Appends
//! then overwrite allocated blocks of a file whose size does not change, so
//! each `fdatasync` flushes data without the journal commit that a growing
//! file needs (decision 0008 has the measurements). Zeros after the last
//! record are what the scanner reads as the end of a segment. A disk with
//! less than [`SPARE_FREE_FACTOR`] segments' worth of space free gets no
//! spare: the last free space is kept for records, not zeros.
//!
//! Group commit falls out of the loop structure: one chunk is in flight at a
//! time, and records that arrive meanwhile accumulate in the store until the
//! sync completes (bounded by `commit_bytes_max` per chunk).

use crate::storage::io::WriteChunk;
use crate::storage::layout::segment_path;
use crate::storage::record::{frame_chunk, LogKey};
use glommio::io::{BufferedFile, OpenOptions};
use std::path::{Path, PathBuf};

/// A spare segment is prepared only with this many segments' worth of space free.
pub const SPARE_FREE_FACTOR: u64 = 4;
/// Zeros written per request while preparing a spare.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Where the spare for `segment` is prepared: not a `.log` name, so a
/// recovery scan never reads it (`layout::scan_segments` deletes leftovers).
pub fn spare_path(dir: &Path, segment: u64) -> PathBuf {
    segment_path(dir, segment).with_extension("prep")
}

/// What the loop asks of the writer.
#[derive(Debug)]
pub enum WriterCommand {
    /// Append and sync this chunk.
    Write(WriteChunk),
    /// Delete this (fully delivered) segment.
    Delete(u64),
}

/// Capacity of the writer's command queue: one write in flight plus
/// segment deletions, which are rare (one per reclaimed segment).
pub const WRITER_QUEUE_MAX: usize = 64;

/// The loop's side of the writer's command queue. A chunk taken from the
/// store is never dropped: the queue keeps one slot free for it (deletions
/// may use the others, and wait here when those are taken), and a chunk the
/// channel refuses anyway is parked and offered again on the next pump.
/// Losing a chunk here once let the next chunk's Durable count the lost
/// tickets as committed: an Ack without durability.
#[derive(Debug)]
pub struct WriterQueue {
    /// Commands to the writer task (capacity [`WRITER_QUEUE_MAX`]).
    commands: flume::Sender<WriterCommand>,
    /// A chunk taken from the store that the channel has not accepted yet.
    parked: Option<WriteChunk>,
    /// Reclaimed segments waiting for a queue slot; at most one entry per
    /// segment on disk, so bounded by the disk over the segment size.
    deletes: std::collections::VecDeque<u64>,
}

impl WriterQueue {
    /// A queue over `commands` (created with capacity [`WRITER_QUEUE_MAX`]).
    pub fn new(commands: flume::Sender<WriterCommand>) -> WriterQueue {
        assert!(commands.capacity().is_some_and(|capacity| capacity >= 2), "the writer queue needs room for a write");
        WriterQueue { commands, parked: None, deletes: std::collections::VecDeque::new() }
    }

    /// Hands `chunk` to the writer (or parks it until the channel takes it).
    /// Call only when no earlier chunk is waiting (one write in flight).
    pub fn submit_write(&mut self, chunk: WriteChunk) {
        assert!(self.parked.is_none(), "one write chunk in flight at a time");
        self.parked = Some(chunk);
        self.pump();
    }

    /// Asks the writer to delete `segment` once a slot is free.
    pub fn submit_delete(&mut self, segment: u64) {
        self.deletes.push_back(segment);
        self.pump();
    }

    /// Offers the parked chunk, then deletions while a slot stays free for
    /// the next write. Returns false once the writer task is gone.
    pub fn pump(&mut self) -> bool {
        if let Some(chunk) = self.parked.take() {
            match self.commands.try_send(WriterCommand::Write(chunk)) {
                Ok(()) => {}
                Err(flume::TrySendError::Full(WriterCommand::Write(chunk))) => self.parked = Some(chunk),
                Err(flume::TrySendError::Disconnected(WriterCommand::Write(chunk))) => {
                    // Its sends stay unacknowledged.
                    self.parked = Some(chunk);
                    return false;
                }
                Err(_) => unreachable!("try_send hands back the command it was given"),
            }
        }
        let capacity = self.commands.capacity().unwrap_or(WRITER_QUEUE_MAX);
        while self.commands.len() + 1 < capacity {
            let Some(segment) = self.deletes.pop_front() else { break };
            if self.commands.try_send(WriterCommand::Delete(segment)).is_err() {
                self.deletes.push_front(segment);
                break;
            }
        }
        !self.commands.is_disconnected()
    }

    /// Whether work waits for a free slot.
    pub fn backlogged(&self) -> bool {
        self.parked.is_some() || !self.deletes.is_empty()
    }
}

/// What the writer reports back.
#[derive(Debug)]
pub enum WriterEvent {
    /// The chunk is on disk.
    Durable {
        /// Its segment.
        segment: u64,
        /// Its first ticket.
        first_ticket: u64,
        /// Its last ticket.
        last_ticket: u64,
        /// Bytes of records it carried.
        bytes: u64,
        /// How long its write and sync took, µs.
        took_us: u64,
    },
    /// The chunk could not be written or synced.
    Failed {
        /// Its segment.
        segment: u64,
        /// Its first ticket.
        first_ticket: u64,
        /// Its last ticket.
        last_ticket: u64,
        /// The I/O error.
        error: String,
    },
}

/// Where appending resumes after recovery.
#[derive(Debug, Clone)]
pub struct WriterStart {
    /// Segment to append to.
    pub segment: u64,
    /// Bytes of valid records in it.
    pub valid_end: u64,
}

/// The writer's state.
struct Writer {
    /// The shard's log directory.
    dir: PathBuf,
    /// Open segment and its number.
    file: Option<(u64, BufferedFile)>,
    /// End of the valid records in the open segment.
    end: u64,
    /// Size of a spare segment (0: none are prepared).
    spare_bytes: u64,
    /// The spare being prepared, and for which segment.
    spare: Option<(u64, glommio::Task<std::io::Result<bool>>)>,
    /// A write failed in the open segment and its bytes are not cut off yet.
    cut_pending: bool,
    /// Seals every chunk's marker.
    key: LogKey,
}

/// Runs the writer until the loop drops its sender. `spare_bytes` is the
/// size of the spare segments it prepares (the segment size; 0 for none);
/// `key` seals the chunks (the data directory's log key).
pub async fn run_writer(
    dir: PathBuf,
    key: LogKey,
    start: Option<WriterStart>,
    spare_bytes: u64,
    commands: flume::Receiver<WriterCommand>,
    events: flume::Sender<WriterEvent>,
) {
    // glommio opens directories with openat(-1, ...): a relative path fails.
    assert!(dir.is_absolute(), "the log writer needs an absolute directory, got {}", dir.display());
    let mut writer = Writer { dir, file: None, end: 0, spare_bytes, spare: None, cut_pending: false, key };
    // The next segment to be created: after the resumed one, or the first.
    writer.prepare_spare(start.as_ref().map_or(1, |start| start.segment + 1));
    let mut resume = start;
    while let Ok(command) = commands.recv_async().await {
        match command {
            WriterCommand::Write(chunk) => {
                let started = std::time::Instant::now();
                let event = match writer.write(&chunk, &mut resume).await {
                    Ok(()) => WriterEvent::Durable {
                        segment: chunk.segment,
                        first_ticket: chunk.first_ticket,
                        last_ticket: chunk.last_ticket,
                        bytes: chunk.bytes.len() as u64,
                        took_us: started.elapsed().as_micros() as u64,
                    },
                    Err(error) => {
                        tracing::error!(segment = chunk.segment, %error, "log write failed; sends in it are refused");
                        WriterEvent::Failed {
                            segment: chunk.segment,
                            first_ticket: chunk.first_ticket,
                            last_ticket: chunk.last_ticket,
                            error: error.to_string(),
                        }
                    }
                };
                if events.send_async(event).await.is_err() {
                    return;
                }
                writer.cut_back().await;
            }
            WriterCommand::Delete(segment) => {
                if writer.file.as_ref().is_some_and(|(open, _)| *open == segment) {
                    continue;
                }
                let path = segment_path(&writer.dir, segment);
                // Through io_uring: a blocking unlink of a large file would stall the shard.
                match glommio::io::remove(&path).await {
                    Ok(()) => tracing::debug!(segment, "segment reclaimed"),
                    Err(error) => match std::io::Error::from(error) {
                        // A segment whose every chunk failed was never created.
                        error if error.kind() == std::io::ErrorKind::NotFound => {
                            tracing::debug!(segment, "reclaimed segment was never written")
                        }
                        error => tracing::warn!(segment, %error, "deleting a reclaimed segment failed"),
                    },
                }
            }
        }
    }
}

impl Writer {
    async fn open(&mut self, segment: u64, resume: &mut Option<WriterStart>) -> std::io::Result<()> {
        if let Some((_, old)) = self.file.take() {
            // Already synced after its last write.
            let _ = old.close().await;
        }
        let path = segment_path(&self.dir, segment);
        // Only the recovered segment exists already (the store never returns
        // to an older one): known without a blocking stat on the shard thread.
        let existed = resume.as_ref().is_some_and(|start| start.segment == segment);
        if !existed {
            self.take_spare(segment, &path).await;
        }
        let file = OpenOptions::new().read(true).write(true).create(true).buffered_open(&path).await?;
        if !existed {
            // Make the new directory entry durable, through io_uring (a
            // blocking fsync here would stall the whole shard).
            let directory = glommio::io::Directory::open(&self.dir).await?;
            directory.sync().await?;
            let _ = directory.close().await;
        }
        // Only now, with nothing left to fail, take the resume point: a failed
        // open is retried with it, so the recovered records are never overwritten.
        self.end = match resume.take_if(|start| start.segment == segment) {
            Some(start) => start.valid_end,
            // A new segment (the store never returns to an older one).
            None => 0,
        };
        self.file = Some((segment, file));
        self.prepare_spare(segment + 1);
        Ok(())
    }

    /// Moves the spare prepared for `segment` into place at `path`; without
    /// one (or if preparing it failed) the segment is created empty.
    async fn take_spare(&mut self, segment: u64, path: &Path) {
        let Some((prepared, task)) = self.spare.take() else { return };
        let spare = spare_path(&self.dir, prepared);
        if prepared == segment {
            match task.await {
                Ok(true) => match glommio::io::rename(&spare, path).await {
                    Ok(()) => return,
                    Err(error) => tracing::warn!(segment, %error, "using the spare segment failed"),
                },
                // Too little free space: no spare was written.
                Ok(false) => return,
                Err(error) => tracing::warn!(segment, %error, "preparing a spare segment failed"),
            }
        } else {
            // Not the one needed (segments go up by one, so only after a failed open).
            let _ = task.cancel().await;
        }
        let _ = glommio::io::remove(&spare).await;
    }

    /// Starts preparing the spare for `segment` in the background, if there
    /// is room; the task says whether it wrote one. The free-space check
    /// (`statvfs`, which io_uring cannot do and which can block on a
    /// struggling filesystem) runs on glommio's blocking-call thread, not on
    /// the shard's.
    fn prepare_spare(&mut self, segment: u64) {
        if self.spare_bytes == 0 || self.spare.is_some() {
            return;
        }
        let (path, bytes, dir) = (spare_path(&self.dir, segment), self.spare_bytes, self.dir.clone());
        let task = glommio::spawn_local(async move {
            let room = glommio::executor().spawn_blocking(move || crate::files::free_bytes(&dir)).await.unwrap_or(0);
            if room < bytes.saturating_mul(SPARE_FREE_FACTOR) {
                return Ok(false);
            }
            let result = zero_fill(&path, bytes).await;
            if result.is_err() {
                let _ = glommio::io::remove(&path).await;
            }
            result.map(|()| true)
        });
        self.spare = Some((segment, task));
    }

    async fn write(&mut self, chunk: &WriteChunk, resume: &mut Option<WriterStart>) -> std::io::Result<()> {
        if self.file.as_ref().is_none_or(|(open, _)| *open != chunk.segment) {
            self.open(chunk.segment, resume).await?;
        }
        let Some((_, file)) = &self.file else { unreachable!("opened above") };
        if chunk.start != self.end {
            // The store computed record offsets from where it thinks this
            // chunk goes; written elsewhere they would point at other bytes.
            return Err(std::io::Error::other(format!(
                "chunk expected at offset {} of segment {}, the file ends at {}",
                chunk.start, chunk.segment, self.end
            )));
        }
        // The records with their commit marker (and, at offset 0, the
        // segment header): the scanner keeps them only if the marker is on disk.
        let mut framed = Vec::with_capacity(chunk.bytes.len() + 128);
        frame_chunk(&self.key, chunk.segment, self.end, &chunk.bytes, &mut framed);
        let length = framed.len() as u64;
        let result = Self::append(file, self.end, framed).await;
        match result {
            Ok(()) => self.end += length,
            // Whatever part of the chunk reached the file must go before
            // anything else is written: see `cut_back`.
            Err(_) => self.cut_pending = true,
        }
        result
    }

    /// After a failed write: cuts the open segment back to the end of its
    /// durable chunks and syncs that, retrying (10 ms doubling to 1 s) until
    /// it succeeds, before the writer takes another command. A failed chunk
    /// can leave whole records, even its commit marker, on disk; if a later
    /// chunk (say the retry of a refused send, in the next segment) became
    /// durable while they remained, recovery would replay both. With the cut
    /// first, leftovers survive only a crash that comes before any later
    /// write, and then the senders' retries find the replayed messages by
    /// their dedup keys.
    async fn cut_back(&mut self) {
        if !std::mem::take(&mut self.cut_pending) {
            return;
        }
        let Some((segment, file)) = &self.file else { return };
        let mut backoff = std::time::Duration::from_millis(10);
        loop {
            let result = match file.truncate(self.end).await {
                Ok(()) => file.fdatasync().await,
                Err(error) => Err(error),
            };
            match result {
                Ok(()) => return,
                Err(error) => {
                    tracing::error!(segment, %error, "cutting back a failed log write failed; retrying before any other write");
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                }
            }
        }
    }

    async fn append(file: &BufferedFile, at: u64, bytes: Vec<u8>) -> std::io::Result<()> {
        let expected = bytes.len();
        let written = file.write_at(bytes, at).await?;
        if written < expected {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short write: {written} of {expected} bytes"),
            ));
        }
        file.fdatasync().await?;
        Ok(())
    }
}

/// Writes `bytes` zeros to a fresh file at `path` and syncs it.
async fn zero_fill(path: &Path, bytes: u64) -> std::io::Result<()> {
    let file = OpenOptions::new().write(true).create(true).truncate(true).buffered_open(path).await?;
    let zeros = vec![0u8; ZERO_CHUNK_BYTES];
    let mut at = 0u64;
    while at < bytes {
        let length = (bytes - at).min(ZERO_CHUNK_BYTES as u64) as usize;
        let written = file.write_at(zeros[..length].to_vec(), at).await?;
        if written == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "no progress writing zeros"));
        }
        at += written as u64;
    }
    file.fdatasync().await?;
    file.close().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(first_ticket: u64) -> WriteChunk {
        WriteChunk { segment: 1, start: 0, bytes: vec![1, 2, 3], first_ticket, last_ticket: first_ticket }
    }

    #[test]
    fn a_write_is_never_lost_behind_many_deletions() {
        let (sender, receiver) = flume::bounded(WRITER_QUEUE_MAX);
        let mut queue = WriterQueue::new(sender);
        // Far more reclaimed segments than the queue holds.
        for segment in 0..(3 * WRITER_QUEUE_MAX as u64) {
            queue.submit_delete(segment);
        }
        assert_eq!(receiver.len(), WRITER_QUEUE_MAX - 1, "one slot stays free for a write");
        queue.submit_write(chunk(7));
        let mut writes = 0;
        let mut deletes = Vec::new();
        // The writer drains; the loop pumps between its passes.
        for _ in 0..10 {
            while let Ok(command) = receiver.try_recv() {
                match command {
                    WriterCommand::Write(written) => {
                        assert_eq!(written.first_ticket, 7);
                        writes += 1;
                    }
                    WriterCommand::Delete(segment) => deletes.push(segment),
                }
            }
            queue.pump();
        }
        assert_eq!(writes, 1, "the taken chunk reaches the writer exactly once");
        assert_eq!(deletes, (0..(3 * WRITER_QUEUE_MAX as u64)).collect::<Vec<_>>(), "every deletion, in order");
        assert!(!queue.backlogged());
    }

    #[test]
    fn a_chunk_refused_by_a_full_queue_is_parked_not_dropped() {
        let (sender, receiver) = flume::bounded(2);
        let mut queue = WriterQueue::new(sender.clone());
        // Fill the queue behind the WriterQueue's back (the writer is slow).
        sender.try_send(WriterCommand::Delete(1)).unwrap();
        sender.try_send(WriterCommand::Delete(2)).unwrap();
        queue.submit_write(chunk(3));
        assert!(queue.backlogged());
        let _ = receiver.try_recv();
        queue.pump();
        assert!(!queue.backlogged());
        let commands: Vec<_> = receiver.try_iter().collect();
        assert!(
            matches!(commands.as_slice(), [WriterCommand::Delete(2), WriterCommand::Write(c)] if c.first_ticket == 3)
        );
    }
}
