//! The README's local cluster (`sb-cluster`, run by `scripts/cluster`): the launcher's
//! cluster on fixed ports, with the real model (or the stub, or an external LLM), the
//! demo backend and Prometheus. A supervisor process owns it: it keeps PID files in the
//! run directory, reports components that exit, and answers `status`, `restart <name>`
//! and `stop` on a Unix socket there, so other terminals and the client tests drive it.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::cluster::{
    Backend, Bins, Cluster, Llm, NATS_CLUSTER_NODES, Ports, RedisMode, Shape, gateway_name,
};

/// The load balancer's port; every other port follows it (`cluster::Port::offset`).
pub const DEFAULT_PORT: u16 = 18080;
/// Two of each node: enough to show failover, small enough for a laptop.
const LOCAL_GATEWAYS: usize = 2;
const LOCAL_WORKERS: usize = 2;
/// Gateways drain this long on stop; workers finish replies within their grace.
const LOCAL_DRAIN_SECS: u64 = 3;
const LOCAL_SHUTDOWN_GRACE_SECS: u64 = 5;
/// Every test client and browser tab comes from 127.0.0.1 through HAProxy, so the
/// per-address connect limit (default 20/s, burst 50) is shared by all of them.
const LOCAL_CONNECT_RATE_PER_IP: u32 = 500;
const LOCAL_CONNECT_BURST_PER_IP: u32 = 1000;
/// A stopping gateway or worker gets this long after SIGTERM (drain plus margin).
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// A control request is one short line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A `stop` or `restart` answer: a drain, or a node rejoining a cluster, takes seconds.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(180);
/// `up --detach` gives up on a supervisor that is not ready after this (the model
/// loads within two minutes; forming the HA state tier within one).
const DETACH_LIMIT: Duration = Duration::from_secs(600);
/// Lines of the supervisor's log shown when a detached start fails.
const LOG_TAIL_LINES: usize = 40;
/// How often the supervisor looks for components that exited.
const WATCH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Parser)]
#[command(
    name = "sb-cluster",
    about = "The local Switchboard cluster (scripts/cluster)"
)]
pub struct Cli {
    /// Run directory: logs, PID files, the secret, the API key, the control socket.
    #[arg(long, env = "SB_CLUSTER_RUN", default_value = ".run/cluster")]
    pub run: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Starts the cluster; Ctrl-C (or `stop`) stops everything.
    Up(Up),
    /// Stops everything the cluster started.
    Stop,
    /// Components, PIDs and URLs.
    Status,
    /// Restarts one component and waits until it serves again.
    Restart { name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LlmMode {
    /// llama.cpp's llama-server with a small model (`--llm-server`, `--llm-model`).
    Real,
    /// The STUB mock-llm: canned replies, fast start.
    Stub,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Up {
    #[arg(long, value_enum, default_value = "real")]
    pub llm: LlmMode,
    /// llama-server binary (with `--llm real`).
    #[arg(long)]
    pub llm_server: Option<PathBuf>,
    /// The GGUF model file (with `--llm real`).
    #[arg(long)]
    pub llm_model: Option<PathBuf>,
    /// A highly available state tier: a Redis Cluster of three primaries with a
    /// replica each, and a three-node NATS cluster with the chat stream on all three.
    #[arg(long)]
    pub ha: bool,
    /// Return once everything is ready, leaving the supervisor running.
    #[arg(long)]
    pub detach: bool,
    /// The load balancer's port; the others follow it.
    #[arg(long, env = "SB_CLUSTER_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Where gateway, worker, demo-backend and mock-llm are.
    #[arg(long, default_value = "target/release")]
    pub bin_dir: PathBuf,
    /// The demo page's files.
    #[arg(long, default_value = "clients")]
    pub static_dir: PathBuf,
    /// Prometheus alert rules.
    #[arg(long, default_value = "prometheus/switchboard.rules.yml")]
    pub rules: PathBuf,
    /// No Prometheus (benchmarks).
    #[arg(long)]
    pub no_prometheus: bool,
    /// Free ports instead of fixed ones from `--port`: several clusters side by side
    /// (benchmarks); `cluster.env` in the run directory says which.
    #[arg(long)]
    pub free_ports: bool,
    #[arg(long, default_value_t = LOCAL_GATEWAYS)]
    pub gateways: usize,
    #[arg(long, default_value_t = LOCAL_WORKERS)]
    pub workers: usize,
    /// `SB_NAME=value` for every gateway, over the local settings (repeatable).
    #[arg(long, value_parser = parse_var)]
    pub gateway_env: Vec<(String, String)>,
    /// `SB_NAME=value` for every worker (repeatable).
    #[arg(long, value_parser = parse_var)]
    pub worker_env: Vec<(String, String)>,
    /// Flags for the STUB mock-llm with `--llm stub`, e.g. "--first-token-ms 200".
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    pub stub_args: String,
}

/// `SB_NAME=value` (the binaries refuse other names anyway).
fn parse_var(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if k.starts_with("SB_") => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?}: expected SB_NAME=value")),
    }
}

/// Runs one `sb-cluster` command.
pub async fn run(cli: Cli) -> Result<()> {
    std::fs::create_dir_all(&cli.run)
        .with_context(|| format!("creating the run directory {}", cli.run.display()))?;
    let run = std::fs::canonicalize(&cli.run)?;
    let dir = RunDir(run);
    match cli.command {
        Command::Up(up) => self::up(&dir, up).await,
        Command::Stop => stop(&dir).await,
        Command::Status => match ask(&dir, "status").await {
            Ok(answer) => answer.print(),
            Err(_) => {
                println!("not running");
                Ok(())
            }
        },
        Command::Restart { name } => match ask(&dir, &format!("restart {name}")).await {
            Ok(answer) => answer.print(),
            Err(_) => bail!("the cluster is not running; start it with scripts/cluster up"),
        },
    }
}

/// The run directory's files.
struct RunDir(PathBuf);

impl RunDir {
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn socket(&self) -> PathBuf {
        self.path("control.sock")
    }
    fn banner(&self) -> PathBuf {
        self.path("banner")
    }
    fn log(&self) -> PathBuf {
        self.path("cluster.log")
    }
    fn pid(&self, name: &str) -> PathBuf {
        self.path("pid").join(name)
    }
    fn ident(&self, name: &str) -> PathBuf {
        self.path("ident").join(name)
    }

    /// A secret file's content, made (hex, owner-only) when missing: a second `up`
    /// keeps the tokens minted against the first.
    fn secret(&self, name: &str, bytes: usize) -> Result<String> {
        let path = self.path(name);
        if let Ok(s) = std::fs::read_to_string(&path)
            && !s.trim().is_empty()
        {
            return Ok(s.trim().to_owned());
        }
        let value: String = (0..bytes)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(f, "{value}")?;
        Ok(value)
    }

    /// Records a process under `name`, with its kernel start time, so a recycled PID
    /// is never mistaken for it.
    fn record(&self, name: &str, pid: Option<u32>) -> Result<()> {
        std::fs::create_dir_all(self.path("pid"))?;
        std::fs::create_dir_all(self.path("ident"))?;
        let Some(pid) = pid else {
            let _ = std::fs::remove_file(self.pid(name));
            let _ = std::fs::remove_file(self.ident(name));
            return Ok(());
        };
        std::fs::write(self.pid(name), format!("{pid}\n"))?;
        std::fs::write(
            self.ident(name),
            format!("{}\n", start_time(pid).unwrap_or(0)),
        )?;
        Ok(())
    }

    /// Recorded processes still alive as recorded: (name, pid).
    fn recorded_alive(&self) -> Vec<(String, u32)> {
        let Ok(entries) = std::fs::read_dir(self.path("pid")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid: u32 = std::fs::read_to_string(e.path())
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                let want: u64 = std::fs::read_to_string(self.ident(&name))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                (start_time(pid) == Some(want)).then_some((name, pid))
            })
            .collect()
    }

    fn clear_records(&self) {
        let _ = std::fs::remove_dir_all(self.path("pid"));
        let _ = std::fs::remove_dir_all(self.path("ident"));
    }
}

/// The kernel's start time of a process (field 22 of `/proc/<pid>/stat`); `None` if it
/// is gone or a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

async fn up(dir: &RunDir, up: Up) -> Result<()> {
    // One supervisor per run directory: it holds this lock for its whole life.
    let lock = File::create(dir.path("lock"))?;
    let lock = match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err(_) => {
            return match ask(dir, "status").await {
                Ok(answer) => {
                    println!("a cluster is already running from {}:", dir.0.display());
                    answer.print()
                }
                Err(_) => bail!(
                    "another sb-cluster is starting or stopping this cluster ({})",
                    dir.path("lock").display()
                ),
            };
        }
    };
    if up.detach {
        drop(lock);
        return detach(dir).await;
    }
    let stale = dir.recorded_alive();
    if !stale.is_empty() {
        // A supervisor that died without stopping its cluster (a machine crash, a
        // SIGKILL) left these: they hold the ports.
        eprintln!(
            "stopping {} processes left by an earlier cluster",
            stale.len()
        );
        kill_recorded(&stale).await;
    }
    dir.clear_records();
    let _ = std::fs::remove_file(dir.banner());
    let _ = std::fs::remove_file(dir.socket());
    // A fresh cluster, fresh logs.
    for entry in std::fs::read_dir(&dir.0)?.flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "log") && p != dir.log() {
            let _ = std::fs::remove_file(p);
        }
    }
    dir.record("supervisor", Some(std::process::id()))?;

    let shape = local_shape(dir, &up)?;
    let llm_desc = match &shape.llm {
        Llm::Real { model, .. } => format!(
            "llama.cpp llama-server, {}",
            model.file_name().unwrap_or_default().to_string_lossy()
        ),
        Llm::Stub { .. } => "STUB mock-llm (canned replies, not a model)".to_owned(),
        Llm::External => format!(
            "external, {}",
            std::env::var("SB_LLM_BASE_URL").unwrap_or_default()
        ),
    };
    let started = std::time::Instant::now();
    let bins = Bins {
        dir: up.bin_dir.clone(),
    };
    let stop = stop_signal()?;
    let outcome = tokio::select! {
        started = Cluster::start(&bins, &dir.0, shape) => started,
        // Dropping the start kills what it had started.
        _ = stop.cancelled() => Err(anyhow::anyhow!("interrupted")),
    };
    let mut cluster = match outcome {
        Ok(c) => c,
        Err(e) => {
            dir.clear_records();
            return Err(e.context("the cluster did not start"));
        }
    };
    for p in cluster.processes() {
        dir.record(&p.spec.name, p.pid())?;
    }
    std::fs::write(dir.path("cluster.env"), ports_env(&mut cluster))?;
    let banner = banner(dir, &cluster, &llm_desc);
    println!("{banner}\n  (ready in {} s)", started.elapsed().as_secs());
    let listener = UnixListener::bind(dir.socket())
        .with_context(|| format!("binding {}", dir.socket().display()))?;
    // Written last: `up --detach` returns once it exists.
    std::fs::write(dir.banner(), &banner)?;

    let stopper = supervise(dir, &mut cluster, &listener, &banner, &stop).await;
    eprintln!("stopping the cluster");
    cluster.stop(Some(STOP_TIMEOUT)).await;
    dir.clear_records();
    for f in [dir.socket(), dir.banner(), dir.path("cluster.env")] {
        let _ = std::fs::remove_file(f);
    }
    if let Some(mut s) = stopper {
        let _ = s.write_all(b"ok stopped\n").await;
    }
    drop(lock);
    Ok(())
}

/// The local cluster's shape from the command line and the environment.
fn local_shape(dir: &RunDir, up: &Up) -> Result<Shape> {
    let env = |k: &str, v: String| (k.to_owned(), v);
    let lb = up.port;
    // Workers get the caller's LLM settings, the API key included; they override
    // the launcher's defaults for the real model.
    let llm_env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("SB_LLM_") || k == "SB_TOKEN_BUDGET")
        .collect();
    let llm = if llm_env.iter().any(|(k, _)| k == "SB_LLM_BASE_URL") {
        Llm::External
    } else {
        match up.llm {
            LlmMode::Stub => Llm::Stub {
                args: up.stub_args.split_whitespace().map(str::to_owned).collect(),
                tap: false,
            },
            LlmMode::Real => Llm::Real {
                server: up.llm_server.clone().context("--llm-server is needed")?,
                model: up.llm_model.clone().context("--llm-model is needed")?,
            },
        }
    };
    let (nats_nodes, redis) = match up.ha {
        true => (NATS_CLUSTER_NODES, RedisMode::Cluster),
        false => (1, RedisMode::Single),
    };
    let grace = LOCAL_SHUTDOWN_GRACE_SECS.to_string();
    let mut worker_env = vec![env("SB_SHUTDOWN_GRACE_SECS", grace)];
    worker_env.extend(llm_env);
    worker_env.extend(up.worker_env.iter().cloned());
    let origins = format!("http://127.0.0.1:{lb},http://localhost:{lb}");
    let mut gateway_env = vec![
        env("SB_ALLOWED_ORIGINS", origins),
        env("SB_DRAIN_SECS", LOCAL_DRAIN_SECS.to_string()),
        // The demo backend checks the user's own token.
        env("SB_FORWARD_USER_TOKEN", "true".to_owned()),
        env(
            "SB_CONNECT_RATE_PER_IP",
            LOCAL_CONNECT_RATE_PER_IP.to_string(),
        ),
        env(
            "SB_CONNECT_BURST_PER_IP",
            LOCAL_CONNECT_BURST_PER_IP.to_string(),
        ),
    ];
    gateway_env.extend(up.gateway_env.iter().cloned());
    let prometheus_rules = match up.no_prometheus {
        true => None,
        false => Some(
            std::fs::canonicalize(&up.rules)
                .with_context(|| format!("--rules {}", up.rules.display()))?,
        ),
    };
    let static_dir = std::fs::canonicalize(&up.static_dir)
        .with_context(|| format!("--static-dir {}", up.static_dir.display()))?;
    Ok(Shape {
        gateways: up.gateways,
        workers: up.workers,
        nats_nodes,
        redis,
        ports: match up.free_ports {
            true => Ports::Free,
            false => Ports::Fixed { base: lb },
        },
        llm,
        backend: Backend::Demo { static_dir },
        prometheus_rules,
        gateway_env,
        worker_env,
        own_process_groups: true,
        secret: dir.secret("secret", 32)?,
        api_key: dir.secret("api_key", 16)?,
    })
}

/// The cluster's ports, PIDs and credentials as shell assignments (`cluster.env`),
/// for scripts that drive a cluster on free ports: `SECRET`, `API_KEY`, `LB_PORT`,
/// `LLM_PORT`, `PORT_GW1`, `ADMIN_GW1`, `ADMIN_WORKER1`, and `PID_<NAME>` for every
/// component (`PID_GW1`, `PID_NATS`, `PID_LLM`, ...).
fn ports_env(c: &mut Cluster) -> String {
    let mut out = format!(
        "SECRET={}\nAPI_KEY={}\nLB_PORT={}\nLLM_PORT={}\n",
        c.secret, c.api_key, c.lb_port, c.llm_port
    );
    for g in &c.gateways {
        let n = g.id.to_uppercase();
        out.push_str(&format!("PORT_{n}={}\nADMIN_{n}={}\n", g.port, g.admin));
    }
    for w in &c.workers {
        out.push_str(&format!("ADMIN_{}={}\n", w.id.to_uppercase(), w.admin));
    }
    for p in c.processes() {
        let name = p.spec.name.to_uppercase();
        out.push_str(&format!("PID_{name}={}\n", p.pid().unwrap_or(0)));
    }
    out
}

fn banner(dir: &RunDir, c: &Cluster, llm: &str) -> String {
    let run = dir.0.display();
    let lb = c.lb_port;
    let state = if c.redis_mode == RedisMode::Cluster {
        format!(
            "Redis Cluster {} (3 primaries + 3 replicas),\n               NATS cluster {} (JetStream R{})",
            c.redis_url(),
            c.nats_url(),
            c.nats_count()
        )
    } else {
        format!("NATS {}, Redis {}", c.nats_url(), c.redis_url())
    };
    format!(
        "
Switchboard is running (LLM: {llm})
  state tier:  {state}
  demo:        http://127.0.0.1:{lb}/   (log in with any name; two tabs chat on team:demo)
  WebSocket:   ws://127.0.0.1:{lb}/ws
  login:       curl -s -X POST -d '{{\"user\":\"alice\"}}' http://127.0.0.1:{lb}/api/auth/login
  ops API:     curl -s -H \"Authorization: Bearer $(cat {run}/api_key)\" http://127.0.0.1:{lb}/v1/nodes
  metrics:     http://127.0.0.1:{prom}/   (Prometheus; alerts at /alerts)
  HAProxy:     http://127.0.0.1:{stats}/stats
  logs, PIDs:  {run}/<name>.log, {run}/pid/<name>
  status:      scripts/cluster status;  restart one: scripts/cluster restart {gw}
  stop:        scripts/cluster stop   (or Ctrl-C in the terminal that started it)",
        prom = c.prometheus_port,
        stats = c.stats_port,
        gw = gateway_name(0),
    )
}

/// Cancelled on Ctrl-C or SIGTERM, from before the start: the children run in process
/// groups of their own, so a supervisor killed by a signal's default action would
/// leave them running.
fn stop_signal() -> Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        cancel.cancel();
    });
    Ok(token)
}

/// Serves control requests and watches the components until a signal or a `stop`
/// request; returns the connection that asked to stop, to be answered once stopped.
async fn supervise(
    dir: &RunDir,
    cluster: &mut Cluster,
    listener: &UnixListener,
    banner: &str,
    stop: &CancellationToken,
) -> Option<UnixStream> {
    let mut reported = std::collections::BTreeSet::new();
    let mut watch = tokio::time::interval(WATCH_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                if let Some(stopper) = serve(dir, cluster, stream, banner).await {
                    return Some(stopper);
                }
            }
            _ = watch.tick() => {
                // A killed gateway is a failover demo: say so once, and how to bring it back.
                for p in cluster.processes() {
                    let name = p.spec.name.clone();
                    if p.alive() {
                        reported.remove(&name);
                    } else if reported.insert(name.clone()) {
                        eprintln!("{name} exited (see {}/{name}.log); scripts/cluster restart {name} brings it back", dir.0.display());
                    }
                }
            }
        }
    }
}

/// One control request. `Some(stream)`: a `stop`, answered once the cluster stopped.
async fn serve(
    dir: &RunDir,
    cluster: &mut Cluster,
    stream: UnixStream,
    banner: &str,
) -> Option<UnixStream> {
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, stream.read_line(&mut line)).await;
    let mut stream = stream.into_inner();
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        return None;
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    let answer = match words.as_slice() {
        ["stop"] => return Some(stream),
        ["status"] => {
            let mut out = format!("{banner}\n\n");
            let mut lines = Vec::new();
            for p in cluster.processes() {
                lines.push((p.spec.name.clone(), p.state()));
            }
            for (name, state) in lines {
                // A Redis Cluster node's role now: failovers move primaries around.
                let role = match cluster.redis_role(&name).await {
                    Some(r) => format!("  {r}"),
                    None => String::new(),
                };
                out.push_str(&format!("  {name:<11} {state}{role}\n"));
            }
            out.push_str("ok\n");
            out
        }
        ["restart", name] => match cluster.restart(name).await {
            Ok(()) => {
                let pid = cluster
                    .processes()
                    .into_iter()
                    .find(|p| p.spec.name == *name)
                    .and_then(|p| p.pid());
                match dir.record(name, pid) {
                    Ok(()) => format!("ok {name} running, pid {}\n", pid.unwrap_or(0)),
                    Err(e) => format!("error: {name} restarted, but its PID file: {e:#}\n"),
                }
            }
            Err(e) => format!("error: restarting {name}: {e:#}\n"),
        },
        _ => format!(
            "error: unknown request {:?}; status, restart <name> or stop\n",
            line.trim()
        ),
    };
    let _ = stream.write_all(answer.as_bytes()).await;
    None
}

/// A supervisor's answer: text lines, the last `ok ...` or `error: ...`.
struct Answer(String);

impl Answer {
    fn print(self) -> Result<()> {
        let text = self.0.trim_end();
        let (body, last) = text.rsplit_once('\n').unwrap_or(("", text));
        if !body.is_empty() {
            println!("{body}");
        }
        match last.strip_prefix("ok") {
            Some(rest) => {
                if !rest.trim().is_empty() {
                    println!("{}", rest.trim());
                }
                Ok(())
            }
            None => bail!("{}", last.strip_prefix("error: ").unwrap_or(last)),
        }
    }
}

/// Sends one request to the supervisor and reads its whole answer.
async fn ask(dir: &RunDir, request: &str) -> Result<Answer> {
    let mut s = tokio::time::timeout(REQUEST_TIMEOUT, UnixStream::connect(dir.socket()))
        .await
        .context("the supervisor does not answer")??;
    s.write_all(format!("{request}\n").as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(ANSWER_TIMEOUT, async {
        let mut r = BufReader::new(s);
        let mut line = String::new();
        while r.read_line(&mut line).await? > 0 {
            out.push_str(&line);
            line.clear();
        }
        anyhow::Ok(())
    })
    .await
    .context("the supervisor did not answer in time")??;
    if out.is_empty() {
        bail!("the supervisor closed the connection without an answer");
    }
    Ok(Answer(out))
}

async fn stop(dir: &RunDir) -> Result<()> {
    if let Ok(answer) = ask(dir, "stop").await {
        return answer.print();
    }
    // No supervisor: whatever it recorded and still runs is stopped here.
    let left = dir.recorded_alive();
    if left.is_empty() {
        println!("not running");
    } else {
        kill_recorded(&left).await;
        println!(
            "stopped {} processes of a cluster whose supervisor was gone",
            left.len()
        );
    }
    dir.clear_records();
    let _ = std::fs::remove_file(dir.socket());
    let _ = std::fs::remove_file(dir.banner());
    Ok(())
}

/// SIGTERM to each recorded process, SIGKILL to those left after [`STOP_TIMEOUT`].
async fn kill_recorded(procs: &[(String, u32)]) {
    for (_, pid) in procs {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    while procs.iter().any(|(_, p)| start_time(*p).is_some())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (name, pid) in procs {
        if start_time(*pid).is_some() {
            eprintln!("{name} did not stop within {STOP_TIMEOUT:?}; killing it");
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
}

/// Starts the supervisor in the background (its own process group, its output in
/// `cluster.log`) and returns once it is ready, printing its banner.
async fn detach(dir: &RunDir) -> Result<()> {
    let _ = std::fs::remove_file(dir.banner());
    let log = File::create(dir.log())?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--detach")
        .collect();
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(&args)
        .env("SB_CLUSTER_RUN", &dir.0)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the supervisor")?;
    let start = std::time::Instant::now();
    loop {
        if let Ok(banner) = std::fs::read_to_string(dir.banner()) {
            println!(
                "{banner}\n  (ready in {} s; supervisor log {})",
                start.elapsed().as_secs(),
                dir.log().display()
            );
            return Ok(());
        }
        let exited = child.try_wait()?;
        if exited.is_some() || start.elapsed() > DETACH_LIMIT {
            if exited.is_none() {
                let _ = child.start_kill();
            }
            bail!(
                "the cluster did not start ({}); the end of {}:\n{}",
                exited.map_or("not ready in time".to_owned(), |s| s.to_string()),
                dir.log().display(),
                tail(&dir.log(), LOG_TAIL_LINES)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_sb_names_with_values() {
        assert_eq!(
            parse_var("SB_LOG=warn,x=y"),
            Ok(("SB_LOG".to_owned(), "warn,x=y".to_owned()))
        );
        assert!(parse_var("LOG=warn").is_err());
        assert!(parse_var("SB_LOG").is_err());
    }

    #[test]
    fn an_answer_ends_with_ok_or_error() {
        assert!(
            Answer("banner\n\n  gw1 running\nok\n".to_owned())
                .print()
                .is_ok()
        );
        let e = Answer("error: unknown component 'x'\n".to_owned())
            .print()
            .unwrap_err();
        assert_eq!(e.to_string(), "unknown component 'x'");
    }

    #[test]
    fn own_start_time_is_read_and_a_missing_process_has_none() {
        assert!(start_time(std::process::id()).is_some());
        // PIDs wrap below 2^22 on Linux.
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn the_local_command_line_parses() {
        let cli = Cli::try_parse_from([
            "sb-cluster",
            "up",
            "--llm",
            "stub",
            "--free-ports",
            "--gateways",
            "3",
            "--gateway-env",
            "SB_LOG=warn",
            "--stub-args",
            "--first-token-ms 5",
        ])
        .unwrap();
        let Command::Up(up) = cli.command else {
            panic!("not up")
        };
        assert_eq!(
            (up.llm, up.gateways, up.free_ports),
            (LlmMode::Stub, 3, true)
        );
        assert_eq!(up.stub_args, "--first-token-ms 5");
        assert!(Cli::try_parse_from(["sb-cluster", "up", "--gateway-env", "X=1"]).is_err());
    }
}
