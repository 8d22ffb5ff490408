//! What every server fixture shares: free ports outside the ephemeral range, finding
//! a server binary, signalling it, and waiting until it serves.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::bail;

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

/// A system binary: on `PATH`, or where Debian puts daemons (`nats-server` and
/// `haproxy` live in /usr/sbin, which a user's `PATH` may lack).
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain([
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/bin",
        "/usr/local/sbin",
    ]) {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not found: install it (`apt-get install {name}`; the scripts do this)")
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

/// SIGKILL, like a crash, and reap it; nothing when the server is not running.
pub(crate) fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Graceful stop (SIGTERM), waiting for the exit; nothing when not running.
pub(crate) fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        signal(&c, "TERM");
        let _ = c.wait();
    }
}

/// Ports are picked free but bound by the server a moment later; a parallel test can
/// take one in between, and the server then exits. Starting again on fresh ports
/// makes that race harmless.
pub(crate) const START_ATTEMPTS: usize = 5;

/// Why a started server is not serving.
pub(crate) enum NotReady {
    /// It exited (a port was taken): try again on other ports.
    Exited,
    TimedOut,
}

pub(crate) fn wait_until(
    child: &mut Child,
    mut ready: impl FnMut() -> bool,
) -> Result<(), NotReady> {
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

pub(crate) fn http_get_ok(addr: SocketAddr, path: &str) -> bool {
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
