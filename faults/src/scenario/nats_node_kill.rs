//! Scenario 9: `kill -9` of one node of a three-node NATS cluster (JetStream
//! streams replicated three times) while clients hold WebSockets, channels publish
//! and chat replies stream. The node killed is the one holding the most gateway and
//! worker connections (from each node's `/connz`), so the most clients depend on a
//! failover. Nothing may be visible to clients but a pause: no WebSocket closed, no
//! chat reply lost or doubled (every chat acked before or during the kill completes
//! live, once, without the client reading `history`), no channel publication lost or
//! doubled; every gateway's and worker's readyz is 200 again within a bound, and
//! delivery resumes within a bound. The node is then started again and must rejoin.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::ctx::{Ctx, QUIESCE, check_chats, wait_mid_stream};
use super::nats_restart::ReadyLog;
use crate::client::User;
use crate::fleet::{Fleet, wait_for};
use crate::report::ScenarioReport;
use crate::stats::Summary;

/// Traffic runs this long before the kill, so the pause it causes stands out from
/// the normal spacing of deliveries.
const SETTLE: Duration = Duration::from_secs(1);
/// Every gateway's and worker's readyz is 200 again within this after the kill:
/// async-nats and the mux reconnect to another node within their backoff (2 s at
/// most), and a worker's consumer whose leader died needs a new one, elected
/// within nats-server's raft election timeout (4-9 s), slower on a loaded machine.
const READY_AGAIN: Duration = Duration::from_secs(20);
/// Channel and chat delivery pause at most this long across the kill: the same
/// reconnects and elections as [`READY_AGAIN`], and below the client's 8 s silence
/// after which it would read `history` (which this scenario counts as a loss).
const RESUME_BOUND: Duration = Duration::from_secs(8);
/// A chat accepted during the failover starts streaming within this after the
/// kill: when the killed node led the chat consumer, its new leader is elected in
/// 4-9 s and the workers' pulls reach it only later (up to 14 s in all measured
/// on a loaded two-core machine: see docs/faults.md, finding 5).
const QUEUED_RESUME: Duration = Duration::from_secs(20);
/// The killed node is back in the cluster (listening, and a current replica of the
/// JetStream meta group) within this after it starts again.
const REJOIN: Duration = crate::cluster::NATS_ELECTION_LIMIT;
/// Chats sent right after the kill, as a share of the streams in flight: enough
/// to hit the election window from several gateways.
const DURING_SHARE: usize = 2;
/// A `chat.send` refused during the failover (`UNAVAILABLE`: no JetStream leader
/// for the chat stream yet) is sent again this often, as an app would retry.
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// Every refused chat is accepted within this after the kill: a stream whose leader
/// died elects a new one within nats-server's raft election timeout (4-9 s) after
/// its followers notice, slower on a loaded two-core machine.
const ACCEPT_AGAIN: Duration = Duration::from_secs(20);
/// How often every user's deliveries are sampled to find pauses.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// The meta leader's election after the kill is polled this often.
const LEADER_POLL: Duration = Duration::from_millis(100);

pub async fn run(ctx: &mut Ctx, r: &mut ScenarioReport) -> Result<()> {
    let plan = ctx.plan.clone();
    let fleet = ctx.fleet("nk").await?;
    let traffic = fleet.traffic(plan.publish_every);
    tokio::time::sleep(SETTLE).await;
    let chatters: Vec<usize> = (0..plan.streams.min(fleet.users.len())).collect();
    let run = fleet.start_chats(&chatters, "s").await;
    wait_mid_stream(&fleet, &run).await?;

    // The victim: the node the most gateway and worker connections are on.
    let nodes = crate::cluster::nats_names(ctx.cluster.nats_count());
    let mut conns = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let clients = ctx.cluster.nats_connections(i).await.unwrap_or_default();
        let ours: Vec<String> = clients
            .into_iter()
            .filter(|n| n.starts_with("gateway-") || n.starts_with("worker-"))
            .collect();
        conns.insert(node.clone(), ours);
    }
    // Ties go to the node leading the most streams and consumers (their leaders
    // must be elected again), then to the lowest index.
    let leaders = ctx.cluster.nats_asset_leaders().await;
    let led = |n: &str| leaders.values().filter(|l| *l == n).count();
    let victim = (0..ctx.cluster.nats_count())
        .max_by_key(|i| {
            let n = &nodes[*i];
            (conns[n].len(), led(n), std::cmp::Reverse(*i))
        })
        .ok_or_else(|| anyhow!("no NATS node"))?;
    let victim_name = nodes[victim].clone();
    let leader_before = ctx.cluster.nats_meta_leader().await;
    r.measure("nats_connections_before", &conns);
    r.measure("meta_leader_before", &leader_before);
    r.measure("stream_leaders_before", &leaders);
    let victim_led: Vec<&str> = leaders
        .iter()
        .filter(|(_, l)| **l == victim_name)
        .map(|(a, _)| a.as_str())
        .collect();
    r.injected = format!(
        "kill -9 of NATS node {victim_name} of {} (holding {} of {} gateway/worker connections: {}; leader of {}; meta leader {}) with {} chat streams in flight, {} chats sent right after, {} channels publishing every {} ms",
        ctx.cluster.nats_count(),
        conns[&victim_name].len(),
        conns.values().map(Vec::len).sum::<usize>(),
        conns[&victim_name].join(", "),
        if victim_led.is_empty() {
            "no stream or consumer".to_owned()
        } else {
            victim_led.join(", ")
        },
        leader_before.as_deref().unwrap_or("none"),
        run.acked(),
        plan.streams / DURING_SHARE,
        plan.channels,
        plan.publish_every.as_millis()
    );

    let admins: Vec<u16> = ctx
        .cluster
        .gateways
        .iter()
        .chain(ctx.cluster.workers.iter())
        .map(|n| n.admin)
        .collect();
    let names: Vec<String> = ctx
        .cluster
        .gateways
        .iter()
        .chain(ctx.cluster.workers.iter())
        .map(|n| n.id.clone())
        .collect();
    let ready = ReadyLog::start(ctx.cluster.http().clone(), admins.clone());
    let sampler = Sampler::start(fleet.users.clone());
    let _ = fleet.take_latencies();

    let t_kill = Instant::now();
    ctx.cluster.nats_node(victim).kill9().await?;
    let election = {
        let (http, mut nodes) = ctx.cluster.nats_meta_probe();
        nodes.retain(|(n, _)| *n != victim_name);
        tokio::spawn(async move {
            loop {
                if let Some(l) = crate::cluster::meta_leader(&http, &nodes).await {
                    return Some((l, t_kill.elapsed()));
                }
                if t_kill.elapsed() > READY_AGAIN {
                    return None;
                }
                tokio::time::sleep(LEADER_POLL).await;
            }
        })
    };
    let during_users: Vec<usize> = (chatters.len()
        ..(chatters.len() + plan.streams / DURING_SHARE).min(fleet.users.len()))
        .collect();
    let mut during = fleet.start_chats(&during_users, "k").await;
    let first_refused = during.answers.len() - during.acked();
    let first_answers = during.answers.clone();
    let first_answer_ms = during.answer_summary();
    // Refused chats are sent again (new sessions) until accepted, as apps do.
    let mut attempts = 1u32;
    let mut accepted_again = None;
    loop {
        let acked_users: Vec<usize> = during
            .sessions
            .iter()
            .filter(|(_, s)| during.answers.get(s).is_some_and(|a| a == "ack"))
            .map(|(i, _)| *i)
            .collect();
        let pending: Vec<usize> = during_users
            .iter()
            .copied()
            .filter(|i| !acked_users.contains(i))
            .collect();
        if pending.is_empty() {
            accepted_again = Some(t_kill.elapsed());
            break;
        }
        if t_kill.elapsed() > ACCEPT_AGAIN {
            break;
        }
        tokio::time::sleep(RETRY_EVERY).await;
        attempts += 1;
        let again = fleet.start_chats(&pending, &format!("k{attempts}")).await;
        during.merge(again);
    }

    let resolved = fleet.wait_chats(&run, plan.bounds.chat_resolve).await;
    let resolved_during = fleet.wait_chats(&during, plan.bounds.chat_resolve).await;
    let all_ready = wait_for(READY_AGAIN, || {
        let s = ready.samples.lock().unwrap_or_else(|e| e.into_inner());
        (0..admins.len()).all(|i| {
            s.iter()
                .rev()
                .find(|(_, j, _)| *j == i)
                .is_some_and(|(t, _, c)| *t > t_kill && *c == 200)
        })
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    let stats = traffic.stop().await;
    tokio::time::sleep(QUIESCE).await;
    let samples = ready.stop();
    let deliveries = sampler.stop();
    let latencies: Vec<f64> = fleet.take_latencies().into_iter().map(f64::from).collect();
    let elected = election.await.ok().flatten();
    r.measure(
        "stream_leaders_after",
        ctx.cluster.nats_asset_leaders().await,
    );

    // readyz: how long each node was not 200 after the kill (0 if never).
    let mut not_ready_ms = BTreeMap::new();
    let mut worst_not_ready = 0.0f64;
    for (i, name) in names.iter().enumerate() {
        let last_bad = samples
            .iter()
            .filter(|(t, j, c)| *j == i && *t >= t_kill && *c != 200)
            .map(|(t, _, _)| t.duration_since(t_kill).as_millis() as f64)
            .fold(0.0, f64::max);
        worst_not_ready = worst_not_ready.max(last_bad);
        not_ready_ms.insert(name.clone(), last_bad);
    }
    r.measure("readyz_not_200_until_ms", &not_ready_ms);
    r.measure(
        "meta_leader_after_kill",
        elected
            .as_ref()
            .map(|(l, d)| format!("{l} after {} ms", d.as_millis())),
    );
    r.check(
        "every gateway's and worker's readyz 200 after the kill",
        format!("within {} s", READY_AGAIN.as_secs()),
        match all_ready {
            Some(_) => format!("last non-200 at {worst_not_ready:.0} ms"),
            None => "never".into(),
        },
        all_ready.is_some() && worst_not_ready <= READY_AGAIN.as_millis() as f64,
    );

    let conn = fleet.connection_tally(t_kill);
    r.measure("connections", &conn);
    r.check_zero(
        "client WebSockets closed after the kill",
        conn.server_close_count(),
    );

    // Chats: acked ones complete live, once; history holds each reply once.
    r.measure("resolved_after_kill_ms", resolved.map(|d| d.as_millis()));
    r.measure(
        "during_resolved_after_kill_ms",
        resolved_during.map(|d| d.as_millis()),
    );
    r.measure("during_first_answers", &first_answers);
    r.measure("during_answers", &during.answers);
    r.measure("during_answer_ms", during.answer_summary());
    r.measure("during_attempts", attempts);
    r.measure(
        "chat_send_accepted_again_after_ms",
        accepted_again.map(|d| d.as_millis()),
    );
    check_chats(r, &fleet, &run, "streams acked before the kill").await;
    check_live(r, &fleet, &run, "streams acked before the kill");
    check_chats(r, &fleet, &during, "chats sent during the failover").await;
    check_live(r, &fleet, &during, "chats sent during the failover");
    let refused = during.answers.len() - during.acked();
    let not_retryable = during
        .answers
        .values()
        .filter(|a| *a != "ack" && *a != "error UNAVAILABLE")
        .count();
    r.check_zero(
        "chat.send during the failover answered other than ack or UNAVAILABLE",
        not_retryable as u64,
    );
    r.check_max(
        "chat.send during the failover answered within",
        during.answer_summary().max,
        plan.bounds.answer_ms as f64,
        " ms",
    );
    r.check(
        "chat.send refused during the failover accepted again (sent every 500 ms)",
        format!("within {} s", ACCEPT_AGAIN.as_secs()),
        accepted_again.map_or("never".into(), |d| format!("{} ms", d.as_millis())),
        accepted_again.is_some(),
    );

    // Delivery pauses across the kill.
    let pauses = deliveries.pauses(t_kill, &chatters);
    let ch_pause = Summary::of(&pauses.channel_ms);
    let chat_pause = Summary::of(&pauses.chat_ms);
    let queued_pause = Summary::of(&deliveries.pauses(t_kill, &during_users).chat_ms);
    r.measure("channel_pause_ms", ch_pause);
    r.measure("chat_pause_ms", chat_pause);
    r.measure("queued_chat_pause_ms", queued_pause);
    r.measure("latency_after_kill_ms", Summary::of(&latencies));
    r.check_max(
        "channel delivery resumed after the kill within (longest pause of a subscriber)",
        ch_pause.max,
        RESUME_BOUND.as_millis() as f64,
        " ms",
    );
    r.check_max(
        "chat delivery resumed after the kill within (longest pause of a stream in flight)",
        chat_pause.max,
        RESUME_BOUND.as_millis() as f64,
        " ms",
    );
    r.check_max(
        "chats sent during the failover streaming within (longest wait for events)",
        queued_pause.max,
        QUEUED_RESUME.as_millis() as f64,
        " ms",
    );

    let ch = fleet.channel_tally(&stats, &[]);
    r.measure("channels", &ch);
    r.measure("traffic", &stats);
    r.check_zero(
        "publications lost by subscribers (gaps, unrecovered, missing tail)",
        ch.lost(),
    );
    r.check_zero("publications delivered twice", ch.dups);

    let t = fleet.chat_tally(&run);
    let td = fleet.chat_tally(&during);
    r.headline(format!(
        "{} of {} streams + {} of {} sent during live, {} from history, {} extra completes; {} sockets closed",
        t.live,
        t.acked,
        td.live,
        td.acked,
        t.filled_reconnect + t.filled_stall + td.filled_reconnect + td.filled_stall,
        t.extra_completes + td.extra_completes,
        conn.server_close_count()
    ));
    r.headline(format!(
        "chat.send after the kill: {first_refused} of {} refused UNAVAILABLE (max {:.0} ms), {refused} refusals in {attempts} attempts, all accepted after {}",
        first_answers.len(),
        first_answer_ms.max,
        accepted_again.map_or("never".into(), |d| format!("{} ms", d.as_millis()))
    ));
    r.headline(format!(
        "readyz 200 again by {worst_not_ready:.0} ms; delivery pause max channel {:.0} ms, chat in flight {:.0} ms, chat sent during {:.0} ms; meta leader {}",
        ch_pause.max,
        chat_pause.max,
        queued_pause.max,
        elected.as_ref().map_or("none".into(), |(l, d)| format!(
            "{l} after {} ms",
            d.as_millis()
        ))
    ));
    r.headline(format!("channels lost {}, dup {}", ch.lost(), ch.dups));
    fleet.stop().await;

    // The killed node starts again on its ports and store and rejoins.
    let t_start = Instant::now();
    ctx.cluster.start_nats_again().await?;
    let rejoin = t_start.elapsed();
    r.measure("rejoined_after_ms", rejoin.as_millis());
    r.check_max(
        "killed node started again rejoined the meta group (current replica) within",
        rejoin.as_millis() as f64,
        REJOIN.as_millis() as f64,
        " ms",
    );
    Ok(())
}

/// Every acked chat resolved by its live `chat.complete`, once: none filled from
/// `history`, none answered `chat.error`, no second `chat.complete`.
fn check_live(r: &mut ScenarioReport, fleet: &Fleet, run: &crate::fleet::ChatRun, what: &str) {
    let t = fleet.chat_tally(run);
    r.check(
        &format!("{what}: completed live (no history read, no chat.error)"),
        format!("{} of {}", t.acked, t.acked),
        format!(
            "{} of {} (history {}, errors {}, unresolved {})",
            t.live,
            t.acked,
            t.filled_reconnect + t.filled_stall,
            t.errors,
            t.unresolved
        ),
        t.live == t.acked && t.acked > 0,
    );
    r.check_zero(
        &format!("{what}: second chat.complete for a request"),
        t.extra_completes,
    );
}

/// Per user, every [`SAMPLE_EVERY`]: channel messages received and progress of its
/// chats (chunks + completes + errors), to find how long delivery paused.
struct Sampler {
    samples: Arc<Mutex<Vec<Row>>>,
    stop: CancellationToken,
}

#[derive(Debug, Default, Serialize)]
struct Pauses {
    /// Per subscriber: its longest pause between deliveries that ended after the kill.
    channel_ms: Vec<f64>,
    /// Per chat user: the same for its chat events, until its reply completed.
    chat_ms: Vec<f64>,
}

/// One sample: when, and per user (channel messages received, chat progress).
type Row = (Instant, Vec<(u64, u64)>);

struct Deliveries(Vec<Row>);

impl Sampler {
    fn start(users: Vec<Arc<User>>) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (s, st) = (samples.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = st.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let row: Vec<(u64, u64)> = users
                    .iter()
                    .map(|u| {
                        let st = u.state();
                        let chat: u64 = st
                            .chats
                            .values()
                            .flat_map(|c| c.streams.values())
                            .map(|s| {
                                s.chunks.len() as u64
                                    + u64::from(s.completes)
                                    + u64::from(s.error.is_some())
                            })
                            .sum();
                        (st.received, chat)
                    })
                    .collect();
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((Instant::now(), row));
            }
        });
        Sampler { samples, stop }
    }

    fn stop(self) -> Deliveries {
        self.stop.cancel();
        Deliveries(std::mem::take(
            &mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

impl Deliveries {
    /// The longest pause per user that was still going on at the kill or began after
    /// it: from the last change before, to the next change. A chat's pauses end
    /// with its last event (a finished reply is not paused).
    fn pauses(&self, t_kill: Instant, chat_users: &[usize]) -> Pauses {
        let mut p = Pauses::default();
        let Some((_, first)) = self.0.first() else {
            return p;
        };
        let longest = |i: usize, pick: fn(&(u64, u64)) -> u64| -> f64 {
            let mut last_change = self.0[0].0;
            let mut prev = pick(&first[i]);
            let mut worst = 0.0f64;
            for (t, row) in &self.0 {
                let v = pick(&row[i]);
                if v != prev {
                    if *t > t_kill {
                        worst = worst.max(t.duration_since(last_change).as_secs_f64() * 1000.0);
                    }
                    last_change = *t;
                    prev = v;
                }
            }
            worst
        };
        for i in 0..first.len() {
            p.channel_ms.push(longest(i, |x| x.0));
        }
        for &i in chat_users {
            if i < first.len() {
                p.chat_ms.push(longest(i, |x| x.1));
            }
        }
        p
    }
}
