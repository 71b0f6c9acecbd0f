//! One Send from a connected device to another device on the same shard:
//! dedup window, routing, mailbox append, commit release, Ack, and the pull of
//! the Deliver frame, all in the shard core without sockets.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use iris_protocol::frames::{self, Frame};
use iris_shard_map::{NodeId, ShardId, SlotTable, UserId};
use irisd::auth::{Claims, TokenAuthority};
use irisd::shard::mailbox::StoreLimits;
use irisd::shard::{ConnId, CoreLimits, MemoryStore, Now, SendRates, ShardCore, ShardIdentity};

fn message_path(c: &mut Criterion) {
    let authority = TokenAuthority::from_secret([1; 32]);
    let table = SlotTable::single_node(NodeId(0), 1, 1).unwrap();
    let identity = ShardIdentity {
        node: NodeId(0),
        shard: ShardId(0),
        advertised_host: "127.0.0.1".into(),
        shard_ports: vec![7700],
        message_ids: 1..1 << 40,
    };
    let limits = CoreLimits {
        dedup_entries_per_device_max: 256,
        sender_dedup_entries_max: 1_048_576,
        sends_in_flight_per_device_max: 256,
        shard_outbox_messages_max: 1024,
        device_inactive_expiry_s: 0,
        rates: SendRates::OFF,
        codel_target_ms: 0,
        codel_interval_ms: 100,
        hello_timeout_ms: 10_000,
        commit_delay_us: 0,
        commit_bytes_max: 1 << 20,
        presence: irisd::shard::presence::PresenceLimits::DEFAULT,
    };
    let store = MemoryStore::new(StoreLimits {
        devices_per_user_max: 5,
        devices_per_shard_max: 1000,
        mailbox_messages_max: 1_000_000,
        mailbox_bytes_max: 1 << 32,
        mailbox_sender_messages_max: u32::MAX,
        mailbox_sender_bytes_max: u64::MAX,
        stored_dedup_entries_max: 100_000,
        shard_mailbox_bytes_max: 1 << 40,
    });
    let mut core = ShardCore::new(identity, table.clone(), authority.verifier(), limits, 65536, store);
    let (sender, receiver) = (ConnId(1), ConnId(2));
    for (conn, user) in [(sender, 1u64), (receiver, 2u64)] {
        assert_eq!(table.home(UserId(user)).shard.0, 0);
        let token = authority.mint(Claims { user_id: user, device_id: 1, expires_at_s: u64::MAX });
        core.handle_connection(conn, Now::default());
        core.handle_frame(conn, Frame::Hello(frames::Hello { token, resume_after_seq: 0 }), Now::default());
    }
    while core.poll_output().is_some() {}
    let now = Now { monotonic_us: 1000, wall_ms: 1 };
    let mut client_msg_id = 0u64;
    let mut group = c.benchmark_group("message_path");
    group.throughput(Throughput::Elements(1));
    group.bench_function("send_store_ack_deliver_150B", |b| {
        b.iter(|| {
            client_msg_id += 1;
            let send = Frame::Send(frames::Send { client_msg_id, to_user: 2, after: None, payload: vec![7; 150] });
            core.handle_frame(sender, send, now);
            let ack = core.poll_output();
            debug_assert!(matches!(ack, Some(irisd::shard::Output::Frame { .. })));
            while core.poll_push_ready().is_some() {}
            let deliver = core.poll_push(receiver);
            if let Some(Frame::Deliver(deliver)) = &deliver {
                let ack = Frame::DeliveryAck(frames::DeliveryAck { up_to_seq: deliver.seq });
                core.handle_frame(receiver, ack, now);
            }
            black_box((ack, deliver))
        })
    });
    group.finish();
}

criterion_group!(benches, message_path);
criterion_main!(benches);
