//! Scenario 9: `kill -9` of a Redis Cluster primary (the one holding the most of
//! the load's channels and chat sessions) while clients connect, publish and chat.
//! Its replica is promoted after the cluster's node timeout; then, within a stated
//! bound, new connections and publications whose keys live in the dead primary's
//! slots succeed again on every gateway (probed directly, so each gateway's own
//! cluster client is measured, not HAProxy's choice). Chats acked before the kill
//! complete and are in history exactly once; subscribers keep receiving with no
//! loss and no duplicate, and those whose channel stream was lost with the primary
//! (written but not yet replicated) are told of the new epoch exactly once, the
//! others never.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::json;
use tokio::task::JoinSet;

use super::ctx::{Ctx, check_chats, check_delivery, wait_mid_stream};
use crate::client::{Env, now_ms, probe_auth};
use crate::cluster::{Cluster, RedisMode, key_slot, parse_primaries, redis_text};
use crate::fleet::{REQUEST_TIMEOUT, src_ip};
use crate::report::ScenarioReport;
use crate::stats::Summary;

/// New connections and publications in the dead primary's slots succeed again
/// within this after the kill: the node timeout (2 s) until the primary is marked
/// failed, the replica's election (0.5-1.5 s), then each gateway's cluster client
/// notices the new slot owner on its next retry (backoff up to 2 s), with room
/// for a loaded two-core machine.
const RECOVER: Duration = Duration::from_secs(15);
/// Probes keep going this long at most, so a slow recovery is measured, not cut.
const PROBE_LIMIT: Duration = Duration::from_secs(30);
/// A probe loop starts an attempt this often (one loop per gateway and kind).
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// Consecutive successes that make a probe loop call its gateway recovered (one
/// success between failures is not a recovery).
const PROBE_STREAK: usize = 5;
/// Logins in the other primaries' slots are watched at least this long after the
/// kill (measured, not bounded): past the node timeout, the election and the slot
/// map refresh (about 4 s here), where a cluster requiring full slot coverage
/// refuses every slot for a moment.
const OTHER_SLOTS_WATCH: Duration = Duration::from_secs(8);
/// Distinct names tried when looking for a user id or channel in given slots (one
/// in three lands in a given primary's slots).
const NAME_TRIES: usize = 10_000;

/// What one probe loop saw.
#[derive(Debug, Clone, Default, Serialize)]
struct ProbeRun {
    gateway: String,
    attempts: u64,
    failures: u64,
    /// From the kill to the answer of the first attempt after the last failure:
    /// from then on every attempt succeeds.
    recovered_ms: Option<u64>,
    /// From the kill to the start of that attempt (it may have waited inside the
    /// gateway for the promotion).
    recovered_attempt_started_ms: Option<u64>,
    /// Failed attempts started after the first one that succeeded (flapping while
    /// slot maps settle).
    failures_after_first_success: u64,
    answer_ms: Summary,
    causes: BTreeMap<String, u64>,
}

pub async fn run(ctx: &mut Ctx, r: &mut ScenarioReport) -> Result<()> {
    if ctx.cluster.redis_mode != RedisMode::Cluster {
        bail!("redis-failover needs the cluster started with Redis Cluster");
    }
    let plan = ctx.plan.clone();
    let fleet = ctx.fleet("rf").await?;
    let traffic = fleet.traffic(plan.publish_every);
    let chatters: Vec<usize> = (0..plan.streams.min(fleet.users.len())).collect();
    let run = fleet.start_chats(&chatters, "s").await;
    wait_mid_stream(&fleet, &run).await?;

    // The victim: the primary serving the most of this load's channels, then
    // chat sessions.
    let primaries = ctx.cluster.redis_primaries().await;
    if primaries.len() != crate::cluster::REDIS_PRIMARIES {
        bail!("expected 3 primaries, the cluster shows {primaries:?}");
    }
    let owner = |slot: u16| {
        primaries
            .iter()
            .find(|(_, ranges)| ranges.iter().any(|&(a, b)| a <= slot && slot <= b))
            .map(|(i, _)| *i)
    };
    let channel_tag = |ch: &str| format!("{{ch:{ch}}}");
    let mut load: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for ch in &fleet.channels {
        if let Some(i) = owner(key_slot(&channel_tag(ch))) {
            load.entry(i).or_default().0 += 1;
        }
    }
    for (_, s) in &run.sessions {
        if let Some(i) = owner(key_slot(&format!("{{c:{s}}}"))) {
            load.entry(i).or_default().1 += 1;
        }
    }
    let (&victim, &(victim_channels, victim_sessions)) = load
        .iter()
        .max_by_key(|(_, v)| **v)
        .context("no channel or session maps to a primary")?;
    let victim_slots = primaries
        .iter()
        .find(|(i, _)| *i == victim)
        .map(|(_, s)| s.clone())
        .unwrap_or_default();
    let in_victim =
        |key_tag: &str| -> bool { owner(key_slot(key_tag)).is_some_and(|i| i == victim) };
    let lost_candidates: Vec<String> = fleet
        .channels
        .iter()
        .filter(|ch| in_victim(&channel_tag(ch)))
        .cloned()
        .collect();
    r.measure("redis_load_by_primary", &load);
    r.measure("victim_slots", &victim_slots);

    // Probe names whose keys live in the victim's slots: one user id per gateway
    // and attempt would exhaust nothing, so each loop takes from its own list.
    let victim_users: Vec<String> = (0..NAME_TRIES)
        .map(|n| format!("{}-p{n}", fleet.tag))
        .filter(|id| in_victim(&format!("{{u:{id}}}")))
        .collect();
    let probe_channel = (0..NAME_TRIES)
        .map(|n| format!("room:{}-probe{n}", fleet.tag))
        .find(|ch| in_victim(&channel_tag(ch)))
        .context("no probe channel in the victim's slots")?;
    let other_users: Vec<String> = (0..NAME_TRIES)
        .map(|n| format!("{}-o{n}", fleet.tag))
        .filter(|id| !in_victim(&format!("{{u:{id}}}")))
        .collect();

    // Each gateway answers both probes before the fault: a probe that never works
    // would measure the harness, not the failover.
    let gw: Vec<(String, u16)> = ctx
        .cluster
        .gateways
        .iter()
        .map(|g| (g.id.clone(), g.port))
        .collect();
    let envs: Vec<Arc<Env>> = gw
        .iter()
        .map(|(_, port)| {
            Arc::new(Env {
                lb: ([127, 0, 0, 1], *port).into(),
                url: format!("ws://127.0.0.1:{port}/ws"),
                secret: ctx.cluster.secret.clone(),
            })
        })
        .collect();
    for (g, env) in envs.iter().enumerate() {
        if let Err(e) = probe_auth(env, &victim_users[g], src_ip(230 + g)).await {
            bail!(
                "login probe on {} failed before the fault: {}",
                gw[g].0,
                e.cause
            );
        }
        publish_probe(&ctx.cluster, gw[g].1, &probe_channel)
            .await
            .with_context(|| format!("publish probe on {} before the fault", gw[g].0))?;
    }
    let tops_before = stream_epochs(&ctx.cluster, &fleet.channels).await;

    r.injected = format!(
        "kill -9 of Redis Cluster primary redis{} (of 3 primaries + 3 replicas, node timeout {} ms; it served {} of {} channels and {} of {} chat sessions) with {} chat streams in flight, {} channels publishing every {} ms and clients connecting",
        victim + 1,
        crate::cluster::REDIS_NODE_TIMEOUT_MS,
        victim_channels,
        plan.channels,
        victim_sessions,
        run.sessions.len(),
        run.acked(),
        plan.channels,
        plan.publish_every.as_millis()
    );

    let t_kill = Instant::now();
    ctx.cluster.redis[victim].proc.kill9().await?;

    // Probe loops: per gateway, logins and publications in the victim's slots;
    // through HAProxy, logins in the other primaries' slots (measured only).
    let mut probes: JoinSet<(&'static str, ProbeRun)> = JoinSet::new();
    let per_gateway = victim_users.len() / gw.len();
    for (g, env) in envs.iter().enumerate() {
        let (id, port) = gw[g].clone();
        let users: Vec<String> = victim_users[per_gateway * g..per_gateway * (g + 1)].to_vec();
        let env = env.clone();
        let name = id.clone();
        probes.spawn(async move {
            let mut n = 0;
            let run = probe_loop(&name, t_kill, Duration::ZERO, || {
                let env = env.clone();
                n += 1;
                let user = users[n % users.len()].clone();
                async move {
                    probe_auth(&env, &user, src_ip(230 + g))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.code.unwrap_or(e.cause))
                }
            })
            .await;
            ("connect", run)
        });
        let http = ctx.cluster.http().clone();
        let channel = probe_channel.clone();
        let key = ctx.cluster.api_key.clone();
        probes.spawn(async move {
            let run = probe_loop(&id, t_kill, Duration::ZERO, || {
                let (http, channel, key) = (http.clone(), channel.clone(), key.clone());
                async move { publish_with(&http, port, &key, &channel).await }
            })
            .await;
            ("publish", run)
        });
    }
    {
        let env = ctx.env.clone();
        probes.spawn(async move {
            let mut n = 0;
            let run = probe_loop("lb", t_kill, OTHER_SLOTS_WATCH, || {
                let env = env.clone();
                n += 1;
                let user = other_users[n % other_users.len()].clone();
                async move {
                    probe_auth(&env, &user, src_ip(240))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.code.unwrap_or(e.cause))
                }
            })
            .await;
            ("connect_other_slots", run)
        });
    }

    // The promotion as the new primary itself reports it (the other nodes learn
    // it by gossip, later).
    let promoted = {
        let c = &ctx.cluster;
        let first_slot = victim_slots.first().map_or(0, |r| r.0);
        let mut at = None;
        'poll: while t_kill.elapsed() < PROBE_LIMIT {
            for (i, n) in c.redis.iter().enumerate() {
                if i == victim {
                    continue;
                }
                let Ok(view) = redis_text(n.port, &["CLUSTER", "NODES"]).await else {
                    continue;
                };
                let took_over = parse_primaries(&view).iter().any(|(port, ranges)| {
                    *port == n.port
                        && ranges
                            .iter()
                            .any(|&(a, b)| a <= first_slot && first_slot <= b)
                });
                if took_over {
                    at = Some(t_kill.elapsed());
                    break 'poll;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        at
    };
    r.measure(
        "replica_promoted_ms",
        promoted.map(|d| d.as_millis() as u64),
    );

    let mut by_kind: BTreeMap<&str, Vec<ProbeRun>> = BTreeMap::new();
    while let Some(Ok((kind, run))) = probes.join_next().await {
        by_kind.entry(kind).or_default().push(run);
    }
    for runs in by_kind.values_mut() {
        runs.sort_by(|a, b| a.gateway.cmp(&b.gateway));
    }
    r.measure("probes", &by_kind);
    let mut recovered = BTreeMap::new();
    for kind in ["connect", "publish"] {
        let runs = by_kind.get(kind).cloned().unwrap_or_default();
        let worst = runs
            .iter()
            .map(|p| p.recovered_ms)
            .try_fold(0u64, |acc, m| m.map(|m| acc.max(m)));
        let text = runs
            .iter()
            .map(|p| {
                format!(
                    "{} {}",
                    p.gateway,
                    p.recovered_ms
                        .map_or("never".to_owned(), |m| format!("{m} ms"))
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        r.check(
            &format!(
                "new {kind}s in the dead primary's slots succeed again on every gateway after the kill ({PROBE_STREAK} in a row)"
            ),
            format!("within {} ms", RECOVER.as_millis()),
            format!(
                "{} (slowest gateway); {text}",
                worst.map_or("never".to_owned(), |m| format!("{m} ms"))
            ),
            runs.len() == gw.len() && worst.is_some_and(|m| m <= RECOVER.as_millis() as u64),
        );
        recovered.insert(kind, worst);
        let max_answer = runs.iter().map(|p| p.answer_ms.max).fold(0.0, f64::max);
        r.check_max(
            &format!("every {kind} probe answered (success or error) within"),
            max_answer,
            plan.bounds.answer_ms as f64,
            " ms",
        );
    }

    // Chats: those acked before the kill, and new ones on the recovered cluster.
    let after: Vec<usize> = (plan.streams..plan.streams * 2)
        .filter(|&i| i < fleet.users.len())
        .collect();
    let run2 = fleet.start_chats(&after, "after").await;
    let resolved = fleet.wait_chats(&run, plan.bounds.chat_resolve).await;
    let resolved2 = fleet.wait_chats(&run2, plan.bounds.chat_resolve).await;
    r.measure("resolved_after_kill_ms", resolved.map(|d| d.as_millis()));
    r.measure("new_chats_resolved_ms", resolved2.map(|d| d.as_millis()));
    check_chats(r, &fleet, &run, "streams in flight at the kill").await;
    check_chats(r, &fleet, &run2, "chats after the recovery").await;

    // Channel delivery to every subscriber after the recovery.
    let (stats, _) = check_delivery(r, &fleet, traffic, "every subscriber").await;
    let publish_s = Summary::of(&stats.answer_ms);
    r.measure("traffic_publish_answer_ms", publish_s);
    r.measure("traffic", &stats);
    let unanswered: usize = stats.no_answer.values().sum::<u64>() as usize;
    r.check(
        "every publication of the traffic answered (ack or error), none left hanging",
        format!("0 unanswered, max <= {} ms", plan.bounds.answer_ms),
        format!("{unanswered} unanswered, max {:.0} ms", publish_s.max),
        unanswered == 0 && publish_s.max <= plan.bounds.answer_ms as f64,
    );
    let ch = fleet.channel_tally(&stats, &[]);
    r.measure("channels", &ch);
    r.check_zero(
        "acked publications never delivered to a subscriber",
        ch.undelivered,
    );
    r.check_zero("publications delivered twice", ch.dups);

    // Epochs: a channel whose stream the promoted replica lacks starts a new
    // epoch; its subscribers are told once, everyone else never.
    let tops_after = stream_epochs(&ctx.cluster, &fleet.channels).await;
    let lost: BTreeSet<String> = fleet
        .channels
        .iter()
        .filter(|ch| tops_before.get(*ch) != tops_after.get(*ch))
        .cloned()
        .collect();
    r.measure("channels_on_killed_primary", &lost_candidates);
    r.measure("channels_with_new_epoch", &lost);
    let (mut told_ok, mut told_wrong, mut subs) = (0, 0, 0);
    let mut told_total = 0;
    for u in &fleet.users {
        let Some(ch) = &u.profile.channel else {
            continue;
        };
        let st = u.state();
        subs += 1;
        told_total += st.restarts;
        let want = u64::from(lost.contains(ch));
        if st.restarts == want {
            told_ok += 1;
        } else {
            told_wrong += 1;
        }
    }
    r.measure("epoch_restarts_seen", told_total);
    r.check(
        "subscribers of a channel whose stream was lost told once of the new epoch, the others never",
        format!("{subs} of {subs} as expected"),
        format!(
            "{told_ok} of {subs} ({} channels with a new epoch of {} on the killed primary; {told_total} notices)",
            lost.len(),
            lost_candidates.len()
        ),
        told_wrong == 0 && subs > 0,
    );

    let conn = fleet.connection_tally(t_kill);
    r.measure("connections", &conn);
    r.check_zero(
        "clients disconnected during or after the failover",
        conn.server_close_count(),
    );

    let t = fleet.chat_tally(&run);
    let h = fleet.verify_history(&run).await;
    let ms = |d: Option<u64>| d.map_or("never".to_owned(), |m| format!("{m} ms"));
    let other = by_kind
        .get("connect_other_slots")
        .and_then(|v| v.first())
        .map_or((0, 0), |p| (p.failures, p.attempts));
    r.headline(format!(
        "replica promoted after {}; connects back after {}, publications after {} (slowest gateway, bound {} s); logins in other slots meanwhile: {} of {} failed",
        ms(promoted.map(|d| d.as_millis() as u64)),
        ms(recovered["connect"]),
        ms(recovered["publish"]),
        RECOVER.as_secs(),
        other.0,
        other.1
    ));
    r.headline(format!(
        "{} of {} chats in flight complete, history {} once / {} duplicated; {} of {} channels got a new epoch, {} notices; {} clients closed; lost {}, dup {}",
        t.acked - t.unresolved,
        t.acked,
        h.exactly_once,
        h.duplicated,
        lost.len(),
        lost_candidates.len(),
        told_total,
        conn.server_close_count(),
        ch.undelivered,
        ch.dups
    ));
    fleet.stop().await;
    Ok(())
}

/// Starts `attempt` every [`PROBE_EVERY`] without waiting for the earlier ones (a
/// request hanging until the gateway's Redis timeout must not hide when the next one
/// would have worked), until the attempts started after the last failure include
/// [`PROBE_STREAK`] successes in a row (and `at_least` after the kill), or
/// [`PROBE_LIMIT`] after the kill. Recovered
/// = the answer to the first attempt after the last failure.
async fn probe_loop<F, Fut>(
    gateway: &str,
    t_kill: Instant,
    at_least: Duration,
    mut attempt: F,
) -> ProbeRun
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let mut p = ProbeRun {
        gateway: gateway.to_owned(),
        ..ProbeRun::default()
    };
    let mut starts: Vec<Instant> = Vec::new();
    let mut ends: Vec<Option<Instant>> = Vec::new();
    let mut results: Vec<Option<Result<(), String>>> = Vec::new();
    let mut answers = Vec::new();
    let mut running: JoinSet<(usize, Result<(), String>, f64)> = JoinSet::new();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut launching = true;
    loop {
        if !launching && running.is_empty() {
            break;
        }
        tokio::select! {
            _ = tick.tick(), if launching => {
                if t_kill.elapsed() >= PROBE_LIMIT {
                    launching = false;
                    continue;
                }
                let k = starts.len();
                starts.push(Instant::now());
                results.push(None);
                ends.push(None);
                let fut = attempt();
                running.spawn(async move {
                    let t = Instant::now();
                    let r = match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                        Ok(r) => r,
                        Err(_) => Err("no answer".to_owned()),
                    };
                    (k, r, t.elapsed().as_secs_f64() * 1000.0)
                });
            }
            done = running.join_next(), if !running.is_empty() => {
                if let Some(Ok((k, r, ms))) = done {
                    results[k] = Some(r);
                    ends[k] = Some(Instant::now());
                    answers.push(ms);
                    if recovered_from(&results).is_some() && t_kill.elapsed() >= at_least {
                        launching = false;
                    }
                }
            }
        }
    }
    let first_ok = results.iter().position(|r| matches!(r, Some(Ok(()))));
    for (k, r) in results.iter().enumerate() {
        p.attempts += 1;
        if let Some(Err(cause)) = r {
            p.failures += 1;
            *p.causes.entry(simplify(cause)).or_insert(0) += 1;
            if first_ok.is_some_and(|f| k > f) {
                p.failures_after_first_success += 1;
            }
        }
    }
    let since_kill = |t: Instant| t.saturating_duration_since(t_kill).as_millis() as u64;
    if let Some(k) = recovered_from(&results) {
        p.recovered_ms = ends[k].map(since_kill);
        p.recovered_attempt_started_ms = Some(since_kill(starts[k]));
    }
    p.answer_ms = Summary::of(&answers);
    p
}

/// The first attempt after the last failure, when it and the [`PROBE_STREAK`] - 1
/// attempts started after it all succeeded.
fn recovered_from(results: &[Option<Result<(), String>>]) -> Option<usize> {
    let after_fail = results
        .iter()
        .rposition(|r| matches!(r, Some(Err(_))))
        .map_or(0, |f| f + 1);
    let streak = results.get(after_fail..after_fail + PROBE_STREAK)?;
    streak
        .iter()
        .all(|r| matches!(r, Some(Ok(()))))
        .then_some(after_fail)
}

fn simplify(cause: &str) -> String {
    cause.chars().take(60).collect()
}

/// One `POST /v1/publish` straight to a gateway's public port.
async fn publish_probe(c: &Cluster, port: u16, channel: &str) -> Result<()> {
    publish_with(c.http(), port, &c.api_key, channel)
        .await
        .map_err(anyhow::Error::msg)
}

async fn publish_with(
    http: &reqwest::Client,
    port: u16,
    key: &str,
    channel: &str,
) -> Result<(), String> {
    let body = json!({"channel": channel, "data": {"ts": now_ms(), "probe": true}});
    match http
        .post(format!("http://127.0.0.1:{port}/v1/publish"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
    {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            Err(format!(
                "{status} {}",
                body.chars().take(80).collect::<String>()
            ))
        }
        Err(e) => Err(if e.is_timeout() {
            "timeout".to_owned()
        } else {
            "http error".to_owned()
        }),
    }
}

/// Each channel's epoch as its primary holds it now (`None` when the stream is
/// missing or its primary cannot be read).
async fn stream_epochs(c: &Cluster, channels: &[String]) -> BTreeMap<String, Option<String>> {
    let primaries = c.redis_primaries().await;
    let mut out = BTreeMap::new();
    for ch in channels {
        let key = format!("sb:{{ch:{ch}}}:log");
        let slot = key_slot(&key);
        let node = primaries
            .iter()
            .find(|(_, r)| r.iter().any(|&(a, b)| a <= slot && slot <= b))
            .map(|(i, _)| *i);
        let epoch = match node {
            Some(i) => c
                .redis_command(i, &["XREVRANGE", &key, "+", "-", "COUNT", "1"])
                .await
                .ok()
                .and_then(|v| top_id(&v))
                .and_then(|id| id.split('-').next().map(str::to_owned)),
            None => None,
        };
        out.insert(ch.clone(), epoch);
    }
    out
}

/// The id of the first entry of an `XREVRANGE` reply.
fn top_id(v: &redis::Value) -> Option<String> {
    let redis::Value::Array(entries) = v else {
        return None;
    };
    let redis::Value::Array(entry) = entries.first()? else {
        return None;
    };
    match entry.first()? {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_is_the_first_attempt_after_the_last_failure() {
        let ok = || Some(Ok(()));
        let err = || Some(Err("x".to_owned()));
        let mut r = vec![err(), ok(), err(), None];
        assert_eq!(
            recovered_from(&r),
            None,
            "nothing after the last failure yet"
        );
        r = vec![err(), ok(), err(), ok(), ok(), ok(), ok()];
        assert_eq!(recovered_from(&r), None, "4 of 5");
        r.push(ok());
        assert_eq!(recovered_from(&r), Some(3));
        r[5] = None;
        assert_eq!(
            recovered_from(&r),
            None,
            "an attempt of the streak still running"
        );
        let clean: Vec<_> = (0..PROBE_STREAK).map(|_| ok()).collect();
        assert_eq!(recovered_from(&clean), Some(0));
    }
}
