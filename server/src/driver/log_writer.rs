//! The shard's log writer: a glommio task that appends write chunks to the
//! current segment with O_DIRECT (glommio `DmaFile`, io_uring) and makes each
//! durable with `fdatasync` before reporting it.
//!
//! O_DIRECT writes whole aligned blocks, so the writer keeps the bytes of the
//! last, partly filled block in memory and rewrites that block, followed by
//! the new records and zero padding, at every write. The zeros after the last
//! record are what the scanner reads as the end of the segment. A failed
//! write or sync leaves the writer's position unchanged, so the next chunk
//! overwrites whatever the failed one left behind.
//!
//! Group commit falls out of the loop structure: one chunk is in flight at a
//! time, and records that arrive meanwhile accumulate in the store until the
//! sync completes (bounded by `commit_bytes_max` per chunk).

use crate::shard::mailbox::WriteChunk;
use crate::storage::layout::segment_path;
use glommio::io::{DmaFile, OpenOptions};
use std::path::PathBuf;

/// Block size every write is aligned to (a multiple of any device's logical
/// block size that O_DIRECT asks for).
const BLOCK_BYTES: u64 = 4096;

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
    /// The bytes of its last partial block (`valid_end` rounded down to a block up to `valid_end`).
    pub tail: Vec<u8>,
}

/// The writer's state.
struct Writer {
    /// The shard's log directory.
    dir: PathBuf,
    /// Open segment and its number.
    file: Option<(u64, DmaFile)>,
    /// Logical end of valid records in the open segment.
    end: u64,
    /// Bytes from `end` rounded down to a block, up to `end`.
    tail: Vec<u8>,
}

/// Runs the writer until the loop drops its sender.
pub async fn run_writer(
    dir: PathBuf,
    start: Option<WriterStart>,
    commands: flume::Receiver<WriterCommand>,
    events: flume::Sender<WriterEvent>,
) {
    let mut writer = Writer { dir, file: None, end: 0, tail: Vec::new() };
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
        let file = OpenOptions::new().read(true).write(true).create(true).dma_open(&path).await?;
        if !existed {
            // Make the new directory entry durable, through io_uring (a
            // blocking fsync here would stall the whole shard).
            let directory = glommio::io::Directory::open(&self.dir).await?;
            directory.sync().await?;
            let _ = directory.close().await;
        }
        // Only now, with nothing left to fail, take the resume point: a failed
        // open is retried with it, so the recovered records are never overwritten.
        match resume.take_if(|start| start.segment == segment) {
            Some(start) => {
                self.end = start.valid_end;
                self.tail = start.tail;
            }
            None => {
                // A new segment (the store never returns to an older one).
                self.end = 0;
                self.tail.clear();
            }
        }
        self.file = Some((segment, file));
        Ok(())
    }

    async fn write(&mut self, chunk: &WriteChunk, resume: &mut Option<WriterStart>) -> std::io::Result<()> {
        if self.file.as_ref().is_none_or(|(open, _)| *open != chunk.segment) {
            self.open(chunk.segment, resume).await?;
        }
        let Some((_, file)) = &self.file else { unreachable!("opened above") };
        let block_start = self.end - self.end % BLOCK_BYTES;
        debug_assert_eq!(self.tail.len() as u64, self.end - block_start);
        let data_bytes = self.tail.len() + chunk.bytes.len();
        let padded = (data_bytes as u64).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let mut buffer = file.alloc_dma_buffer(padded as usize);
        let bytes = buffer.as_bytes_mut();
        bytes[..self.tail.len()].copy_from_slice(&self.tail);
        bytes[self.tail.len()..data_bytes].copy_from_slice(&chunk.bytes);
        bytes[data_bytes..].fill(0);
        let written = file.write_at(buffer, block_start).await?;
        if (written as u64) < padded {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short write: {written} of {padded} bytes"),
            ));
        }
        file.fdatasync().await?;
        let new_end = self.end + chunk.bytes.len() as u64;
        let new_block_start = new_end - new_end % BLOCK_BYTES;
        let mut combined = std::mem::take(&mut self.tail);
        combined.extend_from_slice(&chunk.bytes);
        self.tail = combined[(new_block_start - block_start) as usize..].to_vec();
        self.end = new_end;
        Ok(())
    }
}
