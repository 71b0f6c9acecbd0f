//! Structure-aware: random sequences of connections, valid and invalid
//! Hellos, Sends, DeliveryAcks, device removals, raw frame bytes, closes and
//! the passing of time fed to one shard core, over the memory store or the
//! log store (with an in-memory disk whose writes and reads complete or fail
//! when the input says, tiny segments so the log rotates, compacts and
//! reclaims, and a body cache so small that pushes read bodies back). Nothing
//! a peer sends may panic it; pushes to a connection carry strictly
//! increasing seqs; outputs stay bounded by what was asked; a connection
//! without a Hello is closed once its hello timeout has passed. The log
//! store starts with a seq reservation of 8 that the input extends now and
//! then, so sends are refused at its end; no seq may reach it.

#![no_main]

use arbitrary::Arbitrary;
use iris_protocol::frames::{self, Frame};
use iris_protocol::{FrameDecoder, FRAME_BYTES_MAX_DEFAULT};
use iris_shard_map::{NodeId, ShardId, SlotTable};
use irisd::auth::{Claims, TokenAuthority};
use irisd::shard::core::{ReadOutcome, WriteOutcome};
use irisd::shard::mailbox::{RecordAt, StoreLimits};
use irisd::shard::{ConnId, CoreLimits, MailboxStore, MemoryStore, Now, Output, SendRates, ShardCore, ShardIdentity};
use irisd::storage::record::{frame_chunk, LogKey};
use irisd::storage::{LogLimits, LogStore};
use libfuzzer_sys::fuzz_target;
use std::collections::{BTreeMap, HashMap};

#[derive(Arbitrary, Debug)]
struct Input {
    /// The log store (else the memory store).
    log_store: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Connect,
    Hello {
        conn: u8,
        user: u8,
        device: u8,
        resume_after_seq: u64,
        expired: bool,
    },
    Send {
        conn: u8,
        to_user: u8,
        client_msg_id: u8,
        after: Option<u8>,
        payload_bytes: u8,
    },
    DeliveryAck {
        conn: u8,
        up_to_seq: u64,
    },
    Bytes {
        conn: u8,
        bytes: Vec<u8>,
    },
    Ping {
        conn: u8,
    },
    ShardMapRequest {
        conn: u8,
    },
    RemoveDevice {
        conn: u8,
        device: u8,
    },
    /// A presence frame: subscribe (0), unsubscribe (1), privacy (2) or typing (3).
    Presence {
        conn: u8,
        kind: u8,
        users: Vec<u8>,
    },
    Pull {
        conn: u8,
    },
    Close {
        conn: u8,
    },
    /// Time passes (ms).
    Tick {
        ms: u16,
    },
    /// The log's pending write completes (durable, or failed).
    Write {
        fail: bool,
    },
    /// One pending read of a cold body completes (or fails).
    Read {
        fail: bool,
        index: u8,
    },
    /// The driver extends the seq reservation to `by` above the highest seq.
    ExtendSeqs {
        by: u8,
    },
}

/// The log store's disk: segment files in memory.
#[derive(Default)]
struct Disk {
    files: BTreeMap<u64, Vec<u8>>,
    reads: Vec<RecordAt>,
}

impl Disk {
    fn write<S: MailboxStore>(&mut self, core: &mut ShardCore<S>, fail: bool, now: Now) {
        let Some(chunk) = core.poll_write(now) else { return };
        let file = self.files.entry(chunk.segment).or_default();
        let outcome = if fail || file.len() as u64 != chunk.start {
            WriteOutcome::Failed
        } else {
            frame_chunk(&LogKey::from_secret(&[5; 32]), chunk.segment, chunk.start, &chunk.bytes, file);
            WriteOutcome::Durable
        };
        core.handle_write_outcome(chunk.segment, chunk.first_ticket, chunk.last_ticket, outcome, now);
        for segment in core.poll_reclaim() {
            self.files.remove(&segment);
        }
    }

    fn read<S: MailboxStore>(&mut self, core: &mut ShardCore<S>, fail: bool, index: u8, now: Now) {
        while let Some(at) = core.poll_read(now) {
            self.reads.push(at);
        }
        if self.reads.is_empty() {
            return;
        }
        let at = self.reads.swap_remove(usize::from(index) % self.reads.len());
        match self.files.get(&at.segment) {
            _ if fail => core.handle_read(at, ReadOutcome::Failed("injected"), now),
            None => core.handle_read(at, ReadOutcome::SegmentGone("deleted"), now),
            Some(file) => {
                let start = (at.offset as usize).min(file.len());
                let end = (start + at.bytes as usize).min(file.len());
                let bytes = file[start..end].to_vec();
                core.handle_read(at, ReadOutcome::Bytes(&bytes), now);
            }
        }
    }
}

/// The hello timeout of the fuzzed core.
const HELLO_TIMEOUT_MS: u64 = 2_000;

/// A connection as the driver sees it.
struct Conn {
    id: ConnId,
    decoder: FrameDecoder,
    last_pushed_seq: u64,
    opened_ms: u64,
    /// The core authenticated it (its Welcome went out).
    welcomed: bool,
}

fuzz_target!(|input: Input| {
    let authority = TokenAuthority::from_secret([3; 32]);
    let identity = ShardIdentity {
        node: NodeId(0),
        shard: ShardId(0),
        advertised_host: "h".into(),
        shard_ports: vec![7700],
        message_ids: 1..1 << 40,
    };
    let table = SlotTable::single_node(NodeId(0), 1, 1).unwrap();
    let limits = CoreLimits {
        dedup_entries_per_device_max: 8,
        sender_dedup_entries_max: 1_048_576,
        sends_in_flight_per_device_max: 4,
        shard_outbox_messages_max: 8,
        device_inactive_expiry_s: 0,
        rates: SendRates::OFF,
        codel_target_ms: 0,
        codel_interval_ms: 100,
        hello_timeout_ms: HELLO_TIMEOUT_MS,
        commit_delay_us: 0,
        commit_bytes_max: 1 << 20,
        presence: irisd::shard::presence::PresenceLimits::DEFAULT,
    };
    let store_limits = StoreLimits {
        devices_per_user_max: 3,
        devices_per_shard_max: 16,
        mailbox_messages_max: 16,
        mailbox_bytes_max: 4096,
        // A quarter of a mailbox per sender, so shares refuse some sends too.
        mailbox_sender_messages_max: 4,
        mailbox_sender_bytes_max: 1024,
        stored_dedup_entries_max: 32,
        // Small, so the shard-wide budget refuses some sends too.
        shard_mailbox_bytes_max: 16 * 1024,
    };
    if input.log_store {
        // Segments of 2 KiB, and a body cache of 100 B: rotation, compaction,
        // reclaim and read-back all run within a few dozen sends.
        let log_limits = LogLimits {
            segment_bytes_max: 2048,
            commit_bytes_max: 1024,
            body_cache_bytes_max: 100,
            read_ahead_bytes_max: 600,
            disk_bytes_max: 64 * 1024,
        };
        let mut store = LogStore::new(store_limits, log_limits);
        store.extend_seq_reservation(8);
        let core = ShardCore::new(identity, table, authority.verifier(), limits, FRAME_BYTES_MAX_DEFAULT, store);
        run(core, &authority, input.ops);
    } else {
        let store = MemoryStore::new(store_limits);
        let core = ShardCore::new(identity, table, authority.verifier(), limits, FRAME_BYTES_MAX_DEFAULT, store);
        run(core, &authority, input.ops);
    }
});

/// Feeds `ops` to `core`, checking what the module documentation says.
fn run<S: MailboxStore>(mut core: ShardCore<S>, authority: &TokenAuthority, ops: Vec<Op>) {
    let mut disk = Disk::default();
    let mut conns: Vec<Conn> = Vec::new();
    let mut next_conn = 0u64;
    let mut now_ms = 1_000_000;
    // When the core last acted on its deadlines (`handle_timeout`).
    let mut timeouts_at_ms = 0;
    for op in ops.into_iter().take(512) {
        let pick = |conns: &Vec<Conn>, index: u8| (!conns.is_empty()).then(|| usize::from(index) % conns.len());
        let now = Now { monotonic_us: now_ms * 1000, wall_ms: now_ms };
        let mut frames_in: Vec<(ConnId, Frame)> = Vec::new();
        match op {
            Op::Connect => {
                if conns.len() < 32 {
                    let id = ConnId(next_conn);
                    next_conn += 1;
                    core.handle_connection(id, now);
                    let decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
                    conns.push(Conn { id, decoder, last_pushed_seq: 0, opened_ms: now_ms, welcomed: false });
                }
            }
            Op::Hello { conn, user, device, resume_after_seq, expired } => {
                if let Some(index) = pick(&conns, conn) {
                    let expires_at_s = if expired { 1 } else { now_ms / 1000 + 60 };
                    let claims =
                        Claims { user_id: u64::from(user % 8), device_id: u32::from(device % 4), expires_at_s };
                    let hello = frames::Hello { token: authority.mint(claims), resume_after_seq };
                    frames_in.push((conns[index].id, Frame::Hello(hello)));
                }
            }
            Op::Send { conn, to_user, client_msg_id, after, payload_bytes } => {
                if let Some(index) = pick(&conns, conn) {
                    let send = frames::Send {
                        client_msg_id: u64::from(client_msg_id),
                        to_user: u64::from(to_user % 8),
                        after: after.map(u64::from),
                        payload: vec![7; usize::from(payload_bytes)],
                    };
                    frames_in.push((conns[index].id, Frame::Send(send)));
                }
            }
            Op::DeliveryAck { conn, up_to_seq } => {
                if let Some(index) = pick(&conns, conn) {
                    frames_in.push((conns[index].id, Frame::DeliveryAck(frames::DeliveryAck { up_to_seq })));
                }
            }
            Op::Ping { conn } => {
                if let Some(index) = pick(&conns, conn) {
                    frames_in.push((conns[index].id, Frame::Ping(frames::Ping { nonce: 1 })));
                }
            }
            Op::ShardMapRequest { conn } => {
                if let Some(index) = pick(&conns, conn) {
                    frames_in.push((conns[index].id, Frame::ShardMapRequest(frames::ShardMapRequest {})));
                }
            }
            Op::RemoveDevice { conn, device } => {
                if let Some(index) = pick(&conns, conn) {
                    let remove = frames::RemoveDevice { device_id: u32::from(device % 4) };
                    frames_in.push((conns[index].id, Frame::RemoveDevice(remove)));
                }
            }
            Op::Presence { conn, kind, users } => {
                if let Some(index) = pick(&conns, conn) {
                    let users: Vec<u64> = users.iter().map(|user| u64::from(*user % 8)).collect();
                    let frame = match kind % 4 {
                        0 => Frame::PresenceSubscribe(frames::PresenceSubscribe { users }),
                        1 => Frame::PresenceUnsubscribe(frames::PresenceUnsubscribe { users }),
                        2 => Frame::PresencePrivacy(frames::PresencePrivacy { privacy: kind / 4 % 4 }),
                        _ => Frame::Typing(frames::Typing {
                            to_user: users.first().copied().unwrap_or(0),
                            active: kind / 4 % 2 == 0,
                        }),
                    };
                    frames_in.push((conns[index].id, frame));
                }
            }
            Op::Bytes { conn, bytes } => {
                if let Some(index) = pick(&conns, conn) {
                    let connection = &mut conns[index];
                    connection.decoder.feed(&bytes);
                    loop {
                        match connection.decoder.next_frame() {
                            Ok(Some(frame)) => frames_in.push((connection.id, frame)),
                            Ok(None) => break,
                            Err(error) => {
                                core.handle_decode_error(connection.id, error.code(), error.to_string(), now);
                                connection.decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
                                break;
                            }
                        }
                    }
                }
            }
            Op::Pull { conn } => {
                if let Some(index) = pick(&conns, conn) {
                    let connection = &mut conns[index];
                    for _ in 0..64 {
                        match core.poll_push(connection.id) {
                            Some(Frame::Deliver(deliver)) => {
                                assert!(deliver.seq > connection.last_pushed_seq, "pushed seqs must increase");
                                connection.last_pushed_seq = deliver.seq;
                            }
                            Some(other) => panic!("a push must be a Deliver, got {other:?}"),
                            None => break,
                        }
                    }
                    // The ephemeral stream carries Presence (each user once
                    // per pull: coalesced) and TypingNotice frames only.
                    let mut seen = std::collections::HashSet::new();
                    while let Some(frame) = core.poll_ephemeral(connection.id) {
                        match frame {
                            Frame::Presence(presence) => {
                                assert!(seen.insert(presence.user), "user {} twice in one queue", presence.user);
                                assert!(presence.state <= frames::PRESENCE_UNAVAILABLE);
                            }
                            Frame::TypingNotice(_) => {}
                            other => panic!("ephemeral frame {other:?}"),
                        }
                    }
                }
            }
            Op::Close { conn } => {
                if let Some(index) = pick(&conns, conn) {
                    let connection = conns.swap_remove(index);
                    core.handle_connection_closed(connection.id, now);
                }
            }
            Op::Tick { ms } => {
                now_ms += u64::from(ms);
                core.handle_timeout(Now { monotonic_us: now_ms * 1000, wall_ms: now_ms });
                timeouts_at_ms = now_ms;
            }
            Op::Write { fail } => disk.write(&mut core, fail, now),
            Op::Read { fail, index } => disk.read(&mut core, fail, index, now),
            Op::ExtendSeqs { by } => {
                if let Some(reservation) = core.seq_reservation() {
                    let end = reservation.high.saturating_add(1 + u64::from(by)).max(reservation.end);
                    core.extend_seq_reservation(end);
                }
            }
        }
        for (conn, frame) in frames_in {
            core.handle_frame(conn, frame, now);
        }
        let mut outputs = 0;
        let mut closing = HashMap::new();
        while let Some(output) = core.poll_output() {
            outputs += 1;
            assert!(outputs < 10_000, "outputs must stay bounded");
            match output {
                Output::Close { conn, .. } => {
                    closing.insert(conn, ());
                }
                Output::Authenticated { conn } => {
                    if let Some(connection) = conns.iter_mut().find(|c| c.id == conn) {
                        connection.welcomed = true;
                    }
                }
                Output::CloseNow { conn, .. } => {
                    let connection = conns.iter().find(|c| c.id == conn).expect("a CloseNow of a live connection");
                    assert!(now_ms - connection.opened_ms >= HELLO_TIMEOUT_MS, "closed before its hello timeout");
                    closing.insert(conn, ());
                }
                _ => {}
            }
        }
        // No unauthenticated connection outlives a handle_timeout past its deadline.
        for connection in conns.iter().filter(|c| !c.welcomed && !closing.contains_key(&c.id)) {
            assert!(
                connection.opened_ms + HELLO_TIMEOUT_MS > timeouts_at_ms,
                "a connection outlived its hello timeout"
            );
        }
        while core.poll_push_ready().is_some() {}
        while core.poll_ephemeral_ready().is_some() {}
        if let Some(reservation) = core.seq_reservation() {
            assert!(reservation.high < reservation.end, "seq {} handed out at or past the reservation", reservation.high);
        }
        // The driver closes what the core asked it to close.
        conns.retain(|connection| {
            let close = closing.contains_key(&connection.id);
            if close {
                core.handle_connection_closed(connection.id, now);
            }
            !close
        });
    }
}
