//! The whole cluster on loopback, as separate processes on free ports: NATS with
//! JetStream (one server, or a three-node cluster with replicated streams for the
//! scenarios that kill a node), Redis without persistence (one server, or a Redis
//! Cluster of three primaries with one replica each), three gateways behind
//! HAProxy, two workers, the STUB `mock-llm` (behind the LLM tap) and the STUB
//! `mock-backend`. Each piece
//! can be crashed, stopped and started again on its own ports (and, for NATS, its
//! own JetStream store); readiness comes from each node's admin `/readyz` and from
//! HAProxy's own view of its servers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{Proc, Spec};
use crate::tap::LlmTap;

/// Gateways behind the load balancer: three, the cluster shape of docs/faults.md ("What runs").
pub const GATEWAYS: usize = 3;
/// Workers consuming chat requests.
pub const WORKERS: usize = 2;
/// The public channel namespace the load uses (any authenticated user may publish).
pub const ROOM_NAMESPACE: &str = "room";
/// A component not ready after this long at start is a broken setup, not a finding.
pub const START_LIMIT: Duration = Duration::from_secs(30);
/// Log lines quoted when a node does not start: enough to show its last retries.
const LOG_TAIL_LINES: usize = 30;
/// One admin or API HTTP call over loopback.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(3);
/// HAProxy health-check period: failure detection is `FALL` of these.
pub const CHECK_INTER_MS: u64 = 500;
/// Failed checks before HAProxy takes a gateway out (and passing ones to put it back).
pub const FALL: u32 = 2;
pub const RISE: u32 = 2;
/// NATS nodes in cluster mode: the smallest cluster that keeps a JetStream quorum
/// with one node down.
pub const NATS_CLUSTER_NODES: usize = 3;
/// The cluster's name (nodes refuse routes from another cluster).
const NATS_CLUSTER_NAME: &str = "sbfaults";
/// A JetStream meta leader (elected and agreed on by every running node) within
/// this at start: elections take seconds, more on a loaded two-core machine.
pub const NATS_ELECTION_LIMIT: Duration = Duration::from_secs(45);

/// Redis Cluster shape: three primaries (the fewest `redis-cli --cluster create`
/// accepts) with one replica each, so any one primary can die and be replaced.
pub const REDIS_PRIMARIES: usize = 3;
pub const REDIS_REPLICAS_EACH: usize = 1;
/// How long a Redis Cluster primary may be unreachable before its replica is
/// promoted: short so a failover scenario takes seconds (production runs 5-15 s).
pub const REDIS_NODE_TIMEOUT_MS: u64 = 2000;
/// Forming a Redis Cluster (slot assignment, gossip, replica sync) on a loaded
/// machine takes seconds; this is the give-up point.
pub const REDIS_FORM_LIMIT: Duration = Duration::from_secs(60);
/// One Redis command of the harness (readiness, slot map, stream tops) over loopback.
pub const REDIS_CMD_TIMEOUT: Duration = Duration::from_secs(2);
/// A component stopped with SIGTERM gets this long before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Prometheus scrapes this often: short so the dashboard moves during a demo.
const SCRAPE_SECS: u64 = 5;

/// How the cluster runs Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RedisMode {
    /// One redis-server (the product's default deployment).
    Single,
    /// A Redis Cluster, [`REDIS_PRIMARIES`] primaries with [`REDIS_REPLICAS_EACH`]
    /// replica each; gateways and workers get `SB_REDIS_CLUSTER=true` and every
    /// node as a seed.
    Cluster,
}

/// One redis-server process and its port.
pub struct RedisNode {
    pub proc: Proc,
    pub port: u16,
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub dir: PathBuf,
}

impl Bins {
    pub fn get(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.join(name);
        if !p.is_file() {
            bail!(
                "{} not found: build it first (`cargo build --release -p switchboard-gateway -p switchboard-worker -p switchboard-loadtest -p switchboard-demo-backend`)",
                p.display()
            );
        }
        Ok(p)
    }
}

/// Where every port of the cluster comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ports {
    /// Free ports picked at start: the fault suite and the benchmarks.
    Free,
    /// Fixed ports from `base` on (the README's local cluster, whose URLs people
    /// keep): see [`Port::offset`].
    Fixed { base: u16 },
}

/// One port of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Lb,
    Public(usize),
    Llm,
    Backend,
    Tap,
    LbStats,
    Prometheus,
    GatewayAdmin(usize),
    WorkerAdmin(usize),
    NatsClient(usize),
    NatsRoute(usize),
    NatsMonitor(usize),
    Redis(usize),
}

/// A fixed layout gives each kind of port a block of this many.
pub const FIXED_BLOCK: usize = 10;
/// A Redis Cluster node also listens on its port plus this (the cluster bus).
const REDIS_BUS_OFFSET: u16 = 10_000;

impl Port {
    /// Offset from the base of a fixed layout: the load balancer at the base and the
    /// gateways right after it, then a block of [`FIXED_BLOCK`] per kind.
    pub fn offset(self) -> u16 {
        let (block, i) = match self {
            Port::Lb => (0, 0),
            Port::Public(i) => (0, i + 1),
            Port::Llm => (1, 0),
            Port::Backend => (1, 1),
            Port::Tap => (1, 2),
            Port::LbStats => (1, 3),
            Port::Prometheus => (1, 4),
            Port::GatewayAdmin(i) => (2, i),
            Port::WorkerAdmin(i) => (3, i),
            Port::NatsClient(i) => (4, i),
            Port::NatsRoute(i) => (5, i),
            Port::NatsMonitor(i) => (6, i),
            Port::Redis(i) => (7, i),
        };
        (block * FIXED_BLOCK + i) as u16
    }
}

impl Ports {
    /// The port for `p`: a free one, or the fixed one when nothing else holds it.
    fn take(self, p: Port) -> Result<u16> {
        let Ports::Fixed { base } = self else {
            return Ok(testkit::free_port());
        };
        let port = base
            .checked_add(p.offset())
            .with_context(|| format!("port base {base} leaves no room for {p:?}"))?;
        let mut needed = vec![port];
        if matches!(p, Port::Redis(_)) {
            needed.push(port + REDIS_BUS_OFFSET);
        }
        for port in needed {
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                bail!(
                    "port {port} (for {p:?}) is taken by a process this cluster did not start: \
                     stop it, or give this cluster another port base"
                );
            }
        }
        Ok(port)
    }
}

/// The LLM the workers call.
#[derive(Debug, Clone)]
pub enum Llm {
    /// The STUB mock-llm with these flags, behind the LLM tap when `tap`.
    Stub { args: Vec<String>, tap: bool },
    /// llama.cpp's llama-server serving a model file.
    Real { server: PathBuf, model: PathBuf },
    /// Not started here: the workers find it through `SB_LLM_*` in `worker_env`.
    External,
}

/// The real model's settings: replies end within a few seconds (about 80 tokens/s
/// on 2 cores) and prompt plus reply fit the context (history cut to the budget).
const REAL_LLM_CONTEXT: u32 = 4096;
const REAL_LLM_MAX_TOKENS: u32 = 200;
const REAL_LLM_TOKEN_BUDGET: u32 = 2048;
/// The model name workers ask for: llama-server answers to this alias.
pub const REAL_LLM_ALIAS: &str = "smollm2";
/// The model loads in about a second; a cold page cache on a slow disk takes longer.
const LLM_READY_LIMIT: Duration = Duration::from_secs(120);

/// The team backend the workers call.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The STUB mock-backend (teams and tasks).
    Mock,
    /// demo-backend: demo logins, teams and tasks, and the demo page from `static_dir`.
    Demo { static_dir: PathBuf },
}

/// What a cluster is made of and how its nodes are set up.
#[derive(Debug, Clone)]
pub struct Shape {
    pub gateways: usize,
    pub workers: usize,
    /// 1: one NATS server. [`NATS_CLUSTER_NODES`]: a routed JetStream cluster, and
    /// gateways and workers given every node's URL and `SB_JETSTREAM_REPLICAS`.
    pub nats_nodes: usize,
    pub redis: RedisMode,
    pub ports: Ports,
    pub llm: Llm,
    pub backend: Backend,
    /// Prometheus scraping every node, with these alert rules; `None`: no Prometheus.
    pub prometheus_rules: Option<PathBuf>,
    /// Settings on top of the launcher's (later ones win), per role.
    pub gateway_env: Vec<(String, String)>,
    pub worker_env: Vec<(String, String)>,
    /// Children in process groups of their own, so a terminal's Ctrl-C reaches only
    /// the supervisor, which stops them in order.
    pub own_process_groups: bool,
    /// The HS256 secret gateways verify tokens with, and the ops API key.
    pub secret: String,
    pub api_key: String,
}

impl Shape {
    /// The fault suite's shape: free ports, [`GATEWAYS`] gateways, [`WORKERS`]
    /// workers, the stubs, the tap, no Prometheus, a fresh secret and key.
    pub fn new(nats_nodes: usize, redis: RedisMode, llm_args: Vec<String>) -> Shape {
        Shape {
            gateways: GATEWAYS,
            workers: WORKERS,
            nats_nodes,
            redis,
            ports: Ports::Free,
            llm: Llm::Stub {
                args: llm_args,
                tap: true,
            },
            backend: Backend::Mock,
            prometheus_rules: None,
            gateway_env: Vec::new(),
            worker_env: Vec::new(),
            own_process_groups: false,
            secret: secret_hex(32),
            api_key: secret_hex(16),
        }
    }
}

/// `gw1`, `gw2`, ...: node ids, log names and HAProxy server names.
pub fn gateway_name(i: usize) -> String {
    format!("gw{}", i + 1)
}

pub fn worker_name(i: usize) -> String {
    format!("worker{}", i + 1)
}

/// `nats` alone, `nats1`.. in a cluster (also each node's JetStream `server_name`).
pub fn nats_names(nodes: usize) -> Vec<String> {
    match nodes {
        1 => vec!["nats".to_owned()],
        n => (1..=n).map(|i| format!("nats{i}")).collect(),
    }
}

pub fn redis_names(mode: RedisMode) -> Vec<String> {
    match mode {
        RedisMode::Single => vec!["redis".to_owned()],
        RedisMode::Cluster => (1..=REDIS_PRIMARIES * (1 + REDIS_REPLICAS_EACH))
            .map(|i| format!("redis{i}"))
            .collect(),
    }
}

/// NATS node 1.. of a cluster (node 0 is `Cluster::nats`).
pub struct NatsPeer {
    pub proc: Proc,
    pub port: u16,
    monitor: u16,
}

/// A gateway or worker process with its ports.
pub struct Node {
    pub id: String,
    pub proc: Proc,
    /// Public port (gateways only).
    pub port: u16,
    pub admin: u16,
}

pub struct Cluster {
    pub secret: String,
    pub api_key: String,
    pub shape: Shape,
    pub nats: Proc,
    pub nats_port: u16,
    nats_monitor: u16,
    /// The other NATS nodes in cluster mode (empty with one server).
    pub nats_peers: Vec<NatsPeer>,
    pub redis_mode: RedisMode,
    /// One node, or every node of the Redis Cluster (primaries and replicas; which
    /// is which changes with failovers: ask [`Cluster::redis_primaries`]).
    pub redis: Vec<RedisNode>,
    pub gateways: Vec<Node>,
    pub workers: Vec<Node>,
    /// `None` with an external LLM.
    pub llm: Option<Proc>,
    pub llm_port: u16,
    tap: Option<LlmTap>,
    pub backend: Proc,
    pub backend_port: u16,
    pub haproxy: Option<Proc>,
    pub lb_port: u16,
    pub stats_port: u16,
    pub prometheus: Option<Proc>,
    pub prometheus_port: u16,
    http: reqwest::Client,
    _store: tempfile::TempDir,
}

fn secret_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

impl Cluster {
    /// Starts everything and waits until every piece is ready and HAProxy sees every
    /// gateway up.
    pub async fn start(bins: &Bins, log_dir: &Path, shape: Shape) -> Result<Cluster> {
        std::fs::create_dir_all(log_dir)?;
        let ports = shape.ports;
        if let Ports::Fixed { .. } = ports {
            let most = shape.gateways.max(shape.workers).max(shape.nats_nodes);
            if shape.gateways + 1 > FIXED_BLOCK || most > FIXED_BLOCK {
                bail!(
                    "a fixed port layout has room for {} gateways and {FIXED_BLOCK} of each other node",
                    FIXED_BLOCK - 1
                );
            }
        }
        let store = tempfile::tempdir().context("store directory")?;
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .no_proxy()
            .build()?;
        let spec = |name: &str, program: PathBuf| {
            let s = Spec::new(name, program);
            if shape.own_process_groups {
                s.own_group()
            } else {
                s
            }
        };

        let names = nats_names(shape.nats_nodes);
        let mut nodes = Vec::new();
        for i in 0..shape.nats_nodes {
            nodes.push((
                ports.take(Port::NatsClient(i))?,
                ports.take(Port::NatsMonitor(i))?,
                ports.take(Port::NatsRoute(i))?,
            ));
        }
        // Every node lists every route (its own too, which nats-server skips) and has
        // a server_name, which JetStream clustering needs.
        let routes: Vec<String> = nodes
            .iter()
            .map(|(_, _, r)| format!("nats-route://127.0.0.1:{r}"))
            .collect();
        let mut procs = Vec::new();
        for (name, &(p, m, r)) in names.iter().zip(&nodes) {
            let mut s = spec(name, testkit::find_binary("nats-server")?)
                .args([
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &p.to_string(),
                    "-m",
                    &m.to_string(),
                    "-js",
                ])
                .arg("-sd")
                .arg(
                    store
                        .path()
                        .join(format!("js-{name}"))
                        .display()
                        .to_string(),
                );
            if shape.nats_nodes > 1 {
                s = s
                    .args(["--server_name", name, "--cluster_name", NATS_CLUSTER_NAME])
                    .arg("--cluster")
                    .arg(format!("nats://127.0.0.1:{r}"))
                    .arg("--routes")
                    .arg(routes.join(","));
            }
            procs.push(Proc::start(s, log_dir)?);
        }
        let mut procs = procs.into_iter();
        let nats = procs.next().context("no NATS node")?;
        let nats_peers = procs
            .zip(nodes.iter().skip(1))
            .map(|(proc, &(port, monitor, _))| NatsPeer {
                proc,
                port,
                monitor,
            })
            .collect();

        let mut redis = Vec::new();
        for (i, name) in redis_names(shape.redis).iter().enumerate() {
            let port = ports.take(Port::Redis(i))?;
            // Each node its own directory: a cluster node's `nodes.conf` is its
            // identity when it is started again.
            let dir = store.path().join(name);
            std::fs::create_dir_all(&dir)?;
            let mut s = spec(name, testkit::find_binary("redis-server")?)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.display().to_string());
            if shape.redis == RedisMode::Cluster {
                s = s
                    .args([
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                    ])
                    .args(["--cluster-node-timeout", &REDIS_NODE_TIMEOUT_MS.to_string()])
                    // A replica may take over however long its link was down: the
                    // scenarios kill primaries at will.
                    .args(["--cluster-replica-validity-factor", "0"]);
            }
            redis.push(RedisNode {
                proc: Proc::start(s, log_dir)?,
                port,
            });
        }

        let llm_port = match shape.llm {
            Llm::External => 0,
            _ => ports.take(Port::Llm)?,
        };
        let (llm, tap) = match &shape.llm {
            Llm::Stub { args, tap } => {
                let s = spec("llm", bins.get("mock-llm")?)
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{llm_port}"))
                    .args(args.iter().map(String::as_str));
                let tap = match tap {
                    true => Some(LlmTap::start(ports.take(Port::Tap)?, llm_port).await?),
                    false => None,
                };
                (Some(Proc::start(s, log_dir)?), tap)
            }
            Llm::Real { server, model } => {
                // --metrics: Prometheus scrapes the model server like every node.
                let s = spec("llm", server.clone())
                    .arg("-m")
                    .arg(model.display().to_string())
                    .args(["--host", "127.0.0.1", "--port", &llm_port.to_string()])
                    .args(["-c", &REAL_LLM_CONTEXT.to_string(), "-t", "2"])
                    .args(["--alias", REAL_LLM_ALIAS, "--metrics"]);
                (Some(Proc::start(s, log_dir)?), None)
            }
            Llm::External => (None, None),
        };
        let backend_port = ports.take(Port::Backend)?;
        let backend = match &shape.backend {
            Backend::Mock => spec("backend", bins.get("mock-backend")?),
            Backend::Demo { static_dir } => spec("backend", bins.get("demo-backend")?)
                .env("SB_JWT_SECRET", &shape.secret)
                .arg("--static-dir")
                .arg(static_dir.display().to_string()),
        }
        .arg("--listen")
        .arg(format!("127.0.0.1:{backend_port}"));
        let backend = Proc::start(backend, log_dir)?;

        let mut c = Cluster {
            secret: shape.secret.clone(),
            api_key: shape.api_key.clone(),
            nats,
            nats_port: nodes[0].0,
            nats_monitor: nodes[0].1,
            nats_peers,
            redis_mode: shape.redis,
            redis,
            gateways: Vec::new(),
            workers: Vec::new(),
            llm,
            llm_port,
            tap,
            backend,
            backend_port,
            haproxy: None,
            lb_port: ports.take(Port::Lb)?,
            stats_port: ports.take(Port::LbStats)?,
            prometheus: None,
            prometheus_port: 0,
            http,
            _store: store,
            shape,
        };
        if let Err(e) = c.start_nodes(bins, log_dir).await {
            // A CI run keeps no logs: the error carries what each piece reported.
            bail!("{e:#}\n{}", c.processes_report());
        }
        Ok(c)
    }

    /// After the stores and upstreams were spawned: waits for them, then starts the
    /// gateways, the workers, HAProxy and Prometheus and waits until all serve.
    async fn start_nodes(&mut self, bins: &Bins, log_dir: &Path) -> Result<()> {
        self.wait_nats().await?;
        for port in std::iter::once(self.nats_port).chain(self.nats_peers.iter().map(|p| p.port)) {
            wait_port(port).await?;
        }
        if self.redis_mode == RedisMode::Cluster {
            self.form_redis_cluster().await?;
        }
        self.wait_redis().await?;
        self.wait_llm().await?;
        self.wait_backend().await?;

        let ports = self.shape.ports;
        let own_group = self.shape.own_process_groups;
        let spec = |name: &str, program: PathBuf| {
            let s = Spec::new(name, program);
            if own_group { s.own_group() } else { s }
        };
        let common = [
            ("SB_NATS_URL", self.nats_url()),
            ("SB_REDIS_URL", self.redis_url()),
            ("SB_REDIS_CLUSTER", self.redis_cluster_flag().to_owned()),
            ("SB_JETSTREAM_REPLICAS", self.nats_count().to_string()),
            ("SB_LOG_FORMAT", "text".to_owned()),
            ("SB_LOG", "info".to_owned()),
        ];
        for i in 0..self.shape.gateways {
            let (p, a) = (
                ports.take(Port::Public(i))?,
                ports.take(Port::GatewayAdmin(i))?,
            );
            let id = gateway_name(i);
            let spec = spec(&id, bins.get("gateway")?)
                .env("SB_NODE_ID", &id)
                .env("SB_LISTEN", format!("127.0.0.1:{p}"))
                .env("SB_ADMIN_LISTEN", format!("127.0.0.1:{a}"))
                .env("SB_JWT_SECRET", &self.secret)
                .env("SB_API_KEY", &self.api_key)
                // Every client comes through HAProxy on loopback.
                .env("SB_TRUSTED_PROXIES", "127.0.0.1/32")
                .envs(&common)
                .envs(&self.shape.gateway_env);
            self.gateways.push(Node {
                id,
                proc: Proc::start(spec, log_dir)?,
                port: p,
                admin: a,
            });
        }
        let llm_url = match (&self.shape.llm, &self.tap) {
            (Llm::External, _) => None,
            (_, Some(tap)) => Some(format!("http://127.0.0.1:{}/v1", tap.port())),
            (_, None) => Some(format!("http://127.0.0.1:{}/v1", self.llm_port)),
        };
        for i in 0..self.shape.workers {
            let a = ports.take(Port::WorkerAdmin(i))?;
            let id = worker_name(i);
            let mut spec = spec(&id, bins.get("worker")?)
                .env("SB_NODE_ID", &id)
                .env("SB_ADMIN_LISTEN", format!("127.0.0.1:{a}"))
                .env(
                    "SB_BACKEND_URL",
                    format!("http://127.0.0.1:{}", self.backend_port),
                )
                .envs(&common);
            if let Some(url) = &llm_url {
                spec = spec.env("SB_LLM_BASE_URL", url);
            }
            if let Llm::Real { .. } = self.shape.llm {
                spec = spec
                    .env("SB_LLM_MODEL", REAL_LLM_ALIAS)
                    .env("SB_LLM_MAX_TOKENS", REAL_LLM_MAX_TOKENS.to_string())
                    .env("SB_TOKEN_BUDGET", REAL_LLM_TOKEN_BUDGET.to_string());
            }
            self.workers.push(Node {
                id,
                proc: Proc::start(spec.envs(&self.shape.worker_env), log_dir)?,
                port: 0,
                admin: a,
            });
        }
        for i in 0..self.gateways.len() + self.workers.len() {
            self.wait_started(i).await?;
        }

        let cfg_path = log_dir.join("haproxy.cfg");
        std::fs::write(&cfg_path, self.haproxy_config())?;
        self.haproxy = Some(Proc::start(
            spec("haproxy", testkit::find_binary("haproxy")?)
                .arg("-db")
                .arg("-f")
                .arg(cfg_path.display().to_string()),
            log_dir,
        )?);
        self.wait_lb().await?;

        if let Some(rules) = self.shape.prometheus_rules.clone() {
            self.prometheus_port = ports.take(Port::Prometheus)?;
            let cfg_path = log_dir.join("prometheus.yml");
            std::fs::write(&cfg_path, self.prometheus_config(&rules))?;
            let data = self._store.path().join("prometheus");
            self.prometheus = Some(Proc::start(
                spec("prometheus", testkit::find_binary("prometheus")?)
                    .arg(format!("--config.file={}", cfg_path.display()))
                    .arg(format!("--storage.tsdb.path={}", data.display()))
                    .arg("--storage.tsdb.retention.time=1d")
                    .arg(format!(
                        "--web.listen-address=127.0.0.1:{}",
                        self.prometheus_port
                    )),
                log_dir,
            )?);
            self.wait_prometheus().await?;
        }
        Ok(())
    }

    /// The LLM answers: llama-server's `/health` once the model is loaded, the stub
    /// once it listens.
    async fn wait_llm(&self) -> Result<()> {
        match self.shape.llm {
            Llm::External => Ok(()),
            Llm::Stub { .. } => wait_port(self.llm_port).await,
            Llm::Real { .. } => {
                let url = format!("http://127.0.0.1:{}/health", self.llm_port);
                self.wait_http(&url, LLM_READY_LIMIT, "llm").await
            }
        }
    }

    async fn wait_backend(&self) -> Result<()> {
        wait_port(self.backend_port).await?;
        let url = format!("http://127.0.0.1:{}/healthz", self.backend_port);
        match self.shape.backend {
            Backend::Mock => Ok(()),
            Backend::Demo { .. } => self.wait_http(&url, START_LIMIT, "backend").await,
        }
    }

    /// HAProxy listens and routes to every gateway (and to the demo page, if any).
    async fn wait_lb(&self) -> Result<()> {
        wait_port(self.lb_port).await?;
        for i in 0..self.gateways.len() {
            self.wait_lb_up(i, START_LIMIT).await?;
        }
        if let Backend::Demo { .. } = self.shape.backend {
            self.wait_http(&self.api_url("/healthz"), START_LIMIT, "haproxy")
                .await?;
        }
        Ok(())
    }

    /// Prometheus is ready and every scrape target is up.
    async fn wait_prometheus(&self) -> Result<()> {
        let base = format!("http://127.0.0.1:{}", self.prometheus_port);
        self.wait_http(&format!("{base}/-/ready"), START_LIMIT, "prometheus")
            .await?;
        let start = Instant::now();
        loop {
            let url = format!("{base}/api/v1/targets?state=active");
            let targets: Option<Value> = match self.http.get(&url).send().await {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
            let up = targets
                .as_ref()
                .and_then(|t| t["data"]["activeTargets"].as_array())
                .is_some_and(|t| !t.is_empty() && t.iter().all(|x| x["health"] == "up"));
            if up {
                return Ok(());
            }
            if start.elapsed() > START_LIMIT {
                bail!("prometheus: not every scrape target up within {START_LIMIT:?}: {targets:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Until `url` answers 200; `what` names the component in the error.
    async fn wait_http(&self, url: &str, limit: Duration, what: &str) -> Result<()> {
        let start = Instant::now();
        loop {
            if matches!(self.http.get(url).send().await, Ok(r) if r.status().is_success()) {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("{what}: {url} did not answer 200 within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The LLM tap, when the LLM is the stub behind one.
    pub fn tap(&self) -> Result<&LlmTap> {
        self.tap.as_ref().context("this cluster has no LLM tap")
    }

    fn haproxy_config(&self) -> String {
        let mut servers = String::new();
        for g in &self.gateways {
            servers.push_str(&format!(
                "    server {} 127.0.0.1:{} check port {} inter {CHECK_INTER_MS}ms fall {FALL} rise {RISE}\n",
                g.id, g.port, g.admin
            ));
        }
        format!(
            "# Written by the cluster launcher (faults/src/cluster.rs). One origin: /ws and
# /v1/ go to the gateways, the rest (demo page, login, teams, tasks) to the team backend.
global
    # Each proxied connection holds two descriptors; a process may have 20,000.
    maxconn 9000
    # Socket buffers toward gateways and clients bounded (the kernel would grow them
    # to megabytes on loopback): a client that stops reading backs up to the
    # gateway's own bounded queue within a few hundred KiB, as behind a real LB.
    tune.rcvbuf.server 262144
    tune.sndbuf.client 262144
    # Notice and above only: health-check state changes, never request lines (a
    # ?token= query would put a token in the log).
    log stdout format raw local0 notice
defaults
    mode http
    log global
    timeout connect 2s
    timeout client 75s
    timeout server 75s
    # WebSockets live long: the tunnel timeout applies after the upgrade.
    timeout tunnel 1h
    option forwardfor
frontend switchboard
    bind 127.0.0.1:{lb}
    use_backend gateways if {{ path /ws }} || {{ path_beg /v1/ }}
    default_backend team
backend gateways
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    # A connect refused by a dead or draining gateway is retried on another one
    # instead of answering the client 503, and the refusing one is taken out at
    # once instead of after {FALL} failed checks.
    retries 3
    option redispatch 1
    default-server observe layer4 error-limit 1 on-error mark-down
{servers}backend team
    server backend 127.0.0.1:{backend}
frontend stats
    bind 127.0.0.1:{stats}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /stats
    stats refresh 5s
",
            lb = self.lb_port,
            backend = self.backend_port,
            stats = self.stats_port,
        )
    }

    /// Every node of the cluster as a scrape target: the dashboard and the alert
    /// rules expect jobs `switchboard-gateway` / `switchboard-worker` and a `pod` label.
    fn prometheus_config(&self, rules: &Path) -> String {
        let targets = |nodes: &[Node]| -> String {
            nodes
                .iter()
                .map(|n| {
                    format!(
                        "      - targets: [\"127.0.0.1:{}\"]\n        labels: {{pod: {}}}\n",
                        n.admin, n.id
                    )
                })
                .collect()
        };
        let mut out = format!(
            "# Written by the cluster launcher (faults/src/cluster.rs).
global:
  scrape_interval: {SCRAPE_SECS}s
  evaluation_interval: {SCRAPE_SECS}s
rule_files:
  - {rules}
scrape_configs:
  - job_name: switchboard-gateway
    static_configs:
{gateways}  - job_name: switchboard-worker
    static_configs:
{workers}  - job_name: haproxy
    static_configs:
      - targets: [\"127.0.0.1:{stats}\"]
        labels: {{pod: haproxy}}
",
            rules = rules.display(),
            gateways = targets(&self.gateways),
            workers = targets(&self.workers),
            stats = self.stats_port,
        );
        if let Llm::Real { .. } = self.shape.llm {
            out.push_str(&format!(
                "  - job_name: llm\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n        labels: {{pod: llm}}\n",
                self.llm_port
            ));
        }
        out
    }

    /// `SB_NATS_URL`: every node's client URL, comma-separated, in cluster mode.
    pub fn nats_url(&self) -> String {
        std::iter::once(self.nats_port)
            .chain(self.nats_peers.iter().map(|p| p.port))
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// NATS nodes (1, or [`NATS_CLUSTER_NODES`] in cluster mode).
    pub fn nats_count(&self) -> usize {
        1 + self.nats_peers.len()
    }

    /// NATS node `i` (0 is [`Cluster::nats`]).
    pub fn nats_node(&mut self, i: usize) -> &mut Proc {
        match i {
            0 => &mut self.nats,
            _ => &mut self.nats_peers[i - 1].proc,
        }
    }

    /// `server_name` and monitor port of every NATS node not known to be down.
    fn nats_running(&self) -> Vec<(String, u16)> {
        std::iter::once((&self.nats, self.nats_monitor))
            .chain(self.nats_peers.iter().map(|p| (&p.proc, p.monitor)))
            .filter(|(p, _)| p.pid().is_some())
            .map(|(p, m)| (p.spec.name.clone(), m))
            .collect()
    }

    /// Names of the client connections on NATS node `i` (gateways name theirs
    /// `gateway-<id>` and `gateway-<id>-subs`, workers `worker-<id>`), from its
    /// `/connz`; `None` when the node does not answer.
    pub async fn nats_connections(&self, i: usize) -> Option<Vec<String>> {
        let monitor = match i {
            0 => self.nats_monitor,
            _ => self.nats_peers.get(i - 1)?.monitor,
        };
        let v: Value = self
            .http
            .get(format!("http://127.0.0.1:{monitor}/connz?limit=4096"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some(
            v["connections"]
                .as_array()?
                .iter()
                .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
                .collect(),
        )
    }

    /// The JetStream meta leader every running NATS node agrees on, once it sees
    /// every other running node as current (see [`meta_leader`]).
    pub async fn nats_meta_leader(&self) -> Option<String> {
        meta_leader(&self.http, &self.nats_running()).await
    }

    /// The leader of every replicated stream and consumer (`<stream>` and
    /// `<stream>/<consumer>`), as the first running NATS node answering reports it.
    pub async fn nats_asset_leaders(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (_, m) in self.nats_running() {
            let url = format!("http://127.0.0.1:{m}/jsz?accounts=true&streams=true&consumers=true");
            let Ok(r) = self.http.get(url).send().await else {
                continue;
            };
            let Ok(v) = r.json::<Value>().await else {
                continue;
            };
            let streams = v["account_details"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten());
            for s in streams {
                let name = s["name"].as_str().unwrap_or_default();
                if let Some(l) = s["cluster"]["leader"].as_str() {
                    out.insert(name.to_owned(), l.to_owned());
                }
                for c in s["consumer_detail"].as_array().into_iter().flatten() {
                    if let Some(l) = c["cluster"]["leader"].as_str() {
                        let consumer = c["name"].as_str().unwrap_or_default();
                        out.insert(format!("{name}/{consumer}"), l.to_owned());
                    }
                }
            }
            return out;
        }
        out
    }

    /// What [`Cluster::nats_meta_leader`] needs, to poll it from a task.
    pub fn nats_meta_probe(&self) -> (reqwest::Client, Vec<(String, u16)>) {
        (self.http.clone(), self.nats_running())
    }

    /// `SB_REDIS_URL`: the server, or every cluster node as a seed.
    pub fn redis_url(&self) -> String {
        self.redis
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `SB_REDIS_CLUSTER`.
    pub fn redis_cluster_flag(&self) -> &'static str {
        match self.redis_mode {
            RedisMode::Single => "false",
            RedisMode::Cluster => "true",
        }
    }

    /// The load balancer (HAProxy) address clients connect to.
    pub fn lb_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.lb_port).into()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.lb_port)
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.lb_port)
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `GET /readyz` on an admin port: the status, or 0 when nothing answered.
    pub async fn readyz(&self, admin: u16) -> u16 {
        readyz(&self.http, admin).await
    }

    /// `/readyz` body of an admin port (workers report their breaker there).
    pub async fn readyz_json(&self, admin: u16) -> Option<Value> {
        let r = self
            .http
            .get(format!("http://127.0.0.1:{admin}/readyz"))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    pub async fn wait_ready(&self, admin: u16, want: bool, limit: Duration) -> Result<Duration> {
        let start = Instant::now();
        let code = if want { 200 } else { 503 };
        loop {
            if self.readyz(admin).await == code {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                bail!("readyz on admin port {admin} never became {code} within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for freshly started node `i` (gateways first, then workers) to report
    /// ready; when it does not, the error carries what it reported and the end of
    /// its log.
    async fn wait_started(&self, i: usize) -> Result<Duration> {
        let node = self
            .gateways
            .iter()
            .chain(&self.workers)
            .nth(i)
            .context("no such node")?;
        match self.wait_ready(node.admin, true, START_LIMIT).await {
            Ok(d) => Ok(d),
            Err(e) => {
                let readiness = self.readyz_json(node.admin).await;
                bail!(
                    "{e}: {} reported {readiness:?}; the end of its log:\n{}",
                    node.id,
                    log_tail(&node.proc)
                )
            }
        }
    }

    /// Every process of the cluster, running or with its exit status; for the
    /// stores, which every node depends on, also the end of their logs.
    fn processes_report(&mut self) -> String {
        let mut out = String::from("processes:\n");
        let stores = std::iter::once(&mut self.nats)
            .chain(self.nats_peers.iter_mut().map(|p| &mut p.proc))
            .chain(self.redis.iter_mut().map(|n| &mut n.proc));
        for p in stores {
            let state = p.state();
            out.push_str(&format!(
                "  {}: {state}; the end of its log:\n{}\n",
                p.spec.name,
                log_tail(p)
            ));
        }
        let others = self
            .llm
            .iter_mut()
            .chain([&mut self.backend])
            .chain(self.gateways.iter_mut().map(|n| &mut n.proc))
            .chain(self.workers.iter_mut().map(|n| &mut n.proc))
            .chain(self.haproxy.iter_mut())
            .chain(self.prometheus.iter_mut());
        for p in others {
            let state = p.state();
            out.push_str(&format!("  {}: {state}\n", p.spec.name));
        }
        out
    }

    /// Sum of a Prometheus counter or gauge over all its series on an admin port.
    pub async fn metric_sum(&self, admin: u16, name: &str) -> Option<f64> {
        let text = self
            .http
            .get(format!("http://127.0.0.1:{admin}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(metric_sum(&text, name))
    }

    /// HAProxy's status of each gateway (`UP`, `DOWN`, `UP 1/2`, ...).
    pub async fn lb_status(&self) -> Vec<(String, String)> {
        let Ok(r) = self
            .http
            .get(format!("http://127.0.0.1:{}/stats;csv", self.stats_port))
            .send()
            .await
        else {
            return Vec::new();
        };
        let text = r.text().await.unwrap_or_default();
        // Columns: pxname, svname, ... field 17 is `status`.
        text.lines()
            .filter(|l| l.starts_with("gateways,"))
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f.len() > 17 && f[1] != "BACKEND").then(|| (f[1].to_owned(), f[17].to_owned()))
            })
            .collect()
    }

    /// Waits until HAProxy routes to gateway `i` again.
    pub async fn wait_lb_up(&self, i: usize, limit: Duration) -> Result<Duration> {
        let start = Instant::now();
        let id = self.gateways[i].id.clone();
        loop {
            if self
                .lb_status()
                .await
                .iter()
                .any(|(n, s)| *n == id && s == "UP")
            {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                bail!("HAProxy never saw {id} UP within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts gateway `i` again (same ports) and waits until HAProxy routes to it.
    pub async fn restart_gateway(&mut self, i: usize) -> Result<()> {
        self.gateways[i].proc.restart()?;
        let admin = self.gateways[i].admin;
        self.wait_ready(admin, true, START_LIMIT).await?;
        self.wait_lb_up(i, START_LIMIT).await?;
        Ok(())
    }

    pub async fn restart_worker(&mut self, i: usize) -> Result<()> {
        self.workers[i].proc.restart()?;
        let admin = self.workers[i].admin;
        self.wait_ready(admin, true, START_LIMIT).await?;
        Ok(())
    }

    /// Every running node healthy; in cluster mode also a JetStream meta leader
    /// that all of them agree on (until then stream creation and publishes to
    /// replicated streams fail with "JetStream system temporarily unavailable").
    async fn wait_nats(&self) -> Result<()> {
        let start = Instant::now();
        let running = self.nats_running();
        let limit = if running.len() > 1 {
            NATS_ELECTION_LIMIT
        } else {
            START_LIMIT
        };
        loop {
            let mut healthy = true;
            for (_, m) in &running {
                let url = format!("http://127.0.0.1:{m}/healthz?js-enabled-only=true");
                healthy &=
                    matches!(self.http.get(&url).send().await, Ok(r) if r.status().is_success());
            }
            if healthy && (self.nats_peers.is_empty() || self.nats_meta_leader().await.is_some()) {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("nats-server not ready within {limit:?} (see its log)");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Single: the server answers PING. Cluster: every running node sees all slots
    /// served, and every primary has a replica in sync (so a failover scenario
    /// always has a replica to promote, also after a repair).
    async fn wait_redis(&self) -> Result<()> {
        let start = Instant::now();
        let limit = match self.redis_mode {
            RedisMode::Single => START_LIMIT,
            RedisMode::Cluster => REDIS_FORM_LIMIT,
        };
        loop {
            let ok = match self.redis_mode {
                RedisMode::Single => redis_ping(self.redis[0].port).await,
                RedisMode::Cluster => self.redis_cluster_healthy().await,
            };
            if ok {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("redis not ready within {limit:?} (see the redis logs)");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn redis_cluster_healthy(&self) -> bool {
        let (mut primaries, mut synced_replicas) = (0, 0);
        for n in &self.redis {
            let Ok(info) = redis_text(n.port, &["CLUSTER", "INFO"]).await else {
                return false;
            };
            if !(info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")) {
                return false;
            }
            let Ok(repl) = redis_text(n.port, &["INFO", "replication"]).await else {
                return false;
            };
            if repl.contains("role:master") {
                primaries += 1;
            } else if repl.contains("master_link_status:up") {
                synced_replicas += 1;
            }
        }
        primaries == REDIS_PRIMARIES && synced_replicas == REDIS_PRIMARIES * REDIS_REPLICAS_EACH
    }

    /// Joins the fresh nodes into one cluster (`redis-cli --cluster create`).
    async fn form_redis_cluster(&self) -> Result<()> {
        for n in &self.redis {
            let start = Instant::now();
            while !redis_ping(n.port).await {
                if start.elapsed() > START_LIMIT {
                    bail!("redis-server on port {} not up (see its log)", n.port);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut cmd = tokio::process::Command::new(testkit::find_binary("redis-cli")?);
        cmd.arg("--cluster").arg("create");
        for n in &self.redis {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        cmd.args([
            "--cluster-replicas",
            &REDIS_REPLICAS_EACH.to_string(),
            "--cluster-yes",
        ])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
        let out = tokio::time::timeout(REDIS_FORM_LIMIT, cmd.output())
            .await
            .context("redis-cli --cluster create timed out")?
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The Redis Cluster's primaries now with the slot ranges each serves (by node
    /// index), as the first node that answers sees them; failed nodes left out.
    pub async fn redis_primaries(&self) -> Vec<(usize, Vec<(u16, u16)>)> {
        for n in &self.redis {
            if let Ok(view) = redis_text(n.port, &["CLUSTER", "NODES"]).await {
                return parse_primaries(&view)
                    .into_iter()
                    .filter_map(|(port, slots)| {
                        let i = self.redis.iter().position(|n| n.port == port)?;
                        Some((i, slots))
                    })
                    .collect();
            }
        }
        Vec::new()
    }

    /// `master` or `slave` for a running Redis Cluster node named `name`.
    pub async fn redis_role(&self, name: &str) -> Option<String> {
        if self.redis_mode != RedisMode::Cluster {
            return None;
        }
        let node = self.redis.iter().find(|n| n.proc.spec.name == name)?;
        let info = redis_text(node.port, &["INFO", "replication"]).await.ok()?;
        let role = info.lines().find_map(|l| l.strip_prefix("role:"))?;
        Some(role.trim().to_owned())
    }

    /// A command on one Redis node (by index).
    pub async fn redis_command(&self, node: usize, args: &[&str]) -> Result<redis::Value> {
        redis_query(self.redis[node].port, args).await
    }

    /// Restarts every Redis node that is down (same port and directory: a cluster
    /// node rejoins as a replica of whoever took over its slots) and waits until
    /// Redis is whole again.
    pub async fn heal_redis(&mut self) -> Result<()> {
        let mut restarted = false;
        for n in &mut self.redis {
            if !n.proc.alive() {
                n.proc.restart()?;
                restarted = true;
            }
        }
        if restarted || self.redis_mode == RedisMode::Cluster {
            self.wait_redis().await?;
        }
        Ok(())
    }

    /// Whether any NATS node is down.
    pub fn nats_down(&mut self) -> bool {
        (0..self.nats_count()).any(|i| !self.nats_node(i).alive())
    }

    /// Starts every NATS node that is down again with the same ports and JetStream
    /// store, and waits until NATS is ready (in cluster mode: the node rejoined).
    pub async fn start_nats_again(&mut self) -> Result<()> {
        for i in 0..self.nats_count() {
            if !self.nats_node(i).alive() {
                self.nats_node(i).restart()?;
            }
        }
        self.wait_nats().await
    }

    /// Starts the single Redis again (empty: no persistence, as run here).
    pub async fn start_redis_again(&mut self) -> Result<()> {
        self.redis[0].proc.restart()?;
        self.wait_redis().await
    }

    /// Restarts mock-llm on its port with extra flags (`--p-429 1 ...`), or with
    /// none for normal service again.
    pub async fn restart_llm(&mut self, extra: &[&str]) -> Result<()> {
        let Llm::Stub { args, .. } = &self.shape.llm else {
            bail!("only the STUB LLM takes fault flags");
        };
        let args = [
            "--listen".to_owned(),
            format!("127.0.0.1:{}", self.llm_port),
        ]
        .into_iter()
        .chain(args.iter().cloned())
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
        let llm = self.llm.as_mut().context("no LLM process")?;
        if llm.alive() {
            llm.term(STOP_GRACE).await?;
        }
        llm.restart_with(args)?;
        self.wait_llm().await
    }

    pub async fn start_backend_again(&mut self) -> Result<()> {
        self.backend.restart()?;
        wait_port(self.backend_port).await
    }

    /// Every process of the cluster, in start order.
    pub fn processes(&mut self) -> Vec<&mut Proc> {
        std::iter::once(&mut self.nats)
            .chain(self.nats_peers.iter_mut().map(|p| &mut p.proc))
            .chain(self.redis.iter_mut().map(|n| &mut n.proc))
            .chain(self.llm.iter_mut())
            .chain([&mut self.backend])
            .chain(self.gateways.iter_mut().map(|n| &mut n.proc))
            .chain(self.workers.iter_mut().map(|n| &mut n.proc))
            .chain(self.haproxy.iter_mut())
            .chain(self.prometheus.iter_mut())
            .collect()
    }

    /// Starts component `name` again (stopping it first if it runs) on its ports and
    /// store, and waits until it serves: a gateway until HAProxy routes to it, a
    /// Redis Cluster node until the cluster is whole, a NATS node until JetStream is.
    pub async fn restart(&mut self, name: &str) -> Result<()> {
        let names: Vec<String> = self
            .processes()
            .iter()
            .map(|p| p.spec.name.clone())
            .collect();
        let proc = self
            .processes()
            .into_iter()
            .find(|p| p.spec.name == name)
            .with_context(|| format!("unknown component '{name}'; one of: {}", names.join(" ")))?;
        if proc.alive() {
            proc.term(STOP_GRACE).await?;
        }
        if let Some(i) = self.gateways.iter().position(|g| g.id == name) {
            return self.restart_gateway(i).await;
        }
        if let Some(i) = self.workers.iter().position(|w| w.id == name) {
            return self.restart_worker(i).await;
        }
        match name {
            "llm" => {
                self.llm.as_mut().context("no LLM process")?.restart()?;
                self.wait_llm().await
            }
            "backend" => {
                self.backend.restart()?;
                self.wait_backend().await
            }
            "haproxy" => {
                self.haproxy.as_mut().context("no HAProxy")?.restart()?;
                self.wait_lb().await
            }
            "prometheus" => {
                self.prometheus
                    .as_mut()
                    .context("no Prometheus")?
                    .restart()?;
                self.wait_prometheus().await
            }
            n if n.starts_with("nats") => self.start_nats_again().await,
            _ => self.heal_redis().await,
        }
    }

    /// Stops everything: traffic first (HAProxy, Prometheus), then the gateways and
    /// workers, the upstreams, and NATS and Redis last. `grace`: how long gateways and
    /// workers may take after SIGTERM before SIGKILL (they drain and finish their
    /// replies); `None`: they are killed at once.
    pub async fn stop(&mut self, grace: Option<Duration>) {
        let mut edge: Vec<&mut Proc> = self
            .haproxy
            .iter_mut()
            .chain(self.prometheus.iter_mut())
            .collect();
        stop_group(&mut edge, Some(STOP_GRACE)).await;
        let mut nodes: Vec<&mut Proc> = self
            .gateways
            .iter_mut()
            .chain(self.workers.iter_mut())
            .map(|n| &mut n.proc)
            .collect();
        stop_group(&mut nodes, grace).await;
        let mut upstreams: Vec<&mut Proc> =
            self.llm.iter_mut().chain([&mut self.backend]).collect();
        stop_group(&mut upstreams, Some(STOP_GRACE)).await;
        let mut state: Vec<&mut Proc> = std::iter::once(&mut self.nats)
            .chain(self.nats_peers.iter_mut().map(|p| &mut p.proc))
            .chain(self.redis.iter_mut().map(|n| &mut n.proc))
            .collect();
        stop_group(&mut state, Some(STOP_GRACE)).await;
    }
}

/// SIGTERM to every running process of the group at once, then waits up to `grace`
/// for them (SIGKILL after it); `None`: SIGKILL at once.
async fn stop_group(group: &mut [&mut Proc], grace: Option<Duration>) {
    let Some(grace) = grace else {
        for p in group.iter_mut() {
            if p.alive() {
                let _ = p.kill9().await;
            }
        }
        return;
    };
    for p in group.iter_mut() {
        if p.alive() {
            let _ = p.begin_term();
        }
    }
    let deadline = Instant::now() + grace;
    for p in group.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if p.wait_exit(left).await.is_err() {
            let _ = p.kill9().await;
        }
    }
}

pub async fn readyz(http: &reqwest::Client, admin: u16) -> u16 {
    http.get(format!("http://127.0.0.1:{admin}/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// The JetStream meta leader's name if every node in `nodes` (`server_name`,
/// monitor port) names the same one from its `/jsz`, that node is among them, and
/// it sees every other one as a current replica.
pub async fn meta_leader(http: &reqwest::Client, nodes: &[(String, u16)]) -> Option<String> {
    let jsz = |m: u16| async move {
        http.get(format!("http://127.0.0.1:{m}/jsz"))
            .send()
            .await
            .ok()?
            .json::<Value>()
            .await
            .ok()
    };
    let mut leader: Option<(String, Value)> = None;
    for (_, m) in nodes {
        let v = jsz(*m).await?;
        let l = v["meta_cluster"]["leader"].as_str()?.to_owned();
        if l.is_empty() || leader.as_ref().is_some_and(|(x, _)| *x != l) {
            return None;
        }
        if nodes.iter().any(|(n, lm)| *n == l && lm == m) {
            leader = Some((l, v));
        } else if leader.is_none() {
            leader = Some((l, Value::Null));
        }
    }
    let (leader, v) = leader?;
    let replicas = v["meta_cluster"]["replicas"].as_array()?;
    let all_current = nodes.iter().filter(|(n, _)| *n != leader).all(|(n, _)| {
        replicas
            .iter()
            .any(|r| r["name"].as_str() == Some(n.as_str()) && r["current"].as_bool() == Some(true))
    });
    all_current.then_some(leader)
}

/// Sums every series of `name` in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The primaries of a `CLUSTER NODES` view: (port, slot ranges), failed ones left
/// out (their slots are being taken over).
pub fn parse_primaries(view: &str) -> Vec<(u16, Vec<(u16, u16)>)> {
    let mut out = Vec::new();
    for line in view.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 8 || !f[2].contains("master") || f[2].contains("fail") {
            continue;
        }
        let Some(port) = f[1]
            .split('@')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok())
        else {
            continue;
        };
        // Fields after the 8th are slot ranges (`a-b` or `a`); `[...]` are slots
        // being migrated, not served.
        let slots = f[8..]
            .iter()
            .filter(|r| !r.starts_with('['))
            .filter_map(|r| match r.trim().split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => {
                    let a = r.trim().parse().ok()?;
                    Some((a, a))
                }
            })
            .collect();
        out.push((port, slots));
    }
    out
}

/// The Redis Cluster hash slot of a key (CRC16/XMODEM of the hash tag, or of the
/// whole key when it has none, modulo 16384).
pub fn key_slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let tagged = b.iter().position(|&c| c == b'{').and_then(|open| {
        let close = b[open + 1..].iter().position(|&c| c == b'}')?;
        (close > 0).then(|| &b[open + 1..open + 1 + close])
    });
    crc16(tagged.unwrap_or(b)) % 16384
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// One command on one Redis node, bounded by [`REDIS_CMD_TIMEOUT`].
pub async fn redis_query(port: u16, args: &[&str]) -> Result<redis::Value> {
    let attempt = async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let mut c = client.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let v: redis::Value = cmd.query_async(&mut c).await?;
        anyhow::Ok(v)
    };
    tokio::time::timeout(REDIS_CMD_TIMEOUT, attempt)
        .await
        .with_context(|| format!("redis {args:?} on port {port} timed out"))?
}

/// As [`redis_query`], for commands answering text (`INFO`, `CLUSTER NODES`).
pub async fn redis_text(port: u16, args: &[&str]) -> Result<String> {
    let v = redis_query(port, args).await?;
    Ok(redis::from_redis_value(v)?)
}

async fn redis_ping(port: u16) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Some(true))
    )
}

/// The last lines of a process's log.
fn log_tail(p: &Proc) -> String {
    let log = std::fs::read_to_string(p.log_path()).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Waits until something accepts on 127.0.0.1:`port`.
pub async fn wait_port(port: u16) -> Result<()> {
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if start.elapsed() > START_LIMIT {
            bail!("nothing listening on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_ports_never_collide() {
        let mut seen = std::collections::BTreeMap::new();
        let mut all = vec![
            Port::Lb,
            Port::Llm,
            Port::Backend,
            Port::Tap,
            Port::LbStats,
            Port::Prometheus,
        ];
        all.extend((0..FIXED_BLOCK - 1).map(Port::Public));
        for i in 0..FIXED_BLOCK {
            all.extend([
                Port::GatewayAdmin(i),
                Port::WorkerAdmin(i),
                Port::NatsClient(i),
                Port::NatsRoute(i),
                Port::NatsMonitor(i),
                Port::Redis(i),
            ]);
        }
        for p in all {
            if let Some(other) = seen.insert(p.offset(), p) {
                panic!("{p:?} and {other:?} share offset {}", p.offset());
            }
        }
        // A Redis node's cluster bus port stays clear of every other port.
        let top = seen.keys().max().copied().unwrap_or(0);
        assert!(top < REDIS_BUS_OFFSET);
    }

    #[test]
    fn key_slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("123456789"), 12739);
        assert_eq!(key_slot("sb:{u:alice}:conns"), key_slot("u:alice"));
        // An empty tag is no tag: the whole key is hashed.
        assert_eq!(key_slot("a{}b"), crc16(b"a{}b") % 16384);
    }

    #[test]
    fn primaries_are_read_from_cluster_nodes() {
        let view = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                    b 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922 [10923->-c]\n\
                    c 127.0.0.1:7002@17002 master,fail - 0 0 3 connected 10923-16383\n\
                    d 127.0.0.1:7003@17003 slave a 0 0 1 connected\n";
        assert_eq!(
            parse_primaries(view),
            vec![(7000, vec![(0, 5460)]), (7001, vec![(5461, 10922)])]
        );
    }

    #[test]
    fn metric_sum_adds_every_series_and_only_that_name() {
        let text = "# HELP x\nfoo_total{a=\"1\"} 2\nfoo_total{a=\"2\"} 3.5\nfoo_total_other 9\nfoo_total 1\n";
        assert_eq!(metric_sum(text, "foo_total"), 6.5);
        assert_eq!(metric_sum(text, "bar"), 0.0);
    }
}
