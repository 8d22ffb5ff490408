//! Scenario 6: the upstreams fail. First the team backend dies (mock-backend
//! killed): logins arrive `degraded: true` (with the cached teams for users seen
//! before), each worker's circuit breaker opens and stops calling the backend, and
//! closes again once the backend is back. Then the LLM answers 429 with
//! `Retry-After: 1` for a while, then 500, then recovers: the workers' retries honour
//! the hint (measured at the LLM tap), and no chat is lost: each ends complete, the
//! client retrying after a retryable `chat.error` as an app would.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::ctx::{Ctx, check_chats};
use crate::client::probe_auth;
use crate::fleet::{ChatRun, Fleet, REQUEST_TIMEOUT, src_ip, wait_for};
use crate::report::ScenarioReport;
use crate::tap::TapRecord;

/// Logins are tried this often while waiting for a breaker to move.
const LOGIN_EVERY: Duration = Duration::from_millis(100);
/// Logins made while the breakers are open (their backend calls are counted).
const OPEN_LOGINS: usize = 20;
/// A client retries a chat after a retryable `chat.error` after this long.
const CLIENT_RETRY_AFTER: Duration = Duration::from_millis(1500);
/// Clock slack when comparing the tap's request times to `Retry-After`.
const SLACK: Duration = Duration::from_millis(50);
/// The worker's backoff floor without a hint: base 500 ms times the 0.75 jitter.
const MIN_BACKOFF: Duration = Duration::from_millis(375);
/// Logins (degraded false again) after the breakers closed.
const AFTER_LOGINS: usize = 5;

async fn breakers(ctx: &Ctx) -> Vec<String> {
    let mut out = Vec::new();
    for w in &ctx.cluster.workers {
        let s = ctx
            .cluster
            .readyz_json(w.admin)
            .await
            .and_then(|v| v["breaker"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "?".into());
        out.push(s);
    }
    out
}

async fn backend_calls(ctx: &Ctx) -> f64 {
    let mut sum = 0.0;
    for w in &ctx.cluster.workers {
        sum += ctx
            .cluster
            .metric_sum(w.admin, shared::metrics::WORKER_BACKEND_CALLS)
            .await
            .unwrap_or(0.0);
    }
    sum
}

/// Logs in fresh users every [`LOGIN_EVERY`] until `done` holds for the breakers.
async fn login_until(
    ctx: &Ctx,
    tag: &str,
    n: &mut usize,
    limit: Duration,
    degraded: &mut Vec<bool>,
    done: impl Fn(&[String]) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if done(&breakers(ctx).await) {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        *n += 1;
        if let Ok(a) = probe_auth(&ctx.env, &format!("{tag}-login{n}"), src_ip(*n)).await {
            degraded.push(a.degraded);
        }
        tokio::time::sleep(LOGIN_EVERY).await;
    }
}

/// `worker::context::CONTEXT_SHARE_FOR` (2 s), with a margin.
const SHARED_ANSWER_WINDOW: Duration = Duration::from_millis(2500);

pub async fn run(ctx: &mut Ctx, r: &mut ScenarioReport) -> Result<()> {
    let plan = ctx.plan.clone();
    let cooldown = Duration::from_millis(plan.cluster.breaker_cooldown_ms);
    let fleet = ctx.fleet("up").await?;
    r.injected = format!(
        "mock-backend killed (breaker cooldown {} ms) and started again; then mock-llm restarted answering 429 (Retry-After: 1) for {} s, then 500 for {} s, then normally, with {} chats sent into it",
        plan.cluster.breaker_cooldown_ms,
        plan.llm_fault.as_secs(),
        plan.llm_fault.as_secs(),
        plan.streams
    );
    let tag = fleet.tag.clone();
    let mut n = 0usize;

    // === team backend down ===
    ctx.cluster.backend.kill9().await?;
    let mut degraded_down = Vec::new();
    let opened = login_until(
        ctx,
        &tag,
        &mut n,
        plan.bounds.breaker_open,
        &mut degraded_down,
        |b| b.iter().all(|s| s == "open"),
    )
    .await;
    r.check(
        "both workers' breakers open after the backend died",
        format!("within {} s", plan.bounds.breaker_open.as_secs()),
        opened.map_or(format!("not open: {:?}", breakers(ctx).await), |d| {
            format!("{} ms ({} logins)", d.as_millis(), degraded_down.len())
        }),
        opened.is_some(),
    );
    // While open: logins are degraded and the backend is left alone.
    let calls_before = backend_calls(ctx).await;
    let t_open = Instant::now();
    for _ in 0..OPEN_LOGINS {
        n += 1;
        if let Ok(a) = probe_auth(&ctx.env, &format!("{tag}-login{n}"), src_ip(n)).await {
            degraded_down.push(a.degraded);
        }
    }
    let open_for = t_open.elapsed();
    let calls_open = backend_calls(ctx).await - calls_before;
    // Each worker may probe once per cooldown (two calls: teams and tasks).
    let probes = (open_for.as_secs_f64() / cooldown.as_secs_f64()).ceil() + 1.0;
    let allowed = ctx.cluster.workers.len() as f64 * 2.0 * probes;
    r.measure("backend_calls_while_open", calls_open);
    r.check_max(
        &format!("backend calls during {OPEN_LOGINS} logins with the breakers open"),
        calls_open,
        allowed,
        "",
    );
    // A known user reconnecting gets the cached teams.
    let known = fleet.users[0].clone();
    // Workers share a fresh answer with a user's next logins for a moment (a burst of
    // tabs costs one backend call); a login inside that window is rightly served the
    // fresh answer, so the known user comes back once it has passed.
    tokio::time::sleep(SHARED_ANSWER_WINDOW).await;
    // Counted from now: the user may have reconnected before (a rate-limited first
    // attempt, a rolling restart's leftovers), and only a login after the kill counts.
    let before = known.state().auths.len();
    known.churn(Duration::from_millis(100));
    let again = wait_for(Duration::from_secs(10), || {
        let st = known.state();
        st.connected && st.auths.len() > before
    })
    .await;
    let cached = known.state().auths.last().map(|a| (a.degraded, a.teams));
    r.check(
        "a known user logging in while the backend is down: degraded, cached teams",
        "degraded: true, teams >= 1",
        format!("{cached:?}"),
        again.is_some() && cached.is_some_and(|(d, t)| d && t >= 1),
    );
    let degraded_count = degraded_down.iter().filter(|d| **d).count();
    r.check(
        "logins while the backend is down: authenticated with degraded: true",
        format!("{} of {}", degraded_down.len(), degraded_down.len()),
        format!("{degraded_count} of {}", degraded_down.len()),
        degraded_count == degraded_down.len() && !degraded_down.is_empty(),
    );

    ctx.cluster.start_backend_again().await?;
    let mut degraded_up = Vec::new();
    let closed = login_until(
        ctx,
        &tag,
        &mut n,
        cooldown * 3 + Duration::from_secs(10),
        &mut degraded_up,
        |b| b.iter().all(|s| s == "closed"),
    )
    .await;
    r.check(
        "both breakers closed again after the backend came back",
        "within 3 x cooldown + 10 s",
        closed.map_or(format!("{:?}", breakers(ctx).await), |d| {
            format!("{} ms", d.as_millis())
        }),
        closed.is_some(),
    );
    let mut fresh = 0;
    for _ in 0..AFTER_LOGINS {
        n += 1;
        if let Ok(a) = probe_auth(&ctx.env, &format!("{tag}-login{n}"), src_ip(n)).await
            && !a.degraded
            && a.teams >= 1
        {
            fresh += 1;
        }
    }
    r.check(
        "logins after the recovery: degraded: false with teams",
        format!("{AFTER_LOGINS} of {AFTER_LOGINS}"),
        format!("{fresh} of {AFTER_LOGINS}"),
        fresh == AFTER_LOGINS,
    );

    // === LLM 429, then 500 ===
    let tap_from = ctx.cluster.tap()?.records().len();
    ctx.cluster
        .restart_llm(&["--p-429", "1", "--retry-after", "1"])
        .await?;
    let t_429 = Instant::now();
    let chatters: Vec<usize> = (1..=plan.streams.min(fleet.users.len() - 1)).collect();
    let runs = fleet.start_chats(&chatters, "llm").await;
    let deadline = Instant::now() + plan.bounds.chat_resolve + plan.llm_fault * 2;
    // The phases change while the clients keep retrying (as apps would).
    let phases = async {
        tokio::time::sleep(plan.llm_fault.saturating_sub(t_429.elapsed())).await;
        ctx.cluster.restart_llm(&["--p-500", "1"]).await?;
        let t_500 = Instant::now();
        tokio::time::sleep(plan.llm_fault).await;
        ctx.cluster.restart_llm(&[]).await?;
        anyhow::Ok((t_500, Instant::now()))
    };
    let (phases, client_retries) =
        tokio::join!(phases, retry_until_complete(&fleet, &runs, deadline));
    let (t_500, t_ok) = phases?;
    let t = fleet.chat_tally(&runs);
    let completed = runs
        .sessions
        .iter()
        .filter(|(i, s)| {
            fleet.users[*i]
                .state()
                .chats
                .get(s)
                .and_then(|c| c.latest().map(|(_, x)| x.reply().is_some()))
                .unwrap_or(false)
        })
        .count();
    r.measure("llm_chat", &t);
    r.measure("client_retries", client_retries);
    r.check(
        "chats sent into the LLM outage that ended complete (client retries retryable errors)",
        format!("{} of {}", runs.sessions.len(), runs.sessions.len()),
        format!("{completed} of {}", runs.sessions.len()),
        completed == runs.sessions.len() && completed > 0,
    );
    check_chats(r, &fleet, &runs, "chats through the LLM outage").await;

    // Retry-After at the tap.
    let mut records: Vec<TapRecord> = ctx.cluster.tap()?.records();
    let records = records.split_off(tap_from.min(records.len()));
    let mut by_marker: HashMap<String, Vec<&TapRecord>> = HashMap::new();
    for rec in &records {
        if let Some(m) = &rec.marker {
            by_marker.entry(m.clone()).or_default().push(rec);
        }
    }
    let (mut after_429, mut early_429, mut after_5xx, mut early_5xx) = (0, 0, 0, 0);
    let mut min_gap_429 = f64::INFINITY;
    for recs in by_marker.values() {
        for w in recs.windows(2) {
            let gap = w[1].at.duration_since(w[0].at);
            if w[0].status == 429 {
                after_429 += 1;
                min_gap_429 = min_gap_429.min(gap.as_secs_f64() * 1000.0);
                if gap + SLACK < Duration::from_secs(1) {
                    early_429 += 1;
                }
            } else if w[0].status >= 500 {
                after_5xx += 1;
                if gap + SLACK < MIN_BACKOFF {
                    early_5xx += 1;
                }
            }
        }
    }
    let statuses: HashMap<u16, usize> = records.iter().fold(HashMap::new(), |mut m, x| {
        *m.entry(x.status).or_insert(0) += 1;
        m
    });
    r.measure("llm_statuses_at_tap", &statuses);
    r.measure("retries_after_429", after_429);
    r.measure("min_gap_after_429_ms", min_gap_429);
    r.measure("retries_after_5xx", after_5xx);
    r.measure(
        "phases_ms",
        serde_json::json!({"429": t_500.duration_since(t_429).as_millis(),
            "500": t_ok.duration_since(t_500).as_millis()}),
    );
    r.check(
        "retries after a 429 waited Retry-After (1 s), measured at the LLM",
        "0 early",
        format!("{early_429} early of {after_429} (shortest gap {min_gap_429:.0} ms)"),
        early_429 == 0 && after_429 > 0,
    );
    r.check(
        "retries after a 5xx waited the backoff (>= 375 ms)",
        "0 early",
        format!("{early_5xx} early of {after_5xx}"),
        early_5xx == 0 && after_5xx > 0,
    );

    r.headline(format!(
        "breakers open after {} ms, closed {} ms after backend back; {calls_open} backend calls while open",
        opened.map_or(-1, |d| d.as_millis() as i64),
        closed.map_or(-1, |d| d.as_millis() as i64)
    ));
    r.headline(format!(
        "LLM outage: {completed}/{} chats complete, {client_retries} client retries, {after_429} retries after 429 (min gap {min_gap_429:.0} ms)",
        runs.sessions.len()
    ));
    fleet.stop().await;
    Ok(())
}

/// Retries every chat whose latest request ended in a retryable `chat.error`, after
/// [`CLIENT_RETRY_AFTER`], until each one completed or `deadline`. Returns the
/// number of retries.
async fn retry_until_complete(fleet: &Fleet, runs: &ChatRun, deadline: Instant) -> usize {
    let mut retries = 0;
    loop {
        let mut retry = Vec::new();
        let mut pending = 0;
        for (i, s) in &runs.sessions {
            let st = fleet.users[*i].state();
            let Some(chat) = st.chats.get(s) else {
                continue;
            };
            match chat.latest() {
                Some((_, x)) if x.complete.is_some() || x.filled.is_some() => {}
                Some((_, x)) if x.error.as_ref().is_some_and(|(_, r)| *r) => {
                    if chat.last_event.elapsed() >= CLIENT_RETRY_AFTER {
                        retry.push((*i, s.clone()));
                    } else {
                        pending += 1;
                    }
                }
                Some((_, x)) if x.error.is_some() => {}
                _ => pending += 1,
            }
        }
        if (retry.is_empty() && pending == 0) || Instant::now() > deadline {
            return retries;
        }
        for (i, s) in retry {
            retries += 1;
            let _ = fleet.users[i].chat(&s, REQUEST_TIMEOUT).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
