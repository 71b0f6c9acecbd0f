//! The sender-side dedup windows over client_msg_ids.
//!
//! A device retries a Send with the same client_msg_id until it sees the Ack.
//! Each device's window remembers every pending id (bounded by
//! `sends_in_flight_per_device_max`, enforced by the caller) and its last
//! `dedup_entries_per_device_max` acknowledged ids with their server_msg_id,
//! so a retry is answered with the original Ack instead of being stored
//! twice. [`SenderWindows`] keeps all of a shard's windows within
//! `sender_dedup_entries_max` acknowledged ids: past it, the acknowledged
//! ids of the device that sent least recently are forgotten first (a
//! retry of one of them still meets the recipient shard's stored-message
//! index). A device flooding sends holds at most its own window, so it
//! cannot push other devices' recent ids out.
//! Memory: about 40 bytes per remembered id (map entry plus order queue),
//! plus 24 bytes per recency mark.

use super::messages::DeviceKey;
use super::StateMap;
use std::collections::VecDeque;

/// What the window knows of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Never seen, or forgotten: process it.
    New,
    /// Accepted and not yet confirmed: the Ack will follow, do nothing.
    Pending,
    /// Already stored under this server_msg_id: answer with the same Ack.
    Acknowledged(u64),
}

/// Recent ids of one sending device.
#[derive(Debug, Default)]
pub struct DedupWindow {
    /// State per remembered id.
    entries: StateMap<u64, Seen>,
    /// Acknowledged ids, oldest first, for eviction.
    acknowledged_order: VecDeque<u64>,
    /// Pending ids (not in `acknowledged_order`).
    pending: u32,
}

impl DedupWindow {
    /// What is known of `client_msg_id`.
    pub fn check(&self, client_msg_id: u64) -> Seen {
        self.entries.get(&client_msg_id).copied().unwrap_or(Seen::New)
    }

    /// Ids accepted and not yet answered.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Marks a new id as pending.
    pub fn begin(&mut self, client_msg_id: u64) {
        let previous = self.entries.insert(client_msg_id, Seen::Pending);
        assert_eq!(previous, None, "begin() on an id the window already holds");
        self.pending += 1;
    }

    /// Records the outcome of a pending id: remembered when stored, forgotten
    /// when refused (so a retry is processed again).
    pub fn finish(&mut self, client_msg_id: u64, server_msg_id: Option<u64>, acknowledged_max: usize) {
        if self.entries.get(&client_msg_id) != Some(&Seen::Pending) {
            // Not pending: an answer for an id this window no longer tracks
            // (cannot happen while answers follow requests; ignored to be safe).
            return;
        }
        self.pending -= 1;
        match server_msg_id {
            Some(id) => {
                self.entries.insert(client_msg_id, Seen::Acknowledged(id));
                self.acknowledged_order.push_back(client_msg_id);
                while self.acknowledged_order.len() > acknowledged_max {
                    if let Some(oldest) = self.acknowledged_order.pop_front() {
                        self.entries.remove(&oldest);
                    }
                }
            }
            None => {
                self.entries.remove(&client_msg_id);
            }
        }
        debug_assert!(self.acknowledged_order.len() <= acknowledged_max);
    }

    /// Whether the window holds nothing (may be dropped).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Acknowledged ids remembered.
    pub fn acknowledged(&self) -> usize {
        self.acknowledged_order.len()
    }

    /// Forgets every acknowledged id (pending ones stay); returns how many.
    pub fn forget_acknowledged(&mut self) -> usize {
        let count = self.acknowledged_order.len();
        for id in self.acknowledged_order.drain(..) {
            self.entries.remove(&id);
        }
        count
    }
}

/// A device's window and when it last sent (a tick of [`SenderWindows`]).
#[derive(Debug, Default)]
struct Tracked {
    window: DedupWindow,
    touched: u64,
}

/// Every sending device's window on one shard, within a shard-wide budget
/// of acknowledged ids (see the module documentation).
#[derive(Debug)]
pub struct SenderWindows {
    windows: StateMap<DeviceKey, Tracked>,
    /// (device, tick) each time a device sent, oldest first; a mark whose
    /// tick is not the device's latest is stale and skipped.
    recency: VecDeque<(DeviceKey, u64)>,
    tick: u64,
    /// Acknowledged ids held by all windows together.
    acknowledged: usize,
    per_device_max: usize,
    shard_max: usize,
    /// Pending ids of all windows together, and the windows holding any.
    pending_total: u64,
    pending_devices: u64,
}

impl SenderWindows {
    /// Windows of `per_device_max` acknowledged ids each, `shard_max` in all.
    pub fn new(per_device_max: u32, shard_max: u32) -> SenderWindows {
        SenderWindows {
            windows: StateMap::default(),
            recency: VecDeque::new(),
            tick: 0,
            acknowledged: 0,
            per_device_max: per_device_max as usize,
            shard_max: shard_max as usize,
            pending_total: 0,
            pending_devices: 0,
        }
    }

    /// Pending ids of every device together, and how many devices have any.
    pub fn pending_totals(&self) -> (u64, u64) {
        (self.pending_total, self.pending_devices)
    }

    /// Moves the pending totals by one window's change from `before` to `after`.
    fn count_pending(&mut self, before: u32, after: u32) {
        self.pending_total = self.pending_total + u64::from(after) - u64::from(before);
        match (before, after) {
            (0, 1..) => self.pending_devices += 1,
            (1.., 0) => self.pending_devices -= 1,
            _ => {}
        }
    }

    /// What `device`'s window knows of `client_msg_id`.
    pub fn check(&self, device: DeviceKey, client_msg_id: u64) -> Seen {
        self.windows.get(&device).map_or(Seen::New, |tracked| tracked.window.check(client_msg_id))
    }

    /// `device`'s ids accepted and not yet answered.
    pub fn pending(&self, device: DeviceKey) -> u32 {
        self.windows.get(&device).map_or(0, |tracked| tracked.window.pending())
    }

    /// Marks a new id of `device` as pending.
    pub fn begin(&mut self, device: DeviceKey, client_msg_id: u64) {
        let window = &mut self.windows.entry(device).or_default().window;
        let before = window.pending();
        window.begin(client_msg_id);
        let after = window.pending();
        self.count_pending(before, after);
        self.touch(device);
    }

    /// Marks `device` as the one that sent most recently.
    fn touch(&mut self, device: DeviceKey) {
        let Some(tracked) = self.windows.get_mut(&device) else { return };
        self.tick += 1;
        tracked.touched = self.tick;
        self.recency.push_back((device, self.tick));
        self.compact_recency();
    }

    /// Records the outcome of a pending id (see [`DedupWindow::finish`]),
    /// then keeps the shard within its budget.
    pub fn finish(&mut self, device: DeviceKey, client_msg_id: u64, server_msg_id: Option<u64>) {
        let Some(tracked) = self.windows.get_mut(&device) else { return };
        let before = tracked.window.acknowledged();
        let pending_before = tracked.window.pending();
        tracked.window.finish(client_msg_id, server_msg_id, self.per_device_max);
        self.acknowledged = self.acknowledged + tracked.window.acknowledged() - before;
        let pending_after = tracked.window.pending();
        self.count_pending(pending_before, pending_after);
        let Some(tracked) = self.windows.get_mut(&device) else { return };
        if tracked.window.is_empty() {
            self.windows.remove(&device);
        } else {
            self.touch(device);
        }
        // Ends: each turn drops a stale mark, or forgets a window's
        // acknowledged ids, or requeues one that holds only pending ids
        // (while the count is over budget, some window holds acknowledged ids).
        while self.acknowledged > self.shard_max {
            let Some((oldest, tick)) = self.recency.pop_front() else { break };
            let Some(tracked) = self.windows.get_mut(&oldest) else { continue };
            if tracked.touched != tick {
                continue; // it sent again later: a newer mark stands for it
            }
            self.acknowledged -= tracked.window.forget_acknowledged();
            if tracked.window.is_empty() {
                self.windows.remove(&oldest);
            } else {
                // Pending ids remain (their answers will touch it again).
                self.recency.push_back((oldest, tick));
            }
        }
    }

    /// Forgets `device` entirely (it was removed).
    pub fn forget(&mut self, device: DeviceKey) {
        if let Some(tracked) = self.windows.remove(&device) {
            self.acknowledged -= tracked.window.acknowledged();
            self.count_pending(tracked.window.pending(), 0);
        }
    }

    /// Acknowledged ids held by all windows together.
    pub fn acknowledged(&self) -> usize {
        self.acknowledged
    }

    /// Drops stale recency marks once they outnumber the live ones, so the
    /// queue stays within twice the tracked devices (amortised O(1)).
    fn compact_recency(&mut self) {
        if self.recency.len() > 2 * self.windows.len() + 64 {
            let windows = &self.windows;
            self.recency.retain(|(device, tick)| windows.get(device).is_some_and(|tracked| tracked.touched == *tick));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_answers_retries_and_forgets_the_oldest() {
        let mut window = DedupWindow::default();
        window.begin(1);
        assert_eq!(window.check(1), Seen::Pending);
        window.finish(1, Some(100), 2);
        assert_eq!(window.check(1), Seen::Acknowledged(100));
        window.begin(2);
        window.finish(2, None, 2);
        assert_eq!(window.check(2), Seen::New, "a refused id may be retried");
        window.begin(3);
        window.finish(3, Some(300), 2);
        window.begin(4);
        window.finish(4, Some(400), 2);
        assert_eq!(window.check(1), Seen::New, "oldest acknowledged id forgotten");
        assert_eq!(window.check(4), Seen::Acknowledged(400));
        assert_eq!(window.pending(), 0);
    }

    #[test]
    fn the_shard_budget_forgets_the_least_recent_sender_first() {
        let device = |n: u32| DeviceKey { user: u64::from(n), device: 1 };
        let mut windows = SenderWindows::new(4, 6);
        let mut next_id = 0;
        let mut send = |windows: &mut SenderWindows, n: u32| {
            next_id += 1;
            windows.begin(device(n), next_id);
            windows.finish(device(n), next_id, Some(1000 + next_id));
            next_id
        };
        let quiet = send(&mut windows, 1);
        let (first_of_2, first_of_3) = (send(&mut windows, 2), send(&mut windows, 3));
        // Device 4 floods: it keeps its own 4 newest ids and never evicts
        // more than the budget needs.
        let flood: Vec<u64> = (0..20).map(|_| send(&mut windows, 4)).collect();
        assert_eq!(windows.acknowledged(), 6);
        assert_eq!(windows.check(device(4), flood[19]), Seen::Acknowledged(1000 + flood[19]));
        assert_eq!(windows.check(device(4), flood[15]), Seen::New);
        assert_eq!(windows.check(device(1), quiet), Seen::New, "least recent sender forgotten first");
        assert_eq!(windows.check(device(2), first_of_2), Seen::Acknowledged(1000 + first_of_2));
        assert_eq!(windows.check(device(3), first_of_3), Seen::Acknowledged(1000 + first_of_3));
        // A device with a send in flight keeps its pending id through eviction.
        windows.begin(device(2), 99);
        for _ in 0..10 {
            send(&mut windows, 4);
            send(&mut windows, 3);
        }
        assert_eq!(windows.check(device(2), 99), Seen::Pending);
        assert_eq!(windows.check(device(2), first_of_2), Seen::New);
        assert!(windows.acknowledged() <= 6);
        windows.finish(device(2), 99, Some(7));
        assert!(windows.acknowledged() <= 6);
        assert!(windows.recency.len() <= 2 * windows.windows.len() + 64);
    }
}
