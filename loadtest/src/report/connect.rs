//! The `connect` scenario's report: built once from the merged worker tallies (idle
//! connections of the population engine) and the gateway readings, then rendered as the human summary, as JSON (`--json`) and as a
//! self-contained HTML page with inline SVG charts (`--html`).

use serde::Serialize;

use super::chart::{level_chart, percentile_chart, rate_chart, rss_chart};
pub use super::{Finding, Latency, ReasonCount};
use super::{
    Head, Report, allowed, bytes, kv, latency_of, latency_row, nonzero_counts, per_second,
    reason_rows, reasons, rss_text, span_ms, stopped_by, thousands,
};
use crate::probe::GatewaySample;
use crate::scenario::population::{Plan, RunResult};
use crate::stats::Histogram;

/// Growth per connection below which the figure cannot be real: a connection's socket
/// buffers and state alone take more, so the allocator reused memory of earlier runs.
const IMPLAUSIBLE_RSS_PER_CONNECTION: f64 = 512.0;

#[derive(Debug, Serialize)]
pub struct ConnectReport {
    /// Goal: all connections opened and held (within --allow-failures), nothing
    /// interrupted; `stopped_by`: the limits the failures point to, most frequent first.
    #[serde(flatten)]
    pub head: Head,
    pub config: Config,
    pub connections: Connections,
    pub connect_rate: ConnectRate,
    /// TCP connect start to `authenticated`, milliseconds.
    pub latency_ms: Option<Latency>,
    /// The raw latency data (microseconds), mergeable with other runs' histograms.
    pub latency_histogram_us: Histogram,
    pub hold: Hold,
    pub gateway: Option<Gateway>,
    /// SYNs dropped on full listen queues during the run (system-wide kernel counter;
    /// on loopback, the gateway's accept queue). Each delays its client by a SYN
    /// retransmission (1 s), which shows at the top of the latency distribution.
    pub listen_overflows: Option<u64>,
    pub timeline: Timeline,
}

#[derive(Debug, Serialize)]
pub struct Config {
    pub url: String,
    pub connections: u64,
    /// 0 = unlimited.
    pub rate_per_s: f64,
    pub concurrency: u64,
    pub hold_s: u64,
    pub timeout_s: u64,
    pub processes: u32,
    pub sources: String,
    pub sources_automatic: bool,
    pub tokens: String,
    pub fd_limit: u64,
    pub ephemeral_ports: u64,
    pub allow_failures_pct: f64,
}

#[derive(Debug, Serialize)]
pub struct Connections {
    pub target: u64,
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    pub aborted: u64,
    pub not_attempted: u64,
    pub failures: Vec<ReasonCount>,
}

#[derive(Debug, Serialize)]
pub struct ConnectRate {
    /// Successful connects per second from the first attempt to the last outcome.
    pub achieved_per_s: f64,
    /// Most successful connects in any one-second slot.
    pub peak_1s_per_s: f64,
    pub connect_phase_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Hold {
    pub requested_s: u64,
    pub held_s: Option<f64>,
    pub open_at_end: u64,
    pub peak_open: u64,
    pub unexpected_closes: u64,
    pub by_reason: Vec<ReasonCount>,
}

#[derive(Debug, Serialize)]
pub struct Gateway {
    pub before: Option<GatewaySample>,
    /// At the end of the hold, every connection open and idle.
    pub held: Option<GatewaySample>,
    pub after: Option<GatewaySample>,
    pub rss_growth_bytes: Option<i64>,
    pub connections_added: Option<u64>,
    /// `gateway` (its own gauge) or `generator` (our open count).
    pub connections_counted_by: &'static str,
    pub rss_per_connection_bytes: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Timeline {
    pub slot_ms: u64,
    pub open: Vec<u64>,
    pub connects: Vec<u64>,
    pub failures: Vec<u64>,
    pub drops: Vec<u64>,
    pub gateway: Vec<GatewaySample>,
}

/// Readings before the run, at the end of the hold (after the window: nothing to
/// drain) and after closing.
fn gateway_of(samples: [Option<GatewaySample>; 4], open_when_held: u64) -> Gateway {
    let [before, _, held, after] = samples;
    let rss = |s: Option<GatewaySample>| s.and_then(|s| s.rss_bytes);
    let conns = |s: Option<GatewaySample>| s.and_then(|s| s.connections);
    let rss_growth_bytes = match (rss(before), rss(held)) {
        (Some(b), Some(h)) => {
            Some(i64::try_from(h).unwrap_or(i64::MAX) - i64::try_from(b).unwrap_or(0))
        }
        _ => None,
    };
    let (connections_added, connections_counted_by) = match (conns(before), conns(held)) {
        (Some(b), Some(h)) => (Some(h.saturating_sub(b)), "gateway"),
        _ => (held.map(|_| open_when_held), "generator"),
    };
    let rss_per_connection_bytes = match (rss_growth_bytes, connections_added) {
        (Some(g), Some(n)) if n > 0 => Some(g as f64 / n as f64),
        _ => None,
    };
    Gateway {
        before,
        held,
        after,
        rss_growth_bytes,
        connections_added,
        connections_counted_by,
        rss_per_connection_bytes,
    }
}

impl ConnectReport {
    pub fn build(plan: &Plan, f: &RunResult) -> ConnectReport {
        let t = &f.tallies;
        let total = plan.connections();
        let ok = t.subscribed;

        let span_ms = span_ms(t.first_attempt_ms, t.last_outcome_ms);
        let connect_rate = ConnectRate {
            achieved_per_s: per_second(ok, span_ms),
            peak_1s_per_s: t.setup_series.peak_rate(1),
            connect_phase_s: span_ms as f64 / 1000.0,
        };

        let dropped = t.closed;
        let missed = total.saturating_sub(ok) + dropped;
        let goal_met = !f.interrupted
            && f.errors.is_empty()
            && missed as f64 <= allowed(plan.allow_failures_pct, total);
        let hold_ms = u64::try_from(plan.duration.as_millis()).unwrap_or(u64::MAX);
        let held_s = f
            .window_started_ms
            .map(|s| f.window_ended_ms.unwrap_or(f.finished_ms).saturating_sub(s))
            .map(|ms| ms.min(hold_ms) as f64 / 1000.0);
        let verdict = if f.interrupted {
            format!(
                "interrupted: {}/{} connections opened",
                thousands(ok),
                thousands(total)
            )
        } else if goal_met && missed == 0 {
            format!(
                "goal met: {}/{} connections opened and held {:.1} s",
                thousands(ok),
                thousands(total),
                held_s.unwrap_or(0.0)
            )
        } else if goal_met {
            format!(
                "goal met within --allow-failures {}%: {}/{} opened, {} failed, {} dropped while held",
                plan.allow_failures_pct,
                thousands(ok),
                thousands(total),
                thousands(t.failed),
                thousands(dropped)
            )
        } else {
            format!(
                "goal missed: {}/{} opened, {} failed, {} dropped while held{}",
                thousands(ok),
                thousands(total),
                thousands(t.failed),
                thousands(dropped),
                if f.errors.is_empty() {
                    ""
                } else {
                    "; worker errors"
                }
            )
        };

        ConnectReport {
            head: Head::new(plan, f, goal_met, verdict, stopped_by(t, [])),
            config: Config {
                url: plan.urls[0].clone(),
                connections: total,
                rate_per_s: plan.connect_rate,
                concurrency: plan.concurrency,
                hold_s: plan.duration.as_secs(),
                timeout_s: plan.timeout.as_secs(),
                processes: plan.processes,
                sources: plan.sources.describe(),
                sources_automatic: plan.sources.automatic,
                tokens: plan.tokens_described.clone(),
                fd_limit: plan.fd_limit,
                ephemeral_ports: plan.ports,
                allow_failures_pct: plan.allow_failures_pct,
            },
            connections: Connections {
                target: total,
                attempted: t.attempted,
                ok,
                failed: t.failed,
                aborted: t.aborted,
                not_attempted: total.saturating_sub(t.attempted + t.aborted),
                failures: reasons(&t.failures),
            },
            connect_rate,
            latency_ms: latency_of(&t.setup_latency_us),
            latency_histogram_us: t.setup_latency_us.clone(),
            hold: Hold {
                requested_s: plan.duration.as_secs(),
                held_s,
                open_at_end: t.open_at_finish,
                peak_open: t.open.peak(),
                unexpected_closes: dropped,
                by_reason: reasons(&t.closes),
            },
            gateway: f.gateway.map(|g| gateway_of(g, f.open_at_window_end)),
            listen_overflows: f.listen_overflows,
            timeline: Timeline {
                slot_ms: crate::stats::series::SLOT_MS,
                open: t.open.levels(),
                connects: t.setup_series.counts().to_vec(),
                failures: t.failure_series.counts().to_vec(),
                drops: t.close_series.counts().to_vec(),
                gateway: f.gateway_series.clone(),
            },
        }
    }
}

impl Report for ConnectReport {
    fn head(&self) -> &Head {
        &self.head
    }

    fn target(&self) -> String {
        self.config.url.clone()
    }

    /// The human summary (stdout).
    fn render_text(&self) -> String {
        let mut out = String::new();
        out.push('\n');
        out.push_str(&format!("== loadtest connect: {} ==\n", self.config.url));
        self.head
            .render(&mut out, "nothing: no connection failed or dropped");
        self.head.render_errors(&mut out);
        let c = &self.config;
        kv(
            &mut out,
            "Setup",
            &format!(
                "{} process{} (fd limit {}), concurrency {}, rate {}, timeout {} s\n\
                 sources: {}; tokens: {}",
                c.processes,
                if c.processes == 1 { "" } else { "es" },
                thousands(c.fd_limit),
                c.concurrency,
                if c.rate_per_s > 0.0 {
                    format!("{}/s", c.rate_per_s)
                } else {
                    "unlimited".to_owned()
                },
                c.timeout_s,
                c.sources,
                c.tokens
            ),
        );
        out.push('\n');

        let n = &self.connections;
        kv(
            &mut out,
            "Connections",
            &format!(
                "target {}  attempted {}  ok {}  failed {}{}",
                thousands(n.target),
                thousands(n.attempted),
                thousands(n.ok),
                thousands(n.failed),
                nonzero_counts(&[("aborted", n.aborted), ("not attempted", n.not_attempted)]),
            ),
        );
        reason_rows(&mut out, "Failures", &n.failures);
        let r = &self.connect_rate;
        kv(
            &mut out,
            "Connect rate",
            &format!(
                "{}/s achieved over {:.2} s (peak 1 s slot: {}/s)",
                thousands(r.achieved_per_s.round() as u64),
                r.connect_phase_s,
                thousands(r.peak_1s_per_s.round() as u64)
            ),
        );
        latency_row(
            &mut out,
            "Latency (ms)",
            &self.latency_ms,
            "TCP connect start -> authenticated",
            "no connection succeeded",
        );
        if let Some(n) = self.listen_overflows.filter(|n| *n > 0) {
            kv(
                &mut out,
                "Listen queue",
                &format!(
                    "{} SYNs dropped on a full listen queue during the run (kernel \
                     TcpExtListenOverflows): each cost its client a 1 s SYN retransmission;\n\
                     the gateway's listen backlog (`ss -ltn`, Send-Q) is smaller than the \
                     bursts of --concurrency {}",
                    thousands(n),
                    self.config.concurrency
                ),
            );
        }
        let h = &self.hold;
        kv(
            &mut out,
            "Hold",
            &format!(
                "{} open when the hold ended ({}, requested {} s); peak open {}; \
                 unexpected closes {}",
                thousands(h.open_at_end),
                match h.held_s {
                    Some(s) => format!("held {s:.1} s"),
                    None => "hold never started".to_owned(),
                },
                h.requested_s,
                thousands(h.peak_open),
                thousands(h.unexpected_closes)
            ),
        );
        reason_rows(&mut out, "Closes", &h.by_reason);
        if let Some(g) = &self.gateway {
            kv(&mut out, "Gateway", &gateway_text(g));
        }
        out
    }

    fn charts(&self) -> Vec<String> {
        let tl = &self.timeline;
        let mut charts = vec![
            percentile_chart(
                &self.latency_histogram_us,
                "Handshake latency by percentile (TCP connect -> authenticated)",
            ),
            level_chart(
                "Open connections (per-second samples)",
                "connections",
                "open",
                &tl.open,
                tl.slot_ms,
            ),
            rate_chart(
                "Connect rate",
                "per second",
                tl.slot_ms,
                &[
                    ("connects/s", "#1f77b4", &tl.connects, false),
                    ("failures/s", "#d62728", &tl.failures, true),
                    ("drops/s", "#ff7f0e", &tl.drops, true),
                ],
            ),
        ];
        charts.extend(rss_chart(
            "Gateway resident memory",
            &[("RSS", &tl.gateway)],
        ));
        charts
    }
}

fn gateway_text(g: &Gateway) -> String {
    let conns = |s: &Option<GatewaySample>| {
        s.and_then(|s| s.connections)
            .map_or(String::new(), |c| format!(" ({} conns)", thousands(c)))
    };
    let mut text = format!(
        "RSS before {}{}, held {}{}, after close {}{}",
        rss_text(&g.before),
        conns(&g.before),
        rss_text(&g.held),
        conns(&g.held),
        rss_text(&g.after),
        conns(&g.after)
    );
    match (
        g.rss_growth_bytes,
        g.connections_added,
        g.rss_per_connection_bytes,
    ) {
        (Some(growth), Some(added), Some(per)) => text.push_str(&format!(
            "\n{} for {} connections (counted by the {}): {} per connection",
            bytes(growth as f64),
            thousands(added),
            g.connections_counted_by,
            bytes(per)
        )),
        _ => {
            text.push_str("\nRSS per connection: not available (no reading, or no connection held)")
        }
    }
    if g.rss_per_connection_bytes
        .is_some_and(|per| per < IMPLAUSIBLE_RSS_PER_CONNECTION)
    {
        text.push_str(
            "\n(RSS barely grew: the gateway reused memory freed by an earlier run; \
             measure against a freshly started gateway)",
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::client::Failure;
    use crate::scenario::population::{Tallies, test_plan};

    fn plan(extra: &[&str]) -> Plan {
        test_plan("connect", &["--connections", "100"], extra)
    }

    fn tallies(ok: u64, failed: u64) -> Tallies {
        let mut t = Tallies::default();
        let mut partial = Tallies::default();
        for i in 0..ok {
            partial.setup_latency_us.record(1000 + i * 10);
            partial.setup_series.record(i * 10, 1);
        }
        partial.attempted = ok + failed;
        partial.subscribed = ok;
        partial.failed = failed;
        partial.first_attempt_ms = Some(0);
        partial.last_outcome_ms = Some(500);
        if failed > 0 {
            let f = Failure::Closed {
                code: 4509,
                error: Some("CONNECTION_LIMIT".into()),
            };
            partial.failures.add(&f.to_string(), failed);
            partial.failure_limits.add(f.limit().label(), failed);
        }
        partial.open.sample(0, 0);
        partial.open.sample(1000, ok);
        partial.open_at_finish = ok;
        t.merge(&partial);
        t
    }

    fn facts(t: &Tallies) -> RunResult {
        RunResult {
            tallies: t.clone(),
            window_started_ms: Some(1000),
            window_ended_ms: Some(6000),
            open_at_window_end: t.subscribed,
            gateway: Some([
                Some(GatewaySample {
                    at_ms: 0,
                    rss_bytes: Some(10 << 20),
                    connections: Some(0),
                }),
                None,
                Some(GatewaySample {
                    at_ms: 6000,
                    rss_bytes: Some((10 << 20) + 100 * 4096),
                    connections: Some(100),
                }),
                None,
            ]),
            listen_overflows: Some(0),
            finished_ms: 7000,
            ..RunResult::default()
        }
    }

    #[test]
    fn a_clean_run_meets_its_goal() {
        let p = plan(&[]);
        let t = tallies(100, 0);
        let r = ConnectReport::build(&p, &facts(&t));
        assert!(r.head.goal_met, "{}", r.head.verdict);
        assert!(r.head.stopped_by.is_empty());
        assert_eq!(r.connect_rate.achieved_per_s, 200.0);
        let g = r.gateway.as_ref().unwrap();
        assert_eq!(g.rss_per_connection_bytes, Some(4096.0));
        assert_eq!(g.connections_counted_by, "gateway");
        let text = r.render_text();
        for part in [
            "goal met",
            "4.0 KiB per connection",
            "p99",
            "nothing: no connection failed",
        ] {
            assert!(text.contains(part), "{part:?} missing:\n{text}");
        }
    }

    #[test]
    fn failures_miss_the_goal_and_name_the_limit() {
        let p = plan(&[]);
        let t = tallies(90, 10);
        let r = ConnectReport::build(&p, &facts(&t));
        assert!(!r.head.goal_met);
        assert_eq!(r.head.stopped_by[0].limit, "per_user_limit");
        assert_eq!(
            r.connections.failures[0].reason,
            "close 4509 CONNECTION_LIMIT"
        );
        let text = r.render_text();
        assert!(text.contains("SB_MAX_CONNECTIONS_PER_USER"), "{text}");
        assert!(!text.contains("Listen queue"));
        let mut f = facts(&t);
        f.listen_overflows = Some(12);
        let text = ConnectReport::build(&p, &f).render_text();
        assert!(text.contains("12 SYNs dropped"), "{text}");
        // Tolerated with --allow-failures 10.
        let p = plan(&["--allow-failures", "10"]);
        assert!(ConnectReport::build(&p, &facts(&t)).head.goal_met);
    }

    #[test]
    fn interrupted_or_broken_runs_miss_the_goal() {
        let p = plan(&[]);
        let t = tallies(100, 0);
        let mut f = facts(&t);
        f.interrupted = true;
        assert!(!ConnectReport::build(&p, &f).head.goal_met);
        let mut f = facts(&t);
        f.errors.push("worker 1 ended without results".into());
        assert!(!ConnectReport::build(&p, &f).head.goal_met);
    }

    #[test]
    fn json_and_html_render() {
        let p = plan(&[]);
        let t = tallies(100, 3);
        let r = ConnectReport::build(&p, &facts(&t));
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["connections"]["ok"], 100);
        assert!(json["latency_ms"]["p99"].as_f64().unwrap() > 1.0);
        assert!(json["latency_histogram_us"]["buckets"].is_array());
        assert_eq!(json["gateway"]["rss_per_connection_bytes"], 4096.0);
        let html = r.render_html();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert_eq!(html.matches("<svg").count(), 3);
        assert!(
            !html.contains("<script") && !html.contains("src="),
            "no external assets"
        );
        assert_eq!(
            html.matches("http").count(),
            html.matches("xmlns=\"http://www.w3.org/2000/svg\"").count(),
            "the only URLs are SVG namespaces"
        );
    }

    #[test]
    fn empty_run_renders() {
        let p = plan(&[]);
        let t = Tallies::default();
        let mut f = facts(&t);
        f.gateway = None;
        f.window_started_ms = None;
        let r = ConnectReport::build(&p, &f);
        assert!(!r.head.goal_met);
        assert!(r.latency_ms.is_none());
        assert!(r.render_text().contains("no connection succeeded"));
        assert!(r.render_html().contains("</html>"));
    }
}
