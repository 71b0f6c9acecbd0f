//! Token buckets for per-sender rate limits (docs/overload.md).
//!
//! A bucket holds up to `burst` tokens and gains `per_s` tokens a second; a
//! send costs one token per bucket it is charged to (or its bytes, for a
//! byte bucket) and is refused with `Throttle{retry_after_ms}` when a
//! bucket lacks them, saying when it will have them. Tokens are kept in
//! thousandths so that refill is exact in integer milliseconds.
//!
//! [`RateTable`] keeps the buckets of many keys (sending devices, or sender
//! -> recipient pairs). A full bucket says nothing that a fresh one would
//! not, so keys whose buckets are all full are forgotten by a sweep that
//! runs once per as many charges as it kept keys (amortised O(1) per
//! charge, no per-charge bookkeeping): what stays is about the keys charged
//! within the last `burst / per_s` seconds. The table
//! also has a hard bound; at it, a new key is not tracked (and not limited
//! by this table; the sending device's own buckets still apply), counted in
//! [`RateTable::untracked`] (exported as `iris_rate_limit_untracked_total`).

use super::StateMap;
use std::hash::Hash;

/// A sweep for refilled keys runs at most once per this many charges (and
/// otherwise once per as many charges as keys are tracked).
const SWEEP_CHARGES_MIN: usize = 1024;

/// One bucket's rule; `per_s == 0` disables it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens gained per second.
    pub per_s: u64,
    /// Most tokens held (what a quiet sender may spend at once).
    pub burst: u64,
}

impl Rate {
    /// A disabled rule.
    pub const OFF: Rate = Rate { per_s: 0, burst: 0 };

    fn enabled(self) -> bool {
        self.per_s > 0
    }

    fn capacity_milli(self) -> u64 {
        self.burst.max(1).saturating_mul(1000)
    }
}

/// The state of one key: tokens (thousandths) per bucket, and when they were counted.
#[derive(Debug, Clone, Copy)]
struct Buckets<const N: usize> {
    tokens_milli: [u64; N],
    at_ms: u64,
}

/// Buckets of `N` rules per key (see the module documentation).
#[derive(Debug)]
pub struct RateTable<K, const N: usize> {
    rates: [Rate; N],
    keys: StateMap<K, Buckets<N>>,
    /// Charges since the last sweep for refilled keys.
    charges_since_sweep: usize,
    /// Charges after which the next sweep runs: the keys the last one kept
    /// (at least [`SWEEP_CHARGES_MIN`]), so sweeping costs O(1) per charge.
    sweep_every: usize,
    /// When the first key kept by the last sweep will have refilled: before
    /// then a sweep frees nothing, so a table at its bound does not sweep
    /// for every new key.
    next_refill_ms: u64,
    keys_max: usize,
    untracked: u64,
}

impl<K: Copy + Eq + Hash, const N: usize> RateTable<K, N> {
    /// A table applying `rates` to each key, tracking at most `keys_max` keys.
    pub fn new(rates: [Rate; N], keys_max: usize) -> RateTable<K, N> {
        RateTable {
            rates,
            keys: StateMap::default(),
            charges_since_sweep: 0,
            sweep_every: SWEEP_CHARGES_MIN,
            next_refill_ms: 0,
            keys_max,
            untracked: 0,
        }
    }

    /// Charges `costs` (one per rule) to `key` at `now_ms` if every bucket
    /// has them; otherwise charges nothing and returns how many ms until
    /// it would (at least 1).
    pub fn charge(&mut self, key: K, now_ms: u64, costs: [u64; N]) -> Result<(), u32> {
        if !self.rates.iter().any(|rate| rate.enabled()) {
            return Ok(());
        }
        self.charges_since_sweep += 1;
        if self.charges_since_sweep >= self.sweep_every {
            self.forget_full(now_ms);
        }
        if self.keys.len() >= self.keys_max && !self.keys.contains_key(&key) {
            if now_ms >= self.next_refill_ms {
                self.forget_full(now_ms);
            }
            if self.keys.len() >= self.keys_max {
                self.untracked += 1;
                return Ok(());
            }
        }
        let rates = self.rates;
        let state = self
            .keys
            .entry(key)
            .or_insert_with(|| Buckets { tokens_milli: rates.map(Rate::capacity_milli), at_ms: now_ms });
        let elapsed_ms = now_ms.saturating_sub(state.at_ms);
        let mut wait_ms = 0u64;
        for (index, rate) in rates.iter().enumerate() {
            if !rate.enabled() {
                continue;
            }
            // per_s tokens a second is per_s thousandths a millisecond.
            let refilled = state.tokens_milli[index].saturating_add(elapsed_ms.saturating_mul(rate.per_s));
            state.tokens_milli[index] = refilled.min(rate.capacity_milli());
            // A cost above the burst could never be paid: charge the burst.
            let cost = costs[index].min(rate.burst.max(1)).saturating_mul(1000);
            if state.tokens_milli[index] < cost {
                wait_ms = wait_ms.max((cost - state.tokens_milli[index]).div_ceil(rate.per_s));
            }
        }
        state.at_ms = state.at_ms.max(now_ms);
        if wait_ms == 0 {
            for (index, rate) in rates.iter().enumerate() {
                if rate.enabled() {
                    state.tokens_milli[index] -= costs[index].min(rate.burst.max(1)).saturating_mul(1000);
                }
            }
        }
        match wait_ms {
            0 => Ok(()),
            wait_ms => Err(u32::try_from(wait_ms).unwrap_or(u32::MAX)),
        }
    }

    /// Gives back what [`RateTable::charge`] took for `costs` (a later check
    /// refused the send), up to each bucket's burst.
    pub fn refund(&mut self, key: K, costs: [u64; N]) {
        let Some(state) = self.keys.get_mut(&key) else { return };
        for (index, rate) in self.rates.iter().enumerate() {
            if rate.enabled() {
                let cost = costs[index].min(rate.burst.max(1)).saturating_mul(1000);
                state.tokens_milli[index] = state.tokens_milli[index].saturating_add(cost).min(rate.capacity_milli());
            }
        }
    }

    /// Forgets every key whose buckets have all refilled by `now_ms`.
    fn forget_full(&mut self, now_ms: u64) {
        self.charges_since_sweep = 0;
        let rates = self.rates;
        let mut next_refill_ms = u64::MAX;
        self.keys.retain(|_, state| {
            // When every bucket of this key is full again.
            let full_at_ms = rates
                .iter()
                .zip(state.tokens_milli)
                .filter(|(rate, _)| rate.enabled())
                .map(|(rate, tokens)| state.at_ms + rate.capacity_milli().saturating_sub(tokens).div_ceil(rate.per_s))
                .max()
                .unwrap_or(0);
            let keep = full_at_ms > now_ms;
            if keep {
                next_refill_ms = next_refill_ms.min(full_at_ms);
            }
            keep
        });
        self.next_refill_ms = next_refill_ms;
        self.sweep_every = self.keys.len().max(SWEEP_CHARGES_MIN);
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.keys.len()
    }

    /// Charges let through untracked because the table was at its bound.
    pub fn untracked(&self) -> u64 {
        self.untracked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_spends_its_burst_then_refills_at_its_rate() {
        let mut table: RateTable<u32, 1> = RateTable::new([Rate { per_s: 2, burst: 3 }], 10);
        for _ in 0..3 {
            assert_eq!(table.charge(7, 1_000, [1]), Ok(()));
        }
        // Empty: one token takes 500 ms at 2 a second.
        assert_eq!(table.charge(7, 1_000, [1]), Err(500));
        assert_eq!(table.charge(7, 1_200, [1]), Err(300));
        assert_eq!(table.charge(7, 1_500, [1]), Ok(()));
        // Other keys have their own buckets.
        assert_eq!(table.charge(8, 1_500, [1]), Ok(()));
        // Never more than the burst, however long it waited.
        assert_eq!(table.charge(7, 1_000_000, [3]), Ok(()));
        assert_eq!(table.charge(7, 1_000_000, [1]), Err(500));
    }

    #[test]
    fn every_bucket_must_have_the_tokens_and_a_refusal_charges_none() {
        let rates = [Rate { per_s: 10, burst: 10 }, Rate { per_s: 1000, burst: 1000 }];
        let mut table: RateTable<u32, 2> = RateTable::new(rates, 10);
        assert_eq!(table.charge(1, 0, [1, 900]), Ok(()));
        // 100 bytes left: 300 more take 200 ms; the message bucket is untouched.
        assert_eq!(table.charge(1, 0, [1, 300]), Err(200));
        for _ in 0..9 {
            assert_eq!(table.charge(1, 0, [1, 10]), Ok(()));
        }
        assert_eq!(table.charge(1, 0, [1, 0]), Err(100));
        // A cost above the burst is charged as the burst, so it can pass.
        assert_eq!(table.charge(2, 0, [1, 5000]), Ok(()));
        // A refund gives the tokens back (one byte refills in 1 ms).
        assert_eq!(table.charge(2, 0, [1, 1]), Err(1));
        table.refund(2, [1, 1000]);
        assert_eq!(table.charge(2, 0, [1, 1000]), Ok(()));
    }

    #[test]
    fn refilled_keys_are_forgotten_and_the_bound_holds() {
        let mut table: RateTable<u32, 1> = RateTable::new([Rate { per_s: 1, burst: 2 }], 3);
        for key in 0..3 {
            table.charge(key, 0, [1]).unwrap();
        }
        assert_eq!(table.tracked(), 3);
        // At the bound and nothing refilled: the new key passes untracked.
        assert_eq!(table.charge(9, 500, [1]), Ok(()));
        assert_eq!((table.tracked(), table.untracked()), (3, 1));
        // One second later every bucket is full again and may be forgotten.
        assert_eq!(table.charge(9, 1_000, [1]), Ok(()));
        assert!(table.tracked() <= 2, "refilled keys forgotten: {}", table.tracked());
        // The regular sweep forgets them too, without reaching the bound.
        let mut table: RateTable<u32, 1> = RateTable::new([Rate { per_s: 1, burst: 2 }], 1_000_000);
        for key in 0..5000 {
            table.charge(key, u64::from(key) * 10, [1]).unwrap();
        }
        // At most the keys since the last sweep (every 1,024 charges here) plus the ~100 of the last second.
        assert!(table.tracked() <= 1024 + 101, "{} keys tracked, though most refilled long ago", table.tracked());
    }

    #[test]
    fn disabled_rules_limit_nothing() {
        let mut table: RateTable<u32, 1> = RateTable::new([Rate::OFF], 1);
        for _ in 0..1000 {
            assert_eq!(table.charge(1, 0, [1]), Ok(()));
        }
        assert_eq!(table.tracked(), 0);
    }
}
