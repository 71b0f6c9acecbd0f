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
}

impl Report {
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
    }
}
