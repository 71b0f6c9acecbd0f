//! The `raw-quic` ceiling: minimal quinn servers with no auth, no storage
//! and no acks, and their load generator. Same payload size, connection
//! count and in-flight depth as the Iris scenarios, so Iris can be reported
//! as a fraction of what QUIC itself costs on this machine.
//!
//! - echo: each client opens one bidirectional stream and writes fixed-size
//!   messages; the server writes every message back.
//! - relay: connections come in pairs, like the users of `pairs`; each opens
//!   one bidirectional stream and first writes its pair number (8 bytes), then
//!   fixed-size messages, which the server copies onto the partner's stream.
//!   Client A -> server -> client B, the path of an Iris message without the
//!   ack, the store or the framing.
//!
//! The first 8 bytes of a message carry its send time for the latency; a
//! sender keeps at most `inflight` messages that have not come back (echo)
//! or reached the partner (relay).

use hdrhistogram::Histogram;
use rustls::pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the raw server does with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Back to the sender.
    Echo,
    /// On to the sender's partner connection.
    Relay,
}

/// Relay streams waiting for their partner, by pair number and side.
type Waiting = Arc<std::sync::Mutex<std::collections::HashMap<u64, (quinn::SendStream, quinn::RecvStream)>>>;

/// Longest pair number a relay client may send (bounds the waiting table).
const RELAY_PAIRS_MAX: u64 = 1 << 20;

/// Runs the raw server until killed (spawned by `raw-quic`).
pub async fn serve(
    mode: Mode,
    port: u16,
    payload_bytes: usize,
    ready_file: Option<std::path::PathBuf>,
) -> Result<(), String> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).map_err(|e| e.to_string())?;
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![b"raw-echo".to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let endpoint = quinn::Endpoint::server(config, SocketAddr::from(([127, 0, 0, 1], port)))
        .map_err(|e| format!("binding 127.0.0.1:{port}: {e}"))?;
    if let Some(path) = ready_file {
        std::fs::write(path, certified.cert.pem()).map_err(|e| e.to_string())?;
    }
    let waiting: Waiting = Arc::default();
    while let Some(incoming) = endpoint.accept().await {
        let waiting = Arc::clone(&waiting);
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else { return };
            while let Ok((send, recv)) = connection.accept_bi().await {
                match mode {
                    Mode::Echo => {
                        tokio::spawn(forward(recv, send, payload_bytes));
                    }
                    Mode::Relay => {
                        tokio::spawn(pair_up(send, recv, Arc::clone(&waiting), payload_bytes));
                    }
                }
            }
            // Keep the connection (and its streams) until the peer closes it.
            connection.closed().await;
        });
    }
    Ok(())
}

/// Copies fixed-size messages from `recv` to `send` until either ends.
async fn forward(mut recv: quinn::RecvStream, mut send: quinn::SendStream, payload_bytes: usize) {
    let mut buffer = vec![0u8; payload_bytes];
    while recv.read_exact(&mut buffer).await.is_ok() {
        if send.write_all(&buffer).await.is_err() {
            break;
        }
    }
}

/// Reads a relay stream's pair number and, once both sides are there, copies each side's
/// messages onto the other's stream.
async fn pair_up(send: quinn::SendStream, mut recv: quinn::RecvStream, waiting: Waiting, payload_bytes: usize) {
    let mut header = [0u8; 8];
    if recv.read_exact(&mut header).await.is_err() {
        return;
    }
    let slot = u64::from_le_bytes(header);
    if slot >= 2 * RELAY_PAIRS_MAX {
        return;
    }
    let partner = {
        let Ok(mut table) = waiting.lock() else { return };
        match table.remove(&(slot ^ 1)) {
            Some(partner) => partner,
            None => {
                table.insert(slot, (send, recv));
                return;
            }
        }
    };
    let (partner_send, partner_recv) = partner;
    tokio::spawn(forward(recv, partner_send, payload_bytes));
    tokio::spawn(forward(partner_recv, send, payload_bytes));
}

/// What the load measured.
#[derive(Debug)]
pub struct EchoOutcome {
    /// Messages echoed back (echo) or received by the partner (relay).
    pub echoed: u64,
    /// Seconds of the run.
    pub seconds: f64,
    /// Round-trip latencies, us.
    pub latency: Histogram<u64>,
}

/// The load: how many connections, how deep, how big, how long.
#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    /// Connections (paired for the relay).
    pub connections: u32,
    /// Messages in flight per connection.
    pub inflight: u32,
    /// Message size (at least 8: the send time).
    pub payload_bytes: usize,
    /// How long senders send.
    pub duration: Duration,
}

/// Drives the server at `address` with `shape`.
pub async fn load(address: SocketAddr, ca_pem: &str, mode: Mode, shape: LoadShape) -> Result<EchoOutcome, String> {
    let endpoint = client_endpoint(ca_pem)?;
    let outcome = match mode {
        Mode::Echo => echo_load(&endpoint, address, shape).await,
        Mode::Relay => relay_load(&endpoint, address, shape).await,
    };
    endpoint.wait_idle().await;
    outcome
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn client_endpoint(ca_pem: &str) -> Result<quinn::Endpoint, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certificate =
        rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| e.to_string())?;
    roots.add(certificate).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"raw-echo".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(endpoint)
}

async fn echo_load(
    endpoint: &quinn::Endpoint,
    address: SocketAddr,
    LoadShape { connections, inflight, payload_bytes, duration }: LoadShape,
) -> Result<EchoOutcome, String> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let connection = endpoint
            .connect(address, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("raw QUIC connect: {e}"))?;
        tasks.push(tokio::spawn(async move {
            let mut latency = histogram();
            let mut echoed = 0u64;
            let Ok((mut send, mut recv)) = connection.open_bi().await else { return (0, latency) };
            let mut message = vec![0u8; payload_bytes];
            let stamp = |message: &mut Vec<u8>| {
                message[..8].copy_from_slice(&(start.elapsed().as_micros() as u64).to_le_bytes());
            };
            for _ in 0..inflight {
                stamp(&mut message);
                if send.write_all(&message).await.is_err() {
                    return (0, latency);
                }
            }
            let mut reply = vec![0u8; payload_bytes];
            let mut outstanding = inflight;
            while outstanding > 0 {
                if recv.read_exact(&mut reply).await.is_err() {
                    break;
                }
                outstanding -= 1;
                echoed += 1;
                let sent = u64::from_le_bytes(reply[..8].try_into().unwrap_or([0; 8]));
                let _ = latency.record((start.elapsed().as_micros() as u64).saturating_sub(sent).max(1));
                if start.elapsed() < duration {
                    stamp(&mut message);
                    if send.write_all(&message).await.is_err() {
                        break;
                    }
                    outstanding += 1;
                }
            }
            connection.close(0u32.into(), b"done");
            (echoed, latency)
        }));
    }
    collect(tasks, start).await
}

async fn collect(
    tasks: Vec<tokio::task::JoinHandle<(u64, Histogram<u64>)>>,
    start: Instant,
) -> Result<EchoOutcome, String> {
    let mut outcome = EchoOutcome { echoed: 0, seconds: 0.0, latency: histogram() };
    for task in tasks {
        let (echoed, latency) = task.await.map_err(|e| e.to_string())?;
        outcome.echoed += echoed;
        outcome.latency.add(&latency).map_err(|e| e.to_string())?;
    }
    outcome.seconds = start.elapsed().as_secs_f64();
    Ok(outcome)
}

/// Pairs of connections through the relay: each side sends to the other,
/// with at most `inflight` messages not yet received by the partner.
async fn relay_load(
    endpoint: &quinn::Endpoint,
    address: SocketAddr,
    LoadShape { connections, inflight, payload_bytes, duration }: LoadShape,
) -> Result<EchoOutcome, String> {
    if connections % 2 != 0 {
        return Err("relay needs an even number of connections (they are paired)".into());
    }
    let mut streams = Vec::new();
    let mut held = Vec::new();
    for slot in 0..u64::from(connections) {
        let connection = endpoint
            .connect(address, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("raw QUIC connect: {e}"))?;
        let (mut send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&slot.to_le_bytes()).await.map_err(|e| e.to_string())?;
        streams.push((send, recv));
        held.push(connection);
    }
    let windows: Vec<Arc<tokio::sync::Semaphore>> =
        (0..connections).map(|_| Arc::new(tokio::sync::Semaphore::new(inflight as usize))).collect();
    let start = Instant::now();
    let until = start + duration;
    let mut tasks = Vec::new();
    for (index, (mut send, mut recv)) in streams.into_iter().enumerate() {
        let window = Arc::clone(&windows[index]);
        tokio::spawn(async move {
            let mut message = vec![0u8; payload_bytes];
            loop {
                let Ok(Ok(permit)) = tokio::time::timeout_at(until.into(), window.acquire()).await else { break };
                permit.forget();
                message[..8].copy_from_slice(&(start.elapsed().as_micros() as u64).to_le_bytes());
                if send.write_all(&message).await.is_err() {
                    break;
                }
            }
            let _ = send.finish();
        });
        // This side receives its partner's messages and frees the partner's window.
        let partner_window = Arc::clone(&windows[index ^ 1]);
        tasks.push(tokio::spawn(async move {
            let mut latency = histogram();
            let mut received = 0u64;
            let mut message = vec![0u8; payload_bytes];
            let drain = until + Duration::from_secs(2);
            while let Ok(Ok(())) = tokio::time::timeout_at(drain.into(), recv.read_exact(&mut message)).await {
                received += 1;
                let sent = u64::from_le_bytes(message[..8].try_into().unwrap_or([0; 8]));
                let _ = latency.record((start.elapsed().as_micros() as u64).saturating_sub(sent).max(1));
                partner_window.add_permits(1);
            }
            (received, latency)
        }));
    }
    let outcome = collect(tasks, start).await;
    for connection in held {
        connection.close(0u32.into(), b"done");
    }
    outcome
}

/// The `raw-quic` report.
#[derive(Debug, serde::Serialize)]
pub struct RawQuicReport {
    scenario: &'static str,
    label: String,
    connections: u32,
    inflight: u32,
    payload_bytes: usize,
    echoed: u64,
    seconds: f64,
    echoed_per_second: f64,
    round_trip_latency: crate::report::Percentiles,
    server_cpu_seconds: Option<f64>,
    server_cpu_us_per_message: Option<f64>,
    messages_per_server_cpu_second: Option<f64>,
    loadgen_cpu_seconds: f64,
}

/// Spawns the raw server pinned to `server_cpus`, drives it with `shape`
/// and prints (and optionally writes) the report.
pub fn run(
    (mode, server_cpus, loadgen_cpus): (Mode, &str, &str),
    port: u16,
    shape: LoadShape,
    json: Option<PathBuf>,
) -> Result<(), String> {
    let LoadShape { connections, inflight, payload_bytes: payload, .. } = shape;
    if connections == 0 || inflight == 0 || payload < 8 {
        return Err("connections and inflight must be positive, payload >= 8".into());
    }
    if mode == Mode::Relay && connections % 2 != 0 {
        return Err("--mode relay pairs connections: --connections must be even".into());
    }
    let mode_name = match mode {
        Mode::Echo => "echo",
        Mode::Relay => "relay",
    };
    if loadgen_cpus != "none" {
        crate::pin_to_cpus(loadgen_cpus)?;
    }
    let ready = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut command = if server_cpus == "none" {
        std::process::Command::new(&exe)
    } else {
        let mut command = std::process::Command::new("taskset");
        command.arg("-c").arg(server_cpus).arg(&exe);
        command
    };
    command
        .args(["raw-quic-server", "--mode", mode_name, "--port", &port.to_string()])
        .args(["--payload", &payload.to_string(), "--ready-file"])
        .arg(ready.path());
    let mut child = command.spawn().map_err(|e| format!("spawning the echo server: {e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let ca = loop {
        let text = std::fs::read_to_string(ready.path()).unwrap_or_default();
        if text.contains("END CERTIFICATE") {
            break text;
        }
        if std::time::Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            return Err("the raw QUIC server did not start".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let pid = child.id();
    let runtime = crate::loadgen_runtime(1)?;
    let cpu_before = crate::server::process_cpu_seconds(pid);
    let own_before = crate::server::own_cpu_seconds();
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let outcome = runtime.block_on(load(address, &ca, mode, shape));
    let cpu = crate::server::process_cpu_seconds(pid).zip(cpu_before).map(|(after, before)| after - before);
    let _ = child.kill();
    let _ = child.wait();
    let outcome = outcome?;
    let report = RawQuicReport {
        scenario: "raw-quic",
        label: format!("quinn {mode_name} {connections}x{inflight}"),
        connections,
        inflight,
        payload_bytes: payload,
        echoed: outcome.echoed,
        seconds: outcome.seconds,
        echoed_per_second: outcome.echoed as f64 / outcome.seconds,
        round_trip_latency: crate::report::Percentiles::of(&outcome.latency),
        server_cpu_seconds: cpu,
        server_cpu_us_per_message: cpu.filter(|_| outcome.echoed > 0).map(|c| c * 1e6 / outcome.echoed as f64),
        messages_per_server_cpu_second: cpu.filter(|c| *c > 0.0).map(|c| outcome.echoed as f64 / c),
        loadgen_cpu_seconds: crate::server::own_cpu_seconds() - own_before,
    };
    println!("raw-quic — {}", report.label);
    println!(
        "  echoed/relayed             {} in {:.2} s ({:.0}/s)",
        report.echoed, report.seconds, report.echoed_per_second
    );
    let p = &report.round_trip_latency;
    println!("  latency       us  p50 {:>7}  p99 {:>7}  max {:>8}", p.p50_us, p.p99_us, p.max_us);
    if let (Some(per), Some(rate)) = (report.server_cpu_us_per_message, report.messages_per_server_cpu_second) {
        println!("  server CPU                 {per:.2} us/message, {rate:.0} messages/CPU-s");
    }
    println!("  load generator CPU         {:.2} s", report.loadgen_cpu_seconds);
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
