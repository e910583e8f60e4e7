//! moonroute: a scriptable SIP server. A Rust engine (codec, transports, transactions, proxy,
//! registrar) whose routing decisions are made by a Lua script.
pub mod auth;
pub mod cluster;
pub mod config;
pub mod control;
pub mod dialog;
pub mod dispatcher;
pub mod dns;
pub mod file_modes;
pub mod flood;
pub mod id_map;
pub mod location;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod nat;
pub mod proxy;
pub mod redis_link;
pub mod registrar;
pub mod script;
pub mod secret;
pub mod server;
pub mod sip;
pub mod transaction;
pub mod transport;
pub mod wake;
