//! iris-client: the Iris client SDK (tokio + quinn) and the `iris` CLI.
//!
//! # Layout
//! - this file: the public API ([`Client`], [`ClientConfig`], [`Delivered`],
//!   [`ClientError`]) and TLS setup;
//! - [`session`]: the background task that owns the QUIC connection: it finds
//!   the home shard (following Redirect), authenticates, resends unacknowledged
//!   sends after a reconnect, dedups deliveries by seq and sends cumulative
//!   delivery acks.
//!
//! Guarantees: a [`Client::send`] that returns `Ok` was durably accepted by
//! the server; a retried send keeps its client_msg_id, so the server stores it
//! once. [`Client::recv`] yields each seq at most once per `Client`, in order;
//! a message is acknowledged to the server only after `recv` returned it.

pub mod session;

use iris_protocol::ErrorCode;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Sends queued between the application and the session task. A full queue
/// makes [`Client::send`] wait (backpressure to the caller).
pub const COMMAND_QUEUE_MAX: usize = 1024;
/// Deliveries buffered for the application; when full the session stops
/// reading the push stream and QUIC flow control holds the server back.
pub const DELIVERY_QUEUE_MAX: usize = 1024;
/// Presence events buffered for the application.
pub const PRESENCE_QUEUE_MAX: usize = 1024;

/// How to reach and authenticate with the server.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of any shard of the server.
    pub server: String,
    /// PEM file with the CA (for the embedded default: `<data-dir>/tls/cert.pem`).
    pub ca_path: PathBuf,
    /// Access token from `irisd token`.
    pub token: String,
    /// Highest seq already processed by this device in an earlier run.
    pub resume_after_seq: u64,
    /// Frame bound; must not exceed the server's.
    pub frame_bytes_max: u32,
    /// How long one connection attempt (handshake + Hello) may take.
    pub connect_timeout: Duration,
    /// Attempts to connect before the first connect is reported as failed.
    pub connect_attempts: u32,
    /// Retry sends refused with a retryable code (Throttle, MailboxFull, ...)
    /// after `retry_after_ms` (plus jitter); when false such a send fails
    /// with the refusal.
    pub retry_refusals: bool,
    /// How long a send keeps being retried after its first refusal; past it
    /// the send fails with the last refusal (`ClientError::Server` with its
    /// code), so a persistent refusal reaches the application.
    pub refusal_retry_for: Duration,
    /// How long a connection may stay silent while a request waits for its
    /// answer before the session gives it up and reconnects (resending what
    /// is unacknowledged). A server that crashed and came back answers the
    /// old connection only with a stateless reset, and only once the
    /// client's QUIC probes, which back off exponentially, reach it: seconds
    /// to tens of seconds. A write that waits this long for flow control is
    /// given up the same way. `Duration::ZERO`: never.
    pub answer_timeout: Duration,
    /// A client endpoint (one UDP socket) to open connections on, shared
    /// with other sessions of this process; `None` opens a new one per
    /// connection. Many sessions in one process (a gateway, a load
    /// generator) receive in batches over a shared socket.
    pub endpoint: Option<quinn::Endpoint>,
}

impl ClientConfig {
    /// A configuration with default limits.
    pub fn new(server: impl Into<String>, ca_path: impl Into<PathBuf>, token: impl Into<String>) -> ClientConfig {
        ClientConfig {
            server: server.into(),
            ca_path: ca_path.into(),
            token: token.into(),
            resume_after_seq: 0,
            frame_bytes_max: iris_protocol::FRAME_BYTES_MAX_DEFAULT,
            connect_timeout: Duration::from_secs(5),
            connect_attempts: 3,
            retry_refusals: true,
            refusal_retry_for: Duration::from_secs(60),
            answer_timeout: Duration::from_secs(10),
            endpoint: None,
        }
    }
}

/// Errors of the SDK.
#[derive(Debug, thiserror::Error, Clone)]
#[non_exhaustive]
pub enum ClientError {
    /// The CA file could not be read or holds no certificate.
    #[error("CA file {path}: {detail}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The server address does not resolve.
    #[error("cannot resolve server address {0}")]
    Resolve(String),
    /// No connection could be made (unreachable, TLS failure, timeout).
    #[error("cannot connect to {server}: {detail}")]
    Connect {
        /// The address tried.
        server: String,
        /// The last failure.
        detail: String,
    },
    /// The server refused the request or the session.
    #[error("server refused ({}): {message}", code.map_or("unknown code".to_string(), |c| format!("{c:?}")))]
    Server {
        /// The wire code (`None` if this build does not know it).
        code: Option<ErrorCode>,
        /// The server's detail text.
        message: String,
    },
    /// The payload is larger than a message may be; nothing was sent.
    #[error("payload of {bytes} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The payload's size.
        bytes: usize,
        /// The largest allowed.
        limit: usize,
    },
    /// The server answered a Hello with a last seq below the seq this device
    /// already processed: it lost the device's state (a wiped data directory,
    /// or `durability = "none"` after a restart). Seq dedup cannot work
    /// across that, so the session ends instead of dropping new messages as
    /// redeliveries and acknowledging them away.
    #[error("server's last seq {server_last_seq} is below this device's processed seq {processed_seq}: the server lost this device's state")]
    SeqWentBackwards {
        /// Highest seq this device processed.
        processed_seq: u64,
        /// The last seq the server reported in Welcome.
        server_last_seq: u64,
    },
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The client was closed or its session ended for good.
    #[error("client closed: {0}")]
    Closed(String),
}

impl ClientError {
    /// The server's error code, if this is a server refusal.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => *code,
            _ => None,
        }
    }
}

/// A message received by this device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Delivered {
    /// Per-device sequence number.
    pub seq: u64,
    /// Sender user.
    pub from_user: u64,
    /// Sender device.
    pub from_device: u32,
    /// Server-wide message id (same as in the sender's Ack).
    pub server_msg_id: u64,
    /// Server acceptance time, ms since the Unix epoch.
    pub sent_at_ms: u64,
    /// The payload.
    pub payload: Vec<u8>,
}

/// The server's confirmation of a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Acked {
    /// The id the SDK chose for the send.
    pub client_msg_id: u64,
    /// The server's id for the stored message.
    pub server_msg_id: u64,
}

/// Facts about the current session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionInfo {
    /// Authenticated user.
    pub user_id: u64,
    /// Authenticated device.
    pub device_id: u32,
    /// Shard serving the connection.
    pub shard: u16,
    /// Connections made so far (1 + reconnects).
    pub connections: u64,
}

/// Commands from the API to the session task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Send a payload; answer on `reply` once acked or refused for good.
    Send { to_user: u64, payload: Vec<u8>, reply: oneshot::Sender<Result<Acked, ClientError>> },
    /// Send a DeliveryAck now and close the connection.
    Close { reply: oneshot::Sender<()> },
    /// Drop the current connection and reconnect (used by tests to exercise resume).
    Reconnect,
    /// Remove a device of this user; answer once the server says it is durable.
    RemoveDevice { device_id: u32, reply: oneshot::Sender<Result<(), ClientError>> },
    /// Watch these users' presence (kept across reconnects).
    WatchPresence { users: Vec<u64> },
    /// Stop watching these users.
    UnwatchPresence { users: Vec<u64> },
    /// Set who may see this user's presence (a `frames::PRIVACY_*` value).
    PresencePrivacy { privacy: u8 },
    /// Tell `to_user`'s online devices this user types (or stopped).
    Typing { to_user: u64, active: bool },
}

/// What a watcher is shown of a user's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceState {
    /// A device of the user is connected.
    Online,
    /// None is; when its last device left (ms since the Unix epoch), if ever.
    Offline {
        /// The user's last-seen time.
        last_seen_ms: Option<u64>,
    },
    /// The user's privacy setting hides it from this user.
    Hidden,
    /// The server keeps no more watchers of this user; the watch was dropped.
    Unavailable,
}

/// One item of a client's presence queue ([`Client::next_presence`]).
#[derive(Debug, Clone)]
pub enum PresenceEvent {
    /// A watched user's state: once when the watch starts, then on changes.
    Changed {
        /// The watched user.
        user: u64,
        /// What this user may see of it.
        state: PresenceState,
    },
    /// A watch request was refused as a whole (past the server's bound of
    /// users per device); nothing of it was kept.
    Refused(ClientError),
    /// A device of `from_user` types to this user (`active`), or stopped.
    /// Show an active one for at most `frames::TYPING_EXPIRES_MS` without
    /// a renewal.
    Typing {
        /// Who types.
        from_user: u64,
        /// On which device.
        from_device: u32,
        /// Typing or stopped.
        active: bool,
    },
}

/// Who may see a user's presence and last-seen time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresencePrivacy {
    /// Everyone who watches it.
    Everyone,
    /// Only users it watches itself.
    Contacts,
    /// No one.
    Nobody,
}

/// State shared between the API and the session task.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Highest seq returned by [`Client::recv`].
    pub(crate) processed_seq: AtomicU64,
    /// Latest session facts.
    pub(crate) info: std::sync::Mutex<SessionInfo>,
    /// The error that ended the session for good (a replaced session,
    /// a removed device, a refused token), once one did: every later call
    /// returns it, so an app can tell why.
    pub(crate) ended: std::sync::Mutex<Option<ClientError>>,
}

/// The outcome of a queued send.
pub type PendingAck = oneshot::Receiver<Result<Acked, ClientError>>;

/// Sends on a [`Client`]'s session; cheap to clone.
#[derive(Debug, Clone)]
pub struct ClientSender {
    /// To the session task.
    commands: mpsc::Sender<Command>,
    /// Largest payload accepted, from the frame bound.
    payload_bytes_max: usize,
    /// Shared with the session task (why it ended).
    shared: Arc<Shared>,
}

impl ClientSender {
    /// See [`Client::send`].
    pub async fn send(&self, to_user: u64, payload: Vec<u8>) -> Result<Acked, ClientError> {
        let reply = self.send_nowait(to_user, payload).await?;
        reply.await.map_err(|_| closed_error(&self.shared))?
    }

    /// See [`Client::send_nowait`].
    pub async fn send_nowait(&self, to_user: u64, payload: Vec<u8>) -> Result<PendingAck, ClientError> {
        if payload.len() > self.payload_bytes_max {
            return Err(ClientError::PayloadTooLarge { bytes: payload.len(), limit: self.payload_bytes_max });
        }
        let (reply, outcome) = oneshot::channel();
        let send = Command::Send { to_user, payload, reply };
        self.commands.send(send).await.map_err(|_| closed_error(&self.shared))?;
        Ok(outcome)
    }
}

/// What a call on an ended session returns: the error that ended it, if one did.
fn closed_error(shared: &Shared) -> ClientError {
    let ended = shared.ended.lock().ok().and_then(|ended| ended.clone());
    ended.unwrap_or_else(|| ClientError::Closed("session ended".into()))
}

/// A connected device.
#[derive(Debug)]
pub struct Client {
    /// To the session task.
    commands: mpsc::Sender<Command>,
    /// Largest payload accepted, from the frame bound.
    payload_bytes_max: usize,
    /// From the session task.
    deliveries: mpsc::Receiver<Delivered>,
    /// Presence of watched users, from the session task.
    presence: mpsc::Receiver<PresenceEvent>,
    /// Shared progress.
    shared: Arc<Shared>,
    /// The session task's outcome (a fatal error ends it).
    task: tokio::task::JoinHandle<Result<(), ClientError>>,
}

impl Client {
    /// Connects to the device's home shard and authenticates. Fails if the
    /// first connection cannot be made or the token is refused.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let tls = client_tls(&config.ca_path)?;
        let payload_bytes_max = iris_protocol::payload_bytes_max(config.frame_bytes_max);
        let shared = Arc::new(Shared::default());
        shared.processed_seq.store(config.resume_after_seq, Ordering::Relaxed);
        let (commands, command_receiver) = mpsc::channel(COMMAND_QUEUE_MAX);
        let (delivery_sender, deliveries) = mpsc::channel(DELIVERY_QUEUE_MAX);
        let (presence_sender, presence) = mpsc::channel(PRESENCE_QUEUE_MAX);
        let (ready_sender, ready) = oneshot::channel();
        let session =
            session::Session::new(config, tls, Arc::clone(&shared), command_receiver, delivery_sender, presence_sender);
        let task = tokio::spawn(session.run(ready_sender));
        match ready.await {
            Ok(Ok(())) => Ok(Client { commands, payload_bytes_max, deliveries, presence, shared, task }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(match task.await {
                Ok(Err(error)) => error,
                _ => ClientError::Closed("session task ended during connect".into()),
            }),
        }
    }

    /// Sends `payload` to every device of `to_user`; returns once the server
    /// has stored it. Retries (same client_msg_id) across reconnects and after
    /// Throttle/MailboxFull; fails on refusals that a retry cannot fix.
    pub async fn send(&self, to_user: u64, payload: Vec<u8>) -> Result<Acked, ClientError> {
        self.sender().send(to_user, payload).await
    }

    /// Queues a send and returns the receiver of its outcome, so many sends
    /// can be in flight at once.
    pub async fn send_nowait(&self, to_user: u64, payload: Vec<u8>) -> Result<PendingAck, ClientError> {
        self.sender().send_nowait(to_user, payload).await
    }

    /// A cloneable handle that sends on this client's session, for use from
    /// other tasks while this one receives.
    pub fn sender(&self) -> ClientSender {
        ClientSender {
            commands: self.commands.clone(),
            payload_bytes_max: self.payload_bytes_max,
            shared: Arc::clone(&self.shared),
        }
    }

    /// The next message for this device, in seq order, each seq once.
    /// Returning it marks it processed (acknowledged to the server in batches).
    /// `None` once the session has ended for good.
    pub async fn recv(&mut self) -> Option<Delivered> {
        let delivered = self.deliveries.recv().await?;
        self.shared.processed_seq.fetch_max(delivered.seq, Ordering::Relaxed);
        Some(delivered)
    }

    /// Watches the presence of `users`: each one's current state arrives on
    /// [`Client::next_presence`] at once, then every change. The watch lasts
    /// until [`Client::unwatch_presence`] (the SDK renews it after every
    /// reconnect). A request past the server's bound of watched users per
    /// device is refused as a whole: a [`PresenceEvent::Refused`] says so.
    pub async fn watch_presence(&self, users: Vec<u64>) -> Result<(), ClientError> {
        self.command(Command::WatchPresence { users }).await
    }

    /// Stops watching `users`.
    pub async fn unwatch_presence(&self, users: Vec<u64>) -> Result<(), ClientError> {
        self.command(Command::UnwatchPresence { users }).await
    }

    /// Sets who may see this user's presence and last-seen time (for all of
    /// its devices; the last one set wins).
    pub async fn set_presence_privacy(&self, privacy: PresencePrivacy) -> Result<(), ClientError> {
        let privacy = match privacy {
            PresencePrivacy::Everyone => iris_protocol::frames::PRIVACY_EVERYONE,
            PresencePrivacy::Contacts => iris_protocol::frames::PRIVACY_CONTACTS,
            PresencePrivacy::Nobody => iris_protocol::frames::PRIVACY_NOBODY,
        };
        self.command(Command::PresencePrivacy { privacy }).await
    }

    /// Tells the devices of `to_user` that have a session now that this
    /// user is typing to it (`active`), or stopped. Never stored: a device
    /// that connects later does not hear of it. Renew an active state every
    /// few seconds; receivers let one expire after
    /// `frames::TYPING_EXPIRES_MS`.
    pub async fn typing(&self, to_user: u64, active: bool) -> Result<(), ClientError> {
        self.command(Command::Typing { to_user, active }).await
    }

    /// The next presence change of a watched user (a newer state of a user
    /// replaces one not yet taken). `None` once the session has ended.
    pub async fn next_presence(&mut self) -> Option<PresenceEvent> {
        self.presence.recv().await
    }

    async fn command(&self, command: Command) -> Result<(), ClientError> {
        self.commands.send(command).await.map_err(|_| closed_error(&self.shared))
    }

    /// Highest seq returned by [`Client::recv`] (persist it to resume later).
    pub fn processed_seq(&self) -> u64 {
        self.shared.processed_seq.load(Ordering::Relaxed)
    }

    /// Facts about the current session.
    pub fn session_info(&self) -> SessionInfo {
        self.shared.info.lock().map(|info| *info).unwrap_or_default()
    }

    /// Removes `device_id` of this user (this device itself, or another
    /// one: unlinking a lost laptop). Returns once the removal is durable;
    /// the removed device's session ends with [`ErrorCode::DeviceRemoved`]
    /// and it can never connect again under that id. Removing this device
    /// ends this session the same way once it returns.
    pub async fn remove_device(&self, device_id: u32) -> Result<(), ClientError> {
        let (reply, outcome) = oneshot::channel();
        let remove = Command::RemoveDevice { device_id, reply };
        self.commands.send(remove).await.map_err(|_| closed_error(&self.shared))?;
        outcome.await.map_err(|_| closed_error(&self.shared))?
    }

    /// Drops the connection and reconnects, resuming after the processed seq.
    pub async fn reconnect(&self) -> Result<(), ClientError> {
        self.commands.send(Command::Reconnect).await.map_err(|_| closed_error(&self.shared))
    }

    /// Acknowledges what was processed and closes the connection.
    pub async fn close(self) -> Result<(), ClientError> {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Close { reply }).await.is_ok() {
            let _ = done.await;
        }
        match self.task.await {
            Ok(result) => result,
            Err(error) => Err(ClientError::Closed(error.to_string())),
        }
    }
}

/// Builds the QUIC client configuration (TLS 1.3, ALPN `iris/2`, keep-alive)
/// trusting the CA in `ca_path`. Public for tools that drive the protocol
/// directly (the perf harness).
pub fn client_tls(ca_path: &Path) -> Result<quinn::ClientConfig, ClientError> {
    use rustls_pki_types::pem::PemObject;
    let ca_error = |detail: String| ClientError::Ca { path: ca_path.to_path_buf(), detail };
    let mut roots = rustls::RootCertStore::empty();
    let certificates = rustls_pki_types::CertificateDer::pem_file_iter(ca_path).map_err(|e| ca_error(e.to_string()))?;
    for certificate in certificates {
        let certificate = certificate.map_err(|e| ca_error(e.to_string()))?;
        roots.add(certificate).map_err(|e| ca_error(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ca_error("no certificate found".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ca_error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![iris_protocol::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(|e| ca_error(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(client_transport()));
    Ok(config)
}

/// The QUIC transport settings of an Iris client: a keep-alive every 10 s
/// (well inside the server's idle timeout) and a 30 s idle timeout.
pub fn client_transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(10)));
    transport.max_idle_timeout(Duration::from_secs(30).try_into().ok());
    transport
}
