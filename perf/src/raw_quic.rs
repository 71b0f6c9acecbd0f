//! The `raw-quic` ceiling: a minimal quinn echo server with no auth, no
//! storage and no acks, and its load generator. Same payload size,
//! connection count and in-flight depth as the Iris scenarios, so Iris can be
//! reported as a fraction of what QUIC itself costs on this machine.
//!
//! Wire: each client opens one bidirectional stream and writes fixed-size
//! messages; the server writes every message back. The first 8 bytes carry
//! the send time for the round-trip latency.

use hdrhistogram::Histogram;
use rustls::pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs the echo server until killed (spawned by `raw-quic --spawn-server`).
pub async fn serve(port: u16, payload_bytes: usize, ready_file: Option<std::path::PathBuf>) -> Result<(), String> {
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
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; payload_bytes];
                    while recv.read_exact(&mut buffer).await.is_ok() {
                        if send.write_all(&buffer).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    Ok(())
}

/// What the echo load measured.
#[derive(Debug)]
pub struct EchoOutcome {
    /// Messages echoed back.
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
    connections: u32,
    inflight: u32,
    payload_bytes: usize,
    duration: Duration,
) -> Result<EchoOutcome, String> {
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
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let connection = endpoint
            .connect(address, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("raw QUIC connect: {e}"))?;
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
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
    let mut outcome = EchoOutcome {
        echoed: 0,
        seconds: 0.0,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
    };
    for task in tasks {
        let (echoed, latency) = task.await.map_err(|e| e.to_string())?;
        outcome.echoed += echoed;
        outcome.latency.add(&latency).map_err(|e| e.to_string())?;
    }
    outcome.seconds = start.elapsed().as_secs_f64();
    endpoint.wait_idle().await;
    Ok(outcome)
}
