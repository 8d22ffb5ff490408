//! How every binary reaches NATS: the servers of `SB_NATS_URL`, its credentials (a
//! `.creds` file, or a user and password or a token in the URL) and TLS (`tls://`
//! servers, a CA). async-nats reads no credentials from URLs, so they are taken out
//! of the first URL that has any and given to it as options. [`connect`] is the
//! connection both binaries make: reconnecting forever, with one set of timeouts.

use std::time::Duration;

use async_nats::{ConnectOptions, ServerAddr};

use crate::config::Security;

/// NATS connect attempt timeout; reconnects go on forever in the background.
pub const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// NATS keepalive: detects a dead server within two intervals.
pub const NATS_PING_INTERVAL: Duration = Duration::from_secs(10);
/// Messages buffered per subscription before the client drops (and reports) them:
/// far above what a gateway's per-user subjects or a worker's RPCs and pull batches
/// hold between polls.
pub const NATS_SUBSCRIPTION_CAPACITY: usize = 4096;
/// Pending NATS commands before publishers wait: async-nats queues outbound commands
/// up to this bound (its default is 2048), see docs/DESIGN.md#crate-pins-and-traps.
pub const NATS_CLIENT_CAPACITY: usize = 8192;

/// Why the NATS options could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NatsSetupError {
    #[error("SB_NATS_CREDS: {0}")]
    Creds(std::io::Error),
}

/// Why a binary could not connect to NATS.
#[derive(Debug, thiserror::Error)]
pub enum NatsStartError {
    #[error("SB_NATS_URL: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("{0}")]
    Setup(#[from] NatsSetupError),
}

/// Connects as `name` with the shared timeouts and capacities, retrying the first
/// connection and every reconnect forever (readiness reports the outage meanwhile).
/// `tune` adds what only one binary sets (a request timeout, an event callback).
pub async fn connect(
    name: String,
    servers: &[ServerAddr],
    security: &Security,
    tune: impl FnOnce(ConnectOptions) -> ConnectOptions,
) -> Result<async_nats::Client, NatsStartError> {
    let options = tune(connect_options(name, servers, security).await?)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(NATS_CONNECT_TIMEOUT)
        .ping_interval(NATS_PING_INTERVAL)
        .subscription_capacity(NATS_SUBSCRIPTION_CAPACITY)
        .client_capacity(NATS_CLIENT_CAPACITY);
    Ok(options.connect(servers.to_vec()).await?)
}

/// Options with the connection's name, credentials and TLS set; callers add their
/// timeouts and capacities.
pub async fn connect_options(
    name: String,
    servers: &[ServerAddr],
    security: &Security,
) -> Result<ConnectOptions, NatsSetupError> {
    let mut options = match &security.nats_creds {
        Some(path) => ConnectOptions::with_credentials_file(path.clone())
            .await
            .map_err(NatsSetupError::Creds)?,
        None => ConnectOptions::new(),
    };
    options = options.name(name);
    if security.nats_creds.is_none()
        && let Some(auth) = url_auth(servers)
    {
        options = match auth {
            UrlAuth::UserPassword(user, pass) => options.user_and_password(user, pass),
            UrlAuth::Token(token) => options.token(token),
        };
    }
    if servers.iter().any(|s| s.tls_required()) {
        options = options.require_tls(true);
    }
    if let Some(ca) = &security.nats_tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    Ok(options)
}

/// Credentials written into a server URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlAuth {
    UserPassword(String, String),
    /// `nats://<token>@host`: a user without a password is a token, as NATS clients
    /// read it.
    Token(String),
}

/// The credentials of the first URL that has any.
pub fn url_auth(servers: &[ServerAddr]) -> Option<UrlAuth> {
    servers
        .iter()
        .find_map(|s| match (s.username(), s.password()) {
            (Some(u), Some(p)) => Some(UrlAuth::UserPassword(u.to_owned(), p.to_owned())),
            (Some(t), None) => Some(UrlAuth::Token(t.to_owned())),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(s: &str) -> Vec<ServerAddr> {
        crate::config::parse_nats_servers(s).unwrap()
    }

    #[test]
    fn credentials_come_from_the_first_url_that_has_them() {
        assert_eq!(url_auth(&servers("nats://a:1,nats://b:2")), None);
        assert_eq!(
            url_auth(&servers("nats://a:1,nats://gw:s3cret@b:2")),
            Some(UrlAuth::UserPassword("gw".into(), "s3cret".into()))
        );
        assert_eq!(
            url_auth(&servers("tls://tok@a:1")),
            Some(UrlAuth::Token("tok".into()))
        );
    }
}
