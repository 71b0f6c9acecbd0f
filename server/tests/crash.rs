//! Crash safety with real processes: clients keep sending while irisd is
//! SIGKILLed and restarted again and again; afterwards every acknowledged
//! message has reached every recipient device exactly once (after the SDK's
//! seq dedup), in order per sender. The seed of the kill schedule is printed;
//! IRIS_CRASH_SEED=<seed> repeats it.
//!
//! Segments are 1 MiB (the smallest allowed) and messages ~600 bytes, so
//! both shard logs rotate, checkpoint, reclaim and compact while the kills
//! land, and every restart begins a new segment from a recovered checkpoint.

mod common;

use common::{user_on_shard, Server};
use iris_client::Client;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SENDERS: usize = 4;
const MESSAGES_PER_SENDER: u64 = 5_000;
const DEVICES_PER_RECIPIENT: u32 = 2;
const KILLS: usize = 24;
const WINDOW: usize = 32;
/// Padding after the message's key, so the logs rotate under the kills.
const PADDING_BYTES: usize = 600;

/// Payloads one device received, in order.
type ReceivedLog = Arc<Mutex<Vec<String>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_repeated_sigkill() {
    let seed: u64 = std::env::var("IRIS_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(common::rand_u64);
    println!("crash test seed = {seed} (IRIS_CRASH_SEED={seed} repeats the kill schedule)");
    // The recipient-side dedup window (4,000 messages per shard, two seconds
    // of this load) covers every retry after a kill; delivered segments
    // older than it are reclaimed under the kills.
    let server = Server::start_with(
        2,
        &["[limits]", "stored_dedup_entries_max = 4000", "[storage]", "segment_bytes_max = 1048576"],
    );

    // Recipients on both shards, two devices each; senders on both shards.
    let recipients = [user_on_shard(0, 2, 100), user_on_shard(1, 2, 100)];
    let senders: Vec<u64> = (0..SENDERS).map(|i| user_on_shard((i % 2) as u16, 2, 1_000 + 100 * i as u64)).collect();

    let stop_receiving = Arc::new(AtomicBool::new(false));
    let mut received: Vec<(u64, u32, ReceivedLog)> = Vec::new();
    let mut receiver_tasks = Vec::new();
    for recipient in recipients {
        for device in 1..=DEVICES_PER_RECIPIENT {
            let mut client = Client::connect(server.client_config(recipient, device)).await.expect("receiver connects");
            let log = Arc::new(Mutex::new(Vec::new()));
            received.push((recipient, device, Arc::clone(&log)));
            let stop = Arc::clone(&stop_receiving);
            receiver_tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(200), client.recv()).await {
                        log.lock().unwrap().push(message_key(&message.payload));
                    }
                }
            }));
        }
    }
    // Let the registrations reach the log before the first kill.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let acked: Arc<Mutex<Vec<(u64, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut sender_tasks = Vec::new();
    for (index, sender) in senders.iter().enumerate() {
        let client = Client::connect(server.client_config(*sender, 1)).await.expect("sender connects");
        let acked = Arc::clone(&acked);
        sender_tasks.push(tokio::spawn(async move {
            let mut window = std::collections::VecDeque::new();
            let mut pace = tokio::time::interval(Duration::from_millis(2));
            for number in 0..MESSAGES_PER_SENDER {
                pace.tick().await;
                let to = recipients[(number as usize + index) % 2];
                let payload = format!("{index}:{number}");
                let padded = format!("{payload}|{}", "x".repeat(PADDING_BYTES));
                let outcome = client.send_nowait(to, padded.into_bytes()).await.expect("queue send");
                window.push_back((to, payload, outcome));
                if window.len() >= WINDOW {
                    let (to, payload, outcome) = window.pop_front().unwrap();
                    outcome.await.expect("outcome").expect("send eventually acknowledged");
                    acked.lock().unwrap().push((to, payload));
                }
            }
            for (to, payload, outcome) in window {
                outcome.await.expect("outcome").expect("send eventually acknowledged");
                acked.lock().unwrap().push((to, payload));
            }
            client.close().await.ok();
        }));
    }

    // Kill and restart at seeded random moments while the senders run.
    let killer = std::thread::spawn(move || {
        let mut server = server;
        let mut state = seed;
        for _ in 0..KILLS {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            std::thread::sleep(Duration::from_millis(150 + (state >> 33) % 350));
            server.kill9();
            server.restart();
        }
        server
    });
    for task in sender_tasks {
        task.await.expect("sender task");
    }
    let server = tokio::task::spawn_blocking(move || killer.join().expect("killer thread")).await.unwrap();
    for shard in 0..2 {
        let (files, newest) = segments_of(&server, shard);
        println!("shard {shard}: {files} segment file(s), newest segment {newest}");
        // ~6 MB of records per shard in 1 MiB segments (a start opens a new
        // segment only once it writes); reclaim removed the delivered ones
        // while the kills went on.
        assert!(newest >= 5, "shard {shard}: the log did not rotate under the kills ({newest})");
        // What stays: the segments holding the dedup window (4,000 messages
        // of ~700 B, about 3 MiB) and the current one.
        assert!(files <= 5 && (files as u64) < newest, "shard {shard}: delivered segments were not reclaimed");
    }

    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len() as u64, SENDERS as u64 * MESSAGES_PER_SENDER);
    // Wait until every device has everything that was acknowledged to its user.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let complete = received.iter().all(|(user, _, log)| {
            let log = log.lock().unwrap();
            let have: HashSet<&String> = log.iter().collect();
            acked.iter().filter(|(to, _)| to == user).all(|(_, payload)| have.contains(payload))
        });
        if complete {
            break;
        }
        assert!(Instant::now() < deadline, "acknowledged messages missing after 120 s (seed {seed})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_receiving.store(true, Ordering::Relaxed);
    for task in receiver_tasks {
        task.await.unwrap();
    }

    for (user, device, log) in &received {
        let log = log.lock().unwrap();
        let mut seen = HashSet::new();
        let mut last_by_sender: HashMap<&str, u64> = HashMap::new();
        for payload in log.iter() {
            assert!(seen.insert(payload), "user {user} device {device} got {payload} twice (seed {seed})");
            let (sender, number) = payload.split_once(':').unwrap();
            let number: u64 = number.parse().unwrap();
            if let Some(previous) = last_by_sender.insert(sender, number) {
                assert!(
                    number > previous,
                    "user {user} device {device}: {sender}:{number} after {previous} (seed {seed})"
                );
            }
        }
        let expected = acked.iter().filter(|(to, _)| to == user).count();
        assert_eq!(seen.len(), expected, "user {user} device {device}: unexpected extra messages (seed {seed})");
    }
    drop(server);
}

/// The key `sender:number` of a padded payload.
fn message_key(payload: &[u8]) -> String {
    let text = String::from_utf8(payload.to_vec()).unwrap();
    text.split('|').next().unwrap().to_string()
}

/// Segment files in a shard's log directory, and the newest segment number.
fn segments_of(server: &Server, shard: u16) -> (usize, u64) {
    let dir = server.data_dir.path().join(format!("shard-{shard}"));
    let numbers: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok()
        })
        .collect();
    (numbers.len(), numbers.iter().copied().max().unwrap_or(0))
}
