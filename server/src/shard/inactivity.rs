//! Which offline devices have been away longest, so that a device unused for
//! `limits.device_inactive_expiry_s` is removed (as messengers unlink a
//! companion device after about 30 days) without scanning every device.
//!
//! A device is *idle* from the moment its last session ends. The store logs
//! that moment (`MailboxStore::note_seen`), so a device recovered after a
//! restart is idle since the log last saw it (`storage::last_seen`); one
//! the log has no time for (a log of an earlier build) counts from the
//! first check after the start. An online device is never idle.

use super::messages::DeviceKey;
use super::StateMap;
use std::collections::BTreeSet;

/// How often the idle set is examined, in seconds.
pub const CHECK_INTERVAL_S: u64 = 60;
/// Devices removed per check at most, so one check never stalls the shard;
/// the rest wait for the next check.
pub const EXPIRIES_PER_CHECK_MAX: usize = 1024;

/// See the module documentation.
#[derive(Debug)]
pub struct Inactivity {
    /// Idle time after which a device is removed; 0 never removes.
    expiry_s: u64,
    /// Idle devices and since when (s since the epoch).
    idle: StateMap<DeviceKey, u64>,
    /// The same, oldest first.
    order: BTreeSet<(u64, DeviceKey)>,
    /// When the next check is due; 0 before the first (which seeds the
    /// recovered devices).
    next_check_s: u64,
}

impl Inactivity {
    /// Removes devices idle for `expiry_s` (0: never).
    pub fn new(expiry_s: u64) -> Inactivity {
        Inactivity { expiry_s, idle: StateMap::default(), order: BTreeSet::new(), next_check_s: 0 }
    }

    /// `device` has a session now.
    pub fn online(&mut self, device: DeviceKey) {
        if let Some(since) = self.idle.remove(&device) {
            self.order.remove(&(since, device));
        }
    }

    /// `device`'s last session ended at `now_s`.
    pub fn offline(&mut self, device: DeviceKey, now_s: u64) {
        if self.expiry_s == 0 {
            return;
        }
        self.online(device);
        self.idle.insert(device, now_s);
        self.order.insert((now_s, device));
    }

    /// `device` is gone (removed).
    pub fn forget(&mut self, device: DeviceKey) {
        self.online(device);
    }

    /// Whether a check is due at `now_s` (at most every [`CHECK_INTERVAL_S`]).
    pub fn check_due(&mut self, now_s: u64) -> bool {
        if self.expiry_s == 0 || now_s < self.next_check_s {
            return false;
        }
        self.next_check_s = now_s + CHECK_INTERVAL_S;
        true
    }

    /// Whether the recovered devices still have to be seeded (first check).
    pub fn needs_seeding(&self) -> bool {
        self.expiry_s != 0 && self.next_check_s == 0
    }

    /// Seeds a recovered device as idle since `now_s`, unless it is known.
    pub fn seed(&mut self, device: DeviceKey, now_s: u64) {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.idle.entry(device) {
            slot.insert(now_s);
            self.order.insert((now_s, device));
        }
    }

    /// Takes up to [`EXPIRIES_PER_CHECK_MAX`] devices idle for the expiry at `now_s`.
    pub fn take_expired(&mut self, now_s: u64) -> Vec<DeviceKey> {
        let mut expired = Vec::new();
        while expired.len() < EXPIRIES_PER_CHECK_MAX {
            let Some(&(since, device)) = self.order.first() else { break };
            if since.saturating_add(self.expiry_s) > now_s {
                break;
            }
            self.order.remove(&(since, device));
            self.idle.remove(&device);
            expired.push(device);
        }
        expired
    }

    /// Idle devices tracked.
    pub fn idle_count(&self) -> usize {
        self.idle.len()
    }
}
