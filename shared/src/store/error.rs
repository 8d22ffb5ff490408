//! The store's error: what every part of it (the Redis connection in `backend.rs`,
//! the channel and session operations) returns.

use std::time::Duration;

/// Errors talking to Redis. Callers answer `UNAVAILABLE`; nothing here is the client's fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis unavailable: {0}")]
    Redis(#[from] redis::RedisError),
    /// The store is out of reach for a reason other than Redis (the in-memory store
    /// switched off by a test).
    #[error("store unavailable: {0}")]
    Unavailable(&'static str),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("corrupt value in {key}: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("corrupt value in {key}: {value:?}")]
    CorruptValue { key: String, value: String },
}
