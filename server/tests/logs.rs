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
    // A stop that lets the log thread write what waits (a SIGKILL could
    // lose the very lines this test looks for).
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());

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
    // A `{:?}` of the payload's bytes prints a list of numbers: look for
    // the list of its random part.
    let random_part = &payload.as_bytes()["secret-payload-".len()..];
    secrets.push(("payload as Debug bytes".into(), format!("{random_part:?}").trim_matches(['[', ']']).to_owned()));
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

/// Splits one datagram of the journal's native protocol into its fields:
/// `KEY=value\n`, or `KEY\n` + a little-endian u64 length + value + `\n`.
fn journal_fields(mut datagram: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while let Some(end) = datagram.iter().position(|&b| b == b'\n') {
        let line = &datagram[..end];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            let key = String::from_utf8(line[..eq].to_vec()).unwrap();
            fields.push((key, String::from_utf8(line[eq + 1..].to_vec()).unwrap()));
            datagram = &datagram[end + 1..];
        } else {
            let key = String::from_utf8(line.to_vec()).unwrap();
            let rest = &datagram[end + 1..];
            let length = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            fields.push((key, String::from_utf8(rest[8..8 + length].to_vec()).unwrap()));
            assert_eq!(rest[8 + length], b'\n', "a length-prefixed field ends with a newline");
            datagram = &rest[9 + length..];
        }
    }
    assert!(datagram.is_empty(), "a datagram ends with a newline");
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_records_reach_the_journal_with_their_fields() {
    // irisd runs as systemd would start it, with its stderr on the journal:
    // JOURNAL_STREAM names its stderr, and in a mount namespace of its own
    // /run/systemd/journal is a directory where this test listens on the
    // journal's socket.
    let mut keys = Server::start(2);
    keys.kill9();
    let data_dir = keys.data_dir.path().to_path_buf();
    let journal_dir = tempfile::tempdir().unwrap();
    let journal = std::os::unix::net::UnixDatagram::bind(journal_dir.path().join("socket")).unwrap();
    journal.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // Read while irisd runs: a datagram socket's queue is short (10 on a
    // host whose net.unix.max_dgram_qlen systemd has not raised), and a
    // sender past it waits.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let journal_reader = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut records = Vec::new();
            let mut buffer = vec![0u8; 1 << 20];
            loop {
                match journal.recv(&mut buffer) {
                    Ok(length) => records.push(journal_fields(&buffer[..length])),
                    Err(_) if stop.load(std::sync::atomic::Ordering::Acquire) => return records,
                    Err(_) => {}
                }
            }
        })
    };
    let stderr_path = data_dir.join("stderr");
    let port = 20_000 + (rand_u64() % 12_000) as u16;
    let script = "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal \
                  && mount --bind \"$0\" /run/systemd/journal \
                  && JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec \"$@\"";
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", script])
        .arg(journal_dir.path())
        .arg(env!("CARGO_BIN_EXE_irisd"))
        .args(["serve", "--shards", "2", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(&data_dir)
        .env("IRIS_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("unshare (util-linux) runs");
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let started = lines.by_ref().map_while(Result::ok).any(|line| line.contains("ready:"));
    assert!(started, "irisd did not start: {}", std::fs::read_to_string(&stderr_path).unwrap());
    let reader = std::thread::spawn(move || for _ in lines {});
    keys.base_port = port;

    // A session that is refused (an expired token) logs inside its span.
    let user = common::user_on_shard(0, 2, 10);
    let expired = keys.authority().mint(irisd::auth::Claims { user_id: user, device_id: 1, expires_at_s: 1 });
    let mut raw = Raw::connect(&keys, 0).await;
    assert!(matches!(raw.hello(&expired, 0).await, Frame::Error(_)));
    drop(raw);
    let client = Client::connect(keys.client_config(user, 2)).await.unwrap();
    client.close().await.unwrap();
    // A stop: the guard sends what waits before irisd exits.
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    reader.join().unwrap();

    stop.store(true, std::sync::atomic::Ordering::Release);
    let records = journal_reader.join().unwrap();
    let field = |record: &[(String, String)], key: &str| record.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    assert!(records.len() > 5, "few records reached the journal: {records:?}");
    for record in &records {
        assert_eq!(field(record, "SYSLOG_IDENTIFIER").as_deref(), Some("irisd"), "{record:?}");
        assert!(field(record, "TARGET").is_some() && field(record, "CODE_FILE").is_some(), "{record:?}");
        let priority: u8 = field(record, "PRIORITY").unwrap().parse().unwrap();
        assert!((3..=7).contains(&priority), "{record:?}");
    }
    // Levels are journal priorities: info is 6, debug is 7.
    let draining = records.iter().find(|r| field(r, "SIGNAL").is_some());
    let draining = draining.unwrap_or_else(|| panic!("no record with the drain's signal field: {records:?}"));
    assert_eq!(field(draining, "SIGNAL").as_deref(), Some("15"));
    assert!(field(draining, "MESSAGE").unwrap().starts_with("draining signal=15"), "{draining:?}");
    assert_eq!(field(draining, "PRIORITY").as_deref(), Some("6"));
    // A connection's records carry its span's fields as CONN_ID and CONN_PEER.
    let in_span = records.iter().filter(|r| field(r, "CONN_ID").is_some()).collect::<Vec<_>>();
    assert!(!in_span.is_empty(), "no record inside a connection span: {records:?}");
    for record in &in_span {
        assert_eq!(field(record, "PRIORITY").as_deref(), Some("7"), "{record:?}");
        assert!(field(record, "CONN_PEER").unwrap().starts_with("127.0.0.1"), "{record:?}");
        assert!(field(record, "MESSAGE").unwrap().starts_with("conn{id="), "{record:?}");
    }
    // Nothing went to stderr as text, and no token anywhere.
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(!stderr.contains("draining") && !stderr.contains("DEBUG"), "records on stderr too:\n{stderr}");
    let all = format!("{records:?}");
    assert!(!all.contains(&expired[expired.len() - 24..]), "a token reached the journal");
}
