//! The `pairs` scenario: 2N users in pairs, each sending to its partner at a
//! fixed rate (open loop) or with a fixed number of messages in flight
//! (closed loop), for a fixed duration.
//!
//! Open loop: message k of a user is due at `start + k / rate` whether or not
//! earlier ones were answered, and latency is measured from that intended
//! time, so a stalled server shows up as latency instead of being hidden by
//! a sender that waited (coordinated omission). The intended time travels in
//! the first 8 bytes of the payload, so the receiver measures send -> deliver
//! the same way.
//!
//! Closed loop (`inflight` > 0): a user sends whenever fewer than `inflight`
//! of its messages are undelivered, which finds the server's saturation
//! throughput for that shape; latency is measured from the actual send.

use crate::pacer::{self, Schedule};
use crate::report::{Counts, Latencies, Sample};
use hdrhistogram::Histogram;
use iris_client::{Client, ClientConfig, PendingAck};
use irisd::auth::{Claims, TokenAuthority};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Where the server is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Target {
    /// host:port of any shard.
    pub address: String,
    /// CA certificate.
    pub ca: PathBuf,
    /// Mints tokens for the simulated users.
    pub authority: TokenAuthority,
}

/// Scenario parameters.
#[derive(Debug, Clone, Copy)]
pub struct PairsOptions {
    /// Number of pairs (2 users each).
    pub pairs: u32,
    /// Messages per second per user (open loop).
    pub rate_per_user: f64,
    /// Closed loop with this many undelivered messages per user; 0 for open loop.
    pub inflight: u32,
    /// Payload size (at least 8 bytes: the timestamp).
    pub payload_bytes: usize,
    /// How long senders send.
    pub duration: Duration,
    /// First user id (users are first_user .. first_user + 2 * pairs).
    pub first_user: u64,
    /// Interval of the timeline samples.
    pub sample_interval: Duration,
    /// Users sharing one client UDP socket (quinn endpoint).
    pub users_per_socket: u32,
}

/// What one run measured.
#[derive(Debug)]
pub struct PairsOutcome {
    /// Message counts.
    pub counts: Counts,
    /// Send -> ack and send -> deliver latencies.
    pub latencies: Latencies,
    /// Wall time of the sending phase.
    pub send_seconds: f64,
    /// When the last ack arrived, seconds after the start.
    pub last_ack_seconds: f64,
    /// When the last delivery arrived, seconds after the start.
    pub last_delivery_seconds: f64,
    /// Progress and server memory sampled during the run.
    pub samples: Vec<Sample>,
}

/// Running totals, for the timeline.
#[derive(Debug, Default)]
struct Progress {
    acked: std::sync::atomic::AtomicU64,
    delivered: std::sync::atomic::AtomicU64,
}

/// Sends awaiting their ack per user. The SDK keeps at most 128 in flight
/// and queues 1,024 more; beyond this the sender waits (and the wait shows
/// up as latency, since latency is measured from the intended send time).
const PENDING_ACKS_MAX: usize = 4096;

/// Longest wait for outstanding acks and deliveries after sending stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn histogram() -> Histogram<u64> {
    // 1 us .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Runs the scenario against `target`.
pub async fn run(target: &Target, options: PairsOptions, server_pid: Option<u32>) -> Result<PairsOutcome, String> {
    let open = options.inflight == 0;
    if options.pairs == 0 || (open && !(options.rate_per_user.is_finite() && options.rate_per_user > 0.0)) {
        return Err("pairs and rate must be positive".into());
    }
    if options.payload_bytes < 8 {
        return Err("payload must be at least 8 bytes (it carries the send timestamp)".into());
    }
    let users: Vec<u64> = (0..2 * u64::from(options.pairs)).map(|i| options.first_user + i).collect();
    let mut clients = Vec::new();
    let mut endpoints: Vec<quinn::Endpoint> = Vec::new();
    for (index, user) in users.iter().enumerate() {
        let token = target.authority.mint(Claims { user_id: *user, device_id: 1, expires_at_s: u64::MAX / 2 });
        let mut config = ClientConfig::new(target.address.clone(), target.ca.clone(), token);
        if options.users_per_socket > 1 {
            if index % options.users_per_socket as usize == 0 {
                let bind = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
                endpoints.push(quinn::Endpoint::client(bind).map_err(|e| format!("client socket: {e}"))?);
            }
            config.endpoint = endpoints.last().cloned();
        }
        let client = Client::connect(config).await.map_err(|e| format!("user {user} cannot connect: {e}"))?;
        clients.push(client);
    }
    let start = Instant::now();
    let sending = Arc::new(AtomicBool::new(true));
    let progress = Arc::new(Progress::default());
    let sampling = Arc::new(AtomicBool::new(true));
    // Deliver latencies of the current sample interval (swapped out by the sampler).
    let interval_latency = Arc::new(std::sync::Mutex::new(histogram()));
    let sampler = {
        let (progress, sampling, interval_latency) =
            (Arc::clone(&progress), Arc::clone(&sampling), Arc::clone(&interval_latency));
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(options.sample_interval);
            tick.tick().await;
            while sampling.load(Ordering::Relaxed) {
                tick.tick().await;
                let latency = interval_latency.lock().map(|mut h| std::mem::replace(&mut *h, histogram())).ok();
                let (p50, p99) = latency
                    .filter(|h| !h.is_empty())
                    .map_or((None, None), |h| (Some(h.value_at_quantile(0.5)), Some(h.value_at_quantile(0.99))));
                samples.push(Sample {
                    t_s: start.elapsed().as_secs_f64(),
                    acked_total: progress.acked.load(Ordering::Relaxed),
                    delivered_total: progress.delivered.load(Ordering::Relaxed),
                    rss_bytes: server_pid.and_then(crate::server::process_rss_bytes),
                    deliver_p50_us: p50,
                    deliver_p99_us: p99,
                });
            }
            samples
        })
    };
    let schedules = if open {
        pacer::open_loop(users.len(), options.rate_per_user, options.duration, start)?
    } else {
        pacer::closed_loop(users.len(), options.inflight, start + options.duration)
    };
    let windows: Vec<_> = schedules.iter().map(pacer::window).collect();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for ((index, mut client), schedule) in clients.into_iter().enumerate().zip(schedules) {
        let partner = users[index ^ 1];
        let sender = client.sender();
        let (pending_sender, pending_receiver) = mpsc::channel(PENDING_ACKS_MAX);
        senders.push(tokio::spawn(send_loop(sender, partner, options.payload_bytes, schedule, start, pending_sender)));
        let own_window = windows[index].clone();
        receivers.push(tokio::spawn(ack_loop(pending_receiver, start, Arc::clone(&progress), own_window)));
        // This user receives its partner's messages: each delivery frees a
        // slot in the partner's window.
        let partner_window = windows[index ^ 1].clone();
        let sending = Arc::clone(&sending);
        let progress = Arc::clone(&progress);
        let interval_latency = Arc::clone(&interval_latency);
        receivers.push(tokio::spawn(async move {
            let mut delivered = histogram();
            let mut count = 0u64;
            let mut last_seconds = 0.0f64;
            loop {
                let next = tokio::time::timeout(Duration::from_millis(500), client.recv()).await;
                match next {
                    Ok(Some(message)) => {
                        let intended = u64::from_le_bytes(message.payload[..8].try_into().unwrap_or([0; 8]));
                        let now = start.elapsed().as_micros() as u64;
                        let latency = now.saturating_sub(intended).max(1);
                        let _ = delivered.record(latency);
                        if let Ok(mut interval) = interval_latency.lock() {
                            let _ = interval.record(latency);
                        }
                        count += 1;
                        progress.delivered.fetch_add(1, Ordering::Relaxed);
                        if let Some(window) = &partner_window {
                            window.add_permits(1);
                        }
                        last_seconds = start.elapsed().as_secs_f64();
                    }
                    Ok(None) => break,
                    Err(_) if !sending.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            let _ = client.close().await;
            Outcome::Delivered { count, histogram: delivered, last_seconds }
        }));
    }
    let mut counts = Counts::default();
    for sender in senders {
        counts.sent += sender.await.map_err(|e| e.to_string())?;
    }
    let send_seconds = start.elapsed().as_secs_f64();
    sending.store(false, Ordering::Relaxed);
    let mut latencies = Latencies { ack: histogram(), deliver: histogram() };
    let (mut last_ack_seconds, mut last_delivery_seconds) = (0.0f64, 0.0f64);
    let drain = async {
        for task in receivers {
            match task.await.map_err(|e| e.to_string())? {
                Outcome::Acked { count, errors, histogram, last_seconds } => {
                    counts.acked += count;
                    last_ack_seconds = last_ack_seconds.max(last_seconds);
                    for (code, n) in errors {
                        *counts.errors.entry(code).or_default() += n;
                    }
                    latencies.ack.add(&histogram).map_err(|e| e.to_string())?;
                }
                Outcome::Delivered { count, histogram, last_seconds } => {
                    counts.delivered += count;
                    last_delivery_seconds = last_delivery_seconds.max(last_seconds);
                    latencies.deliver.add(&histogram).map_err(|e| e.to_string())?;
                }
            }
        }
        Ok::<(), String>(())
    };
    tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(5), drain)
        .await
        .map_err(|_| "acks or deliveries still outstanding after the drain timeout".to_string())??;
    sampling.store(false, Ordering::Relaxed);
    let samples = sampler.await.map_err(|e| e.to_string())?;
    Ok(PairsOutcome { counts, latencies, send_seconds, last_ack_seconds, last_delivery_seconds, samples })
}

enum Outcome {
    Acked { count: u64, errors: BTreeMap<String, u64>, histogram: Histogram<u64>, last_seconds: f64 },
    Delivered { count: u64, histogram: Histogram<u64>, last_seconds: f64 },
}

/// Sends in the schedule's slots; returns how many it sent.
async fn send_loop(
    sender: iris_client::ClientSender,
    partner: u64,
    payload_bytes: usize,
    mut schedule: Schedule,
    start: Instant,
    pending: mpsc::Sender<(u64, PendingAck)>,
) -> u64 {
    let mut sent = 0u64;
    let mut payload = vec![0u8; payload_bytes];
    while let Some(intended) = schedule.next(start).await {
        payload[..8].copy_from_slice(&intended.to_le_bytes());
        match sender.send_nowait(partner, payload.clone()).await {
            Ok(outcome) => {
                if pending.send((intended, outcome)).await.is_err() {
                    break;
                }
                sent += 1;
            }
            Err(_) => break,
        }
    }
    sent
}

/// Awaits acks in send order and records send -> ack latency; a refused
/// send returns its slot to the sender's window (it will not be delivered).
async fn ack_loop(
    mut pending: mpsc::Receiver<(u64, PendingAck)>,
    start: Instant,
    progress: Arc<Progress>,
    window: Option<Arc<tokio::sync::Semaphore>>,
) -> Outcome {
    let mut acked = histogram();
    let mut count = 0;
    let mut errors = BTreeMap::new();
    let mut last_seconds = 0.0f64;
    while let Some((intended, outcome)) = pending.recv().await {
        match tokio::time::timeout(DRAIN_TIMEOUT, outcome).await {
            Ok(Ok(Ok(_))) => {
                let now = start.elapsed().as_micros() as u64;
                let _ = acked.record(now.saturating_sub(intended).max(1));
                count += 1;
                progress.acked.fetch_add(1, Ordering::Relaxed);
                last_seconds = start.elapsed().as_secs_f64();
            }
            Ok(Ok(Err(error))) => {
                let code = error.code().map_or_else(|| "client".to_string(), |code| format!("{code:?}"));
                *errors.entry(code).or_default() += 1;
                if let Some(window) = &window {
                    window.add_permits(1);
                }
            }
            Ok(Err(_)) => *errors.entry("session-closed".to_string()).or_default() += 1,
            Err(_) => *errors.entry("ack-timeout".to_string()).or_default() += 1,
        }
    }
    Outcome::Acked { count, errors, histogram: acked, last_seconds }
}
