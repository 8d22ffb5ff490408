//! Stand-in backend configuration: flags (the secret also from `SB_JWT_SECRET`, the
//! gateways' variable), named defaults, and validation that names the flag at fault.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use shared::auth::{JwtAlgorithm, JwtSettings, KeyError, KeySource, Validator};
pub use shared::telemetry::LogFormat;

/// The local cluster's backend port, on loopback: a demo server is never public.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:18091";
/// Three minutes: short enough that a demo session sees `token_expiring` and a
/// refresh (the gateway warns 60 s before `exp`), long enough to type a message.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 180;
/// A day: a demo token that outlives that defeats the point of short expiry.
pub const MAX_TOKEN_TTL_SECS: u64 = 86_400;
/// Relative to the working directory: the scripts run from the repository root.
pub const DEFAULT_STATIC_DIR: &str = "clients";

/// Command line of `demo-backend`.
#[derive(Debug, Parser)]
#[command(
    name = "demo-backend",
    version,
    about = "STAND-IN for the customer's team backend: demo logins, teams, tasks and the demo page (not part of the product)"
)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// HS256 secret shared with the gateways (at least 32 bytes). Prefer the env
    /// variable: a flag is visible in the process list.
    #[arg(long, env = "SB_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Lifetime of the tokens `POST /api/auth/login` issues, seconds.
    #[arg(long, default_value_t = DEFAULT_TOKEN_TTL_SECS)]
    pub token_ttl_secs: u64,
    /// Directory holding `demo/` (the demo page) and `js/` (the client library).
    #[arg(long, default_value = DEFAULT_STATIC_DIR)]
    pub static_dir: PathBuf,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Why the command line cannot be used; each names its flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--listen {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("--jwt-secret (or SB_JWT_SECRET): required, the gateways' HS256 secret")]
    MissingSecret,
    #[error("--jwt-secret (or SB_JWT_SECRET): {0}")]
    Secret(#[from] KeyError),
    #[error("--token-ttl-secs: must be between 1 and {MAX_TOKEN_TTL_SECS}")]
    TokenTtl,
    #[error("--static-dir {0}: exists but is not a directory")]
    StaticDir(String),
}

/// Validated configuration. `Debug` leaves the secret out.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub secret: Vec<u8>,
    pub token_ttl: Duration,
    pub static_dir: PathBuf,
    pub log_format: LogFormat,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("secret_bytes", &self.secret.len())
            .field("token_ttl", &self.token_ttl)
            .field("static_dir", &self.static_dir)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Verification settings for tokens signed with this secret: the gateway's rules
    /// (HS256, default leeway and size cap).
    pub fn jwt_settings(&self) -> JwtSettings {
        JwtSettings::new(JwtAlgorithm::Hs256, KeySource::Secret(self.secret.clone()))
    }
}

impl Args {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let listen = self
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| ConfigError::Listen {
                addr: self.listen.clone(),
                message: e.to_string(),
            })?;
        let secret = self
            .jwt_secret
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or(ConfigError::MissingSecret)?
            .as_bytes()
            .to_vec();
        if !(1..=MAX_TOKEN_TTL_SECS).contains(&self.token_ttl_secs) {
            return Err(ConfigError::TokenTtl);
        }
        if self.static_dir.exists() && !self.static_dir.is_dir() {
            return Err(ConfigError::StaticDir(
                self.static_dir.display().to_string(),
            ));
        }
        let config = Config {
            listen,
            secret,
            token_ttl: Duration::from_secs(self.token_ttl_secs),
            static_dir: self.static_dir.clone(),
            log_format: self.log_format,
        };
        // The gateway's own key checks (length, emptiness), so a secret accepted here
        // is one the gateways accept too.
        Validator::new(&config.jwt_settings())?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(secret: Option<&str>) -> Args {
        Args {
            listen: DEFAULT_LISTEN.into(),
            jwt_secret: secret.map(str::to_owned),
            token_ttl_secs: DEFAULT_TOKEN_TTL_SECS,
            static_dir: PathBuf::from("does-not-exist"),
            log_format: LogFormat::Text,
        }
    }

    #[test]
    fn secret_follows_the_gateway_rule() {
        assert!(matches!(
            args(None).validate(),
            Err(ConfigError::MissingSecret)
        ));
        assert!(matches!(
            args(Some("short")).validate(),
            Err(ConfigError::Secret(KeyError::SecretTooShort { .. }))
        ));
        let c = args(Some("0123456789abcdef0123456789abcdef"))
            .validate()
            .unwrap();
        assert_eq!(c.token_ttl, Duration::from_secs(180));
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn bad_flags_are_named() {
        let mut a = args(Some("0123456789abcdef0123456789abcdef"));
        a.token_ttl_secs = 0;
        assert!(
            a.validate()
                .unwrap_err()
                .to_string()
                .contains("--token-ttl-secs")
        );
        a.token_ttl_secs = 60;
        a.listen = "nowhere".into();
        assert!(a.validate().unwrap_err().to_string().contains("--listen"));
        a.listen = DEFAULT_LISTEN.into();
        a.static_dir = PathBuf::from("Cargo.toml");
        assert!(
            a.validate()
                .unwrap_err()
                .to_string()
                .contains("--static-dir")
        );
    }
}
