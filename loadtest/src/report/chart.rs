//! The charts of the HTML reports: latency by percentile, and per-second series
//! (rates, levels, p50/p99, resident memory) over the run.

use super::svg::{Chart, Series, XTicks};
use crate::probe::GatewaySample;
use crate::stats::Histogram;

/// Resolution of a latency percentile curve, in "nines" (x = -log10(1 - q)).
const CURVE_STEP: f64 = 0.02;
/// Deepest percentile plotted: 99.99 %, the most a run of these sizes resolves.
const CURVE_MAX_NINES: f64 = 4.0;

/// Colours of the lines of a chart, in order.
const PALETTE: [&str; 6] = [
    "#9467bd", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#8c564b",
];

/// A chart over the run's seconds.
fn time_chart(title: &str, y_label: &str, series: Vec<Series<'_>>) -> String {
    Chart {
        title,
        x_label: "seconds since start",
        y_label,
        x_ticks: XTicks::Auto,
        series,
    }
    .render()
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

/// Per-slot values (`None` for a slot without data) as points at slot centres.
pub fn slot_points(values: &[Option<f64>], slot_ms: u64) -> Vec<(f64, f64)> {
    let slot_s = slot_ms as f64 / 1000.0;
    values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| ((i as f64 + 0.5) * slot_s, v)))
        .collect()
}

/// One line of a [`rate_chart`]: name, colour, counts per slot, and whether it is
/// left out when every count is zero.
pub type RateLine<'a> = (&'a str, &'a str, &'a [u64], bool);

/// Counts per slot as per-second steps, one line each.
pub fn rate_chart(title: &str, y_label: &str, slot_ms: u64, lines: &[RateLine<'_>]) -> String {
    let series = lines
        .iter()
        .filter(|(_, _, counts, optional)| !optional || counts.iter().any(|&c| c > 0))
        .map(|&(name, color, counts, _)| Series {
            name,
            color,
            points: step_points(counts, slot_ms),
        })
        .collect();
    time_chart(title, y_label, series)
}

/// A level sampled each slot (open connections, streams in flight), as one line.
pub fn level_chart(title: &str, y_label: &str, name: &str, levels: &[u64], slot_ms: u64) -> String {
    let points = level_points(levels, slot_ms);
    time_chart(
        title,
        y_label,
        vec![Series {
            name,
            color: "#2ca02c",
            points,
        }],
    )
}

/// A chart of p50 and p99 per second.
pub fn p50_p99_chart(
    title: &str,
    p50: &[Option<f64>],
    p99: &[Option<f64>],
    slot_ms: u64,
) -> String {
    let line = |name, color, values| Series {
        name,
        color,
        points: slot_points(values, slot_ms),
    };
    time_chart(
        title,
        "ms",
        vec![line("p50", "#2ca02c", p50), line("p99", "#d62728", p99)],
    )
}

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
    (!series.is_empty()).then(|| time_chart(title, "MiB", series))
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
