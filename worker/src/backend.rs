//! The team backend client: `GET {base}/api/users/{id}/teams` and `/tasks`, each a
//! JSON array of objects with at least `id`. Authenticates with the configured
//! service token, else with the user's own token. Never logs a token.

use std::fmt;
use std::time::Duration;

use serde_json::Value;
use shared::protocol::ContextItem;
use tokio::time::{Instant, timeout_at};

use crate::config::BackendSettings;

/// A backend list larger than this is refused: a user's teams and tasks are small.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Idle connections to the backend are kept this long.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Which list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Teams,
    Tasks,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Teams => "teams",
            Endpoint::Tasks => "tasks",
        }
    }
}

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend unreachable: {0}")]
    Connect(String),
    #[error("backend did not answer within {0:?}")]
    Timeout(Duration),
    #[error("backend answered HTTP {0}")]
    Status(u16),
    #[error("backend sent an invalid body: {0}")]
    Invalid(String),
}

impl BackendError {
    /// Metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Connect(_) => "error",
            BackendError::Timeout(_) => "timeout",
            BackendError::Status(_) => "status",
            BackendError::Invalid(_) => "invalid",
        }
    }

    /// Whether this says the backend is unhealthy (counts for the breaker). A 4xx is
    /// about this user or token, not about the backend's health.
    pub fn is_outage(&self) -> bool {
        !matches!(self, BackendError::Status(c) if (400..500).contains(c) && *c != 429)
    }
}

/// Client for one backend; cheap to clone.
#[derive(Clone)]
pub struct BackendClient {
    http: reqwest::Client,
    base: reqwest::Url,
    token: Option<String>,
    timeout: Duration,
}

impl fmt::Debug for BackendClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendClient")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl BackendClient {
    /// `None` when no backend is configured.
    pub fn new(settings: &BackendSettings) -> Result<Option<BackendClient>, String> {
        let Some(url) = &settings.url else {
            return Ok(None);
        };
        let base = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
        if base.cannot_be_a_base() {
            return Err(format!("{url} cannot be a base URL"));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(settings.timeout)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Some(BackendClient {
            http,
            base,
            token: settings.token.clone(),
            timeout: settings.timeout,
        }))
    }

    /// `{base}/api/users/{user_id}/{teams|tasks}`, the user id percent-encoded.
    pub fn url(&self, user_id: &str, endpoint: Endpoint) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty()
                .extend(["api", "users", user_id, endpoint.as_str()]);
        }
        url
    }

    /// Fetches one list. Items that are not objects with an `id` are dropped.
    pub async fn list(
        &self,
        user_id: &str,
        user_token: &str,
        endpoint: Endpoint,
    ) -> Result<Vec<ContextItem>, BackendError> {
        let deadline = Instant::now() + self.timeout;
        let token = self.token.as_deref().unwrap_or(user_token);
        let mut req = self
            .http
            .get(self.url(user_id, endpoint))
            .header(reqwest::header::ACCEPT, "application/json");
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        let r = self.fetch(req, deadline).await;
        let label = match &r {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        metrics::counter!(shared::metrics::WORKER_BACKEND_CALLS,
            "endpoint" => endpoint.as_str(), "result" => label)
        .increment(1);
        parse_list(&r?, endpoint)
    }

    async fn fetch(
        &self,
        req: reqwest::RequestBuilder,
        deadline: Instant,
    ) -> Result<Vec<u8>, BackendError> {
        let mut resp = match timeout_at(deadline, req.send()).await {
            Err(_) => return Err(BackendError::Timeout(self.timeout)),
            Ok(Err(e)) => return Err(BackendError::Connect(e.to_string())),
            Ok(Ok(r)) => r,
        };
        if !resp.status().is_success() {
            return Err(BackendError::Status(resp.status().as_u16()));
        }
        let mut body = Vec::new();
        loop {
            match timeout_at(deadline, resp.chunk()).await {
                Err(_) => return Err(BackendError::Timeout(self.timeout)),
                Ok(Err(e)) => return Err(BackendError::Connect(e.to_string())),
                Ok(Ok(None)) => return Ok(body),
                Ok(Ok(Some(b))) => {
                    if body.len() + b.len() > MAX_BODY_BYTES {
                        return Err(BackendError::Invalid("body too large".into()));
                    }
                    body.extend_from_slice(&b);
                }
            }
        }
    }
}

/// A JSON array of objects with `id`; `{"teams": [...]}`, `{"data": [...]}` and
/// `{"items": [...]}` wrappers are unwrapped, as common REST backends wrap lists.
pub fn parse_list(body: &[u8], endpoint: Endpoint) -> Result<Vec<ContextItem>, BackendError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| BackendError::Invalid(e.to_string()))?;
    let list = match v {
        Value::Array(a) => a,
        Value::Object(mut o) => match [endpoint.as_str(), "data", "items"]
            .iter()
            .find_map(|k| o.remove(*k).filter(Value::is_array))
        {
            Some(Value::Array(a)) => a,
            _ => return Err(BackendError::Invalid("expected a JSON array".into())),
        },
        _ => return Err(BackendError::Invalid("expected a JSON array".into())),
    };
    Ok(list
        .into_iter()
        .filter(|item| item.get("id").is_some_and(|id| !id.is_null()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_in_common_shapes() {
        let l = parse_list(
            br#"[{"id":1},{"name":"no id"},{"id":"b"}]"#,
            Endpoint::Teams,
        )
        .unwrap();
        assert_eq!(l.len(), 2);
        let l = parse_list(br#"{"teams":[{"id":1}]}"#, Endpoint::Teams).unwrap();
        assert_eq!(l.len(), 1);
        let l = parse_list(br#"{"data":[{"id":1}]}"#, Endpoint::Tasks).unwrap();
        assert_eq!(l.len(), 1);
        assert!(parse_list(br#"{"x":1}"#, Endpoint::Tasks).is_err());
        assert!(parse_list(b"nope", Endpoint::Tasks).is_err());
    }

    #[test]
    fn urls_encode_the_user_id() {
        let c = BackendClient::new(&BackendSettings {
            url: Some("http://b:1/base/".into()),
            token: None,
            timeout: Duration::from_secs(1),
            breaker_failures: 1,
            breaker_cooldown: Duration::from_secs(1),
            max_in_flight: 1,
        })
        .unwrap()
        .unwrap();
        assert_eq!(
            c.url("u 1/x", Endpoint::Tasks).as_str(),
            "http://b:1/base/api/users/u%201%2Fx/tasks"
        );
    }

    #[test]
    fn client_errors_do_not_trip_the_breaker() {
        assert!(!BackendError::Status(401).is_outage());
        assert!(BackendError::Status(429).is_outage());
        assert!(BackendError::Status(503).is_outage());
        assert!(BackendError::Timeout(Duration::from_secs(1)).is_outage());
    }
}
