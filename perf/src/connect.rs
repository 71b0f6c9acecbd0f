//! The `connect` scenario: open C authenticated connections and keep them
//! idle; report the handshake (+ Hello/Welcome) rate and the server's resident
//! memory per connection, and the server's CPU per idle connection-second
//! (keep-alives) while they are held. With `--reconnect` it then closes them
//! and reconnects every user to its home shard twice: once with no TLS
//! tickets (full handshakes) and once with the tickets of that pass
//! (resumed), so the two handshake costs are measured side by side.
//!
//! It drives the protocol directly on a few shared quinn endpoints rather
//! than through the SDK (which has one endpoint and task per client), so the
//! load generator can hold tens of thousands of connections.

use crate::client_tls::ClientTls;
use crate::pairs::Target;
use iris_protocol::frames::{self, Frame};
use iris_protocol::{encode, FrameDecoder, FRAME_BYTES_MAX_DEFAULT};
use irisd::auth::Claims;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections per client endpoint (one UDP socket each).
const CONNECTIONS_PER_ENDPOINT: usize = 2_000;
/// Handshakes in flight at once.
const CONCURRENT_HANDSHAKES: usize = 64;
/// Longest wait for one connection's handshake and Welcome.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest measurement of the server's idle CPU before connecting.
const BASELINE_SECONDS_MAX: f64 = 10.0;
/// Longest wait for closed connections to finish closing.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// An idle, authenticated connection (kept open by holding it).
struct Idle {
    connection: quinn::Connection,
    _request: (quinn::SendStream, quinn::RecvStream),
    user: u64,
    /// The address of the user's home shard (where the Welcome came from).
    home: SocketAddr,
}

/// One pass of connection attempts.
struct Pass {
    idle: Vec<Idle>,
    failed: u64,
    seconds: f64,
    /// Handshakes of the pass that verified a certificate (not resumed),
    /// redirected attempts included.
    full_handshakes: u64,
}

/// The client side of a run: its endpoints, TLS state and token authority.
struct Clients<'a> {
    endpoints: Vec<quinn::Endpoint>,
    tls: Arc<ClientTls>,
    authority: &'a irisd::auth::TokenAuthority,
}

impl Clients<'_> {
    /// Connects `(user, address)` for each attempt, `CONCURRENT_HANDSHAKES`
    /// at a time, following one redirect to the user's home shard.
    async fn open_all(&self, attempts: Vec<(u64, SocketAddr)>) -> Pass {
        let full_before = self.tls.full_handshakes();
        let started = Instant::now();
        let mut idle = Vec::with_capacity(attempts.len());
        let mut failed = 0;
        let mut tasks = tokio::task::JoinSet::new();
        let mut attempts = attempts.into_iter().enumerate().peekable();
        while attempts.peek().is_some() || !tasks.is_empty() {
            while tasks.len() < CONCURRENT_HANDSHAKES {
                let Some((index, (user, address))) = attempts.next() else { break };
                let endpoint = self.endpoints[index % self.endpoints.len()].clone();
                let token = self.token(user);
                let tls = self.tls.clone();
                tasks.spawn(async move {
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, open(endpoint, &tls, address, user, token)).await
                });
            }
            match tasks.join_next().await {
                Some(Ok(Ok(Ok(connection)))) => idle.push(connection),
                Some(_) => failed += 1,
                None => break,
            }
        }
        let full_handshakes = self.tls.full_handshakes() - full_before;
        Pass { idle, failed, seconds: started.elapsed().as_secs_f64(), full_handshakes }
    }

    fn token(&self, user: u64) -> String {
        self.authority.mint(Claims { user_id: user, device_id: 1, expires_at_s: u64::MAX / 2 })
    }
}

/// Closes `idle` and waits (bounded) until the endpoints have let them go.
async fn close_all(clients: &Clients<'_>, idle: Vec<Idle>) {
    for connection in &idle {
        connection.connection.close(0u32.into(), b"reconnect");
    }
    drop(idle);
    for endpoint in &clients.endpoints {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
    }
}

async fn open(
    endpoint: quinn::Endpoint,
    tls: &ClientTls,
    address: SocketAddr,
    user: u64,
    token: String,
) -> Result<Idle, String> {
    match open_once(&endpoint, tls, address, user, &token).await? {
        Ok(idle) => Ok(idle),
        // The user lives on another shard: go there once.
        Err(redirect) => {
            let home = SocketAddr::new(address.ip(), redirect.port);
            open_once(&endpoint, tls, home, user, &token).await?.map_err(|_| "redirected twice".to_string())
        }
    }
}

async fn open_once(
    endpoint: &quinn::Endpoint,
    tls: &ClientTls,
    address: SocketAddr,
    user: u64,
    token: &str,
) -> Result<Result<Idle, frames::Redirect>, String> {
    let token = token.to_string();
    let config = tls.config_for(address.port())?;
    let connection = endpoint
        .connect_with(config, address, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    let hello = Frame::Hello(frames::Hello { token, resume_after_seq: 0 });
    send.write_all(&encode(&hello, FRAME_BYTES_MAX_DEFAULT).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| e.to_string())?;
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
    let mut buffer = [0u8; 4096];
    loop {
        match decoder.next_frame().map_err(|e| e.to_string())? {
            Some(Frame::Welcome(_)) => {
                return Ok(Ok(Idle { connection, _request: (send, recv), user, home: address }));
            }
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

/// One reconnection pass in the report.
#[derive(Debug, serde::Serialize)]
struct PassReport {
    established: u64,
    failed: u64,
    /// Handshakes that verified the certificate; the rest resumed.
    full_handshakes: u64,
    handshakes_per_second: f64,
    server_cpu_us_per_handshake: Option<f64>,
}

/// The `connect` report.
#[derive(Debug, serde::Serialize)]
struct ConnectReport {
    scenario: &'static str,
    connections_requested: u64,
    established: u64,
    failed: u64,
    /// Handshakes that verified the certificate (all of them: this pass
    /// offers no tickets), redirected attempts included.
    full_handshakes: u64,
    seconds: f64,
    handshakes_per_second: f64,
    server_rss_before_bytes: Option<u64>,
    server_rss_after_bytes: Option<u64>,
    server_rss_per_connection_bytes: Option<f64>,
    /// Includes the redirected attempt of every user not homed on the
    /// shard it first reached.
    server_cpu_us_per_handshake: Option<f64>,
    settle_seconds: f64,
    /// Server CPU per second with no connection (shard heartbeats, timers),
    /// measured for up to `BASELINE_SECONDS_MAX` before connecting.
    server_cpu_idle_baseline_us_per_second: Option<f64>,
    /// Keep-alive interval of the connections, ms.
    keep_alive_ms: u64,
    /// Server CPU while the connections sat idle (a keep-alive each
    /// `keep_alive_ms`), less the baseline.
    server_cpu_us_per_idle_connection_second: Option<f64>,
    /// Every user reconnected to its home shard, without TLS tickets.
    reconnect_full: Option<PassReport>,
    /// And again with the tickets of the previous pass.
    reconnect_resumed: Option<PassReport>,
    loadgen_cpu_seconds: f64,
}

/// What to run: connections, seconds to hold them, and whether to reconnect.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    pub connections: u64,
    pub settle: f64,
    pub reconnect: bool,
    /// Keep-alive interval of the connections.
    pub keep_alive: Duration,
}

/// Runs the scenario against `target` (server process `pid`) and prints
/// (and optionally writes) the report.
pub fn report(
    target: &Target,
    pid: Option<u32>,
    options: ConnectOptions,
    json: Option<std::path::PathBuf>,
) -> Result<(), String> {
    use crate::server::{own_cpu_seconds, process_cpu_seconds, process_rss_bytes};
    let server_cpu = || pid.and_then(process_cpu_seconds);
    let per = |cpu: Option<f64>, count: f64| cpu.filter(|_| count > 0.0).map(|c| c * 1e6 / count);
    let runtime = crate::loadgen_runtime(1)?;
    // quinn endpoints are created and dropped inside the runtime.
    let _runtime_context = runtime.enter();
    let address: SocketAddr = runtime
        .block_on(tokio::net::lookup_host(&target.address))
        .map_err(|e| format!("{}: {e}", target.address))?
        .next()
        .ok_or("server address does not resolve")?;
    let endpoint_count = (options.connections as usize).div_ceil(CONNECTIONS_PER_ENDPOINT).max(1);
    let mut endpoints = Vec::new();
    for _ in 0..endpoint_count {
        endpoints.push(
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal address"))
                .map_err(|e| format!("client socket: {e}"))?,
        );
    }
    // First connections of new devices: full handshakes.
    let mut clients = Clients {
        endpoints,
        tls: Arc::new(ClientTls::new(&target.ca, options.keep_alive)?),
        authority: &target.authority,
    };
    clients.tls.set_resumption(false);
    let first_user = 2_000_000;
    let own_before = own_cpu_seconds();
    // One connection first: a wrong address, certificate or key fails here
    // with its reason instead of `connections` timeouts.
    runtime.block_on(async {
        let token = clients.token(first_user);
        match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            open(clients.endpoints[0].clone(), &clients.tls, address, first_user, token),
        )
        .await
        {
            Ok(Ok(probe)) => {
                close_all(&clients, vec![probe]).await;
                Ok(())
            }
            Ok(Err(error)) => Err(format!("cannot connect to {address}: {error}")),
            Err(_) => Err(format!("cannot connect to {address}: timed out")),
        }
    })?;
    // The server's own idle cost (heartbeats, timers) with no connection,
    // subtracted from the idle cost with them.
    let baseline_seconds = options.settle.min(BASELINE_SECONDS_MAX);
    let baseline_before = server_cpu();
    runtime.block_on(tokio::time::sleep(Duration::from_secs_f64(baseline_seconds)));
    let baseline_cpu = server_cpu().zip(baseline_before).map(|(after, before)| after - before);
    let rss_before = pid.and_then(process_rss_bytes);
    let cpu_before = server_cpu();
    let attempts = (first_user..first_user + options.connections).map(|user| (user, address)).collect();
    let first = runtime.block_on(clients.open_all(attempts));
    let established = first.idle.len() as u64;
    let cpu = server_cpu().zip(cpu_before).map(|(after, before)| after - before);
    let idle_before = server_cpu();
    runtime.block_on(tokio::time::sleep(Duration::from_secs_f64(options.settle)));
    let idle_cpu = server_cpu().zip(idle_before).map(|(after, before)| after - before);
    let rss_after = pid.and_then(process_rss_bytes);
    let per_connection = rss_after
        .zip(rss_before)
        .filter(|_| established > 0)
        .map(|(after, before)| (after as f64 - before as f64) / established as f64);
    let mut reconnect_full = None;
    let mut reconnect_resumed = None;
    let mut held = first.idle;
    if options.reconnect {
        // Fresh TLS state, offering no tickets in the "full" pass and
        // that pass's tickets in the "resumed" one.
        clients.tls = Arc::new(ClientTls::new(&target.ca, options.keep_alive)?);
        for resumed in [false, true] {
            clients.tls.set_resumption(resumed);
            let homes: Vec<(u64, SocketAddr)> = held.iter().map(|idle| (idle.user, idle.home)).collect();
            runtime.block_on(close_all(&clients, std::mem::take(&mut held)));
            let before = server_cpu();
            let pass = runtime.block_on(clients.open_all(homes));
            let cpu = server_cpu().zip(before).map(|(after, before)| after - before);
            let established = pass.idle.len() as u64;
            let pass_report = PassReport {
                established,
                failed: pass.failed,
                full_handshakes: pass.full_handshakes,
                handshakes_per_second: established as f64 / pass.seconds,
                server_cpu_us_per_handshake: per(cpu, established as f64),
            };
            held = pass.idle;
            if resumed {
                reconnect_resumed = Some(pass_report);
            } else {
                reconnect_full = Some(pass_report);
            }
        }
    }
    let report = ConnectReport {
        scenario: "connect",
        connections_requested: options.connections,
        established,
        failed: first.failed,
        full_handshakes: first.full_handshakes,
        seconds: first.seconds,
        handshakes_per_second: established as f64 / first.seconds,
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: rss_after,
        server_rss_per_connection_bytes: per_connection,
        server_cpu_us_per_handshake: per(cpu, established as f64),
        settle_seconds: options.settle,
        keep_alive_ms: options.keep_alive.as_millis() as u64,
        server_cpu_idle_baseline_us_per_second: baseline_cpu
            .filter(|_| baseline_seconds > 0.0)
            .map(|cpu| cpu * 1e6 / baseline_seconds),
        server_cpu_us_per_idle_connection_second: idle_cpu
            .zip(baseline_cpu)
            .filter(|_| baseline_seconds > 0.0)
            .and_then(|(idle, baseline)| {
                per(Some(idle - baseline * options.settle / baseline_seconds), established as f64 * options.settle)
            }),
        reconnect_full,
        reconnect_resumed,
        loadgen_cpu_seconds: own_cpu_seconds() - own_before,
    };
    print_report(&report);
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    runtime.block_on(close_all(&clients, held));
    Ok(())
}

fn print_report(report: &ConnectReport) {
    println!("connect");
    println!(
        "  established / failed       {} / {} ({} full handshakes)",
        report.established, report.failed, report.full_handshakes
    );
    println!("  handshakes/s               {:.0} ({:.2} s)", report.handshakes_per_second, report.seconds);
    if let Some(per) = report.server_rss_per_connection_bytes {
        println!("  server RSS per connection  {:.1} KiB", per / 1024.0);
    }
    if let Some(cpu) = report.server_cpu_us_per_handshake {
        println!("  server CPU per handshake   {cpu:.0} us (redirects included)");
    }
    if let Some(cpu) = report.server_cpu_us_per_idle_connection_second {
        println!(
            "  server CPU idle            {cpu:.2} us per connection-second ({:.0} s, keep-alive {} ms; baseline {:.0} us/s)",
            report.settle_seconds,
            report.keep_alive_ms,
            report.server_cpu_idle_baseline_us_per_second.unwrap_or(0.0)
        );
    }
    for (label, pass) in [("full", &report.reconnect_full), ("resumed", &report.reconnect_resumed)] {
        let Some(pass) = pass else { continue };
        print!(
            "  reconnect, {label:<8}       {} ok, {} failed, {} full handshakes, {:.0}/s",
            pass.established, pass.failed, pass.full_handshakes, pass.handshakes_per_second
        );
        match pass.server_cpu_us_per_handshake {
            Some(cpu) => println!(", server CPU {cpu:.0} us each"),
            None => println!(),
        }
    }
    println!("  load generator CPU         {:.2} s", report.loadgen_cpu_seconds);
}
