//! A real three-node `nats-server` cluster with JetStream, for tests of failover and
//! replicated streams: each node has its own store directory, client, cluster-route
//! and monitor ports (free ones), and a `server_name` (JetStream clustering needs
//! one). Nodes can be killed (SIGKILL) and started again on the same ports and
//! store, so clients reconnect to them.
//!
//! "Ready" means more than listening: the JetStream meta group has a leader that every
//! running node agrees on, and the leader sees every running peer as current. Until
//! then stream creation fails with "JetStream system temporarily unavailable", which
//! on a loaded 2-core machine can last seconds after the ports open.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::process::{NotReady, START_ATTEMPTS, find_binary, free_port, http_get_ok, wait_until};

/// Nodes in the cluster: the smallest that keeps a JetStream quorum with one down.
pub const CLUSTER_SIZE: usize = 3;
/// The cluster's name (nodes refuse routes from another cluster).
pub const CLUSTER_NAME: &str = "sbtest";
/// Give-up point for a meta leader: elections take a few seconds after a leader dies
/// (about 4 s measured), more on a loaded machine.
pub const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(45);
/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(50);
/// A monitor request that takes longer means the node is busy or gone.
const MONITOR_TIMEOUT: Duration = Duration::from_millis(500);

struct Node {
    name: String,
    port: u16,
    cluster_port: u16,
    monitor: u16,
    store: PathBuf,
    child: Option<Child>,
}

/// Three `nats-server -js` processes routed into one cluster.
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts the three nodes and waits until JetStream has a meta leader. Ports are
    /// picked free and bound a moment later; if any node exits at start (a port was
    /// taken meanwhile), everything starts again on fresh ports.
    pub fn start() -> anyhow::Result<NatsCluster> {
        let mut dir = tempfile::tempdir()?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let mut c = NatsCluster {
                nodes: (0..CLUSTER_SIZE)
                    .map(|i| Node {
                        name: format!("n{i}"),
                        port: free_port(),
                        cluster_port: free_port(),
                        monitor: free_port(),
                        store: dir.path().join(format!("n{i}")),
                        child: None,
                    })
                    .collect(),
                dir,
            };
            match c.spawn_all() {
                Ok(()) => return Ok(c),
                Err(e) => {
                    c.kill_all();
                    last = Some(e);
                    dir = std::mem::replace(&mut c.dir, tempfile::tempdir()?);
                    // Stores of the failed attempt must not leak into the next one.
                    for n in &c.nodes {
                        let _ = std::fs::remove_dir_all(&n.store);
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("nats cluster did not start")))
    }

    fn spawn_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.spawn(i)?;
        }
        for i in 0..self.nodes.len() {
            self.wait_listening(i)?;
        }
        self.wait_meta_leader()
    }

    /// `nats://a,nats://b,nats://c`: the value for `SB_NATS_URL`.
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// Every node's client URL, in node order.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    fn config(&self, i: usize) -> String {
        let n = &self.nodes[i];
        let routes: Vec<String> = self
            .nodes
            .iter()
            .map(|o| format!("nats-route://127.0.0.1:{}", o.cluster_port))
            .collect();
        format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\n\
             jetstream {{ store_dir: {store:?} }}\n\
             cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{cport}\n  routes: [{routes}]\n}}\n",
            name = n.name,
            port = n.port,
            monitor = n.monitor,
            store = n.store.display().to_string(),
            cport = n.cluster_port,
            routes = routes.join(", "),
        )
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let bin = find_binary("nats-server")?;
        let conf = self.dir.path().join(format!("n{i}.conf"));
        std::fs::write(&conf, self.config(i))?;
        std::fs::create_dir_all(&self.nodes[i].store)?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning nats-server")?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    fn monitor(&self, i: usize) -> SocketAddr {
        ([127, 0, 0, 1], self.nodes[i].monitor).into()
    }

    fn wait_listening(&mut self, i: usize) -> anyhow::Result<()> {
        let monitor = self.monitor(i);
        let Some(child) = self.nodes[i].child.as_mut() else {
            bail!("node {i} is not running");
        };
        match wait_until(child, || {
            http_get_ok(monitor, "/healthz?js-enabled-only=true")
        }) {
            Ok(()) => Ok(()),
            Err(NotReady::Exited) => {
                self.nodes[i].child = None;
                bail!("nats-server node {i} exited at start (port taken?)")
            }
            Err(NotReady::TimedOut) => bail!("nats-server node {i} not listening in time"),
        }
    }

    /// `/jsz` of a running node.
    fn jsz(&self, i: usize) -> Option<Value> {
        if !self.is_running(i) {
            return None;
        }
        let body = http_get(self.monitor(i), "/jsz")?;
        serde_json::from_str(&body).ok()
    }

    /// The meta leader's name, if every running node names the same one, that node is
    /// running, and it sees every other running node as a current replica.
    pub fn meta_leader(&self) -> Option<String> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.is_running(*i))
            .collect();
        let mut leader: Option<String> = None;
        for &i in &running {
            let jsz = self.jsz(i)?;
            let l = jsz["meta_cluster"]["leader"].as_str()?.to_owned();
            if l.is_empty() || leader.as_ref().is_some_and(|x| *x != l) {
                return None;
            }
            leader = Some(l);
        }
        let leader = leader?;
        let li = running
            .iter()
            .copied()
            .find(|i| self.nodes[*i].name == leader)?;
        let jsz = self.jsz(li)?;
        let replicas = jsz["meta_cluster"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let all_current = running.iter().filter(|i| **i != li).all(|i| {
            replicas.iter().any(|r| {
                r["name"].as_str() == Some(self.nodes[*i].name.as_str())
                    && r["current"].as_bool() == Some(true)
            })
        });
        all_current.then_some(leader)
    }

    /// Waits until [`meta_leader`](Self::meta_leader) names one.
    pub fn wait_meta_leader(&self) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < CLUSTER_READY_TIMEOUT {
            if self.meta_leader().is_some() {
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
        bail!("no JetStream meta leader after {CLUSTER_READY_TIMEOUT:?}")
    }

    /// The node the client whose connection is named exactly `name` is connected to
    /// (from each node's `/connz`).
    pub fn node_of_client(&self, name: &str) -> Option<usize> {
        self.nodes_of_client(name).into_iter().next()
    }

    /// Every node holding a connection named exactly `name`.
    pub fn nodes_of_client(&self, name: &str) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.is_running(*i))
            .filter(|i| {
                let Some(body) = http_get(self.monitor(*i), "/connz?limit=1024") else {
                    return false;
                };
                let Ok(v) = serde_json::from_str::<Value>(&body) else {
                    return false;
                };
                v["connections"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["name"].as_str() == Some(name)))
            })
            .collect()
    }

    /// SIGKILL node `i`, like a crash; its store stays for [`start_again`](Self::start_again).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn kill_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }

    /// Starts node `i` again on its ports with its store, and waits until it is back
    /// in the cluster (listening, and a current replica of the meta group).
    pub fn start_again(&mut self, i: usize) -> anyhow::Result<()> {
        if self.is_running(i) {
            return Ok(());
        }
        for _ in 0..START_ATTEMPTS {
            self.spawn(i)?;
            if self.wait_listening(i).is_ok() {
                return self.wait_meta_leader();
            }
            // Someone took its port meanwhile; it is freed again when they finish.
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("nats-server node {i} did not start again")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The body of a `200` answer, or `None`.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, MONITOR_TIMEOUT).ok()?;
    s.set_read_timeout(Some(MONITOR_TIMEOUT)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    (head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")).then(|| body.to_owned())
}
