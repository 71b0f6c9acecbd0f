//! The `presence` scenario (issue 11): N users, each watching C others (a
//! ring: user i watches i+1 ..= i+C, so each is watched by C), with a churn
//! of users leaving and coming back. Reports the presence notifications
//! received per second of server CPU, their latency (from the change to its
//! receipt: a user's connect, or its leave plus the server's grace period),
//! and the server's memory per subscription.
//!
//! Every user is an SDK client on one load-generator runtime; a churning
//! user closes its client and connects a new one after `away_ms`, which must
//! exceed the server's `presence.grace_ms` for watchers to see it go.

use crate::pairs::Target;
use hdrhistogram::Histogram;
use iris_client::{Client, PresenceEvent, PresenceState};
use irisd::auth::Claims;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct PresenceOptions {
    /// Users.
    pub users: u64,
    /// Contacts each watches.
    pub contacts: u64,
    /// Users that leave (and come back) per second.
    pub churn_per_s: f64,
    /// Seconds of churn.
    pub duration: f64,
    /// The server's `presence.grace_ms`.
    pub grace_ms: u64,
    /// How long a churning user stays away.
    pub away_ms: u64,
}

/// When each user's latest change happened (ms on the run's clock), and
/// which it was.
#[derive(Debug, Default)]
struct Changes {
    at: HashMap<u64, (bool, u64)>,
}

/// The report.
#[derive(Debug, serde::Serialize)]
struct PresenceReport {
    scenario: &'static str,
    users: u64,
    contacts: u64,
    churn_per_s: f64,
    seconds: f64,
    notifications: u64,
    notifications_per_server_cpu_second: Option<f64>,
    server_cpu_us_per_notification: Option<f64>,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    latency_max_ms: f64,
    server_rss_per_subscription_bytes: Option<f64>,
    loadgen_cpu_seconds: f64,
}

fn token(target: &Target, user: u64) -> String {
    target.authority.mint(Claims { user_id: user, device_id: 1, expires_at_s: u64::MAX / 2 })
}

fn config(target: &Target, user: u64) -> iris_client::ClientConfig {
    iris_client::ClientConfig::new(target.address.clone(), target.ca.clone(), token(target, user))
}

/// Runs the scenario and prints (and optionally writes) the report.
pub fn report(
    target: &Target,
    pid: Option<u32>,
    options: PresenceOptions,
    json: Option<std::path::PathBuf>,
) -> Result<(), String> {
    use crate::server::{own_cpu_seconds, process_cpu_seconds, process_rss_bytes};
    let runtime = crate::loadgen_runtime(1)?;
    let first = 3_000_000u64;
    let users: Vec<u64> = (first..first + options.users).collect();
    let own_before = own_cpu_seconds();
    let origin = Instant::now();
    let clock_ms = move || origin.elapsed().as_millis() as u64;
    // Everyone online first, then the watches (so their memory is apart).
    let mut clients: Vec<Client> = runtime.block_on(async {
        let mut clients = Vec::with_capacity(users.len());
        for user in &users {
            clients.push(Client::connect(config(target, *user)).await.map_err(|e| format!("user {user}: {e}"))?);
        }
        Ok::<_, String>(clients)
    })?;
    let rss_before = pid.and_then(process_rss_bytes);
    let contacts_of = |index: usize| -> Vec<u64> {
        (1..=options.contacts).map(|step| users[(index + step as usize) % users.len()]).collect()
    };
    runtime.block_on(async {
        for (index, client) in clients.iter().enumerate() {
            client.watch_presence(contacts_of(index)).await.map_err(|e| e.to_string())?;
        }
        // The initial states: C per watcher.
        for client in clients.iter_mut() {
            for _ in 0..options.contacts {
                match tokio::time::timeout(Duration::from_secs(30), client.next_presence()).await {
                    Ok(Some(PresenceEvent::Changed { .. })) => {}
                    other => return Err(format!("no initial presence state: {other:?}")),
                }
            }
        }
        Ok::<_, String>(())
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = pid.and_then(process_rss_bytes);
    let per_subscription = rss_after
        .zip(rss_before)
        .map(|(after, before)| (after as f64 - before as f64) / (options.users * options.contacts) as f64);

    // The churn: watchers record every notification's latency.
    let changes = Arc::new(Mutex::new(Changes::default()));
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 600_000, 3).map_err(|e| e.to_string())?));
    let notifications = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cpu_before = pid.and_then(process_cpu_seconds);
    let started = Instant::now();
    let duration = Duration::from_secs_f64(options.duration);
    runtime.block_on(async {
        let mut watchers = Vec::new();
        let (churn_senders, mut churn_receivers): (Vec<_>, Vec<_>) =
            (0..clients.len()).map(|_| tokio::sync::mpsc::channel::<()>(4)).unzip();
        for (index, mut client) in clients.drain(..).enumerate() {
            let (changes, latency, notifications) = (changes.clone(), latency.clone(), notifications.clone());
            let mut churn = churn_receivers.remove(0);
            let contacts = contacts_of(index);
            let user = users[index];
            let config = config(target, user);
            watchers.push(tokio::spawn(async move {
                // Only changes made while this client was connected count,
                // each once: the states a (re)subscription brings are not
                // notifications of a change.
                let mut connected_at = 0u64;
                let mut counted: HashMap<u64, u64> = HashMap::new();
                loop {
                    tokio::select! {
                        event = client.next_presence() => match event {
                            Some(PresenceEvent::Changed { user, state }) => {
                                let now = clock_ms();
                                let change = changes.lock().ok().and_then(|c| c.at.get(&user).copied());
                                let online = matches!(state, PresenceState::Online);
                                let fresh = change
                                    .filter(|(was, at)| *was == online && *at >= connected_at)
                                    .filter(|(_, at)| counted.insert(user, *at) != Some(*at));
                                if let Some((was_online, at)) = fresh {
                                    let due = if was_online { at } else { at + options.grace_ms };
                                    if let Ok(mut histogram) = latency.lock() {
                                        let _ = histogram.record(now.saturating_sub(due).max(1));
                                    }
                                }
                                notifications.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Some(_) => {}
                            None => return,
                        },
                        command = churn.recv() => {
                            if command.is_none() {
                                let _ = client.close().await;
                                return;
                            }
                            // The leave counts from when the connection is closed
                            // (the SDK first gives its last ack a moment to go).
                            let _ = client.close().await;
                            if let Ok(mut changes) = changes.lock() {
                                changes.at.insert(user, (false, clock_ms()));
                            }
                            tokio::time::sleep(Duration::from_millis(options.away_ms)).await;
                            let Ok(again) = Client::connect(config.clone()).await else { return };
                            if let Ok(mut changes) = changes.lock() {
                                changes.at.insert(user, (true, clock_ms()));
                            }
                            client = again;
                            connected_at = clock_ms();
                            if client.watch_presence(contacts.clone()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }));
        }
        // Churn at the rate asked, users in a rotating order.
        let interval = Duration::from_secs_f64(1.0 / options.churn_per_s.max(0.001));
        let mut next = 0usize;
        while started.elapsed() < duration {
            let _ = churn_senders[next % churn_senders.len()].try_send(());
            next += 1;
            tokio::time::sleep(interval).await;
        }
        // Let the last changes arrive, then stop everyone.
        tokio::time::sleep(Duration::from_millis(options.away_ms + options.grace_ms + 500)).await;
        drop(churn_senders);
        for watcher in watchers {
            let _ = watcher.await;
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let cpu = pid.and_then(process_cpu_seconds).zip(cpu_before).map(|(after, before)| after - before);
    let notifications = notifications.load(std::sync::atomic::Ordering::Relaxed);
    let histogram = latency.lock().map_err(|_| "latency lock poisoned".to_string())?;
    let report = PresenceReport {
        scenario: "presence",
        users: options.users,
        contacts: options.contacts,
        churn_per_s: options.churn_per_s,
        seconds,
        notifications,
        notifications_per_server_cpu_second: cpu.filter(|cpu| *cpu > 0.0).map(|cpu| notifications as f64 / cpu),
        server_cpu_us_per_notification: cpu.filter(|_| notifications > 0).map(|cpu| cpu * 1e6 / notifications as f64),
        latency_p50_ms: histogram.value_at_quantile(0.5) as f64,
        latency_p99_ms: histogram.value_at_quantile(0.99) as f64,
        latency_max_ms: histogram.max() as f64,
        server_rss_per_subscription_bytes: per_subscription,
        loadgen_cpu_seconds: own_cpu_seconds() - own_before,
    };
    println!("presence");
    println!("  users x contacts           {} x {}", report.users, report.contacts);
    println!("  notifications              {} in {:.1} s", report.notifications, report.seconds);
    if let Some(cpu) = report.server_cpu_us_per_notification {
        println!("  server CPU per notification {cpu:.1} us");
    }
    println!(
        "  latency p50 / p99 / max    {} / {} / {} ms",
        report.latency_p50_ms, report.latency_p99_ms, report.latency_max_ms
    );
    if let Some(bytes) = report.server_rss_per_subscription_bytes {
        println!("  server RSS per subscription {bytes:.0} B");
    }
    println!("  load generator CPU         {:.2} s", report.loadgen_cpu_seconds);
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
