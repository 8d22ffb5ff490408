//! Switchboard's shared vocabulary: wire protocol types, JWT validation, config
//! loading, NATS subject and Redis key names, the Redis session store, metric names
//! and what every binary does around its library.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod bus;
pub mod coalesce;
pub mod config;
pub mod keys;
pub mod metrics;
pub mod nats;
pub mod protocol;
pub mod service;
pub mod store;
pub mod subjects;
pub mod telemetry;
