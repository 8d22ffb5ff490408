//! STAND-IN for the customer's team backend, for the local cluster and the demo: not
//! part of the product. It issues demo logins (HS256 JWTs signed with the cluster's
//! shared secret), answers the teams and tasks lists the worker fetches, and serves
//! the demo page and the JavaScript client.

pub mod assets;
pub mod config;
pub mod directory;
pub mod server;
pub mod token;
pub mod user;

pub use config::{Args, Config, ConfigError};
pub use server::{ServerError, run};
