//! The HTML report: the summary table and three SVG charts drawn with
//! plotters (latency distribution, throughput over time, server RSS over
//! time), in one self-contained file.

use crate::report::Report;
use plotters::prelude::*;

const WIDTH: u32 = 760;
const HEIGHT: u32 = 360;

/// Renders `report` as a standalone HTML page.
pub fn render(report: &Report) -> Result<String, String> {
    let mut rows = String::new();
    for (key, value) in &report.parameters {
        rows.push_str(&format!("<tr><td>{}</td><td>{}</td></tr>", escape(key), escape(value)));
    }
    let c = &report.counts;
    let mut add = |name: &str, value: String| rows.push_str(&format!("<tr><th>{name}</th><td>{value}</td></tr>"));
    add("sent / acked / delivered", format!("{} / {} / {}", c.sent, c.acked, c.delivered));
    add("errors", escape(&format!("{:?}", c.errors)));
    add("acked/s, delivered/s", format!("{:.0}, {:.0}", report.acked_per_second, report.delivered_per_second));
    for (name, p) in [("send→ack (µs)", &report.ack_latency), ("send→deliver (µs)", &report.deliver_latency)] {
        add(
            name,
            format!("p50 {} · p90 {} · p99 {} · p99.9 {} · max {}", p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.max_us),
        );
    }
    if let Some(per) = report.server_cpu_us_per_delivered {
        add("server CPU per delivered", format!("{per:.2} µs"));
    }
    if let Some(rate) = report.delivered_per_server_cpu_second {
        add("delivered per server CPU-second", format!("{rate:.0}"));
    }
    add("load generator CPU", format!("{:.2} s", report.loadgen_cpu_seconds));
    let distribution = distribution_chart(report)?;
    let throughput = throughput_chart(report)?;
    let memory = memory_chart(report)?;
    Ok(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>iris-perf {scenario} — {label}</title>\
         <style>body{{font-family:sans-serif;max-width:800px;margin:2em auto}}td,th{{text-align:left;padding:2px 8px}}</style>\
         </head><body><h1>iris-perf {scenario} — {label}</h1><table>{rows}</table>\
         <h2>Latency distribution</h2>{distribution}<h2>Throughput over time</h2>{throughput}\
         <h2>Server memory over time</h2>{memory}</body></html>",
        scenario = escape(&report.scenario),
        label = escape(&report.label),
    ))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn plot_error<E: std::fmt::Debug>(error: E) -> String {
    format!("drawing a chart: {error:?}")
}

/// Latency (ms, log scale) against percentile, spaced by "nines".
fn distribution_chart(report: &Report) -> Result<String, String> {
    let nines = |percentile: f64| -(1.0 - percentile / 100.0).max(1e-6).log10();
    let points = &report.latency_distribution;
    let x_max = points.iter().map(|p| nines(p.percentile)).fold(1.0, f64::max);
    let y_max = points.iter().map(|p| p.ack_us.max(p.deliver_us)).max().unwrap_or(1).max(1) as f64 / 1000.0;
    let y_min = points.iter().map(|p| p.ack_us.min(p.deliver_us)).min().unwrap_or(1).max(1) as f64 / 1000.0;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, (y_min * 0.8..y_max * 1.2).log_scale())
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_label_formatter(&|x| format!("{:.3}", 100.0 * (1.0 - 10f64.powf(-x))))
            .draw()
            .map_err(plot_error)?;
        let series = |pick: fn(&crate::report::DistributionPoint) -> u64| {
            points.iter().map(move |p| (nines(p.percentile), pick(p).max(1) as f64 / 1000.0)).collect::<Vec<_>>()
        };
        chart
            .draw_series(LineSeries::new(series(|p| p.ack_us), &BLUE))
            .map_err(plot_error)?
            .label("send→ack")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        chart
            .draw_series(LineSeries::new(series(|p| p.deliver_us), &RED))
            .map_err(plot_error)?
            .label("send→deliver")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        chart.configure_series_labels().border_style(BLACK).draw().map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// Acked and delivered messages per second in each sample interval.
fn throughput_chart(report: &Report) -> Result<String, String> {
    let rates = |pick: fn(&crate::report::Sample) -> u64| {
        report
            .timeline
            .windows(2)
            .map(|pair| {
                let dt = (pair[1].t_s - pair[0].t_s).max(1e-3);
                (pair[1].t_s, (pick(&pair[1]).saturating_sub(pick(&pair[0]))) as f64 / dt)
            })
            .collect::<Vec<_>>()
    };
    let acked = rates(|s| s.acked_total);
    let delivered = rates(|s| s.delivered_total);
    let t_max = report.timeline.last().map_or(1.0, |s| s.t_s).max(1.0);
    let y_max = acked.iter().chain(&delivered).map(|(_, r)| *r).fold(1.0, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max * 1.1)
            .map_err(plot_error)?;
        chart.configure_mesh().x_desc("seconds").y_desc("messages/s").draw().map_err(plot_error)?;
        chart
            .draw_series(LineSeries::new(acked, &BLUE))
            .map_err(plot_error)?
            .label("acked/s")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        chart
            .draw_series(LineSeries::new(delivered, &RED))
            .map_err(plot_error)?
            .label("delivered/s")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        chart.configure_series_labels().border_style(BLACK).draw().map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// Server RSS (MiB) over time.
fn memory_chart(report: &Report) -> Result<String, String> {
    let points: Vec<(f64, f64)> =
        report.timeline.iter().filter_map(|s| s.rss_bytes.map(|rss| (s.t_s, rss as f64 / (1024.0 * 1024.0)))).collect();
    let t_max = report.timeline.last().map_or(1.0, |s| s.t_s).max(1.0);
    let y_max = points.iter().map(|(_, m)| *m).fold(1.0, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max * 1.2)
            .map_err(plot_error)?;
        chart.configure_mesh().x_desc("seconds").y_desc("server RSS (MiB)").draw().map_err(plot_error)?;
        chart.draw_series(LineSeries::new(points, &GREEN)).map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}
