//! Running a scenario over several worker processes: one process can hold at most
//! `ulimit -Hn` sockets, so the parent re-executes itself with hidden
//! `--worker-index i --worker-count n` flags, tells each worker what to do next as JSON
//! lines on its stdin, and reads its progress and results as JSON lines from its
//! stdout. With one worker the same code runs in-process over channels.

use std::ffi::OsString;
use std::future::Future;
use std::ops::Range;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, LinesCodec};

/// Descriptors kept back from the connection budget of each process: stdio, the
/// runtime's epoll and wake fds, the metrics client and the odd file we open.
pub const FD_RESERVE: u64 = 200;
/// Open-file limit assumed when it cannot be read (Linux's usual soft default).
const FALLBACK_FD_LIMIT: u64 = 1024;
/// Capacity of the channel carrying worker events to the parent: a second's worth of
/// progress from hundreds of workers; senders wait when it is full.
const EVENT_QUEUE: usize = 1024;
/// Capacity of an in-process worker's control channel; the parent sends a handful of
/// commands per run.
const CONTROL_QUEUE: usize = 16;
/// Longest JSON line a worker may send (its results carry a sparse histogram and
/// per-second series: a few hundred KiB at most); bounds the parent's buffer.
const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;
/// Deadline for writing one control line to a worker's stdin.
const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The open-file limit: `(soft, hard)`.
pub fn fd_limits() -> (u64, u64) {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((FALLBACK_FD_LIMIT, FALLBACK_FD_LIMIT))
}

/// Raises the soft open-file limit to the hard one (allowed without privileges) and
/// returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let (soft, hard) = fd_limits();
    if soft < hard
        && nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
            .is_ok()
    {
        return hard;
    }
    soft
}

/// Connections one process can hold under an open-file limit of `fd_limit`.
pub fn connections_per_process(fd_limit: u64) -> u64 {
    fd_limit.saturating_sub(FD_RESERVE).max(1)
}

/// How many processes a run of `total` connections needs, or the count asked for.
pub fn process_count(total: u64, requested: Option<u32>, fd_limit: u64) -> u32 {
    if let Some(n) = requested {
        return n.max(1);
    }
    let needed = total.div_ceil(connections_per_process(fd_limit)).max(1);
    u32::try_from(needed).unwrap_or(u32::MAX)
}

/// Worker `index`'s contiguous share of `0..total` (shares differ by at most one).
pub fn share(total: u64, index: u32, count: u32) -> Range<u64> {
    let count = u64::from(count.max(1));
    let index = u64::from(index).min(count - 1);
    let bound = |i: u64| (u128::from(total) * u128::from(i) / u128::from(count)) as u64;
    bound(index)..bound(index + 1)
}

/// Splits a per-run amount (rate, concurrency) evenly over `count` workers.
pub fn split(amount: f64, count: u32) -> f64 {
    amount / f64::from(count.max(1))
}

/// What a worker reports, one JSON object per line (`{"type": ..., "data": ...}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum WorkerMsg<P, R> {
    /// Cumulative counters, about once a second.
    Progress(P),
    /// The worker finished its first phase (all connections attempted) and waits.
    Ready(P),
    /// Final results; the last message.
    Result(R),
    /// The worker cannot go on.
    Fatal { error: String },
}

/// What the parent tells a worker, one JSON object per line on its stdin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// Every worker is ready: start the hold phase (`broadcast`: publishing starts).
    Hold,
    /// `broadcast`: publishing is over; the last acknowledged offset of each channel
    /// (by channel index; `None` when nothing was acknowledged there), so that
    /// subscribers know what they should have received.
    Expect(Vec<Option<u64>>),
    /// Close everything and report.
    Finish,
    /// Stop at once (Ctrl-C, another worker failed), close everything and report.
    Abort,
}

/// What the parent sees of a worker.
#[derive(Debug)]
pub enum Event<P, R> {
    Msg(WorkerMsg<P, R>),
    /// The worker is gone (exited or its task ended); `detail` says how.
    Gone {
        detail: String,
    },
}

/// An event and the index of the worker it came from.
pub type Envelope<P, R> = (u32, Event<P, R>);

// === worker side ===

/// A worker's connection to its parent.
pub struct WorkerLink<P, R> {
    out: Out<P, R>,
    control: ControlIn,
}

enum Out<P, R> {
    Channel {
        index: u32,
        tx: mpsc::Sender<Envelope<P, R>>,
    },
    Stdout(tokio::io::Stdout),
}

enum ControlIn {
    Channel(mpsc::Receiver<Control>),
    Stdin(tokio::io::Lines<BufReader<tokio::io::Stdin>>),
}

impl<P: Serialize, R: Serialize> WorkerLink<P, R> {
    /// The link of a worker process: stdout for messages, stdin for commands.
    pub fn stdio() -> WorkerLink<P, R> {
        WorkerLink {
            out: Out::Stdout(tokio::io::stdout()),
            control: ControlIn::Stdin(BufReader::new(tokio::io::stdin()).lines()),
        }
    }

    /// Sends one message to the parent.
    pub async fn send(&mut self, msg: WorkerMsg<P, R>) -> Result<()> {
        match &mut self.out {
            Out::Channel { index, tx } => tx
                .send((*index, Event::Msg(msg)))
                .await
                .map_err(|_| anyhow::anyhow!("the parent is gone")),
            Out::Stdout(out) => {
                let mut line = serde_json::to_vec(&msg)?;
                line.push(b'\n');
                out.write_all(&line).await?;
                out.flush().await?;
                Ok(())
            }
        }
    }

    /// The next command; `Abort` when the parent is gone (stdin closed) or sent
    /// something unreadable, so that a worker never outlives its parent.
    pub async fn recv(&mut self) -> Control {
        match &mut self.control {
            ControlIn::Channel(rx) => rx.recv().await.unwrap_or(Control::Abort),
            ControlIn::Stdin(lines) => match lines.next_line().await {
                Ok(Some(line)) => serde_json::from_str(&line).unwrap_or(Control::Abort),
                Ok(None) | Err(_) => Control::Abort,
            },
        }
    }
}

// === parent side ===

/// The parent's handle on its workers.
pub struct Workers<P, R> {
    controls: Vec<ControlOut>,
    events: mpsc::Receiver<Envelope<P, R>>,
    live: usize,
}

enum ControlOut {
    Channel(mpsc::Sender<Control>),
    Process { stdin: Option<ChildStdin> },
}

impl<P, R> Workers<P, R>
where
    P: Serialize + DeserializeOwned + Send + 'static,
    R: Serialize + DeserializeOwned + Send + 'static,
{
    /// Runs one worker in this process.
    pub fn in_process<F, Fut>(worker: F) -> Workers<P, R>
    where
        F: FnOnce(WorkerLink<P, R>) -> Fut,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let fut = worker(WorkerLink {
            out: Out::Channel {
                index: 0,
                tx: events_tx.clone(),
            },
            control: ControlIn::Channel(control_rx),
        });
        tokio::spawn(async move {
            let detail = match fut.await {
                Ok(()) => "finished".to_owned(),
                Err(e) => format!("failed: {e:#}"),
            };
            let _ = events_tx.send((0, Event::Gone { detail })).await;
        });
        Workers {
            controls: vec![ControlOut::Channel(control_tx)],
            events,
            live: 1,
        }
    }

    /// Starts `count` copies of this executable with `args` plus
    /// `--worker-index i --worker-count count`.
    pub fn processes(count: u32, args: &[OsString]) -> Result<Workers<P, R>> {
        let exe = std::env::current_exe().context("finding our own executable")?;
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let mut controls = Vec::new();
        for index in 0..count {
            let mut child = Command::new(&exe)
                .args(args)
                .arg("--worker-index")
                .arg(index.to_string())
                .arg("--worker-count")
                .arg(count.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting worker {index} ({})", exe.display()))?;
            let stdin = child.stdin.take();
            let stdout = child.stdout.take().context("worker stdout")?;
            tokio::spawn(pump(index, child, stdout, events_tx.clone()));
            controls.push(ControlOut::Process { stdin });
        }
        Ok(Workers {
            live: controls.len(),
            controls,
            events,
        })
    }

    /// Number of workers started.
    pub fn count(&self) -> usize {
        self.controls.len()
    }

    /// Workers whose `Gone` has not been seen yet.
    pub fn live(&self) -> usize {
        self.live
    }

    /// The next event from any worker; `None` once every worker is gone.
    pub async fn next(&mut self) -> Option<Envelope<P, R>> {
        if self.live == 0 {
            return None;
        }
        let envelope = self.events.recv().await?;
        if matches!(envelope.1, Event::Gone { .. }) {
            self.live = self.live.saturating_sub(1);
        }
        Some(envelope)
    }

    /// Sends `control` to every worker (a worker that is gone is skipped).
    pub async fn broadcast(&mut self, control: Control) {
        for c in &mut self.controls {
            match c {
                ControlOut::Channel(tx) => {
                    let _ =
                        tokio::time::timeout(CONTROL_WRITE_TIMEOUT, tx.send(control.clone())).await;
                }
                ControlOut::Process { stdin } => {
                    let Some(pipe) = stdin.as_mut() else { continue };
                    let mut line = serde_json::to_vec(&control).unwrap_or_default();
                    line.push(b'\n');
                    let write = async {
                        pipe.write_all(&line).await?;
                        pipe.flush().await
                    };
                    if !matches!(
                        tokio::time::timeout(CONTROL_WRITE_TIMEOUT, write).await,
                        Ok(Ok(()))
                    ) {
                        // A worker that cannot hear us is told the only other way:
                        // closing its stdin means Abort.
                        *stdin = None;
                    }
                }
            }
        }
    }
}

/// Forwards one worker process's stdout lines to the parent, then its exit status.
async fn pump<P, R>(
    index: u32,
    mut child: Child,
    stdout: tokio::process::ChildStdout,
    tx: mpsc::Sender<Envelope<P, R>>,
) where
    P: DeserializeOwned,
    R: DeserializeOwned,
{
    let mut lines = FramedRead::new(stdout, LinesCodec::new_with_max_length(MAX_LINE_BYTES));
    let mut problem = None;
    while let Some(line) = lines.next().await {
        let msg = match line {
            Ok(line) => match serde_json::from_str::<WorkerMsg<P, R>>(&line) {
                Ok(msg) => msg,
                Err(e) => {
                    problem = Some(format!("sent an unreadable line ({e})"));
                    break;
                }
            },
            Err(e) => {
                problem = Some(format!("output failed: {e}"));
                break;
            }
        };
        if tx.send((index, Event::Msg(msg))).await.is_err() {
            return; // the parent stopped listening
        }
    }
    if problem.is_some() {
        let _ = child.start_kill();
    }
    let status = match child.wait().await {
        Ok(status) => status.to_string(),
        Err(e) => format!("unknown status ({e})"),
    };
    let detail = match problem {
        Some(p) => format!("{p}; {status}"),
        None => status,
    };
    let _ = tx.send((index, Event::Gone { detail })).await;
}

/// Checks that worker flags come as a pair and in range.
pub fn worker_role(index: Option<u32>, count: Option<u32>) -> Result<Option<(u32, u32)>> {
    match (index, count) {
        (None, None) => Ok(None),
        (Some(i), Some(n)) if n > 0 && i < n => Ok(Some((i, n))),
        _ => bail!("--worker-index and --worker-count go together, index < count"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        for (total, count) in [(10u64, 3u32), (1, 4), (100_000, 7), (0, 2)] {
            let mut next = 0;
            for i in 0..count {
                let r = share(total, i, count);
                assert_eq!(r.start, next);
                assert!(r.end - r.start <= total / u64::from(count) + 1);
                next = r.end;
            }
            assert_eq!(next, total);
        }
    }

    #[test]
    fn process_count_follows_the_fd_limit() {
        assert_eq!(process_count(1_000, None, 20_000), 1);
        assert_eq!(process_count(19_800, None, 20_000), 1);
        assert_eq!(process_count(19_801, None, 20_000), 2);
        assert_eq!(process_count(100_000, None, 20_000), 6);
        assert_eq!(process_count(100_000, Some(8), 20_000), 8);
        assert_eq!(process_count(5, Some(0), 20_000), 1);
        assert_eq!(connections_per_process(10), 1);
    }

    #[test]
    fn fd_limits_are_readable() {
        let (soft, hard) = fd_limits();
        assert!(soft > 0 && soft <= hard);
        assert!(raise_fd_limit() >= soft);
    }

    #[test]
    fn worker_flags_are_checked() {
        assert_eq!(worker_role(None, None).unwrap(), None);
        assert_eq!(worker_role(Some(1), Some(2)).unwrap(), Some((1, 2)));
        assert!(worker_role(Some(2), Some(2)).is_err());
        assert!(worker_role(Some(0), None).is_err());
        assert!(worker_role(Some(0), Some(0)).is_err());
    }

    #[test]
    fn messages_round_trip_as_json_lines() {
        let msg: WorkerMsg<u32, String> = WorkerMsg::Progress(7);
        let line = serde_json::to_string(&msg).unwrap();
        assert!(!line.contains('\n'));
        assert!(matches!(
            serde_json::from_str::<WorkerMsg<u32, String>>(&line).unwrap(),
            WorkerMsg::Progress(7)
        ));
        let c = serde_json::to_string(&Control::Hold).unwrap();
        assert_eq!(serde_json::from_str::<Control>(&c).unwrap(), Control::Hold);
        let expect = Control::Expect(vec![Some(41), None]);
        let c = serde_json::to_string(&expect).unwrap();
        assert_eq!(c, r#"{"expect":[41,null]}"#);
        assert_eq!(serde_json::from_str::<Control>(&c).unwrap(), expect);
    }

    #[tokio::test]
    async fn in_process_worker_talks_both_ways() {
        let mut workers: Workers<u32, String> = Workers::in_process(|mut link| async move {
            link.send(WorkerMsg::Ready(1)).await?;
            let c = link.recv().await;
            link.send(WorkerMsg::Result(format!("{c:?}"))).await
        });
        assert!(matches!(
            workers.next().await,
            Some((0, Event::Msg(WorkerMsg::Ready(1))))
        ));
        workers.broadcast(Control::Finish).await;
        match workers.next().await {
            Some((0, Event::Msg(WorkerMsg::Result(r)))) => assert_eq!(r, "Finish"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            workers.next().await,
            Some((0, Event::Gone { .. }))
        ));
        assert!(workers.next().await.is_none());
    }
}
