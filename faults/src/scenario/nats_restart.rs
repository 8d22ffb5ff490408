//! Scenario 3: NATS stopped (SIGTERM), kept down, started again with the same
//! JetStream store. Connected clients stay connected; `chat.send` during the outage
//! is answered `UNAVAILABLE` (no hang); chat requests acked before the stop complete
//! after it; every gateway's `readyz` is 503 during the outage and 200 after.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use super::ctx::{Ctx, QUIESCE, check_chats, wait_mid_stream};
use crate::fleet::wait_for;
use crate::report::ScenarioReport;

/// readyz is polled this often during the scenario.
const POLL: Duration = Duration::from_millis(100);
/// All gateways ready again within this after NATS is back (reconnect backoff).
const RECOVER: Duration = Duration::from_secs(15);

/// Polls the readyz of admin ports until stopped: (time, port index, status).
pub struct ReadyLog {
    pub samples: Arc<Mutex<Vec<(Instant, usize, u16)>>>,
    stop: CancellationToken,
}

impl ReadyLog {
    pub fn start(http: reqwest::Client, admins: Vec<u16>) -> ReadyLog {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (s, st) = (samples.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            loop {
                tokio::select! {
                    _ = st.cancelled() => return,
                    _ = tick.tick() => {}
                }
                for (i, &a) in admins.iter().enumerate() {
                    let code = crate::cluster::readyz(&http, a).await;
                    s.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((Instant::now(), i, code));
                }
            }
        });
        ReadyLog { samples, stop }
    }

    pub fn stop(&self) -> Vec<(Instant, usize, u16)> {
        self.stop.cancel();
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub async fn run(ctx: &mut Ctx, r: &mut ScenarioReport) -> Result<()> {
    let plan = ctx.plan.clone();
    let fleet = ctx.fleet("nr").await?;
    let traffic = fleet.traffic(plan.publish_every);
    let chatters: Vec<usize> = (0..plan.streams.min(fleet.users.len())).collect();
    let run = fleet.start_chats(&chatters, "s").await;
    wait_mid_stream(&fleet, &run).await?;
    r.injected = format!(
        "NATS stopped (SIGTERM) for {} s with {} chat streams in flight, then started with the same JetStream store",
        plan.outage.as_secs(),
        run.acked()
    );

    let gw_admins: Vec<u16> = ctx.cluster.gateways.iter().map(|g| g.admin).collect();
    let ready = ReadyLog::start(ctx.cluster.http().clone(), gw_admins.clone());
    let t_stop = Instant::now();
    ctx.cluster.nats.term(Duration::from_secs(10)).await?;
    // Give readiness a moment to notice, then try to chat during the outage.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during: Vec<usize> = (plan.streams..(plan.streams + 5).min(fleet.users.len())).collect();
    let outage_run = fleet.start_chats(&during, "down").await;
    let rest = plan.outage.saturating_sub(t_stop.elapsed());
    tokio::time::sleep(rest).await;
    let t_start = Instant::now();
    ctx.cluster.start_nats_again().await?;
    let recovered = wait_for(RECOVER, || {
        let s = ready.samples.lock().unwrap_or_else(|e| e.into_inner());
        (0..gw_admins.len()).all(|i| {
            s.iter()
                .rev()
                .find(|(_, j, _)| *j == i)
                .is_some_and(|(t, _, c)| *t > t_start && *c == 200)
        })
    })
    .await;
    let resolved = fleet.wait_chats(&run, plan.bounds.chat_resolve).await;
    let samples = ready.stop();
    let stats = traffic.stop().await;
    tokio::time::sleep(QUIESCE).await;

    // readyz: each gateway 503 within the bound after the stop, and not 200 again
    // before NATS was back.
    let mut flip_ms = Vec::new();
    let mut early_200 = 0u64;
    for i in 0..gw_admins.len() {
        let first_503 = samples
            .iter()
            .find(|(t, j, c)| *j == i && *t >= t_stop && *c == 503)
            .map(|(t, _, _)| t.duration_since(t_stop).as_millis() as f64);
        flip_ms.push(first_503.unwrap_or(f64::INFINITY));
        if let Some(f) = first_503 {
            let flipped = t_stop + Duration::from_millis(f as u64);
            early_200 += samples
                .iter()
                .filter(|(t, j, c)| *j == i && *t > flipped && *t < t_start && *c == 200)
                .count() as u64;
        }
    }
    let worst_flip = flip_ms.iter().copied().fold(0.0, f64::max);
    r.measure("readyz_503_after_ms", &flip_ms);
    r.check_max(
        "every gateway's readyz 503 after NATS stopped, within",
        worst_flip,
        plan.bounds.readyz_flip_ms as f64,
        " ms",
    );
    r.check_zero("readyz 200 samples while NATS was down", early_200);
    r.check(
        "every gateway's readyz 200 again after NATS started",
        format!("within {} s", RECOVER.as_secs()),
        recovered.map_or("never".into(), |d| format!("{} ms", d.as_millis())),
        recovered.is_some(),
    );

    let conn = fleet.connection_tally(t_stop);
    r.measure("connections", &conn);
    r.check_zero(
        "clients disconnected during or after the outage",
        conn.server_close_count(),
    );

    let answers: Vec<&String> = outage_run.answers.values().collect();
    let unavailable = answers
        .iter()
        .filter(|a| a.as_str() == "error UNAVAILABLE")
        .count();
    let summary = outage_run.answer_summary();
    r.measure("outage_chat_answers", &outage_run.answers);
    r.measure("outage_chat_answer_ms", summary);
    r.check(
        "chat.send during the outage answered UNAVAILABLE",
        format!("{} of {}", answers.len(), answers.len()),
        format!("{unavailable} of {}", answers.len()),
        unavailable == answers.len() && !answers.is_empty(),
    );
    r.check_max(
        "chat.send during the outage answered within",
        summary.max,
        plan.bounds.answer_ms as f64,
        " ms",
    );

    r.measure("resolved_after_stop_ms", resolved.map(|d| d.as_millis()));
    check_chats(r, &fleet, &run, "streams acked before the stop").await;

    let ch = fleet.channel_tally(&stats, &[]);
    r.measure("channels", &ch);
    r.measure("traffic", &stats);
    r.check_zero("publications lost by subscribers (acked ones)", ch.lost());
    r.check_zero("publications delivered twice", ch.dups);

    let t = fleet.chat_tally(&run);
    r.headline(format!(
        "readyz 503 after <= {worst_flip:.0} ms, 200 again {} ms after start",
        recovered.map_or(-1, |d| d.as_millis() as i64)
    ));
    r.headline(format!(
        "{} streams: {} live, {} from history; {} clients closed",
        t.acked,
        t.live,
        t.filled_reconnect + t.filled_stall,
        conn.server_close_count()
    ));
    fleet.stop().await;
    Ok(())
}
