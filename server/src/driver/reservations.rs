//! The shard's durable reservations of server_msg_ids and seqs, extended
//! while it runs. Each extension is a small file write and two syncs
//! (`layout::reserve_message_ids`, `layout::reserve_seqs`); they run on
//! glommio's blocking-call thread, never on the shard's, and the result is
//! taken by the loop's next iteration. An extension starts once half of a
//! block is used, so the other half covers the time it takes; if it fails,
//! sends are refused with Throttle only once the current block runs out,
//! and it is retried after [`RETRY_AFTER`].

use crate::shard::core::ShardCore;
use crate::shard::mailbox::MailboxStore;
use crate::storage::layout::{self, LayoutError};
use std::cell::RefCell;
use std::ops::Range;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long a failed extension waits before the next attempt.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Blocks of 64 message ids and 64 seqs, so that a process test extends
/// both many times with a few hundred messages.
const SMALL_BLOCK: u64 = 64;

/// The sizes of the blocks a shard reserves: `(message ids, seqs)`. Debug
/// builds shrink both for the failpoint `small-reservations:<shard>`.
pub fn block_sizes(shard: u16) -> (u64, u64) {
    if super::failpoint::armed(super::failpoint::SMALL_RESERVATIONS, shard) {
        (SMALL_BLOCK, SMALL_BLOCK)
    } else {
        (layout::MESSAGE_ID_BLOCK, layout::SEQ_BLOCK)
    }
}

/// Where one kind of extension stands.
enum Attempt<T> {
    Idle,
    /// Running on the blocking-call thread; the slot is filled when it ends.
    Running(Rc<RefCell<Option<Result<T, LayoutError>>>>),
    /// The last attempt failed; the next one waits until then.
    FailedUntil(Instant),
}

impl<T: 'static + Send> Attempt<T> {
    /// The result of a finished attempt (the attempt is then idle, or
    /// waiting to retry if it failed).
    fn take_result(&mut self, now: Instant) -> Option<T> {
        let Attempt::Running(slot) = self else { return None };
        let result = slot.borrow_mut().take()?;
        match result {
            Ok(value) => {
                *self = Attempt::Idle;
                Some(value)
            }
            Err(error) => {
                tracing::error!(%error, "extending a durable reservation failed; retrying in 1 s");
                *self = Attempt::FailedUntil(now + RETRY_AFTER);
                None
            }
        }
    }

    /// Whether a new attempt may start now.
    fn may_start(&self, now: Instant) -> bool {
        match self {
            Attempt::Idle => true,
            Attempt::Running(_) => false,
            Attempt::FailedUntil(at) => now >= *at,
        }
    }

    /// Runs `work` on the blocking-call thread.
    fn start(&mut self, work: impl FnOnce() -> Result<T, LayoutError> + Send + 'static) {
        let slot = Rc::new(RefCell::new(None));
        let filled = Rc::clone(&slot);
        glommio::spawn_local(async move {
            let result = glommio::executor().spawn_blocking(work).await;
            *filled.borrow_mut() = Some(result);
        })
        .detach();
        *self = Attempt::Running(slot);
    }
}

/// The shard's two reservations and their extensions in flight.
pub struct Reservations {
    shard_dir: PathBuf,
    message_id_block: u64,
    seq_block: u64,
    message_ids: Attempt<Range<u64>>,
    seqs: Attempt<u64>,
}

impl std::fmt::Debug for Reservations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservations")
            .field("shard_dir", &self.shard_dir)
            .field("message_id_block", &self.message_id_block)
            .field("seq_block", &self.seq_block)
            .finish_non_exhaustive()
    }
}

impl Reservations {
    /// Reservations in `shard_dir`, extended by blocks of the given sizes.
    pub fn new(shard_dir: PathBuf, (message_id_block, seq_block): (u64, u64)) -> Reservations {
        Reservations { shard_dir, message_id_block, seq_block, message_ids: Attempt::Idle, seqs: Attempt::Idle }
    }

    /// Applies finished extensions to `core` and starts the ones it needs.
    pub fn drive<S: MailboxStore>(&mut self, core: &mut ShardCore<S>, now: Instant) {
        if let Some(ids) = self.message_ids.take_result(now) {
            // Only this process reserves in its directory (the lock), and
            // only one attempt runs at a time, so everything from the
            // current end to the new one is ours: a gap left by a
            // half-failed attempt is reserved as well.
            assert!(ids.start >= core.message_id_end(), "message id reservations only move forward");
            core.extend_message_ids(ids.end);
        }
        if let Some(end) = self.seqs.take_result(now) {
            core.extend_seq_reservation(end);
        }
        if self.message_ids.may_start(now) {
            if let Some(current_end) = core.message_id_extension(self.message_id_block) {
                let (dir, block) = (self.shard_dir.clone(), self.message_id_block);
                self.message_ids.start(move || layout::reserve_message_ids(&dir, block, current_end));
            }
        }
        if self.seqs.may_start(now) {
            if let Some(end) = core.seq_reservation().and_then(|reservation| reservation.extension(self.seq_block)) {
                let dir = self.shard_dir.clone();
                self.seqs.start(move || layout::reserve_seqs(&dir, end));
            }
        }
    }
}
