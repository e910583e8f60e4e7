//! Flood and abuse protection: per-source request rate limiting (Kamailio's `pike`) and the
//! overload answer (503 with Retry-After, RFC 3261 §21.5.4) when the server is past its limits.
//!
//! - [`pike`]: the per-source rate limiter behind `sip.pike_check` / `req:pike_check`, shared
//!   by every event loop.
//! - [`sanity`]: the request checks behind `req:sanity()` (Kamailio's `sanity_check`).
//! - The overload answer itself lives where the queues are: the transaction layer's cap on
//!   live transactions, and the core's limits on its backlog (`limits.max_backlog`) and on
//!   how far behind its UDP receive queue the loop is (`limits.max_receive_lag_ms`, measured
//!   by the UDP receive loop); see `server::core`. All answer new requests 503 with
//!   Retry-After statelessly.

pub mod pike;
pub mod sanity;

pub use pike::{Pike, PikeRules};
