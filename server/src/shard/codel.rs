//! CoDel admission control (RFC 8289's control law, applied at admission).
//!
//! The "queue" is a shard's send path: a Send accepted by this shard waits
//! for the recipient's shard to store it and for the group commit that makes
//! it durable. Its *sojourn* is the time from its arrival to its answer,
//! observed when the answer comes back ([`CoDel::on_sojourn`]). While the
//! sojourn stays above `target` for a whole `interval`, the controller enters
//! the dropping state. RFC 8289 drops packets at dequeue; a server must never
//! drop work it has accepted (an accepted Send ends in an Ack or a refusal),
//! so here a "drop" is the refusal of the next *new* Send at admission, with
//! Throttle ([`CoDel::admit`]). Refusals are spaced as the RFC's control law
//! spaces drops, `interval / sqrt(count)`, so the refusal rate grows until
//! the sojourn falls below `target`, which ends the dropping state.
//!
//! A Send's sojourn always includes the sync that makes it durable, which
//! is no queue: on a disk whose fdatasync takes 8 ms, every sojourn would be
//! above a 5 ms target and CoDel would refuse sends on an idle server. So the
//! controller works on *queueing delay*: the sojourn minus its floor, the
//! lowest sojourn seen over the last 10 to 20 s (kept in two 10 s windows).
//! The floor is what the path costs with no queue; what comes on top of it
//! is what CoDel's target is about. (Delay-based congestion control uses
//! the minimum round-trip time the same way.)
//!
//! Everything is in integer milliseconds of the caller's monotonic clock;
//! nothing here reads a clock, so the tests drive it with simulated time.

/// Length of each of the two windows the sojourn floor is the minimum of.
pub const FLOOR_WINDOW_MS: u64 = 10_000;

/// The controller of one shard.
#[derive(Debug, Clone)]
pub struct CoDel {
    target_ms: u64,
    interval_ms: u64,
    /// When the sojourn went above target and, if it stays there, may drop
    /// (0: it is below target).
    first_above_ms: u64,
    /// Whether the sojourn has been above target for an interval.
    ok_to_drop: bool,
    dropping: bool,
    /// When the next refusal is due in the dropping state.
    drop_next_ms: u64,
    /// Refusals in this dropping state (sets the spacing).
    count: u32,
    /// `count` when the last dropping state ended.
    last_count: u32,
    /// Refusals made, and dropping states entered (for metrics).
    refusals: u64,
    episodes: u64,
    /// Lowest sojourn in the current floor window, and in the one before.
    floor_current_ms: u64,
    floor_previous_ms: u64,
    /// When the current floor window started.
    floor_window_start_ms: u64,
}

impl CoDel {
    /// A controller with `target_ms` and `interval_ms` (RFC 8289's defaults
    /// are 5 and 100). `target_ms == 0` disables it: every Send is admitted.
    pub fn new(target_ms: u64, interval_ms: u64) -> CoDel {
        CoDel {
            target_ms,
            interval_ms: interval_ms.max(1),
            first_above_ms: 0,
            ok_to_drop: false,
            dropping: false,
            drop_next_ms: 0,
            count: 0,
            last_count: 0,
            refusals: 0,
            episodes: 0,
            floor_current_ms: u64::MAX,
            floor_previous_ms: u64::MAX,
            floor_window_start_ms: 0,
        }
    }

    /// The lowest sojourn of the last 10 to 20 s, updated with `sojourn_ms`.
    fn floor(&mut self, now_ms: u64, sojourn_ms: u64) -> u64 {
        let age_ms = now_ms.saturating_sub(self.floor_window_start_ms);
        if age_ms >= 2 * FLOOR_WINDOW_MS {
            // Idle for two windows: what was seen before says nothing now.
            self.floor_previous_ms = u64::MAX;
            self.floor_current_ms = u64::MAX;
            self.floor_window_start_ms = now_ms;
        } else if age_ms >= FLOOR_WINDOW_MS {
            self.floor_previous_ms = self.floor_current_ms;
            self.floor_current_ms = u64::MAX;
            self.floor_window_start_ms = now_ms;
        }
        self.floor_current_ms = self.floor_current_ms.min(sojourn_ms);
        self.floor_current_ms.min(self.floor_previous_ms)
    }

    /// A send accepted at some earlier time was answered at `now_ms`, after
    /// `sojourn_ms` (RFC 8289 `dodequeue`, on the queueing part of it).
    /// `stored` says whether it was stored: only those set the floor, since
    /// a refusal comes back without waiting for a sync and would make every
    /// stored send look queued.
    pub fn on_sojourn(&mut self, now_ms: u64, sojourn_ms: u64, stored: bool) {
        if self.target_ms == 0 {
            return;
        }
        let floor = if stored { self.floor(now_ms, sojourn_ms) } else { self.floor(now_ms, u64::MAX) };
        let queueing_ms = sojourn_ms.saturating_sub(floor.min(sojourn_ms));
        if queueing_ms < self.target_ms {
            // Went below target: stay below for an interval before dropping again.
            self.first_above_ms = 0;
            self.ok_to_drop = false;
            self.dropping = false;
        } else if self.first_above_ms == 0 {
            // Just went above: drop only if it stays above for an interval.
            self.first_above_ms = now_ms + self.interval_ms;
        } else if now_ms >= self.first_above_ms {
            self.ok_to_drop = true;
        }
    }

    /// No send of the shard is waiting for its answer: the queue is empty
    /// (RFC 8289 leaves the dropping state then). Without this a shard that
    /// refused everything would never see another sojourn to end it.
    pub fn on_idle(&mut self) {
        self.first_above_ms = 0;
        self.ok_to_drop = false;
        self.dropping = false;
    }

    /// Whether a new Send arriving at `now_ms` may be accepted (false: refuse
    /// it with Throttle). Counts the refusal.
    pub fn admit(&mut self, now_ms: u64) -> bool {
        if self.target_ms == 0 || !self.ok_to_drop {
            return true;
        }
        if self.dropping {
            if now_ms < self.drop_next_ms {
                return true;
            }
            self.count = self.count.saturating_add(1);
            self.drop_next_ms = self.control_law(self.drop_next_ms);
        } else {
            // Enter the dropping state. If it was dropping recently, start
            // from near the drop rate that controlled the queue last time.
            self.dropping = true;
            self.episodes += 1;
            let delta = self.count.saturating_sub(self.last_count);
            let recently = now_ms.saturating_sub(self.drop_next_ms) < 16 * self.interval_ms;
            self.count = if recently && delta > 1 { delta } else { 1 };
            self.last_count = self.count;
            self.drop_next_ms = self.control_law(now_ms);
        }
        self.refusals += 1;
        false
    }

    /// `t + interval / sqrt(count)`, in integer ms.
    fn control_law(&self, t_ms: u64) -> u64 {
        let spacing = (self.interval_ms as f64 / f64::from(self.count.max(1)).sqrt()) as u64;
        t_ms + spacing.max(1)
    }

    /// Whether it is in the dropping state.
    pub fn dropping(&self) -> bool {
        self.dropping
    }

    /// Sends refused so far.
    pub fn refusals(&self) -> u64 {
        self.refusals
    }

    /// Dropping states entered so far.
    pub fn episodes(&self) -> u64 {
        self.episodes
    }

    /// How long a refused sender should wait: one interval.
    pub fn retry_after_ms(&self) -> u32 {
        u32::try_from(self.interval_ms).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller whose sojourn floor is 1 ms (an answer without queueing
    /// was seen at t = 999), so later sojourns are 1 ms of path plus queueing.
    fn controller() -> CoDel {
        let mut codel = CoDel::new(5, 100);
        codel.on_sojourn(999, 1, true);
        codel
    }

    /// Feeds a sojourn of `sojourn_ms` every ms from `from` to `to` and
    /// offers one Send every ms; returns the times of the refusals.
    fn run(codel: &mut CoDel, from: u64, to: u64, sojourn_ms: u64) -> Vec<u64> {
        let mut refused = Vec::new();
        for now in from..to {
            codel.on_sojourn(now, sojourn_ms, true);
            if !codel.admit(now) {
                refused.push(now);
            }
        }
        refused
    }

    #[test]
    fn below_target_nothing_is_refused() {
        let mut codel = controller();
        assert!(run(&mut codel, 1000, 10_000, 5).is_empty(), "4 ms of queueing on a 1 ms path");
        assert!(!codel.dropping());
    }

    #[test]
    fn above_target_for_an_interval_refusals_follow_the_control_law() {
        let mut codel = controller();
        // Above target from t=1000: first_above = 1100; dropping from then.
        let refused = run(&mut codel, 1000, 1700, 20);
        assert_eq!(refused[0], 1100, "the first refusal comes one interval after going above target");
        // Then at interval / sqrt(count): +100 (count 1), +70 (2), +57 (3), +50 (4), +44 (5) ...
        let gaps: Vec<u64> = refused.windows(2).map(|pair| pair[1] - pair[0]).collect();
        assert_eq!(&gaps[..5], &[100, 70, 57, 50, 44]);
        assert!(codel.dropping());
        // Below target: it leaves the dropping state at once.
        assert!(run(&mut codel, 1700, 1800, 1).is_empty());
        assert!(!codel.dropping());
    }

    #[test]
    fn a_quick_return_to_overload_resumes_near_the_last_drop_rate() {
        let mut codel = controller();
        let first = run(&mut codel, 1000, 2000, 20);
        let count_at_end = first.len() as u32;
        assert!(count_at_end > 5);
        run(&mut codel, 2000, 2050, 1);
        // Back above target within 16 intervals of the last drop: the count
        // resumes from count - last_count instead of 1, so the first gaps are short.
        let second = run(&mut codel, 2050, 2500, 20);
        assert_eq!(second[0], 2150);
        assert!(second[1] - second[0] < 100, "resumed spacing {} ms", second[1] - second[0]);
        assert_eq!(codel.episodes(), 2);
    }

    #[test]
    fn a_short_burst_above_target_is_absorbed() {
        let mut codel = controller();
        // 90 ms above target, then below: never an interval in a row.
        for start in (1000..5000).step_by(200) {
            assert!(run(&mut codel, start, start + 90, 50).is_empty());
            assert!(run(&mut codel, start + 90, start + 200, 1).is_empty());
        }
    }

    #[test]
    fn an_empty_queue_ends_the_dropping_state() {
        let mut codel = controller();
        assert!(!run(&mut codel, 1000, 1300, 20).is_empty());
        assert!(codel.dropping());
        codel.on_idle();
        assert!(!codel.dropping());
        assert!(codel.admit(1301), "nothing waits: admit");
    }

    #[test]
    fn a_slow_disk_is_a_floor_not_a_queue() {
        // Every answer takes 8 ms (an 8 ms fdatasync) and nothing queues.
        let mut codel = CoDel::new(5, 100);
        assert!(run(&mut codel, 0, 30_000, 8).is_empty());
        // A queue on top of it: 8 ms more for half a second is refused.
        assert!(!run(&mut codel, 30_000, 30_500, 16).is_empty());
        // The floor forgets old minimums: once the disk is slower for good
        // (12 ms), it is the new floor within two windows.
        let mut later = CoDel::new(5, 100);
        run(&mut later, 0, 1000, 2);
        let refused = run(&mut later, 1000, 40_000, 12);
        assert!(refused.iter().all(|at| *at < 1000 + 2 * FLOOR_WINDOW_MS), "still refusing at {:?}", refused.last());
    }

    #[test]
    fn fast_refusals_do_not_lower_the_floor() {
        // Stored sends take 8 ms (the sync); refusals come back in 0 ms.
        let mut codel = CoDel::new(5, 100);
        for now in 0..30_000 {
            codel.on_sojourn(now, 8, true);
            if now % 1000 == 0 {
                codel.on_sojourn(now, 0, false);
            }
            assert!(codel.admit(now), "refused at {now} on an idle server");
        }
    }

    #[test]
    fn a_zero_target_turns_it_off() {
        let mut codel = CoDel::new(0, 100);
        assert!(run(&mut codel, 0, 5000, 1000).is_empty());
    }
}
