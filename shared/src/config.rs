//! Config loading shared by the binaries: layering (defaults < TOML file < env < flags),
//! unknown-key rejection, and the parsers and validators for values every binary uses.
//! Each binary declares its own typed struct; this module makes them behave alike.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::telemetry::LogFormat;

/// Every environment variable any Switchboard binary reads. A `SB_*` variable not in
/// this list is a typo (or a stale setting) and is refused with its name, so a
/// misspelt `SB_JWT_SECRE` cannot silently fall back to a default. The list is the
/// union across binaries because deployments often share one env block.
pub const KNOWN_ENV: &[&str] = &[
    "SB_CONFIG",
    "SB_LISTEN",
    "SB_ADMIN_LISTEN",
    "SB_NODE_ID",
    "SB_NATS_URL",
    "SB_REDIS_URL",
    "SB_REDIS_CLUSTER",
    "SB_REDIS_TLS_CA",
    "SB_NATS_CREDS",
    "SB_FORWARD_USER_TOKEN",
    "SB_NATS_TLS_CA",
    "SB_PREFIX",
    "SB_LOG_FORMAT",
    "SB_LOG",
    "SB_JWT_SECRET",
    "SB_JWT_PUBLIC_KEY_FILE",
    "SB_JWT_JWKS_FILE",
    "SB_JWT_ALGORITHM",
    "SB_JWT_AUDIENCE",
    "SB_JWT_ISSUER",
    "SB_JWT_LEEWAY_SECS",
    "SB_JWT_MAX_LIFETIME_SECS",
    "SB_ALLOWED_ORIGINS",
    "SB_API_KEY",
    "SB_MAX_MESSAGE_BYTES",
    "SB_MAX_CONNECTIONS_PER_USER",
    "SB_MAX_CONNECTIONS",
    "SB_DRAIN_SECS",
    "SB_TRUSTED_PROXIES",
    "SB_PROXY_PROTOCOL",
    "SB_FORWARDED_HEADER",
    "SB_AUTH_TIMEOUT_SECS",
    "SB_PING_INTERVAL_SECS",
    "SB_IDLE_TIMEOUT_SECS",
    "SB_MESSAGE_RATE",
    "SB_MESSAGE_BURST",
    "SB_CONNECT_RATE_PER_IP",
    "SB_CONNECT_BURST_PER_IP",
    "SB_OUTBOUND_QUEUE",
    "SB_USER_CONTEXT_TIMEOUT_MS",
    "SB_CONTEXT_REVALIDATE_SECS",
    "SB_CHAT_RATE_PER_MINUTE",
    "SB_MAX_FILES",
    "SB_MAX_FILES_BYTES",
    "SB_JETSTREAM_REPLICAS",
    "SB_PUBLIC_NAMESPACES",
    "SB_PRESENCE_NAMESPACES",
    "SB_READ_NAMESPACES",
    "SB_MAX_SUBSCRIPTIONS",
    "SB_HISTORY_SIZE",
    "SB_HISTORY_TTL_SECS",
    "SB_PRESENCE_TTL_SECS",
    "SB_HEARTBEAT_SECS",
    // worker
    "SB_LLM_BASE_URL",
    "SB_LLM_API_KEY",
    "SB_LLM_MODEL",
    "SB_LLM_SYSTEM_PROMPT",
    "SB_LLM_PROTOCOL",
    "SB_LLM_MAX_TOKENS",
    "SB_LLM_CONNECT_TIMEOUT_MS",
    "SB_LLM_FIRST_TOKEN_TIMEOUT_MS",
    "SB_LLM_IDLE_TIMEOUT_MS",
    "SB_LLM_TOTAL_TIMEOUT_MS",
    "SB_LLM_MAX_ATTEMPTS",
    "SB_LLM_BACKOFF_BASE_MS",
    "SB_LLM_BACKOFF_MAX_MS",
    "SB_BACKEND_URL",
    "SB_BACKEND_TOKEN",
    "SB_BACKEND_TIMEOUT_MS",
    "SB_BREAKER_FAILURES",
    "SB_BREAKER_COOLDOWN_MS",
    "SB_CONTEXT_MAX_IN_FLIGHT",
    "SB_MAX_IN_FLIGHT",
    "SB_HISTORY_WINDOW",
    "SB_TOKEN_BUDGET",
    "SB_ACK_WAIT_SECS",
    "SB_MAX_DELIVER",
    "SB_SHUTDOWN_GRACE_SECS",
    "SB_CHUNK_INTERVAL_MS",
    "SB_CHUNK_CHARS",
];

/// A configuration problem, always naming the key at fault.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("{key}: required")]
    Missing { key: String },
    #[error("unknown environment variable {key} (not a Switchboard setting; typo?)")]
    UnknownEnv { key: String },
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

/// Refuses `SB_*` variables that no binary reads.
pub fn check_env<I, K>(vars: I) -> Result<(), ConfigError>
where
    I: IntoIterator<Item = (K, String)>,
    K: AsRef<str>,
{
    for (k, _) in vars {
        let k = k.as_ref();
        if k.starts_with("SB_") && !KNOWN_ENV.contains(&k) {
            return Err(ConfigError::UnknownEnv { key: k.to_owned() });
        }
    }
    Ok(())
}

/// Reads a TOML file into `T`; a key that is not one of `T`'s settings fails with its
/// name. The keys are checked here, against what `T::default()` serialises to, because
/// serde's `deny_unknown_fields` does not work with the flattened [`ClusterArgs`].
pub fn read_file<T: DeserializeOwned + Serialize + Default>(path: &Path) -> Result<T, ConfigError> {
    let file_error = |message: String| ConfigError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| file_error(e.message().to_owned()))?;
    let known = match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    if let Some(key) = table.keys().find(|k| !known.contains_key(*k)) {
        return Err(file_error(format!("unknown key `{key}`")));
    }
    T::deserialize(table).map_err(|e| file_error(e.message().to_owned()))
}

/// Overlays `top` (flags and env, as parsed by clap) on `base` (the file): a field set
/// in `top` wins, an unset (`None`) one keeps the file's value. Both must serialise to
/// a JSON object of optional fields.
pub fn layer<T: Serialize + DeserializeOwned>(base: T, top: T) -> T {
    let to_map = |t: &T| -> BTreeMap<String, serde_json::Value> {
        match serde_json::to_value(t) {
            Ok(serde_json::Value::Object(m)) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        }
    };
    let mut merged = to_map(&base);
    for (k, v) in to_map(&top) {
        if !v.is_null() {
            merged.insert(k, v);
        }
    }
    // Both inputs came from `T`, so the merge deserialises back into it.
    serde_json::from_value(serde_json::Value::Object(merged.into_iter().collect())).unwrap_or(top)
}

/// A binary's raw settings: parsed by clap (flags with `SB_*` env twins) and by serde
/// (the TOML file), with every setting optional so the layers can merge.
pub trait Settings: clap::Parser + Serialize + DeserializeOwned + Default {
    /// The config file named by `--config` / `SB_CONFIG`.
    fn file(&self) -> Option<PathBuf>;
    /// Copies what is not a setting (the file path, `--check-config`) from the
    /// command line onto the merged result.
    fn keep_flags(&mut self, cli: &Self);
}

/// Parses flags and env, refuses unknown `SB_*` variables, then layers flags and env
/// over the file, if any (defaults < file < env < flags).
pub fn load<T, I, A>(args: I) -> Result<T, ConfigError>
where
    T: Settings,
    I: IntoIterator<Item = A>,
    A: Into<OsString> + Clone,
{
    let cli = T::try_parse_from(args).map_err(clap_error::<T>)?;
    check_env(std::env::vars())?;
    let Some(path) = cli.file() else {
        return Ok(cli);
    };
    let file: T = read_file(&path)?;
    let mut merged = layer(file, cli.clone_via_serde()?);
    merged.keep_flags(&cli);
    Ok(merged)
}

/// Cloning through serde keeps `Settings` free of a `Clone` bound.
trait CloneViaSerde: Sized {
    fn clone_via_serde(&self) -> Result<Self, ConfigError>;
}

impl<T: Serialize + DeserializeOwned> CloneViaSerde for T {
    fn clone_via_serde(&self) -> Result<Self, ConfigError> {
        serde_json::to_value(self)
            .and_then(serde_json::from_value)
            .map_err(|e| ConfigError::invalid("arguments", e.to_string()))
    }
}

/// Turns a clap error into a config error naming the env variable too, since most
/// deployments set env rather than flags. `--help` and `--version` print and exit.
fn clap_error<T: clap::CommandFactory>(e: clap::Error) -> ConfigError {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    let flag = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.split_whitespace().next().map(str::to_owned),
        _ => None,
    };
    let env = flag.as_deref().and_then(|f| {
        let long = f.trim_start_matches("--");
        T::command()
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env().and_then(|v| v.to_str()).map(str::to_owned))
    });
    let message = e
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned();
    let key = match (env, flag) {
        (Some(env), Some(flag)) => format!("{env} ({flag})"),
        (None, Some(flag)) => flag,
        _ => "arguments".to_owned(),
    };
    ConfigError::Invalid { key, message }
}

/// The settings every Switchboard binary takes, as given: who this node is, where
/// NATS and Redis are and how to trust them, the key prefix and the log format. Each
/// binary's `RawConfig` flattens it, so the flags, their `SB_*` twins and the config
/// file keys are declared once.
#[derive(Debug, Default, Clone, clap::Args, Serialize, serde::Deserialize)]
pub struct ClusterArgs {
    /// Admin listen address (/healthz, /readyz, /metrics).
    #[arg(long, env = "SB_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Node id (default: host name).
    #[arg(long, env = "SB_NODE_ID")]
    pub node_id: Option<String>,
    #[arg(long, env = "SB_NATS_URL")]
    pub nats_url: Option<String>,
    #[arg(long, env = "SB_REDIS_URL")]
    pub redis_url: Option<String>,
    /// `SB_REDIS_URL` lists seed nodes of a Redis Cluster.
    #[arg(long, env = "SB_REDIS_CLUSTER")]
    pub redis_cluster: Option<bool>,
    /// PEM roots trusted for `rediss://` servers.
    #[arg(long, env = "SB_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<PathBuf>,
    /// NATS `.creds` file (user JWT and nkey seed).
    #[arg(long, env = "SB_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// PEM roots trusted for `tls://` NATS servers.
    #[arg(long, env = "SB_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Prefix of NATS subjects and Redis keys.
    #[arg(long, env = "SB_PREFIX")]
    pub prefix: Option<String>,
    #[arg(long, env = "SB_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

impl ClusterArgs {
    /// Validates; `default_admin` is the binary's own admin address (gateways and
    /// workers differ, so both run on one host).
    pub fn validate(&self, default_admin: &str) -> Result<Cluster, ConfigError> {
        let admin_listen = parse_addr(
            "SB_ADMIN_LISTEN",
            self.admin_listen.as_deref().unwrap_or(default_admin),
        )?;
        let node_id = self.node_id.clone().unwrap_or_else(default_node_id);
        validate_token("SB_NODE_ID", &node_id)?;
        let prefix = self.prefix.as_deref().unwrap_or(DEFAULT_PREFIX).to_owned();
        validate_token("SB_PREFIX", &prefix)?;
        let nats_url = self
            .nats_url
            .as_deref()
            .unwrap_or(DEFAULT_NATS_URL)
            .to_owned();
        let nats_servers = parse_nats_servers(&nats_url)?;
        let redis_url = self
            .redis_url
            .as_deref()
            .unwrap_or(DEFAULT_REDIS_URL)
            .to_owned();
        let redis_cluster = self.redis_cluster.unwrap_or(false);
        let seeds = parse_list(&redis_url);
        if seeds.is_empty() {
            return Err(ConfigError::invalid("SB_REDIS_URL", "must not be empty"));
        }
        if seeds.len() > 1 && !redis_cluster {
            return Err(ConfigError::invalid(
                "SB_REDIS_URL",
                "a list of servers needs SB_REDIS_CLUSTER=true (a single Redis takes one URL)",
            ));
        }
        let schemes: &[&str] = if redis_cluster {
            &["redis", "rediss"]
        } else {
            &["redis", "rediss", "redis+unix", "unix"]
        };
        for seed in &seeds {
            validate_url("SB_REDIS_URL", seed, schemes)?;
        }
        let security = Security::validate(
            self.nats_creds.as_deref(),
            self.nats_tls_ca.as_deref(),
            self.redis_tls_ca.as_deref(),
        )?;
        Ok(Cluster {
            admin_listen,
            node_id,
            prefix,
            nats_url,
            nats_servers,
            redis_url,
            redis_cluster,
            security,
            log_format: self.log_format.unwrap_or(LogFormat::Json),
        })
    }
}

/// [`ClusterArgs`] validated: where a binary finds NATS and Redis, how it proves
/// itself there, what it is called, and how it logs. Both binaries' `Config` hold it.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// Admin listen address (/healthz, /readyz, /metrics).
    pub admin_listen: SocketAddr,
    pub node_id: String,
    pub prefix: String,
    /// `SB_NATS_URL` as given (for logs and the config summary).
    pub nats_url: String,
    /// `SB_NATS_URL` parsed once: every server of the list, in order.
    pub nats_servers: Vec<async_nats::ServerAddr>,
    pub redis_url: String,
    /// `SB_REDIS_CLUSTER`: `redis_url` lists seed nodes of a Redis Cluster.
    pub redis_cluster: bool,
    /// NATS credentials and the CAs trusted for NATS and Redis TLS.
    pub security: Security,
    pub log_format: LogFormat,
}

impl Cluster {
    /// The store on this cluster's Redis (one server or a Cluster, TLS as
    /// configured, keys under the prefix); connects on first use.
    pub fn redis_store(&self) -> Result<crate::store::RedisStore, redis::RedisError> {
        crate::store::RedisStore::open_tls(
            redis_target(&self.redis_url, self.redis_cluster),
            self.security.redis_tls_ca.clone(),
            crate::keys::Keys::new(&self.prefix),
        )
    }
}

/// Default NATS and Redis (a local install) and prefix.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Prefix of every subject and key: lets several deployments share NATS and Redis.
pub const DEFAULT_PREFIX: &str = "sb";

/// How a binary proves itself to NATS and Redis and whom it trusts there:
/// `SB_NATS_CREDS` (a NATS `.creds` file: user JWT and nkey seed), `SB_NATS_TLS_CA`
/// (PEM roots for `tls://` servers), `SB_REDIS_TLS_CA` (PEM roots for `rediss://`).
/// User names, passwords and tokens travel in the URLs (`nats://user:pass@host`,
/// `nats://token@host`, `redis://user:pass@host`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Security {
    pub nats_creds: Option<PathBuf>,
    pub nats_tls_ca: Option<PathBuf>,
    /// The PEM itself, read at start so a missing file is a config error.
    pub redis_tls_ca: Option<Vec<u8>>,
}

impl Security {
    pub fn validate(
        nats_creds: Option<&Path>,
        nats_tls_ca: Option<&Path>,
        redis_tls_ca: Option<&Path>,
    ) -> Result<Security, ConfigError> {
        let read = |key: &str, p: &Path| {
            std::fs::read(p).map_err(|e| ConfigError::invalid(key, format!("{}: {e}", p.display())))
        };
        let pem = |key: &str, p: &Path| -> Result<Vec<u8>, ConfigError> {
            let bytes = read(key, p)?;
            if !String::from_utf8_lossy(&bytes).contains("-----BEGIN CERTIFICATE-----") {
                return Err(ConfigError::invalid(
                    key,
                    format!("{}: no PEM certificate in it", p.display()),
                ));
            }
            Ok(bytes)
        };
        if let Some(p) = nats_creds {
            let text = String::from_utf8_lossy(&read("SB_NATS_CREDS", p)?).into_owned();
            if !text.contains("BEGIN NATS USER JWT") || !text.contains("BEGIN USER NKEY SEED") {
                return Err(ConfigError::invalid(
                    "SB_NATS_CREDS",
                    format!(
                        "{}: not a NATS .creds file (user JWT and nkey seed)",
                        p.display()
                    ),
                ));
            }
        }
        if let Some(p) = nats_tls_ca {
            pem("SB_NATS_TLS_CA", p)?;
        }
        Ok(Security {
            nats_creds: nats_creds.map(Path::to_path_buf),
            nats_tls_ca: nats_tls_ca.map(Path::to_path_buf),
            redis_tls_ca: redis_tls_ca
                .map(|p| pem("SB_REDIS_TLS_CA", p))
                .transpose()?,
        })
    }
}

/// Where the session store lives: validated `SB_REDIS_URL` and `SB_REDIS_CLUSTER`.
pub fn redis_target(redis_url: &str, cluster: bool) -> crate::store::Target {
    if cluster {
        crate::store::Target::Cluster(parse_list(redis_url))
    } else {
        crate::store::Target::Single(redis_url.trim().to_owned())
    }
}

/// Schemes async-nats speaks; the gateway's own subscription connection speaks only
/// `nats` and falls back to async-nats for the others.
pub const NATS_SCHEMES: &[&str] = &["nats", "tls", "ws", "wss"];

/// Parses `SB_NATS_URL`: one URL or a comma-separated list of them (the seed servers
/// of a NATS cluster; clients fail over between them and learn the rest from the
/// servers). async-nats takes a list only as separate addresses: handed the whole
/// string it refuses the start with "invalid port number".
pub fn parse_nats_servers(s: &str) -> Result<Vec<async_nats::ServerAddr>, ConfigError> {
    const KEY: &str = "SB_NATS_URL";
    let urls = parse_list(s);
    if urls.is_empty() {
        return Err(ConfigError::invalid(KEY, "no server given"));
    }
    urls.iter()
        .map(|url| {
            validate_url(KEY, url, NATS_SCHEMES)?;
            let addr: async_nats::ServerAddr = url
                .parse()
                .map_err(|e| ConfigError::invalid(KEY, format!("{url:?}: {e}")))?;
            if addr.host().is_empty() {
                return Err(ConfigError::invalid(KEY, format!("{url:?} names no host")));
            }
            Ok(addr)
        })
        .collect()
}

/// Splits a comma-separated list, trimming blanks (PROTOCOL.md section 6).
pub fn parse_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Parses a comma-separated CIDR list; a bare address means a single host.
pub fn parse_cidrs(key: &str, s: &str) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    parse_list(s)
        .into_iter()
        .map(|item| {
            item.parse::<ipnet::IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    ConfigError::invalid(key, format!("{item:?} is not a CIDR or address"))
                })
        })
        .collect()
}

pub fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        ConfigError::invalid(key, format!("{s:?} is not host:port (e.g. 0.0.0.0:8080)"))
    })
}

/// Prefixes and node ids end up in NATS subjects and Redis keys: `[A-Za-z0-9_-]{1,64}`.
pub fn validate_token(key: &str, s: &str) -> Result<(), ConfigError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("{s:?} must match [A-Za-z0-9_-]{{1,64}}"),
        ))
    }
}

/// Checks that a URL has one of the expected schemes; the client libraries give poor
/// messages for a wrong one.
pub fn validate_url(key: &str, s: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    match s.split_once("://") {
        Some((scheme, rest)) if schemes.contains(&scheme) && !rest.is_empty() => Ok(()),
        _ => Err(ConfigError::invalid(
            key,
            format!("must be a URL with scheme {}", schemes.join(" or ")),
        )),
    }
}

pub fn positive(key: &str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        Err(ConfigError::invalid(key, "must be greater than 0"))
    } else {
        Ok(v)
    }
}

/// A node id from the host name (pods are named uniquely), made subject-safe.
pub fn default_node_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let cleaned: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    let suffix: u32 = std::process::id();
    if cleaned.is_empty() {
        format!("node-{suffix}")
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    struct Raw {
        a: Option<u32>,
        b: Option<String>,
    }

    #[test]
    fn flags_and_env_override_the_file() {
        let file = Raw {
            a: Some(1),
            b: Some("file".into()),
        };
        let cli = Raw {
            a: None,
            b: Some("cli".into()),
        };
        assert_eq!(
            layer(file, cli),
            Raw {
                a: Some(1),
                b: Some("cli".into())
            }
        );
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("sbcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, "a = 1\nbogus_key = 2\n").unwrap();
        let e = read_file::<Raw>(&p).unwrap_err();
        assert!(e.to_string().contains("bogus_key"), "{e}");
    }

    #[test]
    fn unknown_env_is_refused_by_name() {
        assert!(check_env([("SB_LISTEN", String::new()), ("PATH", String::new())]).is_ok());
        let e = check_env([("SB_JWT_SECRE", String::new())]).unwrap_err();
        assert!(e.to_string().contains("SB_JWT_SECRE"));
    }

    #[test]
    fn lists_and_cidrs() {
        assert_eq!(parse_list(" a, b ,,c"), vec!["a", "b", "c"]);
        let nets = parse_cidrs("K", "10.0.0.0/8, 127.0.0.1,::1").unwrap();
        assert_eq!(nets.len(), 3);
        let e = parse_cidrs("SB_TRUSTED_PROXIES", "10.0.0.0/8,nope").unwrap_err();
        assert!(e.to_string().starts_with("SB_TRUSTED_PROXIES"));
        assert!(validate_token("SB_PREFIX", "a.b").is_err());
        assert!(validate_url("SB_NATS_URL", "nats://x:1", &["nats"]).is_ok());
        assert!(validate_url("SB_NATS_URL", "x:1", &["nats"]).is_err());
    }

    #[test]
    fn nats_url_lists_parse_into_every_server() {
        let s = parse_nats_servers("nats://a:4222, nats://u:p@b:4223,,tls://c").unwrap();
        let hosts: Vec<_> = s.iter().map(|a| (a.host(), a.port())).collect();
        assert_eq!(hosts, vec![("a", 4222), ("b", 4223), ("c", 4222)]);
        assert_eq!((s[1].username(), s[1].password()), (Some("u"), Some("p")));
        assert_eq!(
            parse_nats_servers("nats://[::1]:4222").unwrap()[0].host(),
            "::1"
        );
        for bad in [
            "",
            " , ",
            "nats://a:4222,nats://b:x",
            "http://a:4222",
            "nats://a:4222,b:1",
        ] {
            let e = parse_nats_servers(bad).unwrap_err();
            assert!(e.to_string().starts_with("SB_NATS_URL: "), "{bad:?}: {e}");
        }
        let args = ClusterArgs {
            nats_url: Some("nats://a:1,nats://b:2".into()),
            ..ClusterArgs::default()
        };
        let c = args.validate("127.0.0.1:0").unwrap();
        assert_eq!(c.nats_servers.len(), 2);
        assert_eq!(c.nats_url, "nats://a:1,nats://b:2");
    }
}
