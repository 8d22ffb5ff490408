//! Test fixtures: real `nats-server` (with JetStream) and `redis-server` processes on
//! free ports, each test with its own, so tests stay isolated and can kill and restart
//! them to inject faults. Also signed tokens (`tokens`) and in-process stub servers for
//! the LLM (`llm`) and the team backend (`backend`), served by `server`. Used only by tests.

pub mod backend;
pub mod llm;
pub mod nats_cluster;
pub mod redis_cluster;
pub mod server;
pub mod tls;
pub mod tokens;

pub use nats_cluster::NatsCluster;
pub use redis_cluster::{RedisCluster, TestRedis};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Both servers are ready in well under a second; this is the give-up point.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Ports handed to servers that a test starts as separate processes come from below
/// Linux's ephemeral range (32768-60999): a port picked there could be taken, before
/// the server binds it, by any outgoing connection of a test running in parallel (the
/// suites open thousands), and the server would then fail to start.
const PICK_PORTS: std::ops::Range<u16> = 12_000..22_000;
/// A Redis Cluster node also binds its bus port, its own port plus this.
const REDIS_BUS_OFFSET: u16 = 10_000;
/// Random tries before giving up: nearly all of the range is free on a test machine.
const PICK_TRIES: usize = 1_000;

/// A port nobody listens on right now, for a server started as another process (the
/// server binds it a moment later; another picker taking the same one meanwhile is
/// a one-in-ten-thousand race). Its Redis Cluster bus port is free too, and neither
/// is in the ephemeral range, so outgoing connections never take them.
pub fn free_port() -> u16 {
    for _ in 0..PICK_TRIES {
        let p = rand::random_range(PICK_PORTS);
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(p) && free(p + REDIS_BUS_OFFSET) {
            return p;
        }
    }
    panic!("no free port on 127.0.0.1 in {PICK_PORTS:?}")
}

pub(crate) fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain([
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/bin",
    ]) {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not found: install it (`apt-get install {name}`; scripts/test does this)")
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

/// Ports are picked free but bound by the server a moment later; a parallel test can
/// take one in between, and the server then exits. Starting again on fresh ports
/// makes that race harmless.
const START_ATTEMPTS: usize = 5;

/// Why a started server is not serving.
enum NotReady {
    /// It exited (a port was taken): try again on other ports.
    Exited,
    TimedOut,
}

fn wait_until(child: &mut Child, mut ready: impl FnMut() -> bool) -> Result<(), NotReady> {
    let start = Instant::now();
    while start.elapsed() < START_TIMEOUT {
        if ready() {
            return Ok(());
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            return Err(NotReady::Exited);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(NotReady::TimedOut)
}

fn http_get_ok(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200")
}

// === NATS ===

/// A `nats-server -js` on a free port with its own store directory.
pub struct Nats {
    pub port: u16,
    monitor: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Once started, restarts keep the port (clients reconnect to it).
    started: bool,
    /// A config file (`-c`) and the environment it reads (`$VAR`), for servers
    /// with TLS and users.
    config: Option<(PathBuf, Vec<(String, String)>)>,
}

impl Nats {
    pub fn start() -> anyhow::Result<Nats> {
        let mut n = Nats {
            port: free_port(),
            monitor: free_port(),
            dir: tempfile::tempdir()?,
            child: None,
            started: false,
            config: None,
        };
        n.spawn()?;
        Ok(n)
    }

    /// A server reading `config` (nats-server.conf syntax; `$VAR`s from `env`) on top
    /// of the usual flags (ports, JetStream store).
    pub fn start_with_config(config: &str, env: &[(&str, &str)]) -> anyhow::Result<Nats> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, config)?;
        let mut n = Nats {
            port: free_port(),
            monitor: free_port(),
            dir,
            child: None,
            started: false,
            config: Some((
                path,
                env.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )),
        };
        n.spawn()?;
        Ok(n)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = find_binary("nats-server")?;
        for _ in 0..START_ATTEMPTS {
            let mut cmd = Command::new(&bin);
            if let Some((path, env)) = &self.config {
                cmd.arg("-c")
                    .arg(path)
                    .envs(env.iter().map(|(k, v)| (k, v)));
            }
            let mut child = cmd
                .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-m", &self.monitor.to_string(), "-js", "-sd"])
                .arg(self.dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawning nats-server")?;
            let monitor: SocketAddr = ([127, 0, 0, 1], self.monitor).into();
            let ready = wait_until(&mut child, || {
                http_get_ok(monitor, "/healthz?js-enabled-only=true")
            });
            match ready {
                Ok(()) => {
                    self.child = Some(child);
                    self.started = true;
                    return Ok(());
                }
                Err(NotReady::Exited) => {
                    // The monitor port is ours alone; the client port moves only
                    // before the first start (a restart keeps it for reconnects).
                    self.monitor = free_port();
                    if !self.started {
                        self.port = free_port();
                    }
                }
                Err(NotReady::TimedOut) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("nats-server not ready after {START_TIMEOUT:?}");
                }
            }
        }
        bail!("nats-server exited {START_ATTEMPTS} times at start (ports taken?)")
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Graceful stop (SIGTERM), keeping the JetStream store.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, "TERM");
            let _ = c.wait();
        }
    }

    /// Starts again on the same port with the same store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.spawn()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

// === Redis ===

/// A `redis-server` on a free port, without persistence (as run here).
pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Once started, restarts keep the port (clients reconnect to it).
    started: bool,
    /// More `redis-server` arguments (cluster mode).
    extra: Vec<String>,
}

impl Redis {
    pub fn start() -> anyhow::Result<Redis> {
        Redis::start_with(&[])
    }

    /// A server with more arguments, e.g. `["--cluster-enabled", "yes"]`.
    pub fn start_with(extra: &[&str]) -> anyhow::Result<Redis> {
        let mut r = Redis {
            port: free_port(),
            dir: tempfile::tempdir()?,
            child: None,
            started: false,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.spawn()?;
        Ok(r)
    }

    /// Whether the process is running (not killed or stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `INFO commandstats` as command -> (calls, microseconds).
    pub fn command_stats(&self) -> anyhow::Result<std::collections::BTreeMap<String, (u64, u64)>> {
        let raw = self.command(&["INFO", "commandstats"])?;
        let mut out = std::collections::BTreeMap::new();
        for line in raw.lines() {
            let Some(rest) = line.strip_prefix("cmdstat_") else {
                continue;
            };
            let Some((name, fields)) = rest.split_once(':') else {
                continue;
            };
            let field = |k: &str| -> u64 {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0)
            };
            out.insert(name.to_owned(), (field("calls"), field("usec")));
        }
        Ok(out)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = find_binary("redis-server")?;
        for _ in 0..START_ATTEMPTS {
            let mut child = Command::new(&bin)
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(self.dir.path())
                .args(&self.extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawning redis-server")?;
            let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
            match wait_until(&mut child, || redis_ping(addr)) {
                Ok(()) => {
                    self.child = Some(child);
                    self.started = true;
                    return Ok(());
                }
                Err(NotReady::Exited) if !self.started => self.port = free_port(),
                Err(NotReady::Exited) => {}
                Err(NotReady::TimedOut) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("redis-server not ready after {START_TIMEOUT:?}");
                }
            }
        }
        bail!("redis-server exited {START_ATTEMPTS} times at start (port taken?)")
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, "TERM");
            let _ = c.wait();
        }
    }

    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.spawn()
    }

    /// Runs one command through `redis-cli`-free raw RESP and returns the raw reply.
    pub fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes())?;
        // A reply larger than one read (INFO) arrives in pieces: read until the
        // server has been quiet for a moment.
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        let n = s.read(&mut buf)?;
        out.extend_from_slice(&buf[..n]);
        s.set_read_timeout(Some(Duration::from_millis(30)))?;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

fn redis_ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    // A server whose default user is off (ACL tests) answers NOAUTH: it is up.
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"))
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
