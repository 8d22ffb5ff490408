//! Scenario 2: `kill -9` of the worker holding the most chat requests mid-stream.
//! JetStream redelivers them (after the ack wait) to the other worker; every one
//! completes at its client, none is lost and none is recorded twice in history.

use std::time::Instant;

use anyhow::Result;

use super::ctx::{Ctx, check_chats, wait_mid_stream};
use crate::report::ScenarioReport;

pub async fn run(ctx: &mut Ctx, r: &mut ScenarioReport) -> Result<()> {
    let plan = ctx.plan.clone();
    let fleet = ctx.fleet("wk").await?;
    let chatters: Vec<usize> = (0..plan.streams.min(fleet.users.len())).collect();
    let run = fleet.start_chats(&chatters, "s").await;
    wait_mid_stream(&fleet, &run).await?;

    let mut in_flight = Vec::new();
    for w in &ctx.cluster.workers {
        let n = ctx
            .cluster
            .readyz_json(w.admin)
            .await
            .and_then(|v| v["in_flight"].as_u64())
            .unwrap_or(0);
        in_flight.push(n);
    }
    let wi = (0..in_flight.len())
        .max_by_key(|&i| in_flight[i])
        .unwrap_or(0);
    let victim = ctx.cluster.workers[wi].id.clone();
    r.injected = format!(
        "kill -9 of {victim} holding {} of {} chat streams mid-stream (ack wait {} s)",
        in_flight[wi],
        run.acked(),
        plan.cluster.ack_wait_secs
    );
    r.measure("in_flight_per_worker", &in_flight);
    let other = 1 - wi;
    let redeliveries_before = ctx
        .cluster
        .metric_sum(
            ctx.cluster.workers[other].admin,
            shared::metrics::WORKER_REDELIVERIES,
        )
        .await
        .unwrap_or(0.0);

    let t_kill = Instant::now();
    ctx.cluster.workers[wi].proc.kill9().await?;
    let resolved = fleet.wait_chats(&run, plan.bounds.chat_resolve).await;
    let redeliveries = ctx
        .cluster
        .metric_sum(
            ctx.cluster.workers[other].admin,
            shared::metrics::WORKER_REDELIVERIES,
        )
        .await
        .unwrap_or(0.0)
        - redeliveries_before;
    r.measure("resolved_after_kill_ms", resolved.map(|d| d.as_millis()));
    r.measure("redeliveries_on_surviving_worker", redeliveries);
    r.check(
        "the killed worker's requests were redelivered to the other one",
        format!(">= {}", in_flight[wi]),
        format!("{redeliveries}"),
        redeliveries >= in_flight[wi] as f64 && in_flight[wi] > 0,
    );
    check_chats(r, &fleet, &run, "streams").await;
    let t = fleet.chat_tally(&run);
    r.check_zero("acked requests answered chat.error (lost)", t.errors);
    let conn = fleet.connection_tally(t_kill);
    r.check_zero("clients disconnected", conn.server_close_count());

    r.headline(format!(
        "{} held by {victim}, {} redelivered; {} of {} complete after {:.1} s",
        in_flight[wi],
        redeliveries,
        t.acked - t.unresolved,
        t.acked,
        resolved.map_or(f64::NAN, |d| d.as_secs_f64())
    ));
    r.headline(format!(
        "repeated chunks dropped by clients: {}",
        t.dup_chunks
    ));

    fleet.stop().await;
    ctx.cluster.restart_worker(wi).await?;
    Ok(())
}
