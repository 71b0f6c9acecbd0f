//! When each device was last seen, as the log keeps it: the clock of the
//! inactivity expiry (and, later, of "last seen"), so that a restart neither
//! resets it nor, in a crash loop, stops it.
//!
//! A `DeviceSeen` record is appended when a session of a device starts
//! (`online`) and when its last session ends. Nobody waits for it: it rides
//! in the next write chunk. A failed chunk's records are appended again with
//! the current value, so the durable value never falls behind the last one
//! that reached the disk. Compaction carries the newest record of a device
//! forward like its other state ([`super::state_homes`]).
//!
//! After a restart a device is idle since its last session ended or, if
//! the log says it was online (the process died under its session), since
//! the newest time any recovered record carries: the last moment the shard
//! is known to have been up. That can be earlier than the real end of the
//! session by however long the shard wrote nothing before it died.

use crate::shard::mailbox::Ticket;
use crate::shard::DeviceKey;
use std::collections::VecDeque;

/// One device's newest last-seen record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Seconds since the Unix epoch.
    pub at_s: u64,
    /// Whether a session had just started then.
    pub online: bool,
}

/// See the module documentation. About 40 bytes per registered device.
#[derive(Debug, Default)]
pub struct LastSeen {
    seen: std::collections::HashMap<DeviceKey, Seen, foldhash::fast::RandomState>,
    /// Records not yet durable: (ticket, device), in ticket order. Bounded
    /// by the records waiting for the writer.
    pending: VecDeque<(Ticket, DeviceKey)>,
    /// The newest time any recovered record carries (s since the epoch).
    newest_recovered_s: u64,
}

impl LastSeen {
    /// `device` was seen at `at_s`; returns whether a record is due (the
    /// time never goes backwards).
    pub fn note(&mut self, device: DeviceKey, at_s: u64, online: bool) -> bool {
        let entry = self.seen.entry(device).or_insert(Seen { at_s, online });
        if at_s < entry.at_s {
            return false;
        }
        *entry = Seen { at_s, online };
        true
    }

    /// A record of `device` with `ticket` was appended.
    pub fn appended(&mut self, ticket: Ticket, device: DeviceKey) {
        self.pending.push_back((ticket, device));
    }

    /// The chunk ending at `last_ticket` is durable.
    pub fn on_durable(&mut self, last_ticket: Ticket) {
        while self.pending.front().is_some_and(|(ticket, _)| *ticket <= last_ticket) {
            self.pending.pop_front();
        }
    }

    /// Takes the devices whose records are in `first..=last` (a failed
    /// chunk, and the chunks behind it), once each, to be written again.
    pub fn take_failed(&mut self, first: Ticket, last: Ticket) -> Vec<DeviceKey> {
        let mut devices = Vec::new();
        self.pending.retain(|(ticket, device)| {
            let failed = (first..=last).contains(ticket);
            if failed && !devices.contains(device) {
                devices.push(*device);
            }
            !failed
        });
        devices
    }

    /// The newest value for `device`.
    pub fn get(&self, device: DeviceKey) -> Option<Seen> {
        self.seen.get(&device).copied()
    }

    /// `device` is gone: its time no longer matters.
    pub fn forget(&mut self, device: DeviceKey) {
        self.seen.remove(&device);
    }

    /// Recovery read a record carrying `at_s`.
    pub fn recovered_time(&mut self, at_s: u64) {
        self.newest_recovered_s = self.newest_recovered_s.max(at_s);
    }

    /// Recovery read `device`'s record (later records replace earlier ones:
    /// compaction copies carry the newest value further on).
    pub fn recovered(&mut self, device: DeviceKey, seen: Seen) {
        self.recovered_time(seen.at_s);
        self.seen.insert(device, seen);
    }

    /// Devices with a time, for dropping those that recovery found removed
    /// or never registered.
    pub fn devices(&self) -> Vec<DeviceKey> {
        self.seen.keys().copied().collect()
    }

    /// Since when `device` has been idle as far as the log knows.
    pub fn idle_since(&self, device: DeviceKey) -> Option<u64> {
        let seen = self.seen.get(&device)?;
        Some(if seen.online { self.newest_recovered_s.max(seen.at_s) } else { seen.at_s })
    }
}
