//! Test support: a real irisd child process on loopback, token minting, and
//! a raw protocol client (quinn + iris-protocol frames) for the cases the SDK
//! never produces (repeated ids, garbage bytes, wrong shards).

#![allow(dead_code)]

use iris_protocol::frames::{self, Frame};
use iris_protocol::{encode, FrameDecoder, FRAME_BYTES_MAX_DEFAULT};
use irisd::auth::{Claims, TokenAuthority};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A data directory: a temporary one, or a given path.
pub struct DataDir {
    path: PathBuf,
    _temporary: Option<tempfile::TempDir>,
}

impl DataDir {
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// A running irisd; killed on drop.
pub struct Server {
    pub child: Child,
    pub data_dir: DataDir,
    pub base_port: u16,
    pub shards: u16,
    /// `IRIS_FAILPOINT` for every start (debug builds of irisd read it).
    pub failpoint: Option<String>,
    /// What the current process printed on stdout after its ready line.
    pub stdout: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts irisd with `shards` shards on a free port range, with extra flags.
    pub fn start(shards: u16) -> Server {
        Self::start_with(shards, &[])
    }

    pub fn start_with(shards: u16, config_toml: &[&str]) -> Server {
        let temporary = tempfile::tempdir().expect("temporary directory");
        let data_dir = DataDir { path: temporary.path().to_path_buf(), _temporary: Some(temporary) };
        Self::start_at(shards, data_dir, config_toml)
    }

    /// Starts irisd on a data directory at `path` (created if missing).
    pub fn start_in(shards: u16, path: PathBuf) -> Server {
        Self::start_in_with(shards, path, &[])
    }

    /// [`Server::start_in`] with extra configuration lines.
    pub fn start_in_with(shards: u16, path: PathBuf, config_toml: &[&str]) -> Server {
        std::fs::create_dir_all(&path).expect("create data directory");
        Self::start_at(shards, DataDir { path, _temporary: None }, config_toml)
    }

    /// Starts irisd with failpoint `failpoint` armed, at this start and every restart.
    pub fn start_with_failpoint(shards: u16, config_toml: &[&str], failpoint: &str) -> Server {
        let temporary = tempfile::tempdir().expect("temporary directory");
        let data_dir = DataDir { path: temporary.path().to_path_buf(), _temporary: Some(temporary) };
        Self::start_at_with(shards, data_dir, config_toml, Some(failpoint.to_owned()))
    }

    fn start_at(shards: u16, data_dir: DataDir, config_toml: &[&str]) -> Server {
        Self::start_at_with(shards, data_dir, config_toml, None)
    }

    fn start_at_with(shards: u16, data_dir: DataDir, config_toml: &[&str], failpoint: Option<String>) -> Server {
        // Rate limits are off unless a test sets them: most tests send as
        // fast as they can and check other things.
        let mut lines: Vec<&str> = config_toml.to_vec();
        if !lines.contains(&"[rate_limits]") {
            lines.extend(["[rate_limits]", "device_sends_per_s = 0", "device_bytes_per_s = 0", "pair_sends_per_s = 0"]);
        }
        // So is CoDel: its refusals depend on this machine's disk latency
        // (its unit tests and the simulation drive it with simulated time).
        if !lines.contains(&"[admission]") {
            lines.extend(["[admission]", "codel_target_ms = 0"]);
        }
        std::fs::write(data_dir.path().join("test-config.toml"), lines.join("\n")).expect("write config");
        for attempt in 0..20 {
            // Below the kernel's ephemeral range (32768+), so a client socket
            // bound while the server is down cannot take the server's port.
            let base_port = 20_000 + (rand_u64() % 12_000) as u16;
            if let Some((child, stdout)) = spawn_irisd(data_dir.path(), base_port, shards, failpoint.as_deref()) {
                return Server { child, data_dir, base_port, shards, failpoint, stdout };
            }
            eprintln!("irisd did not start on port {base_port} (attempt {attempt}); retrying");
        }
        panic!("irisd failed to start 20 times");
    }

    /// SIGKILLs the server.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same data directory and ports.
    pub fn restart(&mut self) {
        for _ in 0..50 {
            if let Some((child, stdout)) =
                spawn_irisd(self.data_dir.path(), self.base_port, self.shards, self.failpoint.as_deref())
            {
                self.child = child;
                self.stdout = stdout;
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("irisd did not restart");
    }

    /// Starts the server again at once, with no retry by the test: irisd
    /// itself must cope with ports a killed process still holds.
    pub fn restart_once(&mut self) -> bool {
        match spawn_irisd(self.data_dir.path(), self.base_port, self.shards, self.failpoint.as_deref()) {
            Some((child, stdout)) => {
                self.child = child;
                self.stdout = stdout;
                true
            }
            None => false,
        }
    }

    pub fn address(&self, shard: u16) -> String {
        format!("127.0.0.1:{}", self.base_port + shard)
    }

    pub fn ca(&self) -> PathBuf {
        self.data_dir.path().join("tls/cert.pem")
    }

    pub fn authority(&self) -> TokenAuthority {
        TokenAuthority::load_or_create(&self.data_dir.path().join("keys/token-signing.key"), false)
            .expect("token key")
            .0
    }

    pub fn token(&self, user: u64, device: u32) -> String {
        self.authority().mint(Claims { user_id: user, device_id: device, expires_at_s: now_s() + 3600 })
    }

    pub fn client_config(&self, user: u64, device: u32) -> iris_client::ClientConfig {
        iris_client::ClientConfig::new(self.address(0), self.ca(), self.token(user, device))
    }

    /// Whether the current process prints a line containing `text` within
    /// `wait` (its stdout is read by a thread of its own, which may not have
    /// read the last lines yet even once the process has exited).
    pub fn printed_within(&self, text: &str, wait: Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if self.stdout.lock().unwrap().iter().any(|line| line.contains(text)) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asserts the process is still alive.
    pub fn assert_running(&mut self) {
        assert!(self.child.try_wait().expect("try_wait").is_none(), "irisd exited");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `irisd serve` and waits for its ready line; `None` if it exited first.
/// The child and the lines it prints on stdout after its ready line.
type Spawned = (Child, Arc<std::sync::Mutex<Vec<String>>>);

fn spawn_irisd(data_dir: &std::path::Path, base_port: u16, shards: u16, failpoint: Option<&str>) -> Option<Spawned> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_irisd"));
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{base_port}"))
        .arg("--shards")
        .arg(shards.to_string())
        .env("IRIS_LOG", std::env::var("IRIS_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(failpoint) = failpoint {
        command.env("IRIS_FAILPOINT", failpoint);
    }
    let config = data_dir.join("test-config.toml");
    if config.exists() {
        command.arg("--config").arg(&config);
    }
    let mut child = command.spawn().expect("spawn irisd");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = lines.by_ref().map_while(Result::ok).any(|line| line.contains("ready:"));
    if ready {
        // Keep draining stdout so irisd never blocks on a full pipe.
        let printed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = Arc::clone(&printed);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        return Some((child, printed));
    }
    let _ = child.wait();
    None
}

pub fn now_s() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos());
    hasher.finish()
}

/// The home shard of `user` on a node with `shards` shards.
pub fn home_shard(user: u64, shards: u16) -> u16 {
    iris_shard_map::SlotTable::single_node(iris_shard_map::NodeId(0), shards, 1)
        .unwrap()
        .home(iris_shard_map::UserId(user))
        .shard
        .0
}

/// The first user id >= `from` homed on `shard`.
pub fn user_on_shard(shard: u16, shards: u16, from: u64) -> u64 {
    (from..).find(|user| home_shard(*user, shards) == shard).unwrap()
}

/// A raw protocol connection.
pub struct Raw {
    pub connection: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub decoder: FrameDecoder,
    pub push: Option<(quinn::RecvStream, FrameDecoder)>,
    _endpoint: quinn::Endpoint,
}

pub fn client_tls(ca: &std::path::Path) -> quinn::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![iris_protocol::ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap()))
}

impl Raw {
    pub async fn connect(server: &Server, shard: u16) -> Raw {
        Raw::try_connect(&server.address(shard), &server.ca(), Duration::from_secs(10)).await.expect("handshake")
    }

    /// A connection to `address` that gives up (returns `None`) instead of
    /// panicking when the server is down or restarting.
    pub async fn try_connect(address: &str, ca: &std::path::Path, wait: Duration) -> Option<Raw> {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).ok()?;
        endpoint.set_default_client_config(client_tls(ca));
        let address: SocketAddr = address.parse().unwrap();
        let connecting = endpoint.connect(address, "localhost").ok()?;
        let connection = tokio::time::timeout(wait, connecting).await.ok()?.ok()?;
        let (send, recv) = tokio::time::timeout(wait, connection.open_bi()).await.ok()?.ok()?;
        Some(Raw {
            connection,
            send,
            recv,
            decoder: FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT),
            push: None,
            _endpoint: endpoint,
        })
    }

    /// Writes `frame`; `false` if the connection is gone.
    pub async fn try_write_frame(&mut self, frame: &Frame) -> bool {
        let bytes = encode(frame, FRAME_BYTES_MAX_DEFAULT).unwrap();
        self.send.write_all(&bytes).await.is_ok()
    }

    /// Next response frame, or `None` if the connection ended or nothing
    /// came within `wait` (a killed server sends no close).
    pub async fn try_read_frame(&mut self, wait: Duration) -> Option<Frame> {
        let mut buffer = vec![0u8; 65536];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(frame) = self.decoder.next_frame().expect("server sent an undecodable frame") {
                return Some(frame);
            }
            match tokio::time::timeout_at(deadline, self.recv.read(&mut buffer)).await {
                Ok(Ok(Some(count))) => self.decoder.feed(&buffer[..count]),
                _ => return None,
            }
        }
    }

    pub async fn write_frame(&mut self, frame: &Frame) {
        let bytes = encode(frame, FRAME_BYTES_MAX_DEFAULT).unwrap();
        self.send.write_all(&bytes).await.unwrap();
    }

    pub async fn write_bytes(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    /// Next response frame, or `None` if the stream/connection ended first (10 s limit).
    pub async fn read_frame(&mut self) -> Option<Frame> {
        let mut buffer = vec![0u8; 65536];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(frame) = self.decoder.next_frame().expect("server sent an undecodable frame") {
                return Some(frame);
            }
            match tokio::time::timeout_at(deadline, self.recv.read(&mut buffer)).await {
                Ok(Ok(Some(count))) => self.decoder.feed(&buffer[..count]),
                Ok(Ok(None)) | Ok(Err(_)) => return None,
                Err(_) => panic!("no response within 10 s"),
            }
        }
    }

    /// Next Deliver on the push stream (opening it on first use), or `None` after `wait`.
    pub async fn read_push(&mut self, wait: Duration) -> Option<frames::Deliver> {
        let deadline = tokio::time::Instant::now() + wait;
        if self.push.is_none() {
            let stream = tokio::time::timeout_at(deadline, self.connection.accept_uni()).await.ok()?.ok()?;
            self.push = Some((stream, FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT)));
        }
        let (stream, decoder) = self.push.as_mut()?;
        let mut buffer = vec![0u8; 65536];
        loop {
            if let Some(frame) = decoder.next_frame().expect("undecodable push frame") {
                match frame {
                    Frame::Deliver(deliver) => return Some(deliver),
                    other => panic!("unexpected push frame {other:?}"),
                }
            }
            match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
                Ok(Ok(Some(count))) => decoder.feed(&buffer[..count]),
                _ => return None,
            }
        }
    }

    /// Hello; returns the answer frame.
    pub async fn hello(&mut self, token: &str, resume_after_seq: u64) -> Frame {
        self.write_frame(&Frame::Hello(frames::Hello { token: token.into(), resume_after_seq })).await;
        self.read_frame().await.expect("answer to Hello")
    }

    /// Waits until the server closes the connection; returns the application close code.
    pub async fn closed_code(&self) -> Option<u64> {
        match tokio::time::timeout(Duration::from_secs(10), self.connection.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(close)) => Some(close.error_code.into_inner()),
            Ok(_) => None,
            Err(_) => panic!("connection not closed within 10 s"),
        }
    }
}

/// The sum over every series of metric `name` whose labels contain `label`
/// (e.g. `shard="0"` or `code="MailboxFull"`) in a Prometheus exposition.
pub fn metric_sum(exposition: &str, name: &str, label: &str) -> u64 {
    let prefix = format!("{name}{{");
    let series: Vec<&str> =
        exposition.lines().filter(|line| line.starts_with(&prefix) && line.contains(label)).collect();
    assert!(!series.is_empty(), "no {name} with {label} in the exposition");
    series.iter().map(|line| line.rsplit(' ').next().and_then(|value| value.parse::<u64>().ok()).unwrap()).sum()
}

/// An admin listen address for a test server, and its config line.
pub fn admin_address() -> (String, String) {
    let admin = format!("127.0.0.1:{}", 20_000 + rand_u64() % 12_000);
    let line = format!("admin_listen = \"{admin}\"");
    (admin, line)
}

/// A plain HTTP GET against the admin endpoint; the whole response.
pub fn http_get(address: &str, path: &str) -> String {
    try_http_get(address, path).unwrap_or_else(|e| panic!("{address}{path}: {e}"))
}

/// [`http_get`] that reports a server not listening (yet) as an error.
pub fn try_http_get(address: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// GETs `path` until the response satisfies `wanted` (the storage probe
/// behind `/readyz` runs every few seconds); panics after `timeout` with the
/// last response.
pub fn http_get_until(address: &str, path: &str, timeout: Duration, wanted: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let response = try_http_get(address, path).unwrap_or_else(|e| e.to_string());
        if wanted(&response) {
            return response;
        }
        assert!(std::time::Instant::now() < deadline, "{address}{path} never answered as wanted: {response}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
