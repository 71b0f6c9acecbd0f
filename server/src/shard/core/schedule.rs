//! The core over time: the current time every input carries ([`Now`]),
//! connection deadlines (hello timeout, close grace), periodic upkeep, and
//! the log's I/O, whose timing is [`IoSchedule`]'s (group commit, back-off).

use super::{ConnId, Output, Session, ShardCore};
use crate::shard::mailbox::{MailboxStore, RecordAt, Ticket};
use crate::storage::io::WriteChunk;
use iris_protocol::close_code;
use std::collections::BTreeSet;

/// The current time, as every input to the core carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Now {
    /// A monotonic clock, µs from an origin shared by every shard of the
    /// process (never wall-clock time, whose steps would look like sojourns
    /// or stop token buckets refilling): deadlines, sojourns, rate limits.
    pub monotonic_us: u64,
    /// Wall-clock time, ms since the Unix epoch: `sent_at_ms`, token expiry
    /// and device inactivity (which is persisted).
    pub wall_ms: u64,
}

/// Inactive devices are looked for at most this often (the inactivity table
/// itself checks at most once a minute).
const UPKEEP_INTERVAL_US: u64 = 1_000_000;

/// What a connection's deadline ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Deadline {
    /// It has not authenticated in time.
    Hello,
    /// Its final frame had its time to arrive: close with `close_code`.
    Grace { close_code: u32 },
}

/// One deadline per connection at most, earliest first. Bounded by the
/// live connections: a deadline goes when its connection does.
#[derive(Debug, Default)]
pub(super) struct Deadlines {
    by_time: BTreeSet<(u64, ConnId, Deadline)>,
    by_conn: super::StateMap<ConnId, (u64, Deadline)>,
}

impl Deadlines {
    pub(super) fn set(&mut self, conn: ConnId, at_us: u64, deadline: Deadline) {
        self.clear(conn);
        self.by_time.insert((at_us, conn, deadline));
        self.by_conn.insert(conn, (at_us, deadline));
    }

    pub(super) fn clear(&mut self, conn: ConnId) {
        if let Some((at_us, deadline)) = self.by_conn.remove(&conn) {
            self.by_time.remove(&(at_us, conn, deadline));
        }
    }

    fn first(&self) -> Option<u64> {
        self.by_time.first().map(|(at_us, ..)| *at_us)
    }

    fn pop_due(&mut self, now_us: u64) -> Option<(ConnId, Deadline)> {
        let &(at_us, conn, deadline) = self.by_time.first()?;
        if at_us > now_us {
            return None;
        }
        self.clear(conn);
        Some((conn, deadline))
    }
}

/// The outcome of a chunk [`ShardCore::poll_write`] handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written and synced.
    Durable,
    /// Not durable: its changes are dropped (and retried where they must be).
    Failed,
}

/// A read [`ShardCore::poll_read`] handed out, as it came back.
#[derive(Debug, Clone, Copy)]
pub enum ReadOutcome<'a> {
    /// The bytes at the record's place (maybe fewer at the end of a file).
    Bytes(&'a [u8]),
    /// The segment was deleted meanwhile (its entries moved): not a
    /// failing disk, so reads are not backed off.
    SegmentGone(&'a str),
    /// The read failed: reads back off.
    Failed(&'a str),
}

impl<S: MailboxStore> ShardCore<S> {
    /// Moves the core's clocks forward to `now` (never back).
    pub(super) fn advance(&mut self, now: Now) {
        self.clock_us = self.clock_us.max(now.monotonic_us);
        self.clock_ms = self.clock_us / 1000;
        self.wall_ms = self.wall_ms.max(now.wall_ms);
        self.now_s = self.wall_ms / 1000;
    }

    /// The earliest monotonic time (µs) at which [`ShardCore::handle_timeout`]
    /// has something to do: a connection deadline, the group commit's delay,
    /// a retry after a failed write or read, or upkeep.
    pub fn poll_timeout(&self) -> Option<u64> {
        [self.deadlines.first(), self.io.deadline(), Some(self.upkeep_at_us), self.presence_deadline_us()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Acts on every deadline that has passed by `now`: connections that did
    /// not authenticate in time are closed, closing ones whose grace ended
    /// are closed at once, and devices inactive for too long are removed.
    /// Harmless to call early.
    pub fn handle_timeout(&mut self, now: Now) {
        self.advance(now);
        self.drain_step();
        while let Some((conn, deadline)) = self.deadlines.pop_due(self.clock_us) {
            let (close_code, reason) = match deadline {
                Deadline::Hello => (close_code::PROTOCOL_ERROR, "no Hello in time"),
                Deadline::Grace { close_code } => (close_code, "closed by server"),
            };
            if let Some(session) = self.sessions.get_mut(&conn) {
                // A device whose registration outlasted the deadline goes
                // offline as if its connection had closed.
                let ended = std::mem::replace(session, Session::Closing);
                self.session_ended(conn, Some(ended));
            }
            self.outputs.push_back(Output::CloseNow { conn, close_code, reason });
        }
        if self.clock_us >= self.upkeep_at_us {
            self.upkeep_at_us = self.clock_us + UPKEEP_INTERVAL_US;
            self.expire_inactive();
        }
        self.presence_expire();
    }

    /// The next chunk of log records to write and sync, if the group-commit
    /// policy says one is due: one at a time (the next after this one's
    /// outcome), not while backing off after a failure, and with a commit
    /// delay only once the oldest record waited that long or enough bytes
    /// gathered. Upkeep of the log (compaction) runs here, between writes.
    pub fn poll_write(&mut self, now: Now) -> Option<WriteChunk> {
        self.advance(now);
        if !self.io.may_write(self.clock_us) {
            return None;
        }
        self.store.maintain();
        if !self.io.write_due(self.clock_us, self.store.pending_write_bytes()) {
            return None;
        }
        let chunk = self.store.take_write()?;
        self.io.write_taken(self.clock_us, self.store.pending_write_bytes());
        Some(chunk)
    }

    /// The outcome of the chunk `first_ticket..=last_ticket` for `segment`
    /// (the one [`ShardCore::poll_write`] handed out last).
    pub fn handle_write_outcome(
        &mut self,
        segment: u64,
        first_ticket: Ticket,
        last_ticket: Ticket,
        outcome: WriteOutcome,
        now: Now,
    ) {
        self.advance(now);
        match outcome {
            WriteOutcome::Durable => {
                self.io.write_durable();
                self.store.on_write_durable(segment, first_ticket, last_ticket);
            }
            WriteOutcome::Failed => {
                self.io.write_failed(self.clock_us);
                self.store.on_write_failed(segment, first_ticket, last_ticket);
            }
        }
    }

    /// Whether a chunk handed out by [`ShardCore::poll_write`] awaits its outcome.
    pub fn write_in_flight(&self) -> bool {
        self.io.write_in_flight()
    }

    /// The next record to read back from the log (a cold mailbox body), if
    /// reads are not backing off after a failure.
    pub fn poll_read(&mut self, now: Now) -> Option<RecordAt> {
        self.advance(now);
        if !self.io.reads_allowed(self.clock_us) {
            return None;
        }
        self.store.take_read()
    }

    /// A read handed out by [`ShardCore::poll_read`] came back: pushes that
    /// waited for it go on.
    pub fn handle_read(&mut self, at: RecordAt, outcome: ReadOutcome<'_>, now: Now) {
        self.advance(now);
        let result = match outcome {
            ReadOutcome::Bytes(bytes) => {
                self.io.read_done(self.clock_us, false);
                Ok(bytes)
            }
            ReadOutcome::SegmentGone(error) => Err(error.to_string()),
            ReadOutcome::Failed(error) => {
                self.io.read_done(self.clock_us, true);
                Err(error.to_string())
            }
        };
        for device in self.store.on_read(at, result) {
            if let Some(&conn) = self.online.get(&device) {
                self.queue_push(conn);
            }
        }
    }

    /// Log segments that may be deleted now.
    pub fn poll_reclaim(&mut self) -> Vec<u64> {
        self.store.take_reclaimable()
    }
}
