//! iris-shard-map: where a user lives. Pure: no runtime, no I/O, no clock.
//!
//! # Layout
//! - [`slot_for_user`]: user id -> slot, a fixed hash over [`SLOT_COUNT`] slots.
//! - [`SlotTable`]: slot -> (node, shard), versioned by an epoch.
//! - [`jump_consistent_hash`]: spreads slots over shards so that changing the
//!   shard count moves only the slots that must move.
//!
//! The slot count never changes for a deployment: it is the unit of data
//! movement. 4096 slots keep the table small (16 KiB on the wire) while giving
//! enough granularity to balance up to a few hundred shards.

#![forbid(unsafe_code)]

/// Number of slots in every table.
pub const SLOT_COUNT: u32 = 4096;

/// A user id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub u64);

/// A slot index in `0..SLOT_COUNT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(pub u32);

/// A node id in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u16);

/// A shard index on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

/// The owner of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Node that serves the slot.
    pub node: NodeId,
    /// Shard on that node.
    pub shard: ShardId,
}

/// Errors from building or importing a table.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShardMapError {
    /// A table must have exactly `SLOT_COUNT` entries.
    #[error("slot table has {0} entries, expected {SLOT_COUNT}")]
    WrongSlotCount(usize),
    /// Zero shards cannot own anything.
    #[error("shard count must be at least 1")]
    NoShards,
}

/// The fixed user -> slot hash (the splitmix64 finalizer, a bijective mixer
/// with full avalanche, so sequential user ids spread evenly).
pub fn slot_for_user(user: UserId) -> Slot {
    let mut z = user.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    Slot((z % u64::from(SLOT_COUNT)) as u32)
}

/// Jump consistent hash (Lamping and Veach, 2014): maps `key` to one of
/// `buckets` buckets such that growing from n to n+1 buckets moves only
/// about 1/(n+1) of the keys, all of them into the new bucket.
pub fn jump_consistent_hash(key: u64, buckets: u32) -> u32 {
    assert!(buckets > 0, "jump_consistent_hash needs at least one bucket");
    let mut key = key;
    let mut bucket: i64 = -1;
    let mut next: i64 = 0;
    while next < i64::from(buckets) {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        next = ((bucket + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    bucket as u32
}

/// slot -> owner, with the epoch that versions it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotTable {
    /// Increases with every change; a holder ignores tables older than its own.
    epoch: u64,
    /// Owner of each slot, indexed by slot; always `SLOT_COUNT` long.
    owners: Vec<Owner>,
}

impl SlotTable {
    /// The table of a single node whose `shards` shards share all slots.
    pub fn single_node(node: NodeId, shards: u16, epoch: u64) -> Result<SlotTable, ShardMapError> {
        if shards == 0 {
            return Err(ShardMapError::NoShards);
        }
        let owners = (0..SLOT_COUNT)
            .map(|slot| Owner { node, shard: ShardId(jump_consistent_hash(u64::from(slot), u32::from(shards)) as u16) })
            .collect();
        Ok(SlotTable { epoch, owners })
    }

    /// A table from explicit owners (as received on the wire).
    pub fn from_owners(epoch: u64, owners: Vec<Owner>) -> Result<SlotTable, ShardMapError> {
        if owners.len() != SLOT_COUNT as usize {
            return Err(ShardMapError::WrongSlotCount(owners.len()));
        }
        Ok(SlotTable { epoch, owners })
    }

    /// The table's version.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Owner of `slot`.
    pub fn owner(&self, slot: Slot) -> Owner {
        self.owners[slot.0 as usize % self.owners.len()]
    }

    /// Home of `user`: the owner of the user's slot.
    pub fn home(&self, user: UserId) -> Owner {
        self.owner(slot_for_user(user))
    }

    /// Every owner, indexed by slot.
    pub fn owners(&self) -> &[Owner] {
        &self.owners
    }
}
