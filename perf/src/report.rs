//! Results: counts, latency histograms, resource use, the summary table and
//! the JSON document.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;

/// Message counts.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    /// Sends issued.
    pub sent: u64,
    /// Sends acknowledged.
    pub acked: u64,
    /// Messages delivered to recipients.
    pub delivered: u64,
    /// Refusals and failures by code.
    pub errors: BTreeMap<String, u64>,
}

/// Latency histograms in microseconds.
#[derive(Debug)]
pub struct Latencies {
    /// Intended send -> Ack.
    pub ack: Histogram<u64>,
    /// Intended send -> Deliver at the recipient.
    pub deliver: Histogram<u64>,
}

/// Running totals at one moment of a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Seconds since the start.
    pub t_s: f64,
    /// Acks so far.
    pub acked_total: u64,
    /// Deliveries so far.
    pub delivered_total: u64,
    /// Server RSS then, bytes.
    pub rss_bytes: Option<u64>,
    /// Median send -> deliver latency of the deliveries in this interval, us.
    pub deliver_p50_us: Option<u64>,
    /// 99th percentile of the same, us.
    pub deliver_p99_us: Option<u64>,
}

/// One point of a latency distribution.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DistributionPoint {
    /// Percentile (0-100).
    pub percentile: f64,
    /// Send -> ack latency at it, us.
    pub ack_us: u64,
    /// Send -> deliver latency at it, us.
    pub deliver_us: u64,
}

/// Percentiles plotted in the report's distribution chart.
pub const DISTRIBUTION_PERCENTILES: [f64; 10] = [0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 99.999];

/// The latency distribution of `latencies` at the plotted percentiles.
pub fn distribution(latencies: &Latencies) -> Vec<DistributionPoint> {
    DISTRIBUTION_PERCENTILES
        .iter()
        .map(|percentile| DistributionPoint {
            percentile: *percentile,
            ack_us: latencies.ack.value_at_percentile(*percentile),
            deliver_us: latencies.deliver.value_at_percentile(*percentile),
        })
        .collect()
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
    /// Samples.
    pub count: u64,
}

impl Percentiles {
    /// Summarises `histogram`.
    pub fn of(histogram: &Histogram<u64>) -> Percentiles {
        Percentiles {
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            count: histogram.len(),
        }
    }
}

/// The whole report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Free-form label (e.g. "iris fsync").
    pub label: String,
    /// Parameters as given.
    pub parameters: BTreeMap<String, String>,
    /// Counts.
    pub counts: Counts,
    /// Seconds of the sending phase.
    pub send_seconds: f64,
    /// Acked messages per second, from the start to the last ack.
    pub acked_per_second: f64,
    /// Delivered messages per second, from the start to the last delivery.
    pub delivered_per_second: f64,
    /// Send -> ack latency.
    pub ack_latency: Percentiles,
    /// Send -> deliver latency.
    pub deliver_latency: Percentiles,
    /// Server CPU seconds during the run (when the server's pid is known).
    pub server_cpu_seconds: Option<f64>,
    /// Delivered messages per server CPU-second.
    pub delivered_per_server_cpu_second: Option<f64>,
    /// Server CPU microseconds per delivered message.
    pub server_cpu_us_per_delivered: Option<f64>,
    /// Server resident memory, bytes (at the end; the peak sampled for fanin).
    pub server_rss_bytes: Option<u64>,
    /// Load generator CPU seconds during the run.
    pub loadgen_cpu_seconds: f64,
    /// Latency at the plotted percentiles.
    pub latency_distribution: Vec<DistributionPoint>,
    /// Progress and server memory over time.
    pub timeline: Vec<Sample>,
    /// For soak runs: memory growth and latency drift after warm-up.
    pub soak: Option<SoakSummary>,
    /// Scenario-specific findings (fanin: order, drain, probe latencies, disk).
    pub findings: BTreeMap<String, String>,
}

/// What a soak run is about: does memory or latency drift once warmed up?
#[derive(Debug, Clone, Serialize)]
pub struct SoakSummary {
    /// Seconds excluded as warm-up.
    pub warmup_s: f64,
    /// Server RSS at the end of warm-up, bytes.
    pub rss_after_warmup_bytes: Option<u64>,
    /// Server RSS at the end, bytes.
    pub rss_end_bytes: Option<u64>,
    /// Growth after warm-up, bytes (negative: shrank).
    pub rss_growth_bytes: Option<i64>,
    /// p99 send -> deliver of the first and last quarter after warm-up, us.
    pub p99_first_quarter_us: Option<u64>,
    /// See above.
    pub p99_last_quarter_us: Option<u64>,
}

impl SoakSummary {
    /// Computes the summary from the timeline samples between the end of
    /// warm-up and the end of sending (`end_s`).
    pub fn from_timeline(timeline: &[Sample], warmup_s: f64, end_s: f64) -> SoakSummary {
        let steady: Vec<&Sample> = timeline.iter().filter(|s| s.t_s >= warmup_s && s.t_s <= end_s).collect();
        let rss_after_warmup_bytes = steady.first().and_then(|s| s.rss_bytes);
        let rss_end_bytes = steady.last().and_then(|s| s.rss_bytes);
        let quarter = (steady.len() / 4).max(1);
        let worst = |samples: &[&Sample]| samples.iter().filter_map(|s| s.deliver_p99_us).max();
        SoakSummary {
            warmup_s,
            rss_after_warmup_bytes,
            rss_end_bytes,
            rss_growth_bytes: rss_end_bytes.zip(rss_after_warmup_bytes).map(|(end, start)| end as i64 - start as i64),
            p99_first_quarter_us: worst(&steady[..quarter.min(steady.len())]),
            p99_last_quarter_us: worst(&steady[steady.len().saturating_sub(quarter)..]),
        }
    }
}

/// What a scenario measured, before derived figures are computed.
#[derive(Debug)]
pub struct Measured<'a> {
    /// Message counts.
    pub counts: &'a Counts,
    /// Latency histograms.
    pub latencies: &'a Latencies,
    /// Seconds of the sending phase.
    pub send_seconds: f64,
    /// Seconds over which acks are counted for the rate.
    pub acked_seconds: f64,
    /// Seconds over which deliveries are counted for the rate.
    pub delivered_seconds: f64,
    /// Server CPU seconds during the run, if known.
    pub server_cpu_seconds: Option<f64>,
    /// Server RSS to report, if known.
    pub server_rss_bytes: Option<u64>,
    /// Load generator CPU seconds during the run.
    pub loadgen_cpu_seconds: f64,
}

impl Report {
    /// A report with the derived rates and per-CPU figures computed.
    pub fn new(scenario: &str, label: String, parameters: BTreeMap<String, String>, measured: Measured<'_>) -> Report {
        let delivered = measured.counts.delivered;
        let cpu = measured.server_cpu_seconds;
        Report {
            scenario: scenario.into(),
            label,
            parameters,
            counts: measured.counts.clone(),
            send_seconds: measured.send_seconds,
            acked_per_second: measured.counts.acked as f64 / measured.acked_seconds.max(1e-9),
            delivered_per_second: delivered as f64 / measured.delivered_seconds.max(1e-9),
            ack_latency: Percentiles::of(&measured.latencies.ack),
            deliver_latency: Percentiles::of(&measured.latencies.deliver),
            server_cpu_seconds: cpu,
            delivered_per_server_cpu_second: cpu.filter(|c| *c > 0.0).map(|c| delivered as f64 / c),
            server_cpu_us_per_delivered: cpu.filter(|_| delivered > 0).map(|c| c * 1e6 / delivered as f64),
            server_rss_bytes: measured.server_rss_bytes,
            loadgen_cpu_seconds: measured.loadgen_cpu_seconds,
            latency_distribution: distribution(measured.latencies),
            timeline: Vec::new(),
            soak: None,
            findings: BTreeMap::new(),
        }
    }

    /// Prints the summary and writes the JSON and HTML reports if asked.
    pub fn emit(&self, json: Option<&std::path::Path>, html: Option<&std::path::Path>) -> Result<(), String> {
        self.print_summary();
        if let Some(path) = json {
            let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
            std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if let Some(path) = html {
            std::fs::write(path, crate::html::render(self)?).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// The human summary.
    pub fn print_summary(&self) {
        println!("{} — {}", self.scenario, self.label);
        for (key, value) in &self.parameters {
            println!("  {key:<22} {value}");
        }
        let c = &self.counts;
        println!("  sent / acked / delivered   {} / {} / {}", c.sent, c.acked, c.delivered);
        if !c.errors.is_empty() {
            println!("  errors                 {:?}", c.errors);
        }
        println!("  acked/s, delivered/s       {:.0}, {:.0}", self.acked_per_second, self.delivered_per_second);
        for (name, p) in [("send->ack", &self.ack_latency), ("send->deliver", &self.deliver_latency)] {
            println!(
                "  {name:<14} us  p50 {:>7}  p90 {:>7}  p99 {:>7}  p99.9 {:>7}  max {:>8}",
                p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.max_us
            );
        }
        if let (Some(cpu), Some(per)) = (self.server_cpu_seconds, self.delivered_per_server_cpu_second) {
            println!(
                "  server CPU                 {cpu:.2} s, {per:.0} delivered/CPU-s, {:.2} us/delivered",
                self.server_cpu_us_per_delivered.unwrap_or(0.0)
            );
        }
        if let Some(rss) = self.server_rss_bytes {
            println!("  server RSS                 {:.1} MiB", rss as f64 / (1024.0 * 1024.0));
        }
        println!("  load generator CPU         {:.2} s", self.loadgen_cpu_seconds);
        for (key, value) in &self.findings {
            println!("  {key:<26} {value}");
        }
        if let Some(soak) = &self.soak {
            let mib = |bytes: Option<u64>| bytes.map_or("?".to_string(), |b| format!("{:.1}", b as f64 / 1048576.0));
            println!(
                "  soak: RSS after warm-up {} MiB, at end {} MiB; worst interval p99 first/last quarter {:?} / {:?} us",
                mib(soak.rss_after_warmup_bytes),
                mib(soak.rss_end_bytes),
                soak.p99_first_quarter_us,
                soak.p99_last_quarter_us
            );
        }
    }
}
