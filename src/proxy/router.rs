//! The seam between the engine and routing policy: for each new request the router decides
//! (answer it here, or relay it statefully to a target set), and when a branch set fails it may
//! add targets (serial forking, failover). The Lua engine will sit behind this trait; until it
//! lands, [`BuiltinRouter`] drives the proxy (record-route and relay to the Request-URI or to a
//! static next hop), in the spirit of a minimal Kamailio route block.

use std::borrow::Cow;

use bytes::Bytes;

use super::response_context::Target;
use crate::sip::{Message, Method};
use crate::transport::Meta;

/// What to do with a new request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer it here with this status.
    Reply {
        code: u16,
        reason: Cow<'static, str>,
    },
    /// Relay it statefully (§16.5-§16.7). An empty target set means the Request-URI (§16.5).
    Relay {
        targets: Vec<Target>,
        record_route: bool,
    },
}

pub trait Router {
    /// Decides for a request that passed the §16.3 checks and §16.4 route preprocessing.
    fn route(&mut self, request: &Message, meta: &Meta) -> Decision;

    /// Every branch failed and `best` would go upstream; targets returned here are tried next
    /// (a new serial group), none sends `best` (Kamailio's failure_route).
    fn on_failure(&mut self, _request: &Message, _best: &Message) -> Vec<Target> {
        Vec::new()
    }
}

/// The router used until scripts route. Unless a static route or `relay_to_request_uri` is
/// configured it relays nothing and answers 501. When relaying:
/// - in-dialog requests (To tag present) go to their Request-URI (the route set was already
///   consumed by §16.4 preprocessing): Kamailio's `loose_route(); t_relay()`;
/// - with a static route, every other request goes there, Record-Routed;
/// - with `relay_to_request_uri`, requests for other hosts go to their Request-URI,
///   Record-Routed (an open relay: for tests and labs on loopback);
/// - anything else is answered 501, as before the proxy existed.
#[derive(Clone, Debug, Default)]
pub struct BuiltinRouter {
    pub static_route: Option<Bytes>,
    pub relay_to_request_uri: bool,
}

impl Router for BuiltinRouter {
    fn route(&mut self, request: &Message, _meta: &Meta) -> Decision {
        if !self.relays() {
            // Not configured to proxy: nothing leaves this server (RFC 4475's messages name
            // foreign hosts, and a default install must not be a relay).
            return not_implemented();
        }
        let in_dialog = request.to().is_ok_and(|to| to.tag().is_some());
        if in_dialog {
            return Decision::Relay {
                targets: Vec::new(),
                record_route: false,
            };
        }
        let record_route = request.method() != Some(&Method::Register);
        if let Some(route) = &self.static_route {
            return Decision::Relay {
                targets: vec![Target {
                    uri: route.clone(),
                    q: 1000,
                }],
                record_route,
            };
        }
        if self.relay_to_request_uri {
            return Decision::Relay {
                targets: Vec::new(),
                record_route,
            };
        }
        not_implemented()
    }
}

impl BuiltinRouter {
    /// Whether any relaying is configured.
    pub fn relays(&self) -> bool {
        self.static_route.is_some() || self.relay_to_request_uri
    }
}

fn not_implemented() -> Decision {
    Decision::Reply {
        code: 501,
        reason: Cow::Borrowed("Not Implemented (no routing engine yet)"),
    }
}
