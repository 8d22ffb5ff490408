//! One child process of the cluster (a gateway, a worker, NATS, ...): started with a
//! clean `SB_*` environment, its output appended to its own log file, signalled by
//! PID (SIGKILL for a crash, SIGTERM for a clean stop), restarted with the same
//! command line, and its resident memory read from `/proc`.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// How a component is started: program, arguments, environment.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// In a process group of its own (see [`Spec::own_group`]).
    pub own_group: bool,
}

impl Spec {
    pub fn new(name: &str, program: impl Into<PathBuf>) -> Spec {
        Spec {
            name: name.to_owned(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            own_group: false,
        }
    }

    pub fn args<'a>(mut self, args: impl IntoIterator<Item = &'a str>) -> Spec {
        self.args.extend(args.into_iter().map(str::to_owned));
        self
    }

    pub fn envs(mut self, vars: &[(impl AsRef<str>, String)]) -> Spec {
        self.env
            .extend(vars.iter().map(|(k, v)| (k.as_ref().to_owned(), v.clone())));
        self
    }

    /// Starts it in a process group of its own, so a terminal's Ctrl-C (sent to the
    /// foreground group) reaches only the supervisor, which stops it in order.
    pub fn own_group(mut self) -> Spec {
        self.own_group = true;
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> Spec {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Spec {
        self.env.push((k.to_owned(), v.into()));
        self
    }
}

/// A running (or stopped) component.
pub struct Proc {
    pub spec: Spec,
    log: PathBuf,
    child: Option<Child>,
    /// Starts so far (1 after the first start).
    pub starts: u32,
}

impl Proc {
    /// Starts the component; its output goes to `<log_dir>/<name>.log` (appended).
    pub fn start(spec: Spec, log_dir: &Path) -> Result<Proc> {
        let mut p = Proc {
            log: log_dir.join(format!("{}.log", spec.name)),
            spec,
            child: None,
            starts: 0,
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let err = log.try_clone()?;
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            // If the driver dies, nothing it started outlives it.
            .kill_on_drop(true);
        // Gateways and workers refuse unknown SB_* variables; the driver's own
        // environment must not leak into theirs.
        for (k, _) in std::env::vars() {
            if k.starts_with("SB_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &self.spec.env {
            cmd.env(k, v);
        }
        if self.spec.own_group {
            cmd.process_group(0);
        }
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting {} ({})",
                self.spec.name,
                self.spec.program.display()
            )
        })?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `running (pid N)`, or how it ended, for reports.
    pub fn state(&mut self) -> String {
        let Some(c) = self.child.as_mut() else {
            return "stopped".to_owned();
        };
        match c.try_wait() {
            Ok(None) => format!("running (pid {})", c.id().unwrap_or_default()),
            Ok(Some(status)) => format!("exited: {status}"),
            Err(e) => format!("unknown: {e}"),
        }
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        let Some(pid) = self.pid() else {
            bail!("{} is not running", self.spec.name);
        };
        kill(Pid::from_raw(pid as i32), sig)
            .with_context(|| format!("sending {sig} to {} (pid {pid})", self.spec.name))
    }

    /// `kill -9`: a crash. Returns when the process is gone.
    pub async fn kill9(&mut self) -> Result<()> {
        self.signal(Signal::SIGKILL)?;
        if let Some(mut c) = self.child.take() {
            let _ = c.wait().await;
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `grace` for the exit (SIGKILL after it). Returns the
    /// exit code (`None` when it had to be killed or died by a signal).
    pub async fn term(&mut self, grace: Duration) -> Result<Option<i32>> {
        self.signal(Signal::SIGTERM)?;
        let Some(mut c) = self.child.take() else {
            return Ok(None);
        };
        match tokio::time::timeout(grace, c.wait()).await {
            Ok(Ok(status)) => Ok(status.code()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                let _ = c.start_kill();
                let _ = c.wait().await;
                Ok(None)
            }
        }
    }

    /// Sends SIGTERM and returns at once (the caller waits with [`Proc::wait_exit`]).
    pub fn begin_term(&self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Waits up to `limit` for the process to exit; its exit code if it did.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<Option<i32>> {
        let Some(c) = self.child.as_mut() else {
            return Ok(None);
        };
        match tokio::time::timeout(limit, c.wait()).await {
            Ok(Ok(status)) => {
                self.child = None;
                Ok(status.code())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("{} did not exit within {limit:?}", self.spec.name),
        }
    }

    /// Starts again with the same command line (and so the same ports and store).
    pub fn restart(&mut self) -> Result<()> {
        if self.alive() {
            bail!("{} is still running", self.spec.name);
        }
        self.child = None;
        self.spawn()
    }

    /// Starts again with other arguments (mock-llm with error injection).
    pub fn restart_with(&mut self, args: Vec<String>) -> Result<()> {
        self.spec.args = args;
        self.restart()
    }

    /// Resident memory in bytes (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(self.pid()?)
    }
}

/// `VmRSS` of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
