//! Growth of a sampled quantity over time (a process's resident memory during a soak):
//! an ordinary least-squares line through `(seconds, value)` points, reported as a
//! rate per hour, with the fit's R² so that a reader can tell a steady leak from noise.

use serde::Serialize;

/// Seconds per hour, the unit growth is reported in.
const SECONDS_PER_HOUR: f64 = 3600.0;
/// Fewest points a line is fitted through: two points always fit exactly, so they
/// say nothing about noise.
pub const MIN_POINTS: usize = 3;

/// A fitted line `value = intercept + slope * seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Trend {
    /// Points the line was fitted through.
    pub points: usize,
    /// Seconds from the first point to the last.
    pub span_s: f64,
    /// Change per second.
    pub slope_per_s: f64,
    /// Change per hour (`slope_per_s * 3600`).
    pub per_hour: f64,
    /// The line's value at the first and at the last point's time.
    pub start: f64,
    pub end: f64,
    /// Share of the variance the line explains (1 = every point on it; 0 = none, or
    /// the values never changed).
    pub r_squared: f64,
}

/// Fits a line through `points` (`(seconds, value)`, any order); `None` with fewer than
/// [`MIN_POINTS`] finite points or when they all share one time.
pub fn fit(points: &[(f64, f64)]) -> Option<Trend> {
    let usable: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if usable.len() < MIN_POINTS {
        return None;
    }
    let n = usable.len() as f64;
    let mean_x = usable.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = usable.iter().map(|p| p.1).sum::<f64>() / n;
    // Centred sums: stable for large x (epoch seconds) and large y (bytes).
    let (mut sxx, mut sxy, mut syy) = (0.0, 0.0, 0.0);
    for &(x, y) in &usable {
        let (dx, dy) = (x - mean_x, y - mean_y);
        sxx += dx * dx;
        sxy += dx * dy;
        syy += dy * dy;
    }
    if sxx <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let intercept = mean_y - slope * mean_x;
    let first = usable.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let last = usable.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let r_squared = if syy > 0.0 {
        (sxy * sxy / (sxx * syy)).clamp(0.0, 1.0)
    } else {
        0.0
    };
    Some(Trend {
        points: usable.len(),
        span_s: last - first,
        slope_per_s: slope,
        per_hour: slope * SECONDS_PER_HOUR,
        start: intercept + slope * first,
        end: intercept + slope * last,
        r_squared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-6 * b.abs().max(1.0)
    }

    #[test]
    fn a_straight_line_is_found_exactly() {
        // 100 MiB growing by 1 KiB per second: 3.5 MiB per hour.
        let base = 100.0 * 1024.0 * 1024.0;
        let points: Vec<(f64, f64)> = (0..600)
            .map(|s| (s as f64, base + 1024.0 * s as f64))
            .collect();
        let t = fit(&points).unwrap();
        assert!(close(t.slope_per_s, 1024.0), "{t:?}");
        assert!(close(t.per_hour, 1024.0 * 3600.0));
        assert!(close(t.start, base));
        assert!(close(t.end, base + 1024.0 * 599.0));
        assert!(close(t.r_squared, 1.0));
        assert_eq!((t.points, t.span_s), (600, 599.0));
    }

    #[test]
    fn a_flat_noisy_series_has_no_growth_and_a_low_r_squared() {
        // Alternating +-1 MiB around 50 MiB: slope near zero, nothing explained.
        let points: Vec<(f64, f64)> = (0..1000)
            .map(|s| {
                let wobble = if s % 2 == 0 { 1.0 } else { -1.0 };
                (s as f64, (50.0 + wobble) * 1048576.0)
            })
            .collect();
        let t = fit(&points).unwrap();
        assert!(
            t.per_hour.abs() < 0.01 * 1048576.0 * 3600.0 / 1000.0,
            "{t:?}"
        );
        assert!(t.r_squared < 0.01, "{t:?}");
    }

    #[test]
    fn a_constant_series_fits_flat() {
        let points = [(0.0, 7.0), (1.0, 7.0), (2.0, 7.0)];
        let t = fit(&points).unwrap();
        assert_eq!((t.slope_per_s, t.r_squared), (0.0, 0.0));
        assert_eq!((t.start, t.end), (7.0, 7.0));
    }

    #[test]
    fn order_and_offsets_do_not_matter() {
        // Epoch-sized x values and shuffled order give the same slope.
        let t0 = 1.7e9;
        let mut points: Vec<(f64, f64)> = (0..50)
            .map(|s| (t0 + s as f64 * 2.0, 3.0 * s as f64 + 10.0))
            .collect();
        points.reverse();
        points.swap(3, 40);
        let t = fit(&points).unwrap();
        assert!(close(t.slope_per_s, 1.5), "{t:?}");
        assert!(close(t.start, 10.0));
    }

    #[test]
    fn too_few_or_degenerate_points_give_nothing() {
        assert!(fit(&[]).is_none());
        assert!(fit(&[(0.0, 1.0), (1.0, 2.0)]).is_none());
        assert!(fit(&[(5.0, 1.0), (5.0, 2.0), (5.0, 3.0)]).is_none());
        // Non-finite points are skipped, not poisoning the fit.
        let t = fit(&[(0.0, 0.0), (1.0, f64::NAN), (1.0, 1.0), (2.0, 2.0)]).unwrap();
        assert_eq!(t.points, 3);
        assert!(close(t.slope_per_s, 1.0));
    }
}
