//! Overload over real QUIC against irisd as a child process: rate limits
//! refuse a flooding sender explicitly while others are served.

mod common;

use common::{user_on_shard, Raw, Server};
use iris_client::{Client, ClientError};
use iris_protocol::frames::{self, Frame};
use iris_protocol::ErrorCode;
use std::time::Duration;

/// Sends `count` messages to `to_user` without waiting, then reads every
/// answer: (acknowledged, throttled with a retry_after_ms).
async fn flood(raw: &mut Raw, to_user: u64, first_id: u64, count: u64) -> (u64, u64) {
    for id in first_id..first_id + count {
        let send = frames::Send { client_msg_id: id, to_user, after: None, payload: vec![1; 100] };
        raw.write_frame(&Frame::Send(send)).await;
    }
    let (mut acked, mut throttled) = (0, 0);
    for _ in 0..count {
        match raw.read_frame().await {
            Some(Frame::Ack(_)) => acked += 1,
            Some(Frame::Error(error)) if error.code == ErrorCode::Throttle as u16 => {
                assert!(error.retry_after_ms > 0, "a throttled send must say when to retry: {error:?}");
                throttled += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    (acked, throttled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_sender_is_throttled_while_another_on_its_shard_is_not() {
    let (admin, admin_line) = common::admin_address();
    let server = Server::start_with(
        2,
        &[
            &admin_line,
            "[rate_limits]",
            "device_sends_per_s = 5",
            "device_sends_burst = 60",
            "pair_sends_per_s = 2",
            "pair_sends_burst = 30",
        ],
    );
    let (flooder, quiet) = (user_on_shard(0, 2, 100), user_on_shard(0, 2, 500));
    let recipient = user_on_shard(1, 2, 100);
    let other_recipient = user_on_shard(1, 2, recipient + 1);
    let mut inbox = Raw::connect(&server, 1).await;
    assert!(matches!(inbox.hello(&server.token(recipient, 1), 0).await, Frame::Welcome(_)));
    let mut other_inbox = Raw::connect(&server, 1).await;
    assert!(matches!(other_inbox.hello(&server.token(other_recipient, 1), 0).await, Frame::Welcome(_)));
    let mut flooding = Raw::connect(&server, 0).await;
    assert!(matches!(flooding.hello(&server.token(flooder, 1), 0).await, Frame::Welcome(_)));
    let mut quiet_sender = Raw::connect(&server, 0).await;
    assert!(matches!(quiet_sender.hello(&server.token(quiet, 1), 0).await, Frame::Welcome(_)));

    // To one user: the pair's burst of 30 passes (plus what refills while
    // the flood is read), the rest is refused with Throttle.
    let (acked, throttled) = flood(&mut flooding, recipient, 1, 200).await;
    assert_eq!(acked + throttled, 200);
    assert!((30..=40).contains(&acked), "{acked} of 200 acknowledged");
    // To another user: the device's own burst (60 in all) is what is left.
    let (acked_other, _) = flood(&mut flooding, other_recipient, 1_000, 100).await;
    assert!(acked + acked_other <= 70, "the device limit holds across recipients: {acked} + {acked_other}");
    // The other sender on the same shard, to the same user, is not throttled.
    let (quiet_acked, quiet_throttled) = flood(&mut quiet_sender, recipient, 1, 20).await;
    assert_eq!((quiet_acked, quiet_throttled), (20, 0));
    let metrics = common::http_get(&admin, "/metrics");
    let limited = common::metric_sum(&metrics, "iris_sends_rate_limited_total", "shard=\"0\"");
    assert!(limited >= 200, "{limited} rate-limited sends counted:\n{metrics}");
    let untracked = common::metric_sum(&metrics, "iris_rate_limit_untracked_total", "shard=\"0\"");
    assert_eq!(untracked, 0, "the tables are far from their bound");
    // Every accepted send's sojourn is in the histogram.
    let sojourns = common::metric_sum(&metrics, "iris_send_sojourn_seconds_count", "shard=\"0\"");
    assert!(sojourns >= acked + acked_other + 20, "{sojourns} sojourns:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_that_persists_reaches_the_application_with_its_code() {
    // One offline device whose mailbox holds one message: every later send
    // is refused with MailboxFull until it reads, which it never does.
    let (admin, admin_line) = common::admin_address();
    let server = Server::start_with(2, &[&admin_line, "[limits]", "mailbox_messages_max = 1"]);
    let (sender, recipient) = (user_on_shard(0, 2, 100), user_on_shard(1, 2, 100));
    Client::connect(server.client_config(recipient, 1)).await.unwrap().close().await.unwrap();
    let mut config = server.client_config(sender, 1);
    config.refusal_retry_for = Duration::from_millis(1500);
    let client = Client::connect(config).await.unwrap();
    client.send(recipient, b"fits".to_vec()).await.expect("the first message fits");
    match client.send(recipient, b"does not fit".to_vec()).await {
        Err(ClientError::Server { code: Some(iris_protocol::ErrorCode::MailboxFull), .. }) => {}
        other => panic!("expected the MailboxFull refusal, got {other:?}"),
    }
    // It was retried (MailboxFull says retry after 1 s) before giving up.
    let metrics = common::http_get(&admin, "/metrics");
    let refused = common::metric_sum(&metrics, "iris_send_refusals_total", "code=\"MailboxFull\"");
    assert!(refused >= 2, "refused {refused} times: retried before giving up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_is_disconnected_and_gets_everything_on_its_next_connection() {
    let (admin, admin_line) = common::admin_address();
    let server = Server::start_with(2, &[&admin_line, "[runtime]", "push_stall_timeout_ms = 500"]);
    let (sender, recipient) = (user_on_shard(0, 2, 100), user_on_shard(1, 2, 100));
    // Online, but never reads its push stream: once its QUIC windows are
    // full the server can push nothing more.
    let mut stuck = Raw::connect(&server, 1).await;
    assert!(matches!(stuck.hello(&server.token(recipient, 1), 0).await, Frame::Welcome(_)));
    let sending = Client::connect(server.client_config(sender, 1)).await.unwrap();
    const COUNT: usize = 300;
    let handle = sending.sender();
    let mut outcomes = Vec::new();
    for index in 0..COUNT {
        let mut payload = format!("{index}:").into_bytes();
        payload.resize(8 * 1024, b'.');
        outcomes.push(handle.send_nowait(recipient, payload).await.unwrap());
    }
    for outcome in outcomes {
        outcome.await.unwrap().expect("stored while the reader is stuck");
    }
    assert_eq!(stuck.closed_code().await, Some(u64::from(iris_protocol::close_code::SLOW_READER)));
    let metrics = common::http_get(&admin, "/metrics");
    assert_eq!(common::metric_sum(&metrics, "iris_slow_reader_disconnects_total", "shard=\"1\""), 1);
    // Everything waited in the mailbox.
    let mut reader = Client::connect(server.client_config(recipient, 1)).await.unwrap();
    for index in 0..COUNT {
        let message = tokio::time::timeout(Duration::from_secs(30), reader.recv()).await.unwrap().unwrap();
        assert!(message.payload.starts_with(format!("{index}:").as_bytes()), "message {index} out of order");
    }
    reader.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_gets_200000_messages_in_order_after_a_sigkill() {
    // Twenty times what the old in-memory cap (10,000) held, at the default
    // caps, from four pipelined senders on both shards. The body cache is
    // 256 KiB (about 25,000 of these bodies): the rest wait on disk only,
    // and are read back from the log when pushed after the restart.
    const SENDERS: u64 = 4;
    const PER_SENDER: u64 = 50_000;
    const CACHE: u64 = 256 << 10;
    let (admin, admin_line) = common::admin_address();
    let cache_line = format!("body_cache_bytes_max = {CACHE}");
    let mut server = Server::start_with(2, &[&admin_line, "[storage]", &cache_line, "read_ahead_bytes_max = 262144"]);
    let recipient = user_on_shard(1, 2, 100);
    Client::connect(server.client_config(recipient, 1)).await.unwrap().close().await.unwrap();
    let mut sending = Vec::new();
    for index in 0..SENDERS {
        let user = user_on_shard((index % 2) as u16, 2, 1_000 + 100 * index);
        let client = Client::connect(server.client_config(user, 1)).await.unwrap();
        sending.push(tokio::spawn(async move {
            let handle = client.sender();
            let mut window = std::collections::VecDeque::new();
            for number in 0..PER_SENDER {
                let payload = format!("{user}:{number}").into_bytes();
                window.push_back(handle.send_nowait(recipient, payload).await.unwrap());
                if window.len() >= 128 {
                    window.pop_front().unwrap().await.unwrap().expect("acknowledged");
                }
            }
            for outcome in window {
                outcome.await.unwrap().expect("acknowledged");
            }
            client.close().await.unwrap();
            user
        }));
    }
    let mut senders = Vec::new();
    for task in sending {
        senders.push(task.await.unwrap());
    }
    let metrics = common::http_get(&admin, "/metrics");
    assert!(common::metric_sum(&metrics, "iris_mailbox_body_bytes", "shard=\"1\"") <= CACHE);
    assert!(common::metric_sum(&metrics, "iris_mailbox_bodies_cooled_total", "shard=\"1\"") > 100_000);
    // Every one was acknowledged: each is durable, across a SIGKILL.
    server.kill9();
    server.restart();
    // Recovery keeps no more bodies in memory than the cache either.
    let metrics = common::http_get(&admin, "/metrics");
    assert!(common::metric_sum(&metrics, "iris_mailbox_body_bytes", "shard=\"1\"") <= CACHE);
    let mut reader = Client::connect(server.client_config(recipient, 1)).await.unwrap();
    let mut next: std::collections::HashMap<u64, u64> = senders.iter().map(|user| (*user, 0)).collect();
    for _ in 0..SENDERS * PER_SENDER {
        let message = tokio::time::timeout(Duration::from_secs(60), reader.recv()).await.unwrap().unwrap();
        let text = String::from_utf8(message.payload).unwrap();
        let (user, number) = text.split_once(':').unwrap();
        let (user, number): (u64, u64) = (user.parse().unwrap(), number.parse().unwrap());
        let expected = next.get_mut(&user).expect("a sender of this test");
        assert_eq!(number, *expected, "from {user}: lost, duplicated or reordered");
        *expected += 1;
    }
    assert!(next.values().all(|count| *count == PER_SENDER));
    let extra = tokio::time::timeout(Duration::from_millis(300), reader.recv()).await;
    assert!(extra.is_err(), "unexpected extra message {extra:?}");
    let metrics = common::http_get(&admin, "/metrics");
    let reads = common::metric_sum(&metrics, "iris_log_reads_total", "shard=\"1\"");
    assert!(reads > 100_000, "only {reads} bodies were read back from the log");
    assert_eq!(common::metric_sum(&metrics, "iris_log_unreadable_messages_total", "shard=\"1\""), 0);
    reader.close().await.unwrap();
}
