//! The `iris` CLI against a real irisd: two processes exchange a message, and
//! mistakes give a one-line error and a non-zero exit.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn iris() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_iris"))
}

/// irisd is built next to iris by `cargo test --workspace`.
fn irisd() -> PathBuf {
    let path = iris().with_file_name("irisd");
    assert!(path.exists(), "{} missing: run the suite with `cargo test --workspace`", path.display());
    path
}

struct Daemon {
    child: Child,
    data_dir: tempfile::TempDir,
    server: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_irisd() -> Daemon {
    let data_dir = tempfile::tempdir().unwrap();
    for attempt in 0..20u64 {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
        let port = 20_000 + ((nanos / 1000 + attempt * 7919) % 12_000) as u16;
        let mut child = Command::new(irisd())
            .args(["serve", "--shards", "2", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(data_dir.path())
            .env("IRIS_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let ready = BufReader::new(stdout).lines().map_while(Result::ok).any(|line| line.contains("ready:"));
        if ready {
            return Daemon { child, data_dir, server: format!("127.0.0.1:{port}") };
        }
        let _ = child.wait();
    }
    panic!("irisd did not start");
}

fn token(daemon: &Daemon, user: u64, device: u32) -> String {
    let output = Command::new(irisd())
        .args(["token", "--user", &user.to_string(), "--device", &device.to_string(), "--data-dir"])
        .arg(daemon.data_dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "irisd token failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

fn iris_command(daemon: &Daemon, token: &str) -> Command {
    let mut command = Command::new(iris());
    command
        .env("IRIS_SERVER", &daemon.server)
        .env("IRIS_CA", daemon.data_dir.path().join("tls/cert.pem"))
        .env("IRIS_TOKEN", token);
    command
}

fn run(mut command: Command) -> Output {
    command.output().unwrap()
}

#[test]
fn two_iris_processes_exchange_a_message() {
    let daemon = start_irisd();
    let (alice, bob) = (token(&daemon, 1, 1), token(&daemon, 2, 1));
    let mut listen = iris_command(&daemon, &bob);
    listen.args(["listen", "--count", "2", "--timeout", "20"]).stdout(Stdio::piped());
    let listener = listen.spawn().unwrap();

    // The listener registers bob's device on its first Hello; until then a
    // send is refused with UnknownRecipient, so retry briefly.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sent = loop {
        let mut send = iris_command(&daemon, &alice);
        send.args(["send", "--to", "2", "hello bob"]);
        let output = run(send);
        if output.status.success() {
            break output;
        }
        assert!(Instant::now() < deadline, "send kept failing: {}", String::from_utf8_lossy(&output.stderr));
        std::thread::sleep(Duration::from_millis(100));
    };
    let ack: serde_json::Value = serde_json::from_slice(&sent.stdout).expect("ack is JSON");
    let mut second = iris_command(&daemon, &alice);
    second.args(["send", "--to", "2", "second"]);
    assert!(run(second).status.success());

    let output = listener.wait_with_output().unwrap();
    assert!(output.status.success());
    let lines: Vec<serde_json::Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["text"], "hello bob");
    assert_eq!(lines[0]["from_user"], 1);
    assert_eq!(lines[0]["server_msg_id"], ack["server_msg_id"]);
    assert_eq!(lines[1]["text"], "second");
    assert!(lines[1]["seq"].as_u64() > lines[0]["seq"].as_u64());

    // Both were acknowledged by the listener: a new listen sees nothing.
    let mut again = iris_command(&daemon, &bob);
    again.args(["listen", "--timeout", "0.5"]);
    let output = run(again);
    assert!(output.status.success());
    assert!(output.stdout.is_empty(), "redelivered: {}", String::from_utf8_lossy(&output.stdout));
}

#[test]
fn mistakes_give_one_line_errors_and_a_failure_exit() {
    let daemon = start_irisd();
    let alice = token(&daemon, 1, 1);

    let mut bad_token = iris_command(&daemon, "not-a-token");
    bad_token.args(["send", "--to", "2", "x"]);
    let output = run(bad_token);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("InvalidToken") && stderr.lines().count() == 1, "{stderr}");

    let mut bad_ca = iris_command(&daemon, &alice);
    bad_ca.env("IRIS_CA", "/nonexistent/ca.pem").args(["send", "--to", "2", "x"]);
    let output = run(bad_ca);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/ca.pem"));

    let mut no_recipient = iris_command(&daemon, &alice);
    no_recipient.args(["send", "--to", "424242", "x"]);
    let output = run(no_recipient);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("UnknownRecipient"));
    // The refusal is also printed as JSON, for scripts.
    let refusal: serde_json::Value = serde_json::from_slice(&output.stdout).expect("refusal printed as JSON");
    assert_eq!((refusal["error"].as_str(), refusal["code"].as_u64()), (Some("UnknownRecipient"), Some(8)));

    let mut no_token = Command::new(iris());
    no_token.env_remove("IRIS_TOKEN").args(["listen"]);
    let output = run(no_token);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("IRIS_TOKEN"));
}

#[test]
fn a_device_unlinks_another_then_itself() {
    let daemon = start_irisd();
    let (phone, laptop) = (token(&daemon, 5, 1), token(&daemon, 5, 2));
    // Both devices register.
    for token in [&phone, &laptop] {
        let mut listen = iris_command(&daemon, token);
        listen.args(["listen", "--timeout", "0.1"]);
        assert!(run(listen).status.success());
    }
    let mut remove = iris_command(&daemon, &phone);
    remove.args(["remove-device", "2"]);
    let output = run(remove);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), r#"{"removed_device":2}"#);
    // The laptop's token no longer gets in.
    let mut listen = iris_command(&daemon, &laptop);
    listen.args(["listen", "--timeout", "0.1"]);
    let output = run(listen);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("DeviceRemoved"));
    // An unknown device is a one-line error; removing itself succeeds and ends the phone.
    let mut unknown = iris_command(&daemon, &phone);
    unknown.args(["remove-device", "9"]);
    let output = run(unknown);
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains("UnknownDevice"));
    let mut itself = iris_command(&daemon, &phone);
    itself.args(["remove-device", "1"]);
    let output = run(itself);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let mut send = iris_command(&daemon, &phone);
    send.args(["send", "--to", "5", "x"]);
    assert!(String::from_utf8_lossy(&run(send).stderr).contains("DeviceRemoved"));
}

#[test]
fn iris_presence_watch_prints_a_users_state_and_its_changes_as_json_lines() {
    let daemon = start_irisd();
    let (watcher, watched) = (token(&daemon, 1, 1), token(&daemon, 2, 1));
    // The watcher prints user 2's state now (offline, never seen), then
    // "online" when user 2 connects.
    let mut watch = iris_command(&daemon, &watcher);
    watch.args(["presence", "watch", "2", "--count", "2", "--timeout", "20"]).stdout(Stdio::piped());
    let mut child = watch.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first, serde_json::json!({ "user": 2, "state": "offline", "last_seen_ms": null }));
    let mut privacy = iris_command(&daemon, &watched);
    privacy.args(["presence", "privacy", "nobody"]);
    let output = run(privacy);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let second: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    // User 2 connected to set its privacy: online first, unless the
    // privacy frame came in the same flight (then hidden at once).
    assert!(
        second == serde_json::json!({ "user": 2, "state": "online", "last_seen_ms": null })
            || second == serde_json::json!({ "user": 2, "state": "hidden", "last_seen_ms": null }),
        "{second}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "iris presence watch did not stop after --count");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    // Typing: said, and printed as data.
    let mut typing = iris_command(&daemon, &watched);
    typing.args(["typing", "--to", "1"]);
    let output = run(typing);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(line, serde_json::json!({ "typing_to": 1, "active": true }));
    // A bad privacy word is a one-line error.
    let mut bad = iris_command(&daemon, &watched);
    bad.args(["presence", "privacy", "friends"]);
    let output = run(bad);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("must be everyone, contacts or nobody"));
}
