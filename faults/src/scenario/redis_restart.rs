//! Scenario 4: Redis stopped and started again empty (no persistence, as run here).
//! Connected clients stay connected and keep being served what does not need Redis
//! (`ping`); what needs Redis is answered `UNAVAILABLE`, never a hang or a crash: new
//! authentications (then close 1013), `chat.send`, `history`, `publish`. Afterwards
//! the cluster recovers by itself: new logins, chat end to end, and channel
//! delivery to the subscribers that stayed connected.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use tokio::task::JoinSet;

use super::ctx::{Ctx, check_chats, check_chats_with, check_delivery, wait_mid_stream};
use crate::client::probe_auth;
use crate::fleet::{REQUEST_TIMEOUT, src_ip};
use crate::report::ScenarioReport;
use crate::stats::Summary;

/// Probes of each kind during the outage.
const PROBES: usize = 5;
/// A login works again within this after Redis is back.
const RECOVER: Duration = Duration::from_secs(15);

pub async fn run(ctx: &mut Ctx, r: &mut ScenarioReport) -> Result<()> {
    let plan = ctx.plan.clone();
    let fleet = ctx.fleet("rr").await?;
    let traffic = fleet.traffic(plan.publish_every);
    let chatters: Vec<usize> = (0..plan.streams.min(fleet.users.len())).collect();
    let run = fleet.start_chats(&chatters, "s").await;
    wait_mid_stream(&fleet, &run).await?;
    r.injected = format!(
        "Redis stopped for {} s (SIGTERM) with {} chat streams in flight and channel traffic, then started empty",
        plan.outage.as_secs(),
        run.acked()
    );

    let t_stop = Instant::now();
    ctx.cluster.redis[0]
        .proc
        .term(Duration::from_secs(10))
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // New logins.
    let mut logins = JoinSet::new();
    for n in 0..PROBES {
        let env = ctx.env.clone();
        let id = format!("{}-new{n}", fleet.tag);
        logins.spawn(async move {
            let t = Instant::now();
            let res = probe_auth(&env, &id, src_ip(200 + n)).await;
            (res, t.elapsed())
        });
    }
    let mut refused_ok = 0;
    let mut login_ms = Vec::new();
    let mut login_answers = Vec::new();
    while let Some(Ok((res, took))) = logins.join_next().await {
        login_ms.push(took.as_millis() as f64);
        match res {
            Ok(_) => login_answers.push("authenticated".to_owned()),
            Err(e) => {
                if e.code.as_deref() == Some("UNAVAILABLE") && e.close == Some(1013) {
                    refused_ok += 1;
                }
                login_answers.push(e.cause);
            }
        }
    }
    r.measure("outage_login_answers", &login_answers);
    r.check(
        "new logins during the outage: error UNAVAILABLE then close 1013",
        format!("{PROBES} of {PROBES}"),
        format!("{refused_ok} of {PROBES}"),
        refused_ok == PROBES,
    );

    // Requests of connected clients.
    let probe_users: Vec<usize> = (plan.streams..plan.streams + PROBES).collect();
    let mut reqs = JoinSet::new();
    for (k, &i) in probe_users.iter().enumerate() {
        let u = fleet.users[i].clone();
        let channel = u.profile.channel.clone().unwrap_or_default();
        let session = format!("{}-down{k}", fleet.tag);
        reqs.spawn(async move {
            let mut out = Vec::new();
            for (kind, frame) in [
                ("ping", json!({"type": "ping"})),
                (
                    "chat.send",
                    json!({"type": "chat.send", "session_id": session, "message": "hello"}),
                ),
                ("history", json!({"type": "history", "session_id": session})),
                (
                    "publish",
                    json!({"type": "publish", "channel": channel, "data": {"probe": true}}),
                ),
            ] {
                let t = Instant::now();
                let res = u.request(frame, REQUEST_TIMEOUT).await;
                let answer = match res {
                    Ok(v) if v["type"] == "error" => {
                        format!("error {}", v["code"].as_str().unwrap_or("?"))
                    }
                    Ok(v) => v["type"].as_str().unwrap_or("?").to_owned(),
                    Err(e) => format!("no answer: {e}"),
                };
                out.push((kind, answer, t.elapsed().as_millis() as f64));
            }
            out
        });
    }
    let mut answers: Vec<(String, String)> = Vec::new();
    let mut answer_ms = Vec::new();
    while let Some(Ok(out)) = reqs.join_next().await {
        for (kind, answer, ms) in out {
            answer_ms.push(ms);
            answers.push((kind.to_owned(), answer));
        }
    }
    let expect = |kind: &str, want: &str| {
        let of_kind: Vec<_> = answers.iter().filter(|(k, _)| k == kind).collect();
        let good = of_kind.iter().filter(|(_, a)| a == want).count();
        (good, of_kind.len())
    };
    r.measure("outage_request_answers", &answers);
    for (kind, want) in [
        ("ping", "pong"),
        ("chat.send", "error UNAVAILABLE"),
        ("history", "error UNAVAILABLE"),
        ("publish", "error UNAVAILABLE"),
    ] {
        let (good, n) = expect(kind, want);
        r.check(
            &format!("{kind} from a connected client during the outage: {want}"),
            format!("{n} of {n}"),
            format!("{good} of {n}"),
            good == n && n > 0,
        );
    }
    let s = Summary::of(&answer_ms);
    let login_s = Summary::of(&login_ms);
    r.check_max(
        "every request and login during the outage answered within",
        s.max.max(login_s.max),
        plan.bounds.answer_ms as f64,
        " ms",
    );

    let rest = plan.outage.saturating_sub(t_stop.elapsed());
    tokio::time::sleep(rest).await;
    let t_start = Instant::now();
    ctx.cluster.start_redis_again().await?;

    // Logins work again.
    let mut n = 0;
    let env = ctx.env.clone();
    let tag = fleet.tag.clone();
    let login_back = loop {
        n += 1;
        if probe_auth(&env, &format!("{tag}-back{n}"), src_ip(220))
            .await
            .is_ok()
        {
            break Some(t_start.elapsed());
        }
        if t_start.elapsed() > RECOVER {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    r.check(
        "logins work again after Redis is back",
        format!("within {} s", RECOVER.as_secs()),
        login_back.map_or("never".into(), |d| format!("{} ms", d.as_millis())),
        login_back.is_some(),
    );

    // Chat end to end on the recovered cluster.
    let after: Vec<usize> = (plan.streams + PROBES..plan.streams * 2 + PROBES)
        .filter(|&i| i < fleet.users.len())
        .collect();
    let run2 = fleet.start_chats(&after, "after").await;
    let resolved = fleet.wait_chats(&run, plan.bounds.chat_resolve).await;
    let resolved2 = fleet.wait_chats(&run2, plan.bounds.chat_resolve).await;
    r.measure("resolved_after_stop_ms", resolved.map(|d| d.as_millis()));
    r.measure("new_chats_resolved_ms", resolved2.map(|d| d.as_millis()));
    check_chats_with(r, &fleet, &run, "streams in flight during the outage", true).await;
    check_chats(r, &fleet, &run2, "chats after the recovery").await;

    // Channel delivery to the subscribers that stayed connected.
    let (stats, starved) =
        check_delivery(r, &fleet, traffic, "subscribers that stayed connected").await;
    r.measure("traffic", &stats);
    let ch = fleet.channel_tally(&stats, &[]);
    r.measure("channels", &ch);
    r.check_zero(
        "acked publications never delivered to a subscriber that stayed connected",
        ch.undelivered,
    );
    r.check_zero("publications delivered twice", ch.dups);
    // Every subscriber that stayed connected was in a channel whose offsets started
    // over; each must have been told so once (not silently given offsets it had).
    let told: Vec<u64> = fleet
        .users
        .iter()
        .filter(|u| u.profile.channel.is_some() && u.state().ended.is_empty())
        .map(|u| u.state().restarts)
        .collect();
    let untold = told.iter().filter(|&&n| n != 1).count();
    r.measure("epoch_restarts_seen", told.iter().sum::<u64>());
    r.check(
        "subscribers told once that their channel's offsets started over",
        "unsolicited `subscribed` recovered: false, exactly once each".to_string(),
        format!("{} of {} told once", told.len() - untold, told.len()),
        untold == 0 && !told.is_empty(),
    );

    let conn = fleet.connection_tally(t_stop);
    r.measure("connections", &conn);
    r.check_zero(
        "clients disconnected during or after the outage",
        conn.server_close_count(),
    );

    r.headline(format!(
        "logins refused UNAVAILABLE/1013 {refused_ok}/{PROBES}, back after {} ms",
        login_back.map_or(-1, |d| d.as_millis() as i64)
    ));
    r.headline(format!(
        "{} clients closed; {} of {} subscribers told of the new epoch once, {starved} starved after recovery, lost {}, dup {}",
        conn.server_close_count(),
        told.len() - untold,
        told.len(),
        ch.undelivered,
        ch.dups
    ));
    fleet.stop().await;
    Ok(())
}
