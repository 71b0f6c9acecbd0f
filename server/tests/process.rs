//! The process and its data directory: relative and absolute paths, one
//! server per directory, restarts right after a SIGKILL, file modes, and the
//! close code of a replaced session.

mod common;

use common::{rand_u64, user_on_shard, Raw, Server};
use iris_client::Client;
use iris_protocol::frames::Frame;
use iris_protocol::{close_code, ErrorCode};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One MiB segments: the smallest irisd accepts, so a few MiB of messages
/// rotate the log several times.
/// Small segments, and no rate limits or CoDel: the test sends as fast as it
/// can and counts refusals, which only a rotation could cause.
const SMALL_SEGMENTS: &str = "[storage]\nsegment_bytes_max = 1048576\n\
    [rate_limits]\ndevice_sends_per_s = 0\ndevice_bytes_per_s = 0\npair_sends_per_s = 0\n\
    [admission]\ncodel_target_ms = 0\n";

/// Sends `count` messages of `bytes` each, 32 in flight, without retrying
/// refusals, and returns how many were refused (each is printed).
async fn count_refusals(config: iris_client::ClientConfig, to_user: u64, count: usize, bytes: usize) -> usize {
    let mut config = config;
    config.retry_refusals = false;
    let client = Client::connect(config).await.expect("connect sender");
    let mut refused = 0;
    let mut window = std::collections::VecDeque::new();
    for index in 0..count {
        let mut payload = vec![(index % 251) as u8; bytes];
        payload[..8].copy_from_slice(&(index as u64).to_le_bytes());
        window.push_back(client.send_nowait(to_user, payload).await.expect("queue send"));
        while window.len() >= 32 {
            if let Err(error) = window.pop_front().unwrap().await.expect("answer") {
                eprintln!("refused: {error}");
                refused += 1;
            }
        }
    }
    for ack in window {
        if let Err(error) = ack.await.expect("answer") {
            eprintln!("refused: {error}");
            refused += 1;
        }
    }
    client.close().await.unwrap();
    refused
}

/// Reads the child's stdout until irisd prints its ready line (false if it
/// exits first), then keeps draining it so irisd never blocks on the pipe.
fn wait_until_ready(child: &mut std::process::Child) -> bool {
    let mut lines = BufReader::new(child.stdout.take().expect("stdout piped")).lines();
    let ready = lines.by_ref().map_while(Result::ok).any(|line| line.contains("ready:"));
    if ready {
        std::thread::spawn(move || for _ in lines {});
    }
    ready
}

/// Starts a 2-shard `irisd serve` on `data_dir` with an admin endpoint and
/// failpoint `failpoint` armed; returns the child (stdout piped), its base
/// port and the admin address.
fn serve_with_admin_and_failpoint(data_dir: &Path, failpoint: &str) -> (std::process::Child, u16, String) {
    let port = 20_000 + (rand_u64() % 12_000) as u16;
    let admin = format!("127.0.0.1:{}", port + 100);
    let config = data_dir.join("admin.toml");
    std::fs::write(&config, format!("admin_listen = \"{admin}\"\n")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_irisd"))
        .args(["serve", "--shards", "2", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data_dir)
        .arg("--config")
        .arg(&config)
        .env("IRIS_FAILPOINT", failpoint)
        .env("IRIS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, port, admin)
}

/// Starts `irisd serve` in `cwd` with `--data-dir data_dir` (as given:
/// relative or absolute); returns the child and its base port.
fn serve_in(cwd: &Path, data_dir: &Path, config: &str) -> (std::process::Child, u16) {
    let config_path = cwd.join("irisd-test.toml");
    std::fs::write(&config_path, config).unwrap();
    for _ in 0..20 {
        let port = 20_000 + (rand_u64() % 12_000) as u16;
        let mut child = Command::new(env!("CARGO_BIN_EXE_irisd"))
            .current_dir(cwd)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--shards", "1", "--config"])
            .arg(&config_path)
            .env("IRIS_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        if wait_until_ready(&mut child) {
            return (child, port);
        }
        let _ = child.wait();
    }
    panic!("irisd did not start");
}

async fn sends_survive_rotation_with(data_dir_argument: &Path, cwd: &Path, absolute_dir: &Path) {
    let (mut child, port) = serve_in(cwd, data_dir_argument, SMALL_SEGMENTS);
    let authority =
        irisd::auth::TokenAuthority::load_or_create(&absolute_dir.join("keys/token-signing.key"), false).unwrap().0;
    let token = |user: u64| {
        authority.mint(irisd::auth::Claims { user_id: user, device_id: 1, expires_at_s: common::now_s() + 600 })
    };
    let ca = absolute_dir.join("tls/cert.pem");
    let address = format!("127.0.0.1:{port}");
    let (sender, recipient) = (user_on_shard(0, 1, 10), user_on_shard(0, 1, 20));
    Client::connect(iris_client::ClientConfig::new(&address, &ca, token(recipient)))
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    // 3.5 MiB of messages: at least three new segments, each of whose first
    // write once failed when the data directory was relative.
    let config = iris_client::ClientConfig::new(&address, &ca, token(sender));
    let refused = count_refusals(config, recipient, 700, 5 * 1024).await;
    let segments = std::fs::read_dir(absolute_dir.join("shard-0"))
        .unwrap()
        .filter(|entry| entry.as_ref().unwrap().file_name().to_string_lossy().ends_with(".log"))
        .count();
    let _ = child.kill();
    let _ = child.wait();
    assert!(segments >= 3, "the log should have rotated: {segments} segment(s)");
    assert_eq!(refused, 0, "no send may be refused for a rotation ({})", data_dir_argument.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_and_absolute_data_directories_both_rotate_without_refusals() {
    let root = tempfile::tempdir().unwrap();
    // Relative to the server's working directory, as the default ./iris-data is.
    sends_survive_rotation_with(Path::new("./iris-data"), root.path(), &root.path().join("iris-data")).await;
    let absolute = root.path().join("absolute-data");
    sends_survive_rotation_with(&absolute, root.path(), &absolute).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_one_data_directory_is_refused_with_the_holder_named() {
    let mut server = Server::start(1);
    let output = Command::new(env!("CARGO_BIN_EXE_irisd"))
        .args(["serve", "--shards", "1", "--listen"])
        .arg(format!("127.0.0.1:{}", server.base_port + 7))
        .arg("--data-dir")
        .arg(server.data_dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success(), "a second irisd must not start on a locked data directory");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use by another irisd"), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", server.child.id())), "the holder is named: {stderr}");
    server.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_right_after_sigkill_comes_up_at_the_first_attempt() {
    let mut server = Server::start(2);
    let user = user_on_shard(1, 2, 40);
    Client::connect(server.client_config(user, 1)).await.unwrap().close().await.unwrap();
    for round in 0..6 {
        server.kill9();
        assert!(server.restart_once(), "restart {round} right after SIGKILL failed");
    }
    Client::connect(server.client_config(user, 1)).await.expect("serving after the restarts").close().await.unwrap();
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_keys_and_directories_are_private_to_irisd() {
    let server = Server::start(1);
    let (sender, recipient) = (user_on_shard(0, 1, 50), user_on_shard(0, 1, 60));
    Client::connect(server.client_config(recipient, 1)).await.unwrap().close().await.unwrap();
    assert_eq!(count_refusals(server.client_config(sender, 1), recipient, 10, 100).await, 0);
    let root = server.data_dir.path();
    let mut checked = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                assert_eq!(mode_of(&path), 0o700, "{}", path.display());
                stack.push(path);
            } else if path.ends_with("tls/cert.pem") {
                assert_eq!(mode_of(&path), 0o644, "clients read the certificate");
            } else if path.extension().is_some_and(|extension| extension == "toml") && path.starts_with(root) {
                // The test's own configuration file.
            } else {
                assert_eq!(mode_of(&path) & 0o077, 0, "{} is readable by others", path.display());
                checked += 1;
            }
        }
    }
    assert!(checked >= 4, "segments, keys and the message-id reservation were checked ({checked})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_session_gets_its_own_error_and_close_code() {
    let server = Server::start(1);
    let user = user_on_shard(0, 1, 70);
    let token = server.token(user, 1);
    let mut first = Raw::connect(&server, 0).await;
    assert!(matches!(first.hello(&token, 0).await, Frame::Welcome(_)));
    let mut second = Raw::connect(&server, 0).await;
    assert!(matches!(second.hello(&token, 0).await, Frame::Welcome(_)));
    match first.read_frame().await {
        Some(Frame::Error(error)) => assert_eq!(ErrorCode::from_u16(error.code), Some(ErrorCode::SessionReplaced)),
        other => panic!("expected SessionReplaced, got {other:?}"),
    }
    assert_eq!(first.closed_code().await, Some(u64::from(close_code::REPLACED)));
    // The newer session keeps working.
    second.write_frame(&Frame::Ping(iris_protocol::frames::Ping { nonce: 5 })).await;
    assert!(matches!(second.read_frame().await, Some(Frame::Pong(pong)) if pong.nonce == 5));
}

/// Waits up to `wait` for `child` to exit; its status, or `None` if it still runs.
fn exited_within(child: &mut std::process::Child, wait: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Spawns irisd with a failpoint armed; returns the child and its stdout lines.
fn spawn_with_failpoint(data_dir: &Path, port: u16, failpoint: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_irisd"))
        .args(["serve", "--shards", "2", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data_dir)
        .env("IRIS_FAILPOINT", failpoint)
        .env("IRIS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_panics_takes_the_process_down() {
    let dir = tempfile::tempdir().unwrap();
    let port = 20_000 + (rand_u64() % 12_000) as u16;
    let mut child = spawn_with_failpoint(dir.path(), port, "panic-on-connection:1");
    assert!(wait_until_ready(&mut child), "irisd did not start");
    // A connection to shard 1 makes its loop panic.
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(common::client_tls(&dir.path().join("tls/cert.pem")));
    let address = format!("127.0.0.1:{}", port + 1).parse().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.connect(address, "localhost").unwrap()).await;
    let status = exited_within(&mut child, Duration::from_secs(10));
    let _ = child.kill();
    let status = status.expect("irisd kept running with a dead shard");
    assert!(!status.success(), "a panic must end the process with a failure status: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_during_recovery_ends_startup_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let port = 20_000 + (rand_u64() % 12_000) as u16;
    let mut child = spawn_with_failpoint(dir.path(), port, "panic-in-recovery:1");
    let status = exited_within(&mut child, Duration::from_secs(10));
    let _ = child.kill();
    let mut stdout = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout);
    assert!(!stdout.contains("ready:"), "irisd must not report ready: {stdout}");
    assert!(!status.expect("startup hung after a shard panicked in recovery").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stderr_never_stalls_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let port = 20_000 + (rand_u64() % 12_000) as u16;
    // Every packet logs at trace level, and nobody reads stderr: a pipe
    // fills within milliseconds.
    let mut child = Command::new(env!("CARGO_BIN_EXE_irisd"))
        .args(["serve", "--shards", "1", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .env("IRIS_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stalled_stderr = child.stderr.take().unwrap();
    // The smallest pipe the kernel allows (one page), so it fills at once.
    // SAFETY: fcntl on a pipe descriptor this process owns.
    unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&stalled_stderr), libc::F_SETPIPE_SZ, 4096) };
    assert!(wait_until_ready(&mut child), "irisd did not start");
    let authority =
        irisd::auth::TokenAuthority::load_or_create(&dir.path().join("keys/token-signing.key"), false).unwrap().0;
    let token = |user: u64| {
        authority.mint(irisd::auth::Claims { user_id: user, device_id: 1, expires_at_s: common::now_s() + 600 })
    };
    let config = |user| {
        iris_client::ClientConfig::new(format!("127.0.0.1:{port}"), dir.path().join("tls/cert.pem"), token(user))
    };
    let run = async {
        Client::connect(config(2)).await.unwrap().close().await.unwrap();
        count_refusals(config(1), 2, 300, 100).await
    };
    let refused = tokio::time::timeout(Duration::from_secs(60), run).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(refused.expect("the shards stalled behind stderr"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_shard_whose_loop_stalls() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, port, admin) = serve_with_admin_and_failpoint(dir.path(), "hang-on-connection:1");
    assert!(wait_until_ready(&mut child), "irisd did not start");
    let health = |admin: &str| common::http_get(admin, "/health");
    // Ready means every loop has a heartbeat already (this once raced);
    // only the first storage probe round may still be under way.
    let first = common::http_get_until(&admin, "/health", Duration::from_secs(5), |r| !r.contains("not probed"));
    assert!(first.starts_with("HTTP/1.1 200"), "healthy at start: {first}");
    // Idle shards keep their heartbeat: still healthy after the stall window.
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let idle = health(&admin);
    assert!(idle.starts_with("HTTP/1.1 200"), "idle is not stalled: {idle}");
    // A connection to shard 1 stops its loop.
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(common::client_tls(&dir.path().join("tls/cert.pem")));
    let address = format!("127.0.0.1:{}", port + 1).parse().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.connect(address, "localhost").unwrap()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        last = health(&admin);
        if last.starts_with("HTTP/1.1 503") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(last.starts_with("HTTP/1.1 503") && last.contains("stalled shards: 1"), "{last}");
}

/// The first frame answering a Hello with `token` on shard 0.
async fn hello_answer(server: &Server, token: &str) -> Frame {
    let mut raw = Raw::connect(server, 0).await;
    raw.hello(token, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_key_keeps_old_tokens_until_retired_and_accepts_new_ones_after_a_restart() {
    let mut server = Server::start(1);
    let user = user_on_shard(0, 1, 71);
    let old_token = server.token(user, 1);
    assert!(matches!(hello_answer(&server, &old_token).await, Frame::Welcome(_)));
    let output = Command::new(env!("CARGO_BIN_EXE_irisd"))
        .args(["rotate-token-key", "--data-dir"])
        .arg(server.data_dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "rotate-token-key failed: {}", String::from_utf8_lossy(&output.stderr));
    let new_token = server.token(user, 2);
    assert_ne!(old_token, new_token);
    server.kill9();
    server.restart();
    assert!(matches!(hello_answer(&server, &old_token).await, Frame::Welcome(_)), "the retired key's token");
    assert!(matches!(hello_answer(&server, &new_token).await, Frame::Welcome(_)), "the new key's token");
    // Deleting the retired public key ends its tokens.
    let retired = server.data_dir.path().join("keys/token-retired");
    for entry in std::fs::read_dir(&retired).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    server.kill9();
    server.restart();
    match hello_answer(&server, &old_token).await {
        Frame::Error(error) => {
            assert_eq!(ErrorCode::from_u16(error.code), Some(ErrorCode::InvalidToken));
            assert!(error.message.contains("unknown key"), "{}", error.message);
        }
        other => panic!("a token of a deleted key was answered with {other:?}"),
    }
    assert!(matches!(hello_answer(&server, &new_token).await, Frame::Welcome(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_removed_by_another_device_of_its_user_stays_removed_after_a_crash() {
    let admin = format!("127.0.0.1:{}", 20_000 + rand_u64() % 12_000);
    let admin_line = format!("admin_listen = \"{admin}\"");
    let mut server = Server::start_with(1, &[admin_line.as_str()]);
    let user = user_on_shard(0, 1, 72);
    let mut phone = Raw::connect(&server, 0).await;
    assert!(matches!(phone.hello(&server.token(user, 1), 0).await, Frame::Welcome(_)));
    let mut laptop = Raw::connect(&server, 0).await;
    let laptop_token = server.token(user, 2);
    assert!(matches!(laptop.hello(&laptop_token, 0).await, Frame::Welcome(_)));
    phone.write_frame(&Frame::RemoveDevice(iris_protocol::frames::RemoveDevice { device_id: 2 })).await;
    match phone.read_frame().await {
        Some(Frame::DeviceRemoved(removed)) => assert_eq!(removed.device_id, 2),
        other => panic!("expected DeviceRemoved, got {other:?}"),
    }
    match laptop.read_frame().await {
        Some(Frame::Error(error)) => assert_eq!(ErrorCode::from_u16(error.code), Some(ErrorCode::DeviceRemoved)),
        other => panic!("the removed laptop's session should end with DeviceRemoved, got {other:?}"),
    }
    assert_eq!(laptop.closed_code().await, Some(u64::from(close_code::REMOVED)));
    let metrics = common::http_get(&admin, "/metrics");
    assert!(metrics.contains("iris_devices_removed_total{shard=\"0\"} 1"), "{metrics}");
    // The answer came after the removal was durable: a SIGKILL keeps it.
    server.kill9();
    server.restart();
    match hello_answer(&server, &laptop_token).await {
        Frame::Error(error) => assert_eq!(ErrorCode::from_u16(error.code), Some(ErrorCode::DeviceRemoved)),
        other => panic!("a removed device came back after a restart: {other:?}"),
    }
    assert!(matches!(hello_answer(&server, &server.token(user, 1)).await, Frame::Welcome(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_whose_cross_shard_channels_stay_idle_survives_many_wake_ups() {
    // Every wake-up of a shard's loop once handed glommio one more waker
    // for each idle cross-shard channel, kept until a batch came: memory
    // that grew while the link was idle, and at 32,768 of them an overflow
    // that aborted the process (hit by a million messages drained from the
    // log, and by an idle 2-shard node after ~9 hours of heartbeats). Here
    // 40,000 round trips wake shard 1 while nothing crosses shards.
    let mut server = Server::start_with(2, &[]);
    let user = user_on_shard(1, 2, 100);
    let mut raw = Raw::connect(&server, 1).await;
    assert!(matches!(raw.hello(&server.token(user, 1), 0).await, Frame::Welcome(_)));
    for nonce in 0..40_000 {
        raw.write_frame(&Frame::Ping(iris_protocol::frames::Ping { nonce })).await;
        match raw.read_frame().await {
            Some(Frame::Pong(pong)) if pong.nonce == nonce => {}
            other => panic!("ping {nonce}: {other:?}"),
        }
    }
    server.assert_running();
}

/// One scraper that sends its request a byte at a time (or many that send
/// nothing) never stops another from being answered: each request has its
/// own thread and two seconds in all, and connections past the cap are
/// closed rather than queued behind the slow ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_scraper_never_blocks_the_admin_endpoint() {
    use std::io::Write;
    let (admin, admin_line) = common::admin_address();
    let mut server = Server::start_with(1, &[&admin_line]);
    server.assert_running();
    // A slowloris: a byte every 100 ms for 8 s, the head never complete.
    let slow_admin = admin.clone();
    let slow = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(&slow_admin).unwrap();
        for _ in 0..80 {
            if stream.write_all(b"G").is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    std::thread::sleep(Duration::from_millis(300));
    // Answered at once, not after the slow one (its 5 s read timeout
    // would expire first on a server that serves one request at a time).
    let health = common::try_http_get(&admin, "/health").expect("a scrape behind a slow scraper");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(slow.join().unwrap(), "the slow scraper was cut off at its deadline");
    // Silent connections up to the cap and beyond: the ones past it are
    // closed, and once the others reach their deadline scrapes go through.
    let silent: Vec<_> = (0..40).map(|_| std::net::TcpStream::connect(&admin).unwrap()).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let answered = loop {
        match common::try_http_get(&admin, "/metrics") {
            Ok(answer) if answer.starts_with("HTTP/1.1 200") => break true,
            _ if std::time::Instant::now() > deadline => break false,
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    drop(silent);
    assert!(answered, "scrapes never came back after silent connections held the endpoint");
}

/// The admin endpoint is up before the logs are recovered: `/healthz` says
/// the process lives, `/readyz` answers 503 until every shard serves, then
/// 200 (a load balancer or systemd check can tell a long recovery from a
/// dead process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_ready_only_after_recovery_while_healthz_answers_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _, admin) = serve_with_admin_and_failpoint(dir.path(), "slow-recovery:1");
    // Shard 1 takes 3 s to recover: the endpoint answers long before.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let healthz = loop {
        match common::try_http_get(&admin, "/healthz") {
            Ok(answer) => break answer,
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(error) => panic!("the admin endpoint was not up during recovery: {error}"),
        }
    };
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    let readyz = common::http_get(&admin, "/readyz");
    assert!(readyz.starts_with("HTTP/1.1 503") && readyz.contains("starting"), "{readyz}");
    assert!(wait_until_ready(&mut child), "irisd did not start");
    let readyz = common::http_get_until(&admin, "/readyz", Duration::from_secs(10), |r| !r.contains("not probed"));
    let health = common::http_get(&admin, "/health");
    let _ = child.kill();
    let _ = child.wait();
    assert!(readyz.starts_with("HTTP/1.1 200"), "{readyz}");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}
