//! Scenario 1: `kill -9` of the busiest gateway while chat replies stream and
//! channels carry traffic. Its clients reconnect through HAProxy within the bound;
//! every reply started before the kill is complete at its client (live or filled
//! from `history`) and recorded once; the subscribers recover what they missed with
//! `since` (`recovered: true`), with no gap and no duplicate.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use super::ctx::{Ctx, QUIESCE, check_chats, check_reconnects, pick, wait_mid_stream};
use crate::fleet::wait_for;
use crate::report::ScenarioReport;

/// Traffic runs this long before the kill and after the recovery.
const SETTLE: Duration = Duration::from_secs(1);

pub async fn run(ctx: &mut Ctx, r: &mut ScenarioReport) -> Result<()> {
    let plan = ctx.plan.clone();
    let fleet = ctx.fleet("gk").await?;
    let traffic = fleet.traffic(plan.publish_every);
    tokio::time::sleep(SETTLE).await;

    let per_node = fleet.per_node();
    let (victim, _) = per_node
        .iter()
        .max_by_key(|(_, n)| **n)
        .ok_or_else(|| anyhow!("no connections"))?;
    let victim = victim.clone();
    let vi = ctx
        .cluster
        .gateways
        .iter()
        .position(|g| g.id == victim)
        .ok_or_else(|| anyhow!("unknown node {victim}"))?;
    let on_victim = fleet.on_node(&victim);
    r.injected = format!(
        "kill -9 of {victim} (holding {} of {} users) with {} chat streams in flight and {} channels publishing every {} ms",
        on_victim.len(),
        plan.users,
        plan.streams,
        plan.channels,
        plan.publish_every.as_millis()
    );
    r.measure("connections_per_node", &per_node);

    // Two thirds of the streams belong to the victim's clients.
    let prefer: Vec<usize> = on_victim
        .iter()
        .copied()
        .take(plan.streams * 2 / 3)
        .collect();
    let chatters = pick(fleet.users.len(), &prefer, &[], plan.streams);
    let run = fleet.start_chats(&chatters, "s").await;
    wait_mid_stream(&fleet, &run).await?;

    let t_kill = Instant::now();
    ctx.cluster.gateways[vi].proc.kill9().await?;

    let back = wait_for(plan.bounds.chat_resolve, || {
        on_victim.iter().all(|&i| {
            let st = fleet.users[i].state();
            st.connected && st.reconnects.iter().any(|x| x.down_at >= t_kill)
        })
    })
    .await;
    let resolved = fleet.wait_chats(&run, plan.bounds.chat_resolve).await;
    tokio::time::sleep(SETTLE).await;
    let stats = traffic.stop().await;
    tokio::time::sleep(QUIESCE).await;

    let conn = fleet.connection_tally(t_kill);
    let reconnected = on_victim
        .iter()
        .filter(|&&i| {
            fleet.users[i]
                .state()
                .reconnects
                .iter()
                .any(|x| x.down_at >= t_kill)
        })
        .count();
    let others_closed: u64 = fleet
        .users
        .iter()
        .enumerate()
        .filter(|(i, _)| !on_victim.contains(i))
        .map(|(_, u)| {
            u.state()
                .ended
                .iter()
                .filter(|e| e.at >= t_kill && !e.by_client)
                .count() as u64
        })
        .sum();
    r.measure("connections", &conn);
    r.measure("traffic", &stats);
    r.measure("all_reconnected_after_ms", back.map(|d| d.as_millis()));
    r.measure("chats_resolved_after_ms", resolved.map(|d| d.as_millis()));
    r.check(
        "victim's clients reconnected through HAProxy",
        format!("{} of {}", on_victim.len(), on_victim.len()),
        format!("{reconnected} of {}", on_victim.len()),
        reconnected == on_victim.len() && !on_victim.is_empty(),
    );
    check_reconnects(
        r,
        &conn.reconnect_ms,
        plan.bounds.reconnect_ms,
        "victim's clients",
    );
    r.check_zero("clients of other gateways disconnected", others_closed);
    check_chats(r, &fleet, &run, "streams").await;

    let ch = fleet.channel_tally(&stats, &[]);
    r.measure("channels", &ch);
    r.check(
        "re-subscriptions with `since` answered recovered: true",
        format!("{} of {}", ch.resubscribes, ch.resubscribes),
        format!("{} of {}", ch.recovered, ch.resubscribes),
        ch.resubscribes > 0 && ch.recovered == ch.resubscribes,
    );
    r.check_zero(
        "publications lost by subscribers (gaps, unrecovered, missing tail)",
        ch.lost(),
    );
    r.check_zero("publications delivered twice", ch.dups);

    let t = fleet.chat_tally(&run);
    let rs = crate::stats::Summary::of(&conn.reconnect_ms);
    r.headline(format!(
        "{} clients moved, reconnect p99 {:.0} ms",
        reconnected, rs.p99
    ));
    r.headline(format!(
        "{} streams: {} live, {} from history",
        t.acked,
        t.live,
        t.filled_reconnect + t.filled_stall
    ));
    r.headline(format!(
        "channels: {} resubscribed, lost {}, dup {}",
        ch.resubscribes,
        ch.lost(),
        ch.dups
    ));

    fleet.stop().await;
    ctx.cluster.restart_gateway(vi).await?;
    Ok(())
}
