//! Presenting results: the one rendering model every scenario's report goes through
//! ([`Report`]: a JSON document, a head, the key/value rows of the human summary and
//! the inline-SVG charts of the HTML page), number formatting, writing the outputs,
//! and one submodule per scenario's report.

pub mod broadcast;
pub mod chat;
pub mod connect;
pub mod format;
pub mod soak;
pub mod svg;

use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;

use crate::client::Limit;
use crate::probe::GatewaySample;
use crate::stats::{Histogram, Tally};
pub use format::{bytes, escape, millis, thousands};
use svg::{Chart, Series, XTicks};

/// Resolution of a latency percentile curve, in "nines" (x = -log10(1 - q)).
const CURVE_STEP: f64 = 0.02;
/// Deepest percentile plotted: 99.99 %, the most a run of these sizes resolves.
const CURVE_MAX_NINES: f64 = 4.0;

/// Width of the label column of summary tables.
const LABEL_WIDTH: usize = 14;

/// A `label  value` row; continuation lines of a multi-line value are indented.
pub fn kv(out: &mut String, label: &str, value: &str) {
    let mut lines = value.lines();
    let first = lines.next().unwrap_or("");
    out.push_str(&format!("{label:<LABEL_WIDTH$}{first}\n"));
    for rest in lines {
        out.push_str(&format!("{:<LABEL_WIDTH$}{rest}\n", ""));
    }
}

/// What every report starts with: the scenario, when it ran, and its verdict.
#[derive(Debug, Serialize)]
pub struct Head {
    pub scenario: &'static str,
    pub version: &'static str,
    pub started_at_unix_ms: u64,
    pub duration_s: f64,
    /// Whether the run met its goal (the scenario's report says what that is).
    pub goal_met: bool,
    pub verdict: String,
    pub stopped_by: Vec<Finding>,
    pub interrupted: bool,
    pub worker_errors: Vec<String>,
}

impl Head {
    /// The head of a run started at `epoch_ms` that ended `finished_ms` later.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        scenario: &'static str,
        epoch_ms: u64,
        finished_ms: u64,
        goal_met: bool,
        verdict: String,
        stopped_by: Vec<Finding>,
        interrupted: bool,
        errors: &[String],
    ) -> Head {
        Head {
            scenario,
            version: env!("CARGO_PKG_VERSION"),
            started_at_unix_ms: epoch_ms,
            duration_s: finished_ms as f64 / 1000.0,
            goal_met,
            verdict,
            stopped_by,
            interrupted,
            worker_errors: errors.to_vec(),
        }
    }

    /// The `Result` and `Stopped by` rows; `nothing` when no limit was hit.
    pub fn render(&self, out: &mut String, nothing: &str) {
        kv(out, "Result", &self.verdict);
        kv(
            out,
            "Stopped by",
            &findings_text(&self.stopped_by, self.interrupted, nothing),
        );
    }

    /// One `Error` row per worker error.
    pub fn render_errors(&self, out: &mut String) {
        for e in &self.worker_errors {
            kv(out, "Error", e);
        }
    }
}

/// A scenario's report as the shared renderer sees it: serialised as is for `--json`,
/// its summary rows on stdout, and for `--html` the same rows with its charts.
pub trait Report: Serialize {
    fn head(&self) -> &Head;
    /// What the run drove (the page's heading).
    fn target(&self) -> String;
    /// The human summary: [`kv`] rows.
    fn render_text(&self) -> String;
    /// The HTML page's inline-SVG charts, in order.
    fn charts(&self) -> Vec<String>;

    /// The self-contained HTML page: heading, verdict, the summary, the charts.
    fn render_html(&self) -> String {
        let h = self.head();
        let mut body = format!(
            "<h1>loadtest {}: {}</h1><p class=\"verdict {}\">{}</p><pre>{}</pre>",
            h.scenario,
            escape(&self.target()),
            if h.goal_met { "ok" } else { "bad" },
            escape(&h.verdict),
            escape(&self.render_text())
        );
        body.extend(self.charts());
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>loadtest {} report</title><style>{STYLE}</style></head>\
             <body>{body}<p class=\"foot\">switchboard-loadtest {} · started at unix ms \
             {} · raw data: run with --json</p></body></html>\n",
            h.scenario,
            escape(env!("CARGO_PKG_VERSION")),
            h.started_at_unix_ms,
        )
    }
}

/// A limit that stopped a run, how often, and what to change.
#[derive(Debug, Serialize)]
pub struct Finding {
    pub limit: &'static str,
    pub count: u64,
    pub explanation: &'static str,
}

/// Occurrences of one failure reason.
#[derive(Debug, Clone, Serialize)]
pub struct ReasonCount {
    pub reason: String,
    pub count: u64,
}

/// Reasons by descending count.
pub fn reasons(t: &Tally) -> Vec<ReasonCount> {
    t.by_count()
        .into_iter()
        .map(|(reason, count)| ReasonCount {
            reason: reason.to_owned(),
            count,
        })
        .collect()
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Percentiles of a microsecond histogram, in milliseconds; `None` when empty.
pub fn latency_of(h: &Histogram) -> Option<Latency> {
    let ms = |q: f64| h.quantile(q).map_or(0.0, |us| us as f64 / 1000.0);
    Some(Latency {
        count: h.count(),
        min: h.min()? as f64 / 1000.0,
        mean: h.mean()? / 1000.0,
        p50: ms(0.5),
        p90: ms(0.9),
        p99: ms(0.99),
        p999: ms(0.999),
        max: h.max()? as f64 / 1000.0,
    })
}

/// `p50 1.2  p90 3.4  p99 5.6  p99.9 7.8  max 9.0` (ms), then `min, mean, n` and a
/// note on what was measured.
pub fn latency_text(l: &Latency, what: &str) -> String {
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n\
         min {}  mean {}  n {}   ({what})",
        millis(l.p50),
        millis(l.p90),
        millis(l.p99),
        millis(l.p999),
        millis(l.max),
        millis(l.min),
        millis(l.mean),
        thousands(l.count)
    )
}

/// A limit that failures or closes point to, with how often and what to change.
pub fn finding_of(label: &str, count: u64) -> Finding {
    let limit = Limit::from_label(label).unwrap_or(Limit::Other);
    Finding {
        limit: limit.label(),
        count,
        explanation: limit.explain(),
    }
}

/// Findings as summary lines; `nothing` when there are none.
pub fn findings_text(findings: &[Finding], interrupted: bool, nothing: &str) -> String {
    if findings.is_empty() {
        return if interrupted {
            "Ctrl-C".to_owned()
        } else {
            nothing.to_owned()
        };
    }
    findings
        .iter()
        .map(|f| format!("{} x{}: {}", f.limit, thousands(f.count), f.explanation))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Counts per slot as a per-second step line.
pub fn step_points(counts: &[u64], slot_ms: u64) -> Vec<(f64, f64)> {
    let slot_s = slot_ms as f64 / 1000.0;
    counts
        .iter()
        .enumerate()
        .flat_map(|(i, &c)| {
            let r = c as f64 / slot_s;
            [(i as f64 * slot_s, r), ((i + 1) as f64 * slot_s, r)]
        })
        .collect()
}

/// Levels per slot (the level at each slot's start) as points.
pub fn level_points(levels: &[u64], slot_ms: u64) -> Vec<(f64, f64)> {
    let slot_s = slot_ms as f64 / 1000.0;
    levels
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as f64 * slot_s, v as f64))
        .collect()
}

/// One line of a [`rate_chart`]: name, colour, counts per slot, and whether it is
/// left out when every count is zero.
pub type RateLine<'a> = (&'a str, &'a str, &'a [u64], bool);

/// Counts per slot as per-second steps, one line each.
pub fn rate_chart(title: &str, y_label: &str, slot_ms: u64, lines: &[RateLine<'_>]) -> String {
    Chart {
        title,
        x_label: "seconds since start",
        y_label,
        x_ticks: XTicks::Auto,
        series: lines
            .iter()
            .filter(|(_, _, counts, optional)| !optional || counts.iter().any(|&c| c > 0))
            .map(|&(name, color, counts, _)| Series {
                name,
                color,
                points: step_points(counts, slot_ms),
            })
            .collect(),
    }
    .render()
}

/// A level sampled each slot (open connections, streams in flight), as one line.
pub fn level_chart(title: &str, y_label: &str, name: &str, levels: &[u64], slot_ms: u64) -> String {
    Chart {
        title,
        x_label: "seconds since start",
        y_label,
        x_ticks: XTicks::Auto,
        series: vec![Series {
            name,
            color: "#2ca02c",
            points: level_points(levels, slot_ms),
        }],
    }
    .render()
}

/// Per-slot values (`None` for a slot without data) as points at slot centres.
pub fn slot_points(values: &[Option<f64>], slot_ms: u64) -> Vec<(f64, f64)> {
    let slot_s = slot_ms as f64 / 1000.0;
    values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| ((i as f64 + 0.5) * slot_s, v)))
        .collect()
}

/// A chart of p50 and p99 per second.
pub fn p50_p99_chart(
    title: &str,
    p50: &[Option<f64>],
    p99: &[Option<f64>],
    slot_ms: u64,
) -> String {
    Chart {
        title,
        x_label: "seconds since start",
        y_label: "ms",
        x_ticks: XTicks::Auto,
        series: vec![
            Series {
                name: "p50",
                color: "#2ca02c",
                points: slot_points(p50, slot_ms),
            },
            Series {
                name: "p99",
                color: "#d62728",
                points: slot_points(p99, slot_ms),
            },
        ],
    }
    .render()
}

/// Colours of the lines of a chart, in order.
const PALETTE: [&str; 6] = [
    "#9467bd", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#8c564b",
];

/// Resident memory over time of one or more processes, MiB; `None` when nothing was
/// read.
pub fn rss_chart(title: &str, processes: &[(&str, &[GatewaySample])]) -> Option<String> {
    let series: Vec<Series<'_>> = processes
        .iter()
        .enumerate()
        .map(|(i, (name, samples))| Series {
            name,
            color: PALETTE[i % PALETTE.len()],
            points: samples
                .iter()
                .filter_map(|s| {
                    s.rss_bytes
                        .map(|r| (s.at_ms as f64 / 1000.0, r as f64 / (1024.0 * 1024.0)))
                })
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    if series.is_empty() {
        return None;
    }
    Some(
        Chart {
            title,
            x_label: "seconds since start",
            y_label: "MiB",
            x_ticks: XTicks::Auto,
            series,
        }
        .render(),
    )
}

/// Where the parent writes its results.
pub struct Outputs {
    pub json: Option<PathBuf>,
    pub html: Option<PathBuf>,
}

/// Prints the summary on stdout and writes the JSON and HTML outputs asked for;
/// whether the run met its goal.
pub fn emit(report: &impl Report, outputs: &Outputs) -> anyhow::Result<bool> {
    print!("{}", report.render_text());
    if let Some(path) = &outputs.json {
        let json = serde_json::to_vec_pretty(report).context("encoding the JSON report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &outputs.html {
        let html = report.render_html();
        std::fs::write(path, html).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(report.head().goal_met)
}

/// Reasons as a right-aligned count column.
pub fn reason_table(rows: &[ReasonCount]) -> String {
    rows.iter()
        .map(|r| format!("{:>9}  {}", thousands(r.count), r.reason))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Latency by percentile on a "nines" axis (0 % .. 99.99 %), milliseconds.
pub fn percentile_chart(h: &Histogram, title: &str) -> String {
    percentile_curves(title, &[("latency", h, 0.0)])
}

/// Several latency curves by percentile on one "nines" axis, milliseconds; each
/// `(name, histogram of microseconds, milliseconds subtracted)`, clamped at zero.
pub fn percentile_curves(title: &str, curves: &[(&str, &Histogram, f64)]) -> String {
    let most = curves.iter().map(|(_, h, _)| h.count()).max().unwrap_or(0);
    let nines = if most > 1 {
        (most as f64).log10().clamp(1.0, CURVE_MAX_NINES)
    } else {
        1.0
    };
    let series = curves
        .iter()
        .enumerate()
        .map(|(i, (name, h, minus_ms))| {
            let ms = |us: u64| (us as f64 / 1000.0 - minus_ms).max(0.0);
            let mut points = Vec::new();
            let mut x = 0.0;
            while x <= nines + 1e-9 {
                if let Some(v) = h.quantile(1.0 - 10f64.powf(-x)) {
                    points.push((x, ms(v)));
                }
                x += CURVE_STEP;
            }
            if let Some(max) = h.max() {
                points.push((nines, ms(max)));
            }
            Series {
                name,
                color: PALETTE[(i + 1) % PALETTE.len()],
                points,
            }
        })
        .collect();
    let ticks = (0..=nines.floor() as u32)
        .map(|k| {
            let label = match k {
                0 => "0%".to_owned(),
                1 => "90%".to_owned(),
                2 => "99%".to_owned(),
                3 => "99.9%".to_owned(),
                _ => "99.99%".to_owned(),
            };
            (f64::from(k), label)
        })
        .collect();
    Chart {
        title,
        x_label: "percentile",
        y_label: "ms",
        x_ticks: XTicks::Fixed(ticks),
        series,
    }
    .render()
}

/// The stylesheet of every HTML report.
pub const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:860px;margin:2em auto;\
padding:0 1em;color:#222}h1{font-size:1.3em}pre{background:#f6f6f6;padding:1em;\
overflow-x:auto;font-size:12px}.verdict{font-weight:bold}.verdict.ok{color:#1a7f37}\
.verdict.bad{color:#b42318}.chart{width:100%;height:auto;margin:1em 0;border:1px solid #ddd}\
.chart .title{font-size:14px;font-weight:bold}.chart .grid{stroke:#eee}\
.chart .axis,.chart .tick{stroke:#555}.chart text{font-size:11px;fill:#333}\
.chart .ytick{text-anchor:end}.chart .xtick,.chart .xlabel,.chart .ylabel{text-anchor:middle}\
.foot{color:#777;font-size:12px}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_format() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(2048.0), "2.0 KiB");
        assert_eq!(bytes(-3.5 * 1024.0 * 1024.0), "-3.5 MiB");
        assert_eq!(millis(1.234), "1.23");
        assert_eq!(millis(12.34), "12.3");
        assert_eq!(millis(123.4), "123");
    }

    #[test]
    fn tables_and_escaping() {
        let mut s = String::new();
        kv(&mut s, "Result", "ok\nsecond line");
        assert_eq!(s, "Result        ok\n              second line\n");
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
