//! Gateway integration tests: real NATS (JetStream) and Redis started per test, real
//! gateways on port 0, a real WebSocket client.

mod common;

mod auth_matrix;
mod autobahn;
mod bench;
mod budget;
mod capacity;
mod channels;
mod chat;
mod client;
mod cluster;
mod connect;
mod context;
mod e2e_chat;
mod faults;
mod hostile;
mod inprocess;
mod limits;
mod mux_tls;
mod nats_cluster;
mod presence_failover;
mod proxy;
mod redis_failover;
mod secured;
mod shutdown;
