//! `iris-perf`: load generator and performance harness for Iris.
//!
//! ```text
//! iris-perf pairs --spawn-server --durability fsync --pairs 50 --rate 200 --duration 10 --json out.json
//! ```
//!
//! # Layout
//! - [`server`]: spawning irisd pinned to its CPUs, and /proc CPU and RSS readings.
//! - [`pairs`]: the pairs scenario, open or closed loop (also run as `soak`).
//! - [`pacer`]: open-loop send slots from a precise pacing thread, or closed-loop windows.
//! - [`connect`]: many idle authenticated connections (handshake rate, RSS per connection).
//! - [`fanin`]: many senders to one recipient, online or offline (the "Messi test").
//! - [`raw_quic`]: the QUIC ceiling, a minimal quinn echo server and its load.
//! - [`peers`]: the pairs shape against mosquitto (MQTT QoS 1) and NATS (JetStream, core).
//! - [`compare`]: two JSON reports side by side with ratios.
//! - [`report`]: counts, HDR percentiles, the summary table and the JSON report.
//! - [`html`]: the HTML report with SVG charts.

mod client_tls;
mod compare;
mod connect;
mod fanin;
mod html;
mod pacer;
mod pairs;
mod peers;
mod presence;
mod raw_quic;
mod report;
mod server;

use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "iris-perf", version, about = "Iris performance harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct ServerArgs {
    /// Start an irisd for this run (on a fresh data directory) instead of using a running one.
    #[arg(long)]
    spawn_server: bool,
    /// irisd binary for --spawn-server (default: next to iris-perf).
    #[arg(long)]
    irisd: Option<PathBuf>,
    /// CPUs the spawned server may use (taskset list). Default "0".
    #[arg(long, default_value = "0")]
    server_cpus: String,
    /// CPUs the load generator pins itself to. Default "1"; "none" disables pinning.
    #[arg(long, default_value = "1")]
    loadgen_cpus: String,
    /// storage.durability of the spawned server: fsync or none.
    #[arg(long, default_value = "fsync")]
    durability: String,
    /// Port of shard 0 of the spawned server.
    #[arg(long, default_value_t = 17700)]
    port: u16,
    /// A line of TOML for the spawned server's configuration, with dotted
    /// keys (e.g. `limits.mailbox_messages_max = 100`); repeatable.
    #[arg(long = "server-config")]
    server_config: Vec<String>,
    /// Extra arguments passed to `irisd serve` (repeatable).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// A running server (host:port) when not spawning one.
    #[arg(long)]
    server: Option<String>,
    /// Its data directory (for the CA and the token key) when not spawning one.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Its process id, to read its CPU and memory use.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// The pairs shape shared by `pairs`, `soak` and `peer`.
#[derive(clap::Args, Debug, Clone, Copy)]
struct ShapeArgs {
    /// Number of pairs.
    #[arg(long, default_value_t = 50)]
    pairs: u32,
    /// Messages per second per user (open loop).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Closed loop instead: each user keeps this many messages undelivered
    /// (sends the next when one is delivered); --rate is then ignored.
    #[arg(long, default_value_t = 0)]
    inflight: u32,
    /// Payload bytes.
    #[arg(long, default_value_t = 150)]
    payload: usize,
    /// Simulated users sharing one client UDP socket (Iris only; peers use
    /// one TCP connection per user). 1 gives every user its own socket; the
    /// default of 10 lets the load generator receive in batches, so with 100
    /// users it is no longer the bottleneck of the 100 x 1 shape
    /// (docs/performance.md).
    #[arg(long, default_value_t = 10)]
    users_per_socket: u32,
}

impl ShapeArgs {
    /// Scenario options for this shape.
    fn options(self, duration: f64, sample_interval: f64) -> pairs::PairsOptions {
        pairs::PairsOptions {
            pairs: self.pairs,
            rate_per_user: self.rate,
            inflight: self.inflight,
            payload_bytes: self.payload,
            duration: Duration::from_secs_f64(duration),
            first_user: 1_000_000,
            sample_interval: Duration::from_secs_f64(sample_interval),
            users_per_socket: self.users_per_socket.max(1),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// N pairs of users sending to each other at a fixed rate (open loop).
    Pairs {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        shape: ShapeArgs,
        /// Seconds of sending.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Label for the report.
        #[arg(long)]
        label: Option<String>,
        /// Write the HTML report (summary and SVG charts) here.
        #[arg(long)]
        html: Option<PathBuf>,
        /// Load generator threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Pairs at a fixed rate for a long time, sampling server RSS and latency
    /// percentiles per interval; reports memory growth and latency drift after warm-up.
    Soak {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        shape: ShapeArgs,
        /// Seconds of sending.
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
        /// Seconds at the start excluded from growth and drift.
        #[arg(long, default_value_t = 10.0)]
        warmup: f64,
        /// Seconds between samples.
        #[arg(long, default_value_t = 1.0)]
        sample_interval: f64,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the HTML report here.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// M senders to one recipient (online or offline), N messages in total.
    Fanin {
        #[command(flatten)]
        server: ServerArgs,
        /// Sending users.
        #[arg(long, default_value_t = 10)]
        senders: u32,
        /// Messages in total.
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// Payload bytes.
        #[arg(long, default_value_t = 150)]
        payload: usize,
        /// Keep the recipient offline until every send was answered.
        #[arg(long)]
        offline: bool,
        /// Retry refused sends as applications do (the SDK's default), so all are eventually acked.
        #[arg(long)]
        retry: bool,
        /// The server's shard count, for probe users homed away from the recipient (0: no probes).
        #[arg(long, default_value_t = 0)]
        probe_shards: u16,
        /// Probe pairs on other shards.
        #[arg(long, default_value_t = 10)]
        probe_pairs: u32,
        /// Messages per second per probe pair.
        #[arg(long, default_value_t = 20.0)]
        probe_rate: f64,
        /// Seconds the probes run alone first (their baseline).
        #[arg(long, default_value_t = 5.0)]
        baseline_seconds: f64,
        /// Home every sender on the recipient's shard (with --probe-shards).
        #[arg(long)]
        senders_with_recipient: bool,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The QUIC ceiling: a minimal quinn echo or relay (no auth, storage or acks), spawned pinned.
    RawQuic {
        /// echo (back to the sender) or relay (to the partner connection).
        #[arg(long, value_enum, default_value = "echo")]
        mode: raw_quic::Mode,
        /// CPUs for the echo server (taskset list).
        #[arg(long, default_value = "0")]
        server_cpus: String,
        /// CPUs for the load generator, or "none".
        #[arg(long, default_value = "1")]
        loadgen_cpus: String,
        /// Server port.
        #[arg(long, default_value_t = 17900)]
        port: u16,
        /// Connections.
        #[arg(long, default_value_t = 100)]
        connections: u32,
        /// Messages in flight per connection.
        #[arg(long, default_value_t = 1)]
        inflight: u32,
        /// Payload bytes (at least 8).
        #[arg(long, default_value_t = 150)]
        payload: usize,
        /// Seconds.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// (internal) The raw QUIC echo server that `raw-quic` spawns.
    #[command(hide = true)]
    RawQuicServer {
        #[arg(long, value_enum)]
        mode: raw_quic::Mode,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        payload: usize,
        #[arg(long)]
        ready_file: PathBuf,
    },
    /// The pairs shape against a running peer server (see perf/compare-peers.sh).
    Peer {
        /// mqtt, nats-js or nats-core.
        #[arg(long)]
        kind: String,
        /// Peer host.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Peer port.
        #[arg(long)]
        port: u16,
        /// Peer process id (for CPU and memory).
        #[arg(long)]
        server_pid: Option<u32>,
        /// CPUs the load generator pins itself to, or "none".
        #[arg(long, default_value = "1")]
        loadgen_cpus: String,
        #[command(flatten)]
        shape: ShapeArgs,
        /// Seconds of sending.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Print two JSON reports side by side with ratios B / A.
    Compare {
        /// The baseline report.
        a: PathBuf,
        /// The report compared with it.
        b: PathBuf,
    },
    /// N users each watching C others, with users leaving and coming back:
    /// presence notifications per server CPU-second, their latency, memory
    /// per subscription.
    Presence {
        #[command(flatten)]
        server: ServerArgs,
        /// Users.
        #[arg(long, default_value_t = 1000)]
        users: u64,
        /// Contacts each user watches.
        #[arg(long, default_value_t = 50)]
        contacts: u64,
        /// Users that leave and come back per second.
        #[arg(long, default_value_t = 10.0)]
        churn: f64,
        /// Seconds of churn.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// The server's presence.grace_ms (set on a spawned server).
        #[arg(long, default_value_t = 200)]
        grace_ms: u64,
        /// How long a churning user stays away (more than the grace).
        #[arg(long, default_value_t = 500)]
        away_ms: u64,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Open C idle authenticated connections; report handshake rate and server RSS per connection.
    Connect {
        #[command(flatten)]
        server: ServerArgs,
        /// Connections to open.
        #[arg(long, default_value_t = 1000)]
        connections: u64,
        /// Seconds to hold them open before measuring memory (and idle CPU:
        /// use 20 or more to see keep-alives, sent every 10 s).
        #[arg(long, default_value_t = 1.0)]
        settle: f64,
        /// Then reconnect every user twice, without and with TLS tickets,
        /// to measure full and resumed handshakes side by side.
        #[arg(long)]
        reconnect: bool,
        /// Keep-alive interval of the connections, ms (the SDK's is 10,000;
        /// under the server's idle timeout, 30 s by default).
        #[arg(long, default_value_t = 10_000)]
        keep_alive_ms: u64,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn run_fanin(server: ServerArgs, options: fanin::FaninOptions, json: Option<PathBuf>) -> Result<(), String> {
    if options.messages > 100_000_000 || options.senders > 10_000 {
        return Err("--messages at most 100000000 and --senders at most 10000".into());
    }
    check_server_args(&server)?;
    let (spawned, target, pid) = target(&server)?;
    let runtime = loadgen_runtime(1)?;
    let cpu_before = pid.and_then(server::process_cpu_seconds);
    let own_before = server::own_cpu_seconds();
    let data_dir = spawned.as_ref().map(|spawned| spawned.data_dir().to_path_buf()).or(server.data_dir.clone());
    let outcome = runtime.block_on(fanin::run(&target, options, pid, data_dir.as_deref()))?;
    let cpu = pid.and_then(server::process_cpu_seconds).zip(cpu_before).map(|(after, before)| after - before);
    let mut parameters = BTreeMap::new();
    parameters.insert("senders".into(), options.senders.to_string());
    parameters.insert("messages".into(), options.messages.to_string());
    parameters.insert("payload_bytes".into(), options.payload_bytes.to_string());
    parameters.insert("recipient".into(), if options.offline { "offline" } else { "online" }.into());
    parameters.insert("durability".into(), server.durability.clone());
    parameters.insert("retry".into(), options.retry.to_string());
    if options.senders_with_recipient {
        parameters.insert("senders homed".into(), "on the recipient's shard".into());
    }
    let measured = report::Measured {
        counts: &outcome.counts,
        latencies: &outcome.latencies,
        send_seconds: outcome.send_seconds,
        acked_seconds: outcome.send_seconds,
        delivered_seconds: outcome.total_seconds,
        server_cpu_seconds: cpu,
        server_rss_bytes: outcome.peak_rss_bytes,
        loadgen_cpu_seconds: server::own_cpu_seconds() - own_before,
    };
    let mode = if options.offline { "offline" } else { "online" };
    let label = format!("iris {} fanin {mode}", server.durability);
    let mut report = report::Report::new("fanin", label, parameters, measured);
    report.findings = outcome.findings;
    report.emit(json.as_deref(), None)?;
    drop(spawned);
    Ok(())
}

fn run_peer(
    kind: peers::PeerKind,
    host: &str,
    port: u16,
    pid: Option<u32>,
    options: pairs::PairsOptions,
    json: Option<PathBuf>,
) -> Result<(), String> {
    let runtime = loadgen_runtime(1)?;
    let cpu_before = pid.and_then(server::process_cpu_seconds);
    let own_before = server::own_cpu_seconds();
    let outcome = runtime.block_on(peers::run(kind, host, port, options))?;
    let cpu = pid.and_then(server::process_cpu_seconds).zip(cpu_before).map(|(after, before)| after - before);
    let label = match kind {
        peers::PeerKind::Mqtt => "mqtt qos1",
        peers::PeerKind::NatsJetStream => "nats jetstream",
        peers::PeerKind::NatsCore => "nats core",
    };
    let parameters = shape_parameters(&options);
    let measured = report::Measured {
        counts: &outcome.counts,
        latencies: &outcome.latencies,
        send_seconds: options.duration.as_secs_f64(),
        acked_seconds: outcome.seconds,
        delivered_seconds: outcome.seconds,
        server_cpu_seconds: cpu,
        server_rss_bytes: pid.and_then(server::process_rss_bytes),
        loadgen_cpu_seconds: server::own_cpu_seconds() - own_before,
    };
    report::Report::new("pairs", label.into(), parameters, measured).emit(json.as_deref(), None)?;
    Ok(())
}

fn check_server_args(server: &ServerArgs) -> Result<(), String> {
    if server.durability != "fsync" && server.durability != "none" {
        return Err(format!("--durability {}: must be fsync or none", server.durability));
    }
    if server.loadgen_cpus != "none" {
        pin_to_cpus(&server.loadgen_cpus)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("iris-perf: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Pairs { server, shape, duration, json, label, html, threads } => {
            run_pairs(server, shape, duration, (json, html), label, threads, (0.25, None))
        }
        Command::Soak { server, shape, duration, warmup, sample_interval, json, html } => {
            if !(0.0..duration).contains(&warmup) {
                return Err("--warmup must be shorter than --duration".into());
            }
            let label = Some(format!("iris {} soak", server.durability));
            run_pairs(server, shape, duration, (json, html), label, 1, (sample_interval, Some(warmup)))
        }
        Command::Connect { server, connections, settle, reconnect, keep_alive_ms, json } => {
            if connections == 0 || connections > 1_000_000 || !(0.0..=3600.0).contains(&settle) {
                return Err("--connections must be 1..=1000000 and --settle 0..=3600".into());
            }
            if !(100..=600_000).contains(&keep_alive_ms) {
                return Err("--keep-alive-ms must be 100..=600000".into());
            }
            let keep_alive = Duration::from_millis(keep_alive_ms);
            check_server_args(&server)?;
            let (spawned, target, pid) = target(&server)?;
            connect::report(
                &target,
                pid,
                connect::ConnectOptions { connections, settle, reconnect, keep_alive },
                json,
            )?;
            drop(spawned);
            Ok(())
        }
        Command::Presence { mut server, users, contacts, churn, duration, grace_ms, away_ms, json } => {
            if !(2..=100_000).contains(&users) || contacts == 0 || contacts >= users || contacts > 1000 {
                return Err("--users must be 2..=100000 and --contacts 1..=1000, below --users".into());
            }
            let rates_ok = churn > 0.0 && churn <= 10_000.0 && duration > 0.0 && duration <= 3600.0;
            if !rates_ok || away_ms <= grace_ms {
                return Err("--churn 0..=10000 per s, --duration 0..=3600 s, and --away-ms above --grace-ms".into());
            }
            check_server_args(&server)?;
            server.server_config.push(format!("presence.grace_ms = {grace_ms}"));
            let (spawned, target, pid) = target(&server)?;
            let options =
                presence::PresenceOptions { users, contacts, churn_per_s: churn, duration, grace_ms, away_ms };
            presence::report(&target, pid, options, json)?;
            drop(spawned);
            Ok(())
        }
        Command::Compare { a, b } => compare::run(&a, &b),
        Command::Peer { kind, host, port, server_pid, loadgen_cpus, shape, duration, json } => {
            let kind = match kind.as_str() {
                "mqtt" => peers::PeerKind::Mqtt,
                "nats-js" => peers::PeerKind::NatsJetStream,
                "nats-core" => peers::PeerKind::NatsCore,
                other => return Err(format!("--kind {other}: must be mqtt, nats-js or nats-core")),
            };
            if !(duration > 0.0 && duration <= 3600.0) {
                return Err("--duration must be 0..=3600 seconds".into());
            }
            if loadgen_cpus != "none" {
                pin_to_cpus(&loadgen_cpus)?;
            }
            run_peer(kind, &host, port, server_pid, shape.options(duration, 0.25), json)
        }
        Command::RawQuicServer { mode, port, payload, ready_file } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(raw_quic::serve(mode, port, payload, Some(ready_file))),
        Command::RawQuic { mode, server_cpus, loadgen_cpus, port, connections, inflight, payload, duration, json } => {
            if !(duration > 0.0 && duration <= 3600.0) {
                return Err("--duration must be 0..=3600 seconds".into());
            }
            let duration = Duration::from_secs_f64(duration);
            let shape = raw_quic::LoadShape { connections, inflight, payload_bytes: payload, duration };
            raw_quic::run((mode, &server_cpus, &loadgen_cpus), port, shape, json)
        }
        Command::Fanin {
            server,
            senders,
            messages,
            payload,
            offline,
            retry,
            probe_shards,
            probe_pairs,
            probe_rate,
            baseline_seconds,
            senders_with_recipient,
            json,
        } => {
            let options = fanin::FaninOptions {
                senders,
                messages,
                payload_bytes: payload,
                offline,
                retry,
                probe_shards,
                probe_pairs,
                probe_rate,
                baseline_seconds,
                senders_with_recipient,
            };
            run_fanin(server, options, json)
        }
    }
}

/// The report parameters of a pairs-shaped run.
fn shape_parameters(options: &pairs::PairsOptions) -> BTreeMap<String, String> {
    let mut parameters = BTreeMap::from([
        ("pairs".to_string(), options.pairs.to_string()),
        ("payload_bytes".to_string(), options.payload_bytes.to_string()),
        ("duration_s".to_string(), options.duration.as_secs_f64().to_string()),
    ]);
    if options.inflight == 0 {
        let offered = 2.0 * f64::from(options.pairs) * options.rate_per_user;
        parameters.insert("rate_per_user".to_string(), options.rate_per_user.to_string());
        parameters.insert("offered_per_second".to_string(), format!("{offered:.0}"));
    } else {
        parameters.insert("inflight_per_user".to_string(), options.inflight.to_string());
    }
    parameters
}

fn run_pairs(
    server: ServerArgs,
    shape: ShapeArgs,
    duration: f64,
    (json, html): (Option<PathBuf>, Option<PathBuf>),
    label: Option<String>,
    threads: usize,
    (sample_interval, warmup): (f64, Option<f64>),
) -> Result<(), String> {
    if !(0.01..=60.0).contains(&sample_interval) {
        return Err("--sample-interval must be 0.01..=60 seconds".into());
    }
    if !(duration.is_finite() && duration > 0.0 && duration <= 86_400.0) {
        return Err(format!("--duration {duration}: must be between 0 and 86400 seconds"));
    }
    if threads == 0 || threads > 64 {
        return Err("--threads must be 1..=64".into());
    }
    check_server_args(&server)?;
    let (spawned, target, pid) = target(&server)?;
    let runtime = loadgen_runtime(threads)?;
    let options = shape.options(duration, sample_interval);
    let server_cpu_before = pid.and_then(server::process_cpu_seconds);
    let own_cpu_before = server::own_cpu_seconds();
    let outcome = runtime.block_on(pairs::run(&target, options, pid))?;
    let server_cpu =
        pid.and_then(server::process_cpu_seconds).zip(server_cpu_before).map(|(after, before)| after - before);
    let mut parameters = shape_parameters(&options);
    parameters.insert("durability".into(), if server.spawn_server { server.durability.clone() } else { "?".into() });
    parameters.insert("server_cpus".into(), server.server_cpus.clone());
    parameters.insert("loadgen_cpus".into(), server.loadgen_cpus.clone());
    let measured = report::Measured {
        counts: &outcome.counts,
        latencies: &outcome.latencies,
        send_seconds: outcome.send_seconds,
        // Up to the last ack (delivery), so a server that falls behind is not
        // credited with the offered rate.
        acked_seconds: outcome.send_seconds.max(outcome.last_ack_seconds),
        delivered_seconds: outcome.send_seconds.max(outcome.last_delivery_seconds),
        server_cpu_seconds: server_cpu,
        server_rss_bytes: pid.and_then(server::process_rss_bytes),
        loadgen_cpu_seconds: server::own_cpu_seconds() - own_cpu_before,
    };
    let label = label.unwrap_or_else(|| format!("iris {}", server.durability));
    let mut report = report::Report::new("pairs", label, parameters, measured);
    report.timeline = outcome.samples.clone();
    report.soak = warmup.map(|warmup| report::SoakSummary::from_timeline(&outcome.samples, warmup, duration));
    report.emit(json.as_deref(), html.as_deref())?;
    drop(spawned);
    Ok(())
}

/// Rate limits for a spawned server: so high that no load this harness
/// offers reaches them (their buckets are still charged, so their cost is
/// measured), unless `--server-config` sets any `rate_limits.` key itself.
/// CoDel is off as well unless an `admission.` key is given: the harness
/// measures capacity at saturation, where CoDel would refuse sends.
fn benchmark_rate_limits(server_config: &[String]) -> Vec<String> {
    if server_config.iter().any(|line| line.trim_start().starts_with("rate_limits.")) {
        return Vec::new();
    }
    ["device_sends", "device_bytes", "pair_sends"]
        .iter()
        .flat_map(|name| {
            [format!("rate_limits.{name}_per_s = 1000000000000"), format!("rate_limits.{name}_burst = 1000000000000")]
        })
        .collect()
}

/// The server to drive: spawned, or given by flags.
fn target(args: &ServerArgs) -> Result<(Option<server::SpawnedServer>, pairs::Target, Option<u32>), String> {
    let (spawned, address, data_dir, pid) = if args.spawn_server {
        let irisd = match &args.irisd {
            Some(path) => path.clone(),
            None => std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("irisd"),
        };
        let options = server::SpawnOptions {
            irisd,
            port: args.port,
            cpus: Some(args.server_cpus.clone()).filter(|cpus| cpus != "none"),
            config: args
                .server_config
                .iter()
                .cloned()
                .chain([format!("storage.durability = \"{}\"", args.durability)])
                .chain(benchmark_rate_limits(&args.server_config))
                .chain(
                    (!args.server_config.iter().any(|line| line.trim_start().starts_with("admission.")))
                        .then(|| "admission.codel_target_ms = 0".to_string()),
                )
                .collect(),
            args: args.server_args.clone(),
        };
        let spawned = server::SpawnedServer::start(&options)?;
        let (address, data_dir, pid) = (spawned.address.clone(), spawned.data_dir().to_path_buf(), spawned.pid());
        (Some(spawned), address, data_dir, Some(pid))
    } else {
        let address = args.server.clone().ok_or("pass --spawn-server, or --server and --data-dir")?;
        let data_dir = args.data_dir.clone().ok_or("--data-dir is needed to mint tokens for a running server")?;
        (None, address, data_dir, args.server_pid)
    };
    let key = data_dir.join("keys/token-signing.key");
    let (authority, _) = irisd::auth::TokenAuthority::load_or_create(&key, false).map_err(|e| e.to_string())?;
    let target = pairs::Target { address, ca: data_dir.join("tls/cert.pem"), authority };
    Ok((spawned, target, pid))
}

/// The load generator's tokio runtime with `threads` workers.
pub(crate) fn loadgen_runtime(threads: usize) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))
}

/// Pins this process to the CPUs in `list` ("1" or "1,3").
pub(crate) fn pin_to_cpus(list: &str) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for part in list.split(',') {
        let cpu: usize = part.trim().parse().map_err(|_| format!("bad CPU list {list:?}"))?;
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(format!("CPU {cpu} out of range"));
        }
        // SAFETY: cpu is below CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is this process; the set is initialised.
    let result = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if result != 0 {
        return Err(format!("pinning to CPUs {list}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}
