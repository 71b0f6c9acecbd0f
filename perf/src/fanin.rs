//! The `fanin` scenario ("Messi test"): M senders to one recipient, N
//! messages in total, with the recipient online (receiving as they arrive)
//! or offline (connecting only after every send was answered). Senders are
//! closed loop, up to 256 in flight each; with `--retry` they retry refusals
//! as the SDK does by default (honouring retry_after_ms), so every message
//! must eventually be acknowledged. The recipient checks that it gets every
//! sender's messages once each, in order. The server's RSS is sampled
//! throughout, and the data directory's size at the end of the sends. With
//! `--probe-shards`, pairs of users homed on another shard than the
//! recipient's exchange messages at a low rate before (baseline) and during
//! the fan-in: their latency shows whether the celebrity's load reaches them.

use crate::pairs::Target;
use crate::report::{Counts, Latencies};
use hdrhistogram::Histogram;
use iris_client::{Client, ClientConfig};
use iris_shard_map::{NodeId, SlotTable, UserId};
use irisd::auth::Claims;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Scenario parameters.
#[derive(Debug, Clone, Copy)]
pub struct FaninOptions {
    /// Sending users.
    pub senders: u32,
    /// Messages in total.
    pub messages: u64,
    /// Payload bytes (at least 8).
    pub payload_bytes: usize,
    /// Recipient offline until all sends are answered.
    pub offline: bool,
    /// Senders retry refusals (with the SDK's backoff) instead of counting them.
    pub retry: bool,
    /// The server's shard count, to home probe users elsewhere than the recipient (0: no probe).
    pub probe_shards: u16,
    /// Probe pairs, each sending `probe_rate` messages/s one way.
    pub probe_pairs: u32,
    /// Messages per second per probe pair.
    pub probe_rate: f64,
    /// Seconds the probes run before the fan-in starts (their baseline).
    pub baseline_seconds: f64,
    /// Home every sender on the recipient's shard (needs `probe_shards`),
    /// so the probes' shard carries no fan-in traffic at all.
    pub senders_with_recipient: bool,
}

/// What a run measured.
#[derive(Debug)]
pub struct FaninOutcome {
    /// Counts.
    pub counts: Counts,
    /// Latencies (ack from the actual send; deliver from the send time in the payload).
    pub latencies: Latencies,
    /// Seconds until the last send was answered.
    pub send_seconds: f64,
    /// Seconds until the last delivery.
    pub total_seconds: f64,
    /// Highest server RSS sampled.
    pub peak_rss_bytes: Option<u64>,
    /// What the recipient saw and the probes measured.
    pub findings: BTreeMap<String, String>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// After the senders are done, stop receiving if nothing arrives for this long.
const QUIET_LIMIT: Duration = Duration::from_secs(3);

/// Sends awaiting their ack per sender.
const WINDOW: usize = 256;

/// Payload layout: send time (us since the start), sender index, number.
const HEADER_BYTES: usize = 24;

/// What the recipient saw of the senders' order.
#[derive(Debug, Default)]
struct Order {
    /// Next number expected from each sender.
    next: std::collections::HashMap<u64, u64>,
    /// Messages that came after a later one of their sender (or twice).
    late_or_duplicate: u64,
    /// Numbers skipped (a refused send that was not retried).
    skipped: u64,
}

impl Order {
    fn saw(&mut self, sender: u64, number: u64) {
        let next = self.next.entry(sender).or_insert(0);
        if number < *next {
            self.late_or_duplicate += 1;
        } else {
            self.skipped += number - *next;
            *next = number + 1;
        }
    }
}

/// Probe latencies: sent before the fan-in started, and while it ran.
type ProbeHistograms = Arc<Mutex<(Histogram<u64>, Histogram<u64>)>>;

/// Runs the scenario. `data_dir` is the server's, to measure its disk use.
pub async fn run(
    target: &Target,
    options: FaninOptions,
    pid: Option<u32>,
    data_dir: Option<&std::path::Path>,
) -> Result<FaninOutcome, String> {
    if options.senders == 0 || options.messages == 0 || options.payload_bytes < HEADER_BYTES {
        return Err(format!("senders and messages must be positive, payload at least {HEADER_BYTES} bytes"));
    }
    let recipient_user = 3_000_000u64;
    let retry = options.retry;
    let config = |user: u64| {
        let token = target.authority.mint(Claims { user_id: user, device_id: 1, expires_at_s: u64::MAX / 2 });
        let mut config = ClientConfig::new(target.address.clone(), target.ca.clone(), token);
        // Without --retry, refusals are what this scenario measures.
        config.retry_refusals = retry;
        // A celebrity's shard may refuse a send for a long while under load.
        config.refusal_retry_for = Duration::from_secs(600);
        config
    };
    let start = Instant::now();
    let fanin_window = Arc::new(Mutex::new((u64::MAX, u64::MAX)));
    let probes_on = Arc::new(AtomicBool::new(true));
    let probe_histograms: ProbeHistograms = Arc::new(Mutex::new((histogram(), histogram())));
    let mut probes = Vec::new();
    if options.probe_shards > 1 && options.probe_pairs > 0 {
        let table = SlotTable::single_node(NodeId(0), options.probe_shards, 1).map_err(|e| e.to_string())?;
        let home = |user: u64| table.home(UserId(user)).shard;
        let elsewhere: Vec<u64> = (4_000_000u64..)
            .filter(|user| home(*user) != home(recipient_user))
            .take(2 * options.probe_pairs as usize)
            .collect();
        for pair in elsewhere.chunks(2) {
            let from = Client::connect(config(pair[0])).await.map_err(|e| format!("probe: {e}"))?;
            let to = Client::connect(config(pair[1])).await.map_err(|e| format!("probe: {e}"))?;
            let (on, window, histograms) =
                (Arc::clone(&probes_on), Arc::clone(&fanin_window), Arc::clone(&probe_histograms));
            probes.push(tokio::spawn(probe(from, to, pair[1], options.probe_rate, start, on, window, histograms)));
        }
        tokio::time::sleep(Duration::from_secs_f64(options.baseline_seconds)).await;
    }
    fanin_window.lock().map_err(|e| e.to_string())?.0 = start.elapsed().as_micros() as u64;
    // The recipient registers its device first, then (offline) disconnects.
    let recipient = Client::connect(config(recipient_user)).await.map_err(|e| format!("recipient: {e}"))?;
    let mut recipient = if options.offline {
        recipient.close().await.map_err(|e| e.to_string())?;
        None
    } else {
        Some(recipient)
    };
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = pid.map(|pid| {
        let (peak, sampling) = (Arc::clone(&peak_rss), Arc::clone(&sampling));
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(rss) = crate::server::process_rss_bytes(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    });

    let fanin_start = Instant::now();
    let expected_deliveries = Arc::new(AtomicU64::new(0));
    let senders_done = Arc::new(AtomicBool::new(false));
    let receiver = recipient.take().map(|client| {
        tokio::spawn(receive(client, start, Arc::clone(&expected_deliveries), Arc::clone(&senders_done)))
    });
    let mut senders = Vec::new();
    let per_sender = options.messages.div_ceil(u64::from(options.senders));
    let table = SlotTable::single_node(NodeId(0), options.probe_shards.max(1), 1).map_err(|e| e.to_string())?;
    let recipient_home = table.home(UserId(recipient_user)).shard;
    let sender_users: Vec<u64> = (recipient_user + 1..)
        .filter(|user| !options.senders_with_recipient || table.home(UserId(*user)).shard == recipient_home)
        .take(options.senders as usize)
        .collect();
    for (index, user) in (0..u64::from(options.senders)).zip(sender_users) {
        let quota = per_sender.min(options.messages.saturating_sub(index * per_sender));
        let client = Client::connect(config(user)).await.map_err(|e| format!("sender: {e}"))?;
        senders.push(tokio::spawn(send(client, recipient_user, index, quota, options.payload_bytes, start)));
    }
    let mut counts = Counts::default();
    let mut latencies = Latencies { ack: histogram(), deliver: histogram() };
    for sender in senders {
        let (sent, acked, errors, histogram) = sender.await.map_err(|e| e.to_string())?;
        counts.sent += sent;
        counts.acked += acked;
        for (code, n) in errors {
            *counts.errors.entry(code).or_default() += n;
        }
        latencies.ack.add(&histogram).map_err(|e| e.to_string())?;
    }
    let send_seconds = fanin_start.elapsed().as_secs_f64();
    fanin_window.lock().map_err(|e| e.to_string())?.1 = start.elapsed().as_micros() as u64;
    probes_on.store(false, Ordering::Relaxed);
    let mut findings = BTreeMap::new();
    if let Some(dir) = data_dir {
        findings.insert("disk after sends".into(), format!("{:.1} MiB", directory_bytes(dir) as f64 / 1048576.0));
    }
    expected_deliveries.store(counts.acked, Ordering::Relaxed);
    senders_done.store(true, Ordering::Relaxed);
    let connected_at = Instant::now();
    let receiver = match receiver {
        Some(task) => task,
        None => {
            let client = Client::connect(config(recipient_user)).await.map_err(|e| format!("recipient: {e}"))?;
            tokio::spawn(receive(client, start, expected_deliveries, senders_done))
        }
    };
    let (delivered, histogram, order) = tokio::time::timeout(Duration::from_secs(1800), receiver)
        .await
        .map_err(|_| "deliveries still outstanding after 1800 s".to_string())?
        .map_err(|e| e.to_string())?;
    let drain_seconds = connected_at.elapsed().as_secs_f64();
    counts.delivered = delivered;
    latencies.deliver.add(&histogram).map_err(|e| e.to_string())?;
    let total_seconds = fanin_start.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    if let Some(sampler) = sampler {
        let _ = sampler.await;
    }
    for probe in probes {
        let _ = probe.await;
    }
    findings.insert("late or duplicate".into(), order.late_or_duplicate.to_string());
    findings.insert("skipped (refused)".into(), order.skipped.to_string());
    findings.insert("senders seen".into(), order.next.len().to_string());
    if options.offline {
        findings.insert("drain after connect".into(), format!("{drain_seconds:.1} s"));
        findings.insert("delivered/s after connect".into(), format!("{:.0}", delivered as f64 / drain_seconds));
    }
    let histograms = probe_histograms.lock().map_err(|e| e.to_string())?;
    for (name, histogram) in [("probe baseline", &histograms.0), ("probe during fan-in", &histograms.1)] {
        if !histogram.is_empty() {
            let (p50, p99) = (histogram.value_at_quantile(0.5), histogram.value_at_quantile(0.99));
            findings.insert(name.into(), format!("{} msgs, p50 {p50} us, p99 {p99} us", histogram.len()));
        }
    }
    if !histograms.0.is_empty() && !histograms.1.is_empty() {
        let ratio = histograms.1.value_at_quantile(0.99) as f64 / histograms.0.value_at_quantile(0.99).max(1) as f64;
        findings.insert("probe p99 during / baseline".into(), format!("{ratio:.2}"));
    }
    drop(histograms);
    let peak = peak_rss.load(Ordering::Relaxed);
    Ok(FaninOutcome {
        counts,
        latencies,
        send_seconds,
        total_seconds,
        peak_rss_bytes: (peak > 0).then_some(peak),
        findings,
    })
}

/// Bytes of the files under `dir` (the server's data directory).
fn directory_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => directory_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// One probe pair: `from` sends to `to_user` at `rate` per second while
/// `on`; `to` records each delivery's latency as baseline (sent before the
/// fan-in started) or during (sent while its senders ran).
#[allow(clippy::too_many_arguments)]
async fn probe(
    from: Client,
    mut to: Client,
    to_user: u64,
    rate: f64,
    start: Instant,
    on: Arc<AtomicBool>,
    window: Arc<Mutex<(u64, u64)>>,
    histograms: ProbeHistograms,
) {
    let sender = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
        let mut payload = vec![0u8; 64];
        while on.load(Ordering::Relaxed) {
            ticks.tick().await;
            payload[..8].copy_from_slice(&(start.elapsed().as_micros() as u64).to_le_bytes());
            if from.send_nowait(to_user, payload.clone()).await.is_err() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = from.close().await;
    });
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(3), to.recv()).await {
        let sent = u64::from_le_bytes(message.payload[..8].try_into().unwrap_or([0; 8]));
        let latency = (start.elapsed().as_micros() as u64).saturating_sub(sent).max(1);
        let (fanin_start, fanin_end) = window.lock().map(|window| *window).unwrap_or((u64::MAX, u64::MAX));
        if let Ok(mut histograms) = histograms.lock() {
            if sent < fanin_start {
                let _ = histograms.0.record(latency);
            } else if sent < fanin_end {
                let _ = histograms.1.record(latency);
            }
        }
    }
    let _ = sender.await;
    let _ = to.close().await;
}

type SendResult = (u64, u64, std::collections::BTreeMap<String, u64>, Histogram<u64>);

async fn send(client: Client, to: u64, index: u64, quota: u64, payload_bytes: usize, start: Instant) -> SendResult {
    let mut acked_latency = histogram();
    let (mut sent, mut acked) = (0, 0);
    let mut errors = std::collections::BTreeMap::new();
    let mut window = std::collections::VecDeque::new();
    let mut payload = vec![0u8; payload_bytes];
    let mut settle =
        |outcome: Result<Result<iris_client::Acked, iris_client::ClientError>, _>, sent_at: Instant| match outcome {
            Ok(Ok(_)) => {
                acked += 1;
                let _ = acked_latency.record((sent_at.elapsed().as_micros() as u64).max(1));
            }
            Ok(Err(error)) => {
                let code = error.code().map_or_else(|| "client".to_string(), |code| format!("{code:?}"));
                *errors.entry(code).or_default() += 1;
            }
            Err(_) => *errors.entry("session-closed".to_string()).or_default() += 1,
        };
    payload[8..16].copy_from_slice(&index.to_le_bytes());
    for number in 0..quota {
        let sent_at = Instant::now();
        payload[..8].copy_from_slice(&(start.elapsed().as_micros() as u64).to_le_bytes());
        payload[16..24].copy_from_slice(&number.to_le_bytes());
        let Ok(outcome) = client.send_nowait(to, payload.clone()).await else { break };
        sent += 1;
        window.push_back((sent_at, outcome));
        if window.len() >= WINDOW {
            if let Some((sent_at, outcome)) = window.pop_front() {
                settle(outcome.await, sent_at);
            }
        }
    }
    for (sent_at, outcome) in window {
        settle(outcome.await, sent_at);
    }
    let _ = client.close().await;
    (sent, acked, errors, acked_latency)
}

/// Receives until every acknowledged message arrived (known once the
/// senders are done), or until the stream stays quiet for 3 s after that.
async fn receive(
    mut client: Client,
    start: Instant,
    expected: Arc<AtomicU64>,
    senders_done: Arc<AtomicBool>,
) -> (u64, Histogram<u64>, Order) {
    let mut delivered = histogram();
    let mut order = Order::default();
    let mut count = 0u64;
    let mut quiet_since = Instant::now();
    loop {
        let done = senders_done.load(Ordering::Relaxed);
        if done && (count >= expected.load(Ordering::Relaxed) || quiet_since.elapsed() > QUIET_LIMIT) {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(50), client.recv()).await {
            Ok(Some(message)) => {
                let field = |at: usize| {
                    message
                        .payload
                        .get(at..at + 8)
                        .and_then(|bytes| bytes.try_into().ok())
                        .map_or(0, u64::from_le_bytes)
                };
                let now = start.elapsed().as_micros() as u64;
                let _ = delivered.record(now.saturating_sub(field(0)).max(1));
                order.saw(field(8), field(16));
                count += 1;
                quiet_since = Instant::now();
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let _ = client.close().await;
    (count, delivered, order)
}
