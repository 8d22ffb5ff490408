//! The live progress line on stderr, once a second: rewritten in place on a terminal,
//! one plain line per tick otherwise (CI logs, pipes).

use std::io::{IsTerminal, Write};
use std::time::Duration;

/// How often the progress line is printed and workers report their counters: once per
/// time-series slot, so that every slot gets one sample.
pub const TICK: Duration = Duration::from_millis(crate::stats::series::SLOT_MS);

/// What one tick of a scenario shows (each shows its part).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PopulationSnapshot {
    pub elapsed: Duration,
    /// "subscribing"/"connecting", "holding"/"publishing"/"chatting"/"soaking",
    /// "draining", "closing".
    pub phase: &'static str,
    /// Connections set up (subscribed, or authenticated for chat users) / target.
    pub set_up: u64,
    /// Connections set up per second over the last tick.
    pub setup_rate: f64,
    pub target: u64,
    pub open: u64,
    /// Handshakes in flight now.
    pub in_flight: u64,
    pub failed: u64,
    /// Connections the server closed or dropped.
    pub closed: u64,
    /// Subscribers closed and replaced by churn.
    pub churned: u64,
    /// Publications sent per second over the last tick.
    pub publish_rate: f64,
    pub acked: u64,
    pub publish_failed: u64,
    /// Deliveries per second over the last tick, all subscribers.
    pub delivery_rate: f64,
    /// Delivery latency of the last complete second.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Chat streams in flight now.
    pub streams: u64,
    /// Streams started and completed per second over the last tick.
    pub stream_rate: f64,
    pub completed_rate: f64,
    /// Streams that failed so far.
    pub stream_errors: u64,
    /// First-chunk latency of the last complete second, or its overhead over the LLM
    /// stub's first-token delay when that is known (`overhead`).
    pub first_chunk_p50_ms: Option<f64>,
    pub first_chunk_p99_ms: Option<f64>,
    pub overhead: bool,
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), crate::report::format::millis)
}

fn head(s: &PopulationSnapshot, what: &str) -> String {
    format!(
        "[{:>6.1}s] {:<11} {what} {:>6}/{} open {:>6}",
        s.elapsed.as_secs_f64(),
        s.phase,
        s.set_up,
        s.target,
        s.open,
    )
}

fn publishing(s: &PopulationSnapshot) -> String {
    format!(
        "pub {:>6.0}/s acked {:>8}  deliver {:>9.0}/s  p50 {:>6} p99 {:>6} ms",
        s.publish_rate,
        s.acked,
        s.delivery_rate,
        ms(s.p50_ms),
        ms(s.p99_ms),
    )
}

fn chatting(s: &PopulationSnapshot) -> String {
    format!(
        "streams {:>5} sent {:>5.0}/s done {:>5.0}/s  {} p50 {:>6} p99 {:>6} ms  errors {:>5}",
        s.streams,
        s.stream_rate,
        s.completed_rate,
        if s.overhead {
            "overhead"
        } else {
            "first chunk"
        },
        ms(s.first_chunk_p50_ms),
        ms(s.first_chunk_p99_ms),
        s.stream_errors,
    )
}

/// Formats one `connect` progress line (no newline).
pub fn render_connect(s: &PopulationSnapshot) -> String {
    format!(
        "[{:>6.1}s] {:<10} open {:>7}  ok {:>7}/{}  connect {:>7.0}/s  in-flight {:>5}  failed {:>6}  dropped {:>5}",
        s.elapsed.as_secs_f64(),
        s.phase,
        s.open,
        s.set_up,
        s.target,
        s.setup_rate,
        s.in_flight,
        s.failed,
        s.closed,
    )
}

/// Formats one `broadcast` progress line (no newline).
pub fn render_broadcast(s: &PopulationSnapshot) -> String {
    format!(
        "{}  {}  failed {:>5} closed {:>5} pub-failed {:>5}",
        head(s, "subs"),
        publishing(s),
        s.failed,
        s.closed,
        s.publish_failed,
    )
}

/// Formats one `chat` progress line (no newline).
pub fn render_chat(s: &PopulationSnapshot) -> String {
    format!(
        "{}  {}  failed {:>5} closed {:>5}",
        head(s, "users"),
        chatting(s),
        s.failed,
        s.closed,
    )
}

/// Formats one `soak` progress line (no newline).
pub fn render_soak(s: &PopulationSnapshot) -> String {
    format!(
        "[{:>6.1}s] {:<11} open {:>6}/{} setups {:>7} churned {:>6}  {}  {}  failed {:>5} \
         closed {:>5} pub-failed {:>5}",
        s.elapsed.as_secs_f64(),
        s.phase,
        s.open,
        s.target,
        s.set_up,
        s.churned,
        publishing(s),
        chatting(s),
        s.failed,
        s.closed,
        s.publish_failed,
    )
}

/// Writes progress lines to stderr.
pub struct ProgressLine {
    tty: bool,
    dirty: bool,
}

impl Default for ProgressLine {
    fn default() -> Self {
        ProgressLine::new()
    }
}

impl ProgressLine {
    pub fn new() -> ProgressLine {
        ProgressLine {
            tty: std::io::stderr().is_terminal(),
            dirty: false,
        }
    }

    /// Shows an already formatted line.
    pub fn show_text(&mut self, line: &str) {
        let mut err = std::io::stderr().lock();
        // A failed write to stderr is not worth stopping a load test for.
        let _ = if self.tty {
            self.dirty = true;
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }

    /// Ends the in-place line so that what follows starts on a fresh line.
    pub fn finish(&mut self) {
        if self.tty && self.dirty {
            let _ = writeln!(std::io::stderr());
            self.dirty = false;
        }
    }

    /// Prints a message on its own line without garbling the progress line.
    pub fn note(&mut self, message: &str) {
        self.finish();
        let _ = writeln!(std::io::stderr(), "{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_every_counter() {
        let line = render_connect(&PopulationSnapshot {
            elapsed: Duration::from_millis(3_300),
            phase: "connecting",
            open: 1500,
            in_flight: 200,
            set_up: 1500,
            failed: 3,
            closed: 1,
            setup_rate: 498.6,
            target: 10_000,
            ..PopulationSnapshot::default()
        });
        assert!(line.starts_with("[   3.3s] connecting"), "{line}");
        for part in [
            "open    1500",
            "1500/10000",
            "499/s",
            "in-flight   200",
            "failed      3",
            "dropped     1",
        ] {
            assert!(line.contains(part), "{part:?} missing in {line:?}");
        }
        assert!(!line.contains('\n'));
    }

    #[test]
    fn population_lines_show_their_parts() {
        let s = PopulationSnapshot {
            elapsed: Duration::from_millis(12_000),
            phase: "publishing",
            set_up: 10_000,
            setup_rate: 0.0,
            target: 10_000,
            open: 9_999,
            in_flight: 0,
            failed: 0,
            closed: 1,
            churned: 40,
            publish_rate: 100.0,
            acked: 1_200,
            publish_failed: 2,
            delivery_rate: 999_900.0,
            p50_ms: Some(3.25),
            p99_ms: None,
            streams: 980,
            stream_rate: 660.4,
            completed_rate: 655.0,
            stream_errors: 3,
            first_chunk_p50_ms: Some(312.0),
            first_chunk_p99_ms: Some(325.5),
            overhead: false,
        };
        let line = render_broadcast(&s);
        for part in [
            "[  12.0s] publishing",
            "subs  10000/10000 open   9999",
            "pub    100/s",
            "acked     1200",
            "deliver    999900/s",
            "p50   3.25 p99      - ms",
            "closed     1",
            "pub-failed     2",
        ] {
            assert!(line.contains(part), "{part:?} missing in {line:?}");
        }
        assert!(!line.contains("streams"));
        let line = render_chat(&s);
        for part in [
            "users  10000/10000",
            "streams   980 sent   660/s done   655/s",
            "first chunk p50    312 p99    326 ms",
            "errors     3",
        ] {
            assert!(line.contains(part), "{part:?} missing in {line:?}");
        }
        assert!(!line.contains("deliver"));
        let line = render_soak(&s);
        for part in [
            "open   9999/10000 setups   10000 churned     40",
            "deliver",
            "streams",
        ] {
            assert!(line.contains(part), "{part:?} missing in {line:?}");
        }
        let line = render_chat(&PopulationSnapshot {
            overhead: true,
            ..s
        });
        assert!(line.contains("overhead p50    312 p99    326 ms"), "{line}");
        assert!(!line.contains('\n'));
    }
}
