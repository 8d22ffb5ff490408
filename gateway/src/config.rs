//! Gateway configuration: flags with `SB_*` env twins, an optional TOML file, named
//! defaults, and validation that names the key at fault.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};
use shared::auth::{JwtAlgorithm, JwtSettings, KeySource};
use shared::config::{self as cfg, ConfigError};
pub use shared::config::{DEFAULT_NATS_URL, DEFAULT_PREFIX, DEFAULT_REDIS_URL};
pub use shared::telemetry::LogFormat;

use crate::proxy::{ForwardedHeader, TrustedProxies};

/// Public port (WebSocket and API): the conventional HTTP alt port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Admin port (health, readiness, metrics): kept off the public load balancer.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9090";
/// PROTOCOL.md section 2: a frame over 64 KiB is closed 1009.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// A few devices and tabs per user; more is usually a client reconnect bug.
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: u32 = 10;
/// Drain window (docs/PROTOCOL.md section 4, close 1012; docs/DESIGN.md#failure-semantics):
/// reconnects spread over 10 s stay gentle.
pub const DEFAULT_DRAIN_SECS: u64 = 10;
/// PROTOCOL.md section 1: `auth` must arrive within 10 s.
pub const DEFAULT_AUTH_TIMEOUT_SECS: u64 = 10;
/// Below the 30-60 s idle timeouts of common load balancers and NATs.
pub const DEFAULT_PING_INTERVAL_SECS: u64 = 25;
/// Two missed pings plus slack: a peer silent this long is gone.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
/// Frames per second per connection: chat UIs send a handful; bursts cover typing.
pub const DEFAULT_MESSAGE_RATE: u32 = 20;
pub const DEFAULT_MESSAGE_BURST: u32 = 40;
/// New connections per second per client address per node: a reconnect after a drain
/// is one per client, so this only stops loops and floods.
pub const DEFAULT_CONNECT_RATE_PER_IP: u32 = 20;
pub const DEFAULT_CONNECT_BURST_PER_IP: u32 = 50;
/// Frames queued per connection before it counts as a slow consumer: absorbs a
/// streamed reply's burst; memory is only used while frames are queued.
pub const DEFAULT_OUTBOUND_QUEUE: usize = 256;
/// The user-context RPC waits about 2 s before answering degraded (docs/PROTOCOL.md
/// section 3; docs/DESIGN.md#user-context-and-permissions).
pub const DEFAULT_USER_CONTEXT_TIMEOUT_MS: u64 = 2000;
/// Live connections' teams and tasks are checked again this often: a user removed
/// from a team loses its channels within five minutes even if nobody says so.
pub const DEFAULT_CONTEXT_REVALIDATE_SECS: u64 = 300;
/// Chat requests per user per minute, cluster-wide: LLM calls are costly, and a
/// person types a few messages a minute.
pub const DEFAULT_CHAT_RATE_PER_MINUTE: u32 = 20;
/// Attachments per chat message.
pub const DEFAULT_MAX_FILES: usize = 5;
/// Decoded attachment bytes per chat message: 1 MiB (docs/PROTOCOL.md, "Chat in detail").
pub const DEFAULT_MAX_FILES_BYTES: usize = 1024 * 1024;
/// JetStream replicas of the chat stream: 1 for a single NATS, 3 for a cluster.
pub const DEFAULT_JETSTREAM_REPLICAS: usize = 1;
/// Subscriptions per connection (docs/PROTOCOL.md, "Channels in detail"): enough for a
/// chat UI's channels.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 100;
/// Publications kept per channel for recovery.
pub const DEFAULT_HISTORY_SIZE: usize = 100;
/// History lifetime after a channel's last publication: covers a phone in a tunnel.
pub const DEFAULT_HISTORY_TTL_SECS: u64 = 600;
/// Offsets outlive history by far, so they never restart under a client that holds one.
pub const DEFAULT_OFFSET_TTL_SECS: u64 = 7 * 24 * 3600;
/// Presence entries of a dead node vanish within this time (refreshed at a third).
pub const DEFAULT_PRESENCE_TTL_SECS: u64 = 90;
/// Namespaces with presence `join`/`leave` events and `read` events by default.
pub const DEFAULT_EVENT_NAMESPACES: &str = "team";
/// Node heartbeat period: `GET /v1/nodes` drops a node after three missed beats (30 s).
pub const DEFAULT_HEARTBEAT_SECS: u64 = 10;
/// File descriptors kept free for NATS, Redis, logs and the admin port when the
/// per-node connection cap is derived from the process's open-file limit.
pub const FD_RESERVE: u64 = 256;
/// Per-node connection cap when the open-file limit cannot be read.
pub const FALLBACK_MAX_CONNECTIONS: u64 = 100_000;

/// Settings as given (flags, env, file); every field optional so layers can merge.
#[derive(Debug, Default, Clone, Parser, Serialize, Deserialize)]
#[command(name = "gateway", version, about = "Switchboard gateway node")]
pub struct RawConfig {
    /// TOML config file (keys are the flag names with `_`).
    #[arg(long, env = "SB_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print a summary (no secrets) and exit.
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,

    /// Public listen address (WebSocket + API).
    #[arg(long, env = "SB_LISTEN")]
    pub listen: Option<String>,
    /// Node, NATS, Redis, TLS, prefix and log settings (shared with the other binary).
    #[command(flatten)]
    #[serde(flatten)]
    pub cluster: cfg::ClusterArgs,

    /// HS256 shared secret.
    #[arg(long, env = "SB_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key for RS256/ES256.
    #[arg(long, env = "SB_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// JWKS file for RS256/ES256 (keys chosen by `kid`).
    #[arg(long, env = "SB_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// HS256, RS256 or ES256 (default: HS256 with a secret, else RS256).
    #[arg(long, env = "SB_JWT_ALGORITHM")]
    pub jwt_algorithm: Option<String>,
    #[arg(long, env = "SB_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    #[arg(long, env = "SB_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    #[arg(long, env = "SB_JWT_LEEWAY_SECS")]
    pub jwt_leeway_secs: Option<u64>,
    /// Longest accepted token lifetime in seconds (`exp - iat`, or `exp - now`
    /// without `iat`); 0 = no cap.
    #[arg(long, env = "SB_JWT_MAX_LIFETIME_SECS")]
    pub jwt_max_lifetime_secs: Option<u64>,

    /// Allowed `Origin` values, comma-separated (`*` = any; `https://*.example.com`).
    #[arg(long, env = "SB_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,
    /// API key for `/v1/*` (Authorization: Bearer).
    #[arg(long, env = "SB_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(long, env = "SB_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    #[arg(long, env = "SB_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<u32>,
    /// Connections this node accepts (default: open-file limit minus a reserve).
    #[arg(long, env = "SB_MAX_CONNECTIONS")]
    pub max_connections: Option<u64>,
    #[arg(long, env = "SB_DRAIN_SECS")]
    pub drain_secs: Option<u64>,
    /// Peers whose forwarding headers are believed (CIDRs, comma-separated).
    #[arg(long, env = "SB_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,
    /// Forwarding header the trusted proxies maintain: x-forwarded-for or forwarded.
    #[arg(long, env = "SB_FORWARDED_HEADER")]
    pub forwarded_header: Option<String>,
    /// Expect a PROXY protocol (v1/v2) header from trusted peers.
    #[arg(long, env = "SB_PROXY_PROTOCOL")]
    pub proxy_protocol: Option<bool>,
    /// Send the user's token with user-context requests (for a team backend that
    /// authorizes as the user); off: only the user id travels on NATS.
    #[arg(long, env = "SB_FORWARD_USER_TOKEN")]
    pub forward_user_token: Option<bool>,
    #[arg(long, env = "SB_AUTH_TIMEOUT_SECS")]
    pub auth_timeout_secs: Option<u64>,
    #[arg(long, env = "SB_PING_INTERVAL_SECS")]
    pub ping_interval_secs: Option<u64>,
    #[arg(long, env = "SB_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
    #[arg(long, env = "SB_MESSAGE_RATE")]
    pub message_rate: Option<u32>,
    #[arg(long, env = "SB_MESSAGE_BURST")]
    pub message_burst: Option<u32>,
    #[arg(long, env = "SB_CONNECT_RATE_PER_IP")]
    pub connect_rate_per_ip: Option<u32>,
    #[arg(long, env = "SB_CONNECT_BURST_PER_IP")]
    pub connect_burst_per_ip: Option<u32>,
    #[arg(long, env = "SB_OUTBOUND_QUEUE")]
    pub outbound_queue: Option<usize>,
    #[arg(long, env = "SB_USER_CONTEXT_TIMEOUT_MS")]
    pub user_context_timeout_ms: Option<u64>,
    /// Period of the re-check of every live connection's teams and tasks.
    #[arg(long, env = "SB_CONTEXT_REVALIDATE_SECS")]
    pub context_revalidate_secs: Option<u64>,
    /// Chat requests per user per minute, cluster-wide.
    #[arg(long, env = "SB_CHAT_RATE_PER_MINUTE")]
    pub chat_rate_per_minute: Option<u32>,
    #[arg(long, env = "SB_MAX_FILES")]
    pub max_files: Option<usize>,
    #[arg(long, env = "SB_MAX_FILES_BYTES")]
    pub max_files_bytes: Option<usize>,
    #[arg(long, env = "SB_JETSTREAM_REPLICAS")]
    pub jetstream_replicas: Option<usize>,
    /// Namespaces any authenticated user may subscribe and publish to.
    #[arg(long, env = "SB_PUBLIC_NAMESPACES")]
    pub public_namespaces: Option<String>,
    /// Namespaces whose subscribers get `join`/`leave` events.
    #[arg(long, env = "SB_PRESENCE_NAMESPACES")]
    pub presence_namespaces: Option<String>,
    /// Namespaces whose subscribers get `read` events.
    #[arg(long, env = "SB_READ_NAMESPACES")]
    pub read_namespaces: Option<String>,
    #[arg(long, env = "SB_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<usize>,
    #[arg(long, env = "SB_HISTORY_SIZE")]
    pub history_size: Option<usize>,
    #[arg(long, env = "SB_HISTORY_TTL_SECS")]
    pub history_ttl_secs: Option<u64>,
    #[arg(long, env = "SB_PRESENCE_TTL_SECS")]
    pub presence_ttl_secs: Option<u64>,
    /// Node heartbeat period (node list, channel counts); a node is gone after three.
    #[arg(long, env = "SB_HEARTBEAT_SECS")]
    pub heartbeat_secs: Option<u64>,
}

/// Channel settings.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    pub public_namespaces: Vec<String>,
    pub presence_namespaces: Vec<String>,
    pub read_namespaces: Vec<String>,
    pub max_subscriptions: usize,
    pub history_size: usize,
    pub history_ttl: Duration,
    pub offset_ttl: Duration,
    pub presence_ttl: Duration,
}

/// Validated gateway configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Node, NATS, Redis, TLS, prefix and log settings (`shared::config::Cluster`).
    pub cluster: cfg::Cluster,
    pub jwt: JwtSettings,
    pub origins: OriginPolicy,
    pub api_key: Option<String>,
    pub max_message_bytes: usize,
    pub max_connections_per_user: u32,
    pub max_connections: u64,
    pub drain: Duration,
    pub trusted_proxies: TrustedProxies,
    pub proxy_protocol: bool,
    /// `SB_FORWARD_USER_TOKEN`: user-context requests carry the user's token.
    pub forward_user_token: bool,
    pub auth_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub message_rate: u32,
    pub message_burst: u32,
    pub connect_rate_per_ip: u32,
    pub connect_burst_per_ip: u32,
    pub outbound_queue: usize,
    pub user_context_timeout: Duration,
    pub context_revalidate: Duration,
    pub chat_rate_per_minute: u32,
    pub max_files: usize,
    pub max_files_bytes: usize,
    pub jetstream_replicas: usize,
    pub channels: ChannelConfig,
    pub heartbeat: Duration,
}

/// Which browser origins may open a socket.
#[derive(Debug, Clone, PartialEq)]
pub enum OriginPolicy {
    Any,
    /// Exact origins, or `scheme://*.domain` patterns, lower-cased.
    List(Vec<String>),
}

impl OriginPolicy {
    pub fn allows(&self, origin: &str) -> bool {
        let OriginPolicy::List(list) = self else {
            return true;
        };
        let origin = origin.to_ascii_lowercase();
        list.iter()
            .any(|allowed| match allowed.split_once("://*.") {
                Some((scheme, domain)) => origin
                    .strip_prefix(scheme)
                    .and_then(|r| r.strip_prefix("://"))
                    .is_some_and(|host| host.ends_with(&format!(".{domain}"))),
                None => *allowed == origin,
            })
    }
}

impl cfg::Settings for RawConfig {
    fn file(&self) -> Option<PathBuf> {
        self.config.clone()
    }

    fn keep_flags(&mut self, cli: &Self) {
        self.config = cli.config.clone();
        self.check_config = cli.check_config;
    }
}

impl RawConfig {
    /// Parses flags and env, then layers them over the file, if any.
    pub fn load<I, T>(args: I) -> Result<RawConfig, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        cfg::load(args)
    }

    pub fn validate(&self) -> Result<Config, ConfigError> {
        let listen = cfg::parse_addr(
            "SB_LISTEN",
            self.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
        )?;
        let cluster = self.cluster.validate(DEFAULT_ADMIN_LISTEN)?;

        let origins = match self.allowed_origins.as_deref().map(cfg::parse_list) {
            None => OriginPolicy::Any,
            Some(l) if l.iter().any(|o| o == "*") => OriginPolicy::Any,
            Some(l) if l.is_empty() => {
                return Err(ConfigError::invalid(
                    "SB_ALLOWED_ORIGINS",
                    "empty list (use * for any)",
                ));
            }
            Some(l) => OriginPolicy::List(l.into_iter().map(|o| o.to_ascii_lowercase()).collect()),
        };
        let api_key = self.api_key.clone().filter(|k| !k.is_empty());
        if let Some(k) = &api_key
            && k.len() < 16
        {
            return Err(ConfigError::invalid(
                "SB_API_KEY",
                "must be at least 16 characters",
            ));
        }
        let max_message_bytes = self.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        if !(1024..=16 * 1024 * 1024).contains(&max_message_bytes) {
            return Err(ConfigError::invalid(
                "SB_MAX_MESSAGE_BYTES",
                "must be between 1024 and 16777216",
            ));
        }
        let header = match &self.forwarded_header {
            Some(h) => h
                .parse()
                .map_err(|e: String| ConfigError::invalid("SB_FORWARDED_HEADER", e))?,
            None => ForwardedHeader::default(),
        };
        let trusted_proxies = TrustedProxies::new(match &self.trusted_proxies {
            Some(s) => cfg::parse_cidrs("SB_TRUSTED_PROXIES", s)?,
            None => Vec::new(),
        })
        .with_header(header);
        let proxy_protocol = self.proxy_protocol.unwrap_or(false);
        if proxy_protocol && trusted_proxies.is_empty() {
            return Err(ConfigError::invalid(
                "SB_PROXY_PROTOCOL",
                "needs SB_TRUSTED_PROXIES (the PROXY header is only read from trusted peers)",
            ));
        }
        let ping = cfg::positive(
            "SB_PING_INTERVAL_SECS",
            self.ping_interval_secs
                .unwrap_or(DEFAULT_PING_INTERVAL_SECS),
        )?;
        let idle = cfg::positive(
            "SB_IDLE_TIMEOUT_SECS",
            self.idle_timeout_secs.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS),
        )?;
        if idle <= ping {
            return Err(ConfigError::invalid(
                "SB_IDLE_TIMEOUT_SECS",
                format!("must be greater than SB_PING_INTERVAL_SECS ({ping})"),
            ));
        }
        let message_rate = self.message_rate.unwrap_or(DEFAULT_MESSAGE_RATE);
        let message_burst = self
            .message_burst
            .unwrap_or(DEFAULT_MESSAGE_BURST.max(message_rate));
        let connect_rate_per_ip = self
            .connect_rate_per_ip
            .unwrap_or(DEFAULT_CONNECT_RATE_PER_IP);
        let connect_burst_per_ip = self
            .connect_burst_per_ip
            .unwrap_or(DEFAULT_CONNECT_BURST_PER_IP.max(connect_rate_per_ip));
        cfg::positive("SB_MESSAGE_RATE", message_rate.into())?;
        cfg::positive("SB_MESSAGE_BURST", message_burst.into())?;
        cfg::positive("SB_CONNECT_RATE_PER_IP", connect_rate_per_ip.into())?;
        cfg::positive("SB_CONNECT_BURST_PER_IP", connect_burst_per_ip.into())?;
        let outbound_queue = self.outbound_queue.unwrap_or(DEFAULT_OUTBOUND_QUEUE);
        cfg::positive("SB_OUTBOUND_QUEUE", outbound_queue as u64)?;
        let max_connections = match self.max_connections {
            Some(n) => cfg::positive("SB_MAX_CONNECTIONS", n)?,
            None => open_file_limit()
                .map(|l| l.saturating_sub(FD_RESERVE).max(1))
                .unwrap_or(FALLBACK_MAX_CONNECTIONS),
        };

        Ok(Config {
            cluster,
            listen,
            jwt: self.jwt()?,
            origins,
            api_key,
            max_message_bytes,
            max_connections_per_user: self
                .max_connections_per_user
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_USER),
            max_connections,
            drain: Duration::from_secs(self.drain_secs.unwrap_or(DEFAULT_DRAIN_SECS)),
            trusted_proxies,
            proxy_protocol,
            forward_user_token: self.forward_user_token.unwrap_or(false),
            auth_timeout: Duration::from_secs(cfg::positive(
                "SB_AUTH_TIMEOUT_SECS",
                self.auth_timeout_secs.unwrap_or(DEFAULT_AUTH_TIMEOUT_SECS),
            )?),
            ping_interval: Duration::from_secs(ping),
            idle_timeout: Duration::from_secs(idle),
            message_rate,
            message_burst,
            connect_rate_per_ip,
            connect_burst_per_ip,
            outbound_queue,
            user_context_timeout: Duration::from_millis(cfg::positive(
                "SB_USER_CONTEXT_TIMEOUT_MS",
                self.user_context_timeout_ms
                    .unwrap_or(DEFAULT_USER_CONTEXT_TIMEOUT_MS),
            )?),
            context_revalidate: Duration::from_secs(cfg::positive(
                "SB_CONTEXT_REVALIDATE_SECS",
                self.context_revalidate_secs
                    .unwrap_or(DEFAULT_CONTEXT_REVALIDATE_SECS),
            )?),
            chat_rate_per_minute: cfg::positive(
                "SB_CHAT_RATE_PER_MINUTE",
                self.chat_rate_per_minute
                    .unwrap_or(DEFAULT_CHAT_RATE_PER_MINUTE)
                    .into(),
            )? as u32,
            max_files: self.max_files.unwrap_or(DEFAULT_MAX_FILES),
            max_files_bytes: self.max_files_bytes.unwrap_or(DEFAULT_MAX_FILES_BYTES),
            jetstream_replicas: cfg::positive(
                "SB_JETSTREAM_REPLICAS",
                self.jetstream_replicas
                    .unwrap_or(DEFAULT_JETSTREAM_REPLICAS) as u64,
            )? as usize,
            channels: self.channels()?,
            heartbeat: Duration::from_secs(cfg::positive(
                "SB_HEARTBEAT_SECS",
                self.heartbeat_secs.unwrap_or(DEFAULT_HEARTBEAT_SECS),
            )?),
        })
    }

    fn channels(&self) -> Result<ChannelConfig, ConfigError> {
        let namespaces =
            |key: &str, v: Option<&str>, default: &str| -> Result<Vec<String>, ConfigError> {
                let list = cfg::parse_list(v.unwrap_or(default));
                for ns in &list {
                    shared::protocol::Channel::parse(&format!("{ns}:x")).map_err(|_| {
                        ConfigError::invalid(
                            key,
                            format!("{ns:?} is not a namespace ([a-z0-9_-]{{1,64}})"),
                        )
                    })?;
                }
                Ok(list)
            };
        let public = namespaces(
            "SB_PUBLIC_NAMESPACES",
            self.public_namespaces.as_deref(),
            "",
        )?;
        if let Some(ns) = public.iter().find(|n| *n == "user" || *n == "team") {
            return Err(ConfigError::invalid(
                "SB_PUBLIC_NAMESPACES",
                format!("{ns:?} has its own rules and cannot be public"),
            ));
        }
        Ok(ChannelConfig {
            public_namespaces: public,
            presence_namespaces: namespaces(
                "SB_PRESENCE_NAMESPACES",
                self.presence_namespaces.as_deref(),
                DEFAULT_EVENT_NAMESPACES,
            )?,
            read_namespaces: namespaces(
                "SB_READ_NAMESPACES",
                self.read_namespaces.as_deref(),
                DEFAULT_EVENT_NAMESPACES,
            )?,
            max_subscriptions: cfg::positive(
                "SB_MAX_SUBSCRIPTIONS",
                self.max_subscriptions.unwrap_or(DEFAULT_MAX_SUBSCRIPTIONS) as u64,
            )? as usize,
            history_size: cfg::positive(
                "SB_HISTORY_SIZE",
                self.history_size.unwrap_or(DEFAULT_HISTORY_SIZE) as u64,
            )? as usize,
            history_ttl: Duration::from_secs(cfg::positive(
                "SB_HISTORY_TTL_SECS",
                self.history_ttl_secs.unwrap_or(DEFAULT_HISTORY_TTL_SECS),
            )?),
            offset_ttl: Duration::from_secs(DEFAULT_OFFSET_TTL_SECS),
            presence_ttl: Duration::from_secs(
                cfg::positive(
                    "SB_PRESENCE_TTL_SECS",
                    self.presence_ttl_secs.unwrap_or(DEFAULT_PRESENCE_TTL_SECS),
                )?
                .max(3),
            ),
        })
    }

    fn jwt(&self) -> Result<JwtSettings, ConfigError> {
        let read = |key: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| ConfigError::invalid(key, format!("{}: {e}", p.display())))
        };
        let sources = [
            self.jwt_secret.is_some(),
            self.jwt_public_key_file.is_some(),
            self.jwt_jwks_file.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            return Err(ConfigError::invalid(
                "SB_JWT_SECRET",
                "set exactly one of SB_JWT_SECRET, SB_JWT_PUBLIC_KEY_FILE, SB_JWT_JWKS_FILE",
            ));
        }
        let key = if let Some(s) = &self.jwt_secret {
            if s.len() < 32 {
                return Err(ConfigError::invalid(
                    "SB_JWT_SECRET",
                    "must be at least 32 bytes",
                ));
            }
            KeySource::Secret(s.as_bytes().to_vec())
        } else if let Some(p) = &self.jwt_public_key_file {
            KeySource::PublicKeyPem(read("SB_JWT_PUBLIC_KEY_FILE", p)?)
        } else if let Some(p) = &self.jwt_jwks_file {
            KeySource::Jwks(read("SB_JWT_JWKS_FILE", p)?)
        } else {
            return Err(ConfigError::Missing {
                key: "SB_JWT_SECRET (or SB_JWT_PUBLIC_KEY_FILE / SB_JWT_JWKS_FILE)".into(),
            });
        };
        let algorithm = match &self.jwt_algorithm {
            Some(a) => a
                .parse::<JwtAlgorithm>()
                .map_err(|e| ConfigError::invalid("SB_JWT_ALGORITHM", e.to_string()))?,
            None if matches!(key, KeySource::Secret(_)) => JwtAlgorithm::Hs256,
            None => JwtAlgorithm::Rs256,
        };
        let settings = JwtSettings {
            algorithm,
            key,
            audience: self.jwt_audience.clone().filter(|s| !s.is_empty()),
            issuer: self.jwt_issuer.clone().filter(|s| !s.is_empty()),
            leeway_secs: self
                .jwt_leeway_secs
                .unwrap_or(shared::auth::DEFAULT_LEEWAY_SECS),
            max_token_bytes: shared::auth::DEFAULT_MAX_TOKEN_BYTES,
            max_lifetime_secs: self
                .jwt_max_lifetime_secs
                .unwrap_or(shared::auth::DEFAULT_MAX_LIFETIME_SECS),
        };
        // Building the validator proves the key parses and fits the algorithm.
        shared::auth::Validator::new(&settings).map_err(|e| {
            let key = match settings.key {
                KeySource::Secret(_) => "SB_JWT_SECRET",
                KeySource::PublicKeyPem(_) => "SB_JWT_PUBLIC_KEY_FILE",
                KeySource::Jwks(_) => "SB_JWT_JWKS_FILE",
            };
            ConfigError::invalid(key, format!("{e} (algorithm {algorithm})"))
        })?;
        Ok(settings)
    }
}

/// The soft open-file limit from `/proc/self/limits`.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

impl Config {
    /// A summary for `--check-config` and the start-up log; never includes secrets.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "listen": self.listen.to_string(),
            "admin_listen": self.cluster.admin_listen.to_string(),
            "node_id": self.cluster.node_id,
            "prefix": self.cluster.prefix,
            "redis_cluster": self.cluster.redis_cluster,
            "jwt_algorithm": self.jwt.algorithm.to_string(),
            "jwt_audience": self.jwt.audience,
            "jwt_issuer": self.jwt.issuer,
            "jwt_max_lifetime_secs": self.jwt.max_lifetime_secs,
            "allowed_origins": match &self.origins { OriginPolicy::Any => vec!["*".to_owned()], OriginPolicy::List(l) => l.clone() },
            "api_key_set": self.api_key.is_some(),
            "max_message_bytes": self.max_message_bytes,
            "max_connections_per_user": self.max_connections_per_user,
            "max_connections": self.max_connections,
            "drain_secs": self.drain.as_secs(),
            "proxy_protocol": self.proxy_protocol,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn raw(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["gateway", "--jwt-secret", SECRET];
        v.extend_from_slice(args);
        RawConfig::try_parse_from(v).unwrap().validate()
    }

    #[test]
    fn defaults_are_valid() {
        let c = raw(&[]).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.max_message_bytes, 64 * 1024);
        assert_eq!(c.origins, OriginPolicy::Any);
    }

    #[test]
    fn errors_name_the_key() {
        let e = raw(&["--max-message-bytes", "10"]).unwrap_err();
        assert!(e.to_string().starts_with("SB_MAX_MESSAGE_BYTES"), "{e}");
        let e = raw(&["--prefix", "a.b"]).unwrap_err();
        assert!(e.to_string().starts_with("SB_PREFIX"), "{e}");
        let e = raw(&["--jwt-algorithm", "none"]).unwrap_err();
        assert!(e.to_string().starts_with("SB_JWT_ALGORITHM"), "{e}");
        let e = raw(&["--trusted-proxies", "bogus"]).unwrap_err();
        assert!(e.to_string().starts_with("SB_TRUSTED_PROXIES"), "{e}");
        let e = raw(&["--proxy-protocol", "true"]).unwrap_err();
        assert!(e.to_string().starts_with("SB_PROXY_PROTOCOL"), "{e}");
        let e = RawConfig::try_parse_from(["gateway"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().starts_with("SB_JWT_SECRET"), "{e}");
        let e = raw(&["--jwt-algorithm", "RS256"]).unwrap_err();
        assert!(e.to_string().starts_with("SB_JWT_SECRET"), "{e}");
    }

    #[test]
    fn origin_patterns() {
        let p = OriginPolicy::List(vec![
            "https://app.example.com".into(),
            "https://*.example.org".into(),
        ]);
        assert!(p.allows("https://app.example.com"));
        assert!(p.allows("HTTPS://App.Example.com"));
        assert!(!p.allows("https://evil.com"));
        assert!(p.allows("https://a.example.org"));
        assert!(!p.allows("https://example.org.evil.com"));
        assert!(!p.allows("http://a.example.org"));
    }

    #[test]
    fn every_env_name_is_known_to_shared() {
        use clap::CommandFactory;
        for arg in RawConfig::command().get_arguments() {
            if let Some(env) = arg.get_env() {
                let env = env.to_str().unwrap();
                assert!(
                    shared::config::KNOWN_ENV.contains(&env),
                    "{env} missing from KNOWN_ENV"
                );
            }
        }
    }
}
