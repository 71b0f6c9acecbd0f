//! The per-device dedup window over client_msg_ids.
//!
//! A device retries a Send with the same client_msg_id until it sees the Ack.
//! The window remembers every pending id (bounded by
//! `sends_in_flight_per_device_max`, enforced by the caller) and the last
//! `acknowledged_max` acknowledged ids with their server_msg_id, so a retry
//! is answered with the original Ack instead of being stored twice.
//! Memory: about 40 bytes per remembered id (map entry plus order queue).

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
}
