//! Metrics: plain counters per shard, written by that shard's thread alone
//! and read only when scraped, and the admin endpoint that serves them in
//! the Prometheus text format (`GET /metrics`) with a liveness probe
//! (`GET /health`).
//!
//! Each counter is an atomic with a single writer (its shard), updated with
//! relaxed ordering: a scrape may see one counter a moment older than
//! another, which monitoring tolerates; the data path never waits on it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    /// Deliver frames pulled for push streams.
    pub deliveries_total: AtomicU64,
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

/// Renders every shard's counters in the Prometheus text format.
pub fn render(shards: &[Arc<ShardMetrics>]) -> String {
    type Field = fn(&ShardMetrics) -> &AtomicU64;
    let families: [(&str, &str, &str, Field); 13] = [
        ("iris_connections", "gauge", "Live client connections.", |m| &m.connections),
        ("iris_sends_accepted_total", "counter", "Sends accepted from devices homed here.", |m| {
            &m.sends_accepted_total
        }),
        ("iris_messages_stored_total", "counter", "Messages stored in mailboxes here.", |m| &m.messages_stored_total),
        ("iris_duplicates_total", "counter", "Retries answered without storing again.", |m| &m.duplicates_total),
        ("iris_sends_refused_total", "counter", "Sends refused with an Error.", |m| &m.sends_refused_total),
        ("iris_deliveries_total", "counter", "Deliver frames pushed.", |m| &m.deliveries_total),
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
    ];
    let mut out = String::new();
    for (name, kind, help, field) in families {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (shard, metrics) in shards.iter().enumerate() {
            out.push_str(&format!("{name}{{shard=\"{shard}\"}} {}\n", field(metrics).load(Ordering::Relaxed)));
        }
    }
    out
}

/// Largest request head read from a scraper.
const REQUEST_BYTES_MAX: usize = 8 * 1024;

/// Serves `/metrics` and `/health` on `address` from a plain thread, one
/// request at a time (scrapes are rare; nothing here touches a shard).
pub fn serve_admin(address: SocketAddr, shards: Vec<Arc<ShardMetrics>>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
            // Read until the end of the request head (it may arrive in pieces).
            let mut request = vec![0u8; REQUEST_BYTES_MAX];
            let mut filled = 0;
            while filled < request.len() && !request[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut request[filled..]) {
                    Ok(0) | Err(_) => break,
                    Ok(count) => filled += count,
                }
            }
            let head = String::from_utf8_lossy(&request[..filled]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/metrics" => ("200 OK", render(&shards)),
                "/health" => ("200 OK", "ok\n".to_string()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes());
        }
    })?;
    Ok(bound)
}
