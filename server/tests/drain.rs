//! Graceful drain: SIGTERM during a load run. irisd tells every client to
//! reconnect (close code SHUTTING_DOWN) after answering its Sends in flight,
//! syncs its logs and exits 0; after a restart the SDK clients reconnect on
//! their own and nothing acknowledged is lost or delivered twice.

mod common;

use common::{user_on_shard, Raw, Server};
use iris_client::Client;
use iris_protocol::close_code;
use iris_protocol::frames::Frame;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Sends SIGTERM to the server and waits (at most `wait`) for it to exit.
fn terminate(server: &mut Server, wait: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    // SAFETY: kill(2) on the child's pid, which this test owns and has not reaped.
    let result = unsafe { libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(result, 0, "kill(SIGTERM)");
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return (status, started.elapsed());
        }
        assert!(started.elapsed() < wait, "irisd did not exit within {wait:?} of SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_load_run_drains_loses_nothing_and_clients_reconnect() {
    let (admin, admin_line) = common::admin_address();
    let mut server = Server::start_with(2, &[admin_line.as_str()]);
    // The sender on shard 0, the recipient on shard 1: Sends in flight
    // cross shards when the drain starts.
    let (sender, recipient, watcher) = (user_on_shard(0, 2, 10), user_on_shard(1, 2, 20), user_on_shard(1, 2, 30));
    let mut receiver = Client::connect(server.client_config(recipient, 1)).await.unwrap();
    let mut raw = Raw::connect(&server, 1).await;
    assert!(matches!(raw.hello(&server.token(watcher, 1), 0).await, Frame::Welcome(_)));

    const COUNT: usize = 600;
    let client = Client::connect(server.client_config(sender, 1)).await.unwrap();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sending = {
        let acked = std::sync::Arc::clone(&acked);
        tokio::spawn(async move {
            let mut window = VecDeque::new();
            for index in 0..COUNT {
                window.push_back(client.send_nowait(recipient, format!("m{index}").into_bytes()).await.unwrap());
                while window.len() >= 16 {
                    window.pop_front().unwrap().await.unwrap().expect("every send is acknowledged in the end");
                    acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            for ack in window {
                ack.await.unwrap().expect("every send is acknowledged in the end");
                acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            client
        })
    };
    while acked.load(std::sync::atomic::Ordering::Relaxed) < 150 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, took) = terminate(&mut server, Duration::from_secs(15));
    assert!(status.success(), "a drained irisd exits 0: {status:?}");
    eprintln!("drained and exited {took:?} after SIGTERM");
    assert!(
        server.printed_within("irisd: drained in", Duration::from_secs(5)),
        "the drain did not settle: {:?}",
        server.stdout.lock().unwrap()
    );
    // Every client was told why: reconnect.
    assert_eq!(raw.closed_code().await, Some(u64::from(close_code::SHUTTING_DOWN)));

    server.restart();
    let client = tokio::time::timeout(Duration::from_secs(60), sending).await.expect("the sends finish").unwrap();
    let mut received = Vec::new();
    while received.len() < COUNT {
        let message = tokio::time::timeout(Duration::from_secs(30), receiver.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {COUNT} messages arrived", received.len()))
            .expect("the receiver keeps its session");
        received.push(String::from_utf8(message.payload).unwrap());
    }
    let expected: Vec<String> = (0..COUNT).map(|index| format!("m{index}")).collect();
    assert_eq!(received, expected, "every message once, in the sender's order");
    // Nothing more: no message was stored twice.
    assert!(tokio::time::timeout(Duration::from_millis(500), receiver.recv()).await.is_err());
    // And none was sent twice: every Send the drained server took was
    // answered before its connection closed, so after the restart no retry
    // of a stored message reached the dedup (a drain that closed at once
    // would pass the checks above through the retries and dedup alone).
    let exposition = common::http_get(&admin, "/metrics");
    assert_eq!(common::metric_sum(&exposition, "iris_duplicates_total", "shard="), 0, "retries of answered sends");
    assert!(client.session_info().connections >= 2, "the sender reconnected on its own");
    assert!(receiver.session_info().connections >= 2, "the receiver reconnected on its own");
    client.close().await.unwrap();
    receiver.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_server_settles_its_drain() {
    let mut server = Server::start(2);
    let (status, _) = terminate(&mut server, Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    assert!(
        server.printed_within("irisd: drained in", Duration::from_secs(5)),
        "the drain did not settle: {:?}",
        server.stdout.lock().unwrap()
    );
}
