//! Metrics: plain counters per shard, written by that shard's thread alone
//! and read only when scraped, rendered in the Prometheus text format. The
//! admin endpoint that serves them is in `crate::driver::admin`.
//!
//! Each counter is an atomic with a single writer (its shard), updated with
//! relaxed ordering: a scrape may see one counter a moment older than
//! another, which monitoring tolerates; the data path never waits on it.

use crate::shard::core::SOJOURN_BUCKETS_MS;
use iris_protocol::ErrorCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counters of one shard.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// Live client connections (gauge).
    pub connections: AtomicU64,
    /// Sends accepted from this shard's devices.
    pub sends_accepted_total: AtomicU64,
    /// Messages stored in this shard's mailboxes.
    pub messages_stored_total: AtomicU64,
    /// Retries answered from the dedup windows instead of being stored again.
    pub duplicates_total: AtomicU64,
    /// Sends refused (any code).
    pub sends_refused_total: AtomicU64,
    /// Sends refused by a per-sender rate limit.
    pub sends_rate_limited_total: AtomicU64,
    /// Sends not rate-limited because a rate table was at its bound.
    pub rate_limit_untracked_total: AtomicU64,
    /// Connections closed because their push stream stalled (SLOW_READER).
    pub slow_reader_disconnects_total: AtomicU64,
    /// Sends refused by CoDel admission.
    pub codel_refusals_total: AtomicU64,
    /// CoDel dropping states entered.
    pub codel_episodes_total: AtomicU64,
    /// Whether CoDel is dropping now (gauge, 0 or 1).
    pub codel_dropping: AtomicU64,
    /// Sojourn histogram of answered sends: counts per bucket of
    /// `SOJOURN_BUCKETS_MS` (not cumulative; the last is the overflow).
    pub sojourn_buckets: [AtomicU64; SOJOURN_BUCKETS_MS.len() + 1],
    /// Sum of the sojourns, ms.
    pub sojourn_ms_sum: AtomicU64,
    /// Sends refused, by error code (index: the code's wire value).
    pub refusals_by_code: [AtomicU64; crate::shard::core::REFUSAL_CODES],
    /// Deliver frames pulled for push streams.
    pub deliveries_total: AtomicU64,
    /// Devices removed by RemoveDevice.
    pub devices_removed_total: AtomicU64,
    /// Offline devices removed because their mailbox was full.
    pub devices_removed_overflow_total: AtomicU64,
    /// Sends refused because their sender held its share of a mailbox.
    pub sends_over_mailbox_share_total: AtomicU64,
    /// Devices removed after the inactivity expiry.
    pub devices_expired_total: AtomicU64,
    /// Log chunks written and synced.
    pub log_writes_total: AtomicU64,
    /// Log chunks whose write or sync failed.
    pub log_write_failures_total: AtomicU64,
    /// Bytes of records made durable.
    pub log_bytes_total: AtomicU64,
    /// Corrupt records skipped at the last recovery.
    pub log_corrupt_records: AtomicU64,
    /// Bytes of torn tails cut at the last recovery.
    pub log_torn_bytes: AtomicU64,
    /// Duration of the last recovery, ms.
    pub log_recovery_ms: AtomicU64,
    /// Segments reclaimed (deleted).
    pub log_segments_reclaimed_total: AtomicU64,
    /// Sends refused because their device had its fair share in flight.
    pub sends_unfair_share_total: AtomicU64,
    /// Memory of the mailbox index (128 B per queued entry).
    pub mailbox_index_bytes: AtomicU64,
    /// Payload bytes of queued messages held in memory (the body cache).
    pub mailbox_body_bytes: AtomicU64,
    /// Bodies read back and not pushed yet, and reads in flight.
    pub mailbox_read_ahead_bytes: AtomicU64,
    /// Bodies let go from the cache (read back when pushed).
    pub mailbox_bodies_cooled_total: AtomicU64,
    /// Log compactions made durable.
    pub log_compactions_total: AtomicU64,
    /// Mailbox entries those compactions moved.
    pub log_compacted_messages_total: AtomicU64,
    /// Records read back from the log.
    pub log_reads_total: AtomicU64,
    /// Reads back from the log that failed (retried).
    pub log_read_failures_total: AtomicU64,
    /// Undelivered messages dropped because their record could not be decoded.
    pub log_unreadable_messages_total: AtomicU64,
    /// Disk the log takes (segments and spare).
    pub log_disk_bytes: AtomicU64,
    /// Disk the log may take before new messages get Throttle.
    pub log_disk_budget_bytes: AtomicU64,
    /// QUIC Retry packets sent (address validation under a handshake flood).
    pub handshake_retries_total: AtomicU64,
    /// New connections refused (connection bound or per-source bound).
    pub handshakes_refused_total: AtomicU64,
    /// When the shard loop last finished an iteration ([`monotonic_ms`]);
    /// the loop iterates at least every `HEARTBEAT_INTERVAL`, so a stale
    /// value means a stalled shard. Read by `/readyz`, not exported.
    pub heartbeat_ms: AtomicU64,
    /// 1 while the shard is draining and settled (every session told to
    /// close, nothing owed, the log synced); read by the drain, not exported.
    pub drain_settled: AtomicU64,
}

/// Milliseconds since the process first read this clock, which is
/// monotonic: a step of the wall clock (NTP, an operator) can neither make
/// a live shard look stalled nor a stalled one look alive. Starts at 1, so
/// a heartbeat of 0 is one never given.
pub fn monotonic_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(std::time::Instant::now);
    origin.elapsed().as_millis() as u64 + 1
}

impl ShardMetrics {
    /// Sets a gauge or counter to `value` (single writer).
    pub fn set(counter: &AtomicU64, value: u64) {
        counter.store(value, Ordering::Relaxed);
    }

    /// Adds `value` (single writer).
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }
}

/// The codes a Send can be refused with (each exported, zero or not, so
/// that rates and alerts see a stable set of series).
const SEND_REFUSAL_CODES: [ErrorCode; 8] = [
    ErrorCode::FrameTooLarge,
    ErrorCode::UnknownRecipient,
    ErrorCode::MailboxFull,
    ErrorCode::Throttle,
    ErrorCode::StorageUnavailable,
    ErrorCode::ShuttingDown,
    ErrorCode::Internal,
    ErrorCode::OutOfOrder,
];

/// Renders every shard's counters in the Prometheus text format.
pub fn render(shards: &[Arc<ShardMetrics>]) -> String {
    type Field = fn(&ShardMetrics) -> &AtomicU64;
    let families: [(&str, &str, &str, Field); 37] = [
        ("iris_connections", "gauge", "Live client connections.", |m| &m.connections),
        ("iris_sends_accepted_total", "counter", "Sends accepted from devices homed here.", |m| {
            &m.sends_accepted_total
        }),
        ("iris_messages_stored_total", "counter", "Messages stored in mailboxes here.", |m| &m.messages_stored_total),
        ("iris_duplicates_total", "counter", "Retries answered without storing again.", |m| &m.duplicates_total),
        ("iris_sends_refused_total", "counter", "Sends refused with an Error.", |m| &m.sends_refused_total),
        ("iris_sends_rate_limited_total", "counter", "Sends refused by a per-sender rate limit.", |m| {
            &m.sends_rate_limited_total
        }),
        ("iris_rate_limit_untracked_total", "counter", "Sends not rate-limited: a rate table was at its bound.", |m| {
            &m.rate_limit_untracked_total
        }),
        ("iris_slow_reader_disconnects_total", "counter", "Connections closed for a stalled push stream.", |m| {
            &m.slow_reader_disconnects_total
        }),
        ("iris_codel_refusals_total", "counter", "Sends refused by CoDel admission.", |m| &m.codel_refusals_total),
        ("iris_codel_episodes_total", "counter", "CoDel dropping states entered.", |m| &m.codel_episodes_total),
        ("iris_codel_dropping", "gauge", "Whether CoDel admission is refusing sends now.", |m| &m.codel_dropping),
        ("iris_deliveries_total", "counter", "Deliver frames pushed.", |m| &m.deliveries_total),
        ("iris_devices_removed_total", "counter", "Devices removed by RemoveDevice.", |m| &m.devices_removed_total),
        (
            "iris_devices_removed_overflow_total",
            "counter",
            "Offline devices removed because their mailbox was full.",
            |m| &m.devices_removed_overflow_total,
        ),
        (
            "iris_sends_over_mailbox_share_total",
            "counter",
            "Sends refused because their sending user held its share of a recipient device's mailbox.",
            |m| &m.sends_over_mailbox_share_total,
        ),
        ("iris_devices_expired_total", "counter", "Devices removed after the inactivity expiry.", |m| {
            &m.devices_expired_total
        }),
        ("iris_log_writes_total", "counter", "Log chunks written and synced.", |m| &m.log_writes_total),
        ("iris_log_write_failures_total", "counter", "Log chunks that failed to write or sync.", |m| {
            &m.log_write_failures_total
        }),
        ("iris_log_bytes_total", "counter", "Log bytes made durable.", |m| &m.log_bytes_total),
        ("iris_log_corrupt_records", "gauge", "Corrupt records skipped at the last recovery.", |m| {
            &m.log_corrupt_records
        }),
        ("iris_log_torn_bytes", "gauge", "Torn-tail bytes cut at the last recovery.", |m| &m.log_torn_bytes),
        ("iris_log_recovery_milliseconds", "gauge", "Duration of the last recovery.", |m| &m.log_recovery_ms),
        ("iris_log_segments_reclaimed_total", "counter", "Log segments deleted.", |m| &m.log_segments_reclaimed_total),
        ("iris_sends_unfair_share_total", "counter", "Sends refused: their device had its share in flight.", |m| {
            &m.sends_unfair_share_total
        }),
        ("iris_mailbox_index_bytes", "gauge", "Memory of the mailbox index (128 B per queued entry).", |m| {
            &m.mailbox_index_bytes
        }),
        ("iris_mailbox_body_bytes", "gauge", "Payload bytes of queued messages held in memory.", |m| {
            &m.mailbox_body_bytes
        }),
        ("iris_mailbox_read_ahead_bytes", "gauge", "Bodies read back and not pushed yet, and reads in flight.", |m| {
            &m.mailbox_read_ahead_bytes
        }),
        ("iris_mailbox_bodies_cooled_total", "counter", "Bodies let go from memory (read back when pushed).", |m| {
            &m.mailbox_bodies_cooled_total
        }),
        ("iris_log_compactions_total", "counter", "Log segments compacted (live entries copied forward).", |m| {
            &m.log_compactions_total
        }),
        ("iris_log_compacted_messages_total", "counter", "Mailbox entries moved by compactions.", |m| {
            &m.log_compacted_messages_total
        }),
        ("iris_log_reads_total", "counter", "Message records read back from the log.", |m| &m.log_reads_total),
        ("iris_log_read_failures_total", "counter", "Reads back from the log that failed (retried).", |m| {
            &m.log_read_failures_total
        }),
        (
            "iris_log_unreadable_messages_total",
            "counter",
            "Undelivered messages dropped: their record did not decode when read back.",
            |m| &m.log_unreadable_messages_total,
        ),
        ("iris_log_disk_bytes", "gauge", "Disk the log takes (segments and spare).", |m| &m.log_disk_bytes),
        ("iris_log_disk_budget_bytes", "gauge", "Disk the log may take before new messages get Throttle.", |m| {
            &m.log_disk_budget_bytes
        }),
        ("iris_handshake_retries_total", "counter", "QUIC Retry packets sent to validate addresses.", |m| {
            &m.handshake_retries_total
        }),
        ("iris_handshakes_refused_total", "counter", "New connections refused at a connection bound.", |m| {
            &m.handshakes_refused_total
        }),
    ];
    let mut out = String::new();
    for (name, kind, help, field) in families {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (shard, metrics) in shards.iter().enumerate() {
            out.push_str(&format!("{name}{{shard=\"{shard}\"}} {}\n", field(metrics).load(Ordering::Relaxed)));
        }
    }
    let name = "iris_send_sojourn_milliseconds";
    out.push_str(&format!(
        "# HELP {name} Time from a Send's arrival to its answer (Ack or refusal).\n# TYPE {name} histogram\n"
    ));
    for (shard, metrics) in shards.iter().enumerate() {
        let mut cumulative = 0;
        for (index, bucket) in metrics.sojourn_buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = SOJOURN_BUCKETS_MS.get(index).map_or("+Inf".to_string(), u64::to_string);
            out.push_str(&format!("{name}_bucket{{shard=\"{shard}\",le=\"{le}\"}} {cumulative}\n"));
        }
        let sum = metrics.sojourn_ms_sum.load(Ordering::Relaxed);
        out.push_str(&format!(
            "{name}_sum{{shard=\"{shard}\"}} {sum}\n{name}_count{{shard=\"{shard}\"}} {cumulative}\n"
        ));
    }
    let name = "iris_send_refusals_total";
    out.push_str(&format!("# HELP {name} Sends refused, by error code.\n# TYPE {name} counter\n"));
    for code in SEND_REFUSAL_CODES {
        for (shard, metrics) in shards.iter().enumerate() {
            let count = metrics.refusals_by_code[code as usize].load(Ordering::Relaxed);
            out.push_str(&format!("{name}{{shard=\"{shard}\",code=\"{code:?}\"}} {count}\n"));
        }
    }
    out
}
