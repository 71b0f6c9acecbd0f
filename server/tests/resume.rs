//! Seqs never go backwards and a Hello never deletes what it was not sent:
//! `resume_after_seq` beyond the last seq is refused, a resume above what
//! was pushed deletes nothing, and an SDK whose server lost the device's
//! state says so instead of dropping new messages as redeliveries. And an
//! SDK whose server stops answering replaces the connection
//! (`ClientConfig::answer_timeout`) instead of waiting on it.

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

/// A server that completes the handshake and answers Hello, then never
/// answers anything (hung, or a crashed and restarted one whose stateless
/// reset has not reached the client yet). Counts the connections it gets.
async fn silent_server(connections: std::sync::Arc<std::sync::atomic::AtomicU32>) -> (String, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let tls = irisd::tls::TlsFiles::in_data_dir(&dir);
    tls.create_if_missing(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let crypto = tls.quic_server_config().unwrap();
    let config = quinn::ServerConfig::with_crypto(crypto);
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let address = endpoint.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let connections = std::sync::Arc::clone(&connections);
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else { return };
                connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Ok((mut send, mut recv)) = connection.accept_bi().await else { return };
                let mut buffer = vec![0u8; 65536];
                let _ = recv.read(&mut buffer).await;
                let welcome =
                    iris_protocol::frames::Welcome { user_id: 7, device_id: 1, shard: 0, epoch: 1, last_seq: 0 };
                let bytes = iris_protocol::encode(&Frame::Welcome(welcome), iris_protocol::FRAME_BYTES_MAX_DEFAULT);
                let _ = send.write_all(&bytes.unwrap()).await;
                // Read and never answer, until the client goes.
                while let Ok(Some(_)) = recv.read(&mut buffer).await {}
                connection.closed().await;
            });
        }
    });
    (address, dir.join("tls/cert.pem"))
}

#[tokio::test]
async fn a_send_without_an_answer_makes_the_sdk_replace_its_connection() {
    // With the answer timeout the SDK gives the silent connection up and
    // connects again; with it off (ZERO) it keeps waiting on the first one
    // (keep-alives hold it open), so a second connection never comes.
    for (timeout, expect_reconnect) in [(Duration::from_millis(300), true), (Duration::ZERO, false)] {
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (address, ca) = silent_server(std::sync::Arc::clone(&connections)).await;
        let mut config = iris_client::ClientConfig::new(address, ca, "token");
        config.answer_timeout = timeout;
        let client = Client::connect(config).await.expect("the silent server welcomes");
        let _pending = client.send_nowait(9, b"hello".to_vec()).await.expect("queued");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while connections.load(std::sync::atomic::Ordering::Relaxed) < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reconnected = connections.load(std::sync::atomic::Ordering::Relaxed) >= 2;
        assert_eq!(reconnected, expect_reconnect, "answer_timeout {timeout:?}");
    }
}
