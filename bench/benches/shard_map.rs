use criterion::{black_box, criterion_group, criterion_main, Criterion};
use iris_shard_map::{slot_for_user, NodeId, SlotTable, UserId};

fn shard_map(c: &mut Criterion) {
    let table = SlotTable::single_node(NodeId(0), 16, 1).unwrap();
    let mut user = 0u64;
    c.bench_function("shard_map/home", |b| {
        b.iter(|| {
            user = user.wrapping_add(0x9E37_79B9);
            black_box(table.home(UserId(black_box(user))))
        })
    });
    c.bench_function("shard_map/slot_for_user", |b| {
        b.iter(|| {
            user = user.wrapping_add(1);
            black_box(slot_for_user(UserId(black_box(user))))
        })
    });
    c.bench_function("shard_map/build_table_16_shards", |b| {
        b.iter(|| black_box(SlotTable::single_node(NodeId(0), black_box(16), 1).unwrap()))
    });
}

criterion_group!(benches, shard_map);
criterion_main!(benches);
