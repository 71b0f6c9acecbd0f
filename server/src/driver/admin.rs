//! The admin endpoint: `GET /metrics` (Prometheus text, from
//! `crate::metrics`), `GET /healthz` (the process is up) and `GET /readyz`
//! (every shard recovered, its loop alive, its storage writable and its log
//! under its disk budget, and no drain begun; `/health` is the same), served
//! by plain threads, one per request (a bounded number), with the storage
//! probed on a thread of its own. Nothing here touches a shard; scrapes are
//! rare.

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
    /// Every shard's counters (heartbeats, write failures, disk budget).
    pub shards: Vec<Arc<ShardMetrics>>,
    /// Set once every shard has recovered and serves.
    pub serving: Arc<AtomicBool>,
    /// Set when the drain begins.
    pub draining: Arc<AtomicBool>,
    /// The shard directories whose storage must take a write and a sync
    /// (empty for `storage.durability = "none"`).
    pub shard_dirs: Vec<std::path::PathBuf>,
}

/// The file the storage probe writes and syncs in every shard directory.
const PROBE_FILE: &str = "readyz-probe";
/// How often the storage probe runs.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// A probe round still running after this means the probe itself is stuck
/// (a hung disk): the storage counts as not writable.
const PROBE_STALE_AFTER: Duration = Duration::from_secs(15);

/// The storage probe's last completed round.
#[derive(Debug, Default)]
struct ProbeResult {
    /// When it completed; `None` before the first round.
    at: Option<Instant>,
    /// When the round under way started, if one is.
    running_since: Option<Instant>,
    /// Shards whose directory did not take the write, or whose log failed
    /// a write since the round before.
    unwritable: Vec<usize>,
}

/// `/readyz`'s inputs and the storage probe's results.
#[derive(Debug)]
struct ReadyState {
    ready: Readiness,
    probe: std::sync::Mutex<ProbeResult>,
}

/// Probes every shard's storage each [`PROBE_INTERVAL`] once the shards
/// serve, on a thread of its own: a small synced write to each shard
/// directory, and the shard logs' write-failure counts. `/readyz` answers
/// from the last round, so a request never waits for a disk and a flood of
/// requests costs no syncs.
/// The loop ends once the admin endpoint's state is gone (only in tests).
fn probe_loop(state: &std::sync::Weak<ReadyState>, interval: Duration) {
    let Some(shards) = state.upgrade().map(|state| state.ready.shards.len()) else { return };
    let mut failures_seen: Vec<u64> = vec![0; shards];
    // The shard directories exist once the shards serve (a fresh data
    // directory gets them during start-up).
    loop {
        let Some(state) = state.upgrade() else { return };
        if state.ready.serving.load(Ordering::Acquire) {
            break;
        }
        drop(state);
        std::thread::sleep(Duration::from_millis(20));
    }
    loop {
        let Some(state) = state.upgrade() else { return };
        state.probe.lock().unwrap_or_else(std::sync::PoisonError::into_inner).running_since = Some(Instant::now());
        let mut unwritable = Vec::new();
        for (shard, dir) in state.ready.shard_dirs.iter().enumerate() {
            if crate::files::write_private(&dir.join(PROBE_FILE), b"ok\n").is_err() {
                unwritable.push(shard);
            }
        }
        for (shard, metrics) in state.ready.shards.iter().enumerate() {
            let failures = metrics.log_write_failures_total.load(Ordering::Relaxed);
            if failures != failures_seen[shard] && !unwritable.contains(&shard) {
                unwritable.push(shard);
            }
            failures_seen[shard] = failures;
        }
        unwritable.sort_unstable();
        *state.probe.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            ProbeResult { at: Some(Instant::now()), running_since: None, unwritable };
        drop(state);
        std::thread::sleep(interval);
    }
}

/// `/readyz` (and `/health`, its older name): 200 while every shard has
/// recovered, its loop is iterating, its storage took the last probe's
/// synced write without a log write failing since, and its log is under
/// its disk budget, and the drain has not begun; 503 saying which is not
/// (a shard that panics takes the process down instead).
fn readiness(state: &ReadyState) -> (&'static str, String) {
    let ready = &state.ready;
    if !ready.serving.load(Ordering::Acquire) {
        return ("503 Service Unavailable", "starting: recovering the logs\n".to_string());
    }
    if ready.draining.load(Ordering::Acquire) {
        return ("503 Service Unavailable", "draining: shutting down\n".to_string());
    }
    let list = |shards: &[usize]| shards.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ");
    let mut problems = Vec::new();
    let stalled = stalled_shards(&ready.shards);
    if !stalled.is_empty() {
        problems.push(format!("stalled shards: {}", list(&stalled)));
    }
    {
        let probe = state.probe.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A round may take long on a slow disk with many shards; only one
        // that has not finished in PROBE_STALE_AFTER counts as stuck.
        let stuck = probe.running_since.map(|since| since.elapsed()).filter(|running| *running > PROBE_STALE_AFTER);
        match probe.at {
            _ if stuck.is_some() => {
                let running = stuck.unwrap_or_default().as_secs();
                problems.push(format!("storage probe stuck for {running} s"));
            }
            None => problems.push("storage not probed yet".to_string()),
            Some(_) if !probe.unwritable.is_empty() => {
                problems.push(format!("storage not writable on shards: {}", list(&probe.unwritable)));
            }
            Some(_) => {}
        }
    }
    let full: Vec<usize> = (ready.shards.iter().enumerate())
        .filter(|(_, metrics)| {
            let budget = metrics.log_disk_budget_bytes.load(Ordering::Relaxed);
            budget > 0 && metrics.log_disk_bytes.load(Ordering::Relaxed) >= budget
        })
        .map(|(shard, _)| shard)
        .collect();
    if !full.is_empty() {
        problems.push(format!("log disk budget used up on shards: {}", list(&full)));
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
    let ready = Arc::new(ReadyState { ready, probe: std::sync::Mutex::default() });
    let prober = Arc::downgrade(&ready);
    std::thread::Builder::new().name("admin-probe".into()).spawn(move || probe_loop(&prober, PROBE_INTERVAL))?;
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if active.fetch_add(1, Ordering::AcqRel) >= CONNECTIONS_MAX {
                active.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let slot = Slot(Arc::clone(&active));
            let ready = Arc::clone(&ready);
            // The slot is given back when the request's thread ends, or
            // here if it cannot start (either way, by dropping it).
            let _ = std::thread::Builder::new().name("admin-request".into()).spawn(move || {
                let _slot = slot;
                answer(stream, &ready);
            });
        }
    })?;
    Ok(bound)
}

/// One of the [`CONNECTIONS_MAX`] request slots, given back on drop (a
/// request thread that panics gives its slot back too).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads one request head and writes its answer, within [`REQUEST_DEADLINE`].
fn answer(mut stream: TcpStream, ready: &ReadyState) {
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
        "/metrics" => ("200 OK", render(&ready.ready.shards)),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state(shards: usize) -> ReadyState {
        let metrics: Vec<Arc<ShardMetrics>> = (0..shards).map(|_| Arc::default()).collect();
        for shard in &metrics {
            ShardMetrics::set(&shard.heartbeat_ms, crate::metrics::monotonic_ms());
        }
        ReadyState {
            ready: Readiness {
                shards: metrics,
                serving: Arc::new(AtomicBool::new(true)),
                draining: Arc::default(),
                shard_dirs: Vec::new(),
            },
            probe: std::sync::Mutex::new(ProbeResult {
                at: Some(Instant::now()),
                running_since: None,
                unwritable: Vec::new(),
            }),
        }
    }

    #[test]
    fn readiness_names_each_reason_to_refuse_traffic() {
        let state = state(3);
        assert_eq!(readiness(&state), ("200 OK", "ok\n".to_string()));

        state.ready.serving.store(false, Ordering::Release);
        assert!(readiness(&state).1.starts_with("starting"));
        state.ready.serving.store(true, Ordering::Release);

        ShardMetrics::set(&state.ready.shards[2].log_disk_budget_bytes, 1000);
        ShardMetrics::set(&state.ready.shards[2].log_disk_bytes, 1000);
        state.probe.lock().unwrap().unwritable = vec![1];
        let (status, body) = readiness(&state);
        assert_eq!(status, "503 Service Unavailable");
        assert!(body.contains("storage not writable on shards: 1"), "{body}");
        assert!(body.contains("log disk budget used up on shards: 2"), "{body}");

        state.probe.lock().unwrap().at = Instant::now().checked_sub(PROBE_STALE_AFTER * 2);
        assert!(!readiness(&state).1.contains("stuck"), "an old result of a slow round is still a result");
        state.probe.lock().unwrap().running_since =
            Instant::now().checked_sub(PROBE_STALE_AFTER + Duration::from_secs(1));
        assert!(readiness(&state).1.contains("storage probe stuck"), "a hung probe is not a pass");
        state.probe.lock().unwrap().running_since = None;
        state.probe.lock().unwrap().at = None;
        assert!(readiness(&state).1.contains("not probed yet"));

        state.ready.draining.store(true, Ordering::Release);
        assert_eq!(readiness(&state), ("503 Service Unavailable", "draining: shutting down\n".to_string()));
    }

    #[test]
    fn a_failed_log_write_makes_the_next_probe_round_fail_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut ready = state(1);
        ready.ready.shard_dirs = vec![dir.path().to_path_buf()];
        ready.probe = std::sync::Mutex::default();
        let ready = Arc::new(ready);
        ShardMetrics::add(&ready.ready.shards[0].log_write_failures_total, 1);
        let prober = Arc::downgrade(&ready);
        let thread = std::thread::spawn(move || probe_loop(&prober, Duration::from_millis(20)));
        let round = |after: Option<Instant>| {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let probe = ready.probe.lock().unwrap();
                if probe.at.is_some() && probe.at > after {
                    return (probe.at, probe.unwritable.clone());
                }
                drop(probe);
                assert!(Instant::now() < deadline, "a probe round never completed");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let (first, unwritable) = round(None);
        assert_eq!(unwritable, vec![0], "a failure since the last round");
        assert!(dir.path().join(PROBE_FILE).exists(), "the probe wrote its file");
        let (_, unwritable) = round(first);
        assert_eq!(unwritable, Vec::<usize>::new(), "no new failure: the next round passes");
        drop(ready);
        thread.join().unwrap();
    }
}
