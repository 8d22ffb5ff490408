//! Test fixtures: real `nats-server` (with JetStream) and `redis-server` processes on
//! free ports, each test with its own, so tests stay isolated and can kill and restart
//! them to inject faults. Also signed tokens (`tokens`) and in-process stub servers for
//! the LLM (`llm`) and the team backend (`backend`), served by `server`. Used only by tests.

pub mod backend;
pub mod llm;
pub mod nats_cluster;
pub mod nats_server;
pub mod process;
pub mod redis_cluster;
pub mod redis_server;
pub mod server;
pub mod tls;
pub mod tokens;

pub use nats_cluster::NatsCluster;
pub use nats_server::Nats;
pub use process::{START_TIMEOUT, find_binary, free_port};
pub use redis_cluster::{RedisCluster, TestRedis};
pub use redis_server::Redis;
