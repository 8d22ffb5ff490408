//! The `chat` scenario's report, and the chat section it shares with `soak`: streams
//! sent, completed and failed (errors by reason), how many ran at once, ack,
//! first-chunk and complete latency, the chat path's overhead (latency minus what the
//! LLM stub was told to take), and the chunk-sequence checks. Rendered as the human
//! summary, JSON (`--json`) and a self-contained HTML page (`--html`).

use serde::Serialize;

use super::broadcast::{Layout, Machine};
use super::chart::{level_chart, p50_p99_chart, percentile_curves, rate_chart, rss_chart};
use super::{
    Finding, Head, Latency, ReasonCount, Report, allowance_text, allowed, connection_problems, kv,
    latency_of, latency_row, millis, nonzero_counts, per_second, percentiles_text, quantiles_ms,
    reason_rows, reasons, seconds, setup_latency_text, span_ms, stopped_by, thousands,
};
use crate::chat::{ChatTallies, LlmTiming, Pacing};
use crate::probe::GatewaySample;
use crate::scenario::population::{Plan, ProcessSeries, RunResult, Tallies};
use crate::stats::Histogram;
use crate::stats::series::SLOT_MS;

/// What the chat users did.
#[derive(Debug, Clone, Serialize)]
pub struct ChatSection {
    /// `chat.send` frames sent.
    pub sent: u64,
    pub acked: u64,
    pub completed: u64,
    pub failed: u64,
    /// Still streaming when the run ended.
    pub unfinished: u64,
    /// Failed streams by reason (`send refused: RATE_LIMITED`, `chat.error
    /// UNAVAILABLE`, `timeout: waiting for ack`, `connection lost: ...`).
    pub errors: Vec<ReasonCount>,
    /// The window (first to last message time), seconds.
    pub window_s: f64,
    pub sent_per_s: f64,
    pub completed_per_s: f64,
    /// Streams in flight, sampled each second of the window.
    pub concurrency_mean: f64,
    pub concurrency_peak: u64,
    /// `chat.send` to `ack`.
    pub ack_ms: Option<Latency>,
    /// `chat.send` to the first `chat.chunk`.
    pub first_chunk_ms: Option<Latency>,
    /// `chat.send` to `chat.complete`.
    pub complete_ms: Option<Latency>,
    /// What the LLM stub was told to take, when known.
    pub llm: Option<LlmTiming>,
    /// First-chunk latency minus the stub's first-token delay: the chat path's own
    /// time to the first text (gateway, JetStream, worker, NATS, gateway).
    pub first_chunk_overhead_ms: Option<Latency>,
    /// Complete latency minus the stub's first-token delay and token stream.
    pub complete_overhead_ms: Option<Latency>,
    /// First chunks sooner than the stub's delay: the delay given is wrong.
    pub early_first_chunks: u64,
    pub chunks: ChunkCheck,
    /// Chat frames of no stream in progress (late frames of a stream that timed out).
    pub stray_frames: u64,
    /// With `--chat-rate`: sends over 100 ms behind schedule, and the most.
    pub late: u64,
    pub max_lag_ms: u64,
    /// Raw data (microseconds), mergeable with other runs' histograms.
    pub ack_histogram_us: Histogram,
    pub first_chunk_histogram_us: Histogram,
    pub complete_histogram_us: Histogram,
    pub first_chunk_overhead_histogram_us: Histogram,
    pub complete_overhead_histogram_us: Histogram,
}

/// The chunk sequences of finished streams.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkCheck {
    pub streams: u64,
    pub chunks: u64,
    pub missing: u64,
    pub gap_count: u64,
    pub duplicates: u64,
    pub streams_with_problems: u64,
    /// Completed streams whose chunks (without gap or duplicate) did not spell the
    /// `chat.complete` text.
    pub content_mismatches: u64,
}

/// The chat part of the per-second series.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTimeline {
    pub slot_ms: u64,
    pub window_start_s: Option<f64>,
    pub window_end_s: Option<f64>,
    pub sent: Vec<u64>,
    pub completed: Vec<u64>,
    pub failed: Vec<u64>,
    pub in_flight: Vec<u64>,
    pub first_chunk_p50_ms: Vec<Option<f64>>,
    pub first_chunk_p99_ms: Vec<Option<f64>>,
}

impl ChatSection {
    /// The section from the merged tallies and the window (run-epoch ms).
    pub fn build(t: &ChatTallies, llm: Option<LlmTiming>, run: &RunResult) -> ChatSection {
        let (start, end) = (
            run.window_started_ms.unwrap_or(0),
            run.window_ended_ms.unwrap_or(0),
        );
        let window_ms = span_ms(Some(start), Some(end));
        // Seconds wholly inside the window; the sample at a slot's start is the level.
        let levels = t.in_flight.levels();
        let from = (start.div_ceil(SLOT_MS) as usize).min(levels.len());
        let to = ((end / SLOT_MS) as usize + 1).clamp(from, levels.len());
        let inside = &levels[from..to];
        let concurrency_mean = if inside.is_empty() {
            0.0
        } else {
            inside.iter().sum::<u64>() as f64 / inside.len() as f64
        };
        let first = t.first_chunk_us.total();
        let gaps = t.chunks;
        ChatSection {
            sent: t.sent,
            acked: t.acked,
            completed: t.completed,
            failed: t.failed,
            unfinished: t.unfinished,
            errors: reasons(&t.errors),
            window_s: window_ms as f64 / 1000.0,
            sent_per_s: per_second(t.sent, window_ms),
            completed_per_s: per_second(t.completed, window_ms),
            concurrency_mean,
            concurrency_peak: t.in_flight.peak(),
            ack_ms: latency_of(&t.ack_us),
            first_chunk_ms: latency_of(&first),
            complete_ms: latency_of(&t.complete_us),
            llm,
            first_chunk_overhead_ms: llm.and(latency_of(&t.first_overhead_us)),
            complete_overhead_ms: llm.and(latency_of(&t.complete_overhead_us)),
            early_first_chunks: t.early,
            chunks: ChunkCheck {
                streams: gaps.streams,
                chunks: gaps.received,
                missing: gaps.missing,
                gap_count: gaps.gap_count,
                duplicates: gaps.duplicates,
                streams_with_problems: gaps.streams_with_problems,
                content_mismatches: t.content_mismatches,
            },
            stray_frames: t.stray_frames,
            late: t.late,
            max_lag_ms: t.max_lag_ms,
            ack_histogram_us: t.ack_us.clone(),
            first_chunk_histogram_us: first,
            complete_histogram_us: t.complete_us.clone(),
            first_chunk_overhead_histogram_us: t.first_overhead_us.clone(),
            complete_overhead_histogram_us: t.complete_overhead_us.clone(),
        }
    }

    /// Chunk sequences with gaps or duplicates, and texts that differ from their chunks.
    pub fn chunk_problems(&self) -> u64 {
        self.chunks.missing + self.chunks.duplicates + self.chunks.content_mismatches
    }

    /// What went wrong, by cause, with what to change.
    pub fn findings(&self) -> Vec<Finding> {
        let mut found: Vec<Finding> = Vec::new();
        let mut add = |limit: &'static str, count: u64, explanation: &'static str| {
            if count == 0 {
                return;
            }
            match found.iter_mut().find(|f| f.limit == limit) {
                Some(f) => f.count += count,
                None => found.push(Finding::new(limit, count, explanation)),
            }
        };
        for e in &self.errors {
            let r = e.reason.as_str();
            if r.starts_with("connection lost") {
                // Counted with the connection closes.
                continue;
            }
            if r == "send refused: RATE_LIMITED" {
                add(
                    "chat_rate_limited",
                    e.count,
                    "the gateway's per-user chat rate (SB_CHAT_RATE_PER_MINUTE, default 20) \
                     refused messages: run it with a higher limit for load tests, or raise \
                     --think-ms / lower --chat-rate",
                );
            } else if r.starts_with("timeout") {
                add(
                    "stream_timeout",
                    e.count,
                    "streams got no ack, first chunk or next chunk within --timeout: the \
                     gateway, JetStream or the workers are saturated, or every worker is \
                     busy (SB_MAX_IN_FLIGHT per worker), or no worker runs",
                );
            } else if r.starts_with("chat.error UNAVAILABLE")
                || r.starts_with("send refused: UNAVAILABLE")
            {
                add(
                    "chat_unavailable",
                    e.count,
                    "the chat path reported UNAVAILABLE: the worker's LLM call failed after \
                     retries or broke off (mock-llm's --p-* error injection, or the LLM is \
                     down), or the gateway could not store the request (JetStream)",
                );
            } else {
                add(
                    "chat_error",
                    e.count,
                    "streams ended in chat.error or a refused chat.send (see Stream errors)",
                );
            }
        }
        add(
            "chunk_gaps",
            self.chunks.missing,
            "chat.chunk sequence numbers were skipped (see Chunks)",
        );
        add(
            "chunk_duplicates",
            self.chunks.duplicates,
            "chat.chunk sequence numbers came twice (a redelivered request restarts at seq \
             0; see Chunks)",
        );
        add(
            "content_mismatch",
            self.chunks.content_mismatches,
            "the chunks of a stream did not spell its chat.complete text",
        );
        found
    }

    /// The chat rows of a summary.
    pub fn render(&self, out: &mut String) {
        kv(
            out,
            "Streams",
            &format!(
                "sent {}  acked {}  completed {}  failed {}{}\n\
                 {:.1}/s sent, {:.1}/s completed over {:.1} s; in flight mean {:.1}, peak {}{}",
                thousands(self.sent),
                thousands(self.acked),
                thousands(self.completed),
                thousands(self.failed),
                nonzero_counts(&[("unfinished", self.unfinished)]),
                self.sent_per_s,
                self.completed_per_s,
                self.window_s,
                self.concurrency_mean,
                thousands(self.concurrency_peak),
                if self.late > 0 {
                    format!(
                        "\n{} sent over 100 ms behind schedule (their user was still \
                         streaming; most {} ms)",
                        thousands(self.late),
                        thousands(self.max_lag_ms)
                    )
                } else {
                    String::new()
                }
            ),
        );
        reason_rows(out, "Stream errors", &self.errors);
        let rows = [
            ("Ack (ms)", &self.ack_ms, "chat.send -> ack"),
            (
                "First (ms)",
                &self.first_chunk_ms,
                "chat.send -> first chat.chunk",
            ),
            (
                "Complete (ms)",
                &self.complete_ms,
                "chat.send -> chat.complete",
            ),
        ];
        for (label, latency, what) in rows {
            latency_row(out, label, latency, what, "none");
        }
        let overhead = match (&self.llm, &self.first_chunk_overhead_ms) {
            (None, _) => {
                "unknown: give --llm-first-token-ms (and --llm-stream-ms) or --llm-stub".to_owned()
            }
            (Some(_), None) => "no stream reached its first chunk".to_owned(),
            (Some(l), Some(first)) => {
                let mut s = format!(
                    "first chunk: {}  (minus the stub's {} ms to its first token)",
                    percentiles_text(first),
                    l.first_token_ms
                );
                if let Some(c) = &self.complete_overhead_ms {
                    s.push_str(&format!(
                        "\ncomplete:    {}  (minus {} ms: first token and {} ms of tokens)",
                        percentiles_text(c),
                        l.expected_ms(),
                        l.stream_ms
                    ));
                }
                if self.early_first_chunks > 0 {
                    s.push_str(&format!(
                        "\n{} first chunks came sooner than {} ms: the stub's delay given is \
                         wrong",
                        thousands(self.early_first_chunks),
                        l.first_token_ms
                    ));
                }
                s
            }
        };
        kv(out, "Overhead (ms)", &overhead);
        let c = &self.chunks;
        kv(
            out,
            "Chunks",
            &format!(
                "{} streams, {} chunks: {} missing in {} gaps, {} duplicates, {} streams with \
                 problems; {} completed texts differ from their chunks; {} stray frames",
                thousands(c.streams),
                thousands(c.chunks),
                thousands(c.missing),
                thousands(c.gap_count),
                thousands(c.duplicates),
                thousands(c.streams_with_problems),
                thousands(c.content_mismatches),
                thousands(self.stray_frames)
            ),
        );
    }

    /// The chat charts of an HTML page.
    pub fn charts(&self, tl: &ChatTimeline) -> Vec<String> {
        let mut charts = vec![percentile_curves(
            "Chat latency by percentile (from chat.send)",
            &[
                ("ack", &self.ack_histogram_us, 0.0),
                ("first chunk", &self.first_chunk_histogram_us, 0.0),
                ("complete", &self.complete_histogram_us, 0.0),
            ],
        )];
        if self.llm.is_some() {
            charts.push(percentile_curves(
                "Chat-path overhead by percentile (latency minus the stub's own time)",
                &[
                    ("first chunk", &self.first_chunk_overhead_histogram_us, 0.0),
                    ("complete", &self.complete_overhead_histogram_us, 0.0),
                ],
            ));
        }
        charts.push(rate_chart(
            "Chat streams per second",
            "streams/s",
            tl.slot_ms,
            &[
                ("sent/s", "#1f77b4", &tl.sent, false),
                ("completed/s", "#2ca02c", &tl.completed, false),
                ("failed/s", "#d62728", &tl.failed, true),
            ],
        ));
        charts.push(level_chart(
            "Chat streams in flight (per-second samples)",
            "streams",
            "in flight",
            &tl.in_flight,
            tl.slot_ms,
        ));
        charts.push(p50_p99_chart(
            "First-chunk latency per second (from chat.send)",
            &tl.first_chunk_p50_ms,
            &tl.first_chunk_p99_ms,
            tl.slot_ms,
        ));
        charts
    }
}

impl ChatTimeline {
    pub fn build(t: &ChatTallies, run: &RunResult) -> ChatTimeline {
        ChatTimeline {
            slot_ms: SLOT_MS,
            window_start_s: seconds(run.window_started_ms),
            window_end_s: seconds(run.window_ended_ms),
            sent: t.sent_series.counts().to_vec(),
            completed: t.completed_series.counts().to_vec(),
            failed: t.failed_series.counts().to_vec(),
            in_flight: t.in_flight.levels(),
            first_chunk_p50_ms: quantiles_ms(&t.first_chunk_us, 0.5),
            first_chunk_p99_ms: quantiles_ms(&t.first_chunk_us, 0.99),
        }
    }
}

/// The `chat` report.
#[derive(Debug, Serialize)]
pub struct ChatReport {
    /// Goal: every user connected and stayed, streams completed, no stream failed and
    /// no chunk problem (failures within --allow-failures), nothing interrupted.
    #[serde(flatten)]
    pub head: Head,
    pub config: ChatConfig,
    pub users: Users,
    pub streams: ChatSection,
    #[serde(flatten)]
    pub machine: Machine,
    pub timeline: ChatReportTimeline,
}

#[derive(Debug, Serialize)]
pub struct ChatConfig {
    pub users: u64,
    /// `think` or `rate`.
    pub pacing: &'static str,
    pub think_ms: Option<u64>,
    pub chat_rate_per_s: Option<f64>,
    pub messages_per_user: Option<u64>,
    pub message_bytes: usize,
    pub ramp_s: f64,
    #[serde(flatten)]
    pub layout: Layout,
}

/// The users' connections.
#[derive(Debug, Serialize)]
pub struct Users {
    pub target: u64,
    pub connected: u64,
    pub failed: u64,
    pub failures: Vec<ReasonCount>,
    /// TCP connect start to `authenticated`.
    pub setup_latency_ms: Option<Latency>,
    /// Closed or dropped by the server while chatting.
    pub unexpected_closes: u64,
    pub closes: Vec<ReasonCount>,
    pub open_at_end: u64,
}

#[derive(Debug, Serialize)]
pub struct ChatReportTimeline {
    #[serde(flatten)]
    pub chat: ChatTimeline,
    pub open: Vec<u64>,
    pub gateway: Vec<GatewaySample>,
    pub workers: Vec<ProcessSeries>,
}

impl Users {
    pub fn build(target: u64, t: &Tallies) -> Users {
        Users {
            target,
            connected: t.subscribed,
            failed: t.failed,
            failures: reasons(&t.failures),
            setup_latency_ms: latency_of(&t.setup_latency_us),
            unexpected_closes: t.closed,
            closes: reasons(&t.closes),
            open_at_end: t.open_at_finish,
        }
    }

    /// `\nsetup (TCP connect -> ready) p50 .. p99 .. max .. ms`, or nothing.
    pub fn setup_latency_text(&self) -> String {
        setup_latency_text(&self.setup_latency_ms, "ready")
    }

    /// The failed setups and unexpected closes by reason.
    pub fn render_reasons(&self, out: &mut String) {
        reason_rows(out, "Failures", &self.failures);
        reason_rows(out, "Closes", &self.closes);
    }
}

/// The memory of every process sampled: the gateway, then the workers.
pub fn processes_rss_chart(gateway: &[GatewaySample], workers: &[ProcessSeries]) -> Option<String> {
    let mut all = vec![("gateway", gateway)];
    all.extend(
        workers
            .iter()
            .map(|w| (w.url.as_str(), w.samples.as_slice())),
    );
    rss_chart("Resident memory", &all)
}

impl ChatReport {
    pub fn build(plan: &Plan, run: &RunResult) -> ChatReport {
        let t = &run.tallies;
        let settings = plan.chat.as_ref().map(|c| c.settings.clone());
        let llm = settings.as_ref().and_then(|s| s.llm);
        let streams = ChatSection::build(&t.chat, llm, run);
        let users = plan.chat_users();
        let stopped_by = stopped_by(t, streams.findings());

        let lost_users = users.saturating_sub(t.subscribed) + t.closed;
        let chunk_problems = streams.chunk_problems();
        let goal_met = !run.interrupted
            && run.errors.is_empty()
            && lost_users as f64 <= allowed(plan.allow_failures_pct, users)
            && streams.failed as f64 <= allowed(plan.allow_failures_pct, streams.sent)
            && streams.completed > 0
            && chunk_problems == 0;
        let overhead = streams
            .first_chunk_overhead_ms
            .as_ref()
            .map(|o| {
                format!(
                    "; first-chunk overhead p50 {} p99 {} ms",
                    millis(o.p50),
                    millis(o.p99)
                )
            })
            .unwrap_or_default();
        let verdict = if run.interrupted {
            format!(
                "interrupted: {} streams completed of {} sent",
                thousands(streams.completed),
                thousands(streams.sent)
            )
        } else if goal_met {
            format!(
                "goal met: {} users completed {} streams ({:.1} in flight on average){}{}",
                thousands(t.subscribed - t.closed),
                thousands(streams.completed),
                streams.concurrency_mean,
                overhead,
                allowance_text(
                    plan.allow_failures_pct,
                    (lost_users, "users"),
                    (streams.failed, "streams")
                )
            )
        } else {
            let mut why = connection_problems(run, users, "users connected", "worker errors");
            if streams.failed > 0 {
                why.push(format!(
                    "{} of {} streams failed",
                    thousands(streams.failed),
                    thousands(streams.sent)
                ));
            }
            if streams.completed == 0 {
                why.push("no stream completed".to_owned());
            }
            if chunk_problems > 0 {
                why.push(format!("{} chunk problems", thousands(chunk_problems)));
            }
            format!("goal missed: {}{overhead}", why.join(", "))
        };
        let s = settings.as_ref();
        ChatReport {
            head: Head::new(plan, run, goal_met, verdict, stopped_by),
            config: ChatConfig {
                users,
                pacing: match s.map(|s| s.pacing) {
                    Some(Pacing::Rate(_)) => "rate",
                    _ => "think",
                },
                think_ms: s.and_then(|s| match s.pacing {
                    Pacing::Think(t) => Some(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                    Pacing::Rate(_) => None,
                }),
                chat_rate_per_s: s.and_then(|s| match s.pacing {
                    Pacing::Rate(r) => Some(r),
                    Pacing::Think(_) => None,
                }),
                messages_per_user: s.and_then(|s| s.messages),
                message_bytes: s.map_or(0, |s| s.message_bytes),
                ramp_s: s.map_or(0.0, |s| s.ramp.as_secs_f64()),
                layout: Layout::of(plan),
            },
            users: Users::build(users, t),
            timeline: ChatReportTimeline {
                chat: ChatTimeline::build(&t.chat, run),
                open: t.open.levels(),
                gateway: run.gateway_series.clone(),
                workers: run.worker_series.clone(),
            },
            streams,
            machine: Machine::of(run),
        }
    }
}

impl Report for ChatReport {
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
            "nothing: every user connected and stayed, no stream failed",
        );
        let c = &self.config;
        let l = &c.layout;
        kv(
            &mut out,
            "Setup",
            &format!(
                "{} users {}, {}; {} messages of {} B; first messages over {:.1} s\n\
                 window {}; timeout {} s, drain up to {} s; {}\nsources {}; tokens {}",
                thousands(c.users),
                l.urls_text(),
                match (c.think_ms, c.chat_rate_per_s) {
                    (_, Some(r)) => format!("{r} streams/s over all users"),
                    (Some(t), None) => format!("thinking {t} ms between streams"),
                    (None, None) => "-".to_owned(),
                },
                c.messages_per_user
                    .map_or("unlimited".to_owned(), |m| format!("{m} per user")),
                c.message_bytes,
                c.ramp_s,
                if c.messages_per_user.is_some() && l.duration_s >= 86_400 {
                    "until every message is sent".to_owned()
                } else {
                    format!("{} s", l.duration_s)
                },
                l.timeout_s,
                l.drain_s,
                l.processes_text(),
                l.sources,
                l.tokens
            ),
        );
        self.head.render_errors(&mut out);
        let u = &self.users;
        kv(
            &mut out,
            "Users",
            &format!(
                "target {}  connected {}  failed {}  unexpected closes {}  open at end {}{}",
                thousands(u.target),
                thousands(u.connected),
                thousands(u.failed),
                thousands(u.unexpected_closes),
                thousands(u.open_at_end),
                u.setup_latency_text()
            ),
        );
        u.render_reasons(&mut out);
        self.streams.render(&mut out);
        self.machine.render(&mut out);
        out
    }

    fn charts(&self) -> Vec<String> {
        let tl = &self.timeline;
        let mut charts = self.streams.charts(&tl.chat);
        charts.extend(processes_rss_chart(&tl.gateway, &tl.workers));
        charts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Failure;
    use crate::publish::PublishTallies;
    use crate::scenario::population::test_plan;
    use crate::stats::OffsetTracker;

    /// The plan the tests' tallies were made for.
    fn plan(extra: &[&str]) -> Plan {
        let base = [
            "--users",
            "10",
            "--duration",
            "10",
            "--llm-first-token-ms",
            "300",
            "--llm-stream-ms",
            "1000",
        ];
        test_plan("chat", &base, extra)
    }

    /// 10 users, 100 streams from t = 1 s to 11 s: ack 5 ms, first chunk 300 + 2..12
    /// ms, complete 1,300 + 5..25 ms, 10 chunks each, 5 in flight on average.
    fn clean() -> RunResult {
        let mut t = Tallies {
            attempted: 10,
            subscribed: 10,
            open_at_finish: 10,
            ..Tallies::default()
        };
        t.open.sample(0, 0);
        t.open.sample(1_000, 10);
        let c = &mut t.chat;
        for i in 0..100u64 {
            let at = 1_000 + i * 100;
            c.sent += 1;
            c.acked += 1;
            c.completed += 1;
            c.sent_series.record(at, 1);
            c.completed_series.record(at + 1_300, 1);
            c.ack_us.record(5_000);
            c.first_chunk_us
                .record(at + 300, 302_000 + (i % 10) * 1_000);
            c.first_overhead_us.record(2_000 + (i % 10) * 1_000);
            c.complete_us.record(1_305_000 + (i % 5) * 5_000);
            c.complete_overhead_us.record(5_000 + (i % 5) * 5_000);
            let mut seqs = OffsetTracker::new();
            seqs.expect("seq", Some(0), None);
            for s in 0..10 {
                seqs.record("seq", s);
            }
            c.chunks.merge(&seqs.summary());
        }
        for s in 0..13u64 {
            c.in_flight
                .sample(s * 1_000, if (1..=11).contains(&s) { 5 } else { 0 });
        }
        RunResult {
            tallies: t,
            published: PublishTallies::default(),
            window_started_ms: Some(1_000),
            window_ended_ms: Some(11_000),
            drain_s: Some(1.3),
            drained_fully: true,
            gateway_series: vec![GatewaySample {
                at_ms: 500,
                rss_bytes: Some(20 << 20),
                connections: Some(10),
            }],
            finished_ms: 13_000,
            ..RunResult::default()
        }
    }

    #[test]
    fn a_clean_run_meets_its_goal_and_reports_the_overhead() {
        let p = plan(&[]);
        let run = clean();
        let r = ChatReport::build(&p, &run);
        assert!(r.head.goal_met, "{}", r.head.verdict);
        assert!(r.head.stopped_by.is_empty(), "{:?}", r.head.stopped_by);
        let s = &r.streams;
        assert_eq!((s.sent, s.completed, s.failed), (100, 100, 0));
        assert_eq!(s.sent_per_s, 10.0);
        assert_eq!(s.concurrency_mean, 5.0);
        assert_eq!(s.concurrency_peak, 5);
        let first = s.first_chunk_overhead_ms.as_ref().unwrap();
        // 302..311 ms minus 300: 2..11 ms.
        assert!((first.min - 2.0).abs() < 0.05, "{first:?}");
        assert!((10.9..11.1).contains(&first.max), "{first:?}");
        let complete = s.complete_overhead_ms.as_ref().unwrap();
        assert!((4.9..5.1).contains(&complete.min), "{complete:?}");
        assert_eq!((s.chunks.streams, s.chunks.chunks), (100, 1_000));
        let text = r.render_text();
        for part in [
            "goal met: 10 users completed 100 streams (5.0 in flight on average)",
            "first-chunk overhead p50",
            "sent 100  acked 100  completed 100  failed 0",
            "in flight mean 5.0, peak 5",
            "minus the stub's 300 ms to its first token",
            "minus 1300 ms: first token and 1000 ms of tokens",
            "100 streams, 1,000 chunks: 0 missing in 0 gaps, 0 duplicates",
            "thinking 1000 ms between streams",
            "nothing: every user connected",
        ] {
            assert!(text.contains(part), "{part:?} missing:\n{text}");
        }
    }

    #[test]
    fn failures_and_chunk_problems_miss_the_goal_and_name_their_cause() {
        let p = plan(&[]);
        let mut run = clean();
        let c = &mut run.tallies.chat;
        c.fail(2_000, "send refused: RATE_LIMITED");
        c.fail(2_100, "send refused: RATE_LIMITED");
        c.fail(3_000, "timeout: waiting for ack");
        c.fail(3_500, "chat.error UNAVAILABLE");
        c.fail(
            3_600,
            "connection lost: close 1006 (no close frame) chatting",
        );
        c.content_mismatches = 1;
        let f = Failure::Dropped {
            stage: crate::client::Stage::Chatting,
            error: None,
        };
        run.tallies.closed = 1;
        run.tallies.closes.add(&f.to_string(), 1);
        run.tallies.close_limits.add(f.limit().label(), 1);
        let r = ChatReport::build(&p, &run);
        assert!(!r.head.goal_met);
        let limits: Vec<&str> = r.head.stopped_by.iter().map(|f| f.limit).collect();
        assert_eq!(limits[0], "chat_rate_limited");
        for l in [
            "stream_timeout",
            "chat_unavailable",
            "content_mismatch",
            "dropped",
        ] {
            assert!(limits.contains(&l), "{l} missing in {limits:?}");
        }
        let text = r.render_text();
        for part in [
            "goal missed: 1 closed by the gateway, 5 of 100 streams failed, 1 chunk problems",
            "2  send refused: RATE_LIMITED",
            "SB_CHAT_RATE_PER_MINUTE",
            "1 completed texts differ",
        ] {
            assert!(text.contains(part), "{part:?} missing:\n{text}");
        }
        // Within --allow-failures, failed streams are tolerated; chunk problems never.
        let p = plan(&["--allow-failures", "10"]);
        let mut run = clean();
        run.tallies.chat.fail(2_000, "timeout: waiting for ack");
        assert!(ChatReport::build(&p, &run).head.goal_met);
        run.tallies.chat.chunks.missing = 1;
        assert!(!ChatReport::build(&p, &run).head.goal_met);
    }

    #[test]
    fn without_llm_timing_the_overhead_is_unknown() {
        let p = test_plan("chat", &["--users", "10"], &[]);
        let r = ChatReport::build(&p, &clean());
        assert!(r.streams.first_chunk_overhead_ms.is_none());
        assert!(
            r.render_text()
                .contains("unknown: give --llm-first-token-ms")
        );
        assert_eq!(r.render_html().matches("<svg").count(), 5);
    }

    #[test]
    fn json_and_html_render() {
        let p = plan(&[]);
        let r = ChatReport::build(&p, &clean());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["scenario"], "chat");
        assert_eq!(json["streams"]["completed"], 100);
        assert!(
            json["streams"]["first_chunk_overhead_ms"]["p99"]
                .as_f64()
                .unwrap()
                > 1.0
        );
        assert!(json["streams"]["first_chunk_histogram_us"]["buckets"].is_array());
        assert_eq!(json["timeline"]["sent"].as_array().unwrap().len(), 11);
        assert!(json["timeline"]["in_flight"].is_array());
        let html = r.render_html();
        assert!(html.starts_with("<!DOCTYPE html>"));
        // Latency and overhead curves, rate, in flight, p50/p99 per second, RSS.
        assert_eq!(html.matches("<svg").count(), 6);
        assert!(!html.contains("<script") && !html.contains("src="));
        assert!(!html.contains("NaN"));
    }

    #[test]
    fn empty_run_renders() {
        let p = plan(&[]);
        let mut run = clean();
        run.tallies = Tallies::default();
        run.window_started_ms = None;
        run.window_ended_ms = None;
        let r = ChatReport::build(&p, &run);
        assert!(!r.head.goal_met);
        assert!(r.render_text().contains("no stream completed"));
        assert!(r.render_html().contains("</html>"));
    }
}
