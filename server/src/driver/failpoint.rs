//! Fault injection for the process-level tests: `IRIS_FAILPOINT=<name>:<shard>`
//! makes shard `<shard>` fail at the named point, so a test can show what
//! the whole process does when one shard dies (it must exit, not half-serve).
//! Only debug builds read the variable; release builds never fail here.

/// The shard panics while recovering its log.
pub const PANIC_IN_RECOVERY: &str = "panic-in-recovery";
/// The shard sleeps 3 s before recovering its log (a long recovery).
pub const SLOW_RECOVERY: &str = "slow-recovery";
/// The shard reserves message ids and seqs in blocks of 64 (not 2^30), so a
/// test extends both reservations with a few hundred messages.
pub const SMALL_RESERVATIONS: &str = "small-reservations";
/// The shard panics when it accepts its first connection.
pub const PANIC_ON_CONNECTION: &str = "panic-on-connection";
/// The shard's loop stops iterating (blocks its thread) at its first connection.
pub const HANG_ON_CONNECTION: &str = "hang-on-connection";

/// Whether failpoint `name` is armed for `shard`.
pub fn armed(name: &str, shard: u16) -> bool {
    #[cfg(debug_assertions)]
    {
        std::env::var("IRIS_FAILPOINT").is_ok_and(|value| value == format!("{name}:{shard}"))
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = (name, shard);
        false
    }
}
