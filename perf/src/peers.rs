//! Peer servers driven with the same open-loop pairs shape as Iris, through
//! well-kept client crates: MQTT 3.1.1 QoS 1 with persistent sessions
//! (rumqttc, e.g. against mosquitto with persistence on), NATS JetStream
//! with acked publishes to a file-backed stream, and plain NATS core (no
//! ack, no persistence) for reference (async-nats).
//!
//! Each user publishes to its partner's topic/subject at the given rate; the
//! first 8 bytes carry the intended send time, so send -> ack and
//! send -> deliver are measured exactly as for Iris.

use crate::pacer::{self, Schedule};
use crate::pairs::PairsOptions;
use crate::report::{Counts, Latencies};
use hdrhistogram::Histogram;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which peer protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// MQTT QoS 1, persistent sessions.
    Mqtt,
    /// NATS JetStream, file storage, acked publish.
    NatsJetStream,
    /// NATS core publish/subscribe.
    NatsCore,
}

/// What a peer run measured.
#[derive(Debug)]
pub struct PeerOutcome {
    /// Counts.
    pub counts: Counts,
    /// Latencies.
    pub latencies: Latencies,
    /// Seconds until the last ack or delivery.
    pub seconds: f64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Shared results of all users.
#[derive(Default)]
struct Totals {
    acked: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
    latencies: Mutex<Option<Latencies>>,
    last_micros: AtomicU64,
}

impl Totals {
    fn record(&self, ack: Option<u64>, deliver: Option<u64>, start: Instant) {
        if let Ok(mut guard) = self.latencies.lock() {
            let latencies = guard.get_or_insert_with(|| Latencies { ack: histogram(), deliver: histogram() });
            if let Some(us) = ack {
                let _ = latencies.ack.record(us.max(1));
                self.acked.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(us) = deliver {
                let _ = latencies.deliver.record(us.max(1));
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.last_micros.fetch_max(start.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

/// Waits for the next slot of `schedule` (not before `start`), writes its
/// intended time into `payload` and returns it; `None` once the run's
/// duration is over.
async fn next_slot(start: Instant, schedule: &mut Schedule, payload: &mut [u8]) -> Option<u64> {
    tokio::time::sleep_until(start.into()).await;
    let intended = schedule.next(start).await?;
    payload[..8].copy_from_slice(&intended.to_le_bytes());
    Some(intended)
}

/// Returns a slot to a closed-loop window (no-op for open loop).
fn release(window: &Option<Arc<tokio::sync::Semaphore>>) {
    if let Some(window) = window {
        window.add_permits(1);
    }
}

fn since(start: Instant, intended: u64) -> u64 {
    (start.elapsed().as_micros() as u64).saturating_sub(intended)
}

fn timestamp(payload: &[u8]) -> u64 {
    payload.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0)
}

/// Runs the pairs shape against a peer at `host:port`.
pub async fn run(kind: PeerKind, host: &str, port: u16, options: PairsOptions) -> Result<PeerOutcome, String> {
    let open = options.inflight == 0;
    if options.pairs == 0 || (open && options.rate_per_user <= 0.0) || options.payload_bytes < 8 {
        return Err("pairs and rate must be positive, payload at least 8 bytes".into());
    }
    let users: Vec<u64> = (0..2 * u64::from(options.pairs)).map(|i| options.first_user + i).collect();
    let totals = Arc::new(Totals::default());
    // Sending starts a moment after every user is connected and subscribed:
    // neither MQTT without a stored session nor NATS core keeps messages for
    // a subscription that does not exist yet.
    let start = Instant::now() + SUBSCRIBE_SETTLE;
    let sending = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let jetstream = if kind == PeerKind::NatsJetStream {
        let client = async_nats::connect(format!("{host}:{port}")).await.map_err(|e| format!("NATS: {e}"))?;
        let context = async_nats::jetstream::new(client);
        let config = async_nats::jetstream::stream::Config {
            name: "IRISPERF".into(),
            subjects: vec!["u.*".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        };
        context.get_or_create_stream(config).await.map_err(|e| format!("JetStream stream: {e}"))?;
        Some(context)
    } else {
        None
    };
    let schedules = if open {
        pacer::open_loop(users.len(), options.rate_per_user, options.duration, start)?
    } else {
        pacer::closed_loop(users.len(), options.inflight, start + options.duration)
    };
    let windows: Vec<_> = schedules.iter().map(pacer::window).collect();
    for ((index, user), schedule) in users.iter().enumerate().zip(schedules) {
        let partner = users[index ^ 1];
        // Own window (refusals return a slot) and the partner's (deliveries to this user do).
        let windows = (windows[index].clone(), windows[index ^ 1].clone());
        let (totals, sending, sent) = (Arc::clone(&totals), Arc::clone(&sending), Arc::clone(&sent));
        let host = host.to_string();
        let jetstream = jetstream.clone();
        let user = *user;
        let task = match kind {
            PeerKind::Mqtt => {
                let user = MqttUser { host, port, user, partner, payload_bytes: options.payload_bytes };
                tokio::spawn(mqtt_user(user, schedule, windows, (options, start), totals, sending, sent))
            }
            PeerKind::NatsJetStream | PeerKind::NatsCore => {
                let client = async_nats::connect(format!("{host}:{port}")).await.map_err(|e| format!("NATS: {e}"))?;
                let user = (user, partner, options.payload_bytes);
                tokio::spawn(nats_user(client, jetstream, user, schedule, windows, start, totals, sending, sent))
            }
        };
        tasks.push(task);
    }
    tokio::time::sleep_until((start + options.duration).into()).await;
    sending.store(false, Ordering::Relaxed);
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    let latencies = totals
        .latencies
        .lock()
        .ok()
        .and_then(|mut guard| guard.take())
        .unwrap_or_else(|| Latencies { ack: histogram(), deliver: histogram() });
    let mut counts = Counts {
        sent: sent.load(Ordering::Relaxed),
        acked: totals.acked.load(Ordering::Relaxed),
        delivered: totals.delivered.load(Ordering::Relaxed),
        ..Counts::default()
    };
    let errors = totals.errors.load(Ordering::Relaxed);
    if errors > 0 {
        counts.errors.insert("peer".into(), errors);
    }
    let seconds = (totals.last_micros.load(Ordering::Relaxed) as f64 / 1e6).max(options.duration.as_secs_f64());
    Ok(PeerOutcome { counts, latencies, seconds })
}

/// Time given to all subscriptions to reach the server before sending starts.
const SUBSCRIBE_SETTLE: Duration = Duration::from_secs(1);

/// After sending stops, how long a user keeps waiting for stragglers.
const DRAIN: Duration = Duration::from_secs(5);

/// One MQTT user's connection parameters.
struct MqttUser {
    host: String,
    port: u16,
    user: u64,
    partner: u64,
    payload_bytes: usize,
}

/// A closed-loop window: this user's own, and its partner's.
type Windows = (Option<Arc<tokio::sync::Semaphore>>, Option<Arc<tokio::sync::Semaphore>>);

async fn mqtt_user(
    MqttUser { host, port, user, partner, payload_bytes }: MqttUser,
    mut schedule: Schedule,
    (_own_window, partner_window): Windows,
    (options, start): (PairsOptions, Instant),
    totals: Arc<Totals>,
    sending: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> Result<(), String> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut mqtt = MqttOptions::new(format!("iris-perf-{user}"), host, port);
    mqtt.set_clean_session(false).set_keep_alive(Duration::from_secs(30)).set_inflight(1000);
    mqtt.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(mqtt, 1000);
    client.subscribe(format!("u/{user}"), QoS::AtLeastOnce).await.map_err(|e| e.to_string())?;
    // Intended times of publishes in order; the event loop pairs them with packet ids.
    let intended_queue: Arc<Mutex<VecDeque<u64>>> = Arc::new(Mutex::new(VecDeque::new()));
    let publisher = {
        let (client, queue, sending, sent) =
            (client.clone(), Arc::clone(&intended_queue), Arc::clone(&sending), Arc::clone(&sent));
        tokio::spawn(async move {
            let mut payload = vec![0u8; payload_bytes];
            while sending.load(Ordering::Relaxed) {
                let Some(intended) = next_slot(start, &mut schedule, &mut payload).await else { break };
                if let Ok(mut queue) = queue.lock() {
                    queue.push_back(intended);
                }
                if client.publish(format!("u/{partner}"), QoS::AtLeastOnce, false, payload.clone()).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut by_packet: HashMap<u16, u64> = HashMap::new();
    let mut quiet_since: Option<Instant> = None;
    loop {
        if !sending.load(Ordering::Relaxed) && by_packet.is_empty() {
            let since_quiet = *quiet_since.get_or_insert_with(Instant::now);
            if since_quiet.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        if start.elapsed() > options.duration + DRAIN {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(100), eventloop.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(packet)))) => {
                if let Some(intended) = intended_queue.lock().ok().and_then(|mut q| q.pop_front()) {
                    by_packet.insert(packet, intended);
                }
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(intended) = by_packet.remove(&ack.pkid) {
                    totals.record(Some(since(start, intended)), None, start);
                }
            }
            Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                quiet_since = None;
                totals.record(None, Some(since(start, timestamp(&publish.payload))), start);
                release(&partner_window);
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                totals.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => {}
        }
    }
    publisher.abort();
    let _ = client.disconnect().await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn nats_user(
    client: async_nats::Client,
    jetstream: Option<async_nats::jetstream::Context>,
    (user, partner, payload_bytes): (u64, u64, usize),
    mut schedule: Schedule,
    (own_window, partner_window): Windows,
    start: Instant,
    totals: Arc<Totals>,
    sending: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> Result<(), String> {
    use futures_util::StreamExt;
    let mut subscriber = client.subscribe(format!("u.{user}")).await.map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())?;
    let receiver = {
        let (totals, sending) = (Arc::clone(&totals), Arc::clone(&sending));
        tokio::spawn(async move {
            loop {
                let wait = if sending.load(Ordering::Relaxed) {
                    Duration::from_millis(200)
                } else {
                    Duration::from_millis(500)
                };
                match tokio::time::timeout(wait, subscriber.next()).await {
                    Ok(Some(message)) => {
                        totals.record(None, Some(since(start, timestamp(&message.payload))), start);
                        release(&partner_window);
                    }
                    Ok(None) => break,
                    Err(_) if !sending.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
        })
    };
    let (acks, mut pending_acks) =
        tokio::sync::mpsc::channel::<(u64, async_nats::jetstream::context::PublishAckFuture)>(4096);
    let ack_task = {
        let (totals, own_window) = (Arc::clone(&totals), own_window.clone());
        tokio::spawn(async move {
            while let Some((intended, future)) = pending_acks.recv().await {
                match future.await {
                    Ok(_) => totals.record(Some(since(start, intended)), None, start),
                    Err(_) => {
                        totals.errors.fetch_add(1, Ordering::Relaxed);
                        release(&own_window);
                    }
                }
            }
        })
    };
    let mut payload = vec![0u8; payload_bytes];
    let subject = format!("u.{partner}");
    loop {
        let Some(intended) = next_slot(start, &mut schedule, &mut payload).await else { break };
        match &jetstream {
            Some(context) => match context.publish(subject.clone(), payload.clone().into()).await {
                Ok(future) => {
                    if acks.send((intended, future)).await.is_err() {
                        break;
                    }
                }
                Err(_) => {
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                    release(&own_window);
                }
            },
            None => {
                if client.publish(subject.clone(), payload.clone().into()).await.is_err() {
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                    release(&own_window);
                }
            }
        }
        sent.fetch_add(1, Ordering::Relaxed);
    }
    let _ = client.flush().await;
    drop(acks);
    let _ = ack_task.await;
    let _ = receiver.await;
    Ok(())
}
