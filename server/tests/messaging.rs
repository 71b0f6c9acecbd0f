//! End-to-end message path over real QUIC on loopback, irisd as a child process.

mod common;

use common::{user_on_shard, Raw, Server};
use iris_client::{Client, ClientSender};
use iris_protocol::frames::{self, Frame};
use std::time::Duration;

async fn send_many(client: &ClientSender, to_user: u64, count: u64, tag: &str) -> Vec<u64> {
    let mut outcomes = Vec::new();
    for index in 0..count {
        let payload = format!("{tag}:{index}").into_bytes();
        outcomes.push(client.send_nowait(to_user, payload).await.expect("queue send"));
    }
    let mut server_ids = Vec::new();
    for outcome in outcomes {
        server_ids.push(outcome.await.expect("outcome").expect("acked").server_msg_id);
    }
    server_ids
}

async fn receive_in_order(client: &mut Client, count: u64, tag: &str) {
    let mut last_seq = 0;
    for expected in 0..count {
        let message = tokio::time::timeout(Duration::from_secs(30), client.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for message {expected} of {tag}"))
            .expect("session ended");
        assert!(message.seq > last_seq, "seq went from {last_seq} to {}", message.seq);
        last_seq = message.seq;
        assert_eq!(
            String::from_utf8(message.payload).unwrap(),
            format!("{tag}:{expected}"),
            "lost, duplicated or reordered"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_on_different_shards_exchange_10000_messages_each_way() {
    let server = Server::start(2);
    let alice = user_on_shard(0, 2, 1000);
    let bob = user_on_shard(1, 2, 1000);
    let mut alice_client = Client::connect(server.client_config(alice, 1)).await.unwrap();
    let mut bob_client = Client::connect(server.client_config(bob, 1)).await.unwrap();
    assert_eq!(alice_client.session_info().shard, 0);
    assert_eq!(bob_client.session_info().shard, 1, "client should have followed the redirect to shard 1");

    const COUNT: u64 = 10_000;
    let (alice_sender, bob_sender) = (alice_client.sender(), bob_client.sender());
    let (alice_ids, bob_ids, (), ()) = tokio::join!(
        send_many(&alice_sender, bob, COUNT, "a"),
        send_many(&bob_sender, alice, COUNT, "b"),
        async { receive_in_order(&mut bob_client, COUNT, "a").await },
        async { receive_in_order(&mut alice_client, COUNT, "b").await },
    );
    let mut all: Vec<u64> = alice_ids.into_iter().chain(bob_ids).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len() as u64, 2 * COUNT, "server_msg_ids must be unique");
    // Nothing more arrives: no duplicates after the last expected message.
    let extra = tokio::time::timeout(Duration::from_millis(300), bob_client.recv()).await;
    assert!(extra.is_err(), "unexpected extra message {extra:?}");
    alice_client.close().await.unwrap();
    bob_client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_refused_and_retried_reach_a_slow_reader_in_order_exactly_once() {
    // The reader's mailbox holds 64 KiB; every third message is 24 KiB, so a
    // large one is refused (MailboxFull) while the small ones pipelined
    // behind it would still fit. Before the ordering rule they were stored
    // ahead of it; now they are refused with OutOfOrder and retried behind it.
    let (admin, admin_line) = common::admin_address();
    let server = Server::start_with(2, &[&admin_line, "[limits]", "mailbox_bytes_max = 65536"]);
    let sender = user_on_shard(0, 2, 3000);
    let receiver = user_on_shard(1, 2, 3000);
    let mut reading = Client::connect(server.client_config(receiver, 1)).await.unwrap();
    let sending = Client::connect(server.client_config(sender, 1)).await.unwrap();
    const COUNT: usize = 60;
    let payload = |index: usize| {
        let mut payload = format!("paced:{index}:").into_bytes();
        payload.resize(if index % 3 == 0 { 24 * 1024 } else { 100 }, b'.');
        payload
    };
    let handle = sending.sender();
    let sends = async {
        let mut outcomes = Vec::new();
        for index in 0..COUNT {
            outcomes.push(handle.send_nowait(receiver, payload(index)).await.expect("queue send"));
        }
        for outcome in outcomes {
            outcome.await.expect("outcome").expect("acked");
        }
    };
    let slow_reader = async {
        for expected in 0..COUNT {
            let message = tokio::time::timeout(Duration::from_secs(60), reading.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for message {expected}"))
                .expect("session ended");
            let got = String::from_utf8_lossy(&message.payload[..message.payload.len().min(16)]).into_owned();
            assert!(message.payload == payload(expected), "expected message {expected}, got {got}…: reordered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::join!(sends, slow_reader);
    let extra = tokio::time::timeout(Duration::from_millis(300), reading.recv()).await;
    assert!(extra.is_err(), "unexpected extra message {extra:?}");
    let metrics = common::http_get(&admin, "/metrics");
    let full = common::metric_sum(&metrics, "iris_send_refusals_total", "code=\"MailboxFull\"");
    assert!(full > 0, "the test must make the server refuse sends:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_receives_everything_on_reconnect() {
    let server = Server::start(2);
    let sender = user_on_shard(0, 2, 2000);
    let receiver = user_on_shard(1, 2, 2000);
    // Register the receiver's device, acknowledge nothing, go offline.
    let first = Client::connect(server.client_config(receiver, 7)).await.unwrap();
    first.close().await.unwrap();

    let sending = Client::connect(server.client_config(sender, 1)).await.unwrap();
    send_many(&sending.sender(), receiver, 500, "offline").await;

    let mut back = Client::connect(server.client_config(receiver, 7)).await.unwrap();
    receive_in_order(&mut back, 300, "offline").await;
    let processed = back.processed_seq();
    back.close().await.unwrap();

    // Resume after what was processed: the remaining 200 arrive, none of the first 300.
    let mut config = server.client_config(receiver, 7);
    config.resume_after_seq = processed;
    let mut resumed = Client::connect(config).await.unwrap();
    let next = resumed.recv().await.unwrap();
    assert_eq!(next.seq, processed + 1);
    assert_eq!(String::from_utf8(next.payload).unwrap(), "offline:300");
    for index in 301..500 {
        let message = resumed.recv().await.unwrap();
        assert_eq!(String::from_utf8(message.payload).unwrap(), format!("offline:{index}"));
    }
    // The SDK reconnect path (connection dropped mid-session) also resumes without loss.
    send_many(&sending.sender(), receiver, 50, "again").await;
    resumed.reconnect().await.unwrap();
    receive_in_order(&mut resumed, 50, "again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_reaches_every_device_of_the_recipient() {
    let server = Server::start(2);
    let sender = user_on_shard(1, 2, 3000);
    let receiver = user_on_shard(0, 2, 3000);
    let mut devices = Vec::new();
    for device in 1..=3 {
        devices.push(Client::connect(server.client_config(receiver, device)).await.unwrap());
    }
    let sending = Client::connect(server.client_config(sender, 1)).await.unwrap();
    send_many(&sending.sender(), receiver, 100, "multi").await;
    for device in &mut devices {
        receive_in_order(device, 100, "multi").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_client_msg_id_is_stored_and_delivered_once() {
    let server = Server::start(2);
    let sender = user_on_shard(0, 2, 4000);
    let receiver = user_on_shard(1, 2, 4000);
    let mut receiving = Raw::connect(&server, 1).await;
    assert!(matches!(receiving.hello(&server.token(receiver, 1), 0).await, Frame::Welcome(_)));

    let mut sending = Raw::connect(&server, 0).await;
    assert!(matches!(sending.hello(&server.token(sender, 1), 0).await, Frame::Welcome(_)));
    let send =
        Frame::Send(frames::Send { client_msg_id: 77, to_user: receiver, after: None, payload: b"once".to_vec() });
    sending.write_frame(&send).await;
    let Some(Frame::Ack(first)) = sending.read_frame().await else { panic!("expected Ack") };
    // Same id again, on the same connection and after a reconnect.
    sending.write_frame(&send).await;
    let Some(Frame::Ack(second)) = sending.read_frame().await else { panic!("expected Ack") };
    assert_eq!(first, second, "a retry gets the original ack");
    drop(sending);
    let mut again = Raw::connect(&server, 0).await;
    assert!(matches!(again.hello(&server.token(sender, 1), 0).await, Frame::Welcome(_)));
    again.write_frame(&send).await;
    let Some(Frame::Ack(third)) = again.read_frame().await else { panic!("expected Ack") };
    assert_eq!(first, third);
    // A new id goes through as a new message.
    let next =
        Frame::Send(frames::Send { client_msg_id: 78, to_user: receiver, after: None, payload: b"twice".to_vec() });
    again.write_frame(&next).await;
    assert!(matches!(again.read_frame().await, Some(Frame::Ack(_))));

    let one = receiving.read_push(Duration::from_secs(5)).await.expect("first delivery");
    assert_eq!((one.seq, one.payload.as_slice(), one.server_msg_id), (1, &b"once"[..], first.server_msg_id));
    let two = receiving.read_push(Duration::from_secs(5)).await.expect("second delivery");
    assert_eq!((two.seq, two.payload.as_slice()), (2, &b"twice"[..]));
    assert!(receiving.read_push(Duration::from_millis(300)).await.is_none(), "duplicate delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_on_the_wrong_shard_is_redirected_and_the_shard_map_agrees() {
    let server = Server::start(2);
    let user = user_on_shard(1, 2, 5000);
    let mut raw = Raw::connect(&server, 0).await;
    raw.write_frame(&Frame::ShardMapRequest(frames::ShardMapRequest {})).await;
    let Some(Frame::ShardMap(map)) = raw.read_frame().await else { panic!("expected ShardMap") };
    assert_eq!(map.slots.len(), iris_shard_map::SLOT_COUNT as usize);
    assert_eq!(map.nodes[0].shard_ports, vec![server.base_port, server.base_port + 1]);
    let slot = iris_shard_map::slot_for_user(iris_shard_map::UserId(user));
    assert_eq!(map.slots[slot.0 as usize].shard, 1);

    match raw.hello(&server.token(user, 1), 0).await {
        Frame::Redirect(redirect) => {
            assert_eq!(redirect.port, server.base_port + 1);
            assert_eq!(redirect.address, "127.0.0.1");
            assert_eq!(redirect.epoch, map.epoch);
        }
        other => panic!("expected Redirect, got {other:?}"),
    }
    assert_eq!(raw.closed_code().await, Some(u64::from(iris_protocol::close_code::REDIRECTED)));
    let mut home = Raw::connect(&server, 1).await;
    assert!(matches!(home.hello(&server.token(user, 1), 0).await, Frame::Welcome(w) if w.shard == 1));
}

/// A second connection of the same device replaces the first. The SDK of the
/// first learns why from every later call (the error that ended its session,
/// not a bare "session ended"), and does not reconnect to fight the newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_sdk_session_says_why_and_stays_down() {
    let server = Server::start(1);
    let (device, friend, sender) = (5, 7, 8);
    Client::connect(server.client_config(friend, 1)).await.unwrap().close().await.unwrap();
    let first = Client::connect(server.client_config(device, 1)).await.unwrap();
    let mut second = Client::connect(server.client_config(device, 1)).await.unwrap();
    let mut error = None;
    for _ in 0..50 {
        match first.send(friend, b"from the old session".to_vec()).await {
            Err(refused) => {
                error = Some(refused);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let error = error.expect("the replaced session ends");
    assert_eq!(error.code(), Some(iris_protocol::ErrorCode::SessionReplaced), "{error}");
    // Asked again, it says the same.
    let again = first.send(friend, b"again".to_vec()).await.unwrap_err();
    assert_eq!(again.code(), Some(iris_protocol::ErrorCode::SessionReplaced), "{again}");
    // The newer session was not displaced by a reconnect of the older.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = Client::connect(server.client_config(sender, 1)).await.unwrap();
    other.send(device, b"to the new session".to_vec()).await.unwrap();
    let delivered = tokio::time::timeout(Duration::from_secs(5), second.recv()).await.unwrap().unwrap();
    assert_eq!(delivered.payload, b"to the new session");
}

/// The push stream is read with the protocol's ceiling, not the client's
/// own frame limit: a server configured for larger frames delivers a
/// message larger than the recipient would ever send, and the messages
/// after it still arrive. A sender is held to its own limit, with a typed
/// error before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliver_larger_than_the_clients_own_frame_limit_still_arrives() {
    let server = Server::start_with(2, &["[limits]", "frame_bytes_max = 262144"]);
    let sender = user_on_shard(0, 2, 5000);
    let receiver = user_on_shard(1, 2, 5000);
    let mut receiving = Client::connect(server.client_config(receiver, 1)).await.unwrap();
    let default_limit = iris_protocol::FRAME_BYTES_MAX_DEFAULT;
    let big = vec![7u8; 200_000];
    assert!(big.len() > default_limit as usize, "the receiver's own frames could not hold it");

    let small_sender = Client::connect(server.client_config(sender, 1)).await.unwrap();
    match small_sender.send(receiver, big.clone()).await {
        Err(iris_client::ClientError::PayloadTooLarge { bytes, limit }) => {
            assert_eq!((bytes, limit), (big.len(), iris_protocol::payload_bytes_max(default_limit)));
        }
        other => panic!("a payload over the sender's own limit: {other:?}"),
    }
    small_sender.close().await.unwrap();

    let mut config = server.client_config(sender, 2);
    config.frame_bytes_max = 262_144;
    let large_sender = Client::connect(config).await.unwrap();
    large_sender.send(receiver, big.clone()).await.unwrap();
    large_sender.send(receiver, b"after the big one".to_vec()).await.unwrap();
    large_sender.close().await.unwrap();

    let first = tokio::time::timeout(Duration::from_secs(10), receiving.recv()).await.unwrap().unwrap();
    assert_eq!(first.payload, big);
    let second = tokio::time::timeout(Duration::from_secs(10), receiving.recv()).await.unwrap().unwrap();
    assert_eq!(second.payload, b"after the big one");
    assert_eq!(second.seq, first.seq + 1);
}
