//! The shard's presence table (issue 11, docs/presence.md): for the users
//! homed on this shard, whether they are online, when they were last seen,
//! who may see it, who watches them, and whom their own devices watch (their
//! contacts, for the `contacts` privacy setting).
//!
//! Pure logic on simulated time: the shard core feeds it connections,
//! disconnections, subscriptions and the clock, and routes what it returns
//! (events to watchers, last-seen values to persist (not yet made durable:
//! docs/presence.md), watches to forward to other shards). Nothing here does I/O, and every collection is bounded:
//! subscriptions per device by [`PresenceLimits::subscriptions_per_device_max`]
//! and watchers per user by [`PresenceLimits::watchers_per_user_max`].
//!
//! Churn is damped: a user whose last device disconnects stays online to
//! its watchers for [`PresenceLimits::grace_ms`]; a device that comes back
//! within it causes no event at all. When the grace ends the user goes
//! offline with the time its last device left as its last-seen time.

use std::collections::{BTreeSet, HashMap, HashSet};

/// Who may see a user's presence and last-seen time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Privacy {
    /// Every watcher.
    #[default]
    Everyone,
    /// Only users this user watches itself (from any of its devices).
    Contacts,
    /// No one: watchers see [`Visible::Hidden`].
    Nobody,
}

/// A watching device (the event goes to its connection, on its home shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Watcher {
    /// The watching user.
    pub user: u64,
    /// Its device.
    pub device: u32,
}

/// What a watcher is shown of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visible {
    /// At least one device connected (or within the grace period).
    Online,
    /// No device connected; the last time one was, if ever.
    Offline {
        /// When its last device disconnected, ms since the Unix epoch.
        last_seen_ms: Option<u64>,
    },
    /// The user's privacy setting hides it from this watcher.
    Hidden,
    /// The user has the most watchers the table keeps: this watch was not
    /// kept.
    Unavailable,
}

/// A change a watcher is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceEvent {
    /// Who is told.
    pub watcher: Watcher,
    /// About whom.
    pub user: u64,
    /// What it now sees.
    pub state: Visible,
}

/// The table's bounds and timing.
#[derive(Debug, Clone, Copy)]
pub struct PresenceLimits {
    /// Users one device may watch at once.
    pub subscriptions_per_device_max: usize,
    /// Devices that may watch one user at once (a celebrity's watchers).
    pub watchers_per_user_max: usize,
    /// How long a user stays online after its last device disconnects.
    pub grace_ms: u64,
}

impl PresenceLimits {
    /// The defaults of the `[presence]` configuration.
    pub const DEFAULT: PresenceLimits =
        PresenceLimits { subscriptions_per_device_max: 1_000, watchers_per_user_max: 100_000, grace_ms: 5_000 };
}

/// A refused presence request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    /// The device would watch more than the bound.
    #[error("a device may watch at most {max} users")]
    TooManySubscriptions {
        /// The bound.
        max: usize,
    },
    /// The user already has the most watchers the table keeps.
    #[error("user {user} has the most watchers a shard keeps ({max})")]
    TooManyWatchers {
        /// The watched user.
        user: u64,
        /// The bound.
        max: usize,
    },
}

/// One local user's presence.
#[derive(Debug, Default)]
struct UserPresence {
    /// Its connected devices.
    devices_online: HashSet<u32>,
    /// While in the grace period: when its last device left.
    leaving: Option<Leaving>,
    /// The last time a device of it disconnected (durable: restored at start).
    last_seen_ms: Option<u64>,
    privacy: Privacy,
    /// Devices watching this user.
    watchers: BTreeSet<Watcher>,
    /// Users its devices watch, with how many of its devices watch each.
    contacts: HashMap<u64, u32>,
    /// Per device of this user, the users it subscribed to (its contact
    /// list: it outlives sessions, until unsubscribed or the device goes).
    subscriptions: HashMap<u32, HashSet<u64>>,
    /// Per device with a session, the users that session watches (each a
    /// watch on the user's home shard).
    watching: HashMap<u32, HashSet<u64>>,
}

impl UserPresence {
    fn online(&self) -> bool {
        !self.devices_online.is_empty() || self.leaving.is_some()
    }

    /// Nothing but (perhaps) a last-seen time: that fits the compact map.
    fn is_empty(&self) -> bool {
        self.devices_online.is_empty()
            && self.leaving.is_none()
            && self.privacy == Privacy::Everyone
            && self.watchers.is_empty()
            && self.subscriptions.is_empty()
            && self.watching.is_empty()
    }

    /// What `watcher` is shown of this user.
    fn visible_to(&self, watcher: u64) -> Visible {
        let allowed = match self.privacy {
            Privacy::Everyone => true,
            Privacy::Contacts => self.contacts.contains_key(&watcher),
            Privacy::Nobody => false,
        };
        if !allowed {
            Visible::Hidden
        } else if self.online() {
            Visible::Online
        } else {
            Visible::Offline { last_seen_ms: self.last_seen_ms }
        }
    }
}

/// A grace period running: when the last device left (wall clock, the
/// last-seen time to be) and when the grace ends (monotonic).
#[derive(Debug, Clone, Copy)]
struct Leaving {
    at_wall_ms: u64,
    deadline_ms: u64,
}

/// A last-seen time to make durable (the core writes it to the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastSeen {
    /// The user.
    pub user: u64,
    /// When its last device left, ms since the Unix epoch.
    pub at_ms: u64,
}

/// The presence of one shard's users.
#[derive(Debug)]
pub struct PresenceTable {
    limits: PresenceLimits,
    users: HashMap<u64, UserPresence>,
    /// Users with nothing but a last-seen time (most of a shard's users at
    /// any moment): 16 B each instead of a whole entry.
    last_seen_only: HashMap<u64, u64>,
    /// Grace periods running: (monotonic deadline, user).
    grace: BTreeSet<(u64, u64)>,
}

impl PresenceTable {
    pub fn new(limits: PresenceLimits) -> Self {
        Self { limits, users: HashMap::new(), last_seen_only: HashMap::new(), grace: BTreeSet::new() }
    }

    /// Users with any presence state (bounded by the shard's devices and
    /// their subscriptions).
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Watchers of `user` now.
    pub fn watchers(&self, user: u64) -> usize {
        self.users.get(&user).map_or(0, |presence| presence.watchers.len())
    }

    /// A last-seen time read back from the log at start.
    pub fn restore_last_seen(&mut self, user: u64, at_ms: u64) {
        match self.users.get_mut(&user) {
            Some(presence) => presence.last_seen_ms = presence.last_seen_ms.max(Some(at_ms)),
            None => {
                let seen = self.last_seen_only.entry(user).or_default();
                *seen = (*seen).max(at_ms);
            }
        }
    }

    /// `user`'s entry, made (with its last seen, if the compact map has
    /// it) when it has none.
    fn entry<'a>(
        users: &'a mut HashMap<u64, UserPresence>,
        last_seen_only: &mut HashMap<u64, u64>,
        user: u64,
    ) -> &'a mut UserPresence {
        users
            .entry(user)
            .or_insert_with(|| UserPresence { last_seen_ms: last_seen_only.remove(&user), ..UserPresence::default() })
    }

    /// A device of local user `user` connected. Watchers hear "online" only
    /// if the user was offline (not within its grace period).
    pub fn connected(&mut self, user: u64, device: u32) -> Vec<PresenceEvent> {
        let presence = Self::entry(&mut self.users, &mut self.last_seen_only, user);
        let was_online = presence.online();
        presence.devices_online.insert(device);
        if let Some(leaving) = presence.leaving.take() {
            self.grace.remove(&(leaving.deadline_ms, user));
        }
        if was_online {
            return Vec::new();
        }
        Self::announce(user, presence)
    }

    /// A device of local user `user` disconnected at `wall_ms` (the last-seen
    /// time to be), `monotonic_ms` on the shard's monotonic clock. If it was
    /// the last, the grace period starts; watchers hear nothing yet.
    pub fn disconnected(&mut self, user: u64, device: u32, wall_ms: u64, monotonic_ms: u64) {
        let Some(presence) = self.users.get_mut(&user) else { return };
        if !presence.devices_online.remove(&device) || !presence.devices_online.is_empty() {
            return;
        }
        let deadline_ms = monotonic_ms + self.limits.grace_ms;
        presence.leaving = Some(Leaving { at_wall_ms: wall_ms, deadline_ms });
        self.grace.insert((deadline_ms, user));
    }

    /// When the next grace period ends (monotonic ms).
    pub fn next_deadline(&self) -> Option<u64> {
        self.grace.first().map(|(deadline, _)| *deadline)
    }

    /// Ends the grace periods due by `now_ms` (monotonic): those users go
    /// offline; their watchers are told, with the last-seen time, which is
    /// also returned to be made durable.
    pub fn expire(&mut self, now_ms: u64) -> (Vec<PresenceEvent>, Vec<LastSeen>) {
        let mut events = Vec::new();
        let mut last_seen = Vec::new();
        while let Some(&(deadline, user)) = self.grace.first() {
            if deadline > now_ms {
                break;
            }
            self.grace.pop_first();
            let Some(presence) = self.users.get_mut(&user) else { continue };
            let Some(leaving) = presence.leaving.take() else { continue };
            presence.last_seen_ms = Some(leaving.at_wall_ms);
            last_seen.push(LastSeen { user, at_ms: leaving.at_wall_ms });
            events.extend(Self::announce(user, presence));
        }
        (events, last_seen)
    }

    /// Sets local user `user`'s privacy; watchers whose view changes are told.
    pub fn set_privacy(&mut self, user: u64, privacy: Privacy) -> Vec<PresenceEvent> {
        let presence = Self::entry(&mut self.users, &mut self.last_seen_only, user);
        let before: Vec<Visible> = presence.watchers.iter().map(|w| presence.visible_to(w.user)).collect();
        presence.privacy = privacy;
        let events = Self::changed_views(user, presence, before);
        self.forget_if_empty(user);
        events
    }

    /// Device `watcher` (of a local user) subscribes to `targets`: they join
    /// its contact list, which outlives its sessions (so `contacts` privacy
    /// keeps working while the user is offline), and its session watches
    /// them. Returns the targets to watch (all of them: the core forwards a
    /// watch to each one's home shard) and the events for the
    /// local user's own watchers whose view of it changed (a new contact may
    /// now see it). All or nothing: past the bound nothing is added.
    pub fn subscribe(
        &mut self,
        watcher: Watcher,
        targets: &[u64],
    ) -> Result<(Vec<u64>, Vec<PresenceEvent>), PresenceError> {
        let max = self.limits.subscriptions_per_device_max;
        let presence = Self::entry(&mut self.users, &mut self.last_seen_only, watcher.user);
        let mut seen = HashSet::new();
        let targets: Vec<u64> = targets.iter().copied().filter(|target| seen.insert(*target)).collect();
        let listed = presence.subscriptions.get(&watcher.device);
        let new_contacts: Vec<u64> =
            targets.iter().copied().filter(|target| listed.is_none_or(|set| !set.contains(target))).collect();
        if listed.map_or(0, HashSet::len) + new_contacts.len() > max {
            self.forget_if_empty(watcher.user);
            return Err(PresenceError::TooManySubscriptions { max });
        }
        let before: Vec<Visible> = presence.watchers.iter().map(|w| presence.visible_to(w.user)).collect();
        presence.subscriptions.entry(watcher.device).or_default().extend(new_contacts.iter().copied());
        for target in &new_contacts {
            *presence.contacts.entry(*target).or_default() += 1;
        }
        // Every target is watched (again): a watch is idempotent where the
        // user lives and answers with the current state, which a new session
        // of the device (one that replaced an older connection) needs.
        presence.watching.entry(watcher.device).or_default().extend(targets.iter().copied());
        let events = Self::changed_views(watcher.user, presence, before);
        Ok((targets, events))
    }

    /// Device `watcher`'s session no longer watches `user` (its watch was
    /// not kept where the user lives); `user` stays on its contact list.
    pub fn forget_watch(&mut self, watcher: Watcher, user: u64) {
        let watching = &mut Self::entry(&mut self.users, &mut self.last_seen_only, watcher.user).watching;
        remove_targets(watching, watcher.device, Some(&[user]));
        self.forget_if_empty(watcher.user);
    }

    /// Device `watcher`'s session ended: its watches end (returned, for the
    /// core to unwatch on their home shards); its contact list stays.
    pub fn end_session(&mut self, watcher: Watcher) -> Vec<u64> {
        let Some(presence) = self.users.get_mut(&watcher.user) else { return Vec::new() };
        let watched = presence.watching.remove(&watcher.device).map(|set| set.into_iter().collect());
        self.forget_if_empty(watcher.user);
        watched.unwrap_or_default()
    }

    /// Device `watcher` unsubscribes from `targets` (all of them when
    /// `None`, as when the device is removed): they leave its contact list
    /// and its session's watches. Returns the targets its session no longer
    /// watches (the core forwards an unwatch to each) and the events for the
    /// local user's watchers whose view changed (a contact lost may no
    /// longer see it).
    pub fn unsubscribe(&mut self, watcher: Watcher, targets: Option<&[u64]>) -> (Vec<u64>, Vec<PresenceEvent>) {
        let Some(presence) = self.users.get_mut(&watcher.user) else { return (Vec::new(), Vec::new()) };
        let before: Vec<Visible> = presence.watchers.iter().map(|w| presence.visible_to(w.user)).collect();
        let delisted = remove_targets(&mut presence.subscriptions, watcher.device, targets);
        for target in &delisted {
            if let Some(count) = presence.contacts.get_mut(target) {
                *count -= 1;
                if *count == 0 {
                    presence.contacts.remove(target);
                }
            }
        }
        let unwatched = remove_targets(&mut presence.watching, watcher.device, targets);
        let events = Self::changed_views(watcher.user, presence, before);
        self.forget_if_empty(watcher.user);
        (unwatched, events)
    }

    /// `watcher` (a device on any shard) watches local user `user`; returns
    /// what it sees now.
    pub fn watch(&mut self, watcher: Watcher, user: u64) -> Result<Visible, PresenceError> {
        let max = self.limits.watchers_per_user_max;
        let presence = Self::entry(&mut self.users, &mut self.last_seen_only, user);
        if !presence.watchers.contains(&watcher) && presence.watchers.len() >= max {
            self.forget_if_empty(user);
            return Err(PresenceError::TooManyWatchers { user, max });
        }
        presence.watchers.insert(watcher);
        Ok(presence.visible_to(watcher.user))
    }

    /// `watcher` no longer watches local user `user`.
    pub fn unwatch(&mut self, watcher: Watcher, user: u64) {
        if let Some(presence) = self.users.get_mut(&user) {
            presence.watchers.remove(&watcher);
        }
        self.forget_if_empty(user);
    }

    /// What `watcher` (a user) sees of local user `user` now.
    pub fn visible(&self, user: u64, watcher: u64) -> Visible {
        match self.users.get(&user) {
            Some(presence) => presence.visible_to(watcher),
            None => Visible::Offline { last_seen_ms: self.last_seen_only.get(&user).copied() },
        }
    }

    /// Every watcher's view of `user` (after a change of its state).
    fn announce(user: u64, presence: &UserPresence) -> Vec<PresenceEvent> {
        presence
            .watchers
            .iter()
            .filter_map(|watcher| match presence.visible_to(watcher.user) {
                // Hidden watchers saw nothing before and see nothing now.
                Visible::Hidden => None,
                state => Some(PresenceEvent { watcher: *watcher, user, state }),
            })
            .collect()
    }

    /// The watchers of `user` whose view differs from `before` (one entry
    /// per watcher, in the watchers' order).
    fn changed_views(user: u64, presence: &UserPresence, before: Vec<Visible>) -> Vec<PresenceEvent> {
        presence
            .watchers
            .iter()
            .zip(before)
            .filter_map(|(watcher, before)| {
                let now = presence.visible_to(watcher.user);
                (now != before).then_some(PresenceEvent { watcher: *watcher, user, state: now })
            })
            .collect()
    }

    /// Drops `user`'s entry once nothing but a last-seen time is left
    /// (which moves to the compact map).
    fn forget_if_empty(&mut self, user: u64) {
        if self.users.get(&user).is_some_and(UserPresence::is_empty) {
            if let Some(seen) = self.users.remove(&user).and_then(|presence| presence.last_seen_ms) {
                self.last_seen_only.insert(user, seen);
            }
        }
    }
}

/// Removes `targets` (all when `None`) from `device`'s set in `sets`,
/// dropping the set once empty; returns those it held.
fn remove_targets(sets: &mut HashMap<u32, HashSet<u64>>, device: u32, targets: Option<&[u64]>) -> Vec<u64> {
    let Some(set) = sets.get_mut(&device) else { return Vec::new() };
    let removed = match targets {
        Some(targets) => targets.iter().copied().filter(|target| set.remove(target)).collect(),
        None => set.drain().collect(),
    };
    if set.is_empty() {
        sets.remove(&device);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: u64 = 5_000;

    fn table() -> PresenceTable {
        PresenceTable::new(PresenceLimits {
            subscriptions_per_device_max: 3,
            watchers_per_user_max: 4,
            grace_ms: GRACE,
        })
    }

    const A: Watcher = Watcher { user: 1, device: 1 };
    const B: u64 = 2;

    #[test]
    fn online_then_offline_after_the_grace_with_the_time_the_device_left() {
        let mut table = table();
        assert_eq!(table.watch(A, B), Ok(Visible::Offline { last_seen_ms: None }));
        assert_eq!(table.connected(B, 1), vec![PresenceEvent { watcher: A, user: B, state: Visible::Online }]);
        // Last seen is wall-clock time; the grace runs on the monotonic clock.
        const WALL: u64 = 1_700_000_000_000;
        table.disconnected(B, 1, WALL, 10_000);
        assert_eq!(table.next_deadline(), Some(10_000 + GRACE));
        assert_eq!(table.expire(10_000 + GRACE - 1), (vec![], vec![]), "still within the grace");
        assert_eq!(table.visible(B, A.user), Visible::Online);
        let (events, last_seen) = table.expire(10_000 + GRACE);
        let offline = Visible::Offline { last_seen_ms: Some(WALL) };
        assert_eq!(events, vec![PresenceEvent { watcher: A, user: B, state: offline }]);
        assert_eq!(last_seen, vec![LastSeen { user: B, at_ms: WALL }]);
        assert_eq!(table.next_deadline(), None);
        // A new watcher sees the last-seen time at once.
        let other = Watcher { user: 3, device: 1 };
        assert_eq!(table.watch(other, B), Ok(offline));
    }

    #[test]
    fn a_reconnect_within_the_grace_does_not_flap() {
        let mut table = table();
        table.watch(A, B).unwrap();
        table.connected(B, 1);
        table.disconnected(B, 1, 1_000, 1_000);
        assert_eq!(table.connected(B, 1), vec![], "back within the grace: no event");
        assert_eq!(table.next_deadline(), None, "the grace was cancelled");
        assert_eq!(table.expire(1_000 + GRACE), (vec![], vec![]));
        assert_eq!(table.visible(B, A.user), Visible::Online);
    }

    #[test]
    fn the_user_is_online_while_any_device_is() {
        let mut table = table();
        table.watch(A, B).unwrap();
        table.connected(B, 1);
        assert_eq!(table.connected(B, 2), vec![], "a second device changes nothing");
        table.disconnected(B, 1, 100, 100);
        assert_eq!(table.next_deadline(), None, "device 2 is still connected");
        table.disconnected(B, 2, 200, 200);
        let (events, _) = table.expire(200 + GRACE);
        assert_eq!(events[0].state, Visible::Offline { last_seen_ms: Some(200) });
        // A device that disconnects without having connected is ignored.
        table.disconnected(B, 9, 300, 300);
        assert_eq!(table.next_deadline(), None);
    }

    #[test]
    fn privacy_nobody_hides_and_contacts_shows_only_to_contacts() {
        let mut table = table();
        let contact = Watcher { user: 3, device: 1 };
        table.watch(A, B).unwrap();
        table.watch(contact, B).unwrap();
        table.connected(B, 1);
        // Nobody: both watchers are told it is hidden.
        let events = table.set_privacy(B, Privacy::Nobody);
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|event| event.state == Visible::Hidden));
        table.disconnected(B, 1, 50, 50);
        assert_eq!(table.expire(50 + GRACE).0, vec![], "hidden watchers hear nothing");
        // Contacts: B's device subscribes to user 3, which makes 3 a contact.
        let (fresh, events) = table.subscribe(Watcher { user: B, device: 1 }, &[contact.user]).unwrap();
        assert_eq!(fresh, vec![contact.user]);
        assert_eq!(events, vec![], "privacy is still nobody");
        let events = table.set_privacy(B, Privacy::Contacts);
        let offline = Visible::Offline { last_seen_ms: Some(50) };
        assert_eq!(events, vec![PresenceEvent { watcher: contact, user: B, state: offline }]);
        assert_eq!(table.visible(B, A.user), Visible::Hidden, "A is not B's contact");
        // B stops watching 3: 3 loses the view.
        let (removed, events) = table.unsubscribe(Watcher { user: B, device: 1 }, None);
        assert_eq!(removed, vec![contact.user]);
        assert_eq!(events, vec![PresenceEvent { watcher: contact, user: B, state: Visible::Hidden }]);
        // And subscribing again gives it back at once.
        let (_, events) = table.subscribe(Watcher { user: B, device: 2 }, &[contact.user]).unwrap();
        assert_eq!(events, vec![PresenceEvent { watcher: contact, user: B, state: offline }]);
    }

    #[test]
    fn a_contact_watched_by_two_devices_stays_one_until_both_stop() {
        let mut table = table();
        let contact = Watcher { user: 3, device: 1 };
        table.set_privacy(B, Privacy::Contacts);
        table.watch(contact, B).unwrap();
        table.subscribe(Watcher { user: B, device: 1 }, &[3]).unwrap();
        table.subscribe(Watcher { user: B, device: 2 }, &[3]).unwrap();
        let (_, events) = table.unsubscribe(Watcher { user: B, device: 1 }, Some(&[3]));
        assert_eq!(events, vec![], "device 2 still watches 3");
        assert_ne!(table.visible(B, 3), Visible::Hidden);
        let (_, events) = table.unsubscribe(Watcher { user: B, device: 2 }, Some(&[3]));
        assert_eq!(events, vec![PresenceEvent { watcher: contact, user: B, state: Visible::Hidden }]);
    }

    #[test]
    fn a_contact_list_outlives_the_session_that_made_it() {
        let mut table = table();
        let contact = Watcher { user: 3, device: 1 };
        let device = Watcher { user: B, device: 1 };
        table.set_privacy(B, Privacy::Contacts);
        table.watch(contact, B).unwrap();
        table.connected(B, 1);
        let (to_watch, _) = table.subscribe(device, &[3]).unwrap();
        assert_eq!(to_watch, vec![3]);
        // B leaves: its session's watch ends, its contact still sees it.
        assert_eq!(table.end_session(device), vec![3]);
        table.disconnected(B, 1, 70, 70);
        let (events, _) = table.expire(70 + GRACE);
        let offline = Visible::Offline { last_seen_ms: Some(70) };
        assert_eq!(events, vec![PresenceEvent { watcher: contact, user: B, state: offline }]);
        // A new session subscribes again: watched again, not listed twice.
        let (to_watch, events) = table.subscribe(device, &[3]).unwrap();
        assert_eq!((to_watch, events), (vec![3], vec![]));
        // A watch not kept where the user lives leaves the contact list alone.
        table.forget_watch(device, 3);
        assert_eq!(table.end_session(device), Vec::<u64>::new());
        table.subscribe(device, &[3]).unwrap();
        let (unwatched, events) = table.unsubscribe(device, Some(&[3]));
        assert_eq!(unwatched, vec![3]);
        assert_eq!(events, vec![PresenceEvent { watcher: contact, user: B, state: Visible::Hidden }], "counted once");
    }

    #[test]
    fn subscriptions_and_watchers_are_bounded_and_a_refusal_adds_nothing() {
        let mut table = table();
        let device = Watcher { user: B, device: 1 };
        let (fresh, _) = table.subscribe(device, &[10, 11, 11]).unwrap();
        assert_eq!(fresh, vec![10, 11], "a repeated target counts once");
        assert_eq!(table.subscribe(device, &[12, 13]), Err(PresenceError::TooManySubscriptions { max: 3 }));
        let (to_watch, _) = table.subscribe(device, &[10, 12]).unwrap();
        assert_eq!(to_watch, vec![10, 12], "10 counts once against the bound, and is watched again");
        for user in 100..104 {
            table.watch(Watcher { user, device: 1 }, B).unwrap();
        }
        let refused = table.watch(Watcher { user: 200, device: 1 }, B);
        assert_eq!(refused, Err(PresenceError::TooManyWatchers { user: B, max: 4 }));
        assert!(table.watch(Watcher { user: 100, device: 1 }, B).is_ok(), "a watcher again is no new one");
        assert_eq!(table.watchers(B), 4);
    }

    #[test]
    fn state_left_behind_is_forgotten_and_last_seen_survives_a_restart() {
        let mut table = table();
        table.watch(A, B).unwrap();
        table.unwatch(A, B);
        let device = Watcher { user: 7, device: 1 };
        table.subscribe(device, &[B]).unwrap();
        table.unsubscribe(device, None);
        assert_eq!(table.users(), 0, "nothing left to remember");
        // A user offline since before the restart: its last seen comes back.
        let mut restarted = self::table();
        restarted.restore_last_seen(B, 42);
        restarted.restore_last_seen(B, 41);
        assert_eq!(restarted.users(), 0, "a last-seen time alone takes no entry");
        assert_eq!(restarted.watch(A, B), Ok(Visible::Offline { last_seen_ms: Some(42) }));
        // And once its watcher goes, it is back to the compact form.
        restarted.unwatch(A, B);
        assert_eq!(restarted.users(), 0);
        assert_eq!(restarted.visible(B, 9), Visible::Offline { last_seen_ms: Some(42) });
    }
}
