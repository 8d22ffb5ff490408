//! The `--fail-on` thresholds of `soak`: `metric<limit` or `metric>limit`, several per
//! flag separated by commas, so that a CI job can say what it tolerates
//! (`success<99.9,abnormal>0,growth>64`) and get exit code 1 when a run breaks it.

use std::fmt;

use anyhow::{Result, bail};
use serde::Serialize;

/// What `soak` checks when no `--fail-on` is given: every connection setup works
/// (99.9 %), nothing is dropped without a close frame, every delivery and chunk
/// arrives once, no chat stream fails.
pub const DEFAULT_FAIL_ON: &str = "success<99.9,abnormal>0,gaps>0,duplicates>0,chat-errors>0";

/// A measured quantity of a soak run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// Connection setups that succeeded, percent.
    Success,
    /// Connections that ended without a close frame (1006), during setup or after.
    Abnormal,
    /// Connections the server closed or dropped after their setup.
    Closes,
    /// Connection setups that failed.
    Failures,
    /// Deliveries and chunks missing.
    Gaps,
    /// Deliveries and chunks received twice.
    Duplicates,
    /// Chat streams that failed.
    ChatErrors,
    /// Chat streams that failed, percent of those sent.
    ChatErrorPct,
    /// First-chunk overhead p99, ms.
    OverheadP99,
    /// Delivery latency p99, ms.
    DeliveryP99,
    /// Gateway RSS growth after the warm-up, MiB per hour.
    Growth,
    /// The largest chat worker RSS growth after the warm-up, MiB per hour.
    WorkerGrowth,
}

impl Metric {
    const ALL: [(Metric, &'static str, &'static str); 12] = [
        (Metric::Success, "success", "%"),
        (Metric::Abnormal, "abnormal", ""),
        (Metric::Closes, "closes", ""),
        (Metric::Failures, "failures", ""),
        (Metric::Gaps, "gaps", ""),
        (Metric::Duplicates, "duplicates", ""),
        (Metric::ChatErrors, "chat-errors", ""),
        (Metric::ChatErrorPct, "chat-error-pct", "%"),
        (Metric::OverheadP99, "overhead-p99", " ms"),
        (Metric::DeliveryP99, "delivery-p99", " ms"),
        (Metric::Growth, "growth", " MiB/h"),
        (Metric::WorkerGrowth, "worker-growth", " MiB/h"),
    ];

    pub fn name(self) -> &'static str {
        Metric::ALL
            .iter()
            .find(|(m, _, _)| *m == self)
            .map_or("?", |(_, n, _)| n)
    }

    /// The unit shown after a value (`%`, ` ms`, ` MiB/h`, or nothing for counts).
    pub fn unit(self) -> &'static str {
        Metric::ALL
            .iter()
            .find(|(m, _, _)| *m == self)
            .map_or("", |(_, _, u)| u)
    }

    fn parse(name: &str) -> Option<Metric> {
        Metric::ALL
            .iter()
            .find(|(_, n, _)| *n == name)
            .map(|(m, _, _)| *m)
    }
}

/// Which side of the limit breaks the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `metric<limit`: broken when the measured value is below the limit.
    Below,
    /// `metric>limit`: broken when the measured value is above the limit.
    Above,
}

/// One threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Threshold {
    pub metric: Metric,
    pub op: Op,
    pub limit: f64,
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Below => '<',
            Op::Above => '>',
        };
        write!(f, "{}{op}{}", self.metric.name(), self.limit)
    }
}

impl Threshold {
    /// Parses `metric<limit` or `metric>limit`.
    pub fn parse(text: &str) -> Result<Threshold> {
        let text = text.trim();
        let Some(at) = text.find(['<', '>']) else {
            bail!("--fail-on {text:?}: expected metric<limit or metric>limit");
        };
        let (name, rest) = text.split_at(at);
        let op = if rest.starts_with('<') {
            Op::Below
        } else {
            Op::Above
        };
        let Some(metric) = Metric::parse(name.trim()) else {
            let names: Vec<&str> = Metric::ALL.iter().map(|(_, n, _)| *n).collect();
            bail!(
                "--fail-on {text:?}: unknown metric {:?} (one of {})",
                name.trim(),
                names.join(", ")
            );
        };
        let limit: f64 = rest[1..]
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--fail-on {text:?}: the limit must be a number"))?;
        if !limit.is_finite() {
            bail!("--fail-on {text:?}: the limit must be finite");
        }
        Ok(Threshold { metric, op, limit })
    }

    /// Whether `measured` breaks this threshold; a value that could not be measured
    /// breaks it too, so that a CI run never passes on a check it did not make.
    pub fn broken(&self, measured: Option<f64>) -> bool {
        match (measured, self.op) {
            (None, _) => true,
            (Some(v), Op::Below) => v < self.limit,
            (Some(v), Op::Above) => v > self.limit,
        }
    }
}

/// Every threshold of the `--fail-on` flags (each a comma-separated list), or the
/// defaults when none is given.
pub fn parse_all(flags: &[String]) -> Result<Vec<Threshold>> {
    let list: Vec<&str> = if flags.is_empty() {
        DEFAULT_FAIL_ON.split(',').collect()
    } else {
        flags.iter().flat_map(|f| f.split(',')).collect()
    };
    list.into_iter()
        .filter(|s| !s.trim().is_empty())
        .map(Threshold::parse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_and_print() {
        let t = Threshold::parse("success<99.9").unwrap();
        assert_eq!(
            (t.metric, t.op, t.limit),
            (Metric::Success, Op::Below, 99.9)
        );
        assert_eq!(t.to_string(), "success<99.9");
        let t = Threshold::parse(" worker-growth > 64 ").unwrap();
        assert_eq!(
            (t.metric, t.op, t.limit),
            (Metric::WorkerGrowth, Op::Above, 64.0)
        );
        assert_eq!(t.metric.unit(), " MiB/h");
        for bad in [
            "success",
            "succes<1",
            "success<",
            "success<x",
            "gaps>inf",
            "<3",
        ] {
            assert!(Threshold::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lists_and_defaults() {
        let all = parse_all(&[]).unwrap();
        assert_eq!(all.len(), 5);
        assert_eq!(all[0].to_string(), "success<99.9");
        let all = parse_all(&["abnormal>0,growth>64".into(), "gaps>0".into()]).unwrap();
        let names: Vec<&str> = all.iter().map(|t| t.metric.name()).collect();
        assert_eq!(names, vec!["abnormal", "growth", "gaps"]);
        assert!(parse_all(&["abnormal>0,nope>1".into()]).is_err());
    }

    #[test]
    fn breaking_is_strict_and_unmeasured_breaks() {
        let below = Threshold::parse("success<99.9").unwrap();
        assert!(below.broken(Some(99.8)));
        assert!(!below.broken(Some(99.9)));
        assert!(!below.broken(Some(100.0)));
        let above = Threshold::parse("abnormal>0").unwrap();
        assert!(!above.broken(Some(0.0)));
        assert!(above.broken(Some(1.0)));
        assert!(above.broken(None));
    }
}
