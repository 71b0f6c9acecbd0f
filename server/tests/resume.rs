//! Seqs never go backwards and a Hello never deletes what it was not sent:
//! `resume_after_seq` beyond the last seq is refused, a resume above what
//! was pushed deletes nothing, and an SDK whose server lost the device's
//! state says so instead of dropping new messages as redeliveries.

mod common;

use common::{user_on_shard, Raw, Server};
use iris_client::{Client, ClientError};
use iris_protocol::frames::Frame;
use iris_protocol::{close_code, ErrorCode};
use std::time::Duration;

/// Stores `count` messages for `recipient` (registered, offline) from `sender`.
async fn store_offline(server: &Server, sender: u64, recipient: u64, count: usize) {
    Client::connect(server.client_config(recipient, 1)).await.unwrap().close().await.unwrap();
    // Let the server see the close, so nothing below is pushed to that connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = Client::connect(server.client_config(sender, 1)).await.unwrap();
    for index in 0..count {
        client.send(recipient, format!("message {index}").into_bytes()).await.expect("stored");
    }
    client.close().await.unwrap();
}

fn last_seq(frame: Frame) -> u64 {
    match frame {
        Frame::Welcome(welcome) => welcome.last_seq,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_beyond_the_last_seq_is_refused_and_deletes_nothing() {
    let server = Server::start(1);
    let (sender, recipient) = (user_on_shard(0, 1, 10), user_on_shard(0, 1, 20));
    store_offline(&server, sender, recipient, 5).await;
    let token = server.token(recipient, 1);
    for resume in [6, u64::MAX] {
        let mut raw = Raw::connect(&server, 0).await;
        match raw.hello(&token, resume).await {
            Frame::Error(error) => {
                assert_eq!(ErrorCode::from_u16(error.code), Some(ErrorCode::ResumeBeyondLastSeq));
                assert!(error.message.contains("last seq 5"), "{}", error.message);
            }
            other => panic!("resume {resume} must be refused, got {other:?}"),
        }
        assert_eq!(raw.closed_code().await, Some(u64::from(close_code::PROTOCOL_ERROR)));
    }
    // Every message is still there.
    let mut raw = Raw::connect(&server, 0).await;
    assert_eq!(last_seq(raw.hello(&token, 0).await), 5);
    for seq in 1..=5 {
        let deliver = raw.read_push(Duration::from_secs(5)).await.expect("message kept");
        assert_eq!(deliver.seq, seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_above_what_was_pushed_deletes_nothing() {
    let server = Server::start(1);
    let (sender, recipient) = (user_on_shard(0, 1, 30), user_on_shard(0, 1, 40));
    store_offline(&server, sender, recipient, 4).await;
    let token = server.token(recipient, 1);
    // Claims to have processed seq 4, though no connection was ever sent it.
    let mut raw = Raw::connect(&server, 0).await;
    assert_eq!(last_seq(raw.hello(&token, 4).await), 4);
    let mut seqs = Vec::new();
    while let Some(deliver) = raw.read_push(Duration::from_secs(2)).await {
        seqs.push(deliver.seq);
    }
    assert_eq!(seqs, vec![1, 2, 3, 4], "never-pushed messages are pushed, not acknowledged away");

    // Once pushed, a resume acknowledges them.
    drop(raw);
    let mut raw = Raw::connect(&server, 0).await;
    assert_eq!(last_seq(raw.hello(&token, 4).await), 4);
    assert!(raw.read_push(Duration::from_millis(500)).await.is_none(), "pushed and resumed past: gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_whose_server_lost_its_state_ends_the_session_with_a_typed_error() {
    let mut server = Server::start_with(1, &["[storage]", "durability = \"none\""]);
    let (sender, recipient) = (user_on_shard(0, 1, 50), user_on_shard(0, 1, 60));
    let mut receiving = Client::connect(server.client_config(recipient, 1)).await.unwrap();
    let sending = Client::connect(server.client_config(sender, 1)).await.unwrap();
    for index in 0..3 {
        sending.send(recipient, vec![index]).await.unwrap();
    }
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), receiving.recv()).await.unwrap().unwrap();
    }
    assert_eq!(receiving.processed_seq(), 3);
    drop(sending);
    // Memory-only: a restart forgets every seq.
    server.kill9();
    server.restart();
    // (An idle client would notice at its next keep-alive; don't wait for it.)
    receiving.reconnect().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), receiving.recv()).await.expect("session ends");
    assert!(ended.is_none(), "no message may be delivered across lost state: {ended:?}");
    match receiving.close().await {
        Err(ClientError::Server { code: Some(ErrorCode::ResumeBeyondLastSeq), .. }) => {}
        Err(ClientError::SeqWentBackwards { processed_seq: 3, server_last_seq: 0 }) => {}
        other => panic!("expected the lost state to be reported, got {other:?}"),
    }
}
