//! When the log's I/O may go: the group-commit policy for writes and the
//! back-off of writes and reads after failures. Pure state over simulated or
//! real monotonic time (microseconds), owned by the shard core, so that the
//! simulation runs the same policy the driver's loop does.
//!
//! Group commit: one chunk is written (and synced) at a time; whatever
//! accumulates while it is in flight goes in the next one. An idle log
//! writes new records at once, or, with a commit delay, once the oldest
//! waiting record has waited that long or `commit_bytes_max` have gathered.

/// First wait after a failed write or read; doubles per failure.
pub const RETRY_MIN_US: u64 = 10_000;
/// Longest wait after failed writes or reads.
pub const RETRY_MAX_US: u64 = 1_000_000;

/// The log's I/O schedule (see the module documentation).
#[derive(Debug, Clone)]
pub struct IoSchedule {
    /// Wait this long for more records before writing an idle log.
    commit_delay_us: u64,
    /// Write at once when this many bytes wait.
    commit_bytes_max: usize,
    /// A chunk was taken and its outcome has not come back.
    write_in_flight: bool,
    /// Since when records have been waiting for the writer.
    pending_since_us: Option<u64>,
    /// After failed writes: the current wait and when the next may go.
    write_backoff_us: u64,
    write_retry_at_us: Option<u64>,
    /// After failed reads: the current wait and when the next may go.
    read_backoff_us: u64,
    read_retry_at_us: Option<u64>,
}

impl IoSchedule {
    /// A schedule with the configured commit delay and size.
    pub fn new(commit_delay_us: u64, commit_bytes_max: usize) -> IoSchedule {
        IoSchedule {
            commit_delay_us,
            commit_bytes_max,
            write_in_flight: false,
            pending_since_us: None,
            write_backoff_us: 0,
            write_retry_at_us: None,
            read_backoff_us: 0,
            read_retry_at_us: None,
        }
    }

    /// Whether the writer is idle and not backing off (upkeep such as
    /// compaction runs only then, between writes).
    pub fn may_write(&mut self, now_us: u64) -> bool {
        if self.write_in_flight || self.write_retry_at_us.is_some_and(|at| now_us < at) {
            return false;
        }
        self.write_retry_at_us = None;
        true
    }

    /// Whether a chunk may be taken now, with `pending_bytes` waiting.
    pub fn write_due(&mut self, now_us: u64, pending_bytes: usize) -> bool {
        if !self.may_write(now_us) {
            return false;
        }
        if pending_bytes == 0 {
            self.pending_since_us = None;
            return false;
        }
        let since = *self.pending_since_us.get_or_insert(now_us);
        self.commit_delay_us == 0
            || pending_bytes >= self.commit_bytes_max
            || now_us >= since.saturating_add(self.commit_delay_us)
    }

    /// A chunk was taken at `now_us`; `pending_after` bytes still wait.
    pub fn write_taken(&mut self, now_us: u64, pending_after: usize) {
        self.write_in_flight = true;
        self.pending_since_us = (pending_after > 0).then_some(now_us);
    }

    /// Whether a chunk is being written.
    pub fn write_in_flight(&self) -> bool {
        self.write_in_flight
    }

    /// The chunk in flight became durable.
    pub fn write_durable(&mut self) {
        self.write_in_flight = false;
        self.write_backoff_us = 0;
        self.write_retry_at_us = None;
    }

    /// The chunk in flight failed at `now_us`: the next waits, longer after
    /// each failure in a row (a failing disk is not retried as fast as it
    /// reports errors).
    pub fn write_failed(&mut self, now_us: u64) {
        self.write_in_flight = false;
        self.write_backoff_us = (self.write_backoff_us * 2).clamp(RETRY_MIN_US, RETRY_MAX_US);
        self.write_retry_at_us = Some(now_us + self.write_backoff_us);
    }

    /// Whether reads may be handed out now.
    pub fn reads_allowed(&mut self, now_us: u64) -> bool {
        if self.read_retry_at_us.is_some_and(|at| now_us < at) {
            return false;
        }
        self.read_retry_at_us = None;
        true
    }

    /// A read came back: `failed` if it could not be read (a read of a
    /// segment deleted meanwhile is not a failure of the disk).
    pub fn read_done(&mut self, now_us: u64, failed: bool) {
        if failed {
            self.read_backoff_us = (self.read_backoff_us * 2).clamp(RETRY_MIN_US, RETRY_MAX_US);
            self.read_retry_at_us = Some(now_us + self.read_backoff_us);
        } else {
            self.read_backoff_us = 0;
        }
    }

    /// The earliest time a write or read may become due without any input.
    pub fn deadline(&self) -> Option<u64> {
        // While a retry waits, the commit delay (maybe long past) is not a
        // deadline: the retry is.
        let commit = match (self.pending_since_us, self.write_in_flight, self.write_retry_at_us) {
            (Some(since), false, None) if self.commit_delay_us > 0 => Some(since.saturating_add(self.commit_delay_us)),
            _ => None,
        };
        let write_retry = self.write_retry_at_us.filter(|_| !self.write_in_flight);
        [commit, write_retry, self.read_retry_at_us].into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_log_writes_at_once_without_a_delay_and_one_chunk_at_a_time() {
        let mut schedule = IoSchedule::new(0, 1024);
        assert!(!schedule.write_due(0, 0), "nothing waits");
        assert!(schedule.write_due(5, 10));
        schedule.write_taken(5, 0);
        assert!(!schedule.write_due(6, 10), "one chunk in flight at a time");
        schedule.write_durable();
        assert!(schedule.write_due(7, 10));
        assert_eq!(schedule.deadline(), None);
    }

    #[test]
    fn a_commit_delay_gathers_records_until_it_passes_or_the_size_is_reached() {
        let mut schedule = IoSchedule::new(500, 1024);
        assert!(!schedule.write_due(1_000, 10));
        assert_eq!(schedule.deadline(), Some(1_500));
        assert!(!schedule.write_due(1_499, 20));
        assert!(schedule.write_due(1_500, 20));
        // Enough bytes go at once.
        let mut schedule = IoSchedule::new(500, 1024);
        assert!(schedule.write_due(1_000, 1024));
        // Records still waiting after a take start their own delay then.
        schedule.write_taken(1_000, 10);
        schedule.write_durable();
        assert!(!schedule.write_due(1_200, 10));
        assert!(schedule.write_due(1_500, 10));
    }

    #[test]
    fn failures_back_off_doubling_to_a_ceiling_and_a_success_resets() {
        let mut schedule = IoSchedule::new(0, 1024);
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..10 {
            assert!(schedule.write_due(now, 10));
            schedule.write_taken(now, 0);
            schedule.write_failed(now);
            let at = schedule.deadline().expect("a retry is scheduled");
            assert!(!schedule.write_due(at - 1, 10));
            waits.push(at - now);
            now = at;
        }
        assert_eq!(waits[..3], [RETRY_MIN_US, 2 * RETRY_MIN_US, 4 * RETRY_MIN_US]);
        assert_eq!(*waits.last().unwrap(), RETRY_MAX_US);
        assert!(schedule.write_due(now, 10));
        schedule.write_taken(now, 0);
        schedule.write_durable();
        schedule.write_taken(now, 0);
        schedule.write_failed(now);
        assert_eq!(schedule.deadline(), Some(now + RETRY_MIN_US));
    }

    #[test]
    fn a_retry_after_a_failure_hides_a_commit_delay_that_passed() {
        let mut schedule = IoSchedule::new(500, 1024);
        assert!(!schedule.write_due(0, 10));
        assert!(schedule.write_due(500, 10));
        schedule.write_taken(500, 10);
        schedule.write_failed(600);
        // The delay of the waiting records passed long ago: only the retry
        // may wake the loop (a past deadline would spin it).
        assert_eq!(schedule.deadline(), Some(600 + RETRY_MIN_US));
    }

    #[test]
    fn reads_wait_after_a_failure_only() {
        let mut schedule = IoSchedule::new(0, 1024);
        schedule.read_done(0, false);
        assert!(schedule.reads_allowed(0));
        schedule.read_done(100, true);
        assert!(!schedule.reads_allowed(100 + RETRY_MIN_US - 1));
        assert_eq!(schedule.deadline(), Some(100 + RETRY_MIN_US));
        assert!(schedule.reads_allowed(100 + RETRY_MIN_US));
        assert_eq!(schedule.deadline(), None);
    }
}
