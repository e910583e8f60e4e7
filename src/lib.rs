//! moonroute: a scriptable SIP server. A Rust engine (codec, transports, transactions, proxy,
//! registrar) whose routing decisions are made by a Lua script.
//!
//! This crate is the shell: event loops, sockets, DNS, the Lua engine, configuration, the
//! stores on disk and on Redis, control and metrics over HTTP. The sans-IO protocol it drives
//! is the `moonroute-proto` crate, re-exported here module by module (`moonroute::sip` is
//! `moonroute_proto::sip`); where a protocol module has a shell part (`auth`, `dialog`,
//! `location`, `metrics`, `transport`, `dns`), the shell's module re-exports the protocol's
//! and adds its own. See `docs/architecture.md`.
pub mod auth;
pub mod cluster;
pub mod config;
pub mod control;
pub mod dialog;
pub mod dispatcher;
pub mod dns;
pub mod file_modes;
pub mod flood;
pub mod location;
pub mod metrics;
pub mod redis_link;
pub mod script;
pub mod secret;
pub mod server;
pub mod transport;

pub use moonroute_proto::{id_map, logging, memory, nat, proxy, registrar, sip, transaction, wake};
