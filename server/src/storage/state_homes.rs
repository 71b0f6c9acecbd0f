//! Where each device's durable state lives in the log, so that a segment is
//! deleted only once no device depends on it (incremental checkpointing).
//!
//! A device's state is four facts: its highest assigned seq (with the fact
//! that it is registered), its acknowledged seq, when it was last seen,
//! and, for a removed device, that it was removed. Each fact is durable in
//! the newest record that carries its current value: a `DeviceRegistered`,
//! a `MessageStored` (or a compaction's `MessageCopied`) naming the device,
//! an `Acknowledged`, a `DeviceState`,
//! a `DeviceSeen` or a `DeviceRemoved`. The
//! *home* of a fact is the segment of that record. A segment that is the
//! home of some fact must outlive it; compaction moves the facts of a
//! mostly dead segment forward by writing a `DeviceState` (or
//! `DeviceRemoved`) for each of its devices, after which the segment holds
//! none and can go. The cost is proportional to the devices whose state sits
//! in the segment being freed, never to all devices (the full checkpoint at
//! every rotation that this replaces cost O(devices) each time).
//!
//! A fact moves only once its new record is durable: moves wait here with
//! the record's ticket and are applied or dropped with the chunk's outcome.

use crate::shard::mailbox::Ticket;
use crate::shard::DeviceKey;
use std::collections::{BTreeMap, VecDeque};

/// Which facts a record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    /// The highest seq (and registration).
    Seqs,
    /// The acknowledged seq.
    Acked,
    /// Both (a `DeviceState`).
    Both,
    /// When it was last seen (a `DeviceSeen`).
    Seen,
    /// The device's removal (its other facts no longer matter).
    Removed,
}

/// The homes of one device's facts (segment numbers; 0 for none).
#[derive(Debug, Default, Clone, Copy)]
struct Homes {
    seqs: u64,
    acked: u64,
    seen: u64,
    removed: u64,
}

impl Homes {
    fn references(&self, segment: u64) -> bool {
        segment != 0 && self.all().contains(&segment)
    }

    fn all(&self) -> [u64; 4] {
        [self.seqs, self.acked, self.seen, self.removed]
    }
}

type DeviceSet = hashbrown::HashSet<DeviceKey, foldhash::fast::RandomState>;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct StateHomes {
    /// Per device, the homes of its facts.
    homes: hashbrown::HashMap<DeviceKey, Homes, foldhash::fast::RandomState>,
    /// Per segment, the devices with a fact there. About 30 bytes a device.
    by_segment: BTreeMap<u64, DeviceSet>,
    /// Moves waiting for their record: (ticket, device, kind, segment), in
    /// ticket order. Bounded by the records waiting for the writer.
    pending: VecDeque<(Ticket, DeviceKey, StateKind, u64)>,
}

impl StateHomes {
    /// Moves `kind` of `device` to `segment` now (recovery: the record is on disk).
    pub fn set(&mut self, device: DeviceKey, kind: StateKind, segment: u64) {
        let before = self.homes.get(&device).copied().unwrap_or_default();
        let mut after = before;
        match kind {
            // A seq or ack fact means the device lives (again): a removal
            // home left from before its id was forgotten no longer counts.
            StateKind::Seqs => {
                after.seqs = segment;
                after.removed = 0;
            }
            StateKind::Acked => {
                after.acked = segment;
                after.removed = 0;
            }
            StateKind::Both => {
                after.seqs = segment;
                after.acked = segment;
                after.removed = 0;
            }
            StateKind::Seen => after.seen = segment,
            StateKind::Removed => after = Homes { seqs: 0, acked: 0, seen: 0, removed: segment },
        }
        self.homes.insert(device, after);
        for old in before.all() {
            if old != 0 && !after.references(old) {
                self.leave(old, device);
            }
        }
        self.by_segment.entry(segment).or_default().insert(device);
    }

    /// Forgets `device` entirely (a removed device no longer remembered).
    pub fn forget(&mut self, device: DeviceKey) {
        if let Some(homes) = self.homes.remove(&device) {
            for old in homes.all() {
                if old != 0 {
                    self.leave(old, device);
                }
            }
        }
        self.pending.retain(|(_, pending, _, _)| *pending != device);
    }

    fn leave(&mut self, segment: u64, device: DeviceKey) {
        if let Some(devices) = self.by_segment.get_mut(&segment) {
            devices.remove(&device);
            if devices.is_empty() {
                self.by_segment.remove(&segment);
            }
        }
    }

    /// Moves `kind` of `device` to `segment` once the record with `ticket` is durable.
    pub fn move_when_durable(&mut self, ticket: Ticket, device: DeviceKey, kind: StateKind, segment: u64) {
        debug_assert!(self.pending.back().is_none_or(|(last, ..)| *last <= ticket), "moves come in ticket order");
        self.pending.push_back((ticket, device, kind, segment));
    }

    /// The chunk ending at `last_ticket` is durable: its moves apply.
    pub fn on_durable(&mut self, last_ticket: Ticket) {
        while self.pending.front().is_some_and(|(ticket, ..)| *ticket <= last_ticket) {
            if let Some((_, device, kind, segment)) = self.pending.pop_front() {
                self.set(device, kind, segment);
            }
        }
    }

    /// The chunk ending at `last_ticket` failed: its moves are dropped (the
    /// facts stay where they were durable).
    pub fn on_failed(&mut self, last_ticket: Ticket) {
        while self.pending.front().is_some_and(|(ticket, ..)| *ticket <= last_ticket) {
            self.pending.pop_front();
        }
    }

    /// Whether some device has a fact in `segment`.
    pub fn holds(&self, segment: u64) -> bool {
        self.by_segment.contains_key(&segment)
    }

    /// Devices with a fact in `segment`.
    pub fn devices_in(&self, segment: u64) -> Vec<DeviceKey> {
        let mut devices: Vec<DeviceKey> =
            self.by_segment.get(&segment).map(|devices| devices.iter().copied().collect()).unwrap_or_default();
        // A fixed order (the set's is seeded per process): the records a
        // compaction writes must not depend on it.
        devices.sort_unstable();
        devices
    }

    /// How many devices have a fact in `segment`.
    pub fn count_in(&self, segment: u64) -> usize {
        self.by_segment.get(&segment).map_or(0, hashbrown::HashSet::len)
    }

    /// Forgets where `device`'s last-seen time lives (it no longer matters).
    pub fn forget_seen(&mut self, device: DeviceKey) {
        let Some(homes) = self.homes.get_mut(&device) else { return };
        let old = std::mem::take(&mut homes.seen);
        let still = homes.references(old);
        if homes.all() == [0; 4] {
            self.homes.remove(&device);
        }
        if old != 0 && !still {
            self.leave(old, device);
        }
    }

    /// Whether `device`'s seqs or acked seq live in `segment`.
    pub fn state_in(&self, device: DeviceKey, segment: u64) -> bool {
        self.homes.get(&device).is_some_and(|homes| homes.seqs == segment || homes.acked == segment)
    }

    /// Whether `device`'s last-seen time lives in `segment`.
    pub fn seen_in(&self, device: DeviceKey, segment: u64) -> bool {
        self.homes.get(&device).is_some_and(|homes| homes.seen == segment)
    }

    /// Whether `device`'s removal is what it keeps in the log.
    pub fn is_removal(&self, device: DeviceKey) -> bool {
        self.homes.get(&device).is_some_and(|homes| homes.removed != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: DeviceKey = DeviceKey { user: 1, device: 1 };

    #[test]
    fn a_segment_is_held_until_every_fact_of_it_moved_and_only_durable_moves_count() {
        let mut homes = StateHomes::default();
        homes.set(D, StateKind::Both, 1);
        homes.move_when_durable(5, D, StateKind::Seqs, 2);
        assert!(homes.holds(1), "a pending move does not count");
        homes.on_durable(5);
        assert!(homes.holds(1), "the acked seq still lives in segment 1");
        homes.move_when_durable(6, D, StateKind::Acked, 3);
        homes.on_failed(6);
        assert!(homes.holds(1), "a failed move leaves the fact where it was");
        homes.move_when_durable(7, D, StateKind::Acked, 3);
        homes.on_durable(7);
        assert!(!homes.holds(1) && homes.holds(2) && homes.holds(3));
        homes.set(D, StateKind::Removed, 4);
        assert_eq!((homes.holds(2), homes.holds(3), homes.count_in(4)), (false, false, 1));
        homes.forget(D);
        assert!(!homes.holds(4));
    }

    #[test]
    fn the_last_seen_time_holds_its_segment_on_its_own() {
        let mut homes = StateHomes::default();
        homes.set(D, StateKind::Both, 1);
        homes.set(D, StateKind::Seen, 2);
        homes.set(D, StateKind::Both, 3);
        assert!(!homes.holds(1) && homes.holds(2), "seen stays where it was written");
        assert!(homes.seen_in(D, 2) && !homes.state_in(D, 2) && homes.state_in(D, 3));
        homes.set(D, StateKind::Seen, 3);
        assert!(!homes.holds(2));
        homes.forget_seen(D);
        assert!(homes.holds(3), "its seqs are still there");
        homes.set(D, StateKind::Seen, 4);
        homes.set(D, StateKind::Removed, 5);
        assert!(!homes.holds(4) && !homes.holds(3), "a removal is all that matters then");
    }
}
