//! Scenario 8: the soak. The fleet stays under load for the configured time with
//! connection churn (clients closing normally and coming back), chat streams and
//! channel traffic. Connection success stays above 99.9 %, no client sees an
//! abnormal close (1006) or any other close it did not ask for, nothing is lost,
//! and gateway and worker memory stays flat after warm-up (growth per hour
//! reported and bounded).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::ctx::{Ctx, QUIESCE, check_chats};
use crate::fleet::{ChatRun, REQUEST_TIMEOUT};
use crate::process::rss_bytes;
use crate::report::ScenarioReport;
use crate::stats::slope;

/// Memory is sampled this often.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// The first part of the soak is warm-up (allocator pools, caches fill).
const WARMUP_SHARE: f64 = 0.25;
/// Below this length a per-hour extrapolation is noise: growth is bounded absolutely.
const EXTRAPOLATE_FROM: Duration = Duration::from_secs(300);
/// Absolute growth bound after warm-up for short soaks.
const SHORT_GROWTH: u64 = 16 * 1024 * 1024;
/// A churned client stays away between these (ms).
const AWAY_MS: (u64, u64) = (200, 1000);

pub async fn run(ctx: &mut Ctx, r: &mut ScenarioReport) -> Result<()> {
    let plan = ctx.plan.clone();
    let fleet = Arc::new(ctx.fleet("sk").await?);
    r.injected = format!(
        "{} s of load on {} users: {} connections closed and reopened per second, {} chats per second, {} channels publishing every {} ms",
        plan.soak.as_secs(),
        plan.users,
        plan.churn_per_sec,
        plan.soak_chats_per_sec,
        plan.channels,
        plan.publish_every.as_millis()
    );
    let traffic = fleet.traffic(plan.publish_every);
    let t0 = Instant::now();
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();

    // Memory of every gateway and worker.
    let pids: Vec<(String, u32)> = ctx
        .cluster
        .gateways
        .iter()
        .chain(ctx.cluster.workers.iter())
        .filter_map(|n| n.proc.pid().map(|p| (n.id.clone(), p)))
        .collect();
    let samples: Arc<Mutex<Vec<(f64, usize, u64)>>> = Arc::default();
    {
        let (stop, samples, pids) = (stop.clone(), samples.clone(), pids.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let t = t0.elapsed().as_secs_f64();
                for (k, (_, pid)) in pids.iter().enumerate() {
                    if let Some(b) = rss_bytes(*pid) {
                        samples
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((t, k, b));
                    }
                }
            }
        });
    }
    // Churn: publishers stay (their channel's traffic is the yardstick). Churned
    // users and chatting users are disjoint halves: a chat cut short by the suite's
    // own close would be the suite's doing, not the cluster's.
    let publishers = plan.channels;
    let churners = (fleet.users.len() - publishers) / 2;
    let chatters = fleet.users.len() - publishers - churners;
    {
        let (stop, fleet) = (stop.clone(), fleet.clone());
        let every = Duration::from_secs_f64(1.0 / plan.churn_per_sec);
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let i = publishers + rand::random_range(0..churners);
                let away = rand::random_range(AWAY_MS.0..AWAY_MS.1);
                if fleet.users[i].connected() {
                    fleet.users[i].churn(Duration::from_millis(away));
                }
            }
        });
    }
    // Chats, round robin over the users (well under the per-user rate limit).
    let chats: Arc<Mutex<ChatRun>> = Arc::default();
    {
        let (stop, fleet, chats) = (stop.clone(), fleet.clone(), chats.clone());
        let every = Duration::from_secs_f64(1.0 / plan.soak_chats_per_sec);
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut n = 0usize;
            let mut inflight = JoinSet::new();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    Some(_) = inflight.join_next(), if !inflight.is_empty() => continue,
                    _ = tick.tick() => {}
                }
                n += 1;
                let i = publishers + churners + n % chatters;
                let session = format!("{}-soak-{n}", fleet.tag);
                let u = fleet.users[i].clone();
                let chats = chats.clone();
                inflight.spawn(async move {
                    let r = u.chat(&session, REQUEST_TIMEOUT).await;
                    let mut c = chats.lock().unwrap_or_else(|e| e.into_inner());
                    c.sessions.push((i, session.clone()));
                    c.answers.insert(
                        session,
                        match r {
                            Ok(v) if v["type"] == "ack" => "ack".into(),
                            Ok(v) => format!("error {}", v["code"].as_str().unwrap_or("?")),
                            Err(e) => format!("no answer: {e}"),
                        },
                    );
                });
            }
            while inflight.join_next().await.is_some() {}
        });
    }

    tokio::time::sleep(plan.soak).await;
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    let run = chats.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // Churned clients come back, then the last replies arrive.
    let _ = crate::fleet::wait_for(Duration::from_secs(10), || {
        fleet.users.iter().all(|u| u.connected())
    })
    .await;
    let resolved = fleet.wait_chats(&run, plan.bounds.chat_resolve).await;
    let stats = traffic.stop().await;
    tokio::time::sleep(QUIESCE).await;

    // Connections.
    let (mut attempts, mut successes) = (0u64, 0u64);
    for u in &fleet.users {
        let st = u.state();
        attempts += st.attempts;
        successes += st.successes;
    }
    let ratio = if attempts == 0 {
        0.0
    } else {
        successes as f64 / attempts as f64
    };
    let conn = fleet.connection_tally(t0);
    r.measure("connection_attempts", attempts);
    r.measure("connection_successes", successes);
    r.measure("connections", &conn);
    r.check(
        "connection success ratio",
        format!(">= {}", plan.bounds.soak_success),
        format!("{ratio:.5} ({successes} of {attempts})"),
        ratio >= plan.bounds.soak_success,
    );
    r.check_zero(
        "abnormal closes (1006) seen by clients",
        conn.server_closes.get("1006").copied().unwrap_or(0),
    );
    r.check_zero(
        "other closes the suite did not ask for",
        conn.server_close_count(),
    );

    // Chats and channels.
    let acked = run.acked();
    r.measure("chats_sent", run.sessions.len());
    r.measure("chats_acked", acked);
    r.measure(
        "chats_resolved_ms_after_end",
        resolved.map(|d| d.as_millis()),
    );
    let not_acked: Vec<&String> = run.answers.values().filter(|a| *a != "ack").collect();
    r.measure("chat_answers_not_ack", &not_acked);
    r.check_zero("chat.send not acked", not_acked.len() as u64);
    check_chats(r, &fleet, &run, "soak chats").await;
    let t = fleet.chat_tally(&run);
    r.check_zero("chats answered chat.error", t.errors);
    let ch = fleet.channel_tally(&stats, &[]);
    r.measure("channels", &ch);
    r.measure("traffic", &stats);
    r.check_zero("publications lost by subscribers", ch.lost());
    r.check_zero("publications delivered twice", ch.dups);
    let lat = crate::stats::Summary::of_ms(&fleet.take_latencies());
    r.measure("delivery_latency_ms", lat);

    // Memory after warm-up.
    let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let warm = plan.soak.as_secs_f64() * WARMUP_SHARE;
    let mut growth = Vec::new();
    let mut worst_text = Vec::new();
    let long = plan.soak >= EXTRAPOLATE_FROM;
    let mut mem_ok = true;
    for (k, (name, _)) in pids.iter().enumerate() {
        let pts: Vec<(f64, f64)> = samples
            .iter()
            .filter(|(t, j, _)| *j == k && *t >= warm)
            .map(|(t, _, b)| (*t, *b as f64))
            .collect();
        if pts.len() < 2 {
            mem_ok = false;
            worst_text.push(format!("{name}: too few samples"));
            continue;
        }
        let per_hour = slope(&pts) * 3600.0;
        let first = pts[0].1;
        let last = pts[pts.len() - 1].1;
        let abs = last - first;
        let ok = if long {
            per_hour <= plan.bounds.soak_growth_per_hour as f64
        } else {
            abs <= SHORT_GROWTH as f64
        };
        mem_ok &= ok;
        growth.push(
            serde_json::json!({"process": name, "rss_after_warmup_mb": first / 1048576.0,
            "rss_end_mb": last / 1048576.0, "growth_mb": abs / 1048576.0,
            "growth_mb_per_hour": per_hour / 1048576.0}),
        );
        worst_text.push(format!(
            "{name} {:.1} MB/h ({:+.1} MB)",
            per_hour / 1048576.0,
            abs / 1048576.0
        ));
    }
    r.measure("memory", &growth);
    r.check(
        "gateway and worker memory flat after warm-up",
        if long {
            format!(
                "<= {} MB/h each",
                plan.bounds.soak_growth_per_hour / 1048576
            )
        } else {
            format!(
                "<= {} MB growth each (soak under {} s: too short to extrapolate per hour)",
                SHORT_GROWTH / 1048576,
                EXTRAPOLATE_FROM.as_secs()
            )
        },
        worst_text.join("; "),
        mem_ok,
    );

    r.headline(format!(
        "{successes}/{attempts} connects ok, {} unasked closes; {} chats, {} channel msgs, lost {}",
        conn.server_close_count(),
        acked,
        ch.received,
        ch.lost()
    ));
    r.headline(worst_text.join("; "));
    if let Ok(f) = Arc::try_unwrap(fleet) {
        f.stop().await;
    }
    Ok(())
}
