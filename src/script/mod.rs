//! The Lua routing engine (being written).

pub mod kv;
pub mod watch;
