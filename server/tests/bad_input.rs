//! Hostile and mistaken input over real QUIC: each case gets a typed Error
//! frame and a closed connection (or a refused request), and the server goes
//! on serving everyone else.

mod common;

use common::{now_s, user_on_shard, Raw, Server};
use iris_client::Client;
use iris_protocol::frames::{self, Frame};
use iris_protocol::{close_code, ErrorCode};
use irisd::auth::Claims;
use std::time::Duration;

fn error_code(frame: Option<Frame>) -> ErrorCode {
    match frame {
        Some(Frame::Error(error)) => ErrorCode::from_u16(error.code).expect("known code"),
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

/// After each bad input the server must still carry a normal message.
async fn assert_still_serving(server: &mut Server) {
    server.assert_running();
    let sender = user_on_shard(0, 2, 9000);
    let receiver = user_on_shard(1, 2, 9000);
    let mut receiving = Client::connect(server.client_config(receiver, 1)).await.expect("connect receiver");
    let sending = Client::connect(server.client_config(sender, 1)).await.expect("connect sender");
    sending.send(receiver, b"still here".to_vec()).await.expect("send after bad input");
    let message = tokio::time::timeout(Duration::from_secs(10), receiving.recv()).await.unwrap().unwrap();
    assert_eq!(message.payload, b"still here");
    receiving.close().await.unwrap();
    sending.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_and_the_connection_closed() {
    let mut server = Server::start(2);
    let user = user_on_shard(0, 2, 100);

    let mut raw = Raw::connect(&server, 0).await;
    assert_eq!(error_code(Some(raw.hello("definitely-not-a-token", 0).await)), ErrorCode::InvalidToken);
    assert_eq!(raw.closed_code().await, Some(u64::from(close_code::PROTOCOL_ERROR)));

    // Signed by another key.
    let foreign = irisd::auth::TokenAuthority::from_secret([9; 32]);
    let forged = foreign.mint(Claims { user_id: user, device_id: 1, expires_at_s: now_s() + 60 });
    let mut raw = Raw::connect(&server, 0).await;
    assert_eq!(error_code(Some(raw.hello(&forged, 0).await)), ErrorCode::InvalidToken);

    let expired = server.authority().mint(Claims { user_id: user, device_id: 1, expires_at_s: now_s() - 1 });
    let mut raw = Raw::connect(&server, 0).await;
    assert_eq!(error_code(Some(raw.hello(&expired, 0).await)), ErrorCode::TokenExpired);
    assert_eq!(raw.closed_code().await, Some(u64::from(close_code::PROTOCOL_ERROR)));

    // The SDK reports it as a typed, non-retryable failure.
    let mut config = server.client_config(user, 1);
    config.token = expired;
    let error = Client::connect(config).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::TokenExpired));
    assert_still_serving(&mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_garbage_and_unknown_frames_get_typed_errors() {
    let mut server = Server::start(2);

    // A length prefix over frame_bytes_max: refused before the body is read.
    let mut raw = Raw::connect(&server, 0).await;
    raw.write_bytes(&(10 * 1024 * 1024u32).to_le_bytes()).await;
    assert_eq!(error_code(raw.read_frame().await), ErrorCode::FrameTooLarge);
    assert_eq!(raw.closed_code().await, Some(u64::from(close_code::PROTOCOL_ERROR)));

    // Garbage that parses as a header with a body that does not validate.
    let mut raw = Raw::connect(&server, 0).await;
    let mut garbage = vec![40, 0, 0, 0, iris_protocol::PROTOCOL_VERSION, 1];
    garbage.extend((0..38u8).map(|i| i.wrapping_mul(97) ^ 0xA5));
    raw.write_bytes(&garbage).await;
    assert_eq!(error_code(raw.read_frame().await), ErrorCode::BadFrame);

    // An unknown frame kind.
    let mut raw = Raw::connect(&server, 0).await;
    raw.write_bytes(&[2, 0, 0, 0, iris_protocol::PROTOCOL_VERSION, 250]).await;
    assert_eq!(error_code(raw.read_frame().await), ErrorCode::UnknownFrameType);

    // An unsupported protocol version.
    let mut raw = Raw::connect(&server, 0).await;
    raw.write_bytes(&[2, 0, 0, 0, 99, 11]).await;
    assert_eq!(error_code(raw.read_frame().await), ErrorCode::UnsupportedVersion);

    // A server-only frame from a client, and a Send before Hello.
    let mut raw = Raw::connect(&server, 0).await;
    raw.write_frame(&Frame::Ack(frames::Ack { client_msg_id: 1, server_msg_id: 2 })).await;
    assert_eq!(error_code(raw.read_frame().await), ErrorCode::ProtocolViolation);
    let mut raw = Raw::connect(&server, 0).await;
    raw.write_frame(&Frame::Send(frames::Send { client_msg_id: 1, to_user: 2, after: None, payload: vec![] })).await;
    assert_eq!(error_code(raw.read_frame().await), ErrorCode::ProtocolViolation);

    // Random bytes of every shape, many connections at once.
    let mut seed = common::rand_u64();
    println!("garbage seed = {seed}");
    let mut raws = Vec::new();
    for _ in 0..20 {
        let mut raw = Raw::connect(&server, (seed % 2) as u16).await;
        let mut bytes = Vec::new();
        for _ in 0..(seed % 300) {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            bytes.push((seed >> 33) as u8);
        }
        raw.write_bytes(&bytes).await;
        let _ = raw.send.finish();
        raws.push(raw);
    }
    drop(raws);
    assert_still_serving(&mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_to_a_user_without_devices_is_refused_but_the_session_goes_on() {
    let mut server = Server::start(2);
    let sender = user_on_shard(0, 2, 200);
    let nobody = user_on_shard(1, 2, 7_000_000);
    let mut raw = Raw::connect(&server, 0).await;
    assert!(matches!(raw.hello(&server.token(sender, 1), 0).await, Frame::Welcome(_)));
    raw.write_frame(&Frame::Send(frames::Send {
        client_msg_id: 5,
        to_user: nobody,
        after: None,
        payload: b"hi".to_vec(),
    }))
    .await;
    match raw.read_frame().await {
        Some(Frame::Error(error)) => {
            assert_eq!(ErrorCode::from_u16(error.code), Some(ErrorCode::UnknownRecipient));
            assert_eq!(error.client_msg_id, Some(5));
        }
        other => panic!("expected Error, got {other:?}"),
    }
    // Same connection keeps working.
    raw.write_frame(&Frame::Ping(frames::Ping { nonce: 42 })).await;
    assert_eq!(raw.read_frame().await, Some(Frame::Pong(frames::Pong { nonce: 42 })));

    // Through the SDK: a typed, final error.
    let client = Client::connect(server.client_config(sender, 2)).await.unwrap();
    let error = client.send(nobody, b"hi".to_vec()).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::UnknownRecipient));
    // A payload too large for a Deliver frame: the SDK refuses it locally...
    let error = client.send(sender, vec![0u8; 65_500]).await.unwrap_err();
    assert!(matches!(error, iris_client::ClientError::PayloadTooLarge { .. }), "{error:?}");
    // ...and the server refuses it (without closing) when a raw client sends it.
    let limit = iris_protocol::payload_bytes_max(iris_protocol::FRAME_BYTES_MAX_DEFAULT);
    raw.write_frame(&Frame::Send(frames::Send {
        client_msg_id: 6,
        to_user: sender,
        after: None,
        payload: vec![1; limit + 1],
    }))
    .await;
    let refused = raw.read_frame().await;
    assert!(
        matches!(&refused, Some(Frame::Error(e)) if e.code == ErrorCode::FrameTooLarge as u16 && e.client_msg_id == Some(6)),
        "{refused:?}"
    );
    raw.write_frame(&Frame::Ping(frames::Ping { nonce: 43 })).await;
    assert_eq!(raw.read_frame().await, Some(Frame::Pong(frames::Pong { nonce: 43 })));
    // The session survived the refused send.
    let receiver = user_on_shard(1, 2, 250);
    let _registered = Client::connect(server.client_config(receiver, 1)).await.unwrap();
    client.send(receiver, b"fine".to_vec()).await.expect("session still usable");
    assert_still_serving(&mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_devices_are_refused() {
    let mut server = Server::start_with(2, &["[limits]", "devices_per_user_max = 2"]);
    let user = user_on_shard(0, 2, 300);
    let _one = Client::connect(server.client_config(user, 1)).await.unwrap();
    let _two = Client::connect(server.client_config(user, 2)).await.unwrap();
    let error = Client::connect(server.client_config(user, 3)).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::TooManyDevices));
    assert_still_serving(&mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_says_hello_is_closed() {
    let mut server = Server::start_with(2, &["[runtime]", "hello_timeout_ms = 300"]);
    let raw = Raw::connect(&server, 0).await;
    // The connection is up (keep-alives would hold it open), but no Hello is sent.
    assert_eq!(raw.closed_code().await, Some(u64::from(close_code::PROTOCOL_ERROR)));
    assert_still_serving(&mut server).await;
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `count` ShardMapRequest frames back to back (~6 bytes each; each answer is ~16 KiB).
fn shard_map_requests(count: usize) -> Vec<u8> {
    let one = iris_protocol::encode(&Frame::ShardMapRequest(frames::ShardMapRequest {}), 65536).unwrap();
    one.repeat(count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_hello_are_limited() {
    let mut server = Server::start(2);
    let mut raw = Raw::connect(&server, 0).await;
    raw.write_bytes(&shard_map_requests(1000)).await;
    let mut maps = 0;
    loop {
        match raw.read_frame().await {
            Some(Frame::ShardMap(_)) => maps += 1,
            Some(Frame::Error(error)) => {
                assert_eq!(ErrorCode::from_u16(error.code), Some(ErrorCode::ProtocolViolation));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(maps, irisd::shard::core::PRE_HELLO_REQUESTS_MAX as usize);
    assert_eq!(raw.closed_code().await, Some(u64::from(close_code::PROTOCOL_ERROR)));
    assert_still_serving(&mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_requests_for_large_answers_cannot_grow_server_memory() {
    let mut server = Server::start(1);
    let before = rss_kib(server.child.id());
    let mut floods = Vec::new();
    for index in 0..4 {
        let user = user_on_shard(0, 1, 500 + index * 10);
        let mut raw = Raw::connect(&server, 0).await;
        assert!(matches!(raw.hello(&server.token(user, 1), 0).await, Frame::Welcome(_)));
        // 200 KB of requests that ask for ~3 GB of answers, never read.
        let requests = shard_map_requests(32_000);
        let _ = tokio::time::timeout(Duration::from_secs(3), raw.send.write_all(&requests)).await;
        floods.push(raw);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown_kib = rss_kib(server.child.id()).saturating_sub(before);
    println!("irisd RSS grew by {grown_kib} KiB under 4 floods");
    // Each connection may hold its 256 KiB response budget plus QUIC's
    // 256 KiB windows; 32 MiB leaves ample room for allocator slack.
    assert!(grown_kib < 32 * 1024, "irisd grew by {grown_kib} KiB from 4 connections' small requests");
    // The flooding connections still get their answers once they read.
    let raw = &mut floods[0];
    assert!(matches!(raw.read_frame().await, Some(Frame::ShardMap(_))));
    drop(floods);
    assert_still_serving(&mut server).await;
}

/// The value of `name{shard="0"}` in a Prometheus exposition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_are_validated_under_load_and_one_source_cannot_take_every_slot() {
    let (admin, admin_line) = common::admin_address();
    // Every handshake counts as "under load", and one address may hold two.
    let server = Server::start_with(
        1,
        &[&admin_line, "[limits]", "handshakes_unvalidated_max = 0", "connections_per_source_max = 2"],
    );
    let first = Raw::connect(&server, 0).await;
    let second = Raw::connect(&server, 0).await;
    let exposition = common::http_get(&admin, "/metrics");
    assert!(
        common::metric_sum(&exposition, "iris_handshake_retries_total", "shard=\"0\"") >= 2,
        "each handshake proved its address first"
    );
    // A third connection from 127.0.0.1 is refused, the two keep working.
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(common::client_tls(&server.ca()));
    let address = server.address(0).parse().unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), endpoint.connect(address, "localhost").unwrap())
        .await
        .expect("an answer, not a timeout");
    assert!(refused.is_err(), "a third connection from one source must be refused");
    assert_eq!(
        common::metric_sum(&common::http_get(&admin, "/metrics"), "iris_handshakes_refused_total", "shard=\"0\""),
        1
    );
    for mut raw in [first, second] {
        raw.write_frame(&Frame::Ping(frames::Ping { nonce: 9 })).await;
        assert!(matches!(raw.read_frame().await, Some(Frame::Pong(pong)) if pong.nonce == 9));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_expires() {
    let server = Server::start(1);
    let user = user_on_shard(0, 1, 900);
    let token = server.authority().mint(Claims { user_id: user, device_id: 1, expires_at_s: now_s() + 2 });
    let mut raw = Raw::connect(&server, 0).await;
    assert!(matches!(raw.hello(&token, 0).await, Frame::Welcome(_)));
    raw.write_frame(&Frame::Ping(frames::Ping { nonce: 1 })).await;
    assert!(matches!(raw.read_frame().await, Some(Frame::Pong(_))), "valid until it expires");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    raw.write_frame(&Frame::Ping(frames::Ping { nonce: 2 })).await;
    assert_eq!(error_code(raw.read_frame().await), ErrorCode::TokenExpired);
    assert_eq!(raw.closed_code().await, Some(u64::from(close_code::PROTOCOL_ERROR)));
}
