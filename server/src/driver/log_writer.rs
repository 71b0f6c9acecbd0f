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
//! A failed write or sync leaves the writer's position unchanged, and the
//! file is cut back to it (best effort), so the next chunk overwrites
//! whatever the failed one left behind and no record of a refused chunk can
//! be replayed after a restart.
//!
//! Group commit falls out of the loop structure: one chunk is in flight at a
//! time, and records that arrive meanwhile accumulate in the store until the
//! sync completes (bounded by `commit_bytes_max` per chunk).

use crate::shard::mailbox::WriteChunk;
use crate::storage::layout::segment_path;
use glommio::io::{BufferedFile, OpenOptions};
use std::path::PathBuf;

/// What the loop asks of the writer.
#[derive(Debug)]
pub enum WriterCommand {
    /// Append and sync this chunk.
    Write(WriteChunk),
    /// Delete this (fully delivered) segment.
    Delete(u64),
}

/// What the writer reports back.
#[derive(Debug)]
pub enum WriterEvent {
    /// The chunk is on disk.
    Durable {
        /// Its segment.
        segment: u64,
        /// Its last ticket.
        last_ticket: u64,
        /// Bytes of records it carried.
        bytes: u64,
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
}

/// Runs the writer until the loop drops its sender.
pub async fn run_writer(
    dir: PathBuf,
    start: Option<WriterStart>,
    commands: flume::Receiver<WriterCommand>,
    events: flume::Sender<WriterEvent>,
) {
    let mut writer = Writer { dir, file: None, end: 0 };
    let mut resume = start;
    while let Ok(command) = commands.recv_async().await {
        match command {
            WriterCommand::Write(chunk) => {
                let event = match writer.write(&chunk, &mut resume).await {
                    Ok(()) => WriterEvent::Durable {
                        segment: chunk.segment,
                        last_ticket: chunk.last_ticket,
                        bytes: chunk.bytes.len() as u64,
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
            }
            WriterCommand::Delete(segment) => {
                if writer.file.as_ref().is_some_and(|(open, _)| *open == segment) {
                    continue;
                }
                let path = segment_path(&writer.dir, segment);
                // Through io_uring: a blocking unlink of a large file would stall the shard.
                match glommio::io::remove(&path).await {
                    Ok(()) => tracing::debug!(segment, "segment reclaimed"),
                    Err(error) => tracing::warn!(segment, %error, "deleting a reclaimed segment failed"),
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
        let existed = path.exists();
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
        Ok(())
    }

    async fn write(&mut self, chunk: &WriteChunk, resume: &mut Option<WriterStart>) -> std::io::Result<()> {
        if self.file.as_ref().is_none_or(|(open, _)| *open != chunk.segment) {
            self.open(chunk.segment, resume).await?;
        }
        let Some((_, file)) = &self.file else { unreachable!("opened above") };
        let result = Self::append(file, self.end, &chunk.bytes).await;
        match result {
            Ok(()) => self.end += chunk.bytes.len() as u64,
            Err(_) => {
                // Cut off whatever part of the chunk reached the file; if even
                // that fails, the next write overwrites it from `end`.
                let _ = file.truncate(self.end).await;
            }
        }
        result
    }

    async fn append(file: &BufferedFile, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        let written = file.write_at(bytes.to_vec(), at).await?;
        if written < bytes.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short write: {written} of {} bytes", bytes.len()),
            ));
        }
        file.fdatasync().await?;
        Ok(())
    }
}
