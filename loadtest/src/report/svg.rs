//! Minimal inline-SVG line charts for the self-contained HTML report: linear axes with
//! "nice" ticks (or ticks given by the caller), one polyline per series, a legend.

use std::fmt::Write;

use super::format::{escape, thousands};

/// Drawing size in SVG user units; the page scales it to its width.
const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 300.0;
/// Margins for tick labels, the title and the axis labels.
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 46.0;
/// Width reserved per legend entry (swatch and a short name).
const LEGEND_ENTRY_WIDTH: f64 = 110.0;
/// Ticks aimed for on an automatic axis.
const TARGET_TICKS: f64 = 6.0;

/// One line of a chart.
pub struct Series<'a> {
    pub name: &'a str,
    /// A CSS colour.
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// How an x axis is labelled.
pub enum XTicks {
    /// Nice round values.
    Auto,
    /// These positions with these labels.
    Fixed(Vec<(f64, String)>),
}

/// A chart with a title and axis labels.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x_ticks: XTicks,
    pub series: Vec<Series<'a>>,
}

/// Round tick step for a span: 1, 2 or 5 times a power of ten.
pub fn nice_step(span: f64) -> f64 {
    if !span.is_finite() || span <= 0.0 {
        return 1.0;
    }
    let raw = span / TARGET_TICKS;
    let magnitude = 10f64.powf(raw.log10().floor());
    let residual = raw / magnitude;
    let nice = if residual <= 1.0 {
        1.0
    } else if residual <= 2.0 {
        2.0
    } else if residual <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn tick_label(v: f64, step: f64) -> String {
    if step >= 1.0 || v == 0.0 {
        let rounded = v.round();
        if rounded.abs() >= 10_000.0 {
            let sign = if rounded < 0.0 { "-" } else { "" };
            format!("{sign}{}", thousands(rounded.abs() as u64))
        } else {
            format!("{rounded:.0}")
        }
    } else {
        let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
        format!("{v:.decimals$}")
    }
}

impl Chart<'_> {
    /// The chart as an `<svg>` element.
    pub fn render(&self) -> String {
        let all = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x_min, mut x_max, mut y_max) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
        for &(x, y) in all {
            if x.is_finite() && y.is_finite() {
                x_min = x_min.min(x);
                x_max = x_max.max(x);
                y_max = y_max.max(y);
            }
        }
        if let XTicks::Fixed(ticks) = &self.x_ticks {
            for (x, _) in ticks {
                x_min = x_min.min(*x);
                x_max = x_max.max(*x);
            }
        }
        if !x_min.is_finite() {
            (x_min, x_max) = (0.0, 1.0);
        }
        // Every chart here has a natural zero on x (run start, 0th percentile).
        x_min = x_min.min(0.0);
        if x_max <= x_min {
            x_max = x_min + 1.0;
        }
        let y_step = nice_step(y_max.max(1e-9));
        let y_top = ((y_max / y_step).ceil() * y_step).max(y_step);

        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let sx = |x: f64| LEFT + (x - x_min) / (x_max - x_min) * plot_w;
        let sy = |y: f64| TOP + plot_h - (y / y_top) * plot_h;

        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{t}" class="chart">"#,
            t = escape(self.title)
        );
        let _ = write!(
            svg,
            r#"<text x="{LEFT}" y="20" class="title">{}</text>"#,
            escape(self.title)
        );
        // Horizontal grid and y ticks.
        let mut y = 0.0;
        while y <= y_top + y_step * 1e-9 {
            let py = sy(y);
            let _ = write!(
                svg,
                r#"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" class="grid"/><text x="{:.1}" y="{:.1}" class="ytick">{}</text>"#,
                LEFT + plot_w,
                LEFT - 6.0,
                py + 4.0,
                tick_label(y, y_step)
            );
            y += y_step;
        }
        // X ticks.
        let x_ticks: Vec<(f64, String)> = match &self.x_ticks {
            XTicks::Fixed(t) => t.clone(),
            XTicks::Auto => {
                let step = nice_step(x_max - x_min);
                let mut v = (x_min / step).ceil() * step;
                let mut t = Vec::new();
                while v <= x_max + step * 1e-9 {
                    t.push((v, tick_label(v, step)));
                    v += step;
                }
                t
            }
        };
        for (x, label) in &x_ticks {
            let px = sx(*x);
            let _ = write!(
                svg,
                r#"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" class="tick"/><text x="{px:.1}" y="{:.1}" class="xtick">{}</text>"#,
                TOP + plot_h,
                TOP + plot_h + 5.0,
                TOP + plot_h + 18.0,
                escape(label)
            );
        }
        // Axes and their labels.
        let _ = write!(
            svg,
            r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.1}" class="axis"/><line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" class="axis"/>"#,
            TOP + plot_h,
            TOP + plot_h,
            LEFT + plot_w,
            TOP + plot_h
        );
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" class="xlabel">{}</text><text x="14" y="{:.1}" class="ylabel" transform="rotate(-90 14 {:.1})">{}</text>"#,
            LEFT + plot_w / 2.0,
            HEIGHT - 8.0,
            escape(self.x_label),
            TOP + plot_h / 2.0,
            TOP + plot_h / 2.0,
            escape(self.y_label)
        );
        // Series and legend.
        for (i, s) in self.series.iter().enumerate() {
            let points: Vec<String> = s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            if !points.is_empty() {
                let _ = write!(
                    svg,
                    r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                    points.join(" "),
                    escape(s.color)
                );
            }
            // Legend entries sit in a row above the plot, right-aligned, clear of data.
            let from_right = (self.series.len() - i) as f64;
            let lx = WIDTH - RIGHT - LEGEND_ENTRY_WIDTH * from_right;
            let ly = TOP - 14.0;
            let _ = write!(
                svg,
                r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="4" fill="{}"/><text x="{:.1}" y="{ly:.1}" class="legend">{}</text>"#,
                ly - 5.0,
                escape(s.color),
                lx + 18.0,
                escape(s.name)
            );
        }
        svg.push_str("</svg>");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(10.0), 2.0);
        assert_eq!(nice_step(100.0), 20.0);
        assert_eq!(nice_step(7.0), 2.0);
        assert_eq!(nice_step(0.5), 0.1);
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(nice_step(f64::NAN), 1.0);
    }

    #[test]
    fn chart_renders_series_and_escapes_text() {
        let chart = Chart {
            title: "open <connections>",
            x_label: "seconds",
            y_label: "open",
            x_ticks: XTicks::Auto,
            series: vec![Series {
                name: "open",
                color: "#1f77b4",
                points: vec![(0.0, 0.0), (1.0, 500.0), (2.0, 1000.0)],
            }],
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("open &lt;connections&gt;"));
        assert!(svg.contains("<polyline"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn empty_and_degenerate_charts_render() {
        for points in [vec![], vec![(3.0, 0.0)], vec![(f64::NAN, 1.0)]] {
            let svg = Chart {
                title: "t",
                x_label: "x",
                y_label: "y",
                x_ticks: XTicks::Fixed(vec![(0.0, "0%".into())]),
                series: vec![Series {
                    name: "s",
                    color: "red",
                    points,
                }],
            }
            .render();
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        }
    }
}
