//! The server's metrics: the protocol's registry and exposition
//! ([`moonroute_proto::metrics`]), the engine's own families ([`engine`]) and the HTTP
//! endpoint that serves them ([`http`]).

pub mod engine;
pub mod http;

pub use engine::EngineMetrics;
pub use moonroute_proto::metrics::*;
