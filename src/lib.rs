//! moonroute: a scriptable SIP server. A Rust engine (codec, transports, transactions, proxy,
//! registrar) whose routing decisions are made by a Lua script.
pub mod sip;
