//! Worker configuration: flags with `SB_*` env twins, an optional TOML file, named
//! defaults, and validation that names the key at fault.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};
use shared::config::{self as cfg, ConfigError};
pub use shared::config::{DEFAULT_NATS_URL, DEFAULT_PREFIX, DEFAULT_REDIS_URL};
pub use shared::telemetry::LogFormat;

/// Admin port (health, readiness, metrics): next to the gateway's 9090.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9091";
/// Single-model servers (llama.cpp, vLLM with one model) ignore the name.
pub const DEFAULT_LLM_MODEL: &str = "default";
/// A reachable server accepts TCP (and TLS) well within this, even across regions.
pub const DEFAULT_LLM_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Prompt processing of a long context on a CPU server takes tens of seconds.
pub const DEFAULT_LLM_FIRST_TOKEN_TIMEOUT_MS: u64 = 60_000;
/// Once tokens flow they come many times a second; a 30 s silence is a stall.
pub const DEFAULT_LLM_IDLE_TIMEOUT_MS: u64 = 30_000;
/// A 2,000-token reply at 10 tokens/s plus prompt processing fits in 5 minutes.
pub const DEFAULT_LLM_TOTAL_TIMEOUT_MS: u64 = 300_000;
/// One try plus two retries, like the OpenAI SDKs (`DEFAULT_MAX_RETRIES = 2`).
pub const DEFAULT_LLM_MAX_ATTEMPTS: u32 = 3;
/// First retry after about half a second (OpenAI SDK's 0.5 s).
pub const DEFAULT_LLM_BACKOFF_BASE_MS: u64 = 500;
/// Retries never wait longer than this without a `Retry-After` (OpenAI SDK's 8 s).
pub const DEFAULT_LLM_BACKOFF_MAX_MS: u64 = 8_000;
/// Under the gateway's 2 s user-context RPC timeout, so even a slow backend's
/// fallback reply arrives in time.
pub const DEFAULT_BACKEND_TIMEOUT_MS: u64 = 1_500;
/// Consecutive failed backend calls before the breaker opens: rides out a blip.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
/// Time the breaker stays open before one probe call: a restarting backend is back.
pub const DEFAULT_BREAKER_COOLDOWN_MS: u64 = 10_000;
/// User-context RPCs handled at once: each is two short HTTP calls.
pub const DEFAULT_CONTEXT_MAX_IN_FLIGHT: usize = 128;
/// Chat requests streamed at once per worker (README, "Configuration": default 64).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// Messages of history loaded per request: the session's message window, 100
/// (docs/DESIGN.md#redis-keys).
pub const DEFAULT_HISTORY_WINDOW: usize = shared::store::DEFAULT_HISTORY_WINDOW;
/// Estimated prompt tokens (chars / 4) the history may use (README, "Configuration":
/// default 32,000).
pub const DEFAULT_TOKEN_BUDGET: usize = 32_000;
/// Redelivery after a worker died: progress acks keep live streams well inside it.
pub const DEFAULT_ACK_WAIT_SECS: u64 = 30;
/// Deliveries of one request before the user gets a final error: a request that
/// killed or failed five workers is poison.
pub const DEFAULT_MAX_DELIVER: i64 = 5;
/// Under Kubernetes' default 30 s termination grace period.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 25;
/// Chunks coalesced about every 20 ms (docs/DESIGN.md#chat-request-end-to-end).
pub const DEFAULT_CHUNK_INTERVAL_MS: u64 = 20;
/// Or every 64 characters, whichever comes first (docs/DESIGN.md#chat-request-end-to-end).
pub const DEFAULT_CHUNK_CHARS: usize = 64;
/// Attachments per request: a handful of documents per question.
pub const DEFAULT_MAX_FILES: usize = 5;
/// 1 MiB of decoded attachments per request, as the gateway allows (docs/PROTOCOL.md,
/// "Chat in detail").
pub const DEFAULT_MAX_FILES_BYTES: usize = 1024 * 1024;
/// Characters of attachment text per request, all files together: about 16,000
/// tokens (chars / 4), half the default token budget, so one message cannot crowd
/// out the conversation or blow up the LLM request (a 1.6 KB PDF held 1 MB of text).
pub const DEFAULT_MAX_FILES_TEXT_CHARS: usize = 64_000;
/// One JetStream replica: a single NATS server; production clusters set 3.
pub const DEFAULT_JETSTREAM_REPLICAS: usize = 1;
/// Largest accepted `SB_MAX_IN_FLIGHT`: one pull batch and one semaphore.
pub const MAX_IN_FLIGHT_LIMIT: usize = 10_000;

/// Which streaming dialect the LLM speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LlmProtocol {
    /// OpenAI-compatible `POST {base}/chat/completions`, Server-Sent Events.
    #[default]
    Openai,
    /// Ollama's native `POST {base}/api/chat`, NDJSON.
    Ollama,
}

/// Settings as given (flags, env, file); every field optional so layers can merge.
#[derive(Debug, Default, Clone, Parser, Serialize, Deserialize)]
#[command(name = "worker", version, about = "Switchboard chat worker")]
pub struct RawConfig {
    /// TOML config file (keys are the flag names with `_`).
    #[arg(long, env = "SB_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print a summary (no secrets) and exit.
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,

    /// Node, NATS, Redis, TLS, prefix and log settings (shared with the other binary).
    #[command(flatten)]
    #[serde(flatten)]
    pub cluster: cfg::ClusterArgs,

    /// LLM base URL with the version path for OpenAI (`http://host:8000/v1`), the
    /// server root for Ollama (`http://host:11434`).
    #[arg(long, env = "SB_LLM_BASE_URL")]
    pub llm_base_url: Option<String>,
    /// Bearer key for the LLM (optional).
    #[arg(long, env = "SB_LLM_API_KEY", hide_env_values = true)]
    pub llm_api_key: Option<String>,
    #[arg(long, env = "SB_LLM_MODEL")]
    pub llm_model: Option<String>,
    /// System prompt put first in every conversation (optional).
    #[arg(long, env = "SB_LLM_SYSTEM_PROMPT")]
    pub llm_system_prompt: Option<String>,
    /// openai (SSE) or ollama (native NDJSON).
    #[arg(long, env = "SB_LLM_PROTOCOL")]
    pub llm_protocol: Option<LlmProtocol>,
    /// Upper bound on generated tokens, sent as `max_tokens` / `num_predict` (optional).
    #[arg(long, env = "SB_LLM_MAX_TOKENS")]
    pub llm_max_tokens: Option<u32>,
    #[arg(long, env = "SB_LLM_CONNECT_TIMEOUT_MS")]
    pub llm_connect_timeout_ms: Option<u64>,
    /// From sending the request to the first generated text (pings do not count).
    #[arg(long, env = "SB_LLM_FIRST_TOKEN_TIMEOUT_MS")]
    pub llm_first_token_timeout_ms: Option<u64>,
    /// Longest silence (no byte at all) once text flows.
    #[arg(long, env = "SB_LLM_IDLE_TIMEOUT_MS")]
    pub llm_idle_timeout_ms: Option<u64>,
    /// Whole request including retries.
    #[arg(long, env = "SB_LLM_TOTAL_TIMEOUT_MS")]
    pub llm_total_timeout_ms: Option<u64>,
    /// Attempts before the first token (429, 5xx, connection errors), 1 = no retry.
    #[arg(long, env = "SB_LLM_MAX_ATTEMPTS")]
    pub llm_max_attempts: Option<u32>,
    #[arg(long, env = "SB_LLM_BACKOFF_BASE_MS")]
    pub llm_backoff_base_ms: Option<u64>,
    #[arg(long, env = "SB_LLM_BACKOFF_MAX_MS")]
    pub llm_backoff_max_ms: Option<u64>,

    /// Team backend base URL (`GET /api/users/{id}/teams|tasks`); unset = no teams.
    #[arg(long, env = "SB_BACKEND_URL")]
    pub backend_url: Option<String>,
    /// Service token for the backend; unset = forward the user's token.
    #[arg(long, env = "SB_BACKEND_TOKEN", hide_env_values = true)]
    pub backend_token: Option<String>,
    #[arg(long, env = "SB_BACKEND_TIMEOUT_MS")]
    pub backend_timeout_ms: Option<u64>,
    /// Consecutive backend failures that open the circuit breaker.
    #[arg(long, env = "SB_BREAKER_FAILURES")]
    pub breaker_failures: Option<u32>,
    /// Open-breaker time before a half-open probe.
    #[arg(long, env = "SB_BREAKER_COOLDOWN_MS")]
    pub breaker_cooldown_ms: Option<u64>,
    /// User-context RPCs handled concurrently.
    #[arg(long, env = "SB_CONTEXT_MAX_IN_FLIGHT")]
    pub context_max_in_flight: Option<usize>,

    /// Chat requests streamed concurrently.
    #[arg(long, env = "SB_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// History messages loaded per request.
    #[arg(long, env = "SB_HISTORY_WINDOW")]
    pub history_window: Option<usize>,
    /// Estimated tokens (chars / 4) of history sent to the LLM; oldest dropped first.
    #[arg(long, env = "SB_TOKEN_BUDGET")]
    pub token_budget: Option<usize>,
    #[arg(long, env = "SB_ACK_WAIT_SECS")]
    pub ack_wait_secs: Option<u64>,
    /// Deliveries of a request before the user gets a final `chat.error`.
    #[arg(long, env = "SB_MAX_DELIVER")]
    pub max_deliver: Option<i64>,
    /// Time in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "SB_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    #[arg(long, env = "SB_CHUNK_INTERVAL_MS")]
    pub chunk_interval_ms: Option<u64>,
    #[arg(long, env = "SB_CHUNK_CHARS")]
    pub chunk_chars: Option<usize>,
    /// Attachments per request.
    #[arg(long, env = "SB_MAX_FILES")]
    pub max_files: Option<usize>,
    /// Decoded attachment bytes per request, all files together.
    #[arg(long, env = "SB_MAX_FILES_BYTES")]
    pub max_files_bytes: Option<usize>,
    #[arg(long, env = "SB_JETSTREAM_REPLICAS")]
    pub jetstream_replicas: Option<usize>,
}

/// LLM client settings. `Debug` leaves the API key out.
#[derive(Clone)]
pub struct LlmSettings {
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: String,
    pub system_prompt: Option<String>,
    pub protocol: LlmProtocol,
    pub max_tokens: Option<u32>,
    pub connect_timeout: Duration,
    pub first_token_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_timeout: Duration,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// Team backend settings. `Debug` leaves the token out.
#[derive(Clone)]
pub struct BackendSettings {
    /// `None`: no backend; users have no teams or tasks (not degraded).
    pub url: Option<String>,
    pub token: Option<String>,
    pub timeout: Duration,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub max_in_flight: usize,
}

impl std::fmt::Debug for LlmSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmSettings")
            .field("base_url", &self.base_url)
            .field("api_key_set", &self.api_key.is_some())
            .field("model", &self.model)
            .field("protocol", &self.protocol)
            .field("max_tokens", &self.max_tokens)
            .field("connect_timeout", &self.connect_timeout)
            .field("first_token_timeout", &self.first_token_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("total_timeout", &self.total_timeout)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for BackendSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendSettings")
            .field("url", &self.url)
            .field("token_set", &self.token.is_some())
            .field("timeout", &self.timeout)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

/// Attachment limits.
#[derive(Debug, Clone, Copy)]
pub struct FileLimits {
    pub max_files: usize,
    pub max_total_bytes: usize,
    /// Characters of text from all files together that reach the prompt.
    pub max_text_chars: usize,
}

/// Validated worker configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Node, NATS, Redis, TLS, prefix and log settings (`shared::config::Cluster`).
    pub cluster: cfg::Cluster,
    pub llm: LlmSettings,
    pub backend: BackendSettings,
    pub max_in_flight: usize,
    pub history_window: usize,
    pub token_budget: usize,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub shutdown_grace: Duration,
    pub chunk_interval: Duration,
    pub chunk_chars: usize,
    pub files: FileLimits,
    pub jetstream_replicas: usize,
    /// The program run (with `pdf::EXTRACTOR_ARG`) to read PDFs: this binary,
    /// found at validation. Not a setting (an operator has no reason to run another
    /// program on hostile files); in-process tests point it at the built worker.
    /// `None`: the binary could not be found, and PDFs are refused as unavailable.
    pub pdf_extractor: Option<PathBuf>,
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
        let cluster = self.cluster.validate(DEFAULT_ADMIN_LISTEN)?;

        let max_in_flight = self.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
        if !(1..=MAX_IN_FLIGHT_LIMIT).contains(&max_in_flight) {
            return Err(ConfigError::invalid(
                "SB_MAX_IN_FLIGHT",
                format!("must be between 1 and {MAX_IN_FLIGHT_LIMIT}"),
            ));
        }
        let history_window = self.history_window.unwrap_or(DEFAULT_HISTORY_WINDOW);
        cfg::positive("SB_HISTORY_WINDOW", history_window as u64)?;
        let token_budget = self.token_budget.unwrap_or(DEFAULT_TOKEN_BUDGET);
        cfg::positive("SB_TOKEN_BUDGET", token_budget as u64)?;
        let ack_wait = cfg::positive(
            "SB_ACK_WAIT_SECS",
            self.ack_wait_secs.unwrap_or(DEFAULT_ACK_WAIT_SECS),
        )?;
        let max_deliver = self.max_deliver.unwrap_or(DEFAULT_MAX_DELIVER);
        if max_deliver < 1 {
            return Err(ConfigError::invalid("SB_MAX_DELIVER", "must be at least 1"));
        }
        let chunk_interval = cfg::positive(
            "SB_CHUNK_INTERVAL_MS",
            self.chunk_interval_ms.unwrap_or(DEFAULT_CHUNK_INTERVAL_MS),
        )?;
        let chunk_chars = self.chunk_chars.unwrap_or(DEFAULT_CHUNK_CHARS);
        cfg::positive("SB_CHUNK_CHARS", chunk_chars as u64)?;
        let jetstream_replicas = self
            .jetstream_replicas
            .unwrap_or(DEFAULT_JETSTREAM_REPLICAS);
        if !(1..=5).contains(&jetstream_replicas) {
            return Err(ConfigError::invalid(
                "SB_JETSTREAM_REPLICAS",
                "must be between 1 and 5",
            ));
        }

        Ok(Config {
            cluster,
            llm: self.llm()?,
            backend: self.backend()?,
            max_in_flight,
            history_window,
            token_budget,
            ack_wait: Duration::from_secs(ack_wait),
            max_deliver,
            shutdown_grace: Duration::from_secs(
                self.shutdown_grace_secs
                    .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECS),
            ),
            chunk_interval: Duration::from_millis(chunk_interval),
            chunk_chars,
            files: FileLimits {
                max_files: self.max_files.unwrap_or(DEFAULT_MAX_FILES),
                max_total_bytes: self.max_files_bytes.unwrap_or(DEFAULT_MAX_FILES_BYTES),
                max_text_chars: DEFAULT_MAX_FILES_TEXT_CHARS,
            },
            jetstream_replicas,
            pdf_extractor: std::env::current_exe().ok(),
        })
    }

    fn llm(&self) -> Result<LlmSettings, ConfigError> {
        let base_url = self
            .llm_base_url
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| ConfigError::Missing {
                key: "SB_LLM_BASE_URL".into(),
            })?;
        cfg::validate_url("SB_LLM_BASE_URL", &base_url, &["http", "https"])?;
        let base_url = base_url.trim_end_matches('/').to_owned();
        if reqwest::Url::parse(&base_url).is_err() {
            return Err(ConfigError::invalid(
                "SB_LLM_BASE_URL",
                "is not a valid URL",
            ));
        }
        let ms = |key: &str, v: Option<u64>, default: u64| -> Result<Duration, ConfigError> {
            Ok(Duration::from_millis(cfg::positive(
                key,
                v.unwrap_or(default),
            )?))
        };
        let first_token_timeout = ms(
            "SB_LLM_FIRST_TOKEN_TIMEOUT_MS",
            self.llm_first_token_timeout_ms,
            DEFAULT_LLM_FIRST_TOKEN_TIMEOUT_MS,
        )?;
        let total_timeout = ms(
            "SB_LLM_TOTAL_TIMEOUT_MS",
            self.llm_total_timeout_ms,
            DEFAULT_LLM_TOTAL_TIMEOUT_MS,
        )?;
        if total_timeout < first_token_timeout {
            return Err(ConfigError::invalid(
                "SB_LLM_TOTAL_TIMEOUT_MS",
                format!(
                    "must be at least SB_LLM_FIRST_TOKEN_TIMEOUT_MS ({})",
                    first_token_timeout.as_millis()
                ),
            ));
        }
        let backoff_base = ms(
            "SB_LLM_BACKOFF_BASE_MS",
            self.llm_backoff_base_ms,
            DEFAULT_LLM_BACKOFF_BASE_MS,
        )?;
        let backoff_max = ms(
            "SB_LLM_BACKOFF_MAX_MS",
            self.llm_backoff_max_ms,
            DEFAULT_LLM_BACKOFF_MAX_MS,
        )?;
        if backoff_max < backoff_base {
            return Err(ConfigError::invalid(
                "SB_LLM_BACKOFF_MAX_MS",
                "must be at least SB_LLM_BACKOFF_BASE_MS",
            ));
        }
        let max_attempts = self.llm_max_attempts.unwrap_or(DEFAULT_LLM_MAX_ATTEMPTS);
        if !(1..=10).contains(&max_attempts) {
            return Err(ConfigError::invalid(
                "SB_LLM_MAX_ATTEMPTS",
                "must be between 1 and 10",
            ));
        }
        let model = self
            .llm_model
            .clone()
            .unwrap_or_else(|| DEFAULT_LLM_MODEL.into());
        if model.is_empty() {
            return Err(ConfigError::invalid("SB_LLM_MODEL", "must not be empty"));
        }
        if self.llm_max_tokens == Some(0) {
            return Err(ConfigError::invalid(
                "SB_LLM_MAX_TOKENS",
                "must be greater than 0",
            ));
        }
        Ok(LlmSettings {
            base_url,
            api_key: self.llm_api_key.clone().filter(|k| !k.is_empty()),
            model,
            system_prompt: self.llm_system_prompt.clone().filter(|p| !p.is_empty()),
            protocol: self.llm_protocol.unwrap_or_default(),
            max_tokens: self.llm_max_tokens,
            connect_timeout: ms(
                "SB_LLM_CONNECT_TIMEOUT_MS",
                self.llm_connect_timeout_ms,
                DEFAULT_LLM_CONNECT_TIMEOUT_MS,
            )?,
            first_token_timeout,
            idle_timeout: ms(
                "SB_LLM_IDLE_TIMEOUT_MS",
                self.llm_idle_timeout_ms,
                DEFAULT_LLM_IDLE_TIMEOUT_MS,
            )?,
            total_timeout,
            max_attempts,
            backoff_base,
            backoff_max,
        })
    }

    fn backend(&self) -> Result<BackendSettings, ConfigError> {
        let url = match self.backend_url.clone().filter(|u| !u.is_empty()) {
            Some(u) => {
                cfg::validate_url("SB_BACKEND_URL", &u, &["http", "https"])?;
                if reqwest::Url::parse(&u).is_err() {
                    return Err(ConfigError::invalid("SB_BACKEND_URL", "is not a valid URL"));
                }
                Some(u.trim_end_matches('/').to_owned())
            }
            None => None,
        };
        let breaker_failures = self.breaker_failures.unwrap_or(DEFAULT_BREAKER_FAILURES);
        cfg::positive("SB_BREAKER_FAILURES", breaker_failures.into())?;
        let max_in_flight = self
            .context_max_in_flight
            .unwrap_or(DEFAULT_CONTEXT_MAX_IN_FLIGHT);
        if !(1..=MAX_IN_FLIGHT_LIMIT).contains(&max_in_flight) {
            return Err(ConfigError::invalid(
                "SB_CONTEXT_MAX_IN_FLIGHT",
                format!("must be between 1 and {MAX_IN_FLIGHT_LIMIT}"),
            ));
        }
        Ok(BackendSettings {
            url,
            token: self.backend_token.clone().filter(|t| !t.is_empty()),
            timeout: Duration::from_millis(cfg::positive(
                "SB_BACKEND_TIMEOUT_MS",
                self.backend_timeout_ms
                    .unwrap_or(DEFAULT_BACKEND_TIMEOUT_MS),
            )?),
            breaker_failures,
            breaker_cooldown: Duration::from_millis(cfg::positive(
                "SB_BREAKER_COOLDOWN_MS",
                self.breaker_cooldown_ms
                    .unwrap_or(DEFAULT_BREAKER_COOLDOWN_MS),
            )?),
            max_in_flight,
        })
    }
}

impl Config {
    /// A summary for `--check-config` and the start-up log; never includes secrets.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "admin_listen": self.cluster.admin_listen.to_string(),
            "node_id": self.cluster.node_id,
            "prefix": self.cluster.prefix,
            "redis_cluster": self.cluster.redis_cluster,
            "llm_base_url": self.llm.base_url,
            "llm_protocol": self.llm.protocol,
            "llm_model": self.llm.model,
            "llm_api_key_set": self.llm.api_key.is_some(),
            "llm_system_prompt_set": self.llm.system_prompt.is_some(),
            "llm_max_attempts": self.llm.max_attempts,
            "backend_url": self.backend.url,
            "backend_token_set": self.backend.token.is_some(),
            "max_in_flight": self.max_in_flight,
            "history_window": self.history_window,
            "token_budget": self.token_budget,
            "ack_wait_secs": self.ack_wait.as_secs(),
            "max_deliver": self.max_deliver,
            "shutdown_grace_secs": self.shutdown_grace.as_secs(),
            "max_files": self.files.max_files,
            "max_files_bytes": self.files.max_total_bytes,
            "max_files_text_chars": self.files.max_text_chars,
            "jetstream_replicas": self.jetstream_replicas,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["worker", "--llm-base-url", "http://127.0.0.1:8000/v1"];
        v.extend_from_slice(args);
        RawConfig::try_parse_from(v).unwrap().validate()
    }

    #[test]
    fn defaults_are_valid() {
        let c = raw(&[]).unwrap();
        assert_eq!(c.cluster.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(c.max_in_flight, 64);
        assert_eq!(c.history_window, 100);
        assert_eq!(c.token_budget, 32_000);
        assert_eq!(c.chunk_chars, 64);
        assert_eq!(c.chunk_interval, Duration::from_millis(20));
        assert_eq!(c.files.max_total_bytes, 1024 * 1024);
        assert_eq!(c.llm.protocol, LlmProtocol::Openai);
        assert_eq!(c.llm.base_url, "http://127.0.0.1:8000/v1");
        assert!(c.backend.url.is_none());
    }

    #[test]
    fn errors_name_the_key() {
        let e = RawConfig::try_parse_from(["worker"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().starts_with("SB_LLM_BASE_URL"), "{e}");
        for (args, key) in [
            (&["--max-in-flight", "0"][..], "SB_MAX_IN_FLIGHT"),
            (&["--token-budget", "0"][..], "SB_TOKEN_BUDGET"),
            (&["--ack-wait-secs", "0"][..], "SB_ACK_WAIT_SECS"),
            (&["--max-deliver", "0"][..], "SB_MAX_DELIVER"),
            (&["--llm-max-attempts", "0"][..], "SB_LLM_MAX_ATTEMPTS"),
            (&["--backend-url", "ftp://x"][..], "SB_BACKEND_URL"),
            (&["--prefix", "a.b"][..], "SB_PREFIX"),
            (
                &[
                    "--llm-first-token-timeout-ms",
                    "10",
                    "--llm-total-timeout-ms",
                    "5",
                ][..],
                "SB_LLM_TOTAL_TIMEOUT_MS",
            ),
        ] {
            let e = raw(args).unwrap_err();
            assert!(e.to_string().starts_with(key), "{args:?}: {e}");
        }
        let e = RawConfig::try_parse_from(["worker", "--llm-base-url", "localhost:1"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().starts_with("SB_LLM_BASE_URL"), "{e}");
    }

    #[test]
    fn debug_output_has_no_secrets() {
        let c = raw(&[
            "--llm-api-key",
            "sk-secret-1",
            "--backend-token",
            "bt-secret-2",
        ])
        .unwrap();
        let d = format!("{c:?}");
        assert!(
            !d.contains("sk-secret-1") && !d.contains("bt-secret-2"),
            "{d}"
        );
    }

    #[test]
    fn protocol_parses() {
        let c = raw(&["--llm-protocol", "ollama"]).unwrap();
        assert_eq!(c.llm.protocol, LlmProtocol::Ollama);
        assert!(RawConfig::try_parse_from(["worker", "--llm-protocol", "grpc"]).is_err());
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
