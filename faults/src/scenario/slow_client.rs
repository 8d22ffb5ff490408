//! Scenario 7: one slow client per channel. An extra subscriber on each of a few
//! channels stops reading its socket (small receive buffer, as a stuck app on a
//! phone) while those channels are flooded through `POST /v1/publish`. It alone is
//! closed 4008 (`SLOW_CONSUMER`); every other subscriber gets every publication in
//! order, with delivery latency p99 within the stated bound.

use std::time::{Duration, Instant};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, bail};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::ctx::{Ctx, QUIESCE};
use crate::client::{Profile, now_ms};
use crate::fleet::{TrafficStats, src_ip, wait_for};
use crate::report::ScenarioReport;
use crate::stats::Summary;

/// The slow clients' receive buffer: the kernel's minimum, so their socket fills
/// after a few frames instead of after megabytes.
const SLOW_RCVBUF: u32 = 4096;
/// How long the slow clients stop reading at most (they resume once closed).
const PAUSE: Duration = Duration::from_secs(120);

pub async fn run(ctx: &mut Ctx, r: &mut ScenarioReport) -> Result<()> {
    let plan = ctx.plan.clone();
    let mut fleet = ctx.fleet("sc").await?;
    let first_slow = fleet.users.len();
    for k in 0..plan.slow_channels {
        fleet.add(Profile {
            id: format!("{}-slow{k}", fleet.tag),
            src_ip: src_ip(250 + k),
            channel: Some(fleet.channels[k].clone()),
            recv_buffer: Some(SLOW_RCVBUF),
        });
    }
    fleet.wait_ready(first_slow..fleet.users.len()).await?;
    let slow: Vec<usize> = (first_slow..fleet.users.len()).collect();
    r.injected = format!(
        "{} subscribers (one per channel, receive buffer {} B) stop reading while their channels are flooded through POST /v1/publish ({} B payloads, until the gateway closes the slow one, at most {}); all channels keep normal traffic",
        slow.len(),
        SLOW_RCVBUF,
        plan.flood_payload_bytes,
        plan.flood_messages
    );
    let closes_before = slow_closes(ctx).await;
    let traffic = fleet.traffic(plan.publish_every);
    for &i in &slow {
        fleet.users[i].pause(PAUSE);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = fleet.take_latencies();
    let t0 = Instant::now();

    // The gateways' slow-consumer counter, polled while flooding.
    let closes = Arc::new(AtomicU64::new(closes_before as u64));
    let poll_stop = CancellationToken::new();
    {
        let (closes, stop) = (closes.clone(), poll_stop.clone());
        let http = ctx.cluster.http().clone();
        let admins: Vec<u16> = ctx.cluster.gateways.iter().map(|g| g.admin).collect();
        tokio::spawn(async move {
            loop {
                let mut sum = 0.0;
                for a in &admins {
                    if let Ok(r) = http
                        .get(format!("http://127.0.0.1:{a}/metrics"))
                        .send()
                        .await
                        && let Ok(t) = r.text().await
                    {
                        sum += crate::cluster::metric_sum(&t, shared::metrics::SLOW_CONSUMERS);
                    }
                }
                closes.store(sum as u64, Ordering::Relaxed);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        });
    }
    // One channel at a time: flood it until the gateway closes its slow client (or
    // the plan's count is reached), then let that client read again at once so it
    // sees its close within the gateway's close linger.
    let http = ctx.cluster.http().clone();
    let url = ctx.cluster.api_url("/v1/publish");
    let key = ctx.cluster.api_key.clone();
    let pad = "x".repeat(plan.flood_payload_bytes);
    let (mut flood_ok, mut flood_failed) = (0u64, 0u64);
    let mut flood_top = Vec::new();
    let mut needed = Vec::new();
    for (k, &i) in slow.iter().enumerate() {
        let channel = fleet.channels[k].clone();
        let want = closes_before as u64 + k as u64 + 1;
        let mut top = 0;
        let mut sent = 0;
        for n in 0..plan.flood_messages {
            if closes.load(Ordering::Relaxed) >= want {
                break;
            }
            let body = json!({"channel": channel, "data": {"ts": now_ms(), "n": n, "pad": pad}});
            sent += 1;
            match http.post(&url).bearer_auth(&key).json(&body).send().await {
                Ok(resp) if resp.status().is_success() => {
                    flood_ok += 1;
                    if let Ok(v) = resp.json::<serde_json::Value>().await {
                        top = v["offset"].as_u64().unwrap_or(top).max(top);
                    }
                }
                _ => flood_failed += 1,
            }
        }
        let _ = wait_for(Duration::from_secs(5), || {
            closes.load(Ordering::Relaxed) >= want
        })
        .await;
        fleet.users[i].pause(Duration::ZERO);
        needed.push(sent);
        flood_top.push((channel, top));
    }
    poll_stop.cancel();
    let flood_secs = t0.elapsed().as_secs_f64();
    let closed = closes.load(Ordering::Relaxed) as f64 - closes_before;
    let stats = traffic.stop().await;
    tokio::time::sleep(QUIESCE).await;
    let saw_4008 = wait_for(Duration::from_secs(20), || {
        slow.iter().all(|&i| {
            fleet.users[i]
                .state()
                .ended
                .iter()
                .any(|e| e.at >= t0 && e.code == Some(4008))
        })
    })
    .await;
    let slow_4008 = slow
        .iter()
        .filter(|&&i| {
            let st = fleet.users[i].state();
            st.ended.iter().any(|e| e.at >= t0 && e.code == Some(4008))
                && st.errors.iter().any(|e| e.code == "SLOW_CONSUMER")
        })
        .count();

    r.measure("flood_publications_ok", flood_ok);
    r.measure("flood_publications_failed", flood_failed);
    r.measure("flood_seconds", flood_secs);
    r.measure("publications_until_close_per_channel", &needed);
    let seen: Vec<(Vec<Option<u16>>, Vec<String>)> = slow
        .iter()
        .map(|&i| {
            let st = fleet.users[i].state();
            (
                st.ended
                    .iter()
                    .filter(|e| e.at >= t0)
                    .map(|e| e.code)
                    .collect(),
                st.errors
                    .iter()
                    .filter(|e| e.at >= t0)
                    .map(|e| e.code.clone())
                    .collect(),
            )
        })
        .collect();
    r.measure("slow_clients_saw", &seen);
    r.measure("slow_consumer_closes_metric", closed);
    if flood_ok == 0 {
        bail!("the flood published nothing ({flood_failed} failed)");
    }
    r.check(
        "each slow client closed 4008 after SLOW_CONSUMER",
        format!("{} of {}", slow.len(), slow.len()),
        format!("{slow_4008} of {} (gateway metric: {closed})", slow.len()),
        slow_4008 == slow.len() && saw_4008.is_some(),
    );
    let others_closed: u64 = fleet
        .users
        .iter()
        .enumerate()
        .filter(|(i, _)| !slow.contains(i))
        .map(|(_, u)| {
            u.state()
                .ended
                .iter()
                .filter(|e| e.at >= t0 && !e.by_client)
                .count() as u64
        })
        .sum();
    r.check_zero("other clients closed", others_closed);

    let lat = fleet.take_latencies_except(&slow);
    let s = Summary::of_ms(&lat);
    r.measure("others_latency_ms", s);
    r.check_max(
        "delivery latency p99 of the other subscribers during the flood",
        s.p99,
        plan.bounds.slow_p99_ms as f64,
        " ms",
    );
    let mut all = stats.clone();
    merge_flood(&mut all, &flood_top);
    let ch = fleet.channel_tally(&all, &slow);
    r.measure("channels_without_slow_clients", &ch);
    r.check_zero("publications lost by the other subscribers", ch.lost());
    r.check_zero("publications delivered twice", ch.dups);

    r.headline(format!(
        "{slow_4008}/{} slow clients closed 4008, {others_closed} others closed",
        slow.len()
    ));
    r.headline(format!(
        "{flood_ok} flood publications in {flood_secs:.1} s; others' latency {}",
        s.text(" ms")
    ));
    fleet.stop().await;
    Ok(())
}

async fn slow_closes(ctx: &Ctx) -> f64 {
    let c = &ctx.cluster;
    let mut sum = 0.0;
    for g in &c.gateways {
        sum += c
            .metric_sum(g.admin, shared::metrics::SLOW_CONSUMERS)
            .await
            .unwrap_or(0.0);
    }
    sum
}

/// The flood's offsets count as acked publications for the gap check.
fn merge_flood(stats: &mut TrafficStats, tops: &[(String, u64)]) {
    for (ch, top) in tops {
        let e = stats.max_acked.entry(ch.clone()).or_insert(0);
        *e = (*e).max(*top);
    }
}
