//! `iris`: the command-line client.
//!
//! ```text
//! iris send --to U TEXT            # prints the ack (or the refusal) as JSON
//! iris listen [--count N] [--timeout SECS]   # one JSON object per message
//! iris remove-device D             # unlinks device D of this user (may be this one)
//! ```
//! Settings come from flags or IRIS_SERVER (host:port), IRIS_CA (PEM path)
//! and IRIS_TOKEN.

use clap::{Parser, Subcommand};
use iris_client::{Client, ClientConfig, ClientError, PresenceEvent, PresencePrivacy, PresenceState};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "iris", version, about = "Iris command-line client")]
struct Cli {
    /// Server address (any shard), host:port.
    #[arg(long, env = "IRIS_SERVER", default_value = "127.0.0.1:7700", global = true)]
    server: String,
    /// CA certificate (PEM) to trust; for the embedded default: <data-dir>/tls/cert.pem.
    #[arg(long, env = "IRIS_CA", default_value = "./iris-data/tls/cert.pem", global = true)]
    ca: PathBuf,
    /// Access token from `irisd token`.
    #[arg(long, env = "IRIS_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Treat every message up to this seq as already processed.
    #[arg(long, default_value_t = 0, global = true)]
    resume_after_seq: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send TEXT to every device of user U and print the ack as JSON. A
    /// refusal that persists (retried meanwhile) is printed as JSON
    /// ({"error": CODE, ...}) and the exit status is 1.
    Send {
        /// Recipient user id.
        #[arg(long)]
        to: u64,
        /// Keep retrying a refused send (Throttle, MailboxFull, ...) for this
        /// many seconds.
        #[arg(long, default_value_t = 30.0)]
        retry_for: f64,
        /// Message text.
        text: String,
    },
    /// Print received messages as JSON lines.
    Listen {
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Remove (unlink) device D of this user, which may be this device;
    /// prints {"removed_device":D} once the removal is durable.
    RemoveDevice {
        /// Device id to remove.
        device: u32,
    },
    /// Presence of other users, and who may see this user's.
    #[command(subcommand)]
    Presence(PresenceCommand),
    /// Tell user U's online devices that this user is typing (or, with
    /// --stop, stopped); prints {"typing_to":U,"active":BOOL}.
    Typing {
        /// The user typed to.
        #[arg(long)]
        to: u64,
        /// Stopped typing.
        #[arg(long)]
        stop: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PresenceCommand {
    /// Watch users U...: print each one's state at once, then every change,
    /// as JSON lines ({"user":U,"state":"online"|"offline"|"hidden"|
    /// "unavailable","last_seen_ms":T}), and typing notices to this user
    /// ({"typing_from":U,"device":D,"active":BOOL}). A refused watch (too
    /// many users) is printed as {"error":...} and the exit status is 1.
    Watch {
        /// Users to watch.
        #[arg(required = true)]
        users: Vec<u64>,
        /// Stop after this many lines.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Set who may see this user's presence and last seen: everyone,
    /// contacts (the users it watches) or nobody.
    Privacy {
        /// everyone, contacts or nobody.
        setting: String,
    },
}

#[derive(serde::Serialize)]
struct ReceivedLine<'a> {
    seq: u64,
    from_user: u64,
    from_device: u32,
    server_msg_id: u64,
    sent_at_ms: u64,
    text: &'a str,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("iris: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("iris: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let token = cli.token.ok_or("no token: pass --token or set IRIS_TOKEN (mint one with `irisd token`)")?;
    let mut config = ClientConfig::new(cli.server, cli.ca, token);
    config.resume_after_seq = cli.resume_after_seq;
    if let Command::Send { retry_for, .. } = &cli.command {
        config.refusal_retry_for = Duration::try_from_secs_f64(*retry_for)
            .map_err(|_| format!("--retry-for {retry_for}: not a number of seconds"))?;
    }
    let mut client = Client::connect(config).await.map_err(|e| e.to_string())?;
    match cli.command {
        Command::Send { to, text, .. } => {
            let acked = match client.send(to, text.into_bytes()).await {
                Ok(acked) => acked,
                Err(ClientError::Server { code, message }) => {
                    // The refusal as data, for scripts; the exit status says it failed.
                    let line = serde_json::json!({
                        "to_user": to,
                        "error": code.map_or("Unknown".to_string(), |code| format!("{code:?}")),
                        "code": code.map(|code| code as u16),
                        "message": message,
                    });
                    println!("{line}");
                    let _ = client.close().await;
                    return Err(format!("send refused: {message}"));
                }
                Err(error) => return Err(error.to_string()),
            };
            let line = serde_json::json!({
                "to_user": to,
                "client_msg_id": acked.client_msg_id,
                "server_msg_id": acked.server_msg_id,
            });
            println!("{line}");
        }
        Command::RemoveDevice { device } => {
            client.remove_device(device).await.map_err(|e| e.to_string())?;
            println!("{}", serde_json::json!({ "removed_device": device }));
            if device == client.session_info().device_id {
                // This device's session ended with the removal.
                return Ok(());
            }
        }
        Command::Typing { to, stop } => {
            client.typing(to, !stop).await.map_err(|e| e.to_string())?;
            println!("{}", serde_json::json!({ "typing_to": to, "active": !stop }));
        }
        Command::Presence(PresenceCommand::Privacy { setting }) => {
            let privacy = match setting.as_str() {
                "everyone" => PresencePrivacy::Everyone,
                "contacts" => PresencePrivacy::Contacts,
                "nobody" => PresencePrivacy::Nobody,
                other => return Err(format!("privacy {other}: must be everyone, contacts or nobody")),
            };
            client.set_presence_privacy(privacy).await.map_err(|e| e.to_string())?;
            println!("{}", serde_json::json!({ "presence_privacy": setting }));
        }
        Command::Presence(PresenceCommand::Watch { users, count, timeout }) => {
            client.watch_presence(users).await.map_err(|e| e.to_string())?;
            let deadline = deadline_after(timeout);
            let mut printed = 0u64;
            while count.is_none_or(|count| printed < count) {
                let next = match deadline {
                    Some(deadline) => match tokio::time::timeout_at(deadline, client.next_presence()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    },
                    None => client.next_presence().await,
                };
                let line = match next {
                    None => break,
                    Some(PresenceEvent::Changed { user, state }) => {
                        let (state, last_seen_ms) = match state {
                            PresenceState::Online => ("online", None),
                            PresenceState::Offline { last_seen_ms } => ("offline", last_seen_ms),
                            PresenceState::Hidden => ("hidden", None),
                            PresenceState::Unavailable => ("unavailable", None),
                        };
                        serde_json::json!({ "user": user, "state": state, "last_seen_ms": last_seen_ms })
                    }
                    Some(PresenceEvent::Typing { from_user, from_device, active }) => {
                        serde_json::json!({ "typing_from": from_user, "device": from_device, "active": active })
                    }
                    Some(PresenceEvent::Refused(error)) => {
                        let code = error.code();
                        let line = serde_json::json!({
                            "error": code.map_or("Unknown".to_string(), |code| format!("{code:?}")),
                            "code": code.map(|code| code as u16),
                            "message": error.to_string(),
                        });
                        println!("{line}");
                        let _ = client.close().await;
                        return Err(format!("watch refused: {error}"));
                    }
                };
                println!("{line}");
                printed += 1;
            }
        }
        Command::Listen { count, timeout } => {
            let deadline = deadline_after(timeout);
            let mut received = 0u64;
            while count.is_none_or(|count| received < count) {
                let next = match deadline {
                    Some(deadline) => match tokio::time::timeout_at(deadline, client.recv()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    },
                    None => client.recv().await,
                };
                let Some(message) = next else { break };
                let text = String::from_utf8_lossy(&message.payload);
                let line = ReceivedLine {
                    seq: message.seq,
                    from_user: message.from_user,
                    from_device: message.from_device,
                    server_msg_id: message.server_msg_id,
                    sent_at_ms: message.sent_at_ms,
                    text: &text,
                };
                println!("{}", serde_json::to_string(&line).map_err(|e| e.to_string())?);
                received += 1;
            }
        }
    }
    client.close().await.map_err(|e| e.to_string())
}

/// The deadline `--timeout` seconds from now, if given (and sane).
fn deadline_after(timeout: Option<f64>) -> Option<tokio::time::Instant> {
    timeout
        .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
        .map(|seconds| tokio::time::Instant::now() + Duration::from_secs_f64(seconds))
}
