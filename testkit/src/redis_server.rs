//! One `redis-server` per test on a free port, without persistence; stopped,
//! killed and restarted on the same port to inject faults.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::{
    self, NotReady, START_ATTEMPTS, START_TIMEOUT, find_binary, free_port, wait_until,
};

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
        process::kill(&mut self.child);
    }

    pub fn stop(&mut self) {
        process::stop(&mut self.child);
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
