//! The server: event loops that run the transports and the sans-IO core.
//!
//! Owns the worker model. The server runs one event loop per CPU core: N OS threads, each
//! with its own single-threaded tokio runtime and its own [`Worker`] (made by the
//! [`WorkerFactory`] inside that thread). Why one loop per core rather than one multi-threaded
//! runtime:
//! - no locks on the hot path: a loop owns its sockets and its Worker's state (transactions,
//!   dialogs, script state), and only that loop's thread ever touches them;
//! - the kernel does the load balancing: every loop binds its own UDP socket and TCP listener
//!   to each listen address with SO_REUSEPORT, and the kernel spreads datagrams and
//!   connections over them by flow, so one peer's traffic keeps going to the same loop;
//! - state that must be found again later stays findable: a request belongs to the loop its
//!   Call-ID hashes to, whatever port or connection it comes from ([`affinity`]: a whole
//!   dialog, its transactions' retransmissions, CANCELs and ACKs on one loop, RFC 3261
//!   §17.2.3), and a response to the loop whose index the relay put in the Via branch
//!   (§8.1.1.7); a loop that receives another's message hands it over (in batches, so a burst
//!   wakes the other loop once).
//!
//! Each loop watches its own load ([`overload`]): a loop saturated for long refuses a share
//! of new requests with 503, measured by the shell (`transport::load`).
//!
//! The only state shared between loops is the registry of stream connections, so that a
//! response can be sent on the connection its request came in on (RFC 3261 §18.2.2).
//!
//! [`Worker`]: crate::transport::Worker
//! [`WorkerFactory`]: crate::transport::WorkerFactory

pub mod affinity;
pub mod core;
pub mod overload;
pub mod wiring;
mod workers;

pub use wiring::Wiring;
pub use workers::{Server, ServerHandle};
