//! The `connect` scenario: open C authenticated connections and keep them
//! idle; report the handshake (+ Hello/Welcome) rate and the server's resident
//! memory per connection.
//!
//! It drives the protocol directly on a few shared quinn endpoints rather
//! than through the SDK (which has one endpoint and task per client), so the
//! load generator can hold tens of thousands of connections.

use crate::pairs::Target;
use iris_protocol::frames::{self, Frame};
use iris_protocol::{encode, FrameDecoder, FRAME_BYTES_MAX_DEFAULT};
use irisd::auth::Claims;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Connections per client endpoint (one UDP socket each).
const CONNECTIONS_PER_ENDPOINT: usize = 2_000;
/// Handshakes in flight at once.
const CONCURRENT_HANDSHAKES: usize = 64;

/// What the scenario measured.
#[derive(Debug)]
pub struct ConnectOutcome {
    /// Connections established and authenticated.
    pub established: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// Seconds to establish all.
    pub seconds: f64,
}

/// Longest wait for one connection's handshake and Welcome.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// An idle, authenticated connection (kept open by holding it).
struct Idle {
    _connection: quinn::Connection,
    _request: (quinn::SendStream, quinn::RecvStream),
}

/// Open connections and their endpoints; dropping it closes them.
pub struct Held {
    _idle: Vec<Idle>,
    _endpoints: Vec<quinn::Endpoint>,
}

/// Opens `count` connections; returns them (to hold open) and the outcome.
pub async fn run(target: &Target, count: u64, first_user: u64) -> Result<(Held, ConnectOutcome), String> {
    let address: SocketAddr = tokio::net::lookup_host(&target.address)
        .await
        .map_err(|e| format!("{}: {e}", target.address))?
        .next()
        .ok_or("server address does not resolve")?;
    let tls = iris_client::client_tls(&target.ca).map_err(|e| e.to_string())?;
    let endpoint_count = (count as usize).div_ceil(CONNECTIONS_PER_ENDPOINT).max(1);
    let mut endpoints = Vec::new();
    for _ in 0..endpoint_count {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal address"))
            .map_err(|e| format!("client socket: {e}"))?;
        endpoint.set_default_client_config(tls.clone());
        endpoints.push(endpoint);
    }
    let started = Instant::now();
    let mut held = Vec::with_capacity(count as usize);
    // One connection first: a wrong address, certificate or key fails here
    // with its reason instead of `count` timeouts.
    let token = target.authority.mint(Claims { user_id: first_user, device_id: 1, expires_at_s: u64::MAX / 2 });
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, open(endpoints[0].clone(), address, token)).await {
        Ok(Ok(idle)) => held.push(idle),
        Ok(Err(error)) => return Err(format!("cannot connect to {address}: {error}")),
        Err(_) => return Err(format!("cannot connect to {address}: timed out")),
    }
    let mut failed = 0;
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 1u64;
    while next < count || !tasks.is_empty() {
        while next < count && tasks.len() < CONCURRENT_HANDSHAKES {
            let endpoint = endpoints[next as usize % endpoints.len()].clone();
            let user = first_user + next;
            let token = target.authority.mint(Claims { user_id: user, device_id: 1, expires_at_s: u64::MAX / 2 });
            tasks.spawn(async move { tokio::time::timeout(HANDSHAKE_TIMEOUT, open(endpoint, address, token)).await });
            next += 1;
        }
        match tasks.join_next().await {
            Some(Ok(Ok(Ok(idle)))) => held.push(idle),
            Some(_) => failed += 1,
            None => break,
        }
    }
    let outcome = ConnectOutcome { established: held.len() as u64, failed, seconds: started.elapsed().as_secs_f64() };
    Ok((Held { _idle: held, _endpoints: endpoints }, outcome))
}

async fn open(endpoint: quinn::Endpoint, address: SocketAddr, token: String) -> Result<Idle, String> {
    match open_once(&endpoint, address, &token).await? {
        Ok(idle) => Ok(idle),
        // The user lives on another shard: go there once.
        Err(redirect) => {
            let home = SocketAddr::new(address.ip(), redirect.port);
            open_once(&endpoint, home, &token).await?.map_err(|_| "redirected twice".to_string())
        }
    }
}

async fn open_once(
    endpoint: &quinn::Endpoint,
    address: SocketAddr,
    token: &str,
) -> Result<Result<Idle, frames::Redirect>, String> {
    let token = token.to_string();
    let connection =
        endpoint.connect(address, "localhost").map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    let hello = Frame::Hello(frames::Hello { token, resume_after_seq: 0 });
    send.write_all(&encode(&hello, FRAME_BYTES_MAX_DEFAULT).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| e.to_string())?;
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    let mut buffer = [0u8; 4096];
    loop {
        match decoder.next_frame().map_err(|e| e.to_string())? {
            Some(Frame::Welcome(_)) => return Ok(Ok(Idle { _connection: connection, _request: (send, recv) })),
            Some(Frame::Redirect(redirect)) => return Ok(Err(redirect)),
            Some(Frame::Error(error)) => {
                let code = iris_protocol::ErrorCode::from_u16(error.code)
                    .map_or_else(|| format!("code {}", error.code), |code| format!("{code:?}"));
                return Err(format!("refused: {code} ({})", error.message));
            }
            Some(other) => return Err(format!("unexpected {:?}", other.kind())),
            None => {}
        }
        match recv.read(&mut buffer).await.map_err(|e| e.to_string())? {
            Some(read) => decoder.feed(&buffer[..read]),
            None => return Err("stream closed before Welcome".into()),
        }
    }
}

/// The `connect` report.
#[derive(Debug, serde::Serialize)]
struct ConnectReport {
    scenario: &'static str,
    connections_requested: u64,
    established: u64,
    failed: u64,
    seconds: f64,
    handshakes_per_second: f64,
    server_rss_before_bytes: Option<u64>,
    server_rss_after_bytes: Option<u64>,
    server_rss_per_connection_bytes: Option<f64>,
    server_cpu_us_per_handshake: Option<f64>,
    loadgen_cpu_seconds: f64,
}

/// Opens `connections` connections to `target` (server process `pid`),
/// holds them for `settle` seconds and prints (and optionally writes) the report.
pub fn report(
    target: &Target,
    pid: Option<u32>,
    (connections, settle): (u64, f64),
    json: Option<std::path::PathBuf>,
) -> Result<(), String> {
    use crate::server::{own_cpu_seconds, process_cpu_seconds, process_rss_bytes};
    let runtime = crate::loadgen_runtime(1)?;
    // quinn endpoints are created and dropped inside the runtime.
    let _runtime_context = runtime.enter();
    let rss_before = pid.and_then(process_rss_bytes);
    let cpu_before = pid.and_then(process_cpu_seconds);
    let own_before = own_cpu_seconds();
    let (held, outcome) = runtime.block_on(run(target, connections, 2_000_000))?;
    let cpu = pid.and_then(process_cpu_seconds).zip(cpu_before).map(|(after, before)| after - before);
    runtime.block_on(tokio::time::sleep(Duration::from_secs_f64(settle)));
    let rss_after = pid.and_then(process_rss_bytes);
    let per_connection = rss_after
        .zip(rss_before)
        .filter(|_| outcome.established > 0)
        .map(|(after, before)| (after as f64 - before as f64) / outcome.established as f64);
    let report = ConnectReport {
        scenario: "connect",
        connections_requested: connections,
        established: outcome.established,
        failed: outcome.failed,
        seconds: outcome.seconds,
        handshakes_per_second: outcome.established as f64 / outcome.seconds,
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: rss_after,
        server_rss_per_connection_bytes: per_connection,
        server_cpu_us_per_handshake: cpu
            .filter(|_| outcome.established > 0)
            .map(|c| c * 1e6 / outcome.established as f64),
        loadgen_cpu_seconds: own_cpu_seconds() - own_before,
    };
    println!("connect");
    println!("  established / failed       {} / {}", report.established, report.failed);
    println!("  handshakes/s               {:.0} ({:.2} s)", report.handshakes_per_second, report.seconds);
    if let Some(per) = report.server_rss_per_connection_bytes {
        println!("  server RSS per connection  {:.1} KiB", per / 1024.0);
    }
    if let Some(cpu) = report.server_cpu_us_per_handshake {
        println!("  server CPU per handshake   {cpu:.0} us");
    }
    println!("  load generator CPU         {:.2} s", report.loadgen_cpu_seconds);
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    drop(held);
    Ok(())
}
