//! A few-second run of each scenario against a spawned irisd, so the harness
//! keeps working. Asserts completeness, never speed.

use std::process::Command;

fn iris_perf() -> Command {
    Command::new(env!("CARGO_BIN_EXE_iris-perf"))
}

fn free_port() -> u16 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    20_000 + (nanos % 12_000) as u16
}

#[test]
fn pairs_smoke_with_both_durabilities_and_compare() {
    let mut reports = Vec::new();
    for durability in ["fsync", "none"] {
        let json = tempfile::NamedTempFile::new().unwrap();
        let html = tempfile::NamedTempFile::new().unwrap();
        let output = iris_perf()
            .args(["pairs", "--spawn-server", "--pairs", "2", "--rate", "50", "--duration", "1"])
            .args(["--server-cpus", "none", "--loadgen-cpus", "none", "--durability", durability])
            .args(["--port", &free_port().to_string(), "--json"])
            .arg(json.path())
            .arg("--html")
            .arg(html.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "iris-perf failed: {}", String::from_utf8_lossy(&output.stderr));
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(json.path()).unwrap()).unwrap();
        let page = std::fs::read_to_string(html.path()).unwrap();
        assert_eq!(page.matches("<svg").count(), 3, "three charts expected");
        assert!(report["timeline"].as_array().is_some_and(|samples| samples.len() >= 3), "{report}");
        let counts = &report["counts"];
        assert_eq!(counts["sent"], 200, "{report}");
        assert_eq!(counts["acked"], counts["sent"]);
        assert_eq!(counts["delivered"], counts["sent"]);
        assert!(report["ack_latency"]["p50_us"].as_u64().unwrap() > 0);
        assert!(report["server_cpu_seconds"].as_f64().is_some());
        reports.push(json);
    }
    let output = iris_perf().arg("compare").arg(reports[0].path()).arg(reports[1].path()).output().unwrap();
    assert!(output.status.success());
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(table.contains("B/A") && table.contains("counts.delivered"), "{table}");
    assert!(table.lines().any(|line| line.starts_with("counts.sent") && line.trim_end().ends_with("1.000")), "{table}");
}

#[test]
fn impossible_parameters_fail_with_one_line() {
    let output = iris_perf().args(["pairs", "--spawn-server", "--duration", "0"]).output().unwrap();
    assert!(!output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stderr).lines().count(), 1);
    let output = iris_perf().args(["pairs", "--server", "127.0.0.1:1"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--data-dir"));
}

#[test]
fn connect_smoke_holds_authenticated_connections() {
    let json = tempfile::NamedTempFile::new().unwrap();
    let output = iris_perf()
        .args(["connect", "--spawn-server", "--connections", "50", "--settle", "0.2", "--reconnect"])
        .args(["--server-cpus", "none", "--loadgen-cpus", "none", "--server-arg=--shards", "--server-arg=2"])
        .args(["--port", &free_port().to_string(), "--json"])
        .arg(json.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "iris-perf failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(json.path()).unwrap()).unwrap();
    assert_eq!(report["established"], 50, "{report}");
    assert_eq!(report["failed"], 0);
    assert!(report["server_rss_per_connection_bytes"].as_f64().is_some());
    // The first pass offers no TLS tickets: every handshake is a full one,
    // the redirected attempts included.
    assert!(report["full_handshakes"].as_u64().unwrap() >= 50, "{report}");
    // Reconnected to their home shards: 50 full handshakes without tickets,
    // then 50 resumed with the tickets the home shards issued.
    assert_eq!(report["reconnect_full"]["established"], 50, "{report}");
    assert_eq!(report["reconnect_full"]["full_handshakes"], 50, "{report}");
    assert_eq!(report["reconnect_resumed"]["established"], 50, "{report}");
    assert_eq!(report["reconnect_resumed"]["full_handshakes"], 0, "resumption failed: {report}");
}

#[test]
fn presence_smoke_counts_notifications_of_churn() {
    let json = tempfile::NamedTempFile::new().unwrap();
    let output = iris_perf()
        .args(["presence", "--spawn-server", "--users", "20", "--contacts", "3", "--churn", "5", "--duration", "1"])
        .args(["--server-cpus", "none", "--loadgen-cpus", "none", "--server-arg=--shards", "--server-arg=2"])
        .args(["--port", &free_port().to_string(), "--json"])
        .arg(json.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "iris-perf failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(json.path()).unwrap()).unwrap();
    // About 5 users leave and come back, each seen by its 3 watchers twice
    // (offline, online), plus the states their own new watches bring.
    let notifications = report["notifications"].as_u64().unwrap();
    assert!(notifications >= 10, "{report}");
    assert!(report["latency_p99_ms"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["server_rss_per_subscription_bytes"].as_f64().is_some(), "{report}");
}

#[test]
fn fanin_smoke_online_and_offline() {
    for offline in [false, true] {
        let json = tempfile::NamedTempFile::new().unwrap();
        let mut command = iris_perf();
        command
            .args(["fanin", "--spawn-server", "--senders", "3", "--messages", "600"])
            .args(["--server-cpus", "none", "--loadgen-cpus", "none"])
            .args(["--port", &free_port().to_string(), "--json"])
            .arg(json.path());
        if offline {
            // A mailbox cap below the message count: the rest must be refused, not stored.
            // The senders' shares set to the whole mailbox: the cap is what this shows.
            command.args(["--offline", "--server-config", "limits.mailbox_messages_max = 100"]);
            command.args(["--server-config", "limits.mailbox_sender_messages_max = 100"]);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "iris-perf failed: {}", String::from_utf8_lossy(&output.stderr));
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(json.path()).unwrap()).unwrap();
        let counts = &report["counts"];
        assert_eq!(counts["sent"], 600, "{report}");
        assert_eq!(counts["delivered"], counts["acked"], "{report}");
        if offline {
            assert_eq!(counts["acked"], 100, "{report}");
            assert_eq!(counts["errors"]["MailboxFull"], 500, "{report}");
        } else {
            assert_eq!(counts["acked"], 600, "{report}");
        }
    }
}

#[test]
fn raw_quic_echo_and_relay_smoke() {
    for mode in ["echo", "relay"] {
        let json = tempfile::NamedTempFile::new().unwrap();
        let output = iris_perf()
            .args(["raw-quic", "--mode", mode, "--connections", "4", "--inflight", "2", "--duration", "0.5"])
            .args(["--server-cpus", "none", "--loadgen-cpus", "none", "--port", &free_port().to_string(), "--json"])
            .arg(json.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "iris-perf {mode} failed: {}", String::from_utf8_lossy(&output.stderr));
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(json.path()).unwrap()).unwrap();
        assert!(report["echoed"].as_u64().unwrap() > 0, "{report}");
        assert!(report["server_cpu_us_per_message"].as_f64().is_some());
    }
}

#[test]
fn closed_loop_pairs_keep_every_message() {
    let json = tempfile::NamedTempFile::new().unwrap();
    let output = iris_perf()
        .args(["pairs", "--spawn-server", "--pairs", "2", "--inflight", "4", "--duration", "1"])
        .args(["--server-cpus", "none", "--loadgen-cpus", "none", "--durability", "fsync"])
        .args(["--port", &free_port().to_string(), "--json"])
        .arg(json.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "iris-perf failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(json.path()).unwrap()).unwrap();
    let counts = &report["counts"];
    assert!(counts["sent"].as_u64().unwrap() > 4, "{report}");
    assert_eq!(counts["acked"], counts["sent"], "{report}");
    assert_eq!(counts["delivered"], counts["sent"], "{report}");
    assert_eq!(report["parameters"]["inflight_per_user"], "4", "{report}");
}

/// A running irisd for the bad-target tests, killed on drop.
struct Irisd {
    child: std::process::Child,
    data_dir: tempfile::TempDir,
    port: u16,
}

impl Irisd {
    fn start() -> Irisd {
        use std::io::BufRead;
        let irisd = std::path::Path::new(env!("CARGO_BIN_EXE_iris-perf")).with_file_name("irisd");
        let data_dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut child = Command::new(irisd)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(data_dir.path())
            .env("IRIS_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        assert!(lines.by_ref().map_while(Result::ok).any(|line| line.contains("ready:")), "irisd did not start");
        std::thread::spawn(move || for _ in lines {});
        Irisd { child, data_dir, port }
    }
}

impl Drop for Irisd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs iris-perf and returns (success, stderr), failing the test if it does
/// not finish within a minute (a hang, not a slow run).
fn run_to_completion(command: &mut Command) -> (bool, String) {
    let mut child = command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            return (status.success(), stderr);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("iris-perf hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn bad_targets_fail_with_one_clear_line() {
    let server = Irisd::start();
    let real = server.data_dir.path();
    // A data directory with a certificate the server does not have.
    let wrong_ca = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(wrong_ca.path().join("tls")).unwrap();
    std::fs::create_dir_all(wrong_ca.path().join("keys")).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(wrong_ca.path().join("tls/cert.pem"), other.cert.pem()).unwrap();
    let key = "keys/token-signing.key";
    std::fs::copy(real.join(key), wrong_ca.path().join(key)).unwrap();
    // One with the right certificate but another token-signing key.
    let wrong_key = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(wrong_key.path().join("tls")).unwrap();
    std::fs::copy(real.join("tls/cert.pem"), wrong_key.path().join("tls/cert.pem")).unwrap();
    irisd::auth::TokenAuthority::load_or_create(&wrong_key.path().join(key), true).unwrap();

    let address = format!("127.0.0.1:{}", server.port);
    let closed = format!("127.0.0.1:{}", free_port());
    let cases: [(&str, &str, &std::path::Path, &str); 4] = [
        ("unreachable server", closed.as_str(), real, "cannot connect"),
        ("wrong certificate", address.as_str(), wrong_ca.path(), "certificate"),
        ("bad token", address.as_str(), wrong_key.path(), "InvalidToken"),
        ("missing data directory", address.as_str(), std::path::Path::new("/nonexistent/iris"), "/nonexistent"),
    ];
    for (case, target, data_dir, hint) in cases {
        for scenario in ["pairs", "connect", "fanin"] {
            let mut command = iris_perf();
            command.args([scenario, "--server", target, "--loadgen-cpus", "none", "--data-dir"]).arg(data_dir);
            let (success, stderr) = run_to_completion(&mut command);
            assert!(!success, "{scenario} / {case}: succeeded");
            assert_eq!(stderr.lines().count(), 1, "{scenario} / {case}: not one line: {stderr}");
            assert!(stderr.starts_with("iris-perf: ") && stderr.contains(hint), "{scenario} / {case}: {stderr}");
            assert!(!stderr.contains("panicked"), "{scenario} / {case}: {stderr}");
        }
    }
}

#[test]
fn soak_smoke_reports_growth_and_drift() {
    let json = tempfile::NamedTempFile::new().unwrap();
    let output = iris_perf()
        .args(["soak", "--spawn-server", "--pairs", "2", "--rate", "50", "--duration", "2", "--warmup", "0.5"])
        .args(["--sample-interval", "0.25", "--server-cpus", "none", "--loadgen-cpus", "none"])
        .args(["--port", &free_port().to_string(), "--json"])
        .arg(json.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "iris-perf failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(json.path()).unwrap()).unwrap();
    assert_eq!(report["counts"]["delivered"], report["counts"]["sent"], "{report}");
    let soak = &report["soak"];
    assert!(soak["rss_growth_bytes"].as_i64().is_some(), "{report}");
    assert!(soak["p99_last_quarter_us"].as_u64().is_some(), "{report}");
}

/// A peer server process, killed on drop.
struct Peer(std::process::Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn peer_smoke_against_mosquitto_and_nats() {
    for binary in ["mosquitto", "nats-server"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {binary}")]).output().unwrap();
        assert!(found.status.success(), "{binary} is not installed (.ci/run installs it from Debian)");
    }
    let work = tempfile::tempdir().unwrap();
    let mqtt_port = free_port();
    let config = work.path().join("mosquitto.conf");
    std::fs::write(
        &config,
        format!(
            "listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n",
            work.path().display()
        ),
    )
    .unwrap();
    let quiet = || std::process::Stdio::null();
    let mosquitto =
        Peer(Command::new("mosquitto").arg("-c").arg(&config).stdout(quiet()).stderr(quiet()).spawn().unwrap());
    let nats_port = free_port() + 1;
    let nats = Peer(
        Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &nats_port.to_string(), "-sd"])
            .arg(work.path().join("js"))
            .stdout(quiet())
            .stderr(quiet())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(700));
    for (kind, port, pid) in [
        ("mqtt", mqtt_port, mosquitto.0.id()),
        ("nats-js", nats_port, nats.0.id()),
        ("nats-core", nats_port, nats.0.id()),
    ] {
        let json = tempfile::NamedTempFile::new().unwrap();
        let output = iris_perf()
            .args(["peer", "--kind", kind, "--port", &port.to_string(), "--server-pid", &pid.to_string()])
            .args(["--pairs", "2", "--rate", "50", "--duration", "1", "--loadgen-cpus", "none", "--json"])
            .arg(json.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{kind}: {}", String::from_utf8_lossy(&output.stderr));
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(json.path()).unwrap()).unwrap();
        assert_eq!(report["counts"]["sent"], 200, "{kind}: {report}");
        assert_eq!(report["counts"]["delivered"], 200, "{kind}: {report}");
        if kind != "nats-core" {
            assert_eq!(report["counts"]["acked"], 200, "{kind}: {report}");
        }
    }
}
