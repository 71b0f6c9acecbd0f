//! TLS client state for the `connect` scenario: one QUIC client config per
//! server port (a shard's tickets only resume on that shard), each with a
//! ticket store that has room for every connection of a pass, and a count of
//! the handshakes that verified a certificate, i.e. were not resumed.
//! Tickets are always kept; they are offered only while resumption is on, so
//! a pass of full handshakes leaves the tickets a resumed pass then uses.
//!
//! rustls's default store keeps at most 8 tickets per server name, and every
//! connection here names the same server, so a pass of thousands of
//! reconnections would mostly fall back to full handshakes with it.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, NamedGroup, SignatureScheme};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Tickets kept per server port: two per connection of the largest pass.
const TICKETS_PER_PORT_MAX: usize = 2_000_000;

/// Client configs by server port, sharing one count of full handshakes.
pub struct ClientTls {
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    full_handshakes: Arc<AtomicU64>,
    resume: Arc<AtomicBool>,
    keep_alive: Duration,
    by_port: Mutex<HashMap<u16, quinn::ClientConfig>>,
}

impl ClientTls {
    /// Trusts the certificates in the PEM file `ca`; connections send a
    /// keep-alive every `keep_alive` (the SDK's interval unless a run
    /// measures another).
    pub fn new(ca: &Path, keep_alive: Duration) -> Result<Self, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
            let certificate = certificate.map_err(|e| format!("{}: {e}", ca.display()))?;
            roots.add(certificate).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            full_handshakes: Arc::default(),
            resume: Arc::new(AtomicBool::new(true)),
            keep_alive,
            by_port: Mutex::default(),
        })
    }

    /// Handshakes so far that verified the server's certificate.
    pub fn full_handshakes(&self) -> u64 {
        self.full_handshakes.load(Ordering::Relaxed)
    }

    /// Whether connections offer the tickets kept so far.
    pub fn set_resumption(&self, on: bool) {
        self.resume.store(on, Ordering::Relaxed);
    }

    /// The config for connections to `port`, with that port's tickets.
    pub fn config_for(&self, port: u16) -> Result<quinn::ClientConfig, String> {
        let mut by_port = self.by_port.lock().map_err(|_| "client TLS lock poisoned".to_string())?;
        if let Some(config) = by_port.get(&port) {
            return Ok(config.clone());
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
        let counting = Arc::new(CountingVerifier { inner: verifier, full_handshakes: self.full_handshakes.clone() });
        let mut crypto = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(counting)
            .with_no_client_auth();
        crypto.alpn_protocols = vec![iris_protocol::ALPN.to_vec()];
        crypto.resumption = rustls::client::Resumption::store(Arc::new(TicketPool {
            resume: self.resume.clone(),
            ..TicketPool::default()
        }));
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(|e| e.to_string())?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = iris_client::client_transport();
        transport.keep_alive_interval(Some(self.keep_alive));
        config.transport_config(Arc::new(transport));
        by_port.insert(port, config.clone());
        Ok(config)
    }
}

/// The WebPKI verifier, counting the certificates it verifies.
#[derive(Debug)]
struct CountingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    full_handshakes: Arc<AtomicU64>,
}

impl ServerCertVerifier for CountingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.full_handshakes.fetch_add(1, Ordering::Relaxed);
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// One server's TLS 1.3 tickets, each handed out once, oldest first.
#[derive(Debug, Default)]
struct TicketPool {
    tickets: Mutex<VecDeque<Tls13ClientSessionValue>>,
    kx_hint: Mutex<Option<NamedGroup>>,
    resume: Arc<AtomicBool>,
}

impl ClientSessionStore for TicketPool {
    fn set_kx_hint(&self, _: ServerName<'static>, group: NamedGroup) {
        if let Ok(mut hint) = self.kx_hint.lock() {
            *hint = Some(group);
        }
    }

    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        self.kx_hint.lock().ok().and_then(|hint| *hint)
    }

    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(&self, _: ServerName<'static>, value: Tls13ClientSessionValue) {
        if let Ok(mut tickets) = self.tickets.lock() {
            if tickets.len() == TICKETS_PER_PORT_MAX {
                tickets.pop_front();
            }
            tickets.push_back(value);
        }
    }

    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        if !self.resume.load(Ordering::Relaxed) {
            return None;
        }
        self.tickets.lock().ok().and_then(|mut tickets| tickets.pop_front())
    }
}
