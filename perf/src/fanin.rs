//! The `fanin` scenario ("Messi test"): M senders to one recipient, N
//! messages in total, with the recipient online (receiving as they arrive)
//! or offline (connecting only after every send was answered). Senders are
//! closed loop, as many in flight as the SDK allows. The server's RSS is
//! sampled throughout: it must stay bounded, and an offline recipient's full
//! mailbox must turn into refusals (MailboxFull), not memory.

use crate::pairs::Target;
use crate::report::{Counts, Latencies};
use hdrhistogram::Histogram;
use iris_client::{Client, ClientConfig};
use irisd::auth::Claims;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// After the senders are done, stop receiving if nothing arrives for this long.
const QUIET_LIMIT: Duration = Duration::from_secs(3);

/// Sends awaiting their ack per sender.
const WINDOW: usize = 256;

/// Runs the scenario.
pub async fn run(target: &Target, options: FaninOptions, pid: Option<u32>) -> Result<FaninOutcome, String> {
    if options.senders == 0 || options.messages == 0 || options.payload_bytes < 8 {
        return Err("senders and messages must be positive, payload at least 8 bytes".into());
    }
    let recipient_user = 3_000_000u64;
    let config = |user: u64| {
        let token = target.authority.mint(Claims { user_id: user, device_id: 1, expires_at_s: u64::MAX / 2 });
        let mut config = ClientConfig::new(target.address.clone(), target.ca.clone(), token);
        // Refusals are what this scenario measures.
        config.retry_refusals = false;
        config
    };
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

    let start = Instant::now();
    let expected_deliveries = Arc::new(AtomicU64::new(0));
    let senders_done = Arc::new(AtomicBool::new(false));
    let receiver = recipient.take().map(|client| {
        tokio::spawn(receive(client, start, Arc::clone(&expected_deliveries), Arc::clone(&senders_done)))
    });
    let mut senders = Vec::new();
    let per_sender = options.messages.div_ceil(u64::from(options.senders));
    for index in 0..u64::from(options.senders) {
        let quota = per_sender.min(options.messages.saturating_sub(index * per_sender));
        let client = Client::connect(config(recipient_user + 1 + index)).await.map_err(|e| format!("sender: {e}"))?;
        senders.push(tokio::spawn(send(client, recipient_user, quota, options.payload_bytes, start)));
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
    let send_seconds = start.elapsed().as_secs_f64();
    expected_deliveries.store(counts.acked, Ordering::Relaxed);
    senders_done.store(true, Ordering::Relaxed);
    let receiver = match receiver {
        Some(task) => task,
        None => {
            let client = Client::connect(config(recipient_user)).await.map_err(|e| format!("recipient: {e}"))?;
            tokio::spawn(receive(client, start, expected_deliveries, senders_done))
        }
    };
    let (delivered, histogram) = tokio::time::timeout(Duration::from_secs(600), receiver)
        .await
        .map_err(|_| "deliveries still outstanding after 600 s".to_string())?
        .map_err(|e| e.to_string())?;
    counts.delivered = delivered;
    latencies.deliver.add(&histogram).map_err(|e| e.to_string())?;
    let total_seconds = start.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    if let Some(sampler) = sampler {
        let _ = sampler.await;
    }
    let peak = peak_rss.load(Ordering::Relaxed);
    Ok(FaninOutcome { counts, latencies, send_seconds, total_seconds, peak_rss_bytes: (peak > 0).then_some(peak) })
}

type SendResult = (u64, u64, std::collections::BTreeMap<String, u64>, Histogram<u64>);

async fn send(client: Client, to: u64, quota: u64, payload_bytes: usize, start: Instant) -> SendResult {
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
    for _ in 0..quota {
        let sent_at = Instant::now();
        payload[..8].copy_from_slice(&(start.elapsed().as_micros() as u64).to_le_bytes());
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
) -> (u64, Histogram<u64>) {
    let mut delivered = histogram();
    let mut count = 0u64;
    let mut quiet_since = Instant::now();
    loop {
        let done = senders_done.load(Ordering::Relaxed);
        if done && (count >= expected.load(Ordering::Relaxed) || quiet_since.elapsed() > QUIET_LIMIT) {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(50), client.recv()).await {
            Ok(Some(message)) => {
                let sent = u64::from_le_bytes(message.payload[..8].try_into().unwrap_or([0; 8]));
                let now = start.elapsed().as_micros() as u64;
                let _ = delivered.record(now.saturating_sub(sent).max(1));
                count += 1;
                quiet_since = Instant::now();
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let _ = client.close().await;
    (count, delivered)
}
