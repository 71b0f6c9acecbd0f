//! Unit tests of `core`.

use super::*;
use crate::auth::{Claims, TokenAuthority};
use crate::shard::mailbox::StoreLimits;
use crate::shard::MemoryStore;
use iris_shard_map::NodeId;

const NOW_MS: u64 = 1_000_000;

/// Wall-clock `wall_ms`, with the monotonic clock at the same number.
fn at(wall_ms: u64) -> Now {
    Now { monotonic_us: wall_ms * 1000, wall_ms }
}

fn core(authority: &TokenAuthority) -> ShardCore<MemoryStore> {
    core_with(authority, |_| {})
}

/// A core whose store limits `adjust` changes.
fn core_with(authority: &TokenAuthority, adjust: impl FnOnce(&mut StoreLimits)) -> ShardCore<MemoryStore> {
    core_with_limits(authority, |store, _| adjust(store))
}

/// A core whose store and core limits `adjust` changes.
fn core_with_limits(
    authority: &TokenAuthority,
    adjust: impl FnOnce(&mut StoreLimits, &mut CoreLimits),
) -> ShardCore<MemoryStore> {
    core_over(authority, |store_limits, limits| {
        adjust(store_limits, limits);
        MemoryStore::new(*store_limits)
    })
}

/// A core over the store `make` builds from the test limits (which it may change).
fn core_over<S: MailboxStore>(
    authority: &TokenAuthority,
    make: impl FnOnce(&mut StoreLimits, &mut CoreLimits) -> S,
) -> ShardCore<S> {
    let identity = ShardIdentity {
        node: NodeId(0),
        shard: ShardId(0),
        advertised_host: "h".into(),
        shard_ports: vec![1],
        message_ids: 1..1000,
    };
    let mut limits = CoreLimits {
        dedup_entries_per_device_max: 8,
        sender_dedup_entries_max: 1_048_576,
        sends_in_flight_per_device_max: 8,
        shard_outbox_messages_max: 8,
        device_inactive_expiry_s: 100,
        rates: SendRates::OFF,
        codel_target_ms: 0,
        codel_interval_ms: 100,
        hello_timeout_ms: 10_000,
        commit_delay_us: 0,
        commit_bytes_max: 1 << 20,
        presence: crate::shard::presence::PresenceLimits::DEFAULT,
    };
    let mut store_limits = StoreLimits {
        devices_per_user_max: 2,
        devices_per_shard_max: 100,
        mailbox_messages_max: 100,
        mailbox_bytes_max: 1 << 20,
        mailbox_sender_messages_max: u32::MAX,
        mailbox_sender_bytes_max: u64::MAX,
        // One entry: the recipient side forgets a key at the next store.
        stored_dedup_entries_max: 1,
        shard_mailbox_bytes_max: 1 << 40,
    };
    let store = make(&mut store_limits, &mut limits);
    let table = SlotTable::single_node(NodeId(0), 1, 1).unwrap();
    ShardCore::new(identity, table, authority.verifier(), limits, 65536, store)
}

fn hello(core: &mut ShardCore<MemoryStore>, authority: &TokenAuthority, conn: ConnId, user: u64) {
    hello_device(core, authority, conn, user, 1);
    while core.poll_output().is_some() {}
}

/// Hello of `user`'s `device`; returns the outputs it produced.
fn hello_device<S: MailboxStore>(
    core: &mut ShardCore<S>,
    authority: &TokenAuthority,
    conn: ConnId,
    user: u64,
    device: u32,
) -> Vec<Output> {
    core.handle_connection(conn, at(NOW_MS));
    // Valid whatever the core's clock (it only moves forward).
    let token = authority.mint(Claims { user_id: user, device_id: device, expires_at_s: u64::MAX });
    core.handle_frame(conn, Frame::Hello(frames::Hello { token, resume_after_seq: 0 }), at(NOW_MS));
    std::iter::from_fn(|| core.poll_output()).collect()
}

fn outputs(core: &mut ShardCore<MemoryStore>) -> Vec<Output> {
    std::iter::from_fn(|| core.poll_output()).collect()
}

/// The device on `conn` takes every push and acknowledges it.
fn drain_and_ack(core: &mut ShardCore<MemoryStore>, conn: ConnId) {
    let mut last = None;
    while let Some(Frame::Deliver(deliver)) = core.poll_push(conn) {
        last = Some(deliver.seq);
    }
    if let Some(up_to_seq) = last {
        core.handle_frame(conn, Frame::DeliveryAck(frames::DeliveryAck { up_to_seq }), at(NOW_MS));
    }
}

fn closed_with(outputs: &[Output], conn: ConnId) -> Option<(u32, Option<u16>)> {
    outputs.iter().find_map(|output| match output {
        Output::Close { conn: closed, frame, close_code } if *closed == conn => {
            let code = match frame {
                Some(Frame::Error(error)) => Some(error.code),
                _ => None,
            };
            Some((*close_code, code))
        }
        _ => None,
    })
}

/// User 20 with a phone (conn 1, device 1) and a laptop (conn 2, device
/// 2) online, and a sender of user 10 on conn 3.
fn phone_laptop_and_sender(core: &mut ShardCore<MemoryStore>, authority: &TokenAuthority) -> (ConnId, ConnId, ConnId) {
    let (phone, laptop, sender) = (ConnId(1), ConnId(2), ConnId(3));
    hello_device(core, authority, phone, 20, 1);
    hello_device(core, authority, laptop, 20, 2);
    hello(core, authority, sender, 10);
    (phone, laptop, sender)
}

#[test]
fn a_device_removed_by_its_sibling_is_closed_refused_and_no_longer_receives() {
    let authority = TokenAuthority::from_secret([6; 32]);
    let mut core = core(&authority);
    let (phone, laptop, sender) = phone_laptop_and_sender(&mut core, &authority);
    core.handle_frame(phone, Frame::RemoveDevice(frames::RemoveDevice { device_id: 2 }), at(NOW_MS));
    let out = outputs(&mut core);
    assert!(
        out.iter().any(|o| matches!(o, Output::Frame { conn, frame: Frame::DeviceRemoved(r) } if *conn == phone && r.device_id == 2)),
        "the phone gets the answer: {out:?}"
    );
    assert_eq!(closed_with(&out, laptop), Some((close_code::REMOVED, Some(ErrorCode::DeviceRemoved as u16))));
    core.handle_connection_closed(laptop, at(NOW_MS));
    // The laptop's token still verifies, but the device may not come back.
    let out = hello_device(&mut core, &authority, ConnId(4), 20, 2);
    assert_eq!(closed_with(&out, ConnId(4)), Some((close_code::REMOVED, Some(ErrorCode::DeviceRemoved as u16))));
    assert_eq!(core.store().devices_of(20), &[1]);
    // Removing it again is answered the same; an unknown device is not.
    core.handle_frame(phone, Frame::RemoveDevice(frames::RemoveDevice { device_id: 2 }), at(NOW_MS));
    core.handle_frame(phone, Frame::RemoveDevice(frames::RemoveDevice { device_id: 9 }), at(NOW_MS));
    let out = outputs(&mut core);
    assert!(matches!(&out[0], Output::Frame { frame: Frame::DeviceRemoved(r), .. } if r.device_id == 2));
    assert!(
        matches!(&out[1], Output::Frame { frame: Frame::Error(e), .. } if e.code == ErrorCode::UnknownDevice as u16)
    );
    // A device removing itself gets the answer as its close.
    core.handle_frame(phone, Frame::RemoveDevice(frames::RemoveDevice { device_id: 1 }), at(NOW_MS));
    let out = outputs(&mut core);
    assert!(matches!(
        &out[..],
        [Output::Close { conn, frame: Some(Frame::DeviceRemoved(r)), close_code: close_code::REMOVED }] if *conn == phone && r.device_id == 1
    ));
    let send = frames::Send { client_msg_id: 1, to_user: 20, after: None, payload: b"hi".to_vec() };
    core.handle_frame(sender, Frame::Send(send), at(NOW_MS));
    let out = outputs(&mut core);
    assert!(
        matches!(&out[..], [Output::Frame { frame: Frame::Error(e), .. }] if e.code == ErrorCode::UnknownRecipient as u16),
        "a user whose devices are all removed has none: {out:?}"
    );
}

/// Sends the next message (ids from 1) from `conn` to user 20, then lets
/// the phone drain and acknowledge; returns what the send produced.
fn send_to_user_20(core: &mut ShardCore<MemoryStore>, conn: ConnId, last_id: &mut u64, phone: ConnId) -> Vec<Output> {
    *last_id += 1;
    let send = frames::Send { client_msg_id: *last_id, to_user: 20, after: None, payload: b"m".to_vec() };
    core.handle_frame(conn, Frame::Send(send), at(NOW_MS));
    let out = outputs(core);
    drain_and_ack(core, phone);
    out
}

#[test]
fn a_full_offline_device_is_removed_when_another_device_of_its_user_takes_the_message() {
    let authority = TokenAuthority::from_secret([7; 32]);
    let mut core = core(&authority);
    let (phone, laptop, sender) = phone_laptop_and_sender(&mut core, &authority);
    core.handle_connection_closed(laptop, at(NOW_MS));
    // The store's cap is 100 messages per device: the phone acknowledges
    // as it goes, the offline laptop fills up.
    let mut next_id = 0;
    let mut send = |core: &mut ShardCore<MemoryStore>| send_to_user_20(core, sender, &mut next_id, phone);
    for _ in 0..100 {
        let out = send(&mut core);
        assert!(out.iter().any(|o| matches!(o, Output::Frame { frame: Frame::Ack(_), .. })), "{out:?}");
    }
    let out = send(&mut core);
    assert!(
        out.iter().any(|o| matches!(o, Output::Frame { frame: Frame::Ack(_), .. })),
        "a full laptop must not block its user: {out:?}"
    );
    assert_eq!(core.store().devices_of(20), &[1], "the full offline laptop was removed");
    assert_eq!(core.stats().devices_removed_overflow, 1);
    let out = hello_device(&mut core, &authority, ConnId(5), 20, 2);
    assert_eq!(closed_with(&out, ConnId(5)), Some((close_code::REMOVED, Some(ErrorCode::DeviceRemoved as u16))));
}

#[test]
fn one_sender_cannot_fill_an_offline_device_and_get_it_removed() {
    let authority = TokenAuthority::from_secret([17; 32]);
    // A mailbox holds 100 messages, of which one sending user 10.
    let mut core = core_with(&authority, |limits| limits.mailbox_sender_messages_max = 10);
    let (phone, laptop, flooder) = phone_laptop_and_sender(&mut core, &authority);
    let friend = ConnId(4);
    hello(&mut core, &authority, friend, 30);
    core.handle_connection_closed(laptop, at(NOW_MS));
    let mut next_id = 0;
    let mut send = |core: &mut ShardCore<MemoryStore>, conn: ConnId| send_to_user_20(core, conn, &mut next_id, phone);
    let acked = |out: &[Output]| out.iter().any(|o| matches!(o, Output::Frame { frame: Frame::Ack(_), .. }));
    for _ in 0..10 {
        assert!(acked(&send(&mut core, flooder)));
    }
    // Over its share the flooder is refused, and only it: the laptop stays.
    for _ in 0..3 {
        let out = send(&mut core, flooder);
        assert!(
            matches!(&out[..], [Output::Frame { frame: Frame::Error(e), .. }] if e.code == ErrorCode::MailboxFull as u16),
            "{out:?}"
        );
    }
    assert_eq!(core.stats().sends_over_mailbox_share, 3);
    let out = send(&mut core, friend);
    assert!(acked(&out), "another sender still reaches both devices: {out:?}");
    assert_eq!(core.store().devices_of(20), &[1, 2], "nobody was removed");
    assert_eq!(core.stats().devices_removed_overflow, 0);
    // The laptop comes back and drains its 11 messages; the flooder's share is free again.
    let laptop = ConnId(5);
    hello_device(&mut core, &authority, laptop, 20, 2);
    let mut delivered = 0;
    let mut last = 0;
    while let Some(Frame::Deliver(deliver)) = core.poll_push(laptop) {
        delivered += 1;
        last = deliver.seq;
    }
    assert_eq!(delivered, 11);
    core.handle_frame(laptop, Frame::DeliveryAck(frames::DeliveryAck { up_to_seq: last }), at(NOW_MS));
    assert!(acked(&send(&mut core, flooder)));
}

#[test]
fn the_shard_mailbox_budget_throttles_senders_and_removes_no_device() {
    let authority = TokenAuthority::from_secret([9; 32]);
    // Room for 20 entries of a 100-byte message (228 B charged each).
    let mut core = core_with(&authority, |limits| limits.shard_mailbox_bytes_max = 20 * 228);
    let sender = ConnId(1);
    for (conn, user) in [(ConnId(2), 20), (ConnId(3), 30)] {
        hello_device(&mut core, &authority, conn, user, 1);
        core.handle_connection_closed(conn, at(NOW_MS));
    }
    hello(&mut core, &authority, sender, 10);
    let mut acked = 0;
    let mut throttled = None;
    for id in 0..40u64 {
        let send = frames::Send { client_msg_id: id, to_user: 20 + 10 * (id % 2), after: None, payload: vec![7; 100] };
        core.handle_frame(sender, Frame::Send(send), at(NOW_MS));
        for output in outputs(&mut core) {
            match output {
                Output::Frame { frame: Frame::Ack(_), .. } => acked += 1,
                Output::Frame { frame: Frame::Error(error), .. } => throttled = throttled.or(Some(error)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(acked, 20, "the budget holds exactly 20 entries");
    let error = throttled.expect("sends past the budget are refused");
    assert_eq!((error.code, error.retry_after_ms > 0), (ErrorCode::Throttle as u16, true));
    assert_eq!((core.store().devices_of(20), core.store().devices_of(30)), (&[1][..], &[1][..]));
    // A recipient that drains frees room.
    let conn = ConnId(4);
    hello_device(&mut core, &authority, conn, 20, 1);
    drain_and_ack(&mut core, conn);
    let send = frames::Send { client_msg_id: 100, to_user: 30, after: None, payload: vec![7; 100] };
    core.handle_frame(sender, Frame::Send(send), at(NOW_MS));
    assert!(outputs(&mut core).iter().any(|o| matches!(o, Output::Frame { frame: Frame::Ack(_), .. })));
}

#[test]
fn a_device_without_a_session_for_the_expiry_is_removed_and_an_online_one_never() {
    // The test core expires devices after 100 s without a session.
    let authority = TokenAuthority::from_secret([10; 32]);
    let mut core = core(&authority);
    let (phone, laptop) = (ConnId(1), ConnId(2));
    hello_device(&mut core, &authority, phone, 20, 1);
    hello_device(&mut core, &authority, laptop, 20, 2);
    core.handle_timeout(at(NOW_MS));
    core.handle_connection_closed(laptop, at(NOW_MS));
    core.handle_timeout(at(NOW_MS + 99_000));
    assert_eq!(core.store().devices_of(20), &[1, 2], "not yet: checked before the expiry");
    core.handle_timeout(at(NOW_MS + 170_000));
    assert_eq!(core.store().devices_of(20), &[1], "the laptop was away past the expiry");
    assert_eq!(core.stats().devices_expired, 1);
    // The phone stayed online all along; its token still works, the laptop's does not.
    let out = hello_device(&mut core, &authority, ConnId(3), 20, 2);
    assert_eq!(closed_with(&out, ConnId(3)), Some((close_code::REMOVED, Some(ErrorCode::DeviceRemoved as u16))));
    core.handle_timeout(at(NOW_MS + 1_000_000));
    assert_eq!(core.store().devices_of(20), &[1]);
    // A reconnect within the expiry resets the clock.
    hello_device(&mut core, &authority, ConnId(4), 30, 1);
    core.handle_connection_closed(ConnId(4), at(NOW_MS));
    core.handle_timeout(at(NOW_MS + 1_060_000));
    hello_device(&mut core, &authority, ConnId(5), 30, 1);
    core.handle_connection_closed(ConnId(5), at(NOW_MS));
    core.handle_timeout(at(NOW_MS + 1_120_000));
    assert_eq!(core.store().devices_of(30), &[1], "away 60 s at most each time");
}

/// Writes every chunk `core`'s log store has into `files` (all durable).
fn write_log(core: &mut ShardCore<crate::storage::LogStore>, files: &mut Vec<(u64, Vec<u8>)>) {
    while let Some(chunk) = core.poll_write(at(NOW_MS)) {
        match files.iter_mut().find(|(segment, _)| *segment == chunk.segment) {
            Some((_, file)) => crate::storage::record::append_chunk(
                &crate::storage::record::test_key(),
                file,
                chunk.segment,
                &chunk.bytes,
            ),
            None => {
                let mut file = Vec::new();
                crate::storage::record::append_chunk(
                    &crate::storage::record::test_key(),
                    &mut file,
                    chunk.segment,
                    &chunk.bytes,
                );
                files.push((chunk.segment, file));
            }
        }
        let durable = WriteOutcome::Durable;
        core.handle_write_outcome(chunk.segment, chunk.first_ticket, chunk.last_ticket, durable, at(NOW_MS));
    }
}

/// A core over the log store recovered from `files`.
fn recovered_core(authority: &TokenAuthority, files: &[(u64, Vec<u8>)]) -> ShardCore<crate::storage::LogStore> {
    let scans: Vec<_> = files
        .iter()
        .map(|(segment, bytes)| {
            (*segment, crate::storage::record::scan_segment(bytes, &crate::storage::record::test_key()))
        })
        .collect();
    core_over(authority, |store_limits, _| {
        let log = crate::storage::LogLimits::keep_bodies(1 << 20, 1 << 16);
        crate::storage::LogStore::recover(*store_limits, log, &scans).0
    })
}

#[test]
fn the_inactivity_clock_survives_restarts_and_a_crash_loop_cannot_stop_it() {
    // The test core expires devices after 100 s without a session.
    let authority = TokenAuthority::from_secret([11; 32]);
    let mut files = Vec::new();
    let mut core = recovered_core(&authority, &files);
    let (phone, laptop) = (ConnId(1), ConnId(2));
    for (conn, device) in [(phone, 1), (laptop, 2)] {
        core.handle_connection(conn, at(NOW_MS));
        let token = authority.mint(Claims { user_id: 20, device_id: device, expires_at_s: NOW_MS / 1000 + 60 });
        core.handle_frame(conn, Frame::Hello(frames::Hello { token, resume_after_seq: 0 }), at(NOW_MS));
        write_log(&mut core, &mut files);
        core.handle_timeout(at(NOW_MS));
        while core.poll_output().is_some() {}
    }
    assert_eq!(core.store().devices_of(20), &[1, 2]);
    // The laptop goes away; the phone reconnects 30 s later and stays
    // online until the process dies.
    core.handle_connection_closed(laptop, at(NOW_MS));
    core.handle_connection_closed(phone, at(NOW_MS));
    core.handle_connection(ConnId(3), at(NOW_MS));
    let token = authority.mint(Claims { user_id: 20, device_id: 1, expires_at_s: NOW_MS / 1000 + 60 });
    core.handle_frame(ConnId(3), Frame::Hello(frames::Hello { token, resume_after_seq: 0 }), at(NOW_MS + 30_000));
    write_log(&mut core, &mut files);
    // Restarts every 45 s (a crash loop): none may reset the clock.
    for after_s in [45, 90] {
        let mut core = recovered_core(&authority, &files);
        core.handle_timeout(at(NOW_MS + after_s * 1000));
        assert_eq!(core.store().devices_of(20), &[1, 2], "{after_s} s after the laptop left");
    }
    let mut core = recovered_core(&authority, &files);
    core.handle_timeout(at(NOW_MS + 110_000));
    assert_eq!(core.store().devices_of(20), &[1], "the laptop, away 110 s across restarts, is gone");
    write_log(&mut core, &mut files);
    // The phone was online when the process died: idle from the newest
    // time the log holds (its reconnect at 30 s), so gone after 130 s.
    let mut core = recovered_core(&authority, &files);
    core.handle_timeout(at(NOW_MS + 125_000));
    assert_eq!(core.store().devices_of(20), &[1]);
    let mut core = recovered_core(&authority, &files);
    core.handle_timeout(at(NOW_MS + 131_000));
    assert_eq!(core.store().devices_of(20), &[] as &[u32]);
}

#[test]
fn a_full_mailbox_of_an_online_device_or_of_every_device_refuses_the_send() {
    let authority = TokenAuthority::from_secret([8; 32]);
    let mut core = core(&authority);
    let (phone, laptop, sender) = phone_laptop_and_sender(&mut core, &authority);
    for id in 1..=101 {
        let send = frames::Send { client_msg_id: id, to_user: 20, after: None, payload: b"m".to_vec() };
        core.handle_frame(sender, Frame::Send(send), at(NOW_MS));
        let out = outputs(&mut core);
        if id == 101 {
            assert!(
                matches!(&out[..], [Output::Frame { frame: Frame::Error(e), .. }] if e.code == ErrorCode::MailboxFull as u16),
                "{out:?}"
            );
        }
        drain_and_ack(&mut core, phone);
    }
    assert_eq!(core.store().devices_of(20), &[1, 2], "an online device draining slowly is never removed");
    // Once the laptop is offline and still full, the phone's next message removes it.
    core.handle_connection_closed(laptop, at(NOW_MS));
    let send = frames::Send { client_msg_id: 200, to_user: 20, after: None, payload: b"m".to_vec() };
    core.handle_frame(sender, Frame::Send(send), at(NOW_MS));
    let out = outputs(&mut core);
    assert!(out.iter().any(|o| matches!(o, Output::Frame { frame: Frame::Ack(_), .. })), "{out:?}");
    assert_eq!(core.store().devices_of(20), &[1]);
}

#[test]
fn a_send_naming_a_refused_one_waits_for_it_so_retries_keep_the_order() {
    let authority = TokenAuthority::from_secret([8; 32]);
    let mut core = core(&authority);
    let (phone, laptop, sender) = phone_laptop_and_sender(&mut core, &authority);
    let send = |id: u64, after: Option<u64>| {
        Frame::Send(frames::Send { client_msg_id: id, to_user: 20, after, payload: id.to_le_bytes().to_vec() })
    };
    let answers = |out: &[Output]| -> Vec<(u64, Option<u16>)> {
        out.iter()
            .filter_map(|output| match output {
                Output::Frame { frame: Frame::Ack(ack), .. } => Some((ack.client_msg_id, None)),
                Output::Frame { frame: Frame::Error(error), .. } => Some((error.client_msg_id?, Some(error.code))),
                _ => None,
            })
            .collect()
    };
    // The laptop is online and does not read: its mailbox fills up.
    for id in 1..=100 {
        core.handle_frame(sender, send(id, None), at(NOW_MS));
        outputs(&mut core);
        drain_and_ack(&mut core, phone);
    }
    // 101 is refused; 102 and 103, pipelined behind it, must not overtake it.
    core.handle_frame(sender, send(101, Some(100)), at(NOW_MS));
    core.handle_frame(sender, send(102, Some(101)), at(NOW_MS));
    core.handle_frame(sender, send(103, Some(102)), at(NOW_MS));
    let (full, behind) = (Some(ErrorCode::MailboxFull as u16), Some(ErrorCode::OutOfOrder as u16));
    assert_eq!(answers(&outputs(&mut core)), [(101, full), (102, behind), (103, behind)]);
    // Once the laptop reads, the retries in order are stored in order.
    drain_and_ack(&mut core, laptop);
    core.handle_frame(sender, send(101, None), at(NOW_MS));
    core.handle_frame(sender, send(102, Some(101)), at(NOW_MS));
    core.handle_frame(sender, send(103, Some(102)), at(NOW_MS));
    assert_eq!(answers(&outputs(&mut core)), [(101, None), (102, None), (103, None)]);
    let mut received = Vec::new();
    while let Some(Frame::Deliver(deliver)) = core.poll_push(laptop) {
        received.push(u64::from_le_bytes(deliver.payload.try_into().unwrap()));
    }
    assert_eq!(received, [101, 102, 103]);
    // An `after` naming a send that was never stored is refused too.
    core.handle_frame(sender, send(104, Some(999)), at(NOW_MS));
    assert_eq!(answers(&outputs(&mut core)), [(104, behind)]);
}

/// Shard 0 of a node of two, with `limits` and roomy mailboxes; and its slot table.
fn shard_zero_of_two(authority: &TokenAuthority, limits: CoreLimits) -> (ShardCore<MemoryStore>, SlotTable) {
    let identity = ShardIdentity {
        node: NodeId(0),
        shard: ShardId(0),
        advertised_host: "h".into(),
        shard_ports: vec![1, 2],
        message_ids: 1..100_000,
    };
    let store = MemoryStore::new(StoreLimits {
        devices_per_user_max: 2,
        devices_per_shard_max: 100,
        mailbox_messages_max: 100_000,
        mailbox_bytes_max: 1 << 30,
        mailbox_sender_messages_max: u32::MAX,
        mailbox_sender_bytes_max: u64::MAX,
        stored_dedup_entries_max: 100,
        shard_mailbox_bytes_max: 1 << 40,
    });
    let table = SlotTable::single_node(NodeId(0), 2, 1).unwrap();
    (ShardCore::new(identity, table.clone(), authority.verifier(), limits, 65536, store), table)
}

#[test]
fn codel_holds_back_only_the_sends_to_the_slow_shard() {
    // Shard 0 of two; a device on it sends to a user on shard 1, whose
    // answers come back 50 ms late, and to a user on shard 0.
    let authority = TokenAuthority::from_secret([9; 32]);
    let limits = CoreLimits {
        dedup_entries_per_device_max: 8,
        sender_dedup_entries_max: 64,
        sends_in_flight_per_device_max: 100_000,
        shard_outbox_messages_max: 100_000,
        device_inactive_expiry_s: 0,
        rates: SendRates::OFF,
        codel_target_ms: 5,
        codel_interval_ms: 100,
        hello_timeout_ms: 10_000,
        commit_delay_us: 0,
        commit_bytes_max: 1 << 20,
        presence: crate::shard::presence::PresenceLimits::DEFAULT,
    };
    let (mut core, table) = shard_zero_of_two(&authority, limits);
    let on_shard = |shard: u16, from: u64| (from..).find(|user| table.home(UserId(*user)).shard.0 == shard).unwrap();
    let (sender, local, remote) = (on_shard(0, 1), on_shard(0, 1000), on_shard(1, 1));
    hello(&mut core, &authority, ConnId(1), sender);
    hello(&mut core, &authority, ConnId(2), local);
    // The test's clock runs from NOW_MS on (the Hellos came at NOW_MS).
    let clock = |ms: u64| Now { monotonic_us: (NOW_MS + ms) * 1000, wall_ms: NOW_MS };
    let mut next_id = 0;
    let mut send = |core: &mut ShardCore<MemoryStore>, to_user: u64, clock_ms: u64| {
        next_id += 1;
        let frame = Frame::Send(frames::Send { client_msg_id: next_id, to_user, after: None, payload: vec![1] });
        core.handle_frame(ConnId(1), frame, clock(clock_ms));
        let refused = outputs(core)
            .iter()
            .any(|o| matches!(o, Output::Frame { frame: Frame::Error(e), .. } if e.code == ErrorCode::Throttle as u16));
        (next_id, refused)
    };
    // Shard 1 answers every send 50 ms after it was accepted; the first
    // answer (1 ms) sets the floor.
    let answer = |core: &mut ShardCore<MemoryStore>, id: u64, accepted_at_ms: u64, latency_ms: u64| {
        let stored = ShardMessage::StoreOutcome {
            sender: DeviceKey { user: sender, device: 1 },
            accepted_at_ms: NOW_MS + accepted_at_ms,
            to_user: remote,
            payload_bytes: 1,
            client_msg_id: id,
            result: Ok(id),
        };
        core.handle_shard_message(1, stored, clock(accepted_at_ms + latency_ms));
        outputs(core);
    };
    let (first, _) = send(&mut core, remote, 1_000);
    answer(&mut core, first, 1_000, 1);
    let mut refused_remote = 0;
    let mut refused_local = 0;
    // Each answer comes after the next send is out, so the queue to
    // shard 1 never empties.
    let mut outstanding: Option<(u64, u64)> = None;
    for step in 0..100u64 {
        let at = 2_000 + step * 60;
        let (id, refused) = send(&mut core, remote, at);
        refused_remote += u64::from(refused);
        let (_, refused_here) = send(&mut core, local, at);
        refused_local += u64::from(refused_here);
        if let Some((previous, accepted_at)) = outstanding.take() {
            answer(&mut core, previous, accepted_at, 50);
        }
        if !refused {
            outstanding = Some((id, at));
        }
    }
    assert!(refused_remote > 0, "sends to the slow shard must be refused");
    assert_eq!(refused_local, 0, "sends to the healthy shard never are");
    let stats = core.stats();
    assert!(stats.codel_refusals >= refused_remote && stats.codel_episodes >= 1, "{stats:?}");
}

#[test]
fn a_send_the_recipient_refuses_costs_no_rate_tokens_and_a_final_refusal_does() {
    let authority = TokenAuthority::from_secret([6; 32]);
    // Two sends per device -> user, no refill (the clock stands still); the
    // recipient's mailbox holds one message and its device never reads.
    let mut core = core_with_limits(&authority, |store, core| {
        store.mailbox_messages_max = 1;
        core.rates.pair_sends = Rate { per_s: 1, burst: 2 };
        core.rates.keys_max = 16;
    });
    let (sender, recipient) = (ConnId(1), ConnId(2));
    hello(&mut core, &authority, recipient, 20);
    hello(&mut core, &authority, sender, 10);
    let mut codes = Vec::new();
    for (id, to_user) in [(1, 20), (2, 20), (3, 20), (4, 20), (5, 20), (6, 999), (7, 999), (8, 20)] {
        let send = frames::Send { client_msg_id: id, to_user, after: None, payload: b"m".to_vec() };
        core.handle_frame(sender, Frame::Send(send), at(NOW_MS));
        for output in outputs(&mut core) {
            match output {
                Output::Frame { frame: Frame::Ack(_), .. } => codes.push(None),
                Output::Frame { frame: Frame::Error(error), .. } => codes.push(ErrorCode::from_u16(error.code)),
                _ => {}
            }
        }
    }
    let (full, unknown, throttle) =
        (Some(ErrorCode::MailboxFull), Some(ErrorCode::UnknownRecipient), Some(ErrorCode::Throttle));
    // The first is stored (one token); the full mailbox's refusals give their
    // token back, however many; user 999's final refusals keep theirs.
    assert_eq!(codes, [None, full, full, full, full, unknown, unknown, full]);
    let send = frames::Send { client_msg_id: 9, to_user: 999, after: None, payload: b"m".to_vec() };
    core.handle_frame(sender, Frame::Send(send), at(NOW_MS));
    let out = outputs(&mut core);
    assert!(
        matches!(&out[..], [Output::Frame { frame: Frame::Error(e), .. }] if ErrorCode::from_u16(e.code) == throttle),
        "the pair 10 -> 999 spent its two tokens on final refusals: {out:?}"
    );
}

#[test]
fn a_retry_after_a_reconnect_gets_the_original_ack() {
    // The Ack of a send answered while its device was offline never
    // reached it, so the SDK retries on reconnect: the sender's window
    // must still know the id (dropping offline devices' windows made
    // such retries depend on the recipient shard's window, and the
    // simulation then found duplicates once that window had moved on).
    let authority = TokenAuthority::from_secret([5; 32]);
    let mut core = core(&authority);
    let (sender, recipient) = (ConnId(1), ConnId(2));
    hello(&mut core, &authority, recipient, 20);
    hello(&mut core, &authority, sender, 10);
    let send = frames::Send { client_msg_id: 7, to_user: 20, after: None, payload: b"hi".to_vec() };
    core.handle_frame(sender, Frame::Send(send.clone()), at(NOW_MS));
    core.handle_connection_closed(sender, at(NOW_MS));
    // Another sender's message pushes the key out of the recipient side.
    hello(&mut core, &authority, ConnId(4), 30);
    let other = frames::Send { client_msg_id: 1, to_user: 20, after: None, payload: b"other".to_vec() };
    core.handle_frame(ConnId(4), Frame::Send(other), at(NOW_MS));
    while core.poll_output().is_some() {}
    hello(&mut core, &authority, ConnId(3), 10);
    core.handle_frame(ConnId(3), Frame::Send(send), at(NOW_MS));
    let ack = core.poll_output();
    assert!(matches!(ack, Some(Output::Frame { frame: Frame::Ack(ack), .. }) if ack.client_msg_id == 7));
    assert_eq!(core.stats().messages_stored, 2, "the retry must not be stored again");
}

/// Limits for the queue tests: only the queue bound `outbox` (per
/// destination shard) holds sends back.
fn queue_limits(outbox: u32) -> CoreLimits {
    CoreLimits {
        dedup_entries_per_device_max: 8,
        sender_dedup_entries_max: 1024,
        sends_in_flight_per_device_max: 1000,
        shard_outbox_messages_max: outbox,
        device_inactive_expiry_s: 0,
        rates: SendRates::OFF,
        codel_target_ms: 0,
        codel_interval_ms: 100,
        hello_timeout_ms: 10_000,
        commit_delay_us: 0,
        commit_bytes_max: 1 << 20,
        presence: crate::shard::presence::PresenceLimits::DEFAULT,
    }
}

#[test]
fn heavy_senders_get_a_fair_share_of_the_queue_and_leave_room_for_a_light_one() {
    // Shard 0 of two, a queue to shard 1 of 64 sends that shard 1 never
    // answers: two heavy devices pipeline 40 sends each, then a light one
    // sends one. Without fair shares the heavy ones fill the queue and the
    // light one is refused.
    let authority = TokenAuthority::from_secret([9; 32]);
    let limits = queue_limits(64);
    let (mut core, table) = shard_zero_of_two(&authority, limits);
    let on_shard = |shard: u16, from: u64| (from..).find(|user| table.home(UserId(*user)).shard.0 == shard).unwrap();
    let (heavy_a, heavy_b, light, remote) = (on_shard(0, 1), on_shard(0, 100), on_shard(0, 1000), on_shard(1, 1));
    for (conn, user) in [(1, heavy_a), (2, heavy_b), (3, light)] {
        hello(&mut core, &authority, ConnId(conn), user);
    }
    let accepted = |core: &mut ShardCore<MemoryStore>, conn: u64, count: u64| -> u64 {
        (0..count)
            .filter(|id| {
                let frame =
                    Frame::Send(frames::Send { client_msg_id: *id, to_user: remote, after: None, payload: vec![1] });
                core.handle_frame(ConnId(conn), frame, at(NOW_MS));
                !outputs(core).iter().any(|o| matches!(o, Output::Frame { frame: Frame::Error(_), .. }))
            })
            .count() as u64
    };
    let a = accepted(&mut core, 1, 40);
    let b = accepted(&mut core, 2, 40);
    assert_eq!((a, b), (32, 16), "each heavy device is held to its share once half the queue is used");
    assert_eq!(accepted(&mut core, 3, 1), 1, "the light sender still gets in");
    assert_eq!(core.stats().unfair_refusals, 8 + 24);
}

#[test]
fn sends_in_flight_to_a_shard_are_capped_so_its_replies_are_bounded() {
    // Shard 0 of two; shard 1 never answers and the channel takes every
    // batch at once, so the outbox never fills. Twelve devices pipeline 8
    // sends each: fair shares alone let each have 8 in flight (96 in all),
    // and shard 1 would queue one StoreOutcome per send outside any bound.
    let authority = TokenAuthority::from_secret([9; 32]);
    let limits = queue_limits(16);
    let (mut core, table) = shard_zero_of_two(&authority, limits);
    let on_shard = |shard: u16, from: u64| (from..).find(|user| table.home(UserId(*user)).shard.0 == shard).unwrap();
    let remote = on_shard(1, 1);
    let local = on_shard(0, 5_000);
    let mut accepted = 0;
    let mut forwarded = 0;
    let mut from = 1;
    for conn in 1..=12 {
        let user = on_shard(0, from);
        from = user + 1;
        hello(&mut core, &authority, ConnId(conn), user);
        for id in 0..8 {
            let frame = Frame::Send(frames::Send { client_msg_id: id, to_user: remote, after: None, payload: vec![1] });
            core.handle_frame(ConnId(conn), frame, at(NOW_MS));
            let refused = outputs(&mut core).iter().any(
                |o| matches!(o, Output::Frame { frame: Frame::Error(e), .. } if e.code == ErrorCode::Throttle as u16),
            );
            accepted += u64::from(!refused);
            forwarded += core.poll_outbox(1, usize::MAX).len() as u64;
        }
    }
    assert_eq!(accepted, 16, "at most shard_outbox_messages_max sends in flight to one shard");
    assert_eq!(forwarded, accepted);
    // The cap is per destination: a new device's send to a user on this
    // shard is stored and acknowledged.
    hello(&mut core, &authority, ConnId(100), local);
    let fresh = on_shard(0, from);
    hello(&mut core, &authority, ConnId(101), fresh);
    let frame = Frame::Send(frames::Send { client_msg_id: 1, to_user: local, after: None, payload: vec![1] });
    core.handle_frame(ConnId(101), frame, at(NOW_MS));
    let answers = outputs(&mut core);
    assert!(
        answers.iter().any(|o| matches!(o, Output::Frame { conn: ConnId(101), frame: Frame::Ack(_) })),
        "{answers:?}"
    );
}

/// The CloseNow outputs among `outputs`, as (connection, close code, reason).
fn closed_now(outputs: &[Output]) -> Vec<(ConnId, u32, &'static str)> {
    outputs
        .iter()
        .filter_map(|output| match output {
            Output::CloseNow { conn, close_code, reason } => Some((*conn, *close_code, *reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_connection_without_a_hello_is_closed_at_its_timeout_and_a_welcomed_one_never() {
    // The test core gives a connection 10 s to authenticate.
    let authority = TokenAuthority::from_secret([12; 32]);
    let mut core = core(&authority);
    core.handle_connection(ConnId(1), at(NOW_MS));
    core.handle_connection(ConnId(2), at(NOW_MS + 1_000));
    hello(&mut core, &authority, ConnId(3), 10);
    core.handle_timeout(at(NOW_MS + 9_999));
    assert_eq!(closed_now(&outputs(&mut core)), []);
    core.handle_timeout(at(NOW_MS + 10_000));
    let no_hello = (close_code::PROTOCOL_ERROR, "no Hello in time");
    assert_eq!(closed_now(&outputs(&mut core)), [(ConnId(1), no_hello.0, no_hello.1)]);
    core.handle_timeout(at(NOW_MS + 11_000));
    assert_eq!(closed_now(&outputs(&mut core)), [(ConnId(2), no_hello.0, no_hello.1)]);
    // A Hello that comes after the timeout is not answered.
    let token = authority.mint(Claims { user_id: 11, device_id: 1, expires_at_s: u64::MAX });
    core.handle_frame(ConnId(1), Frame::Hello(frames::Hello { token, resume_after_seq: 0 }), at(NOW_MS + 11_000));
    assert_eq!(outputs(&mut core), []);
    core.handle_timeout(at(NOW_MS + 1_000_000));
    assert_eq!(closed_now(&outputs(&mut core)), [], "the welcomed connection stays");
}

#[test]
fn a_closing_connection_the_client_does_not_end_is_closed_after_its_grace() {
    let authority = TokenAuthority::from_secret([13; 32]);
    let mut core = core(&authority);
    for conn in [ConnId(1), ConnId(2)] {
        core.handle_connection(conn, at(NOW_MS));
        // A Send before Hello: a protocol violation, answered and closed.
        let send = frames::Send { client_msg_id: 1, to_user: 20, after: None, payload: vec![1] };
        core.handle_frame(conn, Frame::Send(send), at(NOW_MS + 100));
    }
    let out = outputs(&mut core);
    for conn in [ConnId(1), ConnId(2)] {
        let expected = Some((close_code::PROTOCOL_ERROR, Some(ErrorCode::ProtocolViolation as u16)));
        assert_eq!(closed_with(&out, conn), expected);
    }
    // The driver ends connection 2 at once; connection 1's client never
    // reads its Error, so the core closes it when the grace has passed.
    core.handle_connection_closed(ConnId(2), at(NOW_MS + 200));
    core.handle_timeout(at(NOW_MS + 100 + CLOSE_GRACE_MS - 1));
    assert_eq!(closed_now(&outputs(&mut core)), []);
    core.handle_timeout(at(NOW_MS + 100 + CLOSE_GRACE_MS));
    assert_eq!(closed_now(&outputs(&mut core)), [(ConnId(1), close_code::PROTOCOL_ERROR, "closed by server")]);
    // The grace replaced the hello deadline: nothing more for either.
    core.handle_timeout(at(NOW_MS + 60_000));
    assert_eq!(closed_now(&outputs(&mut core)), []);
}

#[test]
fn a_device_whose_registration_outlasts_the_hello_timeout_still_expires() {
    // The test core gives 10 s to authenticate and expires devices after 100 s.
    let authority = TokenAuthority::from_secret([14; 32]);
    let mut files = Vec::new();
    let mut core = recovered_core(&authority, &files);
    core.handle_timeout(at(NOW_MS));
    core.handle_connection(ConnId(1), at(NOW_MS));
    let token = authority.mint(Claims { user_id: 20, device_id: 1, expires_at_s: u64::MAX });
    core.handle_frame(ConnId(1), Frame::Hello(frames::Hello { token, resume_after_seq: 0 }), at(NOW_MS));
    // The registration is not durable yet when the deadline passes.
    core.handle_timeout(at(NOW_MS + 10_000));
    let out: Vec<Output> = std::iter::from_fn(|| core.poll_output()).collect();
    assert_eq!(closed_now(&out), [(ConnId(1), close_code::PROTOCOL_ERROR, "no Hello in time")]);
    core.handle_connection_closed(ConnId(1), at(NOW_MS + 10_000));
    write_log(&mut core, &mut files);
    assert_eq!(core.store().devices_of(20), &[1], "registered after all");
    core.handle_timeout(at(NOW_MS + 200_000));
    assert_eq!(core.store().devices_of(20), &[] as &[u32], "idle since its deadline, so it expires");
}

/// Draining: a session with a Send in flight stays open until the Send is
/// answered (its Ack is queued before the close), one with none closes at
/// once, new Sends are neither taken nor answered, new connections are
/// closed, and the shard settles only when nothing is owed.
#[test]
fn a_drain_answers_the_sends_in_flight_before_it_closes_their_sessions() {
    let authority = TokenAuthority::from_secret([9; 32]);
    let limits = CoreLimits {
        dedup_entries_per_device_max: 8,
        sender_dedup_entries_max: 64,
        sends_in_flight_per_device_max: 16,
        shard_outbox_messages_max: 64,
        device_inactive_expiry_s: 0,
        rates: SendRates::OFF,
        codel_target_ms: 0,
        codel_interval_ms: 100,
        hello_timeout_ms: 10_000,
        commit_delay_us: 0,
        commit_bytes_max: 1 << 20,
        presence: crate::shard::presence::PresenceLimits::DEFAULT,
    };
    let (mut core, table) = shard_zero_of_two(&authority, limits);
    let on_shard = |shard: u16, from: u64| (from..).find(|user| table.home(UserId(*user)).shard.0 == shard).unwrap();
    let (sender, idle, remote) = (on_shard(0, 1), on_shard(0, 1000), on_shard(1, 1));
    let (busy_conn, idle_conn) = (ConnId(1), ConnId(2));
    hello(&mut core, &authority, busy_conn, sender);
    hello(&mut core, &authority, idle_conn, idle);
    let send =
        |id: u64| Frame::Send(frames::Send { client_msg_id: id, to_user: remote, after: None, payload: vec![1] });
    core.handle_frame(busy_conn, send(1), at(NOW_MS));
    assert!(outputs(&mut core).is_empty(), "the send waits for shard 1");
    assert_eq!(core.poll_outbox(1, 64).len(), 1, "the send goes to shard 1");

    core.begin_drain(at(NOW_MS));
    let drained = outputs(&mut core);
    assert_eq!(closed_with(&drained, idle_conn), Some((close_code::SHUTTING_DOWN, None)));
    assert_eq!(closed_with(&drained, busy_conn), None, "closed with its Send unanswered");
    assert!(!core.drain_settled());
    // A Send that comes now is not taken: nothing is answered or routed.
    core.handle_frame(busy_conn, send(2), at(NOW_MS));
    assert!(outputs(&mut core).is_empty());
    assert!(core.poll_outbox(1, 64).is_empty(), "a send taken while draining");
    // A connection that opens now is closed at once.
    core.handle_connection(ConnId(3), at(NOW_MS));
    assert_eq!(closed_with(&outputs(&mut core), ConnId(3)), Some((close_code::SHUTTING_DOWN, None)));

    // Shard 1 answers the Send in flight: its Ack, then the close.
    let stored = ShardMessage::StoreOutcome {
        sender: DeviceKey { user: sender, device: 1 },
        accepted_at_ms: NOW_MS,
        to_user: remote,
        payload_bytes: 1,
        client_msg_id: 1,
        result: Ok(42),
    };
    core.handle_shard_message(1, stored, at(NOW_MS + 1));
    core.handle_timeout(at(NOW_MS + 1));
    let answered = outputs(&mut core);
    let ack_at = answered.iter().position(
        |output| matches!(output, Output::Frame { conn, frame: Frame::Ack(ack) } if *conn == busy_conn && ack.client_msg_id == 1),
    );
    let close_at = answered
        .iter()
        .position(|output| matches!(output, Output::Close { conn, close_code, .. } if *conn == busy_conn && *close_code == close_code::SHUTTING_DOWN));
    assert!(ack_at.is_some() && close_at.is_some() && ack_at < close_at, "{answered:?}");
    assert!(core.drain_settled());
}
