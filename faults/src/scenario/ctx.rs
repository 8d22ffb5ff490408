//! What every scenario runs with: the cluster context, the pause and bounds they
//! share, and the checks most of them make (chats complete, reconnects fast).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::client::Env;
use crate::cluster::Cluster;
use crate::fleet::{ChatRun, Fleet, Traffic, TrafficStats};
use crate::plan::Plan;
use crate::report::ScenarioReport;
use crate::stats::Summary;

/// After traffic stops, deliveries in flight settle within this.
pub const QUIESCE: Duration = Duration::from_millis(1500);
/// A streaming reply shows its first chunk within this (first token 200 ms).
pub const FIRST_CHUNK: Duration = Duration::from_secs(10);

pub struct Ctx {
    pub cluster: Cluster,
    pub plan: Plan,
    pub env: Arc<Env>,
    /// Distinguishes this run's users, channels and sessions from any other's.
    pub run_id: String,
}

impl Ctx {
    /// A fresh fleet of the plan's size, connected and subscribed.
    pub async fn fleet(&self, short: &str) -> Result<Fleet> {
        Fleet::start(
            self.env.clone(),
            &format!("{short}{}", self.run_id),
            self.plan.users,
            self.plan.channels,
        )
        .await
    }

    /// Brings every component back (anything a scenario left dead or faulty) and
    /// waits until the whole cluster is ready and routed again.
    pub async fn heal(&mut self) -> Result<()> {
        let c = &mut self.cluster;
        if c.nats_down() {
            c.start_nats_again().await?;
        }
        c.heal_redis().await?;
        if !c.backend.alive() {
            c.start_backend_again().await?;
        }
        let faulty = |p: &mut crate::process::Proc| {
            !p.alive() || p.spec.args.iter().any(|a| a.starts_with("--p-"))
        };
        if c.llm.as_mut().is_some_and(faulty) {
            c.restart_llm(&[]).await?;
        }
        for i in 0..c.gateways.len() {
            if !c.gateways[i].proc.alive() {
                c.gateways[i].proc.restart()?;
            }
        }
        for i in 0..c.workers.len() {
            if !c.workers[i].proc.alive() {
                c.workers[i].proc.restart()?;
            }
        }
        let limit = crate::cluster::START_LIMIT;
        for i in 0..c.gateways.len() {
            c.wait_ready(c.gateways[i].admin, true, limit).await?;
            c.wait_lb_up(i, limit).await?;
        }
        for i in 0..c.workers.len() {
            c.wait_ready(c.workers[i].admin, true, limit).await?;
        }
        Ok(())
    }
}

/// Waits until every acked chat of `run` has shown at least one chunk: the streams
/// are in flight when the fault hits.
pub async fn wait_mid_stream(fleet: &Fleet, run: &ChatRun) -> Result<()> {
    let ok = crate::fleet::wait_for(FIRST_CHUNK, || {
        run.sessions.iter().all(|(i, s)| {
            let st = fleet.users[*i].state();
            st.chats
                .get(s)
                .and_then(|c| c.latest())
                .is_none_or(|(_, st)| !st.chunks.is_empty() || st.resolved())
        })
    })
    .await;
    if ok.is_none() {
        bail!("chat streams did not start within {FIRST_CHUNK:?}");
    }
    if run.acked() == 0 {
        bail!(
            "no chat request was acked: {:?}",
            run.answers.values().take(3).collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// Picks `n` users: first from `prefer`, then the others; skips `avoid`.
pub fn pick(total: usize, prefer: &[usize], avoid: &[usize], n: usize) -> Vec<usize> {
    let mut out: Vec<usize> = prefer
        .iter()
        .copied()
        .filter(|i| !avoid.contains(i))
        .take(n)
        .collect();
    for i in 0..total {
        if out.len() >= n {
            break;
        }
        if !out.contains(&i) && !avoid.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// The chat and history checks every scenario with streams makes.
/// Publications go on for this long after a recovery before every subscriber must
/// have received one.
pub const DELIVERY_WINDOW: Duration = Duration::from_secs(4);

/// Lets the traffic run [`DELIVERY_WINDOW`] more after a recovery, stops it, and checks
/// that every subscriber (`who`: all of them, or those that stayed connected) received
/// something while publications were acked. Returns the traffic's totals and how
/// many subscribers received nothing.
pub async fn check_delivery(
    r: &mut ScenarioReport,
    fleet: &Fleet,
    traffic: Traffic,
    who: &str,
) -> (TrafficStats, usize) {
    let before: Vec<u64> = fleet.users.iter().map(|u| u.state().received).collect();
    let acked_before = traffic.stats().acked;
    tokio::time::sleep(DELIVERY_WINDOW).await;
    let acked_in_window = traffic.stats().acked - acked_before;
    let starved = fleet
        .users
        .iter()
        .enumerate()
        .filter(|(i, u)| u.profile.channel.is_some() && u.state().received == before[*i])
        .count();
    let stats = traffic.stop().await;
    tokio::time::sleep(QUIESCE).await;
    r.measure("publications_acked_in_delivery_window", acked_in_window);
    r.check(
        &format!("{who} receive new publications after the recovery"),
        format!(
            "all {} within {} s",
            fleet.users.len(),
            DELIVERY_WINDOW.as_secs()
        ),
        format!("{starved} received nothing ({acked_in_window} publications acked meanwhile)"),
        starved == 0 && acked_in_window > 0,
    );
    (stats, starved)
}

pub async fn check_chats(r: &mut ScenarioReport, fleet: &Fleet, run: &ChatRun, what: &str) {
    check_chats_with(r, fleet, run, what, false).await
}

/// As [`check_chats`]; with `sessions_may_vanish` (Redis restarted empty, as run
/// here without persistence) a session that no longer exists is measured, not
/// failed, but a reply recorded twice or differently still fails.
pub async fn check_chats_with(
    r: &mut ScenarioReport,
    fleet: &Fleet,
    run: &ChatRun,
    what: &str,
    sessions_may_vanish: bool,
) {
    let t = fleet.chat_tally(run);
    let h = fleet.verify_history(run).await;
    r.measure(&format!("{what}_chat"), &t);
    r.measure(&format!("{what}_history"), &h);
    r.check(
        &format!("{what}: acked chats resolved at the client (live or history)"),
        format!("{} of {}", t.acked, t.acked),
        format!(
            "{} of {} (live {}, history after reconnect {}, after stall {}, errors {})",
            t.acked - t.unresolved,
            t.acked,
            t.live,
            t.filled_reconnect,
            t.filled_stall,
            t.errors
        ),
        t.unresolved == 0 && t.acked > 0,
    );
    r.check_zero(
        &format!("{what}: chat.error that is not retryable"),
        t.fatal_errors,
    );
    let text = format!(
        "{} once, {} missing, {} duplicated, {} different, {} unreadable, {} sessions gone",
        h.exactly_once, h.missing, h.duplicated, h.mismatched, h.unreadable, h.session_not_found
    );
    if sessions_may_vanish {
        r.check(
            &format!(
                "{what}: no reply recorded twice or differently (sessions may be gone with Redis)"
            ),
            "0 duplicated/different/missing in sessions that exist",
            text,
            h.bad() == h.session_not_found,
        );
    } else {
        r.check(
            &format!("{what}: replies recorded in history exactly once, same text"),
            "all; 0 missing/duplicated/different",
            text,
            h.bad() == 0 && h.exactly_once > 0,
        );
    }
}

/// Reconnect-time checks for a set of clients that the fault disconnected.
pub fn check_reconnects(r: &mut ScenarioReport, ms: &[f64], bound_ms: u64, what: &str) {
    let s = Summary::of(ms);
    r.measure(&format!("{what}_reconnect_ms"), s);
    r.check_max(
        &format!("{what}: reconnect time max"),
        s.max,
        bound_ms as f64,
        " ms",
    );
}
