//! Flood and abuse protection: per-source request rate limiting (Kamailio's `pike`) and the
//! overload answer (503 with Retry-After, RFC 3261 §21.5.4) when the server is past its limits.
//!
//! - [`pike`]: the per-source rate limiter behind `sip.pike_check` / `req:pike_check`, shared
//!   by every event loop.
//! - [`sanity`]: the request checks behind `req:sanity()` (Kamailio's `sanity_check`).
//! - The overload answer itself lives where the queues are: the transaction layer's cap on
//!   live transactions, the core's limit on its backlog (`limits.max_backlog`), and each
//!   event loop's overload control (`limits.overload_after_ms`, decided in `server::overload`
//!   from what the shell measures in `transport::load`). All answer new requests 503 with
//!   Retry-After statelessly.

pub mod pike;
pub mod sanity;

pub use pike::{Pike, PikeRules};
