//! Presence in the shard core (docs/presence.md): the frames of a session
//! (subscribe, unsubscribe, privacy), the table's hooks on a device's
//! sessions, the cross-shard watch messages, and the ephemeral path to a
//! watcher's connection.
//!
//! The ephemeral path never waits behind durable traffic and never grows
//! without bound: each session has its own queue, coalesced per watched
//! user (the latest state wins) and pulled by the driver onto a stream of
//! its own; each destination shard has its own coalesced outbox of
//! updates, taken after the durable messages and held back while the
//! destination's CoDel controller is dropping (the path is overloaded);
//! only an update that finds that outbox full is shed, and counted.
//! Watch and unwatch requests go in a coalesced control outbox per
//! destination (the latest intent per watcher and user wins), bounded: a
//! watch that finds it full is answered "unavailable" at once.

use super::{ConnId, Session, ShardCore};
use crate::shard::mailbox::MailboxStore;
use crate::shard::messages::{DeviceKey, ShardMessage};
use crate::shard::presence::{PresenceError, PresenceEvent, Privacy, Visible, Watcher};
use crate::shard::StateMap;
use iris_protocol::frames::{self, Frame};
use iris_protocol::ErrorCode;
use iris_shard_map::UserId;
use std::collections::VecDeque;

/// What an ephemeral message between shards is about: the newest one per
/// subject replaces an older one still waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Subject {
    /// A watcher's view of a user.
    Presence(Watcher, u64),
    /// A device typing to a user.
    Typing(DeviceKey, u64),
}

/// Ephemeral messages waiting for one destination shard, coalesced per
/// subject. Past [`EPHEMERAL_OUTBOX_MAX`] distinct subjects new ones are
/// shed.
#[derive(Debug, Default)]
pub(crate) struct EphemeralOutbox {
    order: VecDeque<Subject>,
    latest: StateMap<Subject, ShardMessage>,
}

/// Distinct (watcher, user) updates waiting per destination shard (above
/// the default watchers of one user, so a celebrity's change fits).
pub const EPHEMERAL_OUTBOX_MAX: usize = 262_144;
/// Distinct (watcher, user) watch or unwatch requests waiting per
/// destination shard.
pub const CONTROL_OUTBOX_MAX: usize = 262_144;
/// Distinct (typing device, user) notices waiting per destination shard:
/// a queue of its own, so typing can never crowd presence out.
pub const TYPING_OUTBOX_MAX: usize = 16_384;

/// Watch (`true`) and unwatch (`false`) requests waiting for one
/// destination shard, coalesced per (watcher, user): the latest wins.
#[derive(Debug, Default)]
pub(crate) struct ControlOutbox {
    order: VecDeque<(Watcher, u64)>,
    latest: StateMap<(Watcher, u64), bool>,
}

impl ControlOutbox {
    /// Queues the request; false if the outbox is full (a new pair only).
    fn push(&mut self, watcher: Watcher, user: u64, watch: bool) -> bool {
        if let Some(latest) = self.latest.get_mut(&(watcher, user)) {
            *latest = watch;
            return true;
        }
        if self.order.len() >= CONTROL_OUTBOX_MAX {
            return false;
        }
        self.order.push_back((watcher, user));
        self.latest.insert((watcher, user), watch);
        true
    }

    fn pop(&mut self) -> Option<ShardMessage> {
        let (watcher, user) = self.order.pop_front()?;
        Some(match self.latest.remove(&(watcher, user))? {
            true => ShardMessage::PresenceWatch { watcher, user },
            false => ShardMessage::PresenceUnwatch { watcher, user },
        })
    }
}

/// Whether `message` is presence traffic (its own queues).
pub(crate) fn is_presence_message(message: &ShardMessage) -> bool {
    matches!(
        message,
        ShardMessage::PresenceWatch { .. }
            | ShardMessage::PresenceUnwatch { .. }
            | ShardMessage::PresenceUpdate { .. }
            | ShardMessage::Typing { .. }
    )
}

/// What a frame on a session's ephemeral stream is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Topic {
    /// A watched user's presence.
    Presence(u64),
    /// A device typing to this session's user.
    Typing(DeviceKey),
}

/// Frames waiting for one session's ephemeral stream, coalesced per topic.
#[derive(Debug, Default)]
pub(crate) struct EphemeralQueue {
    order: VecDeque<Topic>,
    latest: StateMap<Topic, Frame>,
    /// How many of `order` are presence topics (the rest are typing).
    presence_topics: usize,
    /// Whether the connection is in `ephemeral_ready`.
    queued: bool,
}

/// Typing devices a session's queue keeps apart from its watched users.
const TYPING_TOPICS_MAX: usize = 256;

impl EphemeralOutbox {
    /// Queues `message` (a PresenceUpdate or a Typing) within `max`
    /// distinct subjects; false if it had to be shed.
    fn push(&mut self, message: ShardMessage, max: usize) -> bool {
        let subject = match &message {
            ShardMessage::PresenceUpdate { watcher, user, .. } => Subject::Presence(*watcher, *user),
            ShardMessage::Typing { from, to_user, .. } => Subject::Typing(*from, *to_user),
            _ => return false,
        };
        if let Some(latest) = self.latest.get_mut(&subject) {
            *latest = message;
            return true;
        }
        if self.order.len() >= max {
            return false;
        }
        self.order.push_back(subject);
        self.latest.insert(subject, message);
        true
    }

    /// Forgets everything waiting (typing while its path is overloaded).
    fn clear(&mut self) -> usize {
        let dropped = self.order.len();
        self.order.clear();
        self.latest.clear();
        dropped
    }

    fn pop(&mut self) -> Option<ShardMessage> {
        let subject = self.order.pop_front()?;
        self.latest.remove(&subject)
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

/// The wire form of what a watcher sees.
fn presence_frame(user: u64, state: Visible) -> Frame {
    let (state, last_seen_ms) = match state {
        Visible::Online => (frames::PRESENCE_ONLINE, 0),
        Visible::Offline { last_seen_ms } => (frames::PRESENCE_OFFLINE, last_seen_ms.unwrap_or(0)),
        Visible::Hidden => (frames::PRESENCE_HIDDEN, 0),
        Visible::Unavailable => (frames::PRESENCE_UNAVAILABLE, 0),
    };
    Frame::Presence(frames::Presence { user, state, last_seen_ms })
}

impl<S: MailboxStore> ShardCore<S> {
    fn home_shard(&self, user: u64) -> u16 {
        self.table.home(UserId(user)).shard.0
    }

    /// A PresenceSubscribe of `conn`'s device.
    pub(super) fn on_presence_subscribe(&mut self, conn: ConnId, device: DeviceKey, users: &[u64]) {
        let watcher = Watcher { user: device.user, device: device.device };
        match self.presence.subscribe(watcher, users) {
            Err(PresenceError::TooManySubscriptions { max }) => {
                let message = format!("a device watches at most {max} users");
                self.emit(conn, Frame::error(ErrorCode::TooManySubscriptions, message));
            }
            Err(other) => self.emit(conn, Frame::error(ErrorCode::Internal, other.to_string())),
            Ok((targets, events)) => {
                for user in targets {
                    self.send_watch(watcher, user, true);
                }
                self.route_presence_events(events);
            }
        }
    }

    /// A PresenceUnsubscribe (`Some`) of `device`, or its removal (`None`:
    /// its whole contact list).
    pub(super) fn on_presence_unsubscribe(&mut self, device: DeviceKey, users: Option<&[u64]>) {
        let watcher = Watcher { user: device.user, device: device.device };
        let (removed, events) = self.presence.unsubscribe(watcher, users);
        for user in removed {
            self.send_watch(watcher, user, false);
        }
        self.route_presence_events(events);
    }

    /// A PresencePrivacy of `conn`'s user.
    pub(super) fn on_presence_privacy(&mut self, conn: ConnId, user: u64, privacy: u8) {
        let privacy = match privacy {
            frames::PRIVACY_EVERYONE => Privacy::Everyone,
            frames::PRIVACY_CONTACTS => Privacy::Contacts,
            frames::PRIVACY_NOBODY => Privacy::Nobody,
            other => {
                let detail = format!("presence privacy {other} is not one of 0, 1, 2");
                return self.fail(conn, ErrorCode::BadFrame, detail);
            }
        };
        let events = self.presence.set_privacy(user, privacy);
        self.route_presence_events(events);
    }

    /// `device` has a session now (its Welcome went out).
    pub(super) fn presence_online(&mut self, device: DeviceKey) {
        let events = self.presence.connected(device.user, device.device);
        self.route_presence_events(events);
    }

    /// `device`'s session ended: its watches end with it (its contact list
    /// stays), and its user goes offline once the grace passes if this was
    /// its last device.
    pub(super) fn presence_offline(&mut self, device: DeviceKey) {
        self.presence.disconnected(device.user, device.device, self.wall_ms, self.clock_ms);
        let watcher = Watcher { user: device.user, device: device.device };
        for user in self.presence.end_session(watcher) {
            self.send_watch(watcher, user, false);
        }
    }

    /// Gives the table, once, the last-seen times the log recovered: each
    /// device's last session end is logged already (for the inactivity
    /// expiry, `MailboxStore::note_seen`), and a user's last seen is its
    /// devices' latest (to the second).
    fn presence_seed(&mut self) {
        if self.presence_seeded {
            return;
        }
        self.presence_seeded = true;
        for device in self.store.registered_devices() {
            // A device with a session now is online; one the log saw online
            // when the process died left at about the log's newest record.
            if self.online.contains_key(&device) {
                continue;
            }
            if let Some(idle_since_s) = self.store.recovered_idle_since(device) {
                let at_s = if self.now_s > 0 { idle_since_s.min(self.now_s) } else { idle_since_s };
                self.presence.restore_last_seen(device.user, at_s.saturating_mul(1000));
            }
        }
    }

    /// Ends due grace periods (from `handle_timeout`).
    pub(super) fn presence_expire(&mut self) {
        self.presence_seed();
        let (events, _last_seen) = self.presence.expire(self.clock_ms);
        self.route_presence_events(events);
    }

    /// When the next grace period ends, monotonic µs.
    pub(super) fn presence_deadline_us(&self) -> Option<u64> {
        self.presence.next_deadline().map(|ms| ms * 1000)
    }

    /// The watch messages, on the watched user's home shard.
    pub(super) fn on_presence_message(&mut self, message: ShardMessage) {
        match message {
            ShardMessage::PresenceWatch { watcher, user } => {
                self.presence_seed();
                let state = self.presence.watch(watcher, user).unwrap_or(Visible::Unavailable);
                self.route_presence_events(vec![PresenceEvent { watcher, user, state }]);
            }
            ShardMessage::PresenceUnwatch { watcher, user } => self.presence.unwatch(watcher, user),
            ShardMessage::PresenceUpdate { watcher, user, state } => self.deliver_presence(watcher, user, state),
            ShardMessage::Typing { from, to_user, active } => self.deliver_typing(from, to_user, active),
            _ => unreachable!("only presence messages are routed here"),
        }
    }

    /// A watch (`true`) or unwatch of `user` by `watcher`, towards `user`'s
    /// home shard. A watch that finds that shard's control outbox full is
    /// not kept and answered "unavailable" (the client may ask again).
    fn send_watch(&mut self, watcher: Watcher, user: u64, watch: bool) {
        let home = self.home_shard(user);
        if home == self.identity.shard.0 {
            let message = match watch {
                true => ShardMessage::PresenceWatch { watcher, user },
                false => ShardMessage::PresenceUnwatch { watcher, user },
            };
            return self.on_presence_message(message);
        }
        if !self.presence_control[usize::from(home)].push(watcher, user, watch) && watch {
            self.stats.ephemeral_shed += 1;
            self.deliver_presence(watcher, user, Visible::Unavailable);
        }
    }

    /// Sends each event towards its watcher's home shard.
    fn route_presence_events(&mut self, events: Vec<PresenceEvent>) {
        for PresenceEvent { watcher, user, state } in events {
            let home = self.home_shard(watcher.user);
            if home == self.identity.shard.0 {
                self.deliver_presence(watcher, user, state);
            } else if !self.ephemeral_outbox[usize::from(home)]
                .push(ShardMessage::PresenceUpdate { watcher, user, state }, EPHEMERAL_OUTBOX_MAX)
            {
                self.stats.ephemeral_shed += 1;
            }
        }
    }

    /// Presence messages a refused batch carried, back into their queues.
    pub(super) fn requeue_presence(&mut self, shard: u16, messages: Vec<ShardMessage>) {
        let destination = usize::from(shard);
        for message in messages {
            let kept = match message {
                ShardMessage::PresenceWatch { watcher, user } => {
                    self.presence_control[destination].push(watcher, user, true)
                }
                ShardMessage::PresenceUnwatch { watcher, user } => {
                    self.presence_control[destination].push(watcher, user, false)
                }
                message @ ShardMessage::PresenceUpdate { .. } => {
                    self.ephemeral_outbox[destination].push(message, EPHEMERAL_OUTBOX_MAX)
                }
                message @ ShardMessage::Typing { .. } => {
                    self.typing_outbox[destination].push(message, TYPING_OUTBOX_MAX)
                }
                _ => true,
            };
            if !kept {
                self.stats.ephemeral_shed += 1;
            }
        }
    }

    /// Whether presence messages wait for any shard.
    pub(super) fn presence_pending(&self) -> bool {
        self.presence_control.iter().any(|outbox| !outbox.order.is_empty())
            || self.ephemeral_outbox.iter().any(|outbox| outbox.len() > 0)
            || self.typing_outbox.iter().any(|outbox| outbox.len() > 0)
    }

    /// Queues `state` for the watcher's session, if it has one here.
    fn deliver_presence(&mut self, watcher: Watcher, user: u64, state: Visible) {
        if state == Visible::Unavailable {
            // Not kept where the user lives: a later subscribe asks again.
            self.presence.forget_watch(watcher, user);
        }
        let device = DeviceKey { user: watcher.user, device: watcher.device };
        let Some(&conn) = self.online.get(&device) else { return };
        if !matches!(self.sessions.get(&conn), Some(Session::Active { .. })) {
            return;
        }
        if self.queue_ephemeral(conn, Topic::Presence(user), presence_frame(user, state)) {
            self.stats.presence_events += 1;
        }
    }

    /// A Typing of `conn`'s device: to `to_user`'s home shard.
    pub(super) fn on_typing(&mut self, from: DeviceKey, to_user: u64, active: bool) {
        let home = self.home_shard(to_user);
        if home == self.identity.shard.0 {
            self.deliver_typing(from, to_user, active);
        } else if !self.typing_outbox[usize::from(home)]
            .push(ShardMessage::Typing { from, to_user, active }, TYPING_OUTBOX_MAX)
        {
            self.stats.ephemeral_shed += 1;
        }
    }

    /// Tells every device of `to_user` with a session now (but the typing
    /// one) that `from` types to it. Never stored: a device without a
    /// session never hears of it.
    fn deliver_typing(&mut self, from: DeviceKey, to_user: u64, active: bool) {
        for index in 0..self.store.devices_of(to_user).len() {
            let device = DeviceKey { user: to_user, device: self.store.devices_of(to_user)[index] };
            if device == from {
                continue;
            }
            let Some(&conn) = self.online.get(&device) else { continue };
            if !matches!(self.sessions.get(&conn), Some(Session::Active { .. })) {
                continue;
            }
            let notice =
                Frame::TypingNotice(frames::TypingNotice { from_user: from.user, from_device: from.device, active });
            if self.queue_ephemeral(conn, Topic::Typing(from), notice) {
                self.stats.typing_events += 1;
            }
        }
    }

    /// Queues `frame` for `conn`'s ephemeral stream, replacing one of the
    /// same topic; false if the queue is full (shed, counted).
    fn queue_ephemeral(&mut self, conn: ConnId, topic: Topic, frame: Frame) -> bool {
        let bound = match topic {
            Topic::Presence(_) => self.presence_limits.subscriptions_per_device_max,
            Topic::Typing(_) => TYPING_TOPICS_MAX,
        };
        let queue = self.ephemeral.entry(conn).or_default();
        let is_presence = matches!(topic, Topic::Presence(_));
        let of_kind = if is_presence { queue.presence_topics } else { queue.order.len() - queue.presence_topics };
        if let Some(latest) = queue.latest.get_mut(&topic) {
            *latest = frame;
        } else if of_kind < bound {
            queue.order.push_back(topic);
            queue.latest.insert(topic, frame);
            queue.presence_topics += usize::from(is_presence);
        } else {
            // Past the bound only updates about users it no longer watches,
            // or a flood of typers, can come.
            self.stats.ephemeral_shed += 1;
            return false;
        }
        if !queue.queued {
            queue.queued = true;
            self.ephemeral_ready.push_back(conn);
        }
        true
    }

    /// Next connection with presence frames waiting.
    pub fn poll_ephemeral_ready(&mut self) -> Option<ConnId> {
        let conn = self.ephemeral_ready.pop_front()?;
        if let Some(queue) = self.ephemeral.get_mut(&conn) {
            queue.queued = false;
        }
        Some(conn)
    }

    /// The next presence frame for `conn`'s ephemeral stream, or `None`
    /// when none waits. The driver calls this while the stream has room.
    pub fn poll_ephemeral(&mut self, conn: ConnId) -> Option<Frame> {
        let queue = self.ephemeral.get_mut(&conn)?;
        let Some(topic) = queue.order.pop_front() else {
            self.ephemeral.remove(&conn);
            return None;
        };
        if matches!(topic, Topic::Presence(_)) {
            queue.presence_topics -= 1;
        }
        let frame = queue.latest.remove(&topic)?;
        if queue.order.is_empty() {
            self.ephemeral.remove(&conn);
        }
        self.stats.frames_out[usize::from(frame.kind() as u8) % super::FRAME_KIND_SLOTS] += 1;
        Some(frame)
    }

    /// Forgets `conn`'s waiting presence frames (its session is over).
    pub(super) fn drop_ephemeral(&mut self, conn: ConnId) {
        self.ephemeral.remove(&conn);
    }

    /// Moves waiting presence messages for `shard` into `batch`, up to
    /// `messages_max` in all (durable messages first, then watch requests,
    /// then updates). Updates wait while the path to `shard` is overloaded
    /// (its CoDel controller is dropping): presence yields first.
    pub(super) fn take_ephemeral(&mut self, shard: u16, batch: &mut Vec<ShardMessage>, messages_max: usize) {
        let destination = usize::from(shard);
        while batch.len() < messages_max {
            let Some(message) = self.presence_control[destination].pop() else { break };
            batch.push(message);
        }
        if self.codels.get(destination).is_some_and(|codel| codel.dropping()) {
            // Presence waits (its newest state still matters later); typing
            // would be stale by then: it goes.
            self.stats.ephemeral_shed += self.typing_outbox[destination].clear() as u64;
            return;
        }
        for outbox in [&mut self.ephemeral_outbox[destination], &mut self.typing_outbox[destination]] {
            while batch.len() < messages_max {
                let Some(message) = outbox.pop() else { break };
                batch.push(message);
            }
        }
    }
}
