//! The Lua routing engine: every routing decision is made by the operator's script, in the
//! spirit of Kamailio's route blocks (RFC 3261 §16.5-§16.7 are the engine's; *which* targets,
//! *whether* to record-route, answer, redirect or forward statelessly is the script's).
//!
//! Owns:
//! - `engine`: one Lua 5.4 state per event loop (no locks, nothing shared between loops), the
//!   sandbox, the instruction budget and memory limit that stop a runaway script, and errors
//!   that point at the script's file and line.
//! - `api`: what a script sees: the `req`/`res`/`branch` objects and the `sip` table.
//! - `router`: [`ScriptRouter`], the engine behind the proxy's `Router` seam, with per-
//!   transaction variables (`req.vars`) and version pinning; [`ScriptHost`], the shared
//!   current version and hot reload (validate in a fresh state, then every loop switches).
//! - `offline`: `moonroute check` and `moonroute test` (a script run on one message without a
//!   network).
//! - `kv`: the store behind `sip.kv`, shared by all loops.
//! - `watch`: the file watcher that triggers reloads.
//!
//! Hooks run synchronously on their event loop. No primitive waits on I/O: the location store
//! answers from memory, and `save` returns before its write is on disk (the 200 it decided
//! carries a commit ticket, and the server core holds it until the flush). Primitives that
//! must wait for an answer (DNS resolution) are to be made yielding coroutines so a hook never
//! blocks its loop.

pub mod api;
pub mod engine;
pub mod kv;
pub mod kv_redis;
pub mod lint;
pub mod offline;
pub mod router;
pub mod watch;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

use crate::cluster::Reach;
use crate::proxy::response_context::Target;
use crate::proxy::router::Decision;
use crate::sip::{extensions, Message};
use crate::transport::Meta;

pub use engine::{Engine, Limits, ScriptError, ScriptSource};
pub use router::{ScriptHost, ScriptRouter};

/// Keys `sip.kv` holds at most, across all loops (bounded memory).
pub const KV_MAX_KEYS: usize = 1_000_000;

/// What scripts share across loops: the `sip.kv` store, the registrar, the digest
/// authenticator, the `pike` rate limiter and the metrics registry.
pub struct Services {
    pub kv: Arc<kv::KvStore>,
    pub registrar: Option<Arc<crate::registrar::Registrar>>,
    /// This node, when the location store is shared by several (`crate::cluster`): lookups
    /// reach other nodes' connection-bound bindings through them.
    pub cluster: Option<Arc<crate::cluster::Node>>,
    /// Digest authentication (`req:authorize`); `None` offline (`moonroute test`).
    pub auth: Option<Arc<crate::auth::Authenticator>>,
    /// Per-source request rates (`sip.pike_check`).
    pub pike: Arc<crate::flood::Pike>,
    /// The server's metrics (`sip.metrics`, and the engine's own families): one registry per
    /// server, so the engine's families and the script's are served together.
    pub metrics: Arc<crate::metrics::Registry>,
    /// Destination sets and their health (`sip.ds`, `req:ds_select`): `[dispatcher]`.
    pub dispatcher: Arc<crate::dispatcher::Dispatcher>,
    /// Which WebSocket connections are open: `location_lookup` skips bindings whose
    /// connection closed (RFC 7118 §5). Attached to the server when it starts.
    pub flows: Arc<crate::transport::registry::Flows>,
    /// The wall-clock time primitives see (digest nonces, location expiry): `None` is the
    /// system clock (the server); a test run may pretend another time (`moonroute.run{time =
    /// ...}`), e.g. to find a nonce stale.
    pub clock: Option<SystemTime>,
}

impl Default for Services {
    fn default() -> Self {
        Services {
            kv: Arc::new(kv::KvStore::new(KV_MAX_KEYS)),
            registrar: None,
            cluster: None,
            auth: None,
            pike: Arc::new(crate::flood::Pike::default()),
            metrics: crate::metrics::Registry::new(),
            dispatcher: Arc::new(crate::dispatcher::Dispatcher::empty()),
            flows: Arc::default(),
            clock: None,
        }
    }
}

impl Services {
    /// How this node reaches `binding`: directly without a cluster ([`crate::cluster::Node::reach`]).
    fn reach(&self, binding: &crate::location::Binding) -> Reach {
        self.cluster
            .as_ref()
            .map_or(Reach::Direct, |node| node.reach(binding))
    }

    /// The time primitives use: the system clock unless a test run set [`Services::clock`].
    pub fn now(&self) -> SystemTime {
        self.clock.unwrap_or_else(SystemTime::now)
    }

    /// The unexpired contacts registered for the AOR of `uri`, highest q first.
    pub fn location_lookup(&self, uri: &str, now: SystemTime) -> Vec<Target> {
        self.try_location_lookup(uri, now).unwrap_or_default()
    }

    /// [`Services::location_lookup`], or why the location store could not answer (a shared
    /// store that is unreachable).
    pub fn try_location_lookup(
        &self,
        uri: &str,
        now: SystemTime,
    ) -> Result<Vec<Target>, crate::location::StoreError> {
        let Some(registrar) = &self.registrar else {
            return Ok(Vec::new());
        };
        Ok(registrar
            .try_lookup(uri, now)?
            .into_iter()
            .filter(|b| match b.received {
                Some((kind, addr)) if is_flow(b) => self.flows.open(kind, addr),
                _ => true,
            })
            .map(|b| {
                // A NATed contact is reached through the address it registered from, unless
                // a Path leads there (the edge proxy owns the flow then). So is a flow, always:
                // a WebSocket client's Contact host is an `.invalid` name, and an outbound
                // phone's Contact need not be reachable; only the connection it registered over
                // reaches it (RFC 7118 §5, RFC 5626 §5.3).
                let destination = match (b.nated || is_flow(&b), b.path.is_empty()) {
                    (true, true) => b.received,
                    _ => None,
                };
                // Another node of the cluster holds its flow: through that node, or not at
                // all while it is down (`crate::cluster`).
                let (owner_route, unavailable) = match self.reach(&b) {
                    Reach::Direct => (None, None),
                    Reach::ThroughOwner(route) => (Some(bytes::Bytes::from(route)), None),
                    Reach::OwnerDown(node) => (None, Some(format!("its node {node} is down"))),
                };
                Target {
                    uri: bytes::Bytes::from(b.contact),
                    q: b.q,
                    route: owner_route
                        .into_iter()
                        .chain(b.path.into_iter().map(bytes::Bytes::from))
                        .collect(),
                    destination,
                    next_hop_uri: None,
                    unavailable,
                }
            })
            .collect())
    }

    /// Processes a REGISTER (§10.3): the answer to send, as a reply decision. A durable
    /// store's 200 carries the write it waits for: it is sent only once the bindings it lists
    /// are on disk.
    /// `nated`: the sender is behind a NAT (`req:fix_nated_contact()`/`req:nat_detect()`), its
    /// bindings are stored as reached through their received address.
    pub fn registrar_save(
        &self,
        request: &Message,
        meta: &Meta,
        nated: bool,
        now: SystemTime,
    ) -> Decision {
        let Some(registrar) = &self.registrar else {
            return Decision::reply(501, "Not Implemented (no registrar configured)");
        };
        // The registrar is the UAS here: §8.2.2.3, Require must list only what we support.
        let require = [crate::sip::HeaderName::Require];
        match extensions::unsupported(request, &require, extensions::SUPPORTED) {
            Ok(None) => {}
            Ok(Some(tags)) => {
                return Decision::Reply {
                    code: 420,
                    reason: Cow::Borrowed("Bad Extension"),
                    headers: vec![("Unsupported".to_owned(), tags)],
                    wait_for: None,
                }
            }
            Err(_) => return Decision::reply(400, "Bad Request (Require: bad option tag)"),
        }
        let result = registrar.save_from(request, meta, nated, now);
        Decision::Reply {
            code: result.code,
            reason: Cow::Owned(result.reason),
            headers: result.headers,
            wait_for: result.commit.ticket(),
        }
    }
}

/// Whether `binding` is bound to the connection it was registered over (RFC 5626 §5.3): it
/// came over WebSocket (RFC 7118 §5), or over TCP/TLS with the outbound rules that stored its
/// `reg-id` (the registrar keeps reg-id only then, `registrar::outbound_applies`).
fn is_flow(binding: &crate::location::Binding) -> bool {
    match binding.received {
        Some((kind, _)) if kind.is_websocket() => true,
        Some((kind, _)) => kind.is_stream() && binding.reg_id.is_some() && binding.path.is_empty(),
        None => false,
    }
}
