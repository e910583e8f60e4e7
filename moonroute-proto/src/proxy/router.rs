//! The seam between the engine and routing policy: for each new request the router decides
//! (answer it here, relay it statefully to a target set, forward it statelessly, or drop it);
//! it may edit each outgoing branch, see every response, and add targets when a branch set
//! fails (serial forking, failover). The Lua engine (`moonroute::script::ScriptRouter`) sits behind
//! this trait; [`BuiltinRouter`] is the scriptless router of the `[proxy]` config section
//! (record-route and relay to the Request-URI or to a static next hop) for labs and benchmarks.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::location::CommitTicket;

use bytes::Bytes;

use super::identity::LocalIdentity;
use super::response_context::{BranchOutcome, Target};
use crate::sip::{HeaderName, Message, Method};
use crate::transport::Meta;

/// Makes the Router of each event loop, given the loop's index and who this server is (one
/// router per loop: routers keep per-loop state, such as each loop's Lua state).
pub type RouterFactory = Arc<dyn Fn(usize, &LocalIdentity) -> Box<dyn Router> + Send + Sync>;

/// What to do with a new request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer it here with this status and extra headers (e.g. Contact for a 3xx).
    Reply {
        code: u16,
        reason: Cow<'static, str>,
        headers: Vec<(String, String)>,
        /// Send it only once this write is on disk (a registrar's 200, §10.3); `None`: at
        /// once.
        wait_for: Option<CommitTicket>,
    },
    /// Relay it statefully (§16.5-§16.7). An empty target set means the Request-URI (§16.5).
    Relay {
        targets: Vec<Target>,
        record_route: bool,
        /// The transaction's failure timers (`t_set_fr`); the defaults unless set.
        timers: FailureTimers,
    },
    /// Forward it statelessly (§16.11): to `target` when given (the next hop only: the
    /// Request-URI is not rewritten, like Kamailio's `forward(uri)`), else where its Route set
    /// or Request-URI says. No transaction is kept, so a retransmission is routed again and
    /// responses are relayed by their Via alone.
    Forward {
        target: Option<Bytes>,
        record_route: bool,
    },
    /// Discard it without an answer; `reason` goes into the one `moonroute::refused` log
    /// line (default: the router dropped it).
    Drop { reason: Option<Cow<'static, str>> },
    /// Not decided yet: the router waits for the DNS answer to `query` (the script called
    /// `sip.resolve`). The relay resolves it off the loop and calls [`Router::resume`] with
    /// the answer and the [`Routed::handle`] given with this decision.
    Resolve { query: crate::dns::target::Query },
}

impl Decision {
    pub fn reply(code: u16, reason: impl Into<Cow<'static, str>>) -> Decision {
        Decision::Reply {
            code,
            reason: reason.into(),
            headers: Vec::new(),
            wait_for: None,
        }
    }

    /// Discard it without an answer, for no reason worth logging beyond the router's choice.
    pub fn drop() -> Decision {
        Decision::Drop { reason: None }
    }
}

/// What the relay knows about a new request beyond the message itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteInfo {
    /// The request arrived with a Route header set.
    pub had_route: bool,
    /// §16.4 removed a Route entry naming this proxy (or undid a strict router's rewrite).
    pub consumed_own_route: bool,
    /// What §16.4 removed carried our Record-Route signature (`route_sign`) for this request:
    /// its dialog, its Request-URI's host and port and its remaining Route, not expired (or
    /// expired, for a BYE). The request follows a route set this proxy issued for its dialog,
    /// and is routed by what is left of it, or by its Request-URI. The script's
    /// `loose_route()` is this.
    pub own_route_signed: bool,
    /// What the signature check found, for the log when the request is not routed.
    pub signature: super::route_sign::Verdict,
    /// That signature was written by this server, since it started, for a call the script
    /// tracked (`req:dlg_manage()`): if the dialog table no longer knows the call, it ended
    /// (`req:dlg_known()` says `ended`, not `untracked`).
    pub tracked_call: bool,
    /// §16.4 consumed an owner route this server signed (`route_sign`, "Owner routes"):
    /// another node of the cluster routed the request to a binding whose flow this server
    /// holds, and the relay delivers it there without asking the router again.
    pub owner_flow: Option<(crate::transport::TransportKind, SocketAddr)>,
}

/// Where a response given to [`Router::on_reply`] came from: what a NAT check needs.
#[derive(Clone, Copy, Debug)]
pub struct ReplySource {
    /// The packet's transport information (its source address, transport, connection).
    pub meta: Meta,
    /// Where the branch's request was sent (the next hop's address, for a contact behind a
    /// NAT the address its REGISTER came from).
    pub sent_to: SocketAddr,
}

/// A router's handle on one routed request, given back in the later hooks of its transaction
/// (so per-transaction state such as script variables survives until it ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteHandle(pub u64);

/// The decision for a new request, and the handle for its later hooks (none when the router
/// keeps no per-transaction state).
#[derive(Debug)]
pub struct Routed {
    pub decision: Decision,
    pub handle: Option<RouteHandle>,
}

impl From<Decision> for Routed {
    fn from(decision: Decision) -> Routed {
        Routed {
            decision,
            handle: None,
        }
    }
}

/// What becomes of one outgoing branch.
#[derive(Debug)]
pub enum BranchEdit {
    /// Send the copy as the proxy built it.
    Unchanged,
    /// Send this request instead (its Request-URI is the branch's target; §16.6 copies it).
    Edited(Message),
    /// Do not send this branch: it counts as failed, like an unreachable next hop (503).
    Skip,
}

/// A transaction's failure timers, Kamailio's `fr_timer` and `fr_inv_timer` as `t_set_fr`
/// sets them for one transaction; `None` keeps the `[timers]` default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FailureTimers {
    /// `fr_timer`: a branch that hears nothing (an INVITE branch: no provisional, §17.1.1.2;
    /// another: no final) within this is given up and counts as a 408, long before Timer B
    /// or F (64*T1) would end it.
    pub no_response: Option<std::time::Duration>,
    /// `fr_inv_timer`: Timer C (§16.8) for the transaction's INVITE branches, which CANCELs
    /// a branch ringing with no final for that long.
    pub no_answer: Option<std::time::Duration>,
}

impl FailureTimers {
    /// `self`, with the timers `later` sets replacing these.
    pub fn updated(self, later: FailureTimers) -> FailureTimers {
        FailureTimers {
            no_response: later.no_response.or(self.no_response),
            no_answer: later.no_answer.or(self.no_answer),
        }
    }
}

/// What a router answers when a branch set failed.
#[derive(Debug, Default)]
pub enum FailureDecision {
    /// Send the best response upstream (§16.7 step 6).
    #[default]
    SendBest,
    /// Try these targets next (a new serial group: failover, voicemail), with the failure
    /// timers set for them (the transaction's so far, unless changed). `request`, when the
    /// router edited the request (headers, Request-URI), is what the new branches copy
    /// instead of the original; branches already sent are unchanged.
    Targets {
        targets: Vec<Target>,
        timers: FailureTimers,
        request: Option<Box<Message>>,
    },
    /// Answer upstream with this final response (300-699) instead of the best one (§16.7
    /// step 6: the proxy chooses what goes upstream), built from the request (§8.2.6).
    Reply {
        code: u16,
        reason: Cow<'static, str>,
        headers: Vec<(String, String)>,
    },
}

/// The seam between the engine and routing policy. One router per event loop; it sees the
/// requests and responses of its own loop only.
pub trait Router {
    /// Decides for a request that passed the §16.3 checks and §16.4 route preprocessing. The
    /// router may edit the request (Request-URI, headers) before it is relayed.
    fn route(&mut self, request: &mut Message, meta: &Meta, info: RouteInfo) -> Routed;

    /// A branch is about to be sent to `target` (Kamailio's branch_route).
    fn on_branch(
        &mut self,
        _handle: RouteHandle,
        _request: &Message,
        _target: &Target,
    ) -> BranchEdit {
        BranchEdit::Unchanged
    }

    /// A response arrived on a branch (Kamailio's onreply_route); false drops it. Only
    /// provisional responses may be dropped: a final one always completes its branch. The
    /// router may rewrite the response's Contact (a UAS behind a NAT, `res:fix_nated_contact`):
    /// what it leaves in `response` is what the response context keeps and forwards.
    fn on_reply(
        &mut self,
        _handle: RouteHandle,
        _request: &Message,
        _response: &mut Message,
        _source: Option<ReplySource>,
    ) -> bool {
        true
    }

    /// Every branch failed and `best` would go upstream (Kamailio's failure_route);
    /// `branches` says how each branch of the transaction ended, in the order they started.
    fn on_failure(
        &mut self,
        _handle: Option<RouteHandle>,
        _request: &Message,
        _best: &Message,
        _branches: &[BranchOutcome],
    ) -> FailureDecision {
        FailureDecision::SendBest
    }

    /// One branch ended without a 2xx (Kamailio's `event_route[tm:branch-failure]`):
    /// `outcome` says how, `response` gives the final it ended with (received, or the 408/503
    /// this proxy counts it as), built only when called. Informational: the branch set goes
    /// on, and [`Router::on_failure`] still decides once every branch has ended.
    fn on_branch_failure(
        &mut self,
        _handle: RouteHandle,
        _request: &Message,
        _outcome: &BranchOutcome,
        _response: &dyn Fn() -> Option<Message>,
    ) {
    }

    /// The transaction of `handle` ended; no hook will see it again.
    fn release(&mut self, _handle: RouteHandle) {}

    /// Gives the router its event loop's dialog table (`crate::dialog`), where the script's
    /// `req:dlg_manage()` creates dialogs the relay then follows. Routers that manage no
    /// dialogs ignore it.
    fn attach_dialogs(&mut self, _dialogs: crate::dialog::SharedTable) {}

    /// A tracked call ended; `cdr` is its record (the script's `on_dialog_end`), written to
    /// the CDR file as well.
    fn on_dialog_end(&mut self, _cdr: &crate::dialog::Cdr) {}

    /// Continues a [`Decision::Resolve`] with the DNS answer; `request` is the one given to
    /// [`Router::route`] (the router gives back its edited copy). The handle of the result
    /// replaces `handle`, which the router has released if the result carries none.
    fn resume(
        &mut self,
        _handle: RouteHandle,
        _request: &mut Message,
        _answer: Result<Vec<crate::dns::target::Candidate>, crate::dns::target::ResolveError>,
    ) -> Routed {
        Decision::reply(500, "Server Internal Error (nothing to resume)").into()
    }
}

/// The router used until scripts route. Unless a static route or `relay_to_request_uri` is
/// configured it relays nothing and answers 501. When relaying:
/// - in-dialog requests (To tag present) go to their Request-URI (the route set was already
///   consumed by §16.4 preprocessing): Kamailio's `loose_route(); t_relay()`;
/// - with a static route, every other request goes there, Record-Routed, after losing any
///   Route its sender pre-loaded (RFC 3261 §16.6 step 7 would otherwise send it wherever the
///   sender pointed it: an open relay; the script router's `req:follow_preloaded_route()` is
///   the opt-in there, the built-in router has none);
/// - with `relay_to_request_uri`, requests for other hosts go to their Request-URI,
///   Record-Routed (an open relay: for tests and labs on loopback);
/// - anything else is answered 501, as before the proxy existed.
#[derive(Clone, Debug, Default)]
pub struct BuiltinRouter {
    pub static_route: Option<Bytes>,
    pub relay_to_request_uri: bool,
}

impl Router for BuiltinRouter {
    fn route(&mut self, request: &mut Message, meta: &Meta, _info: RouteInfo) -> Routed {
        self.decide(request, meta).into()
    }
}

/// Removes the Route headers an initial request still carries once §16.4 took ours off: its
/// sender pre-loaded them, and the static route is where such requests go.
fn drop_preloaded_route(request: &mut Message, meta: &Meta) {
    if request.values(HeaderName::Route).next().is_none() {
        return;
    }
    request.remove_headers("Route");
    tracing::info!(target: "moonroute::proxy::router",
        source = %meta.source,
        "pre-loaded Route removed, not followed (the built-in router relays to its static route)"
    );
}

impl BuiltinRouter {
    fn decide(&self, request: &mut Message, meta: &Meta) -> Decision {
        if !self.relays() && request.method() == Some(&Method::Cancel) {
            // A CANCEL that matched no transaction (§9.2).
            return Decision::reply(481, "Call/Transaction Does Not Exist");
        }
        if !self.relays() {
            // Not configured to proxy: nothing leaves this server (RFC 4475's messages name
            // foreign hosts, and a default install must not be a relay).
            return not_implemented();
        }
        if request.is_in_dialog() {
            return Decision::Relay {
                targets: Vec::new(),
                record_route: false,
                timers: FailureTimers::default(),
            };
        }
        let record_route = request.method() != Some(&Method::Register);
        if let Some(route) = &self.static_route {
            drop_preloaded_route(request, meta);
            return Decision::Relay {
                targets: vec![Target::new(route.clone(), 1000)],
                record_route,
                timers: FailureTimers::default(),
            };
        }
        if self.relay_to_request_uri {
            return Decision::Relay {
                targets: Vec::new(),
                record_route,
                timers: FailureTimers::default(),
            };
        }
        not_implemented()
    }

    /// Whether any relaying is configured.
    pub fn relays(&self) -> bool {
        self.static_route.is_some() || self.relay_to_request_uri
    }
}

fn not_implemented() -> Decision {
    Decision::reply(501, "Not Implemented (no routing configured)")
}
