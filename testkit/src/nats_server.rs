//! One `nats-server -js` per test on free ports, with its own store directory;
//! stopped, killed and restarted on the same port to inject faults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

use crate::process::{
    self, NotReady, START_ATTEMPTS, START_TIMEOUT, find_binary, free_port, http_get_ok, wait_until,
};

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
        process::kill(&mut self.child);
    }

    /// Graceful stop (SIGTERM), keeping the JetStream store.
    pub fn stop(&mut self) {
        process::stop(&mut self.child);
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
