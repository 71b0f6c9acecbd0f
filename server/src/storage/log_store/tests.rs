//! Unit tests of `log_store`.

use super::*;
use crate::shard::mailbox::MAILBOX_ENTRY_OVERHEAD_BYTES;
use crate::storage::record::{append_chunk, scan_segment, test_key};
use iris_protocol::ErrorCode;

fn limits() -> StoreLimits {
    StoreLimits {
        devices_per_user_max: 5,
        devices_per_shard_max: 100,
        mailbox_messages_max: 100_000,
        mailbox_bytes_max: 1 << 30,
        mailbox_sender_messages_max: u32::MAX,
        mailbox_sender_bytes_max: u64::MAX,
        // Small, so segments leave the dedup window within a test.
        stored_dedup_entries_max: DEDUP_WINDOW,
        shard_mailbox_bytes_max: 1 << 40,
    }
}

const DEDUP_WINDOW: u32 = 8;

fn message(id: u64, to_user: u64, bytes: usize) -> Rc<MailboxMessage> {
    Rc::new(MailboxMessage {
        from_user: 1,
        from_device: 1,
        client_msg_id: id,
        server_msg_id: 1000 + id,
        sent_at_ms: 7,
        to_user,
        payload: vec![id as u8; bytes],
    })
}

/// Writes every pending chunk into in-memory "segment files" and marks it durable.
/// What the driver does between writes: upkeep, then every chunk made
/// durable, then reclaim.
fn flush(store: &mut LogStore, files: &mut BTreeMap<u64, Vec<u8>>) {
    store.maintain();
    while let Some(chunk) = store.take_write() {
        append_chunk(&test_key(), files.entry(chunk.segment).or_default(), chunk.segment, &chunk.bytes);
        store.on_write_durable(chunk.segment, chunk.first_ticket, chunk.last_ticket);
    }
    for segment in store.take_reclaimable() {
        files.remove(&segment);
    }
}

fn recover(files: &BTreeMap<u64, Vec<u8>>, log_limits: LogLimits) -> LogStore {
    let scans: Vec<(u64, Scan)> =
        files.iter().map(|(segment, bytes)| (*segment, scan_segment(bytes, &test_key()))).collect();
    LogStore::recover(limits(), log_limits, &scans).0
}

/// (seq, client_msg_id) of every message `device`'s push would get, from a
/// store that keeps every body in memory.
fn mailbox(store: &LogStore, device: DeviceKey) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut after = 0;
    while let Some(next) = store.next_after(device, after) {
        let Next::Ready(seq, message) = next else { panic!("a cold entry in a store that keeps bodies") };
        out.push((seq, message.client_msg_id));
        after = seq;
    }
    out
}

/// Serves every read the store asks for from `files`, as the reader does.
fn serve_reads(store: &mut LogStore, files: &BTreeMap<u64, Vec<u8>>) -> Vec<DeviceKey> {
    let mut ready = Vec::new();
    while let Some(at) = store.take_read() {
        let file = files.get(&at.segment).map(Vec::as_slice).unwrap_or_default();
        let start = (at.offset as usize).min(file.len());
        let end = (start + at.bytes as usize).min(file.len());
        ready.extend(store.on_read(at, Ok(&file[start..end])));
    }
    ready
}

/// Pushes `device`'s whole mailbox as the core does, reading cold bodies
/// back from `files`: (seq, client_msg_id, payload) of each.
fn push_all(store: &mut LogStore, device: DeviceKey, files: &BTreeMap<u64, Vec<u8>>) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut after = 0;
    for _ in 0..1_000_000 {
        match store.next_after(device, after) {
            None => return out,
            Some(Next::Ready(seq, message)) => {
                out.push((seq, message.client_msg_id, message.payload.clone()));
                store.note_pushed(device, seq);
                after = seq;
            }
            Some(Next::Cold(_)) => {
                store.want_bodies(device, after);
                let ready = serve_reads(store, files);
                assert!(ready.contains(&device), "the read a push waits for names its device");
            }
        }
    }
    panic!("pushes never ended");
}

/// Bounds with a body cache of `body_cache_bytes_max` and `read_ahead_bytes_max`.
fn cold_limits(segment_bytes_max: u64, body_cache_bytes_max: u64, read_ahead_bytes_max: u64) -> LogLimits {
    LogLimits { body_cache_bytes_max, read_ahead_bytes_max, ..LogLimits::keep_bodies(segment_bytes_max, 4096) }
}

#[test]
fn replay_rebuilds_registry_mailboxes_seqs_and_dedup() {
    let log_limits = LogLimits::keep_bodies(1 << 20, 4096);
    let mut store = LogStore::new(limits(), log_limits);
    let mut files = BTreeMap::new();
    let (a, b) = (DeviceKey { user: 2, device: 1 }, DeviceKey { user: 2, device: 2 });
    store.register_device(a).unwrap();
    store.register_device(b).unwrap();
    for id in 1..=10 {
        store.store_message(message(id, 2, 50), &[a, b]).unwrap();
    }
    assert!(store.next_after(a, 0).is_none(), "nothing is visible before it is durable");
    flush(&mut store, &mut files);
    store.acknowledge(a, 4);
    flush(&mut store, &mut files);

    let recovered = recover(&files, log_limits);
    assert_eq!(recovered.devices_of(2), &[1, 2]);
    assert_eq!(mailbox(&recovered, a), mailbox(&store, a));
    assert_eq!(mailbox(&recovered, a).first(), Some(&(5, 5)));
    assert_eq!(mailbox(&recovered, b).len(), 10);
    assert_eq!(recovered.last_seq(a), 10);
    assert_eq!(recovered.find_stored(DeviceKey { user: 1, device: 1 }, 3).map(|(id, _)| id), Some(1003));
}

#[test]
fn rotation_reclaim_and_compaction_keep_state_across_recovery() {
    let log_limits = LogLimits::keep_bodies(4096, 1024);
    let mut store = LogStore::new(limits(), log_limits);
    let mut files = BTreeMap::new();
    let (busy, idle) = (DeviceKey { user: 2, device: 1 }, DeviceKey { user: 3, device: 1 });
    store.register_device(busy).unwrap();
    store.register_device(idle).unwrap();
    // One message that stays undelivered, then many that get acknowledged.
    store.store_message(message(0, 3, 100), &[idle]).unwrap();
    for id in 1..=200 {
        store.store_message(message(id, 2, 100), &[busy]).unwrap();
        flush(&mut store, &mut files);
        store.acknowledge(busy, id);
        store.maintain();
        flush(&mut store, &mut files);
    }
    assert!(store.current_segment > 5, "the log should have rotated many times");
    assert!(files.len() <= 3, "delivered and compacted segments should be gone: {:?}", files.keys());
    let recovered = recover(&files, log_limits);
    assert_eq!(recovered.last_seq(busy), 200, "seq state survives reclaim");
    assert!(mailbox(&recovered, busy).is_empty());
    assert_eq!(mailbox(&recovered, idle), vec![(1, 0)], "the undelivered message survives compaction");
    assert_eq!(recovered.devices_of(3), &[1]);
}

/// Like `flush` after `maintain`, but a chunk carrying device state
/// forward (a `DeviceState` record) fails, `failures` times in all.
fn flush_failing_carries(store: &mut LogStore, files: &mut BTreeMap<u64, Vec<u8>>, failures: &mut u32) {
    store.maintain();
    while let Some(chunk) = store.take_write() {
        let carries = scan_segment(&chunk.bytes, &test_key())
            .records
            .iter()
            .any(|(_, record)| matches!(record, Record::DeviceState(_)));
        if carries && *failures > 0 {
            *failures -= 1;
            store.on_write_failed(chunk.segment, chunk.first_ticket, chunk.last_ticket);
            continue;
        }
        append_chunk(&test_key(), files.entry(chunk.segment).or_default(), chunk.segment, &chunk.bytes);
        store.on_write_durable(chunk.segment, chunk.first_ticket, chunk.last_ticket);
    }
    for segment in store.take_reclaimable() {
        files.remove(&segment);
    }
}

const QUIET: DeviceKey = DeviceKey { user: 2, device: 1 };
const BUSY: DeviceKey = DeviceKey { user: 3, device: 1 };

/// A log of 4 KiB segments with [`QUIET`] and [`BUSY`] registered.
fn small_log_of_two_devices() -> (LogLimits, LogStore, BTreeMap<u64, Vec<u8>>) {
    let log_limits = LogLimits::keep_bodies(4096, 1024);
    let mut store = LogStore::new(limits(), log_limits);
    store.register_device(QUIET).unwrap();
    store.register_device(BUSY).unwrap();
    (log_limits, store, BTreeMap::new())
}

#[test]
fn a_failed_carry_never_lets_reclaim_delete_the_only_device_state() {
    let (log_limits, mut store, mut files) = small_log_of_two_devices();
    let (quiet, busy) = (QUIET, BUSY);
    for id in 1..=5 {
        store.store_message(message(id, 2, 10), &[quiet]).unwrap();
    }
    flush(&mut store, &mut files);
    store.acknowledge(quiet, 5);
    flush(&mut store, &mut files);
    // Delivered traffic: compaction carries the quiet device's state out
    // of the first segment; that write fails twice, then succeeds.
    let mut failures = 2;
    let mut id = 100;
    let mut after_failure = 0;
    while after_failure < 2 * DEDUP_WINDOW {
        after_failure += u32::from(failures == 0);
        store.store_message(message(id, 3, 100), &[busy]).unwrap();
        flush_failing_carries(&mut store, &mut files, &mut failures);
        assert!(failures == 0 || files.contains_key(&1), "reclaimed before its device state was carried");
        store.acknowledge(busy, store.last_seq(busy));
        flush_failing_carries(&mut store, &mut files, &mut failures);
        id += 1;
    }
    assert!(!files.contains_key(&1), "the delivered first segment should be reclaimed");
    // A crash now: the quiet device's state must still be on disk.
    let recovered = recover(&files, log_limits);
    assert_eq!(recovered.last_seq(quiet), 5, "the quiet device's seq must survive reclaim");
    assert_eq!(recovered.last_seq(busy), store.last_seq(busy));
}

#[test]
fn recovery_continues_in_a_new_segment_and_state_is_carried_out_of_old_ones() {
    let (log_limits, mut store, mut files) = small_log_of_two_devices();
    let (quiet, busy) = (QUIET, BUSY);
    store.store_message(message(1, 2, 10), &[quiet]).unwrap();
    flush(&mut store, &mut files);
    store.acknowledge(quiet, 1);
    flush(&mut store, &mut files);
    // A second segment holding only a later record.
    let mut records = Vec::new();
    encode_record(&Record::Acknowledged(Acknowledged { user: 3, device: 1, up_to_seq: 0 }), &mut records);
    let mut second = Vec::new();
    append_chunk(&test_key(), &mut second, 2, &records);
    files.insert(2, second);
    // Restart twice, each time delivering a little (less than a
    // segment) and reclaiming.
    let mut store = recover(&files, log_limits);
    for _ in 0..2 {
        for id in 10..20 {
            store.store_message(message(id, 3, 100), &[busy]).unwrap();
            store.acknowledge(busy, store.last_seq(busy));
            store.maintain();
            flush(&mut store, &mut files);
        }
        store = recover(&files, log_limits);
    }
    assert!(!files.contains_key(&1), "the first segment should be reclaimed");
    assert_eq!(store.last_seq(quiet), 1, "the device state of the first segment survives");
}

#[test]
fn a_segment_holding_recent_dedup_keys_outlives_its_delivery() {
    let (log_limits, mut store, mut files) = small_log_of_two_devices();
    let sender = DeviceKey { user: 1, device: 1 };
    store.store_message(message(1, 2, 10), &[QUIET]).unwrap();
    flush(&mut store, &mut files);
    store.acknowledge(QUIET, 1);
    flush(&mut store, &mut files);
    // Fewer newer messages than the window, but several segments.
    for id in 2..u64::from(DEDUP_WINDOW) {
        store.store_message(message(id, 3, 1500), &[BUSY]).unwrap();
        store.acknowledge(BUSY, store.last_seq(BUSY));
        flush(&mut store, &mut files);
    }
    assert!(store.current_segment > 2, "the log should have rotated");
    assert!(files.contains_key(&1), "the first segment still holds a recent dedup key");
    let recovered = recover(&files, log_limits);
    assert_eq!(recovered.find_stored(sender, 1).map(|(id, _)| id), Some(1001), "a retry after a crash is known");
    // Once the key has left the window, the segment goes.
    for id in 100..120 {
        store.store_message(message(id, 3, 10), &[BUSY]).unwrap();
        store.acknowledge(BUSY, store.last_seq(BUSY));
        flush(&mut store, &mut files);
    }
    assert!(!files.contains_key(&1), "reclaimed after its keys aged out of the window");
}

#[test]
fn compaction_copies_never_push_recent_keys_out_of_the_dedup_window() {
    // The quiet device is offline with 4 messages; busy traffic makes the
    // log rotate, and compaction copies the quiet messages forward again
    // and again. A key is in the window while fewer than DEDUP_WINDOW
    // newer messages were stored, however many copies compaction made.
    let (log_limits, mut store, mut files) = small_log_of_two_devices();
    let sender = DeviceKey { user: 1, device: 1 };
    for id in 1..=4 {
        store.store_message(message(id, QUIET.user, 1), &[QUIET]).unwrap();
    }
    flush(&mut store, &mut files);
    let mut id = 100;
    let mut checked = 0;
    for _ in 0..30 {
        let key = id;
        for _ in 0..DEDUP_WINDOW {
            store.store_message(message(id, BUSY.user, 1000), &[BUSY]).unwrap();
            flush(&mut store, &mut files);
            store.acknowledge(BUSY, store.last_seq(BUSY));
            flush(&mut store, &mut files);
            id += 1;
        }
        // `key` is the oldest of the window's DEDUP_WINDOW messages.
        assert!(store.find_stored(sender, key).is_some(), "key {key} left the window early");
        assert!(recover(&files, log_limits).find_stored(sender, key).is_some(), "key {key} lost by recovery");
        checked += 1;
    }
    let stats = store.stats();
    assert!(stats.compactions_total >= 10, "compaction must have run: {stats:?}");
    assert_eq!(checked, 30);
    assert_eq!(mailbox(&store, QUIET).len(), 4, "the quiet messages are all kept");
}

#[test]
fn a_removed_device_stays_removed_across_failed_writes_reclaim_and_recovery() {
    let (log_limits, mut store, mut files) = small_log_of_two_devices();
    flush(&mut store, &mut files);
    store.store_message(message(1, QUIET.user, 10), &[QUIET]).unwrap();
    flush(&mut store, &mut files);
    store.remove_device(QUIET).unwrap();
    assert!(store.removal_pending(QUIET));
    assert_eq!(store.register_device(QUIET), Err(StoreError::DeviceRemoved(QUIET)));
    // Its first write fails: the removal is written again.
    let chunk = store.take_write().unwrap();
    store.on_write_failed(chunk.segment, chunk.first_ticket, chunk.last_ticket);
    assert!(store.removal_pending(QUIET), "not durable yet: the answer must wait");
    flush(&mut store, &mut files);
    assert!(!store.removal_pending(QUIET));
    let recovered = recover(&files, log_limits);
    assert!(recovered.is_removed(QUIET) && recovered.devices_of(QUIET.user).is_empty());
    assert_eq!(mailbox(&recovered, QUIET), vec![], "its undelivered message is gone");
    // Many rotations later, with the segment of the removal record
    // reclaimed, the carried DeviceRemoved records keep it.
    let mut store = recovered;
    for id in 10..200 {
        store.store_message(message(id, BUSY.user, 100), &[BUSY]).unwrap();
        store.acknowledge(BUSY, store.last_seq(BUSY));
        flush(&mut store, &mut files);
    }
    assert!(!files.contains_key(&1), "the first segments should be reclaimed");
    let mut recovered = recover(&files, log_limits);
    assert!(recovered.is_removed(QUIET));
    assert_eq!(recovered.register_device(QUIET), Err(StoreError::DeviceRemoved(QUIET)));
    assert_eq!(
        recovered.remove_device(DeviceKey { user: 9, device: 1 }),
        Err(StoreError::UnknownDevice(DeviceKey { user: 9, device: 1 }))
    );
}

#[test]
fn removals_past_the_per_user_memory_and_unknown_ids_keep_the_right_devices_removed() {
    let (log_limits, mut store, mut files) = small_log_of_two_devices();
    let user = 7;
    let device = |id| DeviceKey { user, device: id };
    // Removing ids the user never had changes nothing.
    for id in 100..120 {
        assert_eq!(store.remove_device(device(id)), Err(StoreError::UnknownDevice(device(id))));
    }
    // 17 devices registered and removed in turn: the first is forgotten.
    for id in 1..=17 {
        store.register_device(device(id)).unwrap();
        store.store_message(message(id.into(), user, 50), &[device(id)]).unwrap();
        flush(&mut store, &mut files);
        store.remove_device(device(id)).unwrap();
        flush(&mut store, &mut files);
    }
    assert!(!store.is_removed(device(1)) && store.is_removed(device(2)) && store.is_removed(device(17)));
    // The forgotten one registers again and gets a message; traffic
    // rotates, compacts and reclaims the log meanwhile.
    store.register_device(device(1)).unwrap();
    store.store_message(message(500, user, 50), &[device(1)]).unwrap();
    for id in 600..800 {
        store.store_message(message(id, BUSY.user, 100), &[BUSY]).unwrap();
        store.acknowledge(BUSY, store.last_seq(BUSY));
        flush(&mut store, &mut files);
    }
    assert_eq!(mailbox(&store, device(1)).len(), 1, "before the restart");
    let recovered = recover(&files, log_limits);
    assert_eq!(recovered.devices_of(user), &[1], "only the re-registered device lives");
    assert_eq!(mailbox(&recovered, device(1)).len(), 1, "its new message survives");
    assert!((2..=17).all(|id| recovered.is_removed(device(id))), "the 16 newest removals are remembered");
}

#[test]
fn a_removal_that_would_forget_one_not_yet_durable_waits() {
    let log_limits = LogLimits::keep_bodies(4096, 1024);
    let mut store = LogStore::new(StoreLimits { devices_per_user_max: 20, ..limits() }, log_limits);
    let mut files = BTreeMap::new();
    let device = |id| DeviceKey { user: 7, device: id };
    for id in 1..=17 {
        store.register_device(device(id)).unwrap();
    }
    flush(&mut store, &mut files);
    // 16 removals in one write window: all remembered, none durable.
    for id in 1..=16 {
        store.remove_device(device(id)).unwrap();
    }
    assert_eq!(store.remove_device(device(17)), Err(StoreError::Backlog), "it would forget device 1's pending removal");
    flush(&mut store, &mut files);
    store.remove_device(device(17)).unwrap();
    assert!(!store.is_removed(device(1)) && store.is_removed(device(17)));
    // A removal replayed twice (an old copy first) keeps its newest ordinal.
    let mut index = MailboxIndex::new(limits());
    index.remember_removed(device(1), 18);
    index.remember_removed(device(2), 5);
    index.remember_removed(device(1), 1);
    assert_eq!((index.removal_ordinal(device(1)), index.removal_ordinal(device(2))), (Some(18), Some(5)));
}

#[test]
fn a_registration_whose_write_failed_is_written_again() {
    let log_limits = LogLimits::keep_bodies(1 << 20, 4096);
    let mut store = LogStore::new(limits(), log_limits);
    let mut files = BTreeMap::new();
    store.register_device(QUIET).unwrap();
    assert!(store.registration_pending(QUIET));
    let chunk = store.take_write().unwrap();
    store.on_write_failed(chunk.segment, chunk.first_ticket, chunk.last_ticket);
    assert!(store.registration_pending(QUIET), "not durable yet: its Hello must keep waiting");
    flush(&mut store, &mut files);
    assert!(!store.registration_pending(QUIET));
    assert_eq!(recover(&files, log_limits).devices_of(QUIET.user), &[QUIET.device]);
}

#[test]
fn idle_devices_state_is_carried_with_its_segment_not_rewritten_at_every_rotation() {
    let log_limits = LogLimits::keep_bodies(4096, 1024);
    let mut store = LogStore::new(StoreLimits { devices_per_shard_max: 1000, ..limits() }, log_limits);
    let mut files = BTreeMap::new();
    // Idle devices: about 40 B of state each, 500 of them ~20 KB.
    for user in 10..510 {
        store.register_device(DeviceKey { user, device: 1 }).unwrap();
    }
    flush(&mut store, &mut files);
    let busy = DeviceKey { user: 10, device: 1 };
    let mut state_records = 0;
    for id in 0..1500 {
        store.store_message(message(id, 10, 100), &[busy]).unwrap();
        store.acknowledge(busy, store.last_seq(busy));
        store.maintain();
        while let Some(chunk) = store.take_write() {
            state_records += scan_segment(&chunk.bytes, &test_key())
                .records
                .iter()
                .filter(|(_, record)| matches!(record, Record::DeviceState(_)))
                .count();
            append_chunk(&test_key(), files.entry(chunk.segment).or_default(), chunk.segment, &chunk.bytes);
            store.on_write_durable(chunk.segment, chunk.first_ticket, chunk.last_ticket);
        }
        for segment in store.take_reclaimable() {
            files.remove(&segment);
        }
    }
    // ~300 KB of messages: about 70 rotations. A full checkpoint per
    // rotation would have written 500 states each time (35,000 records).
    assert!(store.current_segment > 60, "rotated only {} times", store.current_segment);
    assert!(state_records < 5 * 500, "{state_records} device states written for 500 idle devices");
    assert!(files.len() < 20, "the idle devices' state should stay compact: {} segments", files.len());
    let recovered = recover(&files, log_limits);
    assert_eq!(recovered.last_seq(busy), 1500);
    assert_eq!((10..510).filter(|user| recovered.devices_of(*user) == [1]).count(), 500);
}

#[test]
#[should_panic(expected = "contiguously")]
fn a_durable_chunk_after_a_lost_one_is_refused() {
    let log_limits = LogLimits::keep_bodies(1 << 20, 64);
    let mut store = LogStore::new(limits(), log_limits);
    let device = DeviceKey { user: 2, device: 1 };
    store.register_device(device).unwrap();
    store.store_message(message(1, 2, 100), &[device]).unwrap();
    store.store_message(message(2, 2, 100), &[device]).unwrap();
    let lost = store.take_write().unwrap();
    let next = store.take_write().unwrap();
    assert!(next.first_ticket > lost.last_ticket);
    // The first chunk never reached the disk; the second must not make it count.
    store.on_write_durable(next.segment, next.first_ticket, next.last_ticket);
}

/// A store with device 2/1 registered durably, chunks of `commit_bytes_max`.
fn store_of_one_device(commit_bytes_max: usize) -> (LogLimits, LogStore, DeviceKey, BTreeMap<u64, Vec<u8>>) {
    let log_limits = LogLimits::keep_bodies(1 << 20, commit_bytes_max);
    let mut store = LogStore::new(limits(), log_limits);
    let device = DeviceKey { user: 2, device: 1 };
    store.register_device(device).unwrap();
    let mut files = BTreeMap::new();
    flush(&mut store, &mut files);
    (log_limits, store, device, files)
}

#[test]
fn a_failed_write_drops_its_messages_and_reports_the_tickets() {
    let (_, mut store, device, _) = store_of_one_device(1 << 16);
    let ticket = store.store_message(message(1, 2, 10), &[device]).unwrap();
    let chunk = store.take_write().unwrap();
    store.on_write_failed(chunk.segment, chunk.first_ticket, chunk.last_ticket);
    assert!(store.ticket_failed(ticket));
    assert_eq!(store.committed_ticket(), chunk.last_ticket);
    assert!(store.next_after(device, 0).is_none());
    assert!(store.find_stored(DeviceKey { user: 1, device: 1 }, 1).is_none(), "a retry must be stored again");
}

#[test]
fn a_message_record_fits_its_size_bound() {
    for (payload, recipients) in [(0, 1), (1, 1), (100, 5), (65_000, 64), (7, 64)] {
        let mut bytes = Vec::new();
        let list = (0..recipients).map(|device| RecipientSeq { device, seq: u64::MAX - 1 }).collect();
        let mut stored = (*message(u64::MAX / 2, u64::MAX, payload)).clone();
        stored.client_msg_id = u64::MAX;
        encode_record(&message_record(&stored, list, false), &mut bytes);
        assert!(
            bytes.len() as u32 <= message_record_bytes_max(payload, recipients as usize),
            "{payload} B, {recipients}"
        );
    }
}

#[test]
fn a_failed_write_fails_every_change_made_before_the_store_learned_of_it() {
    // Tiny chunks: each message is a chunk of its own.
    let (log_limits, mut store, device, mut files) = store_of_one_device(64);
    let sender = DeviceKey { user: 1, device: 1 };
    let first = store.store_message(message(1, 2, 100), &[device]).unwrap();
    let chunk = store.take_write().unwrap();
    // Appended while the first chunk is being written, in chunks of their own.
    let second = store.store_message(message(2, 2, 100), &[device]).unwrap();
    let third = store.store_message(message(3, 2, 100), &[device]).unwrap();
    assert!(store.pending_write_bytes() > 0);
    store.on_write_failed(chunk.segment, chunk.first_ticket, chunk.last_ticket);
    for ticket in [first, second, third] {
        assert!(store.ticket_failed(ticket), "ticket {ticket} must fail with the chunk before it");
    }
    assert_eq!(store.pending_write_bytes(), 0, "nothing appended before the failure is written");
    assert!(store.find_stored(sender, 2).is_none() && store.find_stored(sender, 3).is_none());
    // The retries, in order, are stored normally after the failure.
    for id in 1..=3 {
        store.store_message(message(id, 2, 100), &[device]).unwrap();
    }
    flush(&mut store, &mut files);
    let ids: Vec<u64> = mailbox(&store, device).iter().map(|(_, id)| *id).collect();
    assert_eq!(ids, [1, 2, 3]);
    let recovered = recover(&files, log_limits);
    assert_eq!(mailbox(&recovered, device).iter().map(|(_, id)| *id).collect::<Vec<_>>(), [1, 2, 3]);
}

#[test]
fn bodies_past_the_cache_go_cold_and_are_read_back_in_order_when_pushed() {
    let log_limits = cold_limits(1 << 20, 1000, 2000);
    let mut store = LogStore::new(limits(), log_limits);
    let mut files = BTreeMap::new();
    let device = DeviceKey { user: 2, device: 1 };
    store.register_device(device).unwrap();
    for id in 1..=100 {
        store.store_message(message(id, 2, 100), &[device]).unwrap();
        if id % 10 == 0 {
            flush(&mut store, &mut files);
        }
    }
    let stats = store.stats();
    assert!(stats.body_bytes <= 1000, "the cache holds {} bytes", stats.body_bytes);
    assert_eq!(stats.index_bytes, 100 * MAILBOX_ENTRY_OVERHEAD_BYTES);
    assert_eq!(stats.cooled_total, 90, "the oldest bodies went first");
    assert_eq!(store.next_after(device, 0), Some(Next::Cold(1)));
    let pushed = push_all(&mut store, device, &files);
    let expected: Vec<(u64, u64, Vec<u8>)> = (1..=100).map(|id| (id, id, vec![id as u8; 100])).collect();
    assert_eq!(pushed, expected);
    // Read-ahead: 90 cold bodies in a few reads' worth of waits, and every
    // body read back is let go once pushed.
    assert_eq!(store.stats().reads_total, 90);
    assert_eq!(store.read_back_bytes(), 0);
    assert_eq!(store.read_back_bytes(), store.recount_read_back_bytes());
}

#[test]
fn read_ahead_stays_within_its_bound() {
    let log_limits = cold_limits(1 << 20, 0, 1000);
    let mut store = LogStore::new(limits(), log_limits);
    let mut files = BTreeMap::new();
    let device = DeviceKey { user: 2, device: 1 };
    store.register_device(device).unwrap();
    for id in 1..=50 {
        store.store_message(message(id, 2, 100), &[device]).unwrap();
    }
    flush(&mut store, &mut files);
    assert_eq!(store.stats().body_bytes, 0);
    store.want_bodies(device, 0);
    assert!(store.read_back_bytes() <= 1000, "asked for {} bytes", store.read_back_bytes());
    assert!(store.reads_pending() > 1, "the push reads ahead");
    serve_reads(&mut store, &files);
    assert!(store.read_back_bytes() <= 1000);
    assert_eq!(push_all(&mut store, device, &files).len(), 50);
}

#[test]
fn recovery_keeps_no_more_bodies_than_the_cache_and_reads_the_rest_back() {
    let log_limits = cold_limits(4096, 500, 4096);
    let mut store = LogStore::new(limits(), log_limits);
    let mut files = BTreeMap::new();
    let (a, b) = (DeviceKey { user: 2, device: 1 }, DeviceKey { user: 2, device: 2 });
    store.register_device(a).unwrap();
    store.register_device(b).unwrap();
    for id in 1..=60 {
        store.store_message(message(id, 2, 150), &[a, b]).unwrap();
        flush(&mut store, &mut files);
    }
    store.acknowledge(a, 20);
    flush(&mut store, &mut files);
    let mut recovered = recover(&files, log_limits);
    assert!(recovered.stats().body_bytes <= 500, "recovery holds {} bytes of bodies", recovered.stats().body_bytes);
    let ids = |pushed: Vec<(u64, u64, Vec<u8>)>| pushed.into_iter().map(|(_, id, _)| id).collect::<Vec<_>>();
    assert_eq!(ids(push_all(&mut recovered, a, &files)), (21..=60).collect::<Vec<_>>());
    assert_eq!(ids(push_all(&mut recovered, b, &files)), (1..=60).collect::<Vec<_>>());
}

#[test]
fn compaction_reads_cold_entries_back_before_copying_them() {
    let log_limits = cold_limits(4096, 0, 1 << 16);
    let mut store = LogStore::new(limits(), log_limits);
    let mut files = BTreeMap::new();
    let (a, b) = (DeviceKey { user: 2, device: 1 }, DeviceKey { user: 3, device: 1 });
    store.register_device(a).unwrap();
    store.register_device(b).unwrap();
    // One message for b among many for a, in the first segments.
    store.store_message(message(1, 3, 40), &[b]).unwrap();
    for id in 2..=120 {
        store.store_message(message(id, 2, 40), &[a]).unwrap();
        flush(&mut store, &mut files);
    }
    store.acknowledge(a, u64::MAX);
    // Push the window of dedup keys past the first segments.
    for id in 121..=160 {
        store.store_message(message(id, 2, 40), &[a]).unwrap();
        store.acknowledge(a, u64::MAX);
        flush(&mut store, &mut files);
    }
    let first_segment = store.index.entry(b, 1).unwrap().segment;
    assert_eq!(store.stats().body_bytes, 0, "every body is cold");
    // The pass asks for b's cold body first, then copies it.
    for _ in 0..8 {
        flush(&mut store, &mut files);
        serve_reads(&mut store, &files);
    }
    assert!(!files.contains_key(&first_segment), "the mostly dead segment was compacted away");
    assert_ne!(store.index.entry(b, 1).unwrap().segment, first_segment);
    let pushed = push_all(&mut store, b, &files);
    assert_eq!(pushed, vec![(1, 1, vec![1; 40])]);
    let mut recovered = recover(&files, log_limits);
    assert_eq!(push_all(&mut recovered, b, &files), pushed);
}

#[test]
fn a_record_that_does_not_decode_drops_only_its_message_and_a_failed_read_is_asked_again() {
    let log_limits = cold_limits(1 << 20, 0, 1 << 16);
    let mut store = LogStore::new(limits(), log_limits);
    let mut files = BTreeMap::new();
    let device = DeviceKey { user: 2, device: 1 };
    store.register_device(device).unwrap();
    for id in 1..=3 {
        store.store_message(message(id, 2, 50), &[device]).unwrap();
    }
    flush(&mut store, &mut files);
    store.want_bodies(device, 0);
    let mut reads = Vec::new();
    while let Some(at) = store.take_read() {
        reads.push(at);
    }
    assert_eq!(reads.len(), 3);
    // The first read fails: nothing is lost, the push asks again.
    assert_eq!(store.on_read(reads[0], Err("EIO".into())), vec![device]);
    assert_eq!(store.next_after(device, 0), Some(Next::Cold(1)));
    store.want_bodies(device, 0);
    assert_eq!(store.take_read(), Some(reads[0]));
    // Its bytes come back rotten: that message alone goes, counted.
    let mut rotten = files[&reads[0].segment][reads[0].offset as usize..][..reads[0].bytes as usize].to_vec();
    rotten[20] ^= 0x40;
    store.on_read(reads[0], Ok(&rotten));
    assert_eq!(store.stats().unreadable_total, 1);
    for at in &reads[1..] {
        let file = &files[&at.segment];
        store.on_read(*at, Ok(&file[at.offset as usize..][..at.bytes as usize]));
    }
    let ids: Vec<u64> = push_all(&mut store, device, &files).into_iter().map(|(_, id, _)| id).collect();
    assert_eq!(ids, [2, 3]);
}

#[test]
fn the_disk_budget_refuses_new_messages_with_throttle_until_segments_are_reclaimed() {
    let log_limits = LogLimits { disk_bytes_max: 8 * 4096, ..LogLimits::keep_bodies(4096, 1024) };
    let mut store = LogStore::new(limits(), log_limits);
    let mut files = BTreeMap::new();
    let device = DeviceKey { user: 2, device: 1 };
    store.register_device(device).unwrap();
    let mut stored = 0;
    let refusal = loop {
        match store.store_message(message(stored + 1, 2, 200), &[device]) {
            Ok(_) => stored += 1,
            Err(error) => break error,
        }
        flush(&mut store, &mut files);
        assert!(stored < 1000, "the budget never refused");
    };
    assert_eq!(refusal, StoreError::DiskBudget);
    assert_eq!(refusal.code(), ErrorCode::Throttle);
    assert!(store.disk_bytes() <= 8 * 4096);
    // The device drains: segments go, and sends are taken again.
    store.acknowledge(device, u64::MAX);
    flush(&mut store, &mut files);
    flush(&mut store, &mut files);
    assert!(store.disk_bytes() < 8 * 4096);
    assert!(store.store_message(message(stored + 1, 2, 200), &[device]).is_ok());
}

#[test]
fn a_push_starved_of_read_room_is_woken_once_the_reads_in_flight_are_done() {
    // A read-ahead of two records: device a's reads fill it, so b's push
    // must wait, and must be named once a's reads complete.
    let record = u64::from(message_record_bytes_max(100, 1));
    let log_limits = cold_limits(1 << 20, 0, 2 * record);
    let mut store = LogStore::new(limits(), log_limits);
    let mut files = BTreeMap::new();
    let (a, b) = (DeviceKey { user: 2, device: 1 }, DeviceKey { user: 3, device: 1 });
    store.register_device(a).unwrap();
    store.register_device(b).unwrap();
    for id in 1..=6 {
        store.store_message(message(id, 2 + id % 2, 100), &[if id % 2 == 0 { a } else { b }]).unwrap();
    }
    flush(&mut store, &mut files);
    store.want_bodies(a, 0);
    store.want_bodies(b, 0);
    let mut woken = Vec::new();
    while let Some(at) = store.take_read() {
        let file = &files[&at.segment];
        let end = (at.offset as usize + at.bytes as usize).min(file.len());
        woken.extend(store.on_read(at, Ok(&file[at.offset as usize..end])));
    }
    assert!(woken.contains(&a), "a's push goes on");
    assert!(woken.contains(&b), "b's starved push is woken when nothing is left in flight");
    assert_eq!(push_all(&mut store, b, &files).len(), 3);
}

#[test]
fn the_queue_of_starved_pushes_stays_within_twice_the_starving_devices() {
    // A device starved, woken by its own read (leaving its queue entry),
    // and starved again, over and over: stale entries must not pile up.
    let (_, mut store, device, _) = store_of_one_device(4096);
    for _ in 0..10_000 {
        store.starve(device);
        store.bodies.starving.remove(&device);
    }
    assert!(store.bodies.starved.len() <= 2 * store.bodies.starving.len() + 65, "{}", store.bodies.starved.len());
}

/// Like `flush`, but every chunk holding a `DeviceSeen` fails, `failures` times.
fn flush_failing_seen(store: &mut LogStore, files: &mut BTreeMap<u64, Vec<u8>>, failures: &mut u32) {
    store.maintain();
    while let Some(chunk) = store.take_write() {
        let seen = scan_segment(&chunk.bytes, &test_key())
            .records
            .iter()
            .any(|(_, record)| matches!(record, Record::DeviceSeen(_)));
        if seen && *failures > 0 {
            *failures -= 1;
            store.on_write_failed(chunk.segment, chunk.first_ticket, chunk.last_ticket);
            continue;
        }
        append_chunk(&test_key(), files.entry(chunk.segment).or_default(), chunk.segment, &chunk.bytes);
        store.on_write_durable(chunk.segment, chunk.first_ticket, chunk.last_ticket);
    }
    for segment in store.take_reclaimable() {
        files.remove(&segment);
    }
}

#[test]
fn last_seen_times_survive_failed_writes_compaction_reclaim_and_recovery() {
    let (log_limits, mut store, mut files) = small_log_of_two_devices();
    let (quiet, busy) = (QUIET, BUSY);
    let never_seen = DeviceKey { user: 4, device: 1 };
    store.register_device(never_seen).unwrap();
    store.note_seen(quiet, 1_000, true);
    store.note_seen(quiet, 2_000, false);
    // The newer time is what must reach the disk, though its write fails twice.
    let mut failures = 2;
    flush_failing_seen(&mut store, &mut files, &mut failures);
    assert_eq!(failures, 0, "each failure queued the record again");
    // An older time never replaces a newer one.
    store.note_seen(quiet, 1_500, false);
    // Much delivered traffic: the segments holding the quiet device's
    // records are compacted and reclaimed.
    store.note_seen(busy, 2_500, true);
    for id in 1..=300 {
        store.store_message(message(id, 3, 100), &[busy]).unwrap();
        flush(&mut store, &mut files);
        store.acknowledge(busy, id);
        flush(&mut store, &mut files);
    }
    assert!(!files.contains_key(&1), "the first segment should be reclaimed");
    let recovered = recover(&files, log_limits);
    assert_eq!(recovered.recovered_idle_since(quiet), Some(2_000), "offline since its last session ended");
    // Online when the log stops: idle since the newest time the log holds
    // (here the busy device's record; the messages carry 7 ms).
    assert_eq!(recovered.recovered_idle_since(busy), Some(2_500));
    assert_eq!(recovered.recovered_idle_since(never_seen), None, "an older log says nothing");

    // A removed device's time goes with it, in memory and on disk.
    let mut store = recovered;
    store.remove_device(quiet).unwrap();
    flush(&mut store, &mut files);
    assert_eq!(recover(&files, log_limits).recovered_idle_since(quiet), None);
}

#[test]
fn an_online_device_at_a_crash_is_idle_since_the_newest_time_in_the_log() {
    let (log_limits, mut store, mut files) = small_log_of_two_devices();
    store.note_seen(QUIET, 1_000, true);
    let mut late = (*message(1, 3, 10)).clone();
    late.sent_at_ms = 9_000_000;
    store.store_message(Rc::new(late), &[BUSY]).unwrap();
    flush(&mut store, &mut files);
    let recovered = recover(&files, log_limits);
    assert_eq!(recovered.recovered_idle_since(QUIET), Some(9_000), "it was online at least until the last send");
}

#[test]
fn no_seq_reaches_the_end_of_the_reservation_and_an_extension_lets_sends_through() {
    let (log_limits, mut store, mut files) = small_log_of_two_devices();
    assert!(store.seq_reservation().is_some_and(|reservation| reservation.end == u64::MAX), "none set yet");
    // Seqs 1..=4 may be handed out, 5 may not.
    store.extend_seq_reservation(5);
    for id in 1..=4 {
        store.store_message(message(id, QUIET.user, 10), &[QUIET]).unwrap();
    }
    assert_eq!(store.store_message(message(5, BUSY.user, 10), &[BUSY]), Err(StoreError::SeqsUnreserved));
    assert_eq!(StoreError::SeqsUnreserved.code(), ErrorCode::Throttle);
    assert_eq!(store.seq_reservation(), Some(SeqReservation { high: 4, end: 5 }));
    store.extend_seq_reservation(7);
    store.store_message(message(5, BUSY.user, 10), &[BUSY]).unwrap();
    store.store_message(message(6, QUIET.user, 10), &[QUIET]).unwrap();
    store.store_message(message(7, QUIET.user, 10), &[QUIET]).unwrap();
    assert_eq!(store.store_message(message(8, QUIET.user, 10), &[QUIET]), Err(StoreError::SeqsUnreserved));
    assert_eq!(store.seq_reservation(), Some(SeqReservation { high: 6, end: 7 }));
    flush(&mut store, &mut files);
    // Recovery finds the same high seq, acknowledged messages included.
    store.acknowledge(QUIET, 6);
    flush(&mut store, &mut files);
    let recovered = recover(&files, log_limits);
    assert_eq!(recovered.seq_reservation().map(|reservation| reservation.high), Some(6));
}
