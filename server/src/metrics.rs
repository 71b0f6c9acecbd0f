//! Metrics: plain counters per shard, written by that shard's thread alone
//! and read only when scraped, rendered in the Prometheus text format. The
//! admin endpoint that serves them is in `crate::driver::admin`.
//!
//! Each counter is an atomic with a single writer (its shard), updated with
//! relaxed ordering: a scrape may see one counter a moment older than
//! another, which monitoring tolerates; the data path never waits on it.

use crate::shard::core::{DELIVER_BUCKETS_MS, SOJOURN_BUCKETS_MS};
use iris_protocol::frames::FrameKind;
use iris_protocol::ErrorCode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
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
    /// Presence frames queued for this shard's sessions.
    pub presence_events_total: AtomicU64,
    /// Ephemeral events shed (an overloaded path, a full outbox or queue).
    pub ephemeral_shed_total: AtomicU64,
    /// Typing notices queued for this shard's sessions.
    pub typing_events_total: AtomicU64,
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
    /// Connections accepted (handshakes started).
    pub handshakes_total: AtomicU64,
    /// QUIC Retry packets sent (address validation under a handshake flood).
    pub handshake_retries_total: AtomicU64,
    /// New connections refused (connection bound or per-source bound).
    pub handshakes_refused_total: AtomicU64,
    /// When the shard loop last finished an iteration ([`monotonic_ms`]);
    /// the loop iterates at least every `HEARTBEAT_INTERVAL`, so a stale
    /// value means a stalled shard. Read by `/readyz`, not exported.
    pub heartbeat_ms: AtomicU64,
    /// Frames received from clients, by kind (index: the kind's byte).
    pub frames_received_total: [AtomicU64; FRAME_KIND_SLOTS],
    /// Frames sent to clients, by kind.
    pub frames_sent_total: [AtomicU64; FRAME_KIND_SLOTS],
    /// Deliver latency (acceptance to push) histogram, per bucket of
    /// `DELIVER_BUCKETS_MS` (not cumulative; the last is the overflow).
    pub deliver_buckets: [AtomicU64; DELIVER_BUCKETS_MS.len() + 1],
    /// Sum of those latencies, ms.
    pub deliver_ms_sum: AtomicU64,
    /// Log chunk write+sync latency, per bucket of [`LOG_SYNC_BUCKETS_US`].
    pub log_sync_buckets: [AtomicU64; LOG_SYNC_BUCKETS_US.len() + 1],
    /// Sum of those latencies, µs.
    pub log_sync_us_sum: AtomicU64,
    /// Messages in the outboxes for other shards (gauge).
    pub outbox_messages: AtomicU64,
    /// 1 while the shard is draining and settled (every session told to
    /// close, nothing owed, the log synced); read by the drain, not exported.
    pub drain_settled: AtomicU64,
    /// 1 once the shard has recovered its log and its loop runs.
    pub serving: AtomicU64,
}

/// The process's start, seconds since the Unix epoch (exported, so that
/// restarts can be counted); set once by [`record_process_start`].
static PROCESS_START_S: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// Records now as the process's start (the first call wins).
pub fn record_process_start() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let _ = PROCESS_START_S.set(now);
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

pub use crate::shard::core::FRAME_KIND_SLOTS;

/// Upper bounds (µs, inclusive) of the log sync histogram's buckets.
pub const LOG_SYNC_BUCKETS_US: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000];

/// Every frame kind, each exported in both directions (zero or not), so
/// that rates and dashboards see a stable set of series.
const FRAME_KINDS: [FrameKind; 20] = [
    FrameKind::Hello,
    FrameKind::Welcome,
    FrameKind::Redirect,
    FrameKind::ShardMapRequest,
    FrameKind::ShardMap,
    FrameKind::Send,
    FrameKind::Ack,
    FrameKind::Deliver,
    FrameKind::DeliveryAck,
    FrameKind::Error,
    FrameKind::Ping,
    FrameKind::Pong,
    FrameKind::RemoveDevice,
    FrameKind::DeviceRemoved,
    FrameKind::PresenceSubscribe,
    FrameKind::PresenceUnsubscribe,
    FrameKind::PresencePrivacy,
    FrameKind::Presence,
    FrameKind::Typing,
    FrameKind::TypingNotice,
];

/// The bucket of `value` among `bounds` (inclusive upper bounds; past the
/// last, the overflow bucket).
pub fn bucket_of(bounds: &[u64], value: u64) -> usize {
    bounds.partition_point(|bound| *bound < value)
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

/// Renders every shard's metrics in the Prometheus text format (0.0.4),
/// through `prometheus-client`. Nothing is aggregated on the data path: the
/// shards' counters are read here, when scraped.
pub fn render(shards: &[Arc<ShardMetrics>]) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Collector { shards: shards.to_vec() }));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).expect("encoding into a String");
    out
}

/// Reads the shards' counters at each scrape.
#[derive(Debug)]
struct Collector {
    shards: Vec<Arc<ShardMetrics>>,
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// One family with a `shard` label, `value(shard)` per shard. Counters are
/// named without `_total`, which the encoder appends.
fn encode_per_shard(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    kind: Kind,
    help: &str,
    shards: usize,
    value: impl Fn(usize) -> u64,
) -> std::fmt::Result {
    let (name, metric_type) = match kind {
        Kind::Counter => (name.strip_suffix("_total").unwrap_or(name), MetricType::Counter),
        Kind::Gauge => (name, MetricType::Gauge),
    };
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for shard in 0..shards {
        let labels = [("shard", shard.to_string())];
        let metric = family.encode_family(&labels)?;
        match kind {
            Kind::Counter => ConstCounter::new(value(shard)).encode(metric)?,
            Kind::Gauge => ConstGauge::new(value(shard)).encode(metric)?,
        }
    }
    Ok(())
}

/// A histogram family with a `shard` label from per-bucket (not cumulative)
/// counts whose upper bounds are `bounds` (the last count is the overflow).
fn encode_histogram_per_shard(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    shards: &[Arc<ShardMetrics>],
    bounds: &[f64],
    histogram: impl Fn(&ShardMetrics) -> (&[AtomicU64], f64),
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (shard, metrics) in shards.iter().enumerate() {
        let (counts, sum) = histogram(metrics);
        let buckets: Vec<(f64, u64)> = bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts.iter().map(|count| count.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, count)| count).sum();
        let labels = [("shard", shard.to_string())];
        family.encode_family(&labels)?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let shards = &self.shards;
        type Field = fn(&ShardMetrics) -> &AtomicU64;
        let families: [(&str, Kind, &str, Field); 40] = [
            ("iris_connections", Kind::Gauge, "Live client connections.", |m| &m.connections),
            ("iris_sends_accepted_total", Kind::Counter, "Sends accepted from devices homed here.", |m| {
                &m.sends_accepted_total
            }),
            ("iris_messages_stored_total", Kind::Counter, "Messages stored in mailboxes here.", |m| {
                &m.messages_stored_total
            }),
            ("iris_duplicates_total", Kind::Counter, "Retries answered without storing again.", |m| {
                &m.duplicates_total
            }),
            ("iris_sends_refused_total", Kind::Counter, "Sends refused with an Error.", |m| &m.sends_refused_total),
            ("iris_sends_rate_limited_total", Kind::Counter, "Sends refused by a per-sender rate limit.", |m| {
                &m.sends_rate_limited_total
            }),
            (
                "iris_rate_limit_untracked_total",
                Kind::Counter,
                "Sends not rate-limited: a rate table was at its bound.",
                |m| &m.rate_limit_untracked_total,
            ),
            (
                "iris_slow_reader_disconnects_total",
                Kind::Counter,
                "Connections closed for a stalled push stream.",
                |m| &m.slow_reader_disconnects_total,
            ),
            ("iris_codel_refusals_total", Kind::Counter, "Sends refused by CoDel admission.", |m| {
                &m.codel_refusals_total
            }),
            ("iris_codel_episodes_total", Kind::Counter, "CoDel dropping states entered.", |m| &m.codel_episodes_total),
            ("iris_codel_dropping", Kind::Gauge, "Whether CoDel admission is refusing sends now.", |m| {
                &m.codel_dropping
            }),
            ("iris_deliveries_total", Kind::Counter, "Deliver frames pushed.", |m| &m.deliveries_total),
            ("iris_devices_removed_total", Kind::Counter, "Devices removed by RemoveDevice.", |m| {
                &m.devices_removed_total
            }),
            (
                "iris_devices_removed_overflow_total",
                Kind::Counter,
                "Offline devices removed because their mailbox was full.",
                |m| &m.devices_removed_overflow_total,
            ),
            (
                "iris_sends_over_mailbox_share_total",
                Kind::Counter,
                "Sends refused because their sending user held its share of a recipient device's mailbox.",
                |m| &m.sends_over_mailbox_share_total,
            ),
            ("iris_devices_expired_total", Kind::Counter, "Devices removed after the inactivity expiry.", |m| {
                &m.devices_expired_total
            }),
            ("iris_presence_events_total", Kind::Counter, "Presence changes queued for watchers' sessions.", |m| {
                &m.presence_events_total
            }),
            ("iris_typing_events_total", Kind::Counter, "Typing notices queued for recipients' sessions.", |m| {
                &m.typing_events_total
            }),
            (
                "iris_ephemeral_shed_total",
                Kind::Counter,
                "Presence updates shed: the path to the watcher's shard was overloaded, or a queue was full.",
                |m| &m.ephemeral_shed_total,
            ),
            ("iris_log_writes_total", Kind::Counter, "Log chunks written and synced.", |m| &m.log_writes_total),
            ("iris_log_write_failures_total", Kind::Counter, "Log chunks that failed to write or sync.", |m| {
                &m.log_write_failures_total
            }),
            ("iris_log_bytes_total", Kind::Counter, "Log bytes made durable.", |m| &m.log_bytes_total),
            ("iris_log_corrupt_records", Kind::Gauge, "Corrupt records skipped at the last recovery.", |m| {
                &m.log_corrupt_records
            }),
            ("iris_log_torn_bytes", Kind::Gauge, "Torn-tail bytes cut at the last recovery.", |m| &m.log_torn_bytes),
            ("iris_log_segments_reclaimed_total", Kind::Counter, "Log segments deleted.", |m| {
                &m.log_segments_reclaimed_total
            }),
            (
                "iris_sends_unfair_share_total",
                Kind::Counter,
                "Sends refused: their device had its share in flight.",
                |m| &m.sends_unfair_share_total,
            ),
            ("iris_mailbox_index_bytes", Kind::Gauge, "Memory of the mailbox index (128 B per queued entry).", |m| {
                &m.mailbox_index_bytes
            }),
            ("iris_mailbox_body_bytes", Kind::Gauge, "Payload bytes of queued messages held in memory.", |m| {
                &m.mailbox_body_bytes
            }),
            (
                "iris_mailbox_read_ahead_bytes",
                Kind::Gauge,
                "Bodies read back and not pushed yet, and reads in flight.",
                |m| &m.mailbox_read_ahead_bytes,
            ),
            (
                "iris_mailbox_bodies_cooled_total",
                Kind::Counter,
                "Bodies let go from memory (read back when pushed).",
                |m| &m.mailbox_bodies_cooled_total,
            ),
            (
                "iris_log_compactions_total",
                Kind::Counter,
                "Log segments compacted (live entries copied forward).",
                |m| &m.log_compactions_total,
            ),
            ("iris_log_compacted_messages_total", Kind::Counter, "Mailbox entries moved by compactions.", |m| {
                &m.log_compacted_messages_total
            }),
            ("iris_log_reads_total", Kind::Counter, "Message records read back from the log.", |m| &m.log_reads_total),
            ("iris_log_read_failures_total", Kind::Counter, "Reads back from the log that failed (retried).", |m| {
                &m.log_read_failures_total
            }),
            (
                "iris_log_unreadable_messages_total",
                Kind::Counter,
                "Undelivered messages dropped: their record did not decode when read back.",
                |m| &m.log_unreadable_messages_total,
            ),
            ("iris_log_disk_bytes", Kind::Gauge, "Disk the log takes (segments and spare).", |m| &m.log_disk_bytes),
            (
                "iris_log_disk_budget_bytes",
                Kind::Gauge,
                "Disk the log may take before new messages get Throttle.",
                |m| &m.log_disk_budget_bytes,
            ),
            ("iris_handshakes_total", Kind::Counter, "Connections accepted (QUIC handshakes started).", |m| {
                &m.handshakes_total
            }),
            ("iris_handshake_retries_total", Kind::Counter, "QUIC Retry packets sent to validate addresses.", |m| {
                &m.handshake_retries_total
            }),
            ("iris_handshakes_refused_total", Kind::Counter, "New connections refused at a connection bound.", |m| {
                &m.handshakes_refused_total
            }),
        ];
        for (name, kind, help, field) in families {
            encode_per_shard(&mut encoder, name, kind, help, shards.len(), |shard| {
                field(&shards[shard]).load(Ordering::Relaxed)
            })?;
        }
        encode_per_shard(
            &mut encoder,
            "iris_outbox_messages",
            Kind::Gauge,
            "Messages waiting in the shard's outboxes for other shards (cross-shard channel depth).",
            shards.len(),
            |shard| shards[shard].outbox_messages.load(Ordering::Relaxed),
        )?;
        type Frames = fn(&ShardMetrics) -> &[AtomicU64; FRAME_KIND_SLOTS];
        let directions: [(&str, &str, Frames); 2] = [
            ("iris_frames_received", "Frames received from clients, by kind.", |m| &m.frames_received_total),
            ("iris_frames_sent", "Frames sent to clients, by kind.", |m| &m.frames_sent_total),
        ];
        for (name, help, frames) in directions {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for kind in FRAME_KINDS {
                for (shard, metrics) in shards.iter().enumerate() {
                    let counters = frames(metrics);
                    let labels = [("shard", shard.to_string()), ("kind", format!("{kind:?}"))];
                    ConstCounter::new(counters[kind as usize].load(Ordering::Relaxed))
                        .encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let seconds = |ms: &AtomicU64| ms.load(Ordering::Relaxed) as f64 / 1e3;
        let mut recovery = encoder.encode_descriptor(
            "iris_log_recovery_seconds",
            "Duration of the last recovery of the shard's log.",
            None,
            MetricType::Gauge,
        )?;
        for (shard, metrics) in shards.iter().enumerate() {
            let labels = [("shard", shard.to_string())];
            ConstGauge::new(seconds(&metrics.log_recovery_ms)).encode(recovery.encode_family(&labels)?)?;
        }
        let sojourn_bounds: Vec<f64> = SOJOURN_BUCKETS_MS.iter().map(|ms| *ms as f64 / 1e3).collect();
        encode_histogram_per_shard(
            &mut encoder,
            "iris_send_sojourn_seconds",
            "Time from a Send's arrival to its answer (Ack or refusal) leaving.",
            shards,
            &sojourn_bounds,
            |metrics| (&metrics.sojourn_buckets, seconds(&metrics.sojourn_ms_sum)),
        )?;
        encode_histogram_per_shard(
            &mut encoder,
            "iris_deliver_latency_seconds",
            "Time from a Send's acceptance to its Deliver going to a recipient device (offline time included).",
            shards,
            &DELIVER_BUCKETS_MS.iter().map(|ms| *ms as f64 / 1e3).collect::<Vec<_>>(),
            |metrics| (&metrics.deliver_buckets, seconds(&metrics.deliver_ms_sum)),
        )?;
        let sync_bounds: Vec<f64> = LOG_SYNC_BUCKETS_US.iter().map(|us| *us as f64 / 1e6).collect();
        encode_histogram_per_shard(
            &mut encoder,
            "iris_log_sync_seconds",
            "Time to write and fdatasync one log chunk.",
            shards,
            &sync_bounds,
            |metrics| (&metrics.log_sync_buckets, metrics.log_sync_us_sum.load(Ordering::Relaxed) as f64 / 1e6),
        )?;
        let name = "iris_send_refusals";
        let mut family = encoder.encode_descriptor(name, "Sends refused, by error code.", None, MetricType::Counter)?;
        for code in SEND_REFUSAL_CODES {
            for (shard, metrics) in shards.iter().enumerate() {
                let labels = [("shard", shard.to_string()), ("code", format!("{code:?}"))];
                let count = metrics.refusals_by_code[code as usize].load(Ordering::Relaxed);
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        encode_per_shard(
            &mut encoder,
            "iris_mailbox_messages",
            Kind::Gauge,
            "Mailbox entries queued for devices (one per device a message waits for).",
            shards.len(),
            |shard| {
                shards[shard].mailbox_index_bytes.load(Ordering::Relaxed)
                    / crate::shard::mailbox::MAILBOX_ENTRY_OVERHEAD_BYTES
            },
        )?;
        let now_ms = monotonic_ms();
        let mut age = encoder.encode_descriptor(
            "iris_shard_heartbeat_age_seconds",
            "Time since the shard loop last iterated (it iterates at least once a second; /readyz reports a shard above 5 s).",
            None,
            MetricType::Gauge,
        )?;
        for (shard, metrics) in shards.iter().enumerate() {
            let labels = [("shard", shard.to_string())];
            let beat = metrics.heartbeat_ms.load(Ordering::Relaxed);
            let seconds = now_ms.saturating_sub(beat) as f64 / 1e3;
            ConstGauge::new(seconds).encode(age.encode_family(&labels)?)?;
        }
        let mut serving = encoder.encode_descriptor(
            "iris_shard_serving",
            "1 once the shard has recovered its log and serves, 0 while it recovers.",
            None,
            MetricType::Gauge,
        )?;
        for (shard, metrics) in shards.iter().enumerate() {
            let labels = [("shard", shard.to_string())];
            ConstGauge::new(metrics.serving.load(Ordering::Relaxed)).encode(serving.encode_family(&labels)?)?;
        }
        if let Some(start) = PROCESS_START_S.get() {
            let family = encoder.encode_descriptor(
                "iris_process_start_time_seconds",
                "When the irisd process started, seconds since the Unix epoch.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(*start).encode(family)?;
        }
        if let Some(bytes) = resident_bytes() {
            let rss = encoder.encode_descriptor(
                "iris_process_resident_memory_bytes",
                "Resident memory of the irisd process.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(bytes).encode(rss)?;
        }
        Ok(())
    }
}

/// The process's resident memory, from `/proc/self/statm`.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf reads a constant of the running system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}
