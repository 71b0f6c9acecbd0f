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
        config.max_early_data_size = 0;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The building block of per-shard TLS state: each call makes its own
    /// cache. (That each shard calls it is in `runtime::run_shard`.)
    #[test]
    fn each_configuration_has_its_own_session_cache() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::in_data_dir(dir.path());
        files.create_if_missing(vec!["localhost".into()]).unwrap();
        let (first, second) = (files.rustls_server_config().unwrap(), files.rustls_server_config().unwrap());
        assert!(!Arc::ptr_eq(&first.session_storage, &second.session_storage), "a cache shared across shards");
    }
}
