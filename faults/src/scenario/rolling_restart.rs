//! Scenario 5: rolling restart of all three gateways: SIGTERM one, wait for its
//! exit, start it again, wait until HAProxy routes to it, next. Clients see nothing
//! but `reconnect` + 1012; the reconnections of each drain are spread over its
//! window (peak rate reported and bounded); chats and publications are not lost.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::ctx::{Ctx, QUIESCE, check_chats, check_reconnects, pick, wait_mid_stream};
use crate::fleet::ChatRun;
use crate::report::ScenarioReport;
use crate::stats::{Summary, peak_rate};

/// The drain window plus the gateway's finish grace (gateway/src/drain.rs) and a
/// margin: a gateway still running after this did not exit cleanly.
const EXIT_MARGIN: Duration = Duration::from_secs(10);

pub async fn run(ctx: &mut Ctx, r: &mut ScenarioReport) -> Result<()> {
    let plan = ctx.plan.clone();
    let drain = Duration::from_secs(plan.cluster.drain_secs);
    let fleet = ctx.fleet("rl").await?;
    let traffic = fleet.traffic(plan.publish_every);
    r.injected = format!(
        "SIGTERM to each of the {} gateways in turn (drain window {} s), each started again once its exit and HAProxy's health checks allow, under channel traffic and chat streams",
        ctx.cluster.gateways.len(),
        drain.as_secs()
    );
    let t0 = Instant::now();
    let mut runs = ChatRun::default();
    let mut exits = Vec::new();
    let mut peaks = Vec::new();
    let mut spread_ok = true;
    let mut step_texts = Vec::new();
    for i in 0..ctx.cluster.gateways.len() {
        let id = ctx.cluster.gateways[i].id.clone();
        let on_node = fleet.on_node(&id);
        let per_step = (plan.streams / 3).max(1);
        let chatters = pick(fleet.users.len(), &on_node, &[], per_step);
        let run = fleet.start_chats(&chatters, &format!("s{i}")).await;
        wait_mid_stream(&fleet, &run).await?;
        runs.merge(run);

        let t_term = Instant::now();
        ctx.cluster.gateways[i].proc.begin_term()?;
        let code = ctx.cluster.gateways[i]
            .proc
            .wait_exit(drain + EXIT_MARGIN)
            .await;
        let exit = match code {
            Ok(c) => c,
            Err(e) => {
                // Still running: stop it hard so the roll can go on; the check fails.
                let _ = ctx.cluster.gateways[i].proc.kill9().await;
                r.measure(&format!("{id}_exit_error"), e.to_string());
                None
            }
        };
        exits.push((id.clone(), exit));
        let exited_after = t_term.elapsed();
        ctx.cluster.restart_gateway(i).await?;

        // Reconnects caused by this drain.
        let times: Vec<f64> = fleet
            .users
            .iter()
            .flat_map(|u| {
                u.state()
                    .reconnects
                    .iter()
                    .filter(|x| x.down_at >= t_term && x.from.as_deref() == Some(id.as_str()))
                    .map(|x| x.up_at.duration_since(t_term).as_secs_f64())
                    .collect::<Vec<_>>()
            })
            .collect();
        let n = times.len();
        let peak = peak_rate(&times, 1.0);
        let mean = n as f64 / drain.as_secs_f64();
        // Evenly spread closes give `mean` per second; a client's jitter (up to 1 s)
        // can pile two seconds' worth into one window. A storm is everything at once.
        let allowed = (2.5 * mean).ceil() as usize + 5;
        if peak > allowed {
            spread_ok = false;
        }
        peaks.push(serde_json::json!({"node": id, "moved": n, "peak_per_s": peak,
            "mean_per_s": mean, "allowed_peak": allowed, "exit_after_ms": exited_after.as_millis()}));
        step_texts.push(format!("{id}: {n} moved, peak {peak}/s"));
    }
    let resolved = fleet.wait_chats(&runs, plan.bounds.chat_resolve).await;
    let stats = traffic.stop().await;
    tokio::time::sleep(QUIESCE).await;

    r.measure("drains", &peaks);
    r.measure("exit_codes", &exits);
    r.check(
        "every gateway exited 0 after its drain",
        "0, 0, 0",
        format!("{exits:?}"),
        exits.iter().all(|(_, c)| *c == Some(0)),
    );
    r.check(
        "reconnections spread over each drain window (peak per 1 s window)",
        "<= 2.5 x mean rate + 5",
        step_texts.join("; "),
        spread_ok,
    );
    let conn = fleet.connection_tally(t0);
    r.measure("connections", &conn);
    let other_closes: u64 = conn
        .server_closes
        .iter()
        .filter(|(k, _)| *k != "1012")
        .map(|(_, v)| *v)
        .sum();
    r.check_zero("closes other than 1012", other_closes);
    r.check_zero(
        "1012 closes without a `reconnect` frame first",
        conn.restart_without_reconnect_frame,
    );
    r.check_zero("failed connection attempts", conn.failure_count());
    check_reconnects(
        r,
        &conn.reconnect_ms,
        plan.bounds.reconnect_ms,
        "drained clients",
    );
    r.measure("resolved_ms", resolved.map(|d| d.as_millis()));
    check_chats(r, &fleet, &runs, "streams across the drains").await;
    let ch = fleet.channel_tally(&stats, &[]);
    r.measure("channels", &ch);
    r.measure("traffic", &stats);
    r.check(
        "re-subscriptions with `since` answered recovered: true",
        format!("{} of {}", ch.resubscribes, ch.resubscribes),
        format!("{} of {}", ch.recovered, ch.resubscribes),
        ch.resubscribes > 0 && ch.recovered == ch.resubscribes,
    );
    r.check_zero("publications lost by subscribers", ch.lost());
    r.check_zero("publications delivered twice", ch.dups);

    let rs = Summary::of(&conn.reconnect_ms);
    r.headline(format!(
        "{} reconnects, all 1012 after `reconnect`: {}; p99 {:.0} ms",
        rs.count,
        other_closes == 0 && conn.restart_without_reconnect_frame == 0,
        rs.p99
    ));
    r.headline(step_texts.join("; "));
    fleet.stop().await;
    Ok(())
}
