//! Readings from the gateway under test: resident memory from `/proc/<pid>/status`
//! (`--pid`) or from its Prometheus endpoint (`--metrics-url`), and its own count of
//! open connections from the same endpoint, to compute memory per connection.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::target;

/// Deadline for one metrics scrape: the admin port answers in milliseconds, and the
/// progress loop must not stall on a wedged gateway.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest metrics body read: a gateway's exposition is a few tens of KiB.
const MAX_METRICS_BYTES: usize = 8 * 1024 * 1024;

/// One reading; a field is `None` when its source was not given or did not answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewaySample {
    /// Milliseconds since the run epoch.
    pub at_ms: u64,
    pub rss_bytes: Option<u64>,
    /// The gateway's `switchboard_connections` gauge.
    pub connections: Option<u64>,
}

/// Where to read the gateway's figures.
#[derive(Debug, Clone)]
pub struct Probe {
    pid: Option<u32>,
    metrics: Option<(reqwest::Client, reqwest::Url)>,
}

impl Probe {
    /// `None` when neither `--pid` nor `--metrics-url` was given.
    pub fn new(pid: Option<u32>, metrics_url: Option<&str>) -> Result<Option<Probe>> {
        if pid.is_none() && metrics_url.is_none() {
            return Ok(None);
        }
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}/status")).exists()
        {
            bail!("--pid {pid}: no such process");
        }
        let metrics = match metrics_url {
            None => None,
            Some(url) => {
                let url = target::check_http_url("--metrics-url", url)?;
                let client = reqwest::Client::builder()
                    .timeout(SCRAPE_TIMEOUT)
                    .no_proxy() // loopback only, never via a proxy from the environment
                    .build()
                    .context("building the metrics client")?;
                Some((client, url))
            }
        };
        Ok(Some(Probe { pid, metrics }))
    }

    /// Reads what it can; failures leave fields empty.
    pub async fn sample(&self, at_ms: u64) -> GatewaySample {
        let mut s = GatewaySample {
            at_ms,
            ..GatewaySample::default()
        };
        if let Some((client, url)) = &self.metrics
            && let Ok(text) = scrape(client, url).await
        {
            s.rss_bytes = metric_value(&text, shared::metrics::PROCESS_RSS_BYTES).map(|v| v as u64);
            // The gauge is only exported once first set: absent on a fresh gateway
            // whose exposition we did read means no connection yet.
            s.connections =
                Some(metric_value(&text, shared::metrics::CONNECTIONS).map_or(0, |v| v as u64));
        }
        if let Some(pid) = self.pid {
            // /proc is exact and current; it wins over the exported gauge.
            if let Some(rss) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|t| vm_rss_bytes(&t))
            {
                s.rss_bytes = Some(rss);
            }
        }
        s
    }
}

async fn scrape(client: &reqwest::Client, url: &reqwest::Url) -> Result<String> {
    let response = client.get(url.clone()).send().await?.error_for_status()?;
    if response
        .content_length()
        .is_some_and(|n| n > MAX_METRICS_BYTES as u64)
    {
        bail!("metrics body too large");
    }
    let body = response.bytes().await?;
    if body.len() > MAX_METRICS_BYTES {
        bail!("metrics body too large");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// CPU time a process used, seconds, split as the kernel accounts it: `user` is
/// the program's own code, `system` the kernel working for it (syscalls, and on
/// loopback much of the TCP stack).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuSeconds {
    pub user: f64,
    pub system: f64,
}

impl CpuSeconds {
    pub fn total(&self) -> f64 {
        self.user + self.system
    }

    /// The time used since `earlier`.
    pub fn since(&self, earlier: &CpuSeconds) -> CpuSeconds {
        CpuSeconds {
            user: (self.user - earlier.user).max(0.0),
            system: (self.system - earlier.system).max(0.0),
        }
    }

    pub fn add(&mut self, other: &CpuSeconds) {
        self.user += other.user;
        self.system += other.system;
    }
}

/// CPU time of a process from `/proc/<pid>/stat` (`/proc/self/stat` for `None`).
pub fn cpu_seconds(pid: Option<u32>) -> Option<CpuSeconds> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let (user, system) = stat_cpu_ticks(&std::fs::read_to_string(path).ok()?)?;
    let hz = clock_ticks_per_second() as f64;
    Some(CpuSeconds {
        user: user as f64 / hz,
        system: system as f64 / hz,
    })
}

/// `(utime, stime)` in clock ticks (fields 14 and 15) from a `/proc/<pid>/stat`
/// line. The command name (field 2) is in parentheses and may hold spaces and
/// parentheses itself, so fields are counted from the last `)`.
pub fn stat_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    // `after` starts with field 3 (state): utime is the 12th field from here.
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// Linux's USER_HZ, the unit of `/proc/<pid>/stat` times, when sysconf cannot say.
const FALLBACK_CLOCK_TICKS: u64 = 100;

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub fn clock_ticks_per_second() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        _ => FALLBACK_CLOCK_TICKS,
    }
}

/// A process's command name (`/proc/<pid>/comm`), e.g. `gateway`, `nats-server`.
pub fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Resident memory of a process, bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    vm_rss_bytes(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// The kernel's TCP extension counters.
const NETSTAT_FILE: &str = "/proc/net/netstat";

/// The system-wide count of SYNs dropped because a listen queue was full
/// (`TcpExtListenOverflows`). On loopback both ends share the kernel, so its growth
/// during a run is the gateway's accept queue overflowing; each overflow costs that
/// client a SYN retransmission (1 s, then 3 s).
pub fn listen_overflows() -> Option<u64> {
    netstat_counter(
        &std::fs::read_to_string(NETSTAT_FILE).ok()?,
        "TcpExt",
        "ListenOverflows",
    )
}

/// A counter from `/proc/net/netstat` text: a header line `Group: names...` followed
/// by a value line `Group: values...`.
pub fn netstat_counter(text: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let position = names.split_whitespace().skip(1).position(|n| n == name);
        if let Some(i) = position {
            return values.split_whitespace().nth(i + 1)?.parse().ok();
        }
    }
    None
}

/// `VmRSS` from a `/proc/<pid>/status` text, in bytes.
pub fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

/// The value of metric `name` in Prometheus text format, summed over its label sets.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || !line.starts_with(name) {
            continue;
        }
        let rest = &line[name.len()..];
        // The name must end here (not be a prefix of a longer name).
        let value_part = if let Some(labels) = rest.strip_prefix('{') {
            match labels.rfind('}') {
                Some(end) => &labels[end + 1..],
                None => continue,
            }
        } else if rest.starts_with([' ', '\t']) {
            rest
        } else {
            continue;
        };
        if let Some(v) = value_part
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
        {
            total = Some(total.unwrap_or(0.0) + v);
        }
    }
    total
}

/// CPU used from the start of the window (publishing, chatting) to the end of the
/// drain.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUse {
    pub window_s: f64,
    /// The `--pid` processes (gateways, nats-server, redis-server, ...).
    pub processes: Vec<ProcessCpu>,
    /// The parent: the publisher, and the subscribers too when they run in-process.
    pub loadtest_parent: Option<CpuSeconds>,
    /// Worker processes together (`None` when the subscribers ran in the parent).
    pub loadtest_workers: Option<CpuSeconds>,
    pub loadtest: Option<CpuSeconds>,
    pub loadtest_cores: Option<f64>,
}

impl CpuUse {
    pub fn new(window_s: f64, processes: Vec<ProcessCpu>, parent: Option<CpuSeconds>) -> CpuUse {
        CpuUse {
            window_s,
            processes,
            loadtest_parent: parent,
            loadtest_workers: None,
            loadtest: parent,
            loadtest_cores: parent.map(|c| c.total() / window_s.max(1e-3)),
        }
    }

    /// Adds the worker processes' own CPU time.
    pub fn add_workers(&mut self, workers: Option<CpuSeconds>) {
        self.loadtest_workers = workers;
        if let Some(w) = workers {
            let mut total = self.loadtest_parent.unwrap_or_default();
            total.add(&w);
            self.loadtest = Some(total);
            self.loadtest_cores = Some(total.total() / self.window_s.max(1e-3));
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessCpu {
    pub pid: u32,
    pub name: String,
    pub cpu: Option<CpuSeconds>,
    /// CPU seconds per second of the window.
    pub cores: Option<f64>,
    /// Resident memory at the end of the window.
    pub rss_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tgateway\nVmPeak:\t  99 kB\nVmRSS:\t   51200 kB\nThreads:\t4\n";
        assert_eq!(vm_rss_bytes(status), Some(51200 * 1024));
        assert_eq!(vm_rss_bytes("Name: x\n"), None);
        assert_eq!(vm_rss_bytes("VmRSS: lots kB\n"), None);
    }

    #[test]
    fn own_process_has_an_rss() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(vm_rss_bytes(&status).unwrap() > 0);
    }

    #[test]
    fn metrics_are_parsed_and_summed_over_labels() {
        let text = "\
# HELP switchboard_connections open connections
# TYPE switchboard_connections gauge
switchboard_connections 1200
switchboard_connections_pending 7
switchboard_process_resident_memory_bytes{node=\"a\"} 5.0e7
switchboard_closes_total{code=\"1000\"} 3
switchboard_closes_total{code=\"4503\"} 4
";
        assert_eq!(metric_value(text, "switchboard_connections"), Some(1200.0));
        assert_eq!(
            metric_value(text, "switchboard_connections_pending"),
            Some(7.0)
        );
        assert_eq!(
            metric_value(text, "switchboard_process_resident_memory_bytes"),
            Some(5.0e7)
        );
        assert_eq!(metric_value(text, "switchboard_closes_total"), Some(7.0));
        assert_eq!(metric_value(text, "switchboard_absent"), None);
        assert_eq!(
            metric_value("switchboard_connections NaN\n", "switchboard_connections"),
            None
        );
    }

    #[test]
    fn cpu_times_are_read_from_stat() {
        // A command name with spaces and parentheses must not shift the fields.
        let stat = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 4 0 100 1000000 300 18446744073709551615";
        assert_eq!(stat_cpu_ticks(stat), Some((250, 75)));
        assert_eq!(stat_cpu_ticks("garbage"), None);
        assert_eq!(stat_cpu_ticks("1 (x) S 1 2"), None);
        assert!(cpu_seconds(None).is_some());
        assert!(cpu_seconds(Some(std::process::id())).is_some());
        let a = CpuSeconds {
            user: 1.0,
            system: 0.5,
        };
        let mut b = CpuSeconds {
            user: 3.0,
            system: 0.25,
        };
        assert_eq!(
            b.since(&a),
            CpuSeconds {
                user: 2.0,
                system: 0.0
            }
        );
        b.add(&a);
        assert_eq!(b.total(), 4.75);
        assert!(clock_ticks_per_second() > 0);
        assert!(process_name(std::process::id()).is_some_and(|n| !n.is_empty()));
        assert!(rss_bytes(std::process::id()).is_some_and(|r| r > 0));
    }

    #[test]
    fn netstat_counters_are_found() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                    TcpExt: 0 100 101\n\
                    IpExt: InNoRoutes\n\
                    IpExt: 7\n";
        assert_eq!(
            netstat_counter(text, "TcpExt", "ListenOverflows"),
            Some(100)
        );
        assert_eq!(netstat_counter(text, "IpExt", "InNoRoutes"), Some(7));
        assert_eq!(netstat_counter(text, "TcpExt", "Nope"), None);
        assert_eq!(netstat_counter("", "TcpExt", "ListenOverflows"), None);
        assert!(
            listen_overflows().is_some(),
            "Linux exposes /proc/net/netstat"
        );
    }

    #[test]
    fn probe_needs_a_source_and_checks_it() {
        assert!(Probe::new(None, None).unwrap().is_none());
        assert!(Probe::new(None, Some("http://10.1.2.3:9090/metrics")).is_err());
        assert!(Probe::new(Some(u32::MAX), None).is_err());
        assert!(
            Probe::new(Some(std::process::id()), None)
                .unwrap()
                .is_some()
        );
    }
}
