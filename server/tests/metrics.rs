//! Metrics as an operator's monitoring sees them: the exposition of a live
//! irisd under traffic passes `promtool check metrics`, a real Prometheus
//! (Debian's) scrapes it and sees the counters move, the shipped scrape
//! config and alert rules pass promtool (and the rules' unit tests), and
//! the Grafana dashboard asks only for series irisd exports.

mod common;

use common::{admin_address, http_get, user_on_shard, Server};
use iris_client::Client;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)
}

/// The body of an HTTP response.
fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// Names of the samples in an exposition (`name{labels} value` lines).
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| line.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

/// A 2-shard irisd with its admin endpoint, after 200 messages across shards.
async fn server_under_traffic() -> (Server, String) {
    let (admin, line) = admin_address();
    let server = Server::start_with(2, &[line.as_str()]);
    let (sender, recipient) = (user_on_shard(0, 2, 10), user_on_shard(1, 2, 20));
    let mut receiver = Client::connect(server.client_config(recipient, 1)).await.unwrap();
    let client = Client::connect(server.client_config(sender, 1)).await.unwrap();
    for index in 0..200u32 {
        client.send(recipient, index.to_le_bytes().to_vec()).await.unwrap();
    }
    for _ in 0..200 {
        tokio::time::timeout(Duration::from_secs(10), receiver.recv()).await.unwrap().unwrap();
    }
    client.close().await.unwrap();
    receiver.close().await.unwrap();
    (server, admin)
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_exposition_passes_promtool_and_counts_the_traffic() {
    let (_server, admin) = server_under_traffic().await;
    let response = http_get(&admin, "/metrics");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let exposition = body(&response);
    let (ok, text) = promtool(&["check", "metrics"], Some(exposition));
    assert!(ok, "promtool check metrics: {text}");
    let sum = |name: &str, label: &str| common::metric_sum(exposition, name, label);
    assert!(sum("iris_sends_accepted_total", "shard=\"0\"") >= 200);
    assert!(sum("iris_messages_stored_total", "shard=\"1\"") >= 200);
    assert!(sum("iris_frames_received_total", "kind=\"Send\"") >= 200);
    assert!(sum("iris_frames_sent_total", "kind=\"Ack\"") >= 200);
    assert!(sum("iris_frames_sent_total", "kind=\"Deliver\"") >= 200);
    assert!(sum("iris_deliver_latency_seconds_count", "shard=\"1\"") >= 200);
    assert!(sum("iris_send_sojourn_seconds_count", "shard=\"0\"") >= 200);
    assert!(sum("iris_log_sync_seconds_count", "shard=\"1\"") >= 1);
    assert!(sum("iris_handshakes_total", "shard=") >= 2);
    let names = sample_names(exposition);
    assert!(names.contains("iris_process_resident_memory_bytes"), "{names:?}");
}

#[test]
fn the_shipped_scrape_config_and_alert_rules_pass_promtool() {
    let config = deploy("prometheus.yml");
    let (ok, text) = promtool(&["check", "config", config.to_str().unwrap()], None);
    assert!(ok, "{text}");
    let rules = deploy("prometheus-rules.yml");
    let (ok, text) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "{text}");
    let tests = deploy("prometheus-rules.test.yml");
    let (ok, text) = promtool(&["test", "rules", tests.to_str().unwrap()], None);
    assert!(ok, "{text}");
}

/// Every `iris_*` name in an expression: a sample name of the exposition.
fn iris_names(expression: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expression;
    while let Some(start) = rest.find("iris_") {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn expressions(value: &serde_json::Value, found: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query", serde_json::Value::String(text)) => found.push(text.clone()),
                    _ => expressions(value, found),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| expressions(item, found)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_ask_only_for_series_irisd_exports() {
    let (_server, admin) = server_under_traffic().await;
    let names = sample_names(body(&http_get(&admin, "/metrics")));
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/iris.json")).unwrap()).unwrap();
    let mut found = Vec::new();
    expressions(&dashboard, &mut found);
    assert!(found.len() >= 20, "the dashboard has few queries: {found:?}");
    let rules = std::fs::read_to_string(deploy("prometheus-rules.yml")).unwrap();
    found.extend(rules.lines().filter(|line| line.contains("iris_")).map(str::to_owned));
    let mut asked = BTreeSet::new();
    for expression in &found {
        for name in iris_names(expression) {
            assert!(names.contains(&name), "`{name}` (in {expression:?}) is not in irisd's exposition");
            asked.insert(name);
        }
    }
    assert!(asked.len() >= 25, "the dashboard and alerts cover few metrics: {asked:?}");
}

/// Starts Prometheus scraping `admin` every 200 ms; returns it and its API address.
fn start_prometheus(dir: &Path, admin: &str) -> (std::process::Child, String) {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 200ms\n  evaluation_interval: 200ms\nscrape_configs:\n  - job_name: irisd\n    \
             static_configs:\n      - targets: [\"{admin}\"]\n"
        ),
    )
    .unwrap();
    for _ in 0..10 {
        let listen = format!("127.0.0.1:{}", 20_000 + common::rand_u64() % 12_000);
        let mut child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian's package; scripts/test.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break; // the port was taken: try another
            }
            if common::try_http_get(&listen, "/-/ready").is_ok_and(|response| response.starts_with("HTTP/1.1 200")) {
                return (child, listen);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("prometheus did not start");
}

/// The value of an instant query's first result, if there is one.
fn query(prometheus: &str, expression: &str) -> Option<f64> {
    let encoded: String = expression
        .bytes()
        .map(|byte| match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (byte as char).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect();
    let response = common::try_http_get(prometheus, &format!("/api/v1/query?query={encoded}")).ok()?;
    let body = body(&response);
    // Chunked or not, the JSON object is between the first '{' and the last '}'.
    let json = &body[body.find('{')?..=body.rfind('}')?];
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    value["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_irisd_and_sees_the_counters_move() {
    let (admin, line) = admin_address();
    let server = Server::start_with(2, &[line.as_str()]);
    let dir = tempfile::tempdir().unwrap();
    let (mut prometheus, api) = start_prometheus(dir.path(), &admin);
    let wait_for = |expression: &str, want: &dyn Fn(f64) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let value = query(&api, expression);
            if value.is_some_and(want) {
                return value.unwrap();
            }
            assert!(Instant::now() < deadline, "{expression}: {value:?} after 30 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(wait_for("up{job=\"irisd\"}", &|up| up == 1.0), 1.0);
    let before = wait_for("sum(iris_messages_stored_total)", &|_| true);
    let (sender, recipient) = (user_on_shard(0, 2, 10), user_on_shard(1, 2, 20));
    Client::connect(server.client_config(recipient, 1)).await.unwrap().close().await.unwrap();
    let client = Client::connect(server.client_config(sender, 1)).await.unwrap();
    for index in 0..100u32 {
        client.send(recipient, index.to_le_bytes().to_vec()).await.unwrap();
    }
    client.close().await.unwrap();
    let after = wait_for("sum(iris_messages_stored_total)", &|stored| stored >= before + 100.0);
    assert!(after >= before + 100.0);
    // A histogram through Prometheus's own functions.
    wait_for("sum(iris_send_sojourn_seconds_count{shard=\"0\"})", &|count| count >= 100.0);
    let _ = prometheus.kill();
    let _ = prometheus.wait();
}
