//! Presenting results: the one rendering model every scenario's report goes through
//! ([`Report`]: a JSON document, a head, the key/value rows of the human summary and
//! the inline-SVG charts of the HTML page), the summary rows several reports share,
//! writing the outputs, and one submodule per scenario's report.

pub mod broadcast;
pub mod chart;
pub mod chat;
pub mod connect;
pub mod format;
pub mod soak;
pub mod svg;

use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;

use crate::cli::ScenarioName;
use crate::client::Limit;
use crate::probe::GatewaySample;
use crate::scenario::population::{Plan, RunResult, Tallies};
use crate::stats::series::HistogramSeries;
use crate::stats::{Histogram, Tally};
pub use format::{bytes, escape, millis, thousands};

/// Shortest span used to compute a rate: below a millisecond the quotient is noise.
const MIN_RATE_SPAN_MS: u64 = 1;

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
    /// The head of a run of `plan`.
    pub fn new(
        plan: &Plan,
        run: &RunResult,
        goal_met: bool,
        verdict: String,
        stopped_by: Vec<Finding>,
    ) -> Head {
        Head {
            scenario: match plan.scenario {
                ScenarioName::Connect => "connect",
                ScenarioName::Broadcast => "broadcast",
                ScenarioName::Chat => "chat",
                ScenarioName::Soak => "soak",
            },
            version: env!("CARGO_PKG_VERSION"),
            started_at_unix_ms: plan.epoch_ms,
            duration_s: run.finished_ms as f64 / 1000.0,
            goal_met,
            verdict,
            stopped_by,
            interrupted: run.interrupted,
            worker_errors: run.errors.clone(),
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

impl Finding {
    pub fn new(limit: &'static str, count: u64, explanation: &'static str) -> Finding {
        Finding {
            limit,
            count,
            explanation,
        }
    }
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

/// `p50 1.2  p90 3.4  p99 5.6  p99.9 7.8  max 9.0` (ms).
pub fn percentiles_text(l: &Latency) -> String {
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        millis(l.p50),
        millis(l.p90),
        millis(l.p99),
        millis(l.p999),
        millis(l.max)
    )
}

/// [`percentiles_text`], then `min, mean, n` and a note on what was measured.
pub fn latency_text(l: &Latency, what: &str) -> String {
    format!(
        "{}\nmin {}  mean {}  n {}   ({what})",
        percentiles_text(l),
        millis(l.min),
        millis(l.mean),
        thousands(l.count)
    )
}

/// A [`latency_text`] row, or `none` when nothing was measured.
pub fn latency_row(out: &mut String, label: &str, l: &Option<Latency>, what: &str, none: &str) {
    match l {
        Some(l) => kv(out, label, &latency_text(l, what)),
        None => kv(out, label, none),
    }
}

/// `\nsetup (TCP connect -> {until}) p50 .. p99 .. max .. ms`, or nothing.
pub fn setup_latency_text(l: &Option<Latency>, until: &str) -> String {
    l.as_ref().map_or(String::new(), |l| {
        format!(
            "\nsetup (TCP connect -> {until}) p50 {} p99 {} max {} ms",
            millis(l.p50),
            millis(l.p99),
            millis(l.max)
        )
    })
}

/// `n` per second over `span_ms`; 0 without a span.
pub fn per_second(n: u64, span_ms: u64) -> f64 {
    if span_ms == 0 {
        0.0
    } else {
        n as f64 * 1000.0 / span_ms.max(MIN_RATE_SPAN_MS) as f64
    }
}

/// The milliseconds from `from` to `to`, at least one; 0 when either
/// is unknown.
pub fn span_ms(from: Option<u64>, to: Option<u64>) -> u64 {
    match (from, to) {
        (Some(a), Some(b)) => b.saturating_sub(a).max(MIN_RATE_SPAN_MS),
        _ => 0,
    }
}

/// Run-epoch milliseconds as seconds.
pub fn seconds(ms: Option<u64>) -> Option<f64> {
    ms.map(|v| v as f64 / 1000.0)
}

/// The `q` quantile of each slot of a microsecond series, in milliseconds.
pub fn quantiles_ms(series: &HistogramSeries, q: f64) -> Vec<Option<f64>> {
    series
        .quantiles(q)
        .into_iter()
        .map(|v| v.map(|us| us as f64 / 1000.0))
        .collect()
}

/// `  label count` for each count that is not zero, for the rarer outcomes of a
/// counts line.
pub fn nonzero_counts(counts: &[(&str, u64)]) -> String {
    counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(label, n)| format!("  {label} {}", thousands(*n)))
        .collect()
}

/// A resident size, `?` when it was not read.
pub fn rss_text(s: &Option<GatewaySample>) -> String {
    s.and_then(|s| s.rss_bytes)
        .map_or("?".to_owned(), |b| bytes(b as f64))
}

/// ` (within --allow-failures 5%: 2 users lost, 1 streams failed)` when something was
/// lost or failed, else nothing.
pub fn allowance_text(pct: f64, lost: (u64, &str), failed: (u64, &str)) -> String {
    if lost.0 == 0 && failed.0 == 0 {
        return String::new();
    }
    format!(
        " (within --allow-failures {pct}%: {} {} lost, {} {} failed)",
        thousands(lost.0),
        lost.1,
        thousands(failed.0),
        failed.1
    )
}

/// A limit that failures or closes point to, with how often and what to change.
pub fn finding_of(label: &str, count: u64) -> Finding {
    let limit = Limit::from_label(label).unwrap_or(Limit::Other);
    Finding::new(limit.label(), count, limit.explain())
}

/// What stopped a run, most frequent first: the limits failed setups and unexpected
/// closes point to, and the scenario's own findings (`more`).
pub fn stopped_by(t: &Tallies, more: impl IntoIterator<Item = Finding>) -> Vec<Finding> {
    let mut limits = t.failure_limits.clone();
    limits.merge(&t.close_limits);
    let mut found: Vec<Finding> = limits
        .by_count()
        .into_iter()
        .map(|(label, count)| finding_of(label, count))
        .chain(more)
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.count));
    found
}

/// Share `pct` of `of`: how many failures `--allow-failures` tolerates.
pub fn allowed(pct: f64, of: u64) -> f64 {
    pct / 100.0 * of as f64
}

/// Why a run's connections missed the goal: worker errors (`errors`), fewer set up
/// than `target` (`{set_up}/{target} {what}`), closes by the gateway.
pub fn connection_problems(run: &RunResult, target: u64, what: &str, errors: &str) -> Vec<String> {
    let t = &run.tallies;
    let mut why = Vec::new();
    if !run.errors.is_empty() {
        why.push(errors.to_owned());
    }
    if t.subscribed < target {
        why.push(format!(
            "{}/{} {what}",
            thousands(t.subscribed),
            thousands(target)
        ));
    }
    if t.closed > 0 {
        why.push(format!("{} closed by the gateway", thousands(t.closed)));
    }
    why
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

/// A [`reason_table`] row, left out when there is no reason.
pub fn reason_rows(out: &mut String, label: &str, rows: &[ReasonCount]) {
    if !rows.is_empty() {
        kv(out, label, &reason_table(rows));
    }
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
