//! Test fixtures: real `nats-server` and `redis-server` processes on free ports,
//! signed tokens, and small client helpers. Used only by tests.

pub mod tokens;
