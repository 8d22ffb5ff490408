//! Source addresses and the TCP connect: one source address gives only as many
//! connections to one target as there are ephemeral ports, so large runs spread their
//! connections over 127.0.0.0/8, binding each socket before connecting with
//! `IP_BIND_ADDRESS_NO_PORT` (the kernel then picks the port at connect time, per
//! 4-tuple, instead of reserving one per bind).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result, bail};
use tokio::net::{TcpSocket, TcpStream};

/// The kernel's ephemeral port range file.
const PORT_RANGE_FILE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// Linux's default range (32768-60999) when the file cannot be read.
const DEFAULT_EPHEMERAL_PORTS: u64 = 28_232;
/// Share of the ephemeral ports one source address is planned to use: the rest is left
/// for TIME_WAIT leftovers of earlier runs and for other programs.
const PORT_USE_FRACTION: f64 = 0.9;
/// First address used when source addresses are chosen automatically (127.0.0.1 is
/// what an unbound socket uses anyway, so it is skipped to keep its ports for others).
const AUTO_FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Most source addresses in one run: 65,536 addresses give billions of ports, and the
/// bound keeps a typo like `127.0.0.1-127.255.255.255` from allocating 16M entries.
const MAX_SOURCES: u64 = 65_536;

/// Number of ephemeral ports the kernel hands out per (source, target) pair.
pub fn ephemeral_ports() -> u64 {
    std::fs::read_to_string(PORT_RANGE_FILE)
        .ok()
        .and_then(|s| parse_port_range(&s))
        .unwrap_or(DEFAULT_EPHEMERAL_PORTS)
}

fn parse_port_range(s: &str) -> Option<u64> {
    let mut it = s.split_whitespace().map(|p| p.parse::<u64>());
    let (low, high) = (it.next()?.ok()?, it.next()?.ok()?);
    (high >= low).then(|| high - low + 1)
}

/// Connections planned per source address for a given port range.
pub fn connections_per_source(ports: u64) -> u64 {
    ((ports as f64 * PORT_USE_FRACTION) as u64).max(1)
}

/// The source addresses of a run; empty means "let the kernel choose".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourcePlan {
    pub addrs: Vec<IpAddr>,
    /// Whether the addresses were chosen automatically (for the report).
    pub automatic: bool,
}

impl SourcePlan {
    /// Plans the source addresses for `total` connections to `target`: the explicit
    /// list when given, else enough addresses from 127.0.0.2 upward that no address
    /// needs more than its share of `ports`, else none.
    pub fn new(
        explicit: Option<&str>,
        total: u64,
        target: IpAddr,
        ports: u64,
    ) -> Result<SourcePlan> {
        if let Some(spec) = explicit {
            let addrs = parse_sources(spec)?;
            if let Some(bad) = addrs.iter().find(|a| a.is_ipv4() != target.is_ipv4()) {
                bail!(
                    "--source-ips: {bad} is not of the same address family as the target {target}"
                );
            }
            return Ok(SourcePlan {
                addrs,
                automatic: false,
            });
        }
        let per_source = connections_per_source(ports);
        if total <= per_source || !target.is_ipv4() {
            // IPv6 loopback is the single address ::1: nothing to spread over.
            return Ok(SourcePlan::default());
        }
        let needed = total.div_ceil(per_source).min(MAX_SOURCES);
        let mut addrs = Vec::new();
        let mut next = u32::from(AUTO_FIRST_SOURCE);
        while (addrs.len() as u64) < needed {
            let ip = IpAddr::V4(Ipv4Addr::from(next));
            if ip != target {
                addrs.push(ip);
            }
            next += 1;
        }
        Ok(SourcePlan {
            addrs,
            automatic: true,
        })
    }

    /// The source address of connection `index`, round robin.
    pub fn for_connection(&self, index: u64) -> Option<IpAddr> {
        if self.addrs.is_empty() {
            return None;
        }
        let i = usize::try_from(index % self.addrs.len() as u64).unwrap_or(0);
        self.addrs.get(i).copied()
    }

    /// Upper bound on connections to one target before ports run out.
    pub fn port_capacity(&self, ports: u64) -> u64 {
        ports.saturating_mul(self.addrs.len().max(1) as u64)
    }

    /// A short description for summaries: `127.0.0.2-127.0.0.5 (4)`.
    pub fn describe(&self) -> String {
        match self.addrs.as_slice() {
            [] => "kernel's choice (one address)".to_owned(),
            [one] => one.to_string(),
            [first, .., last] => format!("{first}-{last} ({})", self.addrs.len()),
        }
    }
}

/// Parses `127.0.0.2-127.0.0.9`, `127.0.0.2,127.0.0.3` or a mix; loopback only.
pub fn parse_sources(spec: &str) -> Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("--source-ips {part}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("--source-ips {part}"))?;
            let (lo, hi) = (u32::from(a), u32::from(b));
            if hi < lo {
                bail!("--source-ips {part}: the range is backwards");
            }
            if u64::from(hi - lo) + 1 + out.len() as u64 > MAX_SOURCES {
                bail!("--source-ips {spec}: more than {MAX_SOURCES} addresses");
            }
            out.extend((lo..=hi).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
        } else {
            let ip: IpAddr = part
                .parse()
                .with_context(|| format!("--source-ips {part}"))?;
            out.push(ip);
        }
    }
    if out.is_empty() {
        bail!("--source-ips {spec:?}: no addresses");
    }
    if out.len() as u64 > MAX_SOURCES {
        bail!("--source-ips {spec}: more than {MAX_SOURCES} addresses");
    }
    if let Some(bad) = out.iter().find(|ip| !ip.is_loopback()) {
        bail!("--source-ips: {bad} is not a loopback address (127.0.0.0/8 or ::1)");
    }
    Ok(out)
}

/// Opens a TCP connection to `target`, from `source` when given (bind-before-connect
/// with `IP_BIND_ADDRESS_NO_PORT`). No timeout here: the caller bounds the whole
/// handshake.
pub async fn connect(target: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    if let Some(ip) = source {
        if ip.is_ipv4() {
            // Without this, bind() reserves a port per socket from the same 28k range
            // regardless of the target, which defeats spreading over addresses.
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )
            .map_err(std::io::Error::from)?;
        }
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(target).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn port_range_parses() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(28_232));
        assert_eq!(parse_port_range("1024 65535"), Some(64_512));
        assert_eq!(parse_port_range("junk"), None);
        assert_eq!(parse_port_range("5 4"), None);
        assert!(ephemeral_ports() > 0);
    }

    #[test]
    fn source_lists_and_ranges_parse() {
        let v = parse_sources("127.0.0.2-127.0.0.4, 127.1.0.1").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[3], "127.1.0.1".parse::<IpAddr>().unwrap());
        assert!(parse_sources("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_sources("10.0.0.1").is_err());
        assert!(parse_sources("127.0.0.1-127.255.255.255").is_err());
        assert!(parse_sources("").is_err());
        assert!(parse_sources("nope").is_err());
    }

    #[test]
    fn small_runs_need_no_source_addresses() {
        let plan = SourcePlan::new(None, 10_000, TARGET, 28_232).unwrap();
        assert!(plan.addrs.is_empty());
        assert_eq!(plan.for_connection(5), None);
    }

    #[test]
    fn large_runs_spread_automatically() {
        let plan = SourcePlan::new(None, 100_000, TARGET, 28_232).unwrap();
        // 25,408 connections per address -> 4 addresses, starting at 127.0.0.2.
        assert_eq!(plan.addrs.len(), 4);
        assert!(plan.automatic);
        assert_eq!(plan.addrs[0], "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(plan.for_connection(5), Some(plan.addrs[1]));
        assert_eq!(plan.describe(), "127.0.0.2-127.0.0.5 (4)");
        // The target address itself is skipped.
        let t2: IpAddr = "127.0.0.3".parse().unwrap();
        let plan = SourcePlan::new(None, 100_000, t2, 28_232).unwrap();
        assert!(!plan.addrs.contains(&t2));
    }

    #[test]
    fn explicit_sources_must_match_the_target_family() {
        let v6: IpAddr = "::1".parse().unwrap();
        assert!(SourcePlan::new(Some("127.0.0.2"), 10, v6, 28_232).is_err());
        let plan = SourcePlan::new(Some("127.0.0.2-127.0.0.3"), 10, TARGET, 28_232).unwrap();
        assert_eq!(plan.addrs.len(), 2);
        assert!(!plan.automatic);
    }

    #[tokio::test]
    async fn bind_before_connect_uses_the_source_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source: IpAddr = "127.0.0.7".parse().unwrap();
        let (client, accepted) = tokio::join!(connect(addr, Some(source)), listener.accept());
        let client = client.unwrap();
        assert_eq!(client.local_addr().unwrap().ip(), source);
        assert_eq!(accepted.unwrap().1.ip(), source);
    }
}
