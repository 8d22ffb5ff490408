//! A real Redis Cluster on free ports: primaries and replicas joined by `redis-cli
//! --cluster create`, for tests that run the product on Cluster and kill a primary to
//! watch its replica take over.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process::find_binary;
use crate::redis_server::Redis;

/// How long a primary may be unreachable before its replica is promoted: short, so
/// failover tests take seconds (production runs 5-15 s).
pub const NODE_TIMEOUT_MS: u64 = 2000;
/// Forming a cluster (slot assignment, gossip, replica sync) takes a few seconds on a
/// loaded machine; this is the give-up point.
pub const FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// `primaries` primaries, each with `replicas_each` replicas.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    /// Three primaries without replicas: enough to spread slots, fast to start.
    pub fn start() -> anyhow::Result<RedisCluster> {
        RedisCluster::start_with(3, 0)
    }

    pub fn start_with(primaries: usize, replicas_each: usize) -> anyhow::Result<RedisCluster> {
        if primaries < 3 {
            bail!("redis-cli --cluster create needs at least 3 primaries");
        }
        let timeout = NODE_TIMEOUT_MS.to_string();
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas_each) {
            nodes.push(Redis::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                &timeout,
                "--cluster-config-file",
                "nodes.conf",
                // A replica may take over even after a long disconnect: tests kill
                // primaries at will.
                "--cluster-replica-validity-factor",
                "0",
            ])?);
        }
        let cli = find_binary("redis-cli")?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args([
                "--cluster-replicas",
                &replicas_each.to_string(),
                "--cluster-yes",
            ])
            .stdin(Stdio::null())
            .output()
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let c = RedisCluster { nodes };
        c.wait_ok(FORM_TIMEOUT)?;
        Ok(c)
    }

    /// Seed URLs, comma-separated (`SB_REDIS_URL` with `SB_REDIS_CLUSTER=true`).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every running node reports `cluster_state:ok` with all slots
    /// served.
    pub fn wait_ok(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                n.command(&["CLUSTER", "INFO"]).is_ok_and(|i| {
                    i.contains("cluster_state:ok") && i.contains("cluster_slots_ok:16384")
                })
            });
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("redis cluster not ok after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Indices of the nodes that are primaries now (as the first running node sees
    /// them).
    pub fn primaries(&self) -> Vec<usize> {
        let Some(view) = self
            .nodes
            .iter()
            .find(|n| n.is_running())
            .and_then(|n| n.command(&["CLUSTER", "NODES"]).ok())
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for line in view.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 3 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let port = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok());
            if let Some(i) = self.nodes.iter().position(|n| Some(n.port) == port) {
                out.push(i);
            }
        }
        out.sort_unstable();
        out
    }

    /// The index of the primary serving `key` now.
    pub fn primary_for(&self, key: &str) -> Option<usize> {
        let slot = self
            .nodes
            .iter()
            .find(|n| n.is_running())?
            .command(&["CLUSTER", "KEYSLOT", key])
            .ok()?
            .trim()
            .trim_start_matches(':')
            .parse::<u16>()
            .ok()?;
        self.primaries().into_iter().find(|i| self.serves(*i, slot))
    }

    fn serves(&self, i: usize, slot: u16) -> bool {
        // `CLUSTER NODES` lists each primary's slot ranges after its 8th field.
        let Ok(view) = self.nodes[i].command(&["CLUSTER", "NODES"]) else {
            return false;
        };
        view.lines()
            .find(|l| l.contains("myself"))
            .map(|l| {
                l.split(' ').skip(8).any(|r| match r.split_once('-') {
                    Some((a, b)) => matches!((a.parse::<u16>(), b.trim().parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b),
                    None => r.trim().parse::<u16>() == Ok(slot),
                })
            })
            .unwrap_or(false)
    }

    /// `INFO commandstats` summed over the primaries (replicas repeat the writes).
    pub fn command_stats(&self) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
        let mut total = BTreeMap::new();
        for i in self.primaries() {
            for (cmd, (calls, usec)) in self.nodes[i].command_stats()? {
                let e = total.entry(cmd).or_insert((0, 0));
                e.0 += calls;
                e.1 += usec;
            }
        }
        Ok(total)
    }

    /// Keys held per primary (`DBSIZE`), by node index.
    pub fn key_spread(&self) -> Vec<(usize, u64)> {
        self.primaries()
            .into_iter()
            .map(|i| {
                let n = self.nodes[i]
                    .command(&["DBSIZE"])
                    .ok()
                    .and_then(|r| r.trim().trim_start_matches(':').parse().ok())
                    .unwrap_or(0);
                (i, n)
            })
            .collect()
    }
}

/// Environment variable that runs a suite on Redis Cluster instead of one server:
/// `SB_TEST_REDIS=cluster` (the README's test command runs a representative part of
/// the integration suites both ways).
pub const TEST_REDIS_ENV: &str = "SB_TEST_REDIS";

/// The Redis a test runs on: one server, or a cluster when [`TEST_REDIS_ENV`] says so.
pub enum TestRedis {
    Single(Redis),
    Cluster(RedisCluster),
}

impl TestRedis {
    pub fn start() -> anyhow::Result<TestRedis> {
        match std::env::var(TEST_REDIS_ENV).as_deref() {
            Ok("cluster") => Ok(TestRedis::Cluster(RedisCluster::start()?)),
            Ok("single") | Err(_) => Ok(TestRedis::Single(Redis::start()?)),
            Ok(other) => bail!("{TEST_REDIS_ENV}={other}: use `single` or `cluster`"),
        }
    }

    /// `SB_REDIS_URL` for the product.
    pub fn url(&self) -> String {
        match self {
            TestRedis::Single(r) => r.url(),
            TestRedis::Cluster(c) => c.urls(),
        }
    }

    /// `SB_REDIS_CLUSTER` for the product.
    pub fn is_cluster(&self) -> bool {
        matches!(self, TestRedis::Cluster(_))
    }

    /// Runs a command on the node that serves its key (`args[1]`; any node for a
    /// command without one) and returns the raw reply.
    pub fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        match self {
            TestRedis::Single(r) => r.command(args),
            TestRedis::Cluster(c) => {
                let node = match args.get(1) {
                    Some(key) => c.primary_for(key).context("no primary serves the key")?,
                    None => c.primaries().first().copied().context("no primary")?,
                };
                c.nodes[node].command(args)
            }
        }
    }

    /// The single server, for fault tests that stop and restart it.
    pub fn single(&mut self) -> &mut Redis {
        match self {
            TestRedis::Single(r) => r,
            TestRedis::Cluster(_) => panic!("this test needs a single Redis server"),
        }
    }

    /// `INFO commandstats`, summed over the primaries of a cluster.
    pub fn command_stats(&self) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
        match self {
            TestRedis::Single(r) => r.command_stats(),
            TestRedis::Cluster(c) => c.command_stats(),
        }
    }
}
