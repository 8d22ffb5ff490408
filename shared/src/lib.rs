//! Switchboard's server-side vocabulary: JWT validation, config loading, NATS
//! subject and Redis key names, the Redis session store, metric names and what every
//! binary does around its library. The wire protocol is the `switchboard-protocol`
//! crate, re-exported here as [`protocol`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod bus;
pub mod coalesce;
pub mod config;
pub mod keys;
pub mod metrics;
pub mod nats;
/// The wire protocol lives in its own crate (no I/O, for clients too); this path
/// stays for the code that names it through `shared`.
pub use ::protocol;
pub mod scaffold;
pub mod service;
pub mod store;
pub mod subjects;
pub mod telemetry;
