//! The operator's walkthrough of docs/operations.md under a real systemd:
//! a container (systemd-nspawn, a volatile root over this machine's /usr)
//! boots systemd as its PID 1 with the shipped unit, sysusers.d and
//! tmpfiles.d snippets and configuration installed where the docs put them.
//! The test then does what an operator does: create the user and the data
//! directory, start the service (Type=notify: `systemctl start` returns at
//! READY), check its status line and `/readyz`, mint a token, run traffic,
//! `systemctl restart` it under that traffic (the drain), read the journal
//! (records in the native protocol, with fields), and stop it cleanly.
//! The container shares this machine's network, so clients here reach it.

mod common;

use common::user_on_shard;
use iris_client::{Client, ClientConfig};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A booted container; dropping it powers it off (and kills it if need be).
struct Container {
    nspawn: Child,
    /// The container's PID 1 (systemd), as this machine sees it.
    leader: u32,
    _files: tempfile::TempDir,
}

impl Container {
    /// Boots a container with `binds` (host path, container path), read only.
    fn boot(binds: &[(PathBuf, &str)], files: tempfile::TempDir) -> Container {
        let name = format!("iris-test-{:08x}", common::rand_u64() as u32);
        let mut command = Command::new("systemd-nspawn");
        command
            .args(["--directory=/", "--volatile=yes", "--register=no", "--keep-unit", "--quiet"])
            .arg(format!("--machine={name}"))
            // A real host lets the unit's LimitMEMLOCK=4G through; so does this.
            .arg("--rlimit=RLIMIT_MEMLOCK=infinity");
        for (host, inside) in binds {
            command.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        // Only the base system: no unit of this machine's own is started.
        command.args(["--boot", "--", "systemd.firstboot=off", "systemd.unit=basic.target"]);
        let nspawn = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-nspawn runs (Debian's systemd-container; scripts/test.sh installs it)");
        let mut container = Container { leader: 0, nspawn, _files: files };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(container.nspawn.try_wait().unwrap().is_none(), "systemd-nspawn exited: it cannot boot here");
            // nspawn forks a helper first, which forks the container's PID 1:
            // look until a descendant is PID 1 of its own namespace.
            container.leader = container_init(container.nspawn.id()).unwrap_or(0);
            if container.leader != 0 {
                let state = container.run(&["systemctl", "is-system-running"]);
                let state = state.1.trim();
                if ["running", "degraded"].contains(&state) {
                    return container;
                }
            }
            assert!(Instant::now() < deadline, "the container did not finish booting");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `command` inside the container as root; (success, stdout + stderr).
    fn run(&self, command: &[&str]) -> (bool, String) {
        let output =
            Command::new("nsenter").args(["--target", &self.leader.to_string(), "--all", "--"]).args(command).output();
        let Ok(output) = output else { return (false, "nsenter did not run".into()) };
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        (output.status.success(), text)
    }

    /// Runs `command` inside the container and insists that it succeeds.
    fn must(&self, command: &[&str]) -> String {
        let (ok, text) = self.run(command);
        assert!(ok, "{command:?} failed in the container:\n{text}");
        text
    }

    /// A unit property, as `systemctl show -p NAME --value` gives it.
    fn property(&self, unit: &str, name: &str) -> String {
        self.must(&["systemctl", "show", unit, "-p", name, "--value"]).trim().to_owned()
    }

    /// A path inside the container, as this machine reaches it.
    fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.leader))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.leader != 0 {
            let _ = self.run(&["systemctl", "poweroff"]);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.nspawn.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Still up: killing a PID namespace's init ends every process in it
        // (a container left running would hold this test's ports).
        if self.leader != 0 && self.nspawn.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on the container's init, which this test started.
            unsafe { libc::kill(self.leader as libc::pid_t, libc::SIGKILL) };
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The descendant of `pid` that is PID 1 of its own PID namespace (the
/// container's init), if it exists yet.
fn container_init(pid: u32) -> Option<u32> {
    let mut pending = vec![pid];
    while let Some(parent) = pending.pop() {
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|child| child.parse::<u32>().ok()) {
            let status = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap_or_default();
            let init = status.lines().find(|line| line.starts_with("NSpid:")).is_some_and(|line| {
                let ids: Vec<&str> = line.split_whitespace().skip(1).collect();
                ids.len() > 1 && ids.last() == Some(&"1")
            });
            if init {
                return Some(child);
            }
            pending.push(child);
        }
    }
    None
}

fn repository(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file)
}

/// The shipped configuration with this test's ports (the rest as shipped).
fn configuration(port: u16, admin_port: u16) -> String {
    let shipped = std::fs::read_to_string(repository("deploy/irisd.toml")).unwrap();
    let mut lines = Vec::new();
    for line in shipped.lines() {
        if line.starts_with("listen =") {
            lines.push(format!("listen = \"127.0.0.1:{port}\""));
        } else if line.starts_with("admin_listen =") {
            lines.push(format!("admin_listen = \"127.0.0.1:{admin_port}\""));
        } else if line.starts_with("# shards =") {
            lines.push("shards = 2".to_owned());
        } else {
            lines.push(line.to_owned());
        }
    }
    assert!(lines.iter().any(|l| l.starts_with("listen =")) && lines.iter().any(|l| l.starts_with("admin_listen =")));
    lines.join("\n") + "\n"
}

#[test]
fn an_operator_installs_starts_restarts_and_stops_irisd_under_systemd() {
    let files = tempfile::tempdir().unwrap();
    // /usr/local/bin/irisd, as docs/operations.md installs it: a link to
    // this build, whose directory is bound in as well.
    let bin = files.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink("/opt/iris-build/irisd", bin.join("irisd")).unwrap();
    let build_dir = Path::new(env!("CARGO_BIN_EXE_irisd")).parent().unwrap().to_path_buf();
    let port = 20_000 + (common::rand_u64() % 12_000) as u16;
    let admin = format!("127.0.0.1:{}", port + 100);
    let config = files.path().join("irisd.toml");
    std::fs::write(&config, configuration(port, port + 100)).unwrap();
    let binds = [
        (bin, "/usr/local/bin"),
        (build_dir, "/opt/iris-build"),
        (repository("deploy/irisd.service"), "/etc/systemd/system/irisd.service"),
        (repository("deploy/iris.sysusers"), "/etc/sysusers.d/iris.conf"),
        (repository("deploy/iris.tmpfiles"), "/etc/tmpfiles.d/iris.conf"),
        (config, "/etc/iris/irisd.toml"),
    ];
    let container = Container::boot(&binds, files);

    // Install: the user and the data directory, then the unit.
    container.must(&["systemd-sysusers"]);
    let _ = container.run(&["systemd-tmpfiles", "--create"]); // other snippets of this machine may complain
    let data = container.must(&["stat", "-c", "%U %a", "/var/lib/iris"]);
    assert_eq!(data.trim(), "iris 700", "the data directory is iris's alone");
    container.must(&["irisd", "check-config", "/etc/iris/irisd.toml"]);
    container.must(&["systemctl", "daemon-reload"]);

    // First start: `systemctl start` of a Type=notify unit returns at READY.
    container.must(&["systemctl", "start", "irisd"]);
    assert_eq!(container.property("irisd", "ActiveState"), "active");
    assert_eq!(container.property("irisd", "SubState"), "running");
    let status = container.property("irisd", "StatusText");
    assert!(status.starts_with("serving 2 shard(s)"), "STATUS: {status}");
    assert_eq!(container.property("irisd", "User"), "iris");
    assert_eq!(container.property("irisd", "WatchdogUSec"), "30s");
    let ready = |r: &str| r.starts_with("HTTP/1.1 200");
    common::http_get_until(&admin, "/readyz", Duration::from_secs(15), ready);

    // A token from the service's key, and its CA, as a client gets them.
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(container.path("/var/lib/iris/tls/cert.pem"), ca.path()).unwrap();
    let (sender, recipient) = (user_on_shard(0, 2, 10), user_on_shard(1, 2, 20));
    let token = |user: u64| {
        let user = user.to_string();
        let args = ["irisd", "token", "--data-dir", "/var/lib/iris", "--user", &user, "--device", "1"];
        container.must(&args).trim().to_owned()
    };
    let address = format!("127.0.0.1:{port}");
    let sender_config = ClientConfig::new(address.clone(), ca.path(), token(sender));
    let recipient_config = ClientConfig::new(address, ca.path(), token(recipient));

    // Traffic, with a restart in the middle of it.
    const COUNT: usize = 300;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (mut receiver, client) = runtime.block_on(async {
        let receiver = Client::connect(recipient_config).await.unwrap();
        let client = Client::connect(sender_config).await.unwrap();
        for index in 0..COUNT / 2 {
            client.send(recipient, format!("m{index}").into_bytes()).await.unwrap();
        }
        (receiver, client)
    });
    let sending = runtime.spawn(async move {
        for index in COUNT / 2..COUNT {
            client.send(recipient, format!("m{index}").into_bytes()).await.expect("acknowledged in the end");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        client
    });
    std::thread::sleep(Duration::from_millis(100));
    container.must(&["systemctl", "restart", "irisd"]);
    assert_eq!(container.property("irisd", "ActiveState"), "active");
    let client = runtime.block_on(async {
        let client = tokio::time::timeout(Duration::from_secs(60), sending).await.expect("the sends finish").unwrap();
        let mut received = Vec::new();
        while received.len() < COUNT {
            let message = tokio::time::timeout(Duration::from_secs(30), receiver.recv())
                .await
                .unwrap_or_else(|_| panic!("only {} of {COUNT} messages arrived", received.len()))
                .unwrap();
            received.push(String::from_utf8(message.payload).unwrap());
        }
        let expected: Vec<String> = (0..COUNT).map(|index| format!("m{index}")).collect();
        assert_eq!(received, expected, "every message once, in order, across the restart");
        assert!(tokio::time::timeout(Duration::from_millis(300), receiver.recv()).await.is_err(), "a duplicate");
        assert!(client.session_info().connections >= 2, "the sender reconnected on its own");
        client
    });
    runtime.block_on(async {
        client.close().await.unwrap();
        receiver.close().await.unwrap();
    });

    // The journal has irisd's records in its native protocol: the drain's
    // record with its fields, at info priority, from the unit.
    let journal = container.must(&["journalctl", "-u", "irisd", "-o", "json", "--no-pager"]);
    let records: Vec<serde_json::Value> = journal.lines().filter_map(|line| serde_json::from_str(line).ok()).collect();
    let drain = records.iter().find(|record| record["SIGNAL"] == "15");
    let drain = drain.unwrap_or_else(|| panic!("no drain record with a SIGNAL field:\n{journal}"));
    assert_eq!(drain["PRIORITY"], "6", "{drain}");
    assert_eq!(drain["SYSLOG_IDENTIFIER"], "irisd", "{drain}");
    assert_eq!(drain["_TRANSPORT"], "journal", "the native protocol, not a stream line: {drain}");
    assert!(drain["MESSAGE"].as_str().unwrap().starts_with("draining"), "{drain}");
    assert!(records.iter().any(|record| record["SHARD"] == "1" && record["_TRANSPORT"] == "journal"));

    // Stop: the drain, then a clean exit.
    container.must(&["systemctl", "stop", "irisd"]);
    assert_eq!(container.property("irisd", "ActiveState"), "inactive");
    assert_eq!(container.property("irisd", "Result"), "success");
    assert_eq!(container.property("irisd", "ExecMainStatus"), "0");
    assert_eq!(container.property("irisd", "NRestarts"), "0", "systemd never had to restart it");
}
