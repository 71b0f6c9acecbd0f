//! The server under test: an irisd this harness spawns (pinned to its own
//! CPUs), or one already running; and what /proc says about its CPU and memory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A spawned irisd, killed on drop.
#[derive(Debug)]
pub struct SpawnedServer {
    /// The process.
    child: Child,
    /// Its data directory (removed on drop).
    data_dir: tempfile::TempDir,
    /// host:port of shard 0.
    pub address: String,
}

/// What to spawn.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// The irisd binary.
    pub irisd: PathBuf,
    /// Shard 0's port.
    pub port: u16,
    /// CPU list for `taskset` (e.g. "0"), or none.
    pub cpus: Option<String>,
    /// Extra lines of TOML configuration.
    pub config: Vec<String>,
    /// Extra command-line arguments for `irisd serve`.
    pub args: Vec<String>,
}

impl SpawnedServer {
    /// Starts irisd and waits for its ready line.
    pub fn start(options: &SpawnOptions) -> Result<SpawnedServer, String> {
        if !options.irisd.exists() {
            return Err(format!("irisd binary not found at {} (build it or pass --irisd)", options.irisd.display()));
        }
        let data_dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let config_path = data_dir.path().join("perf.toml");
        std::fs::write(&config_path, options.config.join("\n")).map_err(|e| e.to_string())?;
        let mut command = match &options.cpus {
            Some(cpus) => {
                let mut command = Command::new("taskset");
                command.arg("-c").arg(cpus).arg(&options.irisd);
                command
            }
            None => Command::new(&options.irisd),
        };
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", options.port))
            .arg("--config")
            .arg(&config_path)
            .args(&options.args)
            .env("IRIS_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().map_err(|e| format!("spawning irisd: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines.by_ref().map_while(Result::ok).any(|line| line.contains("ready:"));
        if !ready {
            let status = child.wait().map_err(|e| e.to_string())?;
            return Err(format!("irisd exited before it was ready ({status})"));
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(SpawnedServer { child, data_dir, address: format!("127.0.0.1:{}", options.port) })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The data directory (certificate and token key).
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The kernel tears an exited process's io_uring down asynchronously, and
        // its sockets stay bound until then; wait (briefly) until the next run
        // could bind the same port.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::net::UdpSocket::bind(&self.address).is_err() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// Resident set size of a process in bytes, from /proc/PID/status.
pub fn process_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU seconds this process (the load generator) has used.
pub fn own_cpu_seconds() -> f64 {
    process_cpu_seconds(std::process::id()).unwrap_or(0.0)
}
