//! Crash safety with real processes: clients keep sending while irisd is
//! SIGKILLed and restarted again and again; afterwards every acknowledged
//! message has reached every recipient device exactly once (after the SDK's
//! seq dedup), in order per sender. The seed of the kill schedule is printed;
//! IRIS_CRASH_SEED=<seed> repeats it.
//!
//! Segments are 1 MiB (the smallest allowed) and messages ~600 bytes, so
//! both shard logs rotate, checkpoint, reclaim and compact while the kills
//! land, and every restart begins a new segment from a recovered checkpoint;
//! the test reads the compaction counters before every kill and asserts
//! that compactions completed.
//!
//! A raw-frame sender (the straggler) retries late: some of its sends go
//! again only after 16 later ones (as if their Ack had been lost), and a
//! send whose connection the kill cut goes again equally late. Its
//! sender-side dedup window holds 8 ids and is empty after every restart,
//! so only the recipient shard's stored-message window, recovered from the
//! log, can tell these retries from new messages; a retry of a stored
//! message must get its original server_msg_id and reach no one twice.

mod common;

use common::{metric_sum, user_on_shard, Raw, Server};
use iris_client::Client;
use iris_protocol::frames::{self, Frame};
use iris_protocol::ErrorCode;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SENDERS: usize = 4;
const MESSAGES_PER_SENDER: u64 = 5_000;
const DEVICES_PER_RECIPIENT: u32 = 2;
const KILLS: usize = 30;
const WINDOW: usize = 32;
/// Padding after the message's key, so the logs rotate under the kills.
const PADDING_BYTES: usize = 600;
/// The straggler's messages; every STRAGGLE_EVERY-th is sent again as if
/// its Ack had been lost, after STRAGGLE_DELAY later messages.
const STRAGGLER_MESSAGES: u64 = 1_200;
const STRAGGLE_EVERY: u64 = 5;
const STRAGGLE_DELAY: u64 = 16;
/// How long a client waits for an answer on a silent connection.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// The straggler's label in payloads (`s:number`).
const STRAGGLER: &str = "s";

/// Payloads one device received, in order.
type ReceivedLog = Arc<Mutex<Vec<String>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_repeated_sigkill() {
    let seed: u64 = std::env::var("IRIS_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(common::rand_u64);
    println!("crash test seed = {seed} (IRIS_CRASH_SEED={seed} repeats the kill schedule)");
    // The recipient-side dedup window (4,000 messages per shard, two seconds
    // of this load) covers every retry after a kill; delivered segments
    // older than it are reclaimed under the kills.
    // The sender-side windows hold 8 acknowledged ids per device, fewer
    // than the straggler's retry delay.
    let (admin, admin_line) = common::admin_address();
    let server = Server::start_with(
        2,
        &[
            &admin_line,
            "[limits]",
            "stored_dedup_entries_max = 4000",
            "dedup_entries_per_device_max = 8",
            "[storage]",
            "segment_bytes_max = 1048576",
        ],
    );

    // Recipients on both shards, two devices each; senders on both shards.
    // Two more users, one per shard, whose device is offline until the
    // kills are over: their few messages stay live in segments that are
    // otherwise delivered, so compaction copies them forward under the kills.
    let recipients = [user_on_shard(0, 2, 100), user_on_shard(1, 2, 100)];
    let offline = [user_on_shard(0, 2, 300), user_on_shard(1, 2, 300)];
    let senders: Vec<u64> = (0..SENDERS).map(|i| user_on_shard((i % 2) as u16, 2, 1_000 + 100 * i as u64)).collect();

    let stop_receiving = Arc::new(AtomicBool::new(false));
    let mut received: Vec<(u64, u32, ReceivedLog)> = Vec::new();
    let mut receiver_tasks = Vec::new();
    for recipient in recipients {
        for device in 1..=DEVICES_PER_RECIPIENT {
            let client = Client::connect(client_config(&server, recipient, device)).await.expect("receiver connects");
            let log = Arc::new(Mutex::new(Vec::new()));
            received.push((recipient, device, Arc::clone(&log)));
            receiver_tasks.push(tokio::spawn(receive(client, log, Arc::clone(&stop_receiving))));
        }
    }
    for user in offline {
        // Registered, then away.
        let client = Client::connect(client_config(&server, user, 1)).await.expect("offline device registers");
        client.close().await.ok();
    }
    // Let the registrations reach the log before the first kill.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let acked: Arc<Mutex<Vec<(u64, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut sender_tasks = Vec::new();
    for (index, sender) in senders.iter().enumerate() {
        let client = Client::connect(client_config(&server, *sender, 1)).await.expect("sender connects");
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

    let straggler_user = user_on_shard(0, 2, 5_000);
    let straggler = tokio::spawn(straggle(
        server.address(0),
        server.ca(),
        server.token(straggler_user, 1),
        [recipients[0], recipients[1], offline[0], offline[1]],
        Arc::clone(&acked),
    ));

    // Kill and restart at seeded random moments under load: each run is
    // killed once it has stored a random 100..1,500 messages (a fixed
    // delay would often kill a server the clients have not found again
    // yet: their QUIC probes back off while it is down). The compaction
    // counters of each run are read just before its kill.
    let sending = Arc::new(AtomicBool::new(true));
    let killer_sending = Arc::clone(&sending);
    let killer = std::thread::spawn(move || {
        let sending = killer_sending;
        let mut server = server;
        let mut state = seed;
        let (mut kills, mut compactions, mut moved) = (0, 0, 0);
        while kills < KILLS && sending.load(Ordering::Relaxed) {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let stored_before_kill = 100 + (state >> 33) % 1_400;
            let mut last = None;
            let give_up = Instant::now() + Duration::from_secs(20);
            while sending.load(Ordering::Relaxed) && Instant::now() < give_up {
                if let Some(metrics) = scrape(&admin) {
                    let stored = metric_sum(&metrics, "iris_messages_stored_total", "shard=");
                    last = Some(metrics);
                    if stored >= stored_before_kill {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if !sending.load(Ordering::Relaxed) {
                break;
            }
            if let Some(metrics) = last {
                compactions += metric_sum(&metrics, "iris_log_compactions_total", "shard=");
                moved += metric_sum(&metrics, "iris_log_compacted_messages_total", "shard=");
            }
            server.kill9();
            server.restart();
            kills += 1;
        }
        (server, kills, compactions, moved)
    });
    for task in sender_tasks {
        task.await.expect("sender task");
    }
    let (replays, replays_after_restart, lost) = straggler.await.expect("straggler task");
    sending.store(false, Ordering::Relaxed);
    println!(
        "straggler: {replays} late retries of acknowledged sends ({replays_after_restart} across a kill), \
         {lost} sends cut by a kill and retried late"
    );
    // Both kinds of late retry happened, and some were answered from the
    // window a recovery rebuilt.
    assert!(replays_after_restart > 0 && lost > 0, "no late retry met a restarted server");
    let (server, kills, compactions, moved) =
        tokio::task::spawn_blocking(move || killer.join().expect("killer thread")).await.unwrap();
    println!("{kills} kills under load; compactions before them: {compactions}, moving {moved} mailbox entries");
    assert!(kills >= KILLS / 2, "only {kills} kills landed while the clients sent");
    assert!(compactions > 0, "no compaction completed under the kills");

    // The offline devices come back and take what was kept for them.
    for user in offline {
        let client = Client::connect(client_config(&server, user, 1)).await.expect("offline device reconnects");
        let log = Arc::new(Mutex::new(Vec::new()));
        received.push((user, 1, Arc::clone(&log)));
        receiver_tasks.push(tokio::spawn(receive(client, log, Arc::clone(&stop_receiving))));
    }

    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len() as u64, SENDERS as u64 * MESSAGES_PER_SENDER + STRAGGLER_MESSAGES);
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
    // Once every device has its messages, reclaim and compaction catch up
    // (during the kills they lag: compaction copies one segment at a time
    // while the writer is idle).
    for shard in 0..2 {
        let settle = Instant::now() + Duration::from_secs(30);
        let (files, newest) = loop {
            let (files, newest) = segments_of(&server, shard);
            if 2 * files as u64 <= newest + 4 || Instant::now() > settle {
                break (files, newest);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        println!("shard {shard}: {files} segment file(s), newest segment {newest}");
        // ~7 MB of records per shard in 1 MiB segments.
        assert!(newest >= 5, "shard {shard}: the log did not rotate under the kills ({newest})");
        // What stays: the segments holding the dedup window (the last 4,000
        // messages of ~700 B, about 3 MiB, spread over the short segments of
        // the last runs: every start opens a new one), the current one and
        // the spare; about half of all segments are gone (two segments of
        // slack: how many short segments the window spans depends on where
        // the last kills fell; a log that reclaimed nothing keeps them all).
        assert!(
            2 * files as u64 <= newest + 4,
            "shard {shard}: delivered segments were not reclaimed ({files} of {newest})"
        );
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
            if sender == STRAGGLER {
                // Its late retries opt out of the order rule (`after: None`).
                continue;
            }
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

/// An SDK configuration that gives a silent connection up after 1 s (the
/// default 10 s would have the clients wait out most runs of the server).
fn client_config(server: &Server, user: u64, device: u32) -> iris_client::ClientConfig {
    let mut config = server.client_config(user, device);
    config.answer_timeout = ANSWER_TIMEOUT;
    config
}

/// Records the key of every message `client` receives until `stop`.
async fn receive(mut client: Client, log: ReceivedLog, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(200), client.recv()).await {
            log.lock().unwrap().push(message_key(&message.payload));
        }
    }
}

/// The straggler: one raw connection (reopened after each kill) sending
/// STRAGGLER_MESSAGES one at a time, to each of `recipients` in turn, with `after:
/// None`. Every STRAGGLE_EVERY-th acknowledged send is sent again
/// STRAGGLE_DELAY messages later and must get the same server_msg_id; a send
/// whose answer a kill cut off goes again equally late, until acknowledged.
/// Returns (late retries of acknowledged sends, those of them answered by a
/// later session than their Ack, sends cut by a kill).
async fn straggle(
    address: String,
    ca: std::path::PathBuf,
    token: String,
    recipients: [u64; 4],
    acked: Arc<Mutex<Vec<(u64, String)>>>,
) -> (u64, u64, u64) {
    // (due once this many messages were sent, id, recipient, server_msg_id if acknowledged)
    let mut late: std::collections::VecDeque<(u64, u64, u64, Option<u64>)> = std::collections::VecDeque::new();
    // When each send was acknowledged, and on which session of the straggler.
    let mut acked_at: HashMap<u64, (Instant, u64)> = HashMap::new();
    let mut connection: Option<Raw> = None;
    let mut sessions = 0;
    let (mut replays, mut replays_after_restart, mut lost) = (0, 0, 0);
    let mut number = 0;
    while number < STRAGGLER_MESSAGES || !late.is_empty() {
        let (id, to, original) = match late.front() {
            Some(&(due, id, to, original)) if due <= number || number == STRAGGLER_MESSAGES => {
                late.pop_front();
                (id, to, original)
            }
            _ => {
                number += 1;
                (number, recipients[(number % 4) as usize], None)
            }
        };
        let payload = format!("{STRAGGLER}:{id}|{}", "x".repeat(PADDING_BYTES)).into_bytes();
        match straggler_send(&mut connection, &mut sessions, &address, &ca, &token, id, to, payload).await {
            Some(server_msg_id) => match original {
                Some(original) => {
                    let (at, session) = acked_at[&id];
                    let since = at.elapsed();
                    assert_eq!(
                        server_msg_id, original,
                        "a late retry of s:{id}, {since:?} after its Ack, was stored again"
                    );
                    replays += 1;
                    // Answered by a later session: across a kill (the straggler
                    // reconnects only when one cuts its connection).
                    replays_after_restart += u64::from(session != sessions);
                }
                None => {
                    acked.lock().unwrap().push((to, format!("{STRAGGLER}:{id}")));
                    acked_at.insert(id, (Instant::now(), sessions));
                    if id % STRAGGLE_EVERY == 0 {
                        late.push_back((number + STRAGGLE_DELAY, id, to, Some(server_msg_id)));
                    }
                }
            },
            None => {
                // The kill cut the answer off: stored or not, unknown.
                lost += 1;
                connection = None;
                late.push_back((number + STRAGGLE_DELAY, id, to, original));
            }
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    (replays, replays_after_restart, lost)
}

/// One attempt of the straggler's send `id`: its server_msg_id, or `None`
/// if the connection was lost before the answer. Throttle is waited out on
/// the same connection.
#[allow(clippy::too_many_arguments)]
async fn straggler_send(
    connection: &mut Option<Raw>,
    sessions: &mut u64,
    address: &str,
    ca: &std::path::Path,
    token: &str,
    id: u64,
    to: u64,
    payload: Vec<u8>,
) -> Option<u64> {
    loop {
        while connection.is_none() {
            *connection = straggler_connect(address, ca, token).await;
            *sessions += u64::from(connection.is_some());
            if connection.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let raw = connection.as_mut().unwrap();
        let send = frames::Send { client_msg_id: id, to_user: to, after: None, payload: payload.clone() };
        if !raw.try_write_frame(&Frame::Send(send)).await {
            return None;
        }
        loop {
            match raw.try_read_frame(ANSWER_TIMEOUT).await? {
                Frame::Ack(ack) if ack.client_msg_id == id => return Some(ack.server_msg_id),
                Frame::Error(error) if error.client_msg_id == Some(id) => {
                    assert_eq!(error.code, ErrorCode::Throttle as u16, "s:{id} refused: {error:?}");
                    tokio::time::sleep(Duration::from_millis(u64::from(error.retry_after_ms.max(5)))).await;
                    break;
                }
                _ => {}
            }
        }
    }
}

/// A session of the straggler, or `None` while the server is down.
async fn straggler_connect(address: &str, ca: &std::path::Path, token: &str) -> Option<Raw> {
    let mut raw = Raw::try_connect(address, ca, Duration::from_secs(1)).await?;
    let hello = frames::Hello { token: token.into(), resume_after_seq: 0 };
    if !raw.try_write_frame(&Frame::Hello(hello)).await {
        return None;
    }
    match raw.try_read_frame(Duration::from_secs(2)).await? {
        Frame::Welcome(_) => Some(raw),
        _ => None,
    }
}

/// The admin endpoint's metrics, or `None` while the server is starting.
fn scrape(admin: &str) -> Option<String> {
    common::try_http_get(admin, "/metrics").ok().filter(|text| text.contains("iris_log_compactions_total{"))
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
