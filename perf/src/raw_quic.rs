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

/// Drives `connections` connections with `inflight` messages each for `duration`.
pub async fn load(
    address: SocketAddr,
    ca_pem: &str,
    mode: Mode,
    (connections, inflight): (u32, u32),
    payload_bytes: usize,
    duration: Duration,
) -> Result<EchoOutcome, String> {
    let endpoint = client_endpoint(ca_pem)?;
    let outcome = match mode {
        Mode::Echo => echo_load(&endpoint, address, connections, inflight, payload_bytes, duration).await,
        Mode::Relay => relay_load(&endpoint, address, connections, inflight, payload_bytes, duration).await,
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
    connections: u32,
    inflight: u32,
    payload_bytes: usize,
    duration: Duration,
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
    connections: u32,
    inflight: u32,
    payload_bytes: usize,
    duration: Duration,
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
