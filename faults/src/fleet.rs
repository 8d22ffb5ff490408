//! The load: a fleet of simulated users (one connection each, spread over source
//! addresses), channel traffic from one publisher per channel, chat streams, and the
//! tallies the scenarios check: channel gaps/duplicates/recovery, chat resolution
//! and exactly-once history, closes and reconnects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client::{Env, Fill, Profile, ReqError, User, now_ms};
use crate::cluster::ROOM_NAMESPACE;
use crate::stats::Summary;

/// A whole fleet must be connected and subscribed within this.
pub const FLEET_READY: Duration = Duration::from_secs(60);
/// Connections opened per batch while a fleet starts, and the pause between
/// batches: a steady ramp rather than a thundering herd at start.
const RAMP_BATCH: usize = 50;
const RAMP_PAUSE: Duration = Duration::from_millis(100);
/// A request (publish, chat.send, history) must be answered within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// 127.0.0.2 .. 127.0.0.254, round robin.
pub fn src_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % 253) as u8)
}

/// Polls `f` every 50 ms until it holds; the time it took, or `None` at `limit`.
pub async fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct Fleet {
    pub users: Vec<Arc<User>>,
    pub env: Arc<Env>,
    pub channels: Vec<String>,
    /// Prefix of every user, session and channel name of this fleet.
    pub tag: String,
    stop: CancellationToken,
    pub started: Instant,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Users never outlive their fleet, even when a scenario bails out early.
        self.stop.cancel();
    }
}

impl Fleet {
    /// Connects `users` users; user `i` subscribes to channel `i % channels`.
    pub async fn start(env: Arc<Env>, tag: &str, users: usize, channels: usize) -> Result<Fleet> {
        let stop = CancellationToken::new();
        let channels: Vec<String> = (0..channels)
            .map(|k| format!("{ROOM_NAMESPACE}:{tag}-c{k}"))
            .collect();
        let mut fleet = Fleet {
            users: Vec::with_capacity(users),
            env,
            channels,
            tag: tag.to_owned(),
            stop,
            started: Instant::now(),
        };
        for i in 0..users {
            let channel = (!fleet.channels.is_empty())
                .then(|| fleet.channels[i % fleet.channels.len()].clone());
            fleet.add(Profile {
                id: format!("{tag}-u{i}"),
                src_ip: src_ip(i),
                channel,
                recv_buffer: None,
            });
            if (i + 1) % RAMP_BATCH == 0 {
                tokio::time::sleep(RAMP_PAUSE).await;
            }
        }
        fleet.wait_ready(0..users).await?;
        Ok(fleet)
    }

    /// Adds one more user (a slow client, a late joiner).
    pub fn add(&mut self, profile: Profile) -> Arc<User> {
        let u = User::spawn(profile, self.env.clone(), self.stop.child_token());
        self.users.push(u.clone());
        u
    }

    /// Waits until the users in `range` are connected and (if they have a channel)
    /// subscribed.
    pub async fn wait_ready(&self, range: std::ops::Range<usize>) -> Result<()> {
        let users = &self.users[range];
        let ok = wait_for(FLEET_READY, || {
            users.iter().all(|u| {
                let st = u.state();
                st.connected && (u.profile.channel.is_none() || !st.subscribes.is_empty())
            })
        })
        .await;
        if ok.is_none() {
            let missing: Vec<String> = users
                .iter()
                .filter(|u| !u.connected())
                .take(5)
                .map(|u| {
                    let st = u.state();
                    format!(
                        "{} ({:?})",
                        u.id(),
                        st.failures.last().map(|f| f.cause.clone())
                    )
                })
                .collect();
            bail!("fleet not ready within {FLEET_READY:?}; e.g. {missing:?}");
        }
        Ok(())
    }

    /// Disconnects everyone (close 1000).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = wait_for(Duration::from_secs(5), || {
            self.users.iter().all(|u| !u.connected())
        })
        .await;
    }

    /// Indices of users connected to `node` now.
    pub fn on_node(&self, node: &str) -> Vec<usize> {
        (0..self.users.len())
            .filter(|&i| self.users[i].state().node.as_deref() == Some(node))
            .collect()
    }

    /// Connections per node now.
    pub fn per_node(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for u in &self.users {
            if let Some(n) = u.state().node.clone() {
                *m.entry(n).or_insert(0) += 1;
            }
        }
        m
    }

    /// The publisher of each channel: its first member.
    pub fn publishers(&self) -> Vec<Arc<User>> {
        (0..self.channels.len().min(self.users.len()))
            .map(|k| self.users[k].clone())
            .collect()
    }

    /// Starts channel traffic: every publisher publishes every `every`.
    pub fn traffic(&self, every: Duration) -> Traffic {
        Traffic::start(self.publishers(), every)
    }

    /// Every user's latency samples since the last call.
    pub fn take_latencies(&self) -> Vec<u32> {
        self.take_latencies_except(&[])
    }

    /// Latency samples since the last call of every user but those in `skip`.
    pub fn take_latencies_except(&self, skip: &[usize]) -> Vec<u32> {
        let mut all = Vec::new();
        for (i, u) in self.users.iter().enumerate() {
            let mut st = u.state();
            if skip.contains(&i) {
                st.latencies_ms.clear();
            } else {
                all.append(&mut st.latencies_ms);
            }
        }
        all
    }

    /// Channel delivery as the subscribers saw it, against what was acked.
    pub fn channel_tally(&self, traffic: &TrafficStats, skip: &[usize]) -> ChannelTally {
        let mut t = ChannelTally::default();
        for (i, u) in self.users.iter().enumerate() {
            let Some(ch) = &u.profile.channel else {
                continue;
            };
            if skip.contains(&i) {
                continue;
            }
            let st = u.state();
            t.subscribers += 1;
            t.received += st.received;
            t.gaps += st.gaps;
            t.dups += st.dups;
            t.unrecovered += st.unrecovered;
            for s in st.subscribes.iter().filter(|s| s.since.is_some()) {
                t.resubscribes += 1;
                if s.recovered {
                    t.recovered += 1;
                }
            }
            if let Some(acked) = traffic.acked_n.get(ch) {
                t.undelivered += acked.iter().filter(|n| !st.seen_n.contains(n)).count() as u64;
            }
            let top = traffic.max_acked.get(ch).copied().unwrap_or(0);
            if st.last_offset.unwrap_or(0) < top {
                t.behind += 1;
                t.missing_tail += top - st.last_offset.unwrap_or(0);
            }
        }
        t
    }

    /// Sends one chat from each of `users` at once (sessions `<tag>-<label>-<n>`).
    pub async fn start_chats(&self, users: &[usize], label: &str) -> ChatRun {
        let mut set = JoinSet::new();
        let mut run = ChatRun::default();
        for (n, &i) in users.iter().enumerate() {
            let session = format!("{}-{label}-{n}", self.tag);
            run.sessions.push((i, session.clone()));
            let u = self.users[i].clone();
            set.spawn(async move {
                let sent = Instant::now();
                let r = u.chat(&session, REQUEST_TIMEOUT).await;
                (session, r, sent.elapsed())
            });
        }
        while let Some(Ok((session, r, took))) = set.join_next().await {
            run.answer_ms.push(took.as_millis() as f64);
            run.answers.insert(session, answer_kind(&r));
        }
        run
    }

    /// Waits until every chat of `run` that was acked is resolved at its client.
    pub async fn wait_chats(&self, run: &ChatRun, limit: Duration) -> Option<Duration> {
        wait_for(limit, || self.chat_tally(run).unresolved == 0).await
    }

    pub fn chat_tally(&self, run: &ChatRun) -> ChatTally {
        let mut t = ChatTally {
            sessions: run.sessions.len() as u64,
            ..ChatTally::default()
        };
        // Repeats the clients dropped, per user (a user may own several sessions).
        let owners: BTreeSet<usize> = run.sessions.iter().map(|(i, _)| *i).collect();
        for i in owners {
            let st = self.users[i].state();
            t.dup_chunks += st.dup_chunks;
            t.extra_completes += st.extra_completes;
        }
        for (i, session) in &run.sessions {
            let st = self.users[*i].state();
            let Some(chat) = st.chats.get(session) else {
                t.not_sent += 1;
                continue;
            };
            let Some((_, s)) = chat.latest() else {
                match run.answers.get(session).map(String::as_str) {
                    Some("ack") | None => t.unresolved += 1,
                    Some(_) => t.refused += 1,
                }
                continue;
            };
            t.acked += 1;
            match (&s.complete, &s.filled, &s.error) {
                (Some(_), _, _) => t.live += 1,
                (None, Some((_, Fill::Reconnect)), _) => t.filled_reconnect += 1,
                (None, Some((_, Fill::Stall)), _) => t.filled_stall += 1,
                (None, None, Some((code, retryable))) => {
                    t.errors += 1;
                    if !retryable {
                        t.fatal_errors += 1;
                    }
                    *t.error_codes.entry(code.clone()).or_insert(0) += 1;
                }
                (None, None, None) => t.unresolved += 1,
            }
            if chat.acked.len() > 1 {
                t.retried += 1;
            }
        }
        t
    }

    /// Reads each session's history through its owner's connection: every reply the
    /// client holds is there exactly once, with the same text; a request answered
    /// `chat.error` is not recorded.
    pub async fn verify_history(&self, run: &ChatRun) -> HistoryTally {
        let mut t = HistoryTally::default();
        // One read at a time per user, as an app would: a burst of reads on one
        // connection would hit the per-connection message rate (burst 40).
        let mut per_user: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (i, session) in &run.sessions {
            per_user.entry(*i).or_default().push(session.clone());
        }
        let mut set = JoinSet::new();
        for (i, sessions) in per_user {
            let u = self.users[i].clone();
            set.spawn(async move {
                let mut out = Vec::new();
                for session in sessions {
                    let r = u
                        .request(
                            json!({"type": "history", "session_id": session, "limit": 100}),
                            REQUEST_TIMEOUT,
                        )
                        .await;
                    out.push((u.clone(), session, r));
                }
                out
            });
        }
        let mut answers = Vec::new();
        while let Some(Ok(out)) = set.join_next().await {
            answers.extend(out);
        }
        for (u, session, r) in answers {
            let chat = u.state().chats.get(&session).cloned();
            let Some(chat) = chat else { continue };
            if chat.acked.is_empty() {
                continue;
            }
            let v = match r {
                Ok(v) if v["type"] == "history" => v,
                Ok(v) if v["code"] == "NOT_FOUND" => {
                    t.session_not_found += 1;
                    continue;
                }
                other => {
                    t.unreadable += 1;
                    let why = match other {
                        Ok(v) => format!("error {}", v["code"].as_str().unwrap_or("?")),
                        Err(e) => e.to_string(),
                    };
                    *t.unreadable_why.entry(why).or_insert(0) += 1;
                    continue;
                }
            };
            let mut count: HashMap<String, Vec<String>> = HashMap::new();
            for m in v["messages"].as_array().into_iter().flatten() {
                if m["role"] == "assistant"
                    && let Some(rid) = m["request_id"].as_str()
                {
                    count
                        .entry(rid.to_owned())
                        .or_default()
                        .push(m["content"].as_str().unwrap_or_default().to_owned());
                }
            }
            for rid in &chat.acked {
                let Some(s) = chat.streams.get(rid) else {
                    continue;
                };
                let recorded = count.get(rid).map(Vec::as_slice).unwrap_or_default();
                match (s.reply(), s.error.is_some()) {
                    (Some(reply), _) => match recorded.len() {
                        0 => t.missing += 1,
                        1 if recorded[0] == reply => t.exactly_once += 1,
                        1 => t.mismatched += 1,
                        _ => t.duplicated += 1,
                    },
                    (None, true) => {
                        if recorded.is_empty() {
                            t.error_not_recorded += 1;
                        } else {
                            t.error_but_recorded += 1;
                        }
                    }
                    (None, false) => t.missing += 1,
                }
            }
        }
        t
    }

    /// Closes and reconnects as seen by the clients since `since`.
    pub fn connection_tally(&self, since: Instant) -> ConnTally {
        let mut t = ConnTally::default();
        for u in &self.users {
            let st = u.state();
            for e in st.ended.iter().filter(|e| e.at >= since) {
                if e.by_client {
                    t.client_closes += 1;
                    continue;
                }
                let key = e.code.map_or("1006".to_owned(), |c| c.to_string());
                *t.server_closes.entry(key).or_insert(0) += 1;
                if e.code == Some(1012) && !e.after_reconnect_frame {
                    t.restart_without_reconnect_frame += 1;
                }
            }
            for r in st.reconnects.iter().filter(|r| r.down_at >= since) {
                t.reconnect_ms
                    .push(r.up_at.duration_since(r.down_at).as_secs_f64() * 1000.0);
                t.reconnect_at.push(r.up_at);
            }
            for f in st.failures.iter().filter(|f| f.at >= since) {
                *t.failures.entry(simplify(&f.cause)).or_insert(0) += 1;
            }
            if st.stopped.is_some() {
                t.gave_up += 1;
            }
            t.disconnected += u64::from(!st.connected);
        }
        t
    }

    /// Errors (by code) the clients received since `since`.
    pub fn errors_since(&self, since: Instant) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for u in &self.users {
            for e in u.state().errors.iter().filter(|e| e.at >= since) {
                *m.entry(e.code.clone()).or_insert(0) += 1;
            }
        }
        m
    }
}

/// A failure cause without its per-attempt details (ports, addresses).
fn simplify(cause: &str) -> String {
    cause
        .split(':')
        .next()
        .unwrap_or(cause)
        .chars()
        .take(60)
        .collect()
}

fn answer_kind(r: &Result<Value, ReqError>) -> String {
    match r {
        Ok(v) if v["type"] == "ack" => "ack".into(),
        Ok(v) if v["type"] == "error" => format!("error {}", v["code"].as_str().unwrap_or("?")),
        Ok(v) => format!("unexpected {}", v["type"]),
        Err(e) => format!("no answer: {e}"),
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ChannelTally {
    pub subscribers: u64,
    pub received: u64,
    pub gaps: u64,
    pub dups: u64,
    pub unrecovered: u64,
    pub resubscribes: u64,
    pub recovered: u64,
    /// Subscribers whose last offset is below the channel's highest acked one.
    pub behind: u64,
    pub missing_tail: u64,
    /// Acked client publications (by the publisher's sequence number) that a
    /// subscriber never received, whatever their offsets said.
    pub undelivered: u64,
}

impl ChannelTally {
    /// Publications a subscriber should have and does not have.
    pub fn lost(&self) -> u64 {
        self.gaps + self.unrecovered + self.missing_tail + self.undelivered
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ChatRun {
    /// (user index, session id)
    pub sessions: Vec<(usize, String)>,
    /// The direct answer to each `chat.send`.
    pub answers: BTreeMap<String, String>,
    pub answer_ms: Vec<f64>,
}

impl ChatRun {
    pub fn acked(&self) -> usize {
        self.answers.values().filter(|a| *a == "ack").count()
    }

    pub fn answer_summary(&self) -> Summary {
        Summary::of(&self.answer_ms)
    }

    pub fn merge(&mut self, other: ChatRun) {
        self.sessions.extend(other.sessions);
        self.answers.extend(other.answers);
        self.answer_ms.extend(other.answer_ms);
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ChatTally {
    pub sessions: u64,
    pub not_sent: u64,
    /// `chat.send` answered with an error (not acked).
    pub refused: u64,
    pub acked: u64,
    /// Resolved by a live `chat.complete`.
    pub live: u64,
    pub filled_reconnect: u64,
    pub filled_stall: u64,
    pub errors: u64,
    pub fatal_errors: u64,
    pub error_codes: BTreeMap<String, u64>,
    pub unresolved: u64,
    pub retried: u64,
    /// Chunks repeated (same request and seq) that the client dropped.
    pub dup_chunks: u64,
    /// `chat.complete` received more than once for a request (ignored by clients).
    pub extra_completes: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct HistoryTally {
    pub exactly_once: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub mismatched: u64,
    pub error_not_recorded: u64,
    pub error_but_recorded: u64,
    /// History could not be read (the owner not connected, no answer, an error).
    pub unreadable: u64,
    pub unreadable_why: BTreeMap<String, u64>,
    /// `history` answered NOT_FOUND: the session is gone (Redis lost it).
    pub session_not_found: u64,
}

impl HistoryTally {
    pub fn bad(&self) -> u64 {
        self.missing
            + self.duplicated
            + self.mismatched
            + self.error_but_recorded
            + self.unreadable
            + self.session_not_found
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ConnTally {
    pub client_closes: u64,
    /// Closes the server (or a dead TCP connection: "1006") ended, by code.
    pub server_closes: BTreeMap<String, u64>,
    pub restart_without_reconnect_frame: u64,
    #[serde(skip)]
    pub reconnect_ms: Vec<f64>,
    #[serde(skip)]
    pub reconnect_at: Vec<Instant>,
    /// Failed connection attempts by cause.
    pub failures: BTreeMap<String, u64>,
    pub gave_up: u64,
    pub disconnected: u64,
}

impl ConnTally {
    pub fn server_close_count(&self) -> u64 {
        self.server_closes.values().sum()
    }

    pub fn failure_count(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// What the publishers did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct TrafficStats {
    pub sent: u64,
    pub acked: u64,
    pub errors: BTreeMap<String, u64>,
    pub no_answer: BTreeMap<String, u64>,
    pub max_acked: HashMap<String, u64>,
    /// Sequence numbers of the acked publications, per channel.
    #[serde(skip)]
    pub acked_n: HashMap<String, Vec<u64>>,
    #[serde(skip)]
    pub answer_ms: Vec<f64>,
}

pub struct Traffic {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    stats: Arc<Mutex<TrafficStats>>,
}

impl Traffic {
    fn start(publishers: Vec<Arc<User>>, every: Duration) -> Traffic {
        let stop = CancellationToken::new();
        let stats = Arc::new(Mutex::new(TrafficStats::default()));
        let mut tasks = JoinSet::new();
        for (k, u) in publishers.into_iter().enumerate() {
            let (stop, stats) = (stop.clone(), stats.clone());
            tasks.spawn(async move {
                let Some(channel) = u.profile.channel.clone() else {
                    return;
                };
                // Publishers start spread over one period, not in lockstep.
                let offset = every.mul_f64((k % 16) as f64 / 16.0);
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut n: u64 = 0;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    if !u.connected() {
                        continue;
                    }
                    n += 1;
                    let frame = json!({"type": "publish", "channel": channel,
                                       "data": {"ts": now_ms(), "n": n, "from": u.id()}});
                    let t0 = Instant::now();
                    let r = u.request(frame, REQUEST_TIMEOUT).await;
                    let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                    s.sent += 1;
                    s.answer_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
                    match r {
                        Ok(v) if v["type"] == "ack" => {
                            s.acked += 1;
                            let o = v["offset"].as_u64().unwrap_or(0);
                            let top = s.max_acked.entry(channel.clone()).or_insert(0);
                            *top = (*top).max(o);
                            s.acked_n.entry(channel.clone()).or_default().push(n);
                        }
                        Ok(v) => {
                            *s.errors
                                .entry(v["code"].as_str().unwrap_or("?").to_owned())
                                .or_insert(0) += 1;
                        }
                        Err(e) => *s.no_answer.entry(e.to_string()).or_insert(0) += 1,
                    }
                }
            });
        }
        Traffic { stop, tasks, stats }
    }

    pub fn stats(&self) -> TrafficStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops publishing; returns what was done.
    pub async fn stop(mut self) -> TrafficStats {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.stats()
    }
}
