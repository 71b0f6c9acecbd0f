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
        .args(["connect", "--spawn-server", "--connections", "50", "--settle", "0.2"])
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
            command.args(["--offline", "--server-config", "limits.mailbox_messages_max = 100"]);
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
fn raw_quic_echo_smoke() {
    let json = tempfile::NamedTempFile::new().unwrap();
    let output = iris_perf()
        .args(["raw-quic", "--connections", "4", "--inflight", "2", "--duration", "0.5"])
        .args(["--server-cpus", "none", "--loadgen-cpus", "none", "--port", &free_port().to_string(), "--json"])
        .arg(json.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "iris-perf failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(json.path()).unwrap()).unwrap();
    assert!(report["echoed"].as_u64().unwrap() > 0, "{report}");
    assert!(report["server_cpu_us_per_message"].as_f64().is_some());
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
