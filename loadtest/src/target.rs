//! Target addresses and the loopback-only rule: every URL the load generator sends
//! traffic to (the gateway's WebSocket URL, its metrics URL) must name a loopback
//! address, and host names other than `localhost` are never resolved.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result, bail};
use tokio_tungstenite::tungstenite::http::Uri;

/// Port of a `ws://` URL without one (RFC 6455 section 3).
const WS_DEFAULT_PORT: u16 = 80;

/// The WebSocket endpoint under test.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as given (used for the request line and `Host` header).
    pub uri: Uri,
    /// The loopback socket address the URL names.
    pub addr: SocketAddr,
}

impl Target {
    /// Parses and checks a `ws://` URL: loopback host only.
    pub fn parse(url: &str) -> Result<Target> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--url {url:?} is not a URL"))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some("wss") => bail!(
                "--url {url}: wss:// is not supported (loopback targets need no TLS; use ws://)"
            ),
            _ => bail!("--url {url}: the scheme must be ws://"),
        }
        let host = uri
            .host()
            .with_context(|| format!("--url {url}: no host"))?;
        let ip = loopback_ip(host).with_context(|| format!("--url {url}"))?;
        let port = uri.port_u16().unwrap_or(WS_DEFAULT_PORT);
        Ok(Target {
            addr: SocketAddr::new(ip, port),
            uri,
        })
    }
}

/// Checks an `http://` URL (the gateway's metrics endpoint) for a loopback host.
pub fn check_http_url(flag: &str, url: &str) -> Result<reqwest::Url> {
    let parsed =
        reqwest::Url::parse(url).with_context(|| format!("{flag} {url:?} is not a URL"))?;
    if parsed.scheme() != "http" {
        bail!("{flag} {url}: the scheme must be http://");
    }
    let host = parsed
        .host_str()
        .with_context(|| format!("{flag} {url}: no host"))?;
    loopback_ip(host).with_context(|| format!("{flag} {url}"))?;
    Ok(parsed)
}

/// The loopback address a host names: `localhost`, an address in 127.0.0.0/8, or ::1.
/// Anything else is refused: this machine's rule is that load goes to loopback only.
pub fn loopback_ip(host: &str) -> Result<IpAddr> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let ip: IpAddr = bare.parse().map_err(|_| {
        anyhow::anyhow!(
            "refusing host {host:?}: only loopback targets are allowed \
             (127.0.0.0/8, ::1 or localhost; other names are not resolved)"
        )
    })?;
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    if !ip.is_loopback() {
        bail!("refusing {ip}: only loopback targets are allowed (127.0.0.0/8, ::1 or localhost)");
    }
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_accepted() {
        let t = Target::parse("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.uri.path(), "/ws");
        let t = Target::parse("ws://localhost/ws").unwrap();
        assert_eq!(t.addr, "127.0.0.1:80".parse().unwrap());
        let t = Target::parse("ws://[::1]:9000/ws").unwrap();
        assert_eq!(t.addr, "[::1]:9000".parse().unwrap());
        let t = Target::parse("ws://127.3.4.5:1/").unwrap();
        assert_eq!(t.addr.ip(), "127.3.4.5".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn everything_else_is_refused() {
        for url in [
            "ws://10.0.0.1:8080/ws",
            "ws://example.com/ws",
            "ws://0.0.0.0:8080/ws",
            "ws://[::]:8080/ws",
            "ws://[2001:db8::1]/ws",
            "ws://128.0.0.1/ws",
        ] {
            let e = Target::parse(url).unwrap_err();
            assert!(format!("{e:#}").contains("loopback"), "{url}: {e:#}");
        }
        assert!(Target::parse("wss://127.0.0.1/ws").is_err());
        assert!(Target::parse("http://127.0.0.1/ws").is_err());
        assert!(Target::parse("not a url").is_err());
    }

    #[test]
    fn metrics_url_must_be_loopback_http() {
        assert!(check_http_url("--metrics-url", "http://127.0.0.1:9090/metrics").is_ok());
        assert!(check_http_url("--metrics-url", "http://localhost:9090/metrics").is_ok());
        assert!(check_http_url("--metrics-url", "http://192.168.1.2:9090/metrics").is_err());
        assert!(check_http_url("--metrics-url", "https://127.0.0.1/metrics").is_err());
        assert!(check_http_url("--metrics-url", "http://metrics.internal/").is_err());
    }

    #[test]
    fn mapped_loopback_is_loopback() {
        assert_eq!(
            loopback_ip("[::ffff:127.0.0.1]").unwrap(),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
    }
}
