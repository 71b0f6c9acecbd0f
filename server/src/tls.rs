//! TLS material: the embedded default creates a self-signed certificate in
//! `<data-dir>/tls/` on first start; an operator may replace both files.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors preparing TLS.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Reading or writing a PEM file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {detail}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Generating the self-signed certificate failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate/key pair or the QUIC configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Paths of the certificate chain and key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain; also the CA file clients pass as IRIS_CA.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The default locations under `data_dir`.
    pub fn in_data_dir(data_dir: &Path) -> TlsFiles {
        TlsFiles { cert: data_dir.join("tls/cert.pem"), key: data_dir.join("tls/key.pem") }
    }

    /// Creates a self-signed certificate for `names` if neither file exists.
    /// Returns whether it created one.
    pub fn create_if_missing(&self, names: Vec<String>) -> Result<bool, TlsError> {
        if self.cert.exists() || self.key.exists() {
            return Ok(false);
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Io { path, source }
        };
        if let Some(parent) = self.cert.parent() {
            crate::files::create_private_directory(parent).map_err(io(parent))?;
        }
        let generated = rcgen::generate_simple_self_signed(names)?;
        crate::files::write_private(&self.key, generated.signing_key.serialize_pem().as_bytes())
            .map_err(io(&self.key))?;
        crate::files::write_public(&self.cert, generated.cert.pem().as_bytes()).map_err(io(&self.cert))?;
        Ok(true)
    }

    /// Builds a QUIC server crypto configuration (ALPN `iris/2`). Each call
    /// makes a new one with its own session cache, so each shard gets its
    /// own and no lock is shared across cores.
    pub fn quic_server_config(&self) -> Result<Arc<quinn_proto::crypto::rustls::QuicServerConfig>, TlsError> {
        let config = self.rustls_server_config()?;
        let quic = quinn_proto::crypto::rustls::QuicServerConfig::try_from(config)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(quic))
    }

    /// The rustls configuration inside [`TlsFiles::quic_server_config`].
    pub fn rustls_server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let pem = |path: &Path, detail: String| TlsError::Pem { path: path.to_path_buf(), detail };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|e| pem(&self.cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem(&self.cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(pem(&self.cert, "no certificate found".into()));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| pem(&self.key, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![iris_protocol::ALPN.to_vec()];
        // Resumption: the SDK reconnects through one client configuration
        // and resumes with a ticket, which spares both sides the
        // certificate signature. Tickets are stateless (sealed with a key
        // of this configuration, so of this shard, rotated every 6 h): no
        // session cache grows with connections and no lock is shared
        // across shards. Two tickets per handshake: a client spends one on
        // every attempt, also one that times out, so the next attempt still
        // has one. No 0-RTT: early data can be replayed.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::Config(e.to_string()))?;
        config.send_tls13_tickets = 2;
        config.max_early_data_size = 0;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Handshakes a rustls client with `server` in memory (both directions
    /// until neither has bytes to send) and says how it went.
    fn handshake(client: &Arc<rustls::ClientConfig>, server: &Arc<rustls::ServerConfig>) -> rustls::HandshakeKind {
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::clone(client), name).unwrap();
        let mut server = rustls::ServerConnection::new(Arc::clone(server)).unwrap();
        let mut bytes = Vec::new();
        loop {
            let mut moved = false;
            bytes.clear();
            while client.wants_write() {
                client.write_tls(&mut bytes).unwrap();
            }
            if !bytes.is_empty() {
                moved = true;
                server.read_tls(&mut bytes.as_slice()).unwrap();
                server.process_new_packets().unwrap();
            }
            bytes.clear();
            while server.wants_write() {
                server.write_tls(&mut bytes).unwrap();
            }
            if !bytes.is_empty() {
                moved = true;
                client.read_tls(&mut bytes.as_slice()).unwrap();
                client.process_new_packets().unwrap();
            }
            if !moved {
                break;
            }
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        client.handshake_kind().unwrap()
    }

    /// A client that reconnects resumes with the ticket it was given, while
    /// the server keeps no per-session state; another shard's
    /// configuration (its own ticket key) cannot open that ticket, so no
    /// key is shared across cores.
    #[test]
    fn reconnects_resume_with_stateless_tickets_of_one_shard() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::in_data_dir(dir.path());
        files.create_if_missing(vec!["localhost".into()]).unwrap();
        let (shard_0, shard_1) = (files.rustls_server_config().unwrap(), files.rustls_server_config().unwrap());
        assert!(!shard_0.session_storage.can_cache(), "a server-side session cache");
        assert!(shard_0.ticketer.enabled());
        assert_eq!(shard_0.send_tls13_tickets, 2);
        let (shard_0, shard_1) = (Arc::new(shard_0), Arc::new(shard_1));

        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_file_iter(&files.cert).unwrap() {
            roots.add(certificate.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = Arc::new(client);
        assert_eq!(handshake(&client, &shard_0), rustls::HandshakeKind::Full);
        assert_eq!(handshake(&client, &shard_0), rustls::HandshakeKind::Resumed);
        assert_eq!(handshake(&client, &shard_1), rustls::HandshakeKind::Full);
    }
}
