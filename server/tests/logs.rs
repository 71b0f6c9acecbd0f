//! Log hygiene: at the most verbose level, through good and bad sessions,
//! irisd never writes a token, a key or a message payload to its log, and
//! what it logs while handling a connection carries that connection's span.

mod common;

use common::{rand_u64, Raw, Server};
use iris_client::Client;
use iris_protocol::frames::{self, Frame};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The base64 (standard and URL-safe, with and without padding) and hex
/// forms of `bytes`, and the bytes themselves as text when they are text.
fn spellings(bytes: &[u8]) -> Vec<String> {
    use base64::Engine;
    let mut forms = vec![
        base64::engine::general_purpose::STANDARD.encode(bytes),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes),
        base64::engine::general_purpose::URL_SAFE.encode(bytes),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
        bytes.iter().map(|byte| format!("{byte:02x}")).collect(),
    ];
    if let Ok(text) = std::str::from_utf8(bytes) {
        forms.push(text.trim().to_owned());
    }
    // A fragment is enough to leak: look for 16 characters of each form.
    forms.into_iter().filter(|form| form.len() >= 16).map(|form| form[..16].to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_key_or_payload_reaches_the_log_even_at_trace_level() {
    // A server only for its key files and a port; the logging run is its own process.
    let mut keys = Server::start(2);
    keys.kill9();
    let data_dir = keys.data_dir.path().to_path_buf();
    let log_path = data_dir.join("irisd.log");
    let port = 20_000 + (rand_u64() % 12_000) as u16;
    let mut child = Command::new(env!("CARGO_BIN_EXE_irisd"))
        .args(["serve", "--shards", "2", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(&data_dir)
        .env("IRIS_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    assert!(lines.by_ref().map_while(Result::ok).any(|line| line.contains("ready:")), "irisd did not start");
    std::thread::spawn(move || for _ in lines {});
    keys.base_port = port;

    let payload = format!("secret-payload-{:016x}", rand_u64());
    let (sender, recipient) = (common::user_on_shard(0, 2, 10), common::user_on_shard(1, 2, 20));
    let sender_token = keys.token(sender, 1);
    let recipient_token = keys.token(recipient, 1);
    // Good sessions: a message across shards, delivered.
    let mut receiver =
        Client::connect(iris_client::ClientConfig::new(keys.address(0), keys.ca(), recipient_token.clone()))
            .await
            .unwrap();
    let client = Client::connect(iris_client::ClientConfig::new(keys.address(0), keys.ca(), sender_token.clone()))
        .await
        .unwrap();
    client.send(recipient, payload.clone().into_bytes()).await.unwrap();
    let delivered = tokio::time::timeout(Duration::from_secs(10), receiver.recv()).await.unwrap().unwrap();
    assert_eq!(delivered.payload, payload.as_bytes());
    // Bad sessions: a token with a flipped signature, an expired one, garbage.
    let mut forged = sender_token.clone().into_bytes();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let expired = keys.authority().mint(irisd::auth::Claims { user_id: sender, device_id: 2, expires_at_s: 1 });
    for token in [forged.as_str(), expired.as_str(), "not-a-token-at-all-but-long-enough"] {
        let mut raw = Raw::connect(&keys, 0).await;
        let answer = raw.hello(token, 0).await;
        assert!(matches!(answer, Frame::Error(_)), "{answer:?}");
    }
    // A Send of a payload too large, which is refused with an error.
    let mut raw = Raw::connect(&keys, 1).await;
    let second_device = keys.token(recipient, 2);
    assert!(matches!(raw.hello(&second_device, 0).await, Frame::Welcome(_)));
    let big = format!("{payload}-{}", "x".repeat(65_400));
    raw.write_frame(&Frame::Send(frames::Send {
        client_msg_id: 1,
        to_user: sender,
        after: None,
        payload: big.into_bytes(),
    }))
    .await;
    let _ = raw.try_read_frame(Duration::from_secs(2)).await;
    client.close().await.unwrap();
    receiver.close().await.unwrap();
    let _ = child.kill();
    let _ = child.wait();

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.lines().count() > 20, "a trace-level run logs something:\n{log}");
    // Lines logged while a connection is handled carry its span.
    assert!(log.contains("conn{id="), "no per-connection span in the log:\n{log}");
    let mut secrets: Vec<(String, String)> = Vec::new();
    for (name, token) in [
        ("sender token", &sender_token),
        ("recipient token", &recipient_token),
        ("forged token", &forged.to_owned()),
        ("expired token", &expired),
    ] {
        secrets.push((name.to_owned(), token[..24].to_owned()));
        secrets.push((format!("{name} signature"), token[token.len() - 24..].to_owned()));
    }
    secrets.push(("payload".into(), payload.clone()));
    for file in ["keys/token-signing.key", "log.key", "keys/stateless-reset.key", "tls/key.pem"] {
        let bytes = std::fs::read(data_dir.join(file)).unwrap();
        let bytes = if file.ends_with(".pem") {
            // The key's base64 body, without the PEM armour lines.
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>()
                .into_bytes()
        } else {
            bytes
        };
        for form in spellings(&bytes) {
            secrets.push((file.to_owned(), form));
        }
    }
    for (what, text) in secrets {
        assert!(!log.contains(&text), "the log holds the {what} ({text})");
    }
}
