//! `irisd`: the Iris server binary. `irisd serve` runs the shards;
//! `irisd check-config FILE` checks a configuration file;
//! `irisd token` mints an access token for a device;
//! `irisd rotate-token-key` replaces the token-signing key.

use clap::{Parser, Subcommand};
use irisd::auth::{Claims, TokenAuthority};
use irisd::config::{Config, Durability};
use irisd::driver::runtime::{self, NodeSetup};
use irisd::tls::TlsFiles;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "irisd", version, about = "Iris chat messaging server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve {
        /// TOML configuration file (flags override it).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory (default ./iris-data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Address of shard 0; shard k uses port + k (default 127.0.0.1:7700).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Number of shards (default: one per CPU in the affinity mask).
        #[arg(long)]
        shards: Option<u16>,
    },
    /// Check a configuration file: exit 0 if `irisd serve --config FILE`
    /// would accept it, else 1 with the file, key and reason.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print an access token for a device.
    Token {
        /// Data directory holding the token-signing key.
        #[arg(long, default_value = "./iris-data")]
        data_dir: PathBuf,
        /// User id.
        #[arg(long)]
        user: u64,
        /// Device id.
        #[arg(long)]
        device: u32,
        /// Lifetime in seconds (default 30 days).
        #[arg(long, default_value_t = 30 * 24 * 3600)]
        ttl: u64,
    },
    /// Replace the token-signing key. Tokens of the old key stay valid (its
    /// public key is kept under keys/token-retired/) until that file is
    /// deleted; a running irisd accepts the new key's tokens after a restart.
    RotateTokenKey {
        /// Data directory holding the token-signing key.
        #[arg(long, default_value = "./iris-data")]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    fail_stop_on_panic();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, data_dir, listen, shards } => serve(config, data_dir, listen, shards),
        Command::CheckConfig { file } => check_config(&file),
        Command::Token { data_dir, user, device, ttl } => token(&data_dir, user, device, ttl),
        Command::RotateTokenKey { data_dir } => rotate_token_key(&data_dir),
    }
}

/// Log lines buffered for the log thread (~200 bytes each: about 2 MiB).
const LOG_LINES_BUFFERED_MAX: usize = 10_000;

/// Fail-stop: a panic on any thread (a shard's loop, its recovery, the
/// admin endpoint) aborts the whole process after the usual report. A shard
/// that died while the process stayed up would leave its users unserved and
/// throttled forever while health checks pass; aborting lets the supervisor
/// (systemd) restart irisd, which recovers every shard from its log.
fn fail_stop_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("irisd: a thread panicked; aborting the process (fail-stop)");
        std::process::abort();
    }));
}

fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys/token-signing.key")
}

fn retired_keys_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("keys/token-retired")
}

/// Keeps the current key's public half as retired, then writes a new
/// signing key in its place (each file written and synced before the next).
fn rotate_token_key(data_dir: &Path) -> ExitCode {
    let path = key_path(data_dir);
    let old = match TokenAuthority::load_or_create(&path, false) {
        Ok((authority, _)) => authority,
        Err(error) => {
            eprintln!("irisd rotate-token-key: {error}");
            return ExitCode::from(2);
        }
    };
    let retired = retired_keys_dir(data_dir);
    let retired_file = retired.join(format!("{:08x}.pub", old.key_id()));
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
    let new = TokenAuthority::from_secret(secret);
    let written = irisd::files::create_private_directory(&retired)
        .and_then(|()| irisd::files::write_public(&retired_file, &old.public_key()))
        .and_then(|()| irisd::files::write_private(&path, &secret));
    if let Err(error) = written {
        eprintln!("irisd rotate-token-key: {error}");
        return ExitCode::from(2);
    }
    println!(
        "irisd: token key {:08x} replaced by {:08x}; restart irisd to accept tokens of the new key. \
         Tokens of the old key stay valid until you delete {} (after the longest token lifetime)",
        old.key_id(),
        new.key_id(),
        retired_file.display()
    );
    ExitCode::SUCCESS
}

fn check_config(file: &Path) -> ExitCode {
    let default_shards = match default_shard_count() {
        Ok(count) => count,
        Err(error) => {
            eprintln!("irisd: {error}");
            return ExitCode::from(1);
        }
    };
    match Config::check_file(file, default_shards) {
        Ok(_) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("irisd: {error}");
            ExitCode::from(1)
        }
    }
}

/// The shard count when the configuration names none: one per CPU this
/// process may run on (its affinity mask, e.g. systemd's `CPUAffinity=`).
fn default_shard_count() -> Result<u16, String> {
    runtime::allowed_cpus().map(|cpus| cpus.len().clamp(1, 1024) as u16).map_err(|error| error.to_string())
}

fn token(data_dir: &Path, user: u64, device: u32, ttl: u64) -> ExitCode {
    let path = key_path(data_dir);
    if !path.exists() {
        eprintln!(
            "irisd token: no signing key at {}; start `irisd serve --data-dir {}` once to create it",
            path.display(),
            data_dir.display()
        );
        return ExitCode::from(2);
    }
    let authority = match TokenAuthority::load_or_create(&path, false) {
        Ok((authority, _)) => authority,
        Err(error) => {
            eprintln!("irisd token: {error}");
            return ExitCode::from(2);
        }
    };
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    println!(
        "{}",
        authority.mint(Claims { user_id: user, device_id: device, expires_at_s: now_s.saturating_add(ttl) })
    );
    ExitCode::SUCCESS
}

fn serve(
    config_path: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    shards: Option<u16>,
) -> ExitCode {
    // Records leave from a thread of their own: a shard never blocks on a
    // slow or stalled stderr or journald (a full pipe, a stuck journald).
    // Past a bound of waiting records, new ones are dropped.
    let filter = || tracing_subscriber::EnvFilter::try_from_env("IRIS_LOG").unwrap_or_else(|_| "info".into());
    let to_journal = match std::env::var("IRIS_LOG_OUTPUT").as_deref() {
        Err(_) | Ok("auto") => irisd::driver::journal::stderr_is_journal(),
        Ok("journal") => true,
        Ok("stderr") => false,
        Ok(other) => {
            eprintln!("irisd: IRIS_LOG_OUTPUT={other}: must be auto, journal or stderr");
            return ExitCode::from(2);
        }
    };
    let _log_guard: Box<dyn std::any::Any> = if to_journal {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let (layer, guard) = match irisd::driver::journal::layer() {
            Ok(started) => started,
            Err(error) => {
                eprintln!("irisd: cannot start the journal thread: {error}");
                return ExitCode::from(2);
            }
        };
        tracing_subscriber::registry().with(filter()).with(layer).init();
        Box::new(guard)
    } else {
        let (log_writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .buffered_lines_limit(LOG_LINES_BUFFERED_MAX)
            .lossy(true)
            .thread_name("irisd-log")
            .finish(std::io::stderr());
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(log_writer)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
        Box::new(guard)
    };
    let fail = |message: String| {
        eprintln!("irisd: {message}");
        ExitCode::from(2)
    };
    let mut config = match Config::load(config_path.as_deref()) {
        Ok(config) => config,
        Err(error) => return fail(error.to_string()),
    };
    if let Some(data_dir) = data_dir {
        config.data_dir = data_dir;
    }
    if let Some(listen) = listen {
        config.listen = listen;
    }
    if shards.is_some() {
        config.shards = shards;
    }
    let shard_count = match config.shards {
        Some(count) => count,
        None => match default_shard_count() {
            Ok(count) => count,
            Err(error) => return fail(error),
        },
    };
    config.shards = Some(shard_count);
    if let Err(error) = config.validate() {
        let error = match &config_path {
            Some(path) => error.in_file(path),
            None => error,
        };
        return fail(error.to_string());
    }
    // Files irisd creates are its own: the logs hold who talks to whom.
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe { libc::umask(0o077) };
    config.data_dir = match irisd::files::prepare_data_dir(&config.data_dir) {
        Ok(path) => path,
        Err(error) => return fail(format!("creating data directory {}: {error}", config.data_dir.display())),
    };
    // Held until the process exits; a second irisd on this directory stops here.
    let _lock = match irisd::files::DataDirLock::acquire(&config.data_dir) {
        Ok(lock) => lock,
        Err(error) => return fail(error.to_string()),
    };

    match config.storage.durability {
        Durability::Fsync => {
            // Checked before anything is written into the directory.
            if let Err(error) = irisd::storage::layout::open_layout(&config.data_dir, shard_count) {
                return fail(error.to_string());
            }
        }
        Durability::None => {
            eprintln!(
                "irisd: WARNING: storage.durability = \"none\": messages are kept in memory only and are LOST \
                 when irisd stops. Acks do not mean durably stored. Use this for benchmarks only."
            );
        }
    }

    let tls = TlsFiles::in_data_dir(&config.data_dir);
    let mut names = vec!["localhost".to_string(), config.listen.ip().to_string(), config.advertised_host()];
    names.dedup();
    match tls.create_if_missing(names) {
        Ok(true) => {
            println!("irisd: created a self-signed TLS certificate: {} (clients use it as IRIS_CA)", tls.cert.display())
        }
        Ok(false) => {}
        Err(error) => return fail(error.to_string()),
    }
    // Checked once here; every shard builds its own configuration from the
    // same files (own session cache, no lock shared across cores).
    if let Err(error) = tls.quic_server_config() {
        return fail(error.to_string());
    }
    let authority = match TokenAuthority::load_or_create(&key_path(&config.data_dir), true) {
        Ok((mut authority, created)) => {
            match authority.accept_retired(&retired_keys_dir(&config.data_dir)) {
                Ok(0) => {}
                Ok(count) => println!("irisd: accepting tokens of {count} retired token key(s) as well"),
                Err(error) => return fail(error.to_string()),
            }
            if created {
                println!(
                    "irisd: created a token-signing key: {} (mint tokens with `irisd token --data-dir {} --user U --device D`)",
                    key_path(&config.data_dir).display(),
                    config.data_dir.display()
                );
            }
            authority
        }
        Err(error) => return fail(error.to_string()),
    };

    let reset_path = config.data_dir.join("keys/stateless-reset.key");
    let reset_secret = match irisd::files::load_or_create_secret(&reset_path, true) {
        Ok((secret, _)) => secret,
        Err(error) => return fail(format!("{}: {error}", reset_path.display())),
    };
    // The shards verify tokens; the signing key stays here and is dropped.
    let verifier = authority.verifier();
    drop(authority);
    let setup = NodeSetup { config: config.clone(), verifier, tls: tls.clone(), reset_secret };
    let node = match runtime::start(setup, shard_count) {
        Ok(node) => node,
        Err(error) => return fail(error.to_string()),
    };
    // Handled from before "ready" is said, so a stop that follows it drains
    // (a signal during recovery ends the process: there is nothing to drain).
    let signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
    {
        Ok(signals) => Some(signals),
        Err(error) => {
            eprintln!("irisd: cannot handle SIGTERM ({error}); a stop will not drain");
            None
        }
    };
    let first = node.addresses.first().map(ToString::to_string).unwrap_or_default();
    println!(
        "irisd: ready: {shard_count} shard(s) on {first} (ports {}..={}), data in {}, CA {}",
        config.listen.port(),
        config.listen.port() + shard_count - 1,
        config.data_dir.display(),
        tls.cert.display()
    );
    if let Some(admin) = node.admin {
        println!("irisd: admin endpoint on http://{admin}/metrics and /health");
    }
    irisd::driver::systemd::ready(&format!("serving {shard_count} shard(s) on {first}"));
    irisd::driver::systemd::start_watchdog(node.shard_metrics());
    let Some(signals) = signals else {
        loop {
            std::thread::park();
        }
    };
    drain_on_signal(&node, signals, Duration::from_millis(u64::from(config.runtime.drain_timeout_ms)))
}

/// Serves until SIGTERM (or SIGINT), then drains: no new connections, every
/// client told to reconnect (close code SHUTTING_DOWN) once its Sends in
/// flight are answered, every log synced; exits within `timeout`. A second
/// signal during the drain exits at once.
fn drain_on_signal(
    node: &runtime::RunningNode,
    mut signals: signal_hook::iterator::Signals,
    timeout: Duration,
) -> ExitCode {
    let Some(signal) = signals.forever().next() else { return ExitCode::SUCCESS };
    let started = std::time::Instant::now();
    tracing::info!(signal, timeout_ms = timeout.as_millis() as u64, "draining");
    irisd::driver::systemd::stopping(
        "draining: clients told to reconnect, sends in flight answered, logs synced",
        timeout,
    );
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            eprintln!("irisd: signal {signal} during the drain; exiting now");
            std::process::exit(1);
        }
    });
    match node.drain(timeout) {
        runtime::DrainOutcome::Settled => {
            println!("irisd: drained in {} ms; exiting", started.elapsed().as_millis());
        }
        runtime::DrainOutcome::TimedOut => {
            println!(
                "irisd: the drain did not settle within {} ms; exiting (unacknowledged sends are sent again by clients)",
                timeout.as_millis()
            );
        }
    }
    ExitCode::SUCCESS
}
