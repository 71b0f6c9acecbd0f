//! What an operator installs from deploy/: the systemd unit passes
//! `systemd-analyze verify` with no warning, the sysusers.d and tmpfiles.d
//! snippets create the user and directories in a scratch root, and irisd
//! speaks the service protocol of its `Type=notify` unit: STATUS while the
//! logs recover, READY once it serves, WATCHDOG pings while every shard
//! loop is alive (and none once one stalls), STOPPING when SIGTERM drains.

mod common;

use common::rand_u64;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)
}

#[test]
fn the_systemd_unit_verifies_without_a_warning() {
    // verify checks that ExecStart's binary exists: point it at this build.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(deploy("irisd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/irisd serve"), "the documented install path");
    let unit = unit.replace("/usr/local/bin/irisd", env!("CARGO_BIN_EXE_irisd"));
    let path = dir.path().join("irisd.service");
    std::fs::write(&path, unit).unwrap();
    let output = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "systemd-analyze verify failed: {stderr}");
    // Unknown keys and bad values are only warnings to verify: none allowed
    // about the unit (each names its file). Lines about the machine itself
    // (no systemd running as PID 1 here) are not the unit's.
    let about_unit: Vec<&str> = stderr.lines().filter(|line| line.contains("irisd.service")).collect();
    assert!(about_unit.is_empty(), "systemd-analyze verify warned about the unit: {about_unit:?}");
    if !stderr.trim().is_empty() {
        eprintln!("systemd-analyze verify said (not about the unit): {stderr}");
    }
}

#[test]
fn the_sysusers_and_tmpfiles_snippets_create_the_user_and_a_private_data_directory() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let run = |tool: &str, args: &[&str], file: &str| {
        let output = Command::new(tool)
            .arg(format!("--root={}", root.path().display()))
            .args(args)
            .arg(deploy(file))
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(output.status.success(), "{tool}: {}", String::from_utf8_lossy(&output.stderr));
    };
    run("systemd-sysusers", &[], "iris.sysusers");
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let iris = passwd.lines().find(|line| line.starts_with("iris:")).expect("the iris user");
    assert!(iris.ends_with(":/var/lib/iris:/usr/sbin/nologin"), "{iris}");
    run("systemd-tmpfiles", &["--create"], "iris.tmpfiles");
    let data = std::fs::metadata(root.path().join("var/lib/iris")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&data.permissions()) & 0o777, 0o700);
}

/// A fake service manager: the notification socket irisd is pointed at,
/// and every message it sent, in order.
struct Manager {
    path: PathBuf,
    messages: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Manager {
    fn new() -> Manager {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&messages);
        std::thread::spawn(move || {
            let mut buffer = vec![0u8; 4096];
            while let Ok(bytes) = socket.recv(&mut buffer) {
                kept.lock().unwrap().push(String::from_utf8_lossy(&buffer[..bytes]).into_owned());
            }
        });
        Manager { path, messages, _dir: dir }
    }

    /// Every line received so far.
    fn lines(&self) -> Vec<String> {
        self.messages.lock().unwrap().iter().flat_map(|message| message.lines().map(str::to_owned)).collect()
    }

    /// Waits (at most `wait`) until a line starting with `prefix` arrives.
    fn wait_for(&self, prefix: &str, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        loop {
            let lines = self.lines();
            if lines.iter().any(|line| line.starts_with(prefix)) {
                return lines;
            }
            assert!(Instant::now() < deadline, "no {prefix} within {wait:?}; got {lines:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn count(&self, line: &str) -> usize {
        self.lines().iter().filter(|l| *l == line).count()
    }
}

/// Starts a 2-shard irisd under the fake manager with a 200 ms watchdog.
fn serve_under(manager: &Manager, data_dir: &Path, failpoint: &str) -> (std::process::Child, u16) {
    let port = 20_000 + (rand_u64() % 12_000) as u16;
    let config = data_dir.join("drain.toml");
    std::fs::write(&config, "[runtime]\ndrain_timeout_ms = 2000\n").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_irisd"))
        .args(["serve", "--shards", "2", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data_dir)
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &manager.path)
        .env("WATCHDOG_USEC", "200000")
        .env("IRIS_FAILPOINT", failpoint)
        .env("IRIS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, port)
}

fn sigterm_and_wait(child: &mut std::process::Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) on a child this test owns and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "irisd did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn irisd_tells_its_service_manager_status_ready_watchdog_and_stopping() {
    let manager = Manager::new();
    let data = tempfile::tempdir().unwrap();
    let (mut child, port) = serve_under(&manager, data.path(), "");
    let lines = manager.wait_for("READY=1", Duration::from_secs(30));
    // A device registers on shard 0: its log gets a segment.
    let authority =
        irisd::auth::TokenAuthority::load_or_create(&data.path().join("keys/token-signing.key"), false).unwrap().0;
    let user = common::user_on_shard(0, 2, 1);
    let token =
        authority.mint(irisd::auth::Claims { user_id: user, device_id: 1, expires_at_s: common::now_s() + 600 });
    let config = iris_client::ClientConfig::new(format!("127.0.0.1:{port}"), data.path().join("tls/cert.pem"), token);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        iris_client::Client::connect(config).await.unwrap().close().await.unwrap();
    });
    let ready_at = lines.iter().position(|line| line == "READY=1").unwrap();
    assert!(lines[..ready_at].iter().any(|line| line.starts_with("STATUS=recovering")), "{lines:?}");
    assert!(lines[..ready_at].iter().any(|line| line == "STATUS=recovered 2 of 2 shard(s)"), "{lines:?}");
    assert!(!lines[..ready_at].iter().any(|line| line == "WATCHDOG=1"), "pings before start-up completed");
    // Each step of recovery extends the start timeout by 10 minutes.
    for (index, line) in lines[..ready_at].iter().enumerate() {
        if line.starts_with("STATUS=recover") {
            assert_eq!(lines.get(index + 1).map(String::as_str), Some("EXTEND_TIMEOUT_USEC=600000000"), "{lines:?}");
        }
    }
    // Pings at half the 200 ms interval.
    let deadline = Instant::now() + Duration::from_secs(10);
    while manager.count("WATCHDOG=1") < 5 {
        assert!(Instant::now() < deadline, "too few watchdog pings: {:?}", manager.lines());
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = sigterm_and_wait(&mut child);
    assert!(status.success(), "{status:?}");
    let lines = manager.lines();
    let stopping = lines.iter().position(|line| line == "STOPPING=1").unwrap_or_else(|| panic!("{lines:?}"));
    // The stop timeout is extended to the drain timeout (2 s here) plus 10 s.
    assert!(lines[stopping..].iter().any(|line| line == "EXTEND_TIMEOUT_USEC=12000000"), "{lines:?}");
    // A restart recovers the log the first run wrote and says so, segment
    // by segment.
    let restarted = Manager::new();
    let (mut child, _) = serve_under(&restarted, data.path(), "");
    let lines = restarted.wait_for("READY=1", Duration::from_secs(30));
    let ready_at = lines.iter().position(|line| line == "READY=1").unwrap();
    assert!(
        lines[..ready_at].iter().any(|line| line.starts_with("STATUS=shard 0: recovered log segment")),
        "{lines:?}"
    );
    // Each step extends the start timeout, segments included.
    for (index, line) in lines[..ready_at].iter().enumerate() {
        if line.starts_with("STATUS=shard 0: recovered log segment") {
            assert_eq!(lines.get(index + 1).map(String::as_str), Some("EXTEND_TIMEOUT_USEC=600000000"), "{lines:?}");
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_stalled_shard_stops_the_watchdog_pings() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: failpoints exist only in debug builds of irisd");
        return;
    }
    let manager = Manager::new();
    let data = tempfile::tempdir().unwrap();
    let (mut child, port) = serve_under(&manager, data.path(), "hang-on-connection:1");
    manager.wait_for("READY=1", Duration::from_secs(30));
    // A connection attempt to shard 1 stops its loop for good.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(common::client_tls(&data.path().join("tls/cert.pem")));
        let address = format!("127.0.0.1:{}", port + 1).parse().unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.connect(address, "localhost").unwrap()).await;
    });
    // The stall shows after 5 s without a heartbeat; then no more pings.
    manager.wait_for("STATUS=shard(s) [1] stalled", Duration::from_secs(30));
    let pings = manager.count("WATCHDOG=1");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(manager.count("WATCHDOG=1"), pings, "pings went on with a stalled shard");
    let _ = child.kill();
    let _ = child.wait();
}
