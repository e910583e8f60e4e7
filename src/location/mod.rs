//! The location stores of the server: the protocol's bindings and [`LocationStore`] trait
//! ([`moonroute_proto::location`], RFC 3261 §10) kept durably on sled ([`SledLocation`]) or
//! on a Redis server shared by several nodes ([`RedisLocation`]), and opened as `[location]`
//! says ([`open_configured`]).

mod open;
mod redis_store;
mod sled_store;

pub use moonroute_proto::location::*;
pub use open::{open_configured, LocationBackend, LocationConfig, Opened};
pub use redis_store::RedisLocation;
pub use sled_store::{LoadReport, SledLocation};
