//! moonroute's SIP protocol, sans-IO: everything that decides what to send, with no socket,
//! no clock, no thread and no file of its own. Inputs come with an explicit `now`; outputs
//! are values (a message to send, a timer to start, a client transaction to open) that the
//! `moonroute` shell carries out. See `docs/architecture.md`.
//!
//! - [`sip`]: the message codec (RFC 3261 §7, §19, §20, §25; RFC 4475);
//! - [`transaction`]: the transaction state machines (RFC 3261 §17, RFC 6026);
//! - [`proxy`]: the stateful and stateless proxy core (RFC 3261 §16), its identity, the
//!   `Router` trait routing scripts implement, Record-Route signing;
//! - [`registrar`]: the registrar's rules (RFC 3261 §10.3, RFC 3327, RFC 5626);
//! - [`location`]: bindings and the `LocationStore` trait the shell's stores implement;
//! - [`auth`]: digest authentication, server side (RFC 3261 §22, RFC 2617, RFC 8760);
//! - [`nat`]: NAT detection and keep-alive scheduling (RFC 3581, RFC 5626 §4.4);
//! - [`dialog`]: dialog state for calls the proxy tracks (RFC 3261 §12) and their records;
//! - [`transport`], [`dns`]: the address vocabulary shared with the shell's sockets and
//!   resolver (transport kinds, where a message came from and goes; RFC 3263 targets);
//! - [`metrics`]: counters kept in atomics and their Prometheus exposition;
//! - [`wake`], [`id_map`], [`memory`], [`logging`]: small support shared by the above.

pub mod auth;
pub mod dialog;
pub mod dns;
pub mod id_map;
pub mod location;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod nat;
pub mod proxy;
pub mod registrar;
pub mod sip;
pub mod transaction;
pub mod transport;
pub mod wake;
