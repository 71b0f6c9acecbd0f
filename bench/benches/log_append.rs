//! The durable log: the CPU cost of logging a message (record encoding into
//! a write chunk), and group commit on a real file — one buffered write plus
//! one fdatasync per batch through the shard's log writer — for batches of
//! 1, 16 and 256 messages of 150 bytes. Throughput is per message, so the
//! ratio between batch sizes is what group commit buys.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use irisd::driver::log_writer::{run_writer, WriterCommand, WriterEvent};
use irisd::shard::mailbox::{MailboxMessage, MailboxStore, StoreLimits};
use irisd::shard::DeviceKey;
use irisd::storage::io::LogIo;
use irisd::storage::record::{LogKey, LOG_KEY_BYTES};
use irisd::storage::{LogLimits, LogStore};
use std::rc::Rc;
use std::time::{Duration, Instant};

fn store() -> LogStore {
    let limits = StoreLimits {
        devices_per_user_max: 5,
        devices_per_shard_max: 1000,
        mailbox_messages_max: u32::MAX,
        mailbox_bytes_max: u64::MAX,
        mailbox_sender_messages_max: u32::MAX,
        mailbox_sender_bytes_max: u64::MAX,
        stored_dedup_entries_max: 1 << 16,
        shard_mailbox_bytes_max: 1 << 40,
    };
    let mut store = LogStore::new(limits, LogLimits::keep_bodies(1 << 30, 1 << 20));
    store.register_device(DeviceKey { user: 2, device: 1 }).unwrap();
    store
}

fn message(id: u64) -> Rc<MailboxMessage> {
    Rc::new(MailboxMessage {
        from_user: 1,
        from_device: 1,
        client_msg_id: id,
        server_msg_id: id,
        sent_at_ms: 1_700_000_000_000,
        to_user: 2,
        payload: vec![0xA5; 150],
    })
}

fn log_append(c: &mut Criterion) {
    let recipient = [DeviceKey { user: 2, device: 1 }];
    let mut group = c.benchmark_group("log");
    group.throughput(Throughput::Elements(1));
    let mut log = store();
    let mut id = 0;
    group.bench_function("encode_append_150B", |b| {
        b.iter(|| {
            id += 1;
            log.store_message(message(id), &recipient).unwrap();
            if id % 256 == 0 {
                let _ = log.take_write();
                log.acknowledge(recipient[0], id);
            }
        })
    });

    let directory = tempfile::tempdir_in(".").expect("temporary directory on the build disk");
    let executor = glommio::LocalExecutorBuilder::default().make().expect("glommio executor");
    for batch in [1u64, 16, 256] {
        group.throughput(Throughput::Elements(batch));
        group.bench_with_input(BenchmarkId::new("group_commit_fdatasync", batch), &batch, |b, &batch| {
            b.iter_custom(|iterations| {
                let dir = directory.path().join(format!("batch-{batch}-{}", Instant::now().elapsed().as_nanos()));
                std::fs::create_dir_all(&dir).unwrap();
                executor.run(async move {
                    let (commands, command_receiver) = flume::bounded(4);
                    let (event_sender, events) = flume::bounded(4);
                    let writer = glommio::spawn_local(run_writer(
                        dir,
                        LogKey::from_secret(&[7; LOG_KEY_BYTES]),
                        None,
                        0,
                        command_receiver,
                        event_sender,
                    ));
                    let mut log = store();
                    let mut id = 0;
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iterations {
                        for _ in 0..batch {
                            id += 1;
                            log.store_message(message(id), &recipient).unwrap();
                        }
                        let chunk = log.take_write().expect("a chunk");
                        let started = Instant::now();
                        commands.send_async(WriterCommand::Write(chunk)).await.unwrap();
                        match events.recv_async().await.unwrap() {
                            WriterEvent::Durable { .. } => {}
                            WriterEvent::Failed { error, .. } => panic!("write failed: {error}"),
                        }
                        elapsed += started.elapsed();
                    }
                    drop(commands);
                    writer.await;
                    elapsed
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(4));
    targets = log_append
}
criterion_main!(benches);
