use iris_shard_map::*;

#[test]
fn users_spread_uniformly_over_slots_and_shards() {
    let shards = 8u16;
    let table = SlotTable::single_node(NodeId(0), shards, 1).unwrap();
    let users = 400_000u64;
    let mut per_shard = vec![0u64; shards as usize];
    let mut per_slot = vec![0u64; SLOT_COUNT as usize];
    for user in 0..users {
        per_slot[slot_for_user(UserId(user)).0 as usize] += 1;
        per_shard[table.home(UserId(user)).shard.0 as usize] += 1;
    }
    let expected_shard = users as f64 / f64::from(shards);
    for (shard, count) in per_shard.iter().enumerate() {
        let deviation = (*count as f64 - expected_shard).abs() / expected_shard;
        // 4096 slots over 8 shards by jump hash: about 512 +- 22 slots each,
        // so a shard may sit a few percent off; 10% would mean a broken spread.
        assert!(deviation < 0.10, "shard {shard} holds {count} users, expected about {expected_shard}");
    }
    let expected_slot = users as f64 / f64::from(SLOT_COUNT);
    let max = *per_slot.iter().max().unwrap() as f64;
    let min = *per_slot.iter().min().unwrap() as f64;
    assert!(max < expected_slot * 1.5 && min > expected_slot * 0.5, "slot spread {min}..{max}");
}

#[test]
fn changing_the_shard_count_moves_only_the_slots_that_must_move() {
    for shards in 1u16..16 {
        let before = SlotTable::single_node(NodeId(0), shards, 1).unwrap();
        let after = SlotTable::single_node(NodeId(0), shards + 1, 2).unwrap();
        let mut moved = 0;
        for slot in 0..SLOT_COUNT {
            let (old, new) = (before.owner(Slot(slot)), after.owner(Slot(slot)));
            if old != new {
                moved += 1;
                // Every moved slot goes to the new shard; nothing shuffles between old shards.
                assert_eq!(new.shard, ShardId(shards), "slot {slot} moved between old shards");
            }
        }
        let ideal = f64::from(SLOT_COUNT) / f64::from(shards + 1);
        assert!((moved as f64 - ideal).abs() / ideal < 0.15, "{shards}->{}: moved {moved}, ideal {ideal}", shards + 1);
    }
}

#[test]
fn tables_are_validated() {
    assert_eq!(SlotTable::single_node(NodeId(0), 0, 1), Err(ShardMapError::NoShards));
    assert_eq!(SlotTable::from_owners(1, vec![]), Err(ShardMapError::WrongSlotCount(0)));
    let table = SlotTable::single_node(NodeId(3), 4, 9).unwrap();
    let copy = SlotTable::from_owners(9, table.owners().to_vec()).unwrap();
    assert_eq!(copy, table);
    assert_eq!(copy.epoch(), 9);
}
