//! irisd configuration: a TOML file, overridden by command-line flags, then
//! validated as a whole. Every limit has a name, a unit and a default that is
//! explained where it is declared.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Errors reading or validating the configuration. All are operator errors:
/// irisd prints them and exits with status 2.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys are errors).
    #[error("config file {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        detail: String,
    },
    /// A value is out of its allowed range (named with its section and key).
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A value in the file is out of its allowed range.
    #[error("config file {path}: {message}")]
    InvalidIn {
        /// The file.
        path: PathBuf,
        /// The key and why its value is refused.
        message: String,
    },
}

impl ConfigError {
    /// The same error, naming the file the values came from.
    pub fn in_file(self, path: &Path) -> ConfigError {
        match self {
            ConfigError::Invalid(message) => ConfigError::InvalidIn { path: path.to_path_buf(), message },
            other => other,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where keys, certificates and (later) the logs live.
    pub data_dir: PathBuf,
    /// Address of shard 0; shard k listens on the same IP at port + k.
    pub listen: SocketAddr,
    /// Host clients are told to connect to (Redirect, ShardMap). Defaults to the listen IP.
    pub advertise_address: Option<String>,
    /// Number of shards; `None` means one per CPU in irisd's affinity mask.
    pub shards: Option<u16>,
    /// Admin endpoint (`GET /metrics` in Prometheus format, `GET /health`);
    /// off unless set. Bind it to a private address.
    pub admin_listen: Option<SocketAddr>,
    /// Limits on everything a peer can make the server hold.
    pub limits: Limits,
    /// Per-sender rate limits (token buckets; docs/overload.md).
    pub rate_limits: RateLimits,
    /// Admission control (CoDel; docs/overload.md).
    pub admission: Admission,
    /// Presence (docs/presence.md).
    pub presence: PresenceConfig,
    /// Runtime tuning.
    pub runtime: RuntimeConfig,
    /// Durable storage.
    pub storage: StorageConfig,
}

/// How messages are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Per-shard log; an Ack is sent only after the fdatasync covering the message.
    Fsync,
    /// Memory only, for benchmarks: everything is lost when irisd stops.
    None,
}

/// Storage settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `"fsync"` (default) or `"none"`.
    pub durability: Durability,
    /// A log segment is closed at this size; reclaim deletes whole segments.
    pub segment_bytes_max: u64,
    /// One write + fdatasync carries at most about this many bytes.
    pub commit_bytes_max: u32,
    /// How long a write may wait to gather more records when the log is idle
    /// (0: write at once; batches still form while a sync is in flight).
    pub commit_delay_us: u32,
    /// Payload bytes of undelivered messages a shard keeps in memory (the
    /// body cache); the bodies held longest beyond it are read back from
    /// the log when pushed. Part of `limits.shard_mailbox_bytes_max`.
    pub body_cache_bytes_max: u64,
    /// Bodies a shard has read back and not pushed yet, with its reads in
    /// flight (the read-ahead). Part of `limits.shard_mailbox_bytes_max`.
    pub read_ahead_bytes_max: u64,
    /// Disk one shard's log may take (segments and the spare); new messages
    /// get Throttle once it does. 0: 90% of what the log holds at start plus
    /// its share of the free space then.
    pub disk_bytes_max: u64,
}

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        StorageConfig {
            durability: Durability::Fsync,
            // 64 MiB: few files per shard, and a checkpoint at each segment
            // head costs ~40 B per device, small next to it.
            segment_bytes_max: 64 * 1024 * 1024,
            // 1 MiB: about 5,000 150-byte messages per sync, enough to ride
            // out a slow fdatasync without one huge write.
            commit_bytes_max: 1024 * 1024,
            commit_delay_us: 0,
            // 256 MiB: the newest ~1.7 million 150-byte messages of a shard
            // are pushed without a read; online devices drain well inside it.
            body_cache_bytes_max: 256 * 1024 * 1024,
            // 16 MiB: 64 messages ahead for each of ~1,700 devices draining
            // 150-byte messages at once.
            read_ahead_bytes_max: 16 * 1024 * 1024,
            disk_bytes_max: 0,
        }
    }
}

/// Limits. Each bound says what happens when it is reached.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frame accepted or sent (length prefix value). Over it: FrameTooLarge, connection closed.
    pub frame_bytes_max: u32,
    /// Devices one user may register. Over it: TooManyDevices on Hello.
    pub devices_per_user_max: u32,
    /// Devices one shard may register (all users together). Over it: Throttle on Hello.
    pub devices_per_shard_max: u32,
    /// Undelivered messages held per device. Over it: MailboxFull to the sender.
    pub mailbox_messages_max: u32,
    /// Undelivered payload bytes held per device. Over it: MailboxFull to the sender.
    pub mailbox_bytes_max: u64,
    /// Undelivered messages one sending user may hold in one device's
    /// mailbox. Over it: MailboxFull to that sender only (no device is
    /// removed for it). Unset: a tenth of `mailbox_messages_max`
    /// ([`Limits::sender_share_messages`]).
    pub mailbox_sender_messages_max: Option<u32>,
    /// Undelivered payload bytes one sending user may hold in one device's
    /// mailbox. Over it: MailboxFull to that sender only. Unset: a tenth of
    /// `mailbox_bytes_max`, at least one frame.
    pub mailbox_sender_bytes_max: Option<u64>,
    /// Memory all mailboxes of one shard hold together (payload + 128 B per
    /// device entry). Over it: Throttle to senders until devices drain.
    pub shard_mailbox_bytes_max: u64,
    /// Remembered (client_msg_id -> server_msg_id) entries per sending device;
    /// the oldest acknowledged entry is forgotten first.
    pub dedup_entries_per_device_max: u32,
    /// Acknowledged (client_msg_id -> server_msg_id) entries all sending
    /// devices of one shard keep together (~40 B each); past it the device
    /// that sent least recently forgets its acknowledged entries first.
    pub sender_dedup_entries_max: u32,
    /// Recipient-side memory of (sender device, client_msg_id) -> stored id,
    /// per shard, so a retry after a crash is not stored twice; the oldest is
    /// forgotten first. About 60 bytes per entry.
    pub stored_dedup_entries_max: u32,
    /// Seconds without a session after which a device is removed (its Hello
    /// then gets DeviceRemoved); 0 never removes. Counted from the last
    /// session's end, or from the start for devices recovered from the log.
    pub device_inactive_expiry_s: u64,
    /// Sends of one device accepted but not yet acknowledged. Over it: Throttle.
    pub sends_in_flight_per_device_max: u32,
    /// Client connections per shard. Over it: new connections are refused.
    pub connections_per_shard_max: u32,
    /// Connections per shard from one source IP address. Over it: refused.
    /// Carrier-grade NAT puts many phones behind one address, so this is high.
    pub connections_per_source_max: u32,
    /// Handshakes in progress per shard above which a new connection must
    /// first prove its address with a QUIC Retry (a spoofed flood then costs
    /// one stateless packet each, and no connection state).
    pub handshakes_unvalidated_max: u32,
    /// Bytes of responses queued for one connection's request stream; past it
    /// the shard stops reading that connection's requests (QUIC flow control
    /// then pushes back on the client).
    pub connection_response_bytes_max: u32,
    /// Batches in flight on each shard-to-shard channel. When full, messages
    /// wait in the sender's outbox.
    pub shard_channel_batches_max: u32,
    /// Messages buffered per destination shard in a shard's outbox, and
    /// sends in flight to each destination shard; past either, new Sends to
    /// that shard are refused with Throttle.
    pub shard_outbox_messages_max: u32,
}

/// Per-sender rate limits, each a token bucket: `*_burst` tokens at most,
/// refilled at `*_per_s` a second; a send needs a token in every bucket it
/// is charged to (its device's sends and bytes, and its device -> user
/// pair), else it is refused with `Throttle{retry_after_ms}` saying when it
/// would pass. A `*_per_s` of 0 turns that bucket off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Sends per second of one device, to anyone.
    pub device_sends_per_s: u64,
    /// Sends one device may make at once.
    pub device_sends_burst: u64,
    /// Payload bytes per second of one device.
    pub device_bytes_per_s: u64,
    /// Payload bytes one device may send at once.
    pub device_bytes_burst: u64,
    /// Sends per second of one device to one user.
    pub pair_sends_per_s: u64,
    /// Sends one device may make at once to one user.
    pub pair_sends_burst: u64,
    /// Keys (devices; device -> user pairs) each shard's tables track at
    /// most, ~80 B each; refilled buckets are forgotten. At the bound a new
    /// pair is not limited (its device still is).
    pub tracked_keys_max: u32,
}

impl Default for RateLimits {
    fn default() -> RateLimits {
        RateLimits {
            device_sends_per_s: 200,
            device_sends_burst: 2_000,
            device_bytes_per_s: 4 * 1024 * 1024,
            device_bytes_burst: 32 * 1024 * 1024,
            pair_sends_per_s: 10,
            pair_sends_burst: 300,
            tracked_keys_max: 1_048_576,
        }
    }
}

/// Presence: who watches whom, and how churn is damped.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Users one device may watch at once (a large contact list).
    pub subscriptions_per_device_max: u32,
    /// Devices that may watch one user at once; past it a watch is answered
    /// "unavailable" and not kept.
    pub watchers_per_user_max: u32,
    /// How long a user stays online to its watchers after its last device
    /// disconnects (a reconnect within it causes no event), ms.
    pub grace_ms: u32,
}

impl Default for PresenceConfig {
    fn default() -> PresenceConfig {
        let limits = crate::shard::presence::PresenceLimits::DEFAULT;
        PresenceConfig {
            subscriptions_per_device_max: limits.subscriptions_per_device_max as u32,
            watchers_per_user_max: limits.watchers_per_user_max as u32,
            grace_ms: limits.grace_ms as u32,
        }
    }
}

/// CoDel admission control (RFC 8289's control law, applied to new Sends).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admission {
    /// Target sojourn of a Send, from its arrival to its answer (which
    /// includes the fsync), in ms. While sojourns stay above it for a whole
    /// `codel_interval_ms`, new Sends are refused with Throttle at the
    /// control law's rate until they fall below it. Set it above the disk's
    /// normal fsync latency. 0 disables.
    pub codel_target_ms: u64,
    /// CoDel interval, ms (the RFC's 100 ms: about a worst-case round trip).
    pub codel_interval_ms: u64,
}

impl Default for Admission {
    fn default() -> Admission {
        Admission { codel_target_ms: 5, codel_interval_ms: 100 }
    }
}

/// Runtime tuning.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// glommio's locked I/O memory per shard, in bytes (it refuses to start below 512 KiB).
    pub io_memory_bytes: usize,
    /// Pin shard k to the k-th CPU of the affinity mask.
    pub pin_cores: bool,
    /// QUIC idle timeout in milliseconds (clients keep connections alive with QUIC pings).
    pub idle_timeout_ms: u32,
    /// A connection that has not authenticated within this many milliseconds is closed.
    pub hello_timeout_ms: u32,
    /// A connection whose push stream accepts nothing for this long while
    /// messages wait for it is closed (close code 6, SLOW_READER); its
    /// messages stay in its mailbox for its next connection.
    pub push_stall_timeout_ms: u32,
    /// On SIGTERM, the longest irisd drains (clients told to reconnect,
    /// Sends in flight answered, logs synced) before it exits regardless.
    pub drain_timeout_ms: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from("./iris-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            advertise_address: None,
            shards: None,
            admin_listen: None,
            limits: Limits::default(),
            rate_limits: RateLimits::default(),
            admission: Admission::default(),
            presence: PresenceConfig::default(),
            runtime: RuntimeConfig::default(),
            storage: StorageConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            frame_bytes_max: iris_protocol::FRAME_BYTES_MAX_DEFAULT,
            devices_per_user_max: 5,
            devices_per_shard_max: 1_000_000,
            // 1M messages or 1 GiB per device: months of heavy chat, or a
            // celebrity's fan mail, for one offline phone. Bodies wait on
            // disk; memory holds 128 B per message (docs/storage.md).
            mailbox_messages_max: 1_000_000,
            mailbox_bytes_max: 1024 * 1024 * 1024,
            // Unset: a tenth of the mailbox per sending user (100,000 by
            // default, a month of a very chatty contact at 3,000 a day),
            // so filling a mailbox, which can get an offline device
            // removed, takes ten senders, not one.
            mailbox_sender_messages_max: None,
            mailbox_sender_bytes_max: None,
            // 2 GiB per shard: with the 256 MiB body cache and 16 MiB of
            // read-ahead, about 14 million queued messages of any size
            // (128 B each in memory); 32 shards on a 128 GiB host keep half
            // of it for everything else.
            shard_mailbox_bytes_max: 2 * 1024 * 1024 * 1024,
            // A client keeps at most a few dozen sends unacknowledged; 256
            // covers its retry window with room to spare, at ~24 B per entry.
            dedup_entries_per_device_max: 256,
            sender_dedup_entries_max: 1_048_576,
            sends_in_flight_per_device_max: 256,
            // 30 days, as WhatsApp unlinks companion devices.
            device_inactive_expiry_s: 30 * 24 * 3600,
            // 256k entries, ~16 MiB per shard: covers every send of the last
            // seconds to minutes at full load, the window in which clients retry.
            stored_dedup_entries_max: 262_144,
            connections_per_shard_max: 100_000,
            connections_per_source_max: 10_000,
            handshakes_unvalidated_max: 256,
            connection_response_bytes_max: 256 * 1024,
            // 64 batches of up to 256 messages: 16k messages in flight between
            // a pair of shards before the sender's outbox fills.
            shard_channel_batches_max: 64,
            shard_outbox_messages_max: 16_384,
        }
    }
}

impl Limits {
    /// Messages one sending user may hold in one device's mailbox: as set,
    /// or a tenth of the mailbox (at least 1).
    pub fn sender_share_messages(&self) -> u32 {
        self.mailbox_sender_messages_max.unwrap_or((self.mailbox_messages_max / 10).max(1))
    }

    /// Payload bytes one sending user may hold in one device's mailbox: as
    /// set, or a tenth of the mailbox, at least one frame (never more than
    /// the mailbox).
    pub fn sender_share_bytes(&self) -> u64 {
        self.mailbox_sender_bytes_max.unwrap_or_else(|| {
            (self.mailbox_bytes_max / 10).max(u64::from(self.frame_bytes_max)).min(self.mailbox_bytes_max)
        })
    }
}

impl Default for RuntimeConfig {
    fn default() -> RuntimeConfig {
        RuntimeConfig {
            // glommio's I/O buffers; the UDP path barely uses them. 2 MiB keeps
            // two shards under the 8 MiB locked-memory limit of non-root users.
            io_memory_bytes: 2 * 1024 * 1024,
            pin_cores: true,
            idle_timeout_ms: 30_000,
            hello_timeout_ms: 10_000,
            push_stall_timeout_ms: 30_000,
            drain_timeout_ms: 10_000,
        }
    }
}

/// Most batches in flight on one shard-to-shard channel: every ordered pair
/// of shards has a channel, and each allocates its capacity at start.
pub const SHARD_CHANNEL_BATCHES_CEILING: u32 = 4096;

impl Config {
    /// Reads `path` (or the defaults when `None`).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), detail: e.to_string() })
    }

    /// Reads and checks `path` as `irisd serve --config` would before
    /// flags apply (`irisd check-config`): the same messages, with the file.
    /// A file without `shards` is checked with `default_shards`, the count
    /// `serve` would choose on this machine (one per allowed CPU).
    pub fn check_file(path: &Path, default_shards: u16) -> Result<Config, ConfigError> {
        let mut config = Config::load(Some(path))?;
        config.shards = config.shards.or(Some(default_shards));
        config.validate().map_err(|error| error.in_file(path))?;
        Ok(config)
    }

    /// Checks every value; call after flags are applied.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        let limits = &self.limits;
        if let Some(shards) = self.shards {
            if shards == 0 || shards > 1024 {
                return invalid(format!("shards = {shards}: must be 1..=1024"));
            }
        }
        if u32::from(self.listen.port()) + u32::from(self.shards.unwrap_or(1)) > 65_536 || self.listen.port() == 0 {
            return invalid(format!("listen port {} leaves no room for one port per shard", self.listen.port()));
        }
        if limits.frame_bytes_max < iris_protocol::FRAME_BYTES_MAX_FLOOR
            || limits.frame_bytes_max > iris_protocol::FRAME_BYTES_MAX_CEILING
        {
            return invalid(format!(
                "limits.frame_bytes_max = {}: must be {}..={}",
                limits.frame_bytes_max,
                iris_protocol::FRAME_BYTES_MAX_FLOOR,
                iris_protocol::FRAME_BYTES_MAX_CEILING
            ));
        }
        let positive = [
            ("devices_per_user_max", limits.devices_per_user_max),
            ("devices_per_shard_max", limits.devices_per_shard_max),
            ("mailbox_messages_max", limits.mailbox_messages_max),
            ("mailbox_sender_messages_max", limits.sender_share_messages()),
            ("dedup_entries_per_device_max", limits.dedup_entries_per_device_max),
            ("sender_dedup_entries_max", limits.sender_dedup_entries_max),
            ("sends_in_flight_per_device_max", limits.sends_in_flight_per_device_max),
            ("stored_dedup_entries_max", limits.stored_dedup_entries_max),
            ("connections_per_shard_max", limits.connections_per_shard_max),
            ("connections_per_source_max", limits.connections_per_source_max),
            ("shard_channel_batches_max", limits.shard_channel_batches_max),
            ("shard_outbox_messages_max", limits.shard_outbox_messages_max),
        ];
        for (name, value) in positive {
            if value == 0 {
                return invalid(format!("limits.{name} must be at least 1"));
            }
        }
        if limits.shard_channel_batches_max > SHARD_CHANNEL_BATCHES_CEILING {
            return invalid(format!(
                "limits.shard_channel_batches_max = {}: at most {SHARD_CHANNEL_BATCHES_CEILING} (each of the shards x shards channels allocates it)",
                limits.shard_channel_batches_max
            ));
        }
        if limits.devices_per_user_max > 64 {
            return invalid(format!("limits.devices_per_user_max = {}: at most 64", limits.devices_per_user_max));
        }
        if limits.connection_response_bytes_max < limits.frame_bytes_max {
            return invalid("limits.connection_response_bytes_max must be at least limits.frame_bytes_max".into());
        }
        if limits.mailbox_bytes_max < u64::from(limits.frame_bytes_max) {
            return invalid("limits.mailbox_bytes_max must be at least limits.frame_bytes_max".into());
        }
        if limits.sender_share_messages() > limits.mailbox_messages_max
            || limits.sender_share_bytes() > limits.mailbox_bytes_max
        {
            return invalid(
                "limits.mailbox_sender_messages_max / mailbox_sender_bytes_max must be at most \
                 limits.mailbox_messages_max / mailbox_bytes_max (a share of the mailbox)"
                    .into(),
            );
        }
        if limits.sender_share_bytes() < u64::from(limits.frame_bytes_max) {
            return invalid("limits.mailbox_sender_bytes_max must be at least limits.frame_bytes_max".into());
        }
        if limits.shard_mailbox_bytes_max < limits.mailbox_bytes_max {
            return invalid("limits.shard_mailbox_bytes_max must be at least limits.mailbox_bytes_max".into());
        }
        if self.runtime.io_memory_bytes < 512 * 1024 {
            return invalid("runtime.io_memory_bytes must be at least 524288 (glommio's minimum)".into());
        }
        if !(1000..=600_000).contains(&self.runtime.idle_timeout_ms) {
            return invalid("runtime.idle_timeout_ms must be between 1000 and 600000".into());
        }
        if self.runtime.io_memory_bytes > 1 << 30 {
            return invalid("runtime.io_memory_bytes must be at most 1 GiB".into());
        }
        if limits.connections_per_shard_max > 10_000_000 {
            return invalid("limits.connections_per_shard_max must be at most 10000000".into());
        }
        let storage = &self.storage;
        // Recovery holds one segment's bytes and its decoded records at a
        // time on each shard (about twice the segment): the upper bound
        // keeps that within what a server has.
        if storage.segment_bytes_max < 1024 * 1024 || storage.segment_bytes_max > 1 << 30 {
            return invalid("storage.segment_bytes_max must be between 1 MiB and 1 GiB".into());
        }
        if storage.commit_bytes_max < 4096 || u64::from(storage.commit_bytes_max) > storage.segment_bytes_max {
            return invalid(
                "storage.commit_bytes_max must be at least 4096 and at most storage.segment_bytes_max".into(),
            );
        }
        if storage.commit_delay_us > 100_000 {
            return invalid("storage.commit_delay_us must be at most 100000".into());
        }
        if storage.read_ahead_bytes_max < u64::from(limits.frame_bytes_max) {
            return invalid("storage.read_ahead_bytes_max must be at least limits.frame_bytes_max".into());
        }
        if storage.durability == Durability::Fsync
            && storage.body_cache_bytes_max.saturating_add(storage.read_ahead_bytes_max)
                >= limits.shard_mailbox_bytes_max
        {
            return invalid(
                "storage.body_cache_bytes_max + storage.read_ahead_bytes_max must be below \
                 limits.shard_mailbox_bytes_max (the rest is for the index of queued messages)"
                    .into(),
            );
        }
        if storage.disk_bytes_max != 0 && storage.disk_bytes_max < 8 * storage.segment_bytes_max {
            return invalid("storage.disk_bytes_max must be 0 or at least 8 x storage.segment_bytes_max".into());
        }
        let rates = &self.rate_limits;
        for (name, per_s, burst) in [
            ("device_sends", rates.device_sends_per_s, rates.device_sends_burst),
            ("device_bytes", rates.device_bytes_per_s, rates.device_bytes_burst),
            ("pair_sends", rates.pair_sends_per_s, rates.pair_sends_burst),
        ] {
            if per_s > 0 && burst == 0 {
                return invalid(format!("rate_limits.{name}_burst must be at least 1 while {name}_per_s is set"));
            }
            if per_s > 1 << 40 || burst > 1 << 40 {
                return invalid(format!("rate_limits.{name}_per_s and _burst must be at most 2^40"));
            }
        }
        if rates.tracked_keys_max == 0 {
            return invalid("rate_limits.tracked_keys_max must be at least 1 (0 would limit nobody)".into());
        }
        if self.limits.sender_dedup_entries_max < self.limits.dedup_entries_per_device_max {
            return invalid(
                "limits.sender_dedup_entries_max must be at least limits.dedup_entries_per_device_max".into(),
            );
        }
        if rates.device_bytes_per_s > 0 && rates.device_bytes_burst < u64::from(self.limits.frame_bytes_max) {
            return invalid("rate_limits.device_bytes_burst must be at least limits.frame_bytes_max".into());
        }
        let presence = &self.presence;
        if !(1..=10_000).contains(&presence.subscriptions_per_device_max) {
            return invalid("presence.subscriptions_per_device_max must be 1..=10000".into());
        }
        if !(1..=10_000_000).contains(&presence.watchers_per_user_max) {
            return invalid("presence.watchers_per_user_max must be 1..=10000000".into());
        }
        if presence.grace_ms > 600_000 {
            return invalid("presence.grace_ms must be at most 600000".into());
        }
        if self.admission.codel_target_ms > 10_000 || !(1..=60_000).contains(&self.admission.codel_interval_ms) {
            return invalid("admission.codel_target_ms must be at most 10000 and codel_interval_ms 1..=60000".into());
        }
        if !(100..=600_000).contains(&self.runtime.hello_timeout_ms) {
            return invalid("runtime.hello_timeout_ms must be between 100 and 600000".into());
        }
        if !(100..=600_000).contains(&self.runtime.drain_timeout_ms) {
            return invalid("runtime.drain_timeout_ms must be between 100 and 600000".into());
        }
        if !(100..=3_600_000).contains(&self.runtime.push_stall_timeout_ms) {
            return invalid("runtime.push_stall_timeout_ms must be between 100 and 3600000".into());
        }
        Ok(())
    }

    /// The host clients are told to use.
    pub fn advertised_host(&self) -> String {
        self.advertise_address.clone().unwrap_or_else(|| self.listen.ip().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_are_named() {
        Config::default().validate().unwrap();
        let mut config = Config::default();
        config.limits.frame_bytes_max = 10;
        assert!(config.validate().unwrap_err().to_string().contains("frame_bytes_max"));
        let parsed: Result<Config, _> = toml::from_str("shards = 2\n[limits]\nno_such_limit = 1\n");
        assert!(parsed.unwrap_err().to_string().contains("no_such_limit"));
        let parsed: Config = toml::from_str("shards = 3\n[limits]\nmailbox_messages_max = 7\n").unwrap();
        assert_eq!((parsed.shards, parsed.limits.mailbox_messages_max), (Some(3), 7));
        let mut config = Config::default();
        config.limits.shard_mailbox_bytes_max = 1024;
        assert!(config.validate().unwrap_err().to_string().contains("shard_mailbox_bytes_max"));
        let mut config = Config::default();
        config.rate_limits.pair_sends_burst = 0;
        assert!(config.validate().unwrap_err().to_string().contains("pair_sends_burst"));
    }

    #[test]
    fn a_senders_share_follows_the_mailbox_unless_set_and_never_exceeds_it() {
        let parsed: Config = toml::from_str("[limits]\nmailbox_messages_max = 100\n").unwrap();
        parsed.validate().unwrap();
        assert_eq!(parsed.limits.sender_share_messages(), 10);
        let defaults = Limits::default();
        assert_eq!(
            (defaults.sender_share_messages(), defaults.sender_share_bytes()),
            (100_000, 1024 * 1024 * 1024 / 10)
        );
        let mut limits = Limits { mailbox_bytes_max: u64::from(defaults.frame_bytes_max), ..Limits::default() };
        assert_eq!(limits.sender_share_bytes(), u64::from(defaults.frame_bytes_max), "at least one frame");
        limits.mailbox_messages_max = 3;
        assert_eq!(limits.sender_share_messages(), 1);
        let parsed: Result<Config, _> =
            toml::from_str("[limits]\nmailbox_messages_max = 100\nmailbox_sender_messages_max = 101\n");
        let error = parsed.unwrap().validate().unwrap_err().to_string();
        assert!(error.contains("mailbox_sender_messages_max"), "{error}");
    }

    #[test]
    fn the_annotated_example_file_parses_validates_and_states_the_defaults() {
        let example: Config = toml::from_str(include_str!("../../deploy/irisd.toml")).expect("deploy/irisd.toml");
        example.validate().unwrap();
        let defaults = Config::default();
        assert_eq!(format!("{:?}", example.limits), format!("{:?}", defaults.limits));
        assert_eq!(format!("{:?}", example.rate_limits), format!("{:?}", defaults.rate_limits));
        assert_eq!(format!("{:?}", example.admission), format!("{:?}", defaults.admission));
    }
}
