//! Presenting results: number formatting and the key/value tables of the human summary,
//! inline-SVG charts for the HTML report, and one submodule per scenario's report.

pub mod broadcast;
pub mod connect;
pub mod svg;

use serde::Serialize;

use crate::stats::{Histogram, Tally};
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

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A byte count in B, KiB, MiB or GiB with one decimal.
pub fn bytes(n: f64) -> String {
    let sign = if n < 0.0 { "-" } else { "" };
    let n = n.abs();
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{sign}{value:.0} B")
    } else {
        format!("{sign}{value:.1} {}", UNITS[unit])
    }
}

/// Milliseconds with a precision that suits their size.
pub fn millis(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// Escapes text for HTML and SVG.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A limit that stopped a run, how often, and what to change.
#[derive(Debug, Serialize)]
pub struct Finding {
    pub limit: &'static str,
    pub count: u64,
    pub explanation: &'static str,
}

/// Occurrences of one failure reason.
#[derive(Debug, Serialize)]
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
#[derive(Debug, Serialize)]
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

/// Reasons as a right-aligned count column.
pub fn reason_table(rows: &[ReasonCount]) -> String {
    rows.iter()
        .map(|r| format!("{:>9}  {}", thousands(r.count), r.reason))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Latency by percentile on a "nines" axis (0 % .. 99.99 %), milliseconds.
pub fn percentile_chart(h: &Histogram, title: &str) -> String {
    let nines = if h.count() > 1 {
        (h.count() as f64).log10().clamp(1.0, CURVE_MAX_NINES)
    } else {
        1.0
    };
    let mut points = Vec::new();
    let mut x = 0.0;
    while x <= nines + 1e-9 {
        let q = 1.0 - 10f64.powf(-x);
        if let Some(v) = h.quantile(q) {
            points.push((x, v as f64 / 1000.0));
        }
        x += CURVE_STEP;
    }
    if let Some(max) = h.max() {
        points.push((nines, max as f64 / 1000.0));
    }
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
        series: vec![Series {
            name: "latency",
            color: "#1f77b4",
            points,
        }],
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
