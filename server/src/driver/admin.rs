//! The admin endpoint: `GET /metrics` (Prometheus text, from
//! `crate::metrics`), `GET /healthz` (the process is up) and `GET /readyz`
//! (every shard recovered, its loop alive and its storage writable; `/health`
//! is the same), served by
//! plain threads, one per request (a bounded number). Nothing here touches
//! a shard; scrapes are rare.

use crate::metrics::{render, ShardMetrics};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest request head read from a scraper.
const REQUEST_BYTES_MAX: usize = 8 * 1024;

/// A shard whose loop has not iterated for this long is reported stalled
/// (the loop iterates at least once a second, `shard_loop::HEARTBEAT_INTERVAL`).
const SHARD_STALLED_AFTER_MS: u64 = 5_000;

/// The shards whose loop has not iterated for [`SHARD_STALLED_AFTER_MS`]
/// (read by `/readyz` and by the systemd watchdog).
pub fn stalled_shards(shards: &[Arc<ShardMetrics>]) -> Vec<usize> {
    let now_ms = crate::metrics::monotonic_ms();
    shards
        .iter()
        .enumerate()
        .filter(|(_, metrics)| {
            now_ms.saturating_sub(metrics.heartbeat_ms.load(Ordering::Relaxed)) > SHARD_STALLED_AFTER_MS
        })
        .map(|(shard, _)| shard)
        .collect()
}

/// What `/readyz` looks at.
#[derive(Debug)]
pub struct Readiness {
    /// Every shard's counters (heartbeats).
    pub shards: Vec<Arc<ShardMetrics>>,
    /// Set once every shard has recovered and serves.
    pub serving: Arc<AtomicBool>,
    /// The shard directories whose storage must take a write and a sync
    /// (empty for `storage.durability = "none"`).
    pub shard_dirs: Vec<std::path::PathBuf>,
    /// One probe at a time (concurrent ones would share the temporary file).
    pub probing: std::sync::Mutex<()>,
}

/// The file each `/readyz` writes and syncs in every shard directory.
const PROBE_FILE: &str = "readyz-probe";

/// `/readyz` (and `/health`, its older name): 200 while every shard has
/// recovered, its loop is iterating and its directory takes a small
/// synced write; 503 saying which is not (a shard that panics takes the
/// process down instead). The write runs on this admin thread, never on a
/// shard's.
fn readiness(ready: &Readiness) -> (&'static str, String) {
    if !ready.serving.load(Ordering::Acquire) {
        return ("503 Service Unavailable", "starting: recovering the logs\n".to_string());
    }
    let mut problems = Vec::new();
    let stalled: Vec<String> = stalled_shards(&ready.shards).iter().map(ToString::to_string).collect();
    if !stalled.is_empty() {
        problems.push(format!("stalled shards: {}", stalled.join(" ")));
    }
    let _probing = ready.probing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let unwritable: Vec<String> = ready
        .shard_dirs
        .iter()
        .enumerate()
        .filter(|(_, dir)| crate::files::write_private(&dir.join(PROBE_FILE), b"ok\n").is_err())
        .map(|(shard, _)| shard.to_string())
        .collect();
    if !unwritable.is_empty() {
        problems.push(format!("storage not writable on shards: {}", unwritable.join(" ")));
    }
    if problems.is_empty() {
        ("200 OK", "ok\n".to_string())
    } else {
        ("503 Service Unavailable", problems.join("\n") + "\n")
    }
}

/// Requests served at once; a connection past this is closed unanswered.
const CONNECTIONS_MAX: usize = 16;

/// Time a scraper has to send its request head and take the answer.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

/// Serves `/metrics`, `/healthz` (the process is up), `/readyz` and
/// `/health` (every shard serving) on `address`; returns the bound address.
/// Each connection gets its own thread (at most [`CONNECTIONS_MAX`]) and
/// [`REQUEST_DEADLINE`] in all, so a scraper that sends its request a byte
/// at a time, or never reads the answer, delays nobody else.
pub fn serve_admin(address: SocketAddr, ready: Readiness) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address)?;
    let bound = listener.local_addr()?;
    let ready = Arc::new(ready);
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if active.fetch_add(1, Ordering::AcqRel) >= CONNECTIONS_MAX {
                active.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let (ready, done) = (Arc::clone(&ready), Arc::clone(&active));
            let spawned = std::thread::Builder::new().name("admin-request".into()).spawn(move || {
                answer(stream, &ready);
                done.fetch_sub(1, Ordering::AcqRel);
            });
            if spawned.is_err() {
                active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    })?;
    Ok(bound)
}

/// Reads one request head and writes its answer, within [`REQUEST_DEADLINE`].
fn answer(mut stream: TcpStream, ready: &Readiness) {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let left = || deadline.checked_duration_since(Instant::now()).filter(|left| !left.is_zero());
    // Read until the end of the request head (it may arrive in pieces).
    let mut request = vec![0u8; REQUEST_BYTES_MAX];
    let mut filled = 0;
    while filled < request.len() && !request[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
        let Some(left) = left() else { return };
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut request[filled..]) {
            Ok(0) | Err(_) => return,
            Ok(count) => filled += count,
        }
    }
    let head = String::from_utf8_lossy(&request[..filled]);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/metrics" => ("200 OK", render(&ready.shards)),
        "/healthz" => ("200 OK", "ok\n".to_string()),
        "/readyz" | "/health" => readiness(ready),
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let Some(left) = left() else { return };
    let _ = stream.set_write_timeout(Some(left));
    let _ = stream.write_all(response.as_bytes());
}
