//! Draining the shard before the process exits (SIGTERM, docs/operations.md):
//! no Send or RemoveDevice is taken any more (the SDK sends what was not
//! acknowledged again after it reconnects, and asks a removal again); every
//! session closes with [`close_code::SHUTTING_DOWN`] once the Sends it has
//! in flight are answered, so no client waits for an Ack of a message that
//! is stored; the shard is settled once its log has written everything.
//! Cross-shard messages are still served: another shard's Sends in flight
//! to this one are stored and answered.

use super::{ConnId, Output, Session, ShardCore};
use crate::shard::mailbox::MailboxStore;
use iris_protocol::close_code;

impl<S: MailboxStore> ShardCore<S> {
    /// Starts draining (idempotent). Sessions close as their Sends in
    /// flight are answered ([`ShardCore::handle_timeout`] checks them);
    /// connections opened from now on are closed at once.
    pub fn begin_drain(&mut self, now: super::Now) {
        self.advance(now);
        if self.draining.is_some() {
            return;
        }
        tracing::info!(shard = self.identity.shard.0, sessions = self.sessions.len(), "draining");
        self.draining = Some(self.sessions.keys().copied().collect());
        self.drain_step();
    }

    /// Whether the shard is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.is_some()
    }

    /// Whether a draining shard has nothing left to do: every session has
    /// been told to close and the log has written and synced every record
    /// (no Ack is owed, nothing waits for durability).
    pub fn drain_settled(&self) -> bool {
        self.draining.as_ref().is_some_and(Vec::is_empty)
            && self.awaiting_commit.is_empty()
            && self.store.pending_write_bytes() == 0
            && !self.io.write_in_flight()
            && self.sends_in_flight.iter().all(|sends| *sends == 0)
    }

    /// Closes the draining sessions that owe no answer any more.
    pub(super) fn drain_step(&mut self) {
        let Some(waiting) = self.draining.take() else { return };
        let mut still_waiting = Vec::with_capacity(waiting.len());
        for conn in waiting {
            match self.sessions.get(&conn) {
                None | Some(Session::Closing) => {}
                Some(Session::Active { device, .. }) if self.senders.pending(*device) > 0 => still_waiting.push(conn),
                Some(_) => self.close_for_drain(conn),
            }
        }
        self.draining = Some(still_waiting);
    }

    /// Closes `conn` with SHUTTING_DOWN (after what was queued for it).
    pub(super) fn close_for_drain(&mut self, conn: ConnId) {
        if let Some(Session::Active { device, .. }) = self.sessions.get(&conn) {
            if self.online.get(device) == Some(&conn) {
                let device = *device;
                self.online.remove(&device);
                self.device_offline(device);
            }
        }
        self.sessions.insert(conn, Session::Closing);
        self.outputs.push_back(Output::Close { conn, frame: None, close_code: close_code::SHUTTING_DOWN });
    }
}
