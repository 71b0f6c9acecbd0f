//! The configuration as operators meet it: every key irisd reads is in
//! docs/configuration.md (and nothing else is), deploy/irisd.toml is
//! accepted by `irisd check-config`, and a bad file is refused by
//! `check-config` and by `irisd serve` with the file, the key and why.

use std::path::Path;
use std::process::Command;

fn repository(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file)
}

/// `section.key` of every setting, from the default configuration.
fn keys() -> Vec<String> {
    let value = serde_json::to_value(irisd::config::Config::default()).unwrap();
    let mut keys = Vec::new();
    for (name, value) in value.as_object().unwrap() {
        match value.as_object() {
            Some(section) => keys.extend(section.keys().map(|key| format!("{name}.{key}"))),
            None => keys.push(name.clone()),
        }
    }
    keys
}

#[test]
fn every_key_is_documented_and_every_documented_key_exists() {
    let doc = std::fs::read_to_string(repository("docs/configuration.md")).unwrap();
    // The reference table: rows of the form "| `section.key` | default | unit | bound | ... |".
    let documented: Vec<String> = doc
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`').map(|(key, _)| key.to_owned()))
        .collect();
    let keys = keys();
    assert!(keys.len() > 40, "the key list looks incomplete: {keys:?}");
    for key in &keys {
        assert!(documented.contains(key), "docs/configuration.md does not document `{key}`");
    }
    for key in &documented {
        assert!(keys.contains(key), "docs/configuration.md documents `{key}`, which irisd does not read");
    }
}

fn check_config(path: &Path) -> (bool, i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_irisd")).arg("check-config").arg(path).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), output.status.code().unwrap_or(-1), text)
}

#[test]
fn the_shipped_configuration_passes_check_config() {
    let (ok, _, text) = check_config(&repository("deploy/irisd.toml"));
    assert!(ok, "{text}");
    assert!(text.contains(": ok"), "{text}");
}

#[test]
fn a_bad_file_is_refused_with_its_path_key_and_reason_by_check_config_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("unknown.toml", "[limits]\nmailbox_mesages_max = 5\n", "mailbox_mesages_max"),
        ("range.toml", "[storage]\nsegment_bytes_max = 4096\n", "storage.segment_bytes_max"),
        ("type.toml", "[runtime]\nidle_timeout_ms = \"soon\"\n", "idle_timeout_ms"),
        ("drain.toml", "[runtime]\ndrain_timeout_ms = 0\n", "runtime.drain_timeout_ms"),
        ("channels.toml", "[limits]\nshard_channel_batches_max = 1000000\n", "limits.shard_channel_batches_max"),
    ];
    for (name, text, key) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let (ok, code, message) = check_config(&path);
        assert!(!ok && code == 1, "{name}: check-config accepted it or exited {code}: {message}");
        assert!(message.contains(&path.display().to_string()) && message.contains(key), "{name}: {message}");
        // irisd serve refuses it before touching anything, with the same words.
        let data = dir.path().join(format!("data-{name}"));
        let output = Command::new(env!("CARGO_BIN_EXE_irisd"))
            .args(["serve", "--listen", "127.0.0.1:1", "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}: {stderr}");
        let first_line = message.lines().next().unwrap();
        assert!(stderr.contains(first_line), "{name}: serve said {stderr:?}, check-config {first_line:?}");
        assert!(!data.exists(), "{name}: serve created the data directory of a refused configuration");
    }
}

#[test]
fn check_config_counts_the_shards_serve_would_run() {
    // No `shards` in the file: serve runs one per allowed CPU, so the ports
    // from 65535 up do not fit once there are two CPUs; check-config must
    // say so too instead of checking one shard.
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ports.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:65535\"\n").unwrap();
    let (ok, code, message) = check_config(&path);
    assert!(!ok && code == 1 && message.contains("one port per shard"), "{code}: {message}");
    std::fs::write(&path, "listen = \"127.0.0.1:65535\"\nshards = 1\n").unwrap();
    let (ok, _, message) = check_config(&path);
    assert!(ok, "{message}");
}
