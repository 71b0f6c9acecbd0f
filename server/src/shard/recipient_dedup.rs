//! The recipient-side dedup index: which (sender device, `client_msg_id`)
//! this shard stored, as which `server_msg_id`, in which change (ticket), for
//! the last `capacity` stored messages. A sender that lost its Ack to a crash
//! or reconnect retries with the same id; the shard that stored it answers
//! with the original id instead of storing it twice.
//!
//! Layout: a FIFO ring of entries (appended and expired in order, so those
//! accesses are sequential) and a hash table of 4-byte ring positions. The
//! table is the only randomly accessed part: at the default 262,144 entries it
//! is ~2.5 MB against ~21 MB for a map holding keys and values inline, and
//! with a map this insert-and-expire was the largest single cost of the
//! message path (22% of server CPU with 10 connections x 16 in flight, most
//! of it cache misses; docs/performance.md, "Profiles"). A lookup reads a
//! ring entry only when the table's 7-bit tag matches.

use super::mailbox::Ticket;
use super::messages::DeviceKey;
use std::collections::VecDeque;
use std::hash::BuildHasher;

/// One stored message's dedup record.
#[derive(Debug, Clone, Copy)]
struct Entry {
    sender: DeviceKey,
    client_msg_id: u64,
    server_msg_id: u64,
    ticket: Ticket,
}

/// See the module documentation.
#[derive(Debug)]
pub struct RecipientDedup {
    /// Seeded per process: `client_msg_id` is chosen by clients.
    hasher: foldhash::fast::RandomState,
    /// Ring positions (wrapping sequence numbers) by key hash.
    table: hashbrown::HashTable<u32>,
    /// Entries, oldest first; `None` where a failed write removed one.
    ring: VecDeque<Option<Entry>>,
    /// Sequence number of `ring[0]`.
    first: u32,
    /// Most entries (and removed slots) kept.
    capacity: usize,
}

impl RecipientDedup {
    /// An empty index keeping the last `capacity` entries (at least 1).
    pub fn new(capacity: u32) -> RecipientDedup {
        RecipientDedup {
            hasher: foldhash::fast::RandomState::default(),
            table: hashbrown::HashTable::new(),
            ring: VecDeque::new(),
            first: 0,
            capacity: capacity.max(1) as usize,
        }
    }

    fn hash(&self, sender: DeviceKey, client_msg_id: u64) -> u64 {
        self.hasher.hash_one((sender.user, sender.device, client_msg_id))
    }

    /// The entry at sequence number `seq`, if it is still kept.
    fn entry(ring: &VecDeque<Option<Entry>>, first: u32, seq: u32) -> Option<&Entry> {
        ring.get(seq.wrapping_sub(first) as usize)?.as_ref()
    }

    /// If `sender`'s `client_msg_id` is kept: its server_msg_id and ticket.
    pub fn find(&self, sender: DeviceKey, client_msg_id: u64) -> Option<(u64, Ticket)> {
        let (ring, first) = (&self.ring, self.first);
        let seq = self.table.find(self.hash(sender, client_msg_id), |&seq| {
            Self::entry(ring, first, seq).is_some_and(|e| e.sender == sender && e.client_msg_id == client_msg_id)
        })?;
        Self::entry(ring, first, *seq).map(|e| (e.server_msg_id, e.ticket))
    }

    /// Records (or updates) `sender`'s `client_msg_id`; expires the oldest
    /// entries beyond the capacity.
    pub fn remember(&mut self, sender: DeviceKey, client_msg_id: u64, server_msg_id: u64, ticket: Ticket) {
        let hash = self.hash(sender, client_msg_id);
        let (ring, first) = (&mut self.ring, self.first);
        let existing = self.table.find(hash, |&seq| {
            Self::entry(ring, first, seq).is_some_and(|e| e.sender == sender && e.client_msg_id == client_msg_id)
        });
        if let Some(&seq) = existing {
            if ticket == 0 {
                // Recovery meeting a key again (a record written twice, or
                // a copy in a directory from before `MessageCopied`): same
                // place in the window.
                if let Some(Some(entry)) = ring.get_mut(seq.wrapping_sub(first) as usize) {
                    entry.server_msg_id = server_msg_id;
                    entry.ticket = ticket;
                }
                return;
            }
            // Re-appended rather than updated in place, so nonzero tickets
            // keep growing along the ring (`forget_tickets` relies on it).
            if let Ok(found) = self.table.find_entry(hash, |&candidate| candidate == seq) {
                found.remove();
            }
            if let Some(slot) = self.ring.get_mut(seq.wrapping_sub(self.first) as usize) {
                *slot = None;
            }
        }
        let (ring, first) = (&mut self.ring, self.first);
        let seq = first.wrapping_add(ring.len() as u32);
        ring.push_back(Some(Entry { sender, client_msg_id, server_msg_id, ticket }));
        let hasher = &self.hasher;
        self.table.insert_unique(hash, seq, |&seq| {
            let entry = Self::entry(ring, first, seq).expect("every position in the table is a kept entry");
            hasher.hash_one((entry.sender.user, entry.sender.device, entry.client_msg_id))
        });
        while self.ring.len() > self.capacity {
            self.expire_oldest();
        }
    }

    fn expire_oldest(&mut self) {
        let Some(oldest) = self.ring.pop_front() else { return };
        let seq = self.first;
        self.first = self.first.wrapping_add(1);
        if let Some(entry) = oldest {
            let hash = self.hash(entry.sender, entry.client_msg_id);
            if let Ok(found) = self.table.find_entry(hash, |&candidate| candidate == seq) {
                found.remove();
            }
        }
    }

    /// Forgets every entry whose ticket is in `first..=last` (a write that
    /// failed: those messages were not stored, so a retry must store them).
    /// Walks back from the newest entry only as far as that range: nonzero
    /// tickets grow along the ring (`remember` re-appends an updated key),
    /// and ticket 0 (recovered, or copied by compaction) is never in a range.
    pub fn forget_tickets(&mut self, first: Ticket, last: Ticket) {
        for offset in (0..self.ring.len()).rev() {
            let Some(entry) = self.ring[offset] else { continue };
            if entry.ticket == 0 || entry.ticket > last {
                continue;
            }
            if entry.ticket < first {
                break;
            }
            let seq = self.first.wrapping_add(offset as u32);
            let hash = self.hasher.hash_one((entry.sender.user, entry.sender.device, entry.client_msg_id));
            if let Ok(found) = self.table.find_entry(hash, |&candidate| candidate == seq) {
                found.remove();
            }
            self.ring[offset] = None;
        }
        while self.ring.back().is_some_and(Option::is_none) {
            self.ring.pop_back();
        }
        while self.ring.front().is_some_and(Option::is_none) {
            self.ring.pop_front();
            self.first = self.first.wrapping_add(1);
        }
    }

    /// Entries kept.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(user: u64) -> DeviceKey {
        DeviceKey { user, device: 1 }
    }

    #[test]
    fn finds_what_it_remembers_and_expires_the_oldest_first() {
        let mut index = RecipientDedup::new(3);
        for id in 1..=3 {
            index.remember(device(7), id, 100 + id, id);
        }
        assert_eq!(index.find(device(7), 2), Some((102, 2)));
        assert_eq!(index.find(device(8), 2), None, "another sender's id is another key");
        index.remember(device(7), 4, 104, 4);
        assert_eq!(index.find(device(7), 1), None, "the oldest expired");
        assert_eq!(index.find(device(7), 4), Some((104, 4)));
        assert_eq!(index.len(), 3);
    }

    #[test]
    fn remembering_an_id_again_updates_it() {
        let mut index = RecipientDedup::new(2);
        index.remember(device(1), 5, 500, 1);
        index.remember(device(1), 5, 501, 2);
        index.remember(device(1), 6, 600, 3);
        assert_eq!(index.find(device(1), 5), Some((501, 2)), "updated, and not expired by the second entry");
        // Ticket 0 (recovery) updates in place: 5 stays the oldest.
        index.remember(device(1), 6, 601, 0);
        index.remember(device(1), 5, 502, 0);
        index.remember(device(1), 7, 700, 4);
        assert_eq!(index.find(device(1), 5), None, "the oldest key expired");
        assert_eq!(index.find(device(1), 6), Some((601, 0)));
    }

    #[test]
    fn forgetting_a_failed_range_walks_back_only_over_newer_entries() {
        let mut index = RecipientDedup::new(1000);
        for id in 1..=900 {
            index.remember(device(1), id, id * 10, id);
        }
        // A recovered entry (ticket 0) among the newest entries.
        index.remember(device(2), 1, 5, 0);
        index.remember(device(1), 901, 9010, 901);
        index.forget_tickets(899, 900);
        let kept: Vec<u64> = (897..=901).filter(|id| index.find(device(1), *id).is_some()).collect();
        assert_eq!(kept, vec![897, 898, 901]);
        assert_eq!(index.find(device(2), 1), Some((5, 0)));
        // A re-remembered key moved to the back with its new ticket.
        index.remember(device(1), 3, 31, 902);
        index.forget_tickets(902, 902);
        assert_eq!(index.find(device(1), 3), None);
        assert_eq!(index.find(device(1), 4), Some((40, 4)));
    }

    #[test]
    fn forgotten_tickets_can_be_stored_again() {
        let mut index = RecipientDedup::new(10);
        for id in 1..=6 {
            index.remember(device(1), id, id * 10, id);
        }
        index.forget_tickets(1, 2);
        index.forget_tickets(5, 5);
        let kept: Vec<u64> = (1..=6).filter(|id| index.find(device(1), *id).is_some()).collect();
        assert_eq!(kept, vec![3, 4, 6]);
        index.remember(device(1), 5, 55, 7);
        assert_eq!(index.find(device(1), 5), Some((55, 7)));
        assert_eq!(index.len(), 4);
    }

    #[test]
    fn matches_a_plain_map_over_many_operations_and_sequence_wraparound() {
        // A model check against std's map with a FIFO, starting near the
        // u32 wrap of the ring positions.
        let mut index = RecipientDedup::new(64);
        index.first = u32::MAX - 500;
        let mut model: std::collections::HashMap<(u64, u64), (u64, Ticket)> = Default::default();
        let mut order: VecDeque<Option<(u64, u64)>> = VecDeque::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for ticket in 1..5_000u64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let (user, id) = (state % 5, (state >> 8) % 200);
            index.remember(device(user), id, ticket * 3, ticket);
            // A key remembered again moves to the newest end, leaving a
            // hole that counts against the capacity until it expires.
            if model.insert((user, id), (ticket * 3, ticket)).is_some() {
                for slot in order.iter_mut() {
                    if *slot == Some((user, id)) {
                        *slot = None;
                    }
                }
            }
            order.push_back(Some((user, id)));
            while order.len() > 64 {
                if let Some(oldest) = order.pop_front().unwrap() {
                    model.remove(&oldest);
                }
            }
            let probe = ((state >> 20) % 5, (state >> 24) % 200);
            assert_eq!(index.find(device(probe.0), probe.1), model.get(&probe).copied(), "at ticket {ticket}");
        }
        assert_eq!(index.len(), model.len());
    }
}
