//! The `broadcast` scenario's report: built once from the merged worker tallies, the
//! publisher's tallies and the process readings, then rendered as the human summary,
//! as JSON (`--json`) and as a self-contained HTML page (`--html`).

use serde::Serialize;

use super::chart::{level_chart, p50_p99_chart, percentile_chart, rate_chart, rss_chart};
use super::{
    Finding, Head, Latency, ReasonCount, Report, allowance_text, allowed, bytes,
    connection_problems, kv, latency_of, latency_row, millis, nonzero_counts, per_second,
    quantiles_ms, reason_rows, reasons, rss_text, seconds, setup_latency_text, span_ms, stopped_by,
    thousands,
};
use crate::cli::PublishVia;
use crate::payload;
use crate::probe::{CpuSeconds, CpuUse, GatewaySample};
use crate::scenario::population::{Plan, RunResult, Tallies};
use crate::stats::Histogram;
use crate::stats::series::SLOT_MS;

/// Share of the target publication rate below which the verdict says the publisher,
/// not the schedule, set the pace.
const SLOW_PUBLISHER: f64 = 0.9;

#[derive(Debug, Serialize)]
pub struct BroadcastReport {
    /// Goal: every subscriber subscribed and stayed, every publication acknowledged,
    /// every acknowledged publication delivered once to every subscriber of its
    /// channel (failures within --allow-failures), nothing interrupted.
    #[serde(flatten)]
    pub head: Head,
    pub config: Config,
    pub subscribers: Subscribers,
    pub publications: Publications,
    pub deliveries: Deliveries,
    /// Publish timestamp (in the payload) to receipt by a subscriber, milliseconds,
    /// over every timed delivery of every subscriber.
    pub latency_ms: Option<Latency>,
    /// The raw latency data (microseconds), mergeable with other runs' histograms.
    pub latency_histogram_us: Histogram,
    pub offsets: Offsets,
    #[serde(flatten)]
    pub machine: Machine,
    pub timeline: Timeline,
}

#[derive(Debug, Serialize)]
pub struct Config {
    pub api_urls: Vec<String>,
    pub publish_via: &'static str,
    pub subscribers: u64,
    pub channels: u64,
    pub namespace: String,
    pub rate_per_s: f64,
    pub payload_bytes: usize,
    pub publishers: u32,
    #[serde(flatten)]
    pub layout: Layout,
}

/// How a population run was laid out (every population scenario's config has it).
#[derive(Debug, Serialize)]
pub struct Layout {
    pub urls: Vec<String>,
    /// The window, seconds.
    pub duration_s: u64,
    pub concurrency: u64,
    pub timeout_s: u64,
    pub drain_s: u64,
    pub processes: u32,
    pub sources: String,
    pub tokens: String,
    pub fd_limit: u64,
    pub allow_failures_pct: f64,
}

impl Layout {
    pub fn of(plan: &Plan) -> Layout {
        Layout {
            urls: plan.urls.clone(),
            duration_s: plan.duration.as_secs(),
            concurrency: plan.concurrency,
            timeout_s: plan.timeout.as_secs(),
            drain_s: plan.drain.as_secs(),
            processes: plan.processes,
            sources: plan.sources.describe(),
            tokens: plan.tokens_described.clone(),
            fd_limit: plan.fd_limit,
            allow_failures_pct: plan.allow_failures_pct,
        }
    }

    /// `2 processes (open-file limit 20000), concurrency 100`.
    pub fn processes_text(&self) -> String {
        format!(
            "{} process{} (open-file limit {}), concurrency {}",
            self.processes,
            if self.processes == 1 { "" } else { "es" },
            self.fd_limit,
            self.concurrency
        )
    }

    /// `over 3 gateway URLs`.
    pub fn urls_text(&self) -> String {
        format!(
            "over {} gateway URL{}",
            self.urls.len(),
            if self.urls.len() == 1 { "" } else { "s" }
        )
    }
}

/// What the processes took: CPU over the window, and the gateway's memory at the
/// run's milestones.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: Option<CpuUse>,
    pub gateway: Option<GatewayMemory>,
}

impl Machine {
    pub fn of(run: &RunResult) -> Machine {
        Machine {
            cpu: run.cpu.clone(),
            gateway: run
                .gateway
                .map(|[before, subscribed, drained, after]| GatewayMemory {
                    before,
                    subscribed,
                    drained,
                    after,
                }),
        }
    }

    /// The `CPU` and `Gateway RSS` rows, when they were measured.
    pub fn render(&self, out: &mut String) {
        if let Some(cpu) = &self.cpu {
            kv(out, "CPU", &cpu_text(cpu));
        }
        if let Some(g) = &self.gateway {
            kv(out, "Gateway RSS", &gateway_text(g));
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Subscribers {
    pub target: u64,
    pub attempted: u64,
    pub subscribed: u64,
    pub failed: u64,
    pub aborted: u64,
    pub not_attempted: u64,
    pub failures: Vec<ReasonCount>,
    /// TCP connect start to `subscribed`.
    pub setup_latency_ms: Option<Latency>,
    /// Closed or dropped by the server after `subscribed` (e.g. 4008 slow consumer).
    pub unexpected_closes: u64,
    pub closes: Vec<ReasonCount>,
    pub open_at_end: u64,
    pub peak_open: u64,
}

#[derive(Debug, Serialize)]
pub struct ChannelOffsets {
    pub channel: String,
    pub subscribers: u64,
    pub acked: u64,
    pub first_offset: Option<u64>,
    pub last_offset: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Publications {
    pub scheduled: u64,
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub failures: Vec<ReasonCount>,
    pub target_per_s: f64,
    /// Sent per second from the first send to the last.
    pub achieved_per_s: f64,
    pub window_s: f64,
    /// Send to acknowledgement.
    pub ack_latency_ms: Option<Latency>,
    /// Most the sends fell behind the schedule (every publisher connection busy).
    pub max_lag_ms: u64,
    pub late: u64,
    /// Publisher WebSocket connections the gateway ended (e.g. 4029 over its
    /// per-connection message rate).
    pub connection_ends: Vec<ReasonCount>,
    pub channels: Vec<ChannelOffsets>,
}

#[derive(Debug, Serialize)]
pub struct PerSubscriber {
    /// Subscribers that stayed to the end.
    pub count: u64,
    pub mean_per_s: f64,
    pub min_per_s: f64,
    pub p50_per_s: f64,
    pub max_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Deliveries {
    /// `message` frames received on the subscribed channels, duplicates included.
    pub total: u64,
    /// Offsets the subscribers should have received: distinct received plus missing.
    pub expected: u64,
    pub target_per_s: f64,
    /// Deliveries per second from the start of publishing to the last delivery (at
    /// least the publishing time).
    pub achieved_per_s: f64,
    pub span_s: f64,
    /// Deliveries per second over the whole seconds inside the publishing window.
    pub steady_per_s: Option<f64>,
    pub peak_1s_per_s: f64,
    pub per_subscriber: Option<PerSubscriber>,
    /// Time from the end of publishing until every subscriber had everything (or the
    /// --drain limit).
    pub drain_s: Option<f64>,
    pub drained: bool,
    /// Deliveries without a publish timestamp (someone else's publications).
    pub untimed: u64,
    /// Frames on channels not subscribed to, or unreadable.
    pub stray_frames: u64,
}

#[derive(Debug, Serialize)]
pub struct Offsets {
    /// One stream per subscriber that subscribed.
    pub streams: u64,
    pub received: u64,
    pub duplicates: u64,
    pub missing: u64,
    pub gap_count: u64,
    pub streams_with_problems: u64,
    /// A few subscribers with gaps or duplicates, with their offsets.
    pub examples: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct GatewayMemory {
    pub before: Option<GatewaySample>,
    /// Every subscriber subscribed, nothing published yet.
    pub subscribed: Option<GatewaySample>,
    /// At the end of the drain.
    pub drained: Option<GatewaySample>,
    pub after: Option<GatewaySample>,
}

#[derive(Debug, Serialize)]
pub struct Timeline {
    pub slot_ms: u64,
    pub publish_start_s: Option<f64>,
    pub publish_end_s: Option<f64>,
    pub published: Vec<u64>,
    pub acked: Vec<u64>,
    /// Timed deliveries per second.
    pub deliveries: Vec<u64>,
    pub latency_p50_ms: Vec<Option<f64>>,
    pub latency_p99_ms: Vec<Option<f64>>,
    pub open: Vec<u64>,
    pub closes: Vec<u64>,
    pub gateway: Vec<GatewaySample>,
}

/// What went wrong with publishing and delivery.
pub fn delivery_findings(plan: &Plan, run: &RunResult) -> Vec<Finding> {
    let p = &run.published;
    let gaps = run.tallies.gaps;
    let mut found = Vec::new();
    if p.failed > 0 {
        found.push(Finding::new(
            "publish_failed",
            p.failed,
            match plan.via {
                PublishVia::Api => {
                    "publications failed (see Publications): 401 is a wrong --api-key, \
                     503 a gateway that lost Redis or NATS, timeouts a saturated gateway"
                }
                PublishVia::Client => {
                    "publications failed (see Publications): RATE_LIMITED is the gateway's \
                     per-connection limit (run it with SB_MESSAGE_RATE and \
                     SB_MESSAGE_BURST raised, or give more --publishers), FORBIDDEN a \
                     namespace missing from SB_PUBLIC_NAMESPACES"
                }
            },
        ));
    }
    if gaps.missing > 0 {
        found.push(Finding::new(
            if run.drained_fully { "gaps" } else { "behind" },
            gaps.missing,
            if run.drained_fully {
                "acknowledged publications never reached some subscribers (see Offsets)"
            } else {
                "subscribers had not received everything when --drain ran out: the \
                 gateway (or the generator) fell behind the publication rate; lower \
                 --rate or raise --drain to see whether it catches up"
            },
        ));
    }
    if gaps.duplicates > 0 {
        found.push(Finding::new(
            "duplicates",
            gaps.duplicates,
            "some offsets reached a subscriber more than once (see Offsets)",
        ));
    }
    found
}

/// The publisher's side.
pub fn publications(plan: &Plan, run: &RunResult) -> Publications {
    let p = &run.published;
    let publish_span_ms = span_ms(p.first_sent_ms, p.last_sent_ms);
    // Sends are due at 0, 1/R, ..., so n sends span (n-1)/R seconds.
    let achieved_per_s = if p.sent > 1 {
        (p.sent - 1) as f64 * 1000.0 / publish_span_ms as f64
    } else {
        0.0
    };
    let channels = plan
        .channel_names()
        .into_iter()
        .enumerate()
        .map(|(k, name)| ChannelOffsets {
            channel: name,
            subscribers: plan.subscribers_on(k as u64),
            acked: p.channel_acked.get(k).copied().unwrap_or(0),
            first_offset: p.channel_first.get(k).copied().flatten(),
            last_offset: p.channel_last.get(k).copied().flatten(),
        })
        .collect();
    Publications {
        scheduled: p.scheduled,
        sent: p.sent,
        acked: p.acked,
        failed: p.failed,
        failures: reasons(&p.failures),
        target_per_s: plan.rate,
        achieved_per_s,
        window_s: publish_span_ms as f64 / 1000.0,
        ack_latency_ms: latency_of(&p.ack_latency_us),
        max_lag_ms: p.max_lag_ms,
        late: p.late,
        connection_ends: reasons(&p.connection_ends),
        channels,
    }
}

/// The subscribers' side of delivery.
pub fn deliveries(plan: &Plan, run: &RunResult) -> Deliveries {
    let t = &run.tallies;
    // From the start of publishing to the last delivery, but at least the publishing
    // time: publication n-1 is due 1/R before the end, so a gateway that keeps up
    // delivers everything slightly before `duration` has passed.
    let delivery_span_ms = match (run.window_started_ms, t.last_delivery_ms) {
        (Some(a), Some(b)) => b
            .saturating_sub(a)
            .max(u64::try_from(plan.duration.as_millis()).unwrap_or(u64::MAX)),
        _ => 0,
    };
    let counts = t.latency_us.counts();
    let steady_per_s = match (run.window_started_ms, run.window_ended_ms) {
        (Some(a), Some(b)) => {
            let from = a.div_ceil(SLOT_MS) as usize;
            let to = (b / SLOT_MS) as usize;
            (to >= from + 2).then(|| counts.rate(from, to))
        }
        _ => None,
    };
    let per_subscriber = (t.per_subscriber.count() > 0 && delivery_span_ms > 0).then(|| {
        let per_s = |v: u64| v as f64 * 1000.0 / delivery_span_ms as f64;
        PerSubscriber {
            count: t.per_subscriber.count(),
            mean_per_s: t.per_subscriber.mean().unwrap_or(0.0) * 1000.0 / delivery_span_ms as f64,
            min_per_s: per_s(t.per_subscriber.min().unwrap_or(0)),
            p50_per_s: per_s(t.per_subscriber.quantile(0.5).unwrap_or(0)),
            max_per_s: per_s(t.per_subscriber.max().unwrap_or(0)),
        }
    });
    let gaps = t.gaps;
    Deliveries {
        total: gaps.received,
        expected: (gaps.received - gaps.duplicates) + gaps.missing,
        target_per_s: plan.target_deliveries_per_s(),
        achieved_per_s: per_second(gaps.received, delivery_span_ms),
        span_s: delivery_span_ms as f64 / 1000.0,
        steady_per_s,
        peak_1s_per_s: counts.peak_rate(1),
        per_subscriber,
        drain_s: run.drain_s,
        drained: run.drained_fully,
        untimed: t.untimed,
        stray_frames: t.stray_frames,
    }
}

/// Gaps and duplicates over every subscriber's stream.
pub fn offsets(t: &Tallies) -> Offsets {
    let gaps = t.gaps;
    Offsets {
        streams: gaps.streams,
        received: gaps.received,
        duplicates: gaps.duplicates,
        missing: gaps.missing,
        gap_count: gaps.gap_count,
        streams_with_problems: gaps.streams_with_problems,
        examples: t.problems.clone(),
    }
}

/// The per-second series of the run.
pub fn timeline(run: &RunResult) -> Timeline {
    let t = &run.tallies;
    let p = &run.published;
    Timeline {
        slot_ms: SLOT_MS,
        publish_start_s: seconds(run.window_started_ms),
        publish_end_s: seconds(run.window_ended_ms),
        published: p.sent_series.counts().to_vec(),
        acked: p.acked_series.counts().to_vec(),
        deliveries: t.latency_us.counts().counts().to_vec(),
        latency_p50_ms: quantiles_ms(&t.latency_us, 0.5),
        latency_p99_ms: quantiles_ms(&t.latency_us, 0.99),
        open: t.open.levels(),
        closes: t.close_series.counts().to_vec(),
        gateway: run.gateway_series.clone(),
    }
}

impl BroadcastReport {
    pub fn build(plan: &Plan, run: &RunResult) -> BroadcastReport {
        let t = &run.tallies;
        let p = &run.published;
        let latency_total = t.latency_us.total();
        let gaps = t.gaps;
        let publications = publications(plan, run);

        let lost_subscribers = plan.subscribers.saturating_sub(t.subscribed) + t.closed;
        let goal_met = !run.interrupted
            && run.errors.is_empty()
            && lost_subscribers as f64 <= allowed(plan.allow_failures_pct, plan.subscribers)
            && p.failed as f64 <= allowed(plan.allow_failures_pct, p.scheduled)
            && p.acked > 0
            && gaps.missing == 0
            && gaps.duplicates == 0;
        let verdict = if run.interrupted {
            format!(
                "interrupted: {} deliveries of {} publications",
                thousands(gaps.received),
                thousands(p.acked)
            )
        } else if goal_met {
            format!(
                "goal met: {} subscribers received {} publications ({} deliveries), no gap, \
                 no duplicate{}{}",
                thousands(t.subscribed - t.closed),
                thousands(p.acked),
                thousands(gaps.received),
                allowance_text(
                    plan.allow_failures_pct,
                    (lost_subscribers, "subscribers"),
                    (p.failed, "publications")
                ),
                if publications.achieved_per_s < SLOW_PUBLISHER * plan.rate {
                    format!(
                        "; but the publisher reached only {:.1}/s of {}/s (the \
                         gateway acknowledged too slowly for --publishers {})",
                        publications.achieved_per_s, plan.rate, plan.publishers
                    )
                } else {
                    String::new()
                }
            )
        } else {
            let mut why = connection_problems(
                run,
                plan.subscribers,
                "subscribed",
                "worker or publisher errors",
            );
            if p.failed > 0 {
                why.push(format!("{} publications failed", thousands(p.failed)));
            }
            if p.acked == 0 {
                why.push("no publication acknowledged".to_owned());
            }
            if gaps.missing > 0 {
                why.push(format!(
                    "{} deliveries missing{}",
                    thousands(gaps.missing),
                    if run.drained_fully {
                        ""
                    } else {
                        " (not caught up within --drain)"
                    }
                ));
            }
            if gaps.duplicates > 0 {
                why.push(format!("{} duplicates", thousands(gaps.duplicates)));
            }
            format!("goal missed: {}", why.join(", "))
        };

        BroadcastReport {
            head: Head::new(
                plan,
                run,
                goal_met,
                verdict,
                stopped_by(t, delivery_findings(plan, run)),
            ),
            config: Config {
                api_urls: plan.api_urls.iter().map(|u| u.to_string()).collect(),
                publish_via: match plan.via {
                    PublishVia::Api => "api",
                    PublishVia::Client => "client",
                },
                subscribers: plan.subscribers,
                channels: plan.channels,
                namespace: plan.namespace.clone(),
                rate_per_s: plan.rate,
                payload_bytes: payload::data_len(plan.payload_bytes),
                publishers: plan.publishers,
                layout: Layout::of(plan),
            },
            subscribers: Subscribers {
                target: plan.subscribers,
                attempted: t.attempted,
                subscribed: t.subscribed,
                failed: t.failed,
                aborted: t.aborted,
                not_attempted: plan.subscribers.saturating_sub(t.attempted + t.aborted),
                failures: reasons(&t.failures),
                setup_latency_ms: latency_of(&t.setup_latency_us),
                unexpected_closes: t.closed,
                closes: reasons(&t.closes),
                open_at_end: t.open_at_finish,
                peak_open: t.open.peak(),
            },
            publications,
            deliveries: deliveries(plan, run),
            latency_ms: latency_of(&latency_total),
            latency_histogram_us: latency_total,
            offsets: offsets(t),
            machine: Machine::of(run),
            timeline: timeline(run),
        }
    }
}

impl Report for BroadcastReport {
    fn head(&self) -> &Head {
        &self.head
    }

    fn target(&self) -> String {
        self.config.layout.urls.join(", ")
    }

    /// The human summary.
    fn render_text(&self) -> String {
        let mut out = String::new();
        self.head.render(
            &mut out,
            "nothing: no subscriber failed or closed, no publication failed or lost",
        );
        let c = &self.config;
        kv(
            &mut out,
            "Setup",
            &format!(
                "{} subscribers on {} channel{} ({}:0..) {}; {}\n\
                 publish via {} ({} connection{}), {}/s for {} s, data {} B; drain up to {} s\n\
                 sources {}; tokens {}",
                thousands(c.subscribers),
                c.channels,
                if c.channels == 1 { "" } else { "s" },
                c.namespace,
                c.layout.urls_text(),
                c.layout.processes_text(),
                match c.publish_via {
                    "api" => "POST /v1/publish",
                    _ => "client publish frames",
                },
                c.publishers,
                if c.publishers == 1 { "" } else { "s" },
                c.rate_per_s,
                c.layout.duration_s,
                c.payload_bytes,
                c.layout.drain_s,
                c.layout.sources,
                c.layout.tokens
            ),
        );
        self.head.render_errors(&mut out);
        let s = &self.subscribers;
        kv(
            &mut out,
            "Subscribers",
            &format!(
                "target {}  subscribed {}  failed {}{}  unexpected closes {}  open at end {}{}",
                thousands(s.target),
                thousands(s.subscribed),
                thousands(s.failed),
                nonzero_counts(&[("aborted", s.aborted), ("not attempted", s.not_attempted)]),
                thousands(s.unexpected_closes),
                thousands(s.open_at_end),
                setup_latency_text(&s.setup_latency_ms, "subscribed")
            ),
        );
        reason_rows(&mut out, "Failures", &s.failures);
        reason_rows(&mut out, "Closes", &s.closes);
        render_delivery(
            &mut out,
            &self.publications,
            &self.deliveries,
            &self.latency_ms,
            &self.offsets,
        );
        self.machine.render(&mut out);
        out
    }

    fn charts(&self) -> Vec<String> {
        let tl = &self.timeline;
        let mut charts = vec![percentile_chart(
            &self.latency_histogram_us,
            "Delivery latency by percentile (publish timestamp -> subscriber receive)",
        )];
        charts.extend(delivery_charts(tl));
        charts.push(open_chart(
            "Open subscribers (per-second samples)",
            "subscribers",
            tl,
        ));
        charts.extend(rss_chart(
            "Gateway resident memory",
            &[("RSS", &tl.gateway)],
        ));
        charts
    }
}

/// The `Publications`, `Deliveries`, `Latency` and `Offsets` rows of a summary.
pub fn render_delivery(
    out: &mut String,
    p: &Publications,
    d: &Deliveries,
    latency: &Option<Latency>,
    o: &Offsets,
) {
    kv(
        out,
        "Publications",
        &format!(
            "scheduled {}  sent {}  acked {}  failed {}\n\
             {:.1}/s achieved over {:.1} s (target {}/s); send -> ack {}{}",
            thousands(p.scheduled),
            thousands(p.sent),
            thousands(p.acked),
            thousands(p.failed),
            p.achieved_per_s,
            p.window_s,
            p.target_per_s,
            match &p.ack_latency_ms {
                Some(l) => format!("p50 {} p99 {} ms", millis(l.p50), millis(l.p99)),
                None => "-".to_owned(),
            },
            if p.late > 0 {
                format!(
                    "\n{} sent over 100 ms late (all publisher connections busy; most {} ms)",
                    thousands(p.late),
                    thousands(p.max_lag_ms)
                )
            } else {
                String::new()
            }
        ),
    );
    reason_rows(out, "Pub failures", &p.failures);
    reason_rows(out, "Pub closes", &p.connection_ends);
    let mut deliveries = format!(
        "{} received of {} expected; {}/s over {:.2} s (target {}/s)",
        thousands(d.total),
        thousands(d.expected),
        thousands(d.achieved_per_s.round() as u64),
        d.span_s,
        thousands(d.target_per_s.round() as u64),
    );
    if let Some(steady) = d.steady_per_s {
        deliveries.push_str(&format!(
            "\nwhile publishing {}/s; busiest second {}/s",
            thousands(steady.round() as u64),
            thousands(d.peak_1s_per_s.round() as u64)
        ));
    }
    if let Some(ps) = &d.per_subscriber {
        deliveries.push_str(&format!(
            "\nper subscriber {:.1}/s (min {:.1}, median {:.1}, max {:.1}; {} subscribers)",
            ps.mean_per_s,
            ps.min_per_s,
            ps.p50_per_s,
            ps.max_per_s,
            thousands(ps.count)
        ));
    }
    if let Some(drain) = d.drain_s {
        deliveries.push_str(&format!(
            "\n{} {:.2} s after the last publication",
            if d.drained {
                "everyone had everything"
            } else {
                "drain limit reached, not caught up,"
            },
            drain
        ));
    }
    if d.untimed > 0 || d.stray_frames > 0 {
        deliveries.push_str(&format!(
            "\n{} without timestamp (foreign publications), {} stray frames",
            thousands(d.untimed),
            thousands(d.stray_frames)
        ));
    }
    kv(out, "Deliveries", &deliveries);
    latency_row(
        out,
        "Latency (ms)",
        latency,
        "publish timestamp -> subscriber receive",
        "nothing delivered",
    );
    let mut offsets = format!(
        "{} streams: {} missing in {} gaps, {} duplicates; {} streams with problems",
        thousands(o.streams),
        thousands(o.missing),
        thousands(o.gap_count),
        thousands(o.duplicates),
        thousands(o.streams_with_problems)
    );
    for e in &o.examples {
        offsets.push('\n');
        offsets.push_str(e);
    }
    kv(out, "Offsets", &offsets);
}

/// `before 9.8 MiB, subscribed 211 MiB, drained 348 MiB, after close 12 MiB`.
pub fn gateway_text(g: &GatewayMemory) -> String {
    format!(
        "before {}, set up {}, drained {}, after close {}",
        rss_text(&g.before),
        rss_text(&g.subscribed),
        rss_text(&g.drained),
        rss_text(&g.after)
    )
}

/// Second by second: deliveries over all subscribers, their latency p50 and p99, and
/// publications sent and acknowledged (with subscriber closes).
pub fn delivery_charts(tl: &Timeline) -> [String; 3] {
    [
        rate_chart(
            "Deliveries per second (all subscribers)",
            "deliveries/s",
            tl.slot_ms,
            &[("deliveries/s", "#1f77b4", &tl.deliveries, false)],
        ),
        p50_p99_chart(
            "Delivery latency per second",
            &tl.latency_p50_ms,
            &tl.latency_p99_ms,
            tl.slot_ms,
        ),
        rate_chart(
            "Publications per second (and subscriber closes)",
            "per second",
            tl.slot_ms,
            &[
                ("sent/s", "#1f77b4", &tl.published, false),
                ("acked/s", "#ff7f0e", &tl.acked, false),
                ("closes/s", "#d62728", &tl.closes, true),
            ],
        ),
    ]
}

/// Open connections, second by second.
pub fn open_chart(title: &str, y_label: &str, tl: &Timeline) -> String {
    level_chart(title, y_label, "open", &tl.open, tl.slot_ms)
}

/// `1.52 cores (30.4 s: user 12.1, system 18.3)`.
fn cores_text(cores: f64, c: &CpuSeconds) -> String {
    format!(
        "{cores:.2} cores ({:.1} s: user {:.1}, system {:.1})",
        c.total(),
        c.user,
        c.system
    )
}

pub fn cpu_text(cpu: &CpuUse) -> String {
    let mut parts: Vec<String> = cpu
        .processes
        .iter()
        .map(|p| {
            format!(
                "{} (pid {}) {}{}",
                p.name,
                p.pid,
                match (p.cores, &p.cpu) {
                    (Some(cores), Some(c)) => cores_text(cores, c),
                    _ => "? (gone)".to_owned(),
                },
                p.rss_bytes
                    .map(|r| format!(", RSS {}", bytes(r as f64)))
                    .unwrap_or_default()
            )
        })
        .collect();
    if let (Some(cores), Some(c)) = (cpu.loadtest_cores, &cpu.loadtest) {
        parts.push(format!(
            "loadtest {}{}",
            cores_text(cores, c),
            match (cpu.loadtest_parent, cpu.loadtest_workers) {
                (Some(p), Some(w)) => format!(
                    "; parent {:.1} s, worker processes {:.1} s",
                    p.total(),
                    w.total()
                ),
                _ => String::new(),
            }
        ));
    }
    format!(
        "over {:.1} s from the start of the window to the end of the drain:\n{}",
        cpu.window_s,
        parts.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Failure;
    use crate::probe::ProcessCpu;
    use crate::publish::PublishTallies;
    use crate::scenario::population::test_plan;
    use crate::stats::OffsetTracker;

    /// The plan the tests' tallies were made for.
    fn plan(extra: &[&str]) -> Plan {
        let base = [
            "--subscribers",
            "100",
            "--channels",
            "2",
            "--rate",
            "10",
            "--duration",
            "5",
        ];
        test_plan("broadcast", &base, extra)
    }

    /// 100 subscribers that each received offsets 1..=25 of their channel, 1 ms to
    /// 10 ms late, during seconds 1 to 5; 50 publications acked per... 25 per channel.
    fn clean() -> (Tallies, PublishTallies) {
        let mut t = Tallies {
            attempted: 100,
            subscribed: 100,
            open_at_finish: 100,
            ..Tallies::default()
        };
        t.open.sample(0, 0);
        t.open.sample(1000, 100);
        for s in 0..100u64 {
            let mut o = OffsetTracker::new();
            let ch = format!("bench:{}", s % 2);
            o.expect(&ch, Some(1), Some(25));
            for off in 1..=25 {
                o.record(&ch, off);
                t.latency_us
                    .record(1000 + off * 200, 1000 + (s * 37 + off * 11) % 9000);
            }
            t.gaps.merge(&o.summary());
            t.per_subscriber.record(25);
            t.setup_latency_us.record(2000 + s);
        }
        t.last_delivery_ms = Some(6_000);
        let mut p = PublishTallies {
            scheduled: 50,
            sent: 50,
            acked: 50,
            channel_first: vec![Some(1), Some(1)],
            channel_last: vec![Some(25), Some(25)],
            channel_acked: vec![25, 25],
            first_sent_ms: Some(1_000),
            last_sent_ms: Some(5_900),
            ..PublishTallies::default()
        };
        for i in 0..50u64 {
            p.sent_series.record(1_000 + i * 100, 1);
            p.acked_series.record(1_001 + i * 100, 1);
            p.ack_latency_us.record(800 + i);
        }
        (t, p)
    }

    fn facts(t: &Tallies, p: PublishTallies) -> RunResult {
        RunResult {
            tallies: t.clone(),
            published: p,
            window_started_ms: Some(1_000),
            window_ended_ms: Some(6_000),
            drain_s: Some(0.05),
            drained_fully: true,
            gateway: Some([
                Some(GatewaySample {
                    at_ms: 0,
                    rss_bytes: Some(10 << 20),
                    connections: None,
                }),
                None,
                None,
                None,
            ]),
            cpu: Some(CpuUse::new(
                5.0,
                vec![ProcessCpu {
                    pid: 42,
                    name: "gateway".into(),
                    cpu: Some(CpuSeconds {
                        user: 1.5,
                        system: 2.5,
                    }),
                    cores: Some(0.8),
                    rss_bytes: Some(50 << 20),
                }],
                Some(CpuSeconds {
                    user: 0.5,
                    system: 0.5,
                }),
            )),
            finished_ms: 7_000,
            ..RunResult::default()
        }
    }

    #[test]
    fn a_clean_run_meets_its_goal() {
        let p = plan(&[]);
        let (t, pubs) = clean();
        let r = BroadcastReport::build(&p, &facts(&t, pubs));
        assert!(r.head.goal_met, "{}", r.head.verdict);
        assert!(r.head.stopped_by.is_empty());
        assert_eq!(r.deliveries.total, 2_500);
        assert_eq!(r.deliveries.expected, 2_500);
        // 2,500 deliveries from t = 1 s to the last at 6 s.
        assert_eq!(r.deliveries.achieved_per_s, 500.0);
        assert_eq!(r.deliveries.target_per_s, 500.0);
        // Seconds 1..6 lie inside the window; deliveries sit in slots 1 to 6.
        assert!(r.deliveries.steady_per_s.is_some());
        let ps = r.deliveries.per_subscriber.as_ref().unwrap();
        assert_eq!((ps.count, ps.min_per_s, ps.max_per_s), (100, 5.0, 5.0));
        let l = r.latency_ms.as_ref().unwrap();
        assert_eq!(l.count, 2_500);
        assert!(l.p50 > 1.0 && l.p99 < 10.1, "{l:?}");
        assert!((r.publications.achieved_per_s - 10.0).abs() < 0.01);
        assert_eq!(r.publications.channels[1].last_offset, Some(25));
        assert_eq!(r.publications.channels[0].subscribers, 50);
        let text = r.render_text();
        for part in [
            "goal met",
            "100 subscribers received 50 publications (2,500 deliveries)",
            "2,500 received of 2,500 expected; 500/s",
            "0 missing in 0 gaps, 0 duplicates",
            "gateway (pid 42) 0.80 cores (4.0 s: user 1.5, system 2.5)",
            "loadtest 0.20 cores",
            "p99",
            "nothing: no subscriber failed",
        ] {
            assert!(text.contains(part), "{part:?} missing:\n{text}");
        }
    }

    #[test]
    fn gaps_duplicates_and_closes_miss_the_goal() {
        let p = plan(&[]);
        let (mut t, pubs) = clean();
        let mut o = OffsetTracker::new();
        o.expect("bench:0", Some(1), Some(5));
        for off in [1, 2, 2, 5] {
            o.record("bench:0", off);
        }
        t.gaps.merge(&o.summary());
        t.problems.push(
            "subscriber 7 on bench:0: 2 missing in 1 gap(s) (offsets 3-4), 1 duplicate(s)".into(),
        );
        let f = Failure::Closed {
            code: 4008,
            error: Some("SLOW_CONSUMER".into()),
        };
        t.closed = 1;
        t.closes.add(&f.to_string(), 1);
        t.close_limits.add(f.limit().label(), 1);
        let r = BroadcastReport::build(&p, &facts(&t, pubs.clone()));
        assert!(!r.head.goal_met);
        let limits: Vec<&str> = r.head.stopped_by.iter().map(|f| f.limit).collect();
        assert_eq!(limits, vec!["gaps", "slow_consumer", "duplicates"]);
        assert_eq!((r.offsets.missing, r.offsets.duplicates), (2, 1));
        let text = r.render_text();
        for part in [
            "goal missed",
            "1 closed by the gateway",
            "2 deliveries missing",
            "1 duplicates",
            "close 4008 SLOW_CONSUMER",
            "offsets 3-4",
        ] {
            assert!(text.contains(part), "{part:?} missing:\n{text}");
        }
        // A drain that ran out names the backlog, not lost messages.
        let mut f = facts(&t, pubs.clone());
        f.drained_fully = false;
        let r = BroadcastReport::build(&p, &f);
        assert!(r.head.stopped_by.iter().any(|f| f.limit == "behind"));
        assert!(
            r.head.verdict.contains("not caught up within --drain"),
            "{}",
            r.head.verdict
        );
        // A publisher that could not keep the schedule is named in the verdict.
        let (t3, mut slow) = clean();
        slow.first_sent_ms = Some(1_000);
        slow.last_sent_ms = Some(11_000);
        let r = BroadcastReport::build(&p, &facts(&t3, slow));
        assert!(r.head.goal_met);
        assert!(
            r.head
                .verdict
                .contains("publisher reached only 4.9/s of 10/s"),
            "{}",
            r.head.verdict
        );
        // Closes are tolerated with --allow-failures, gaps never.
        let p = plan(&["--allow-failures", "5"]);
        let (mut t2, pubs2) = clean();
        t2.closed = 1;
        assert!(BroadcastReport::build(&p, &facts(&t2, pubs2)).head.goal_met);
        assert!(!BroadcastReport::build(&p, &facts(&t, pubs)).head.goal_met);
    }

    #[test]
    fn failed_publications_and_broken_runs_miss_the_goal() {
        let p = plan(&[]);
        let (t, mut pubs) = clean();
        pubs.failed = 3;
        pubs.failures.add("http 503 UNAVAILABLE", 3);
        let r = BroadcastReport::build(&p, &facts(&t, pubs.clone()));
        assert!(!r.head.goal_met);
        assert_eq!(r.head.stopped_by[0].limit, "publish_failed");
        assert!(r.render_text().contains("http 503 UNAVAILABLE"));
        assert_eq!(r.publications.failures[0].count, 3);
        let (t, pubs) = clean();
        let mut f = facts(&t, pubs);
        f.errors.push("worker 1 ended without results".into());
        assert!(!BroadcastReport::build(&p, &f).head.goal_met);
        let (t, pubs) = clean();
        let mut f = facts(&t, pubs);
        f.interrupted = true;
        let r = BroadcastReport::build(&p, &f);
        assert!(!r.head.goal_met && r.head.verdict.starts_with("interrupted"));
    }

    #[test]
    fn cpu_of_worker_processes_adds_up() {
        let mut c = CpuUse::new(
            10.0,
            vec![],
            Some(CpuSeconds {
                user: 1.0,
                system: 1.0,
            }),
        );
        assert_eq!(c.loadtest_cores, Some(0.2));
        c.add_workers(Some(CpuSeconds {
            user: 5.0,
            system: 3.0,
        }));
        assert_eq!(c.loadtest.map(|c| c.total()), Some(10.0));
        assert_eq!(c.loadtest_cores, Some(1.0));
        let text = cpu_text(&c);
        assert!(
            text.contains("loadtest 1.00 cores (10.0 s: user 6.0, system 4.0)"),
            "{text}"
        );
        assert!(
            text.contains("parent 2.0 s, worker processes 8.0 s"),
            "{text}"
        );
    }

    #[test]
    fn json_and_html_render() {
        let p = plan(&[]);
        let (t, pubs) = clean();
        let r = BroadcastReport::build(&p, &facts(&t, pubs));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["scenario"], "broadcast");
        assert_eq!(json["deliveries"]["total"], 2_500);
        assert_eq!(json["offsets"]["missing"], 0);
        assert!(json["latency_ms"]["p99"].as_f64().unwrap() > 1.0);
        assert!(json["latency_histogram_us"]["buckets"].is_array());
        assert_eq!(json["timeline"]["deliveries"].as_array().unwrap().len(), 7);
        assert_eq!(json["cpu"]["processes"][0]["name"], "gateway");
        let html = r.render_html();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert_eq!(html.matches("<svg").count(), 5);
        assert!(!html.contains("<script") && !html.contains("src="));
        assert!(!html.contains("NaN"));
    }

    #[test]
    fn empty_run_renders() {
        let p = plan(&[]);
        let t = Tallies::default();
        let mut f = facts(&t, PublishTallies::default());
        f.gateway = None;
        f.cpu = None;
        f.window_started_ms = None;
        let r = BroadcastReport::build(&p, &f);
        assert!(!r.head.goal_met);
        assert!(r.latency_ms.is_none());
        assert!(r.render_text().contains("nothing delivered"));
        assert!(r.render_html().contains("</html>"));
    }
}
