//! Worker integration tests: real NATS (JetStream) and Redis started per test, stub
//! LLM and team backend servers in process, workers in process via `worker::run`.

mod common;

mod attachments;
mod bench;
mod cancel;
mod chat;
mod config;
mod context;
mod failures;
mod pdf_bombs;
mod shutdown;
