//! The `soak` scenario's report: a population held for a long window with churn,
//! publications and chat streams. Connection success ratio, abnormal closes (1006) and
//! closes by code, delivery and chat sections (shared with `broadcast` and `chat`),
//! memory growth per hour of the gateway and the chat workers (a line fitted through
//! their RSS after the warm-up), and the `--fail-on` thresholds that decide the exit
//! code.

use serde::Serialize;

use super::broadcast::{
    Deliveries, Layout, Machine, Offsets, Publications, Timeline, deliveries, delivery_charts,
    delivery_findings, offsets, open_chart, publications, render_delivery, timeline,
};
use super::chart::{percentile_chart, rate_chart};
use super::chat::{ChatSection, ChatTimeline, Users, processes_rss_chart};
use super::{Head, Latency, Report, bytes, kv, latency_of, stopped_by, thousands};
use crate::client::Limit;
use crate::probe::GatewaySample;
use crate::scenario::population::{Plan, ProcessSeries, RunResult};
use crate::stats::Histogram;
use crate::stats::trend::{self, Trend};
use crate::threshold::{Metric, Threshold};

/// Bytes per MiB, the unit of growth.
const MIB: f64 = 1024.0 * 1024.0;

/// The `soak` report.
#[derive(Debug, Serialize)]
pub struct SoakReport {
    /// Goal: no `--fail-on` threshold broken, no worker error, not interrupted.
    #[serde(flatten)]
    pub head: Head,
    /// The thresholds, each with what was measured.
    pub thresholds: Vec<ThresholdResult>,
    pub config: SoakConfig,
    pub connections: Connections,
    pub publications: Publications,
    pub deliveries: Deliveries,
    /// Publish timestamp to receipt, over every delivery.
    pub latency_ms: Option<Latency>,
    pub latency_histogram_us: Histogram,
    pub offsets: Offsets,
    pub chat: Option<ChatSection>,
    pub memory: Memory,
    #[serde(flatten)]
    pub machine: Machine,
    pub timeline: SoakTimeline,
}

#[derive(Debug, Serialize)]
pub struct SoakConfig {
    pub connections: u64,
    pub channels: u64,
    pub namespace: String,
    pub churn_per_s: f64,
    pub publications_per_s: f64,
    pub chat_users: u64,
    pub warmup_s: u64,
    pub fail_on: Vec<String>,
    #[serde(flatten)]
    pub layout: Layout,
}

/// Every connection setup of the run: the base population, its churned
/// replacements and the chat users.
#[derive(Debug, Serialize)]
pub struct Connections {
    #[serde(flatten)]
    pub setups: Users,
    pub attempted: u64,
    /// Setups that succeeded, percent of those attempted.
    pub success_pct: Option<f64>,
    /// Subscribers closed (1000) and replaced by churn.
    pub churned: u64,
    /// Setups and connections that ended without a close frame (1006).
    pub abnormal_closes: u64,
    pub peak_open: u64,
}

/// Memory of one process over the window.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessMemory {
    pub name: String,
    pub samples: usize,
    pub first_bytes: Option<u64>,
    pub last_bytes: Option<u64>,
    pub peak_bytes: Option<u64>,
    /// The line through the samples after the warm-up, in bytes.
    pub trend: Option<Trend>,
    /// The trend's slope in MiB per hour.
    pub growth_mib_per_hour: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Memory {
    pub warmup_s: f64,
    /// From `--pid` / `--metrics-url`.
    pub gateway: Option<ProcessMemory>,
    /// From each `--worker-metrics`.
    pub workers: Vec<ProcessMemory>,
}

#[derive(Debug, Serialize)]
pub struct ThresholdResult {
    pub threshold: String,
    pub metric: Metric,
    pub limit: f64,
    /// `None`: could not be measured (counts as broken).
    pub measured: Option<f64>,
    pub broken: bool,
}

#[derive(Debug, Serialize)]
pub struct SoakTimeline {
    #[serde(flatten)]
    pub population: Timeline,
    pub chat: Option<ChatTimeline>,
    /// Connection setups (replacements included) and failed setups per second.
    pub setups: Vec<u64>,
    pub setup_failures: Vec<u64>,
    pub workers: Vec<ProcessSeries>,
}

/// The memory of one process over the window, with its trend after the warm-up.
pub fn process_memory(
    name: &str,
    samples: &[GatewaySample],
    from_ms: u64,
    to_ms: u64,
) -> ProcessMemory {
    let rss: Vec<(u64, u64)> = samples
        .iter()
        .filter_map(|s| s.rss_bytes.map(|r| (s.at_ms, r)))
        .collect();
    let points: Vec<(f64, f64)> = rss
        .iter()
        .filter(|(at, _)| (from_ms..=to_ms).contains(at))
        .map(|&(at, r)| (at as f64 / 1000.0, r as f64))
        .collect();
    let trend = trend::fit(&points);
    ProcessMemory {
        name: name.to_owned(),
        samples: rss.len(),
        first_bytes: rss.first().map(|s| s.1),
        last_bytes: rss.last().map(|s| s.1),
        peak_bytes: rss.iter().map(|s| s.1).max(),
        growth_mib_per_hour: trend.map(|t| t.per_hour / MIB),
        trend,
    }
}

/// Connections and setups that ended without a close frame.
fn abnormal(run: &RunResult) -> u64 {
    let label = Limit::Dropped.label();
    run.tallies.close_limits.get(label) + run.tallies.failure_limits.get(label)
}

impl SoakReport {
    pub fn build(plan: &Plan, run: &RunResult) -> SoakReport {
        let t = &run.tallies;
        let llm = plan.chat.as_ref().and_then(|c| c.settings.llm);
        let chat = plan
            .chat
            .as_ref()
            .map(|_| ChatSection::build(&t.chat, llm, run));
        let latency_total = t.latency_us.total();
        let latency_ms = latency_of(&latency_total);

        // Memory: only inside the window (closing frees it), after the warm-up.
        let start = run.window_started_ms.unwrap_or(0);
        let end = run.window_ended_ms.unwrap_or(run.finished_ms);
        let from = start + u64::try_from(plan.warmup.as_millis()).unwrap_or(u64::MAX);
        let memory = Memory {
            warmup_s: plan.warmup.as_secs_f64(),
            gateway: run
                .gateway
                .map(|_| process_memory("gateway", &run.gateway_series, from, end)),
            workers: run
                .worker_series
                .iter()
                .map(|w| process_memory(&w.url, &w.samples, from, end))
                .collect(),
        };

        let success_pct =
            (t.attempted > 0).then(|| t.subscribed as f64 * 100.0 / t.attempted as f64);
        let abnormal_closes = abnormal(run);
        let measured = |m: Metric| -> Option<f64> {
            let chat_sum = |f: fn(&ChatSection) -> u64| chat.as_ref().map_or(0, f);
            match m {
                Metric::Success => success_pct,
                Metric::Abnormal => Some(abnormal_closes as f64),
                Metric::Closes => Some(t.closed as f64),
                Metric::Failures => Some(t.failed as f64),
                Metric::Gaps => Some((t.gaps.missing + chat_sum(|c| c.chunks.missing)) as f64),
                Metric::Duplicates => {
                    Some((t.gaps.duplicates + chat_sum(|c| c.chunks.duplicates)) as f64)
                }
                Metric::ChatErrors => Some(chat_sum(|c| c.failed) as f64),
                Metric::ChatErrorPct => chat
                    .as_ref()
                    .map(|c| c.failed as f64 * 100.0 / c.sent.max(1) as f64),
                Metric::OverheadP99 => chat
                    .as_ref()
                    .and_then(|c| c.first_chunk_overhead_ms.as_ref())
                    .map(|l| l.p99),
                Metric::DeliveryP99 => latency_ms.as_ref().map(|l| l.p99),
                Metric::Growth => memory.gateway.as_ref().and_then(|g| g.growth_mib_per_hour),
                Metric::WorkerGrowth => memory
                    .workers
                    .iter()
                    .filter_map(|w| w.growth_mib_per_hour)
                    .reduce(f64::max),
            }
        };
        let thresholds: Vec<ThresholdResult> = plan
            .fail_on
            .iter()
            .map(|th: &Threshold| {
                let value = measured(th.metric);
                ThresholdResult {
                    threshold: th.to_string(),
                    metric: th.metric,
                    limit: th.limit,
                    measured: value,
                    broken: th.broken(value),
                }
            })
            .collect();

        let mut more = delivery_findings(plan, run);
        more.extend(chat.iter().flat_map(ChatSection::findings));
        let stopped_by = stopped_by(t, more);

        let broken: Vec<String> = thresholds
            .iter()
            .filter(|r| r.broken)
            .map(|r| match r.measured {
                Some(v) => format!(
                    "{} {}{} (threshold {})",
                    r.metric.name(),
                    round(v),
                    r.metric.unit(),
                    r.threshold
                ),
                None => format!(
                    "{} not measured (threshold {})",
                    r.metric.name(),
                    r.threshold
                ),
            })
            .collect();
        let goal_met = !run.interrupted && run.errors.is_empty() && broken.is_empty();
        let held = format!(
            "{} connections for {:.0} s, {} churned, {} setups {}, {} abnormal closes, {} \
             deliveries, {} chat streams completed{}",
            thousands(plan.subscribers),
            end.saturating_sub(start) as f64 / 1000.0,
            thousands(t.churned),
            thousands(t.attempted),
            success_pct.map_or("-".to_owned(), |s| format!("{s:.2} % ok")),
            thousands(abnormal_closes),
            thousands(t.gaps.received),
            thousands(chat.as_ref().map_or(0, |c| c.completed)),
            memory
                .gateway
                .as_ref()
                .and_then(|g| g.growth_mib_per_hour)
                .map(|g| format!(", gateway memory {g:+.1} MiB/h"))
                .unwrap_or_default()
        );
        let verdict = if run.interrupted {
            format!("interrupted: {held}")
        } else if goal_met {
            format!("goal met: {held}")
        } else {
            let mut why = broken;
            if !run.errors.is_empty() {
                why.insert(0, "worker or publisher errors".to_owned());
            }
            format!("goal missed: {}; {held}", why.join(", "))
        };

        SoakReport {
            head: Head::new(plan, run, goal_met, verdict, stopped_by),
            thresholds,
            config: SoakConfig {
                connections: plan.subscribers,
                channels: plan.channels,
                namespace: plan.namespace.clone(),
                churn_per_s: plan.churn_rate,
                publications_per_s: plan.rate,
                chat_users: plan.chat_users(),
                warmup_s: plan.warmup.as_secs(),
                fail_on: plan.fail_on.iter().map(Threshold::to_string).collect(),
                layout: Layout::of(plan),
            },
            connections: Connections {
                setups: Users::build(plan.connections(), t),
                attempted: t.attempted,
                success_pct,
                churned: t.churned,
                abnormal_closes,
                peak_open: t.open.peak(),
            },
            publications: publications(plan, run),
            deliveries: deliveries(plan, run),
            latency_ms,
            latency_histogram_us: latency_total,
            offsets: offsets(t),
            chat,
            memory,
            machine: Machine::of(run),
            timeline: SoakTimeline {
                population: timeline(run),
                chat: plan
                    .chat
                    .as_ref()
                    .map(|_| ChatTimeline::build(&t.chat, run)),
                setups: t.setup_series.counts().to_vec(),
                setup_failures: t.failure_series.counts().to_vec(),
                workers: run.worker_series.clone(),
            },
        }
    }
}

impl Report for SoakReport {
    fn head(&self) -> &Head {
        &self.head
    }

    fn target(&self) -> String {
        self.config.layout.urls.join(", ")
    }

    /// The human summary.
    fn render_text(&self) -> String {
        let mut out = String::new();
        self.head.render(&mut out, "nothing went wrong");
        kv(
            &mut out,
            "Thresholds",
            &self
                .thresholds
                .iter()
                .map(|r| {
                    format!(
                        "{:<6} {:<22} measured {}",
                        if r.broken { "BROKEN" } else { "ok" },
                        r.threshold,
                        r.measured.map_or("-".to_owned(), |v| format!(
                            "{}{}",
                            round(v),
                            r.metric.unit()
                        ))
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
        );
        let c = &self.config;
        let l = &c.layout;
        kv(
            &mut out,
            "Setup",
            &format!(
                "{} connections on {} channel{} ({}:0..) {}, churn {}/s, {} publications/s, \
                 {} chat users; {} s (memory trend after {} s)\n{}; sources {}; tokens {}",
                thousands(c.connections),
                c.channels,
                if c.channels == 1 { "" } else { "s" },
                c.namespace,
                l.urls_text(),
                c.churn_per_s,
                c.publications_per_s,
                thousands(c.chat_users),
                l.duration_s,
                c.warmup_s,
                l.processes_text(),
                l.sources,
                l.tokens
            ),
        );
        self.head.render_errors(&mut out);
        let n = &self.connections;
        kv(
            &mut out,
            "Setups",
            &format!(
                "{} attempted, {} ok ({}), {} failed, {} churned; {} unexpected closes, {} of \
                 them abnormal (1006); open at end {} of {}, peak {}{}",
                thousands(n.attempted),
                thousands(n.setups.connected),
                n.success_pct
                    .map_or("-".to_owned(), |s| format!("{s:.3} %")),
                thousands(n.setups.failed),
                thousands(n.churned),
                thousands(n.setups.unexpected_closes),
                thousands(n.abnormal_closes),
                thousands(n.setups.open_at_end),
                thousands(n.setups.target),
                thousands(n.peak_open),
                n.setups.setup_latency_text()
            ),
        );
        n.setups.render_reasons(&mut out);
        render_delivery(
            &mut out,
            &self.publications,
            &self.deliveries,
            &self.latency_ms,
            &self.offsets,
        );
        if let Some(chat) = &self.chat {
            chat.render(&mut out);
        }
        kv(&mut out, "Memory", &memory_text(&self.memory));
        self.machine.render(&mut out);
        out
    }

    fn charts(&self) -> Vec<String> {
        let tl = &self.timeline;
        let p = &tl.population;
        let mut charts = vec![percentile_chart(
            &self.latency_histogram_us,
            "Delivery latency by percentile (publish timestamp -> subscriber receive)",
        )];
        if let (Some(chat), Some(ctl)) = (&self.chat, &tl.chat) {
            charts.extend(chat.charts(ctl));
        }
        charts.push(setup_chart(tl));
        charts.push(open_chart(
            "Open connections (per-second samples)",
            "connections",
            p,
        ));
        charts.extend(delivery_charts(p));
        charts.extend(processes_rss_chart(&p.gateway, &tl.workers));
        charts
    }
}

/// Setups (replacements included), failed setups and closes per second.
fn setup_chart(tl: &SoakTimeline) -> String {
    rate_chart(
        "Connection setups per second (churn included), failures and closes",
        "per second",
        tl.population.slot_ms,
        &[
            ("setups/s", "#1f77b4", &tl.setups, false),
            ("failed/s", "#d62728", &tl.setup_failures, true),
            ("closes/s", "#ff7f0e", &tl.population.closes, true),
        ],
    )
}

/// A value with the precision its size deserves.
fn round(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn memory_text(m: &Memory) -> String {
    let one = |p: &ProcessMemory| {
        let b = |v: Option<u64>| v.map_or("?".to_owned(), |v| bytes(v as f64));
        format!(
            "{}: {} -> {} (peak {}, {} samples); {}",
            p.name,
            b(p.first_bytes),
            b(p.last_bytes),
            b(p.peak_bytes),
            p.samples,
            match (&p.trend, p.growth_mib_per_hour) {
                (Some(t), Some(g)) => format!(
                    "growth {g:+.2} MiB/h over {:.0} s after the warm-up (R² {:.2})",
                    t.span_s, t.r_squared
                ),
                _ => "too few samples after the warm-up for a trend".to_owned(),
            }
        )
    };
    let mut lines: Vec<String> = m.gateway.iter().map(one).collect();
    lines.extend(m.workers.iter().map(one));
    if lines.is_empty() {
        return "not watched: give --pid or --metrics-url (gateway) and --worker-metrics \
                (workers)"
            .to_owned();
    }
    lines.insert(
        0,
        format!("warm-up {:.0} s left out of the trends", m.warmup_s),
    );
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Failure, Stage};
    use crate::publish::PublishTallies;
    use crate::scenario::population::Tallies;
    use crate::scenario::population::test_plan;
    use crate::stats::OffsetTracker;

    /// The plan the tests' tallies were made for.
    fn plan(extra: &[&str]) -> Plan {
        let base = [
            "--connections",
            "100",
            "--chat-users",
            "2",
            "--duration",
            "100",
            "--warmup",
            "20",
            "--rate",
            "1",
        ];
        test_plan("soak", &base, extra)
    }

    /// A 100 s window from t = 1 s: 102 connections, 50 churned and replaced, every
    /// delivery there, 20 chat streams; the gateway grows 1 MiB per 100 s after a
    /// 30 MiB jump in the warm-up; a worker stays flat.
    fn clean() -> RunResult {
        let mut t = Tallies {
            attempted: 152,
            subscribed: 152,
            churned: 50,
            open_at_finish: 102,
            ..Tallies::default()
        };
        t.open.sample(0, 0);
        t.open.sample(1_000, 102);
        for s in 0..100u64 {
            t.setup_series.record(1_000 + s * 1_000, 1);
        }
        let mut o = OffsetTracker::new();
        o.expect("bench:0", Some(1), Some(100));
        for off in 1..=100 {
            o.record("bench:0", off);
            t.latency_us.record(1_000 + off * 1_000, 2_000);
        }
        t.gaps.merge(&o.summary());
        for i in 0..20u64 {
            t.chat.sent += 1;
            t.chat.completed += 1;
            t.chat.first_chunk_us.record(2_000 + i * 1_000, 305_000);
            t.chat.first_overhead_us.record(5_000);
            t.chat.complete_us.record(1_310_000);
            t.chat.complete_overhead_us.record(10_000);
        }
        let gateway: Vec<GatewaySample> = (0..=102u64)
            .map(|s| GatewaySample {
                at_ms: s * 1_000,
                rss_bytes: Some(if s < 10 {
                    (20 << 20) + (s << 22)
                } else {
                    (60 << 20) + s * (1 << 20) / 100
                }),
                connections: None,
            })
            .collect();
        let worker: Vec<GatewaySample> = (0..=102u64)
            .map(|s| GatewaySample {
                at_ms: s * 1_000,
                rss_bytes: Some(30 << 20),
                connections: None,
            })
            .collect();
        let mut p = PublishTallies {
            scheduled: 100,
            sent: 100,
            acked: 100,
            channel_first: vec![Some(1)],
            channel_last: vec![Some(100)],
            channel_acked: vec![100],
            first_sent_ms: Some(1_000),
            last_sent_ms: Some(100_000),
            ..PublishTallies::default()
        };
        p.ack_latency_us.record(900);
        RunResult {
            tallies: t,
            published: p,
            window_started_ms: Some(1_000),
            window_ended_ms: Some(101_000),
            drain_s: Some(0.1),
            drained_fully: true,
            gateway: Some([gateway.first().copied(), None, None, None]),
            gateway_series: gateway,
            worker_series: vec![ProcessSeries {
                url: "http://127.0.0.1:9091/metrics".into(),
                samples: worker,
            }],
            finished_ms: 102_000,
            ..RunResult::default()
        }
    }

    #[test]
    fn a_clean_soak_meets_the_default_thresholds_and_fits_memory_after_warmup() {
        let p = plan(&["--llm-first-token-ms", "300", "--llm-stream-ms", "1000"]);
        let r = SoakReport::build(&p, &clean());
        assert!(r.head.goal_met, "{}", r.head.verdict);
        assert_eq!(r.thresholds.len(), 5);
        assert!(r.thresholds.iter().all(|t| !t.broken));
        assert_eq!(r.connections.success_pct, Some(100.0));
        assert_eq!(r.connections.churned, 50);
        let g = r.memory.gateway.as_ref().unwrap();
        // 1 MiB per 100 s is 36 MiB/h; the warm-up jump is left out.
        let growth = g.growth_mib_per_hour.unwrap();
        assert!((growth - 36.0).abs() < 0.5, "{growth}");
        assert_eq!(g.peak_bytes, Some((60 << 20) + 102 * (1 << 20) / 100));
        let w = &r.memory.workers[0];
        assert_eq!(w.growth_mib_per_hour, Some(0.0));
        let text = r.render_text();
        for part in [
            "goal met: 100 connections for 100 s, 50 churned, 152 setups 100.00 % ok, 0 \
             abnormal closes, 100 deliveries, 20 chat streams completed, gateway memory +36",
            "ok     success<99.9",
            "measured 100%",
            "152 attempted, 152 ok (100.000 %), 0 failed, 50 churned; 0 unexpected closes",
            "gateway: 20.0 MiB -> 61.0 MiB",
            "growth +36.",
            "http://127.0.0.1:9091/metrics: 30.0 MiB -> 30.0 MiB",
            "warm-up 20 s left out",
            "first chunk: p50",
        ] {
            assert!(text.contains(part), "{part:?} missing:\n{text}");
        }
        // A growth bound below the measured growth breaks it.
        let p = plan(&["--fail-on", "growth>10,worker-growth>1"]);
        let r = SoakReport::build(&p, &clean());
        assert!(!r.head.goal_met);
        assert!(r.head.verdict.contains("growth 36."), "{}", r.head.verdict);
        assert!(
            r.head.verdict.contains("(threshold growth>10)"),
            "{}",
            r.head.verdict
        );
        assert!(!r.thresholds[1].broken);
    }

    #[test]
    fn abnormal_closes_failed_setups_and_unmeasured_thresholds_fail() {
        let p = plan(&[]);
        let mut run = clean();
        let dropped = Failure::Dropped {
            stage: Stage::Holding,
            error: None,
        };
        let t = &mut run.tallies;
        t.closed = 1;
        t.closes.add(&dropped.to_string(), 1);
        t.close_limits.add(dropped.limit().label(), 1);
        t.attempted += 1;
        t.failed = 1;
        let refused = Failure::Http(503);
        t.failures.add(&refused.to_string(), 1);
        t.failure_limits.add(refused.limit().label(), 1);
        let r = SoakReport::build(&p, &run);
        assert!(!r.head.goal_met);
        assert_eq!(r.connections.abnormal_closes, 1);
        let broken: Vec<&str> = r
            .thresholds
            .iter()
            .filter(|t| t.broken)
            .map(|t| t.threshold.as_str())
            .collect();
        assert_eq!(broken, vec!["success<99.9", "abnormal>0"]);
        let text = r.render_text();
        for part in [
            "BROKEN success<99.9",
            "close 1006 (no close frame) holding",
            "http 503",
        ] {
            assert!(text.contains(part), "{part:?} missing:\n{text}");
        }
        // Overhead without the stub's timing cannot be measured: broken, not passed.
        let p = plan(&["--fail-on", "overhead-p99>50"]);
        let r = SoakReport::build(&p, &clean());
        assert!(!r.head.goal_met);
        assert!(
            r.head.verdict.contains("overhead-p99 not measured"),
            "{}",
            r.head.verdict
        );
    }

    #[test]
    fn json_and_html_render() {
        let p = plan(&[]);
        let r = SoakReport::build(&p, &clean());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["scenario"], "soak");
        assert_eq!(json["connections"]["churned"], 50);
        assert_eq!(json["connections"]["connected"], 152);
        assert_eq!(json["thresholds"][0]["metric"], "success");
        assert!(
            json["memory"]["gateway"]["growth_mib_per_hour"]
                .as_f64()
                .unwrap()
                > 30.0
        );
        assert!(json["timeline"]["setups"].is_array());
        assert!(json["timeline"]["deliveries"].is_array());
        let html = r.render_html();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(
            html.matches("<svg").count() >= 10,
            "{}",
            html.matches("<svg").count()
        );
        assert!(!html.contains("<script") && !html.contains("NaN"));
    }
}
