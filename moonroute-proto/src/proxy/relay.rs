//! The stateful proxy of one event loop: for each request the router relays, a response context
//! (§16.7) whose branches are client transactions of the loop's transaction layer.
//!
//! Owns: the §16.3 checks and loop detection, §16.4 route preprocessing, building each branch's
//! copy (§16.6) and sending it through a client transaction to its next hop, CANCEL of branches
//! (§9.1, §16.10), Timer C (§16.8), passing responses up through the server transaction
//! (§16.7), and forwarding ACKs for 2xx statelessly along their route (§16.11).
//!
//! Failure timers (Kamailio's `fr_timer` / `fr_inv_timer`, set per transaction by the
//! router's [`FailureTimers`], `[timers] fr_timer_ms` / `fr_inv_timer_ms` by default): an
//! attempt that hears nothing within `fr_timer` moves on to the next address of its next hop
//! or, with none left, gives its branch up as a 408 ([`ResponseContext::give_up`]), so a
//! failure route can fail over within seconds instead of Timer B's 32; `fr_inv_timer` is the
//! transaction's Timer C.
//!
//! Branches this proxy creates carry the owning loop's index (`z9hG4bK<hash>.<loop>.<n>`), so a
//! response that the kernel delivers to another loop can be handed back
//! ([`via_branch::owner_loop`]).
//!
//! The relay holds no transaction layer and no socket: each entry point (a request, a client
//! transaction's event, a DNS answer, a timer, an unreachable address) is given the instant
//! and pushes [`RelayAction`]s for the core to carry out ([`actions`]); the core reports the
//! client transactions it starts back ([`Relay::on_client_started`]). This file keeps the
//! calls and the entry points; a branch's life is in [`branch`], what goes without a
//! transaction in [`stateless`], the timers in [`timers`], the response context's decisions
//! in [`context`], the proxy's own BYEs in [`byes`].
//!
//! Next hops (RFC 3263): an IP literal is used at once; a host name is handed to the shell to
//! resolve ([`RelayAction::Resolve`] → [`Relay::on_resolved`]) while the branch waits, so the
//! loop never blocks on DNS. A branch then works through the ordered addresses (§4.3): on a
//! transport error, a timeout (Timer B/F) or a 503 it moves to the next address with a new
//! client transaction and branch ID; the response context and the script see only the
//! outcome of the last attempt. With no address left the branch counts as unreachable (503,
//! which goes upstream as 500).

mod actions;
mod branch;
mod byes;
mod context;
mod stateless;
mod timers;

pub use actions::{ClientPurpose, RelayAction, RelayActions, Reply};
pub use branch::Attempt;
use branch::BranchRun;
use byes::PendingEnd;
use stateless::{forward_failed, StatelessForward};

use crate::id_map::IdMap;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use tracing::{debug, info, warn};

use super::request::{branch_for, check_request, detect_loop, preprocess_routes, ProxyIdentity};
use super::response_context::{BranchId, BranchState, ContextAction, ResponseContext, Target};
use super::router::{Decision, FailureTimers, ReplySource, RouteHandle, RouteInfo, Routed, Router};
use crate::dialog::DialogTracker;
use crate::dns::target::{self as dns, Candidate, ResolveError};
use crate::logging::{call_id, Throttle, REFUSED};
use crate::memory::shrink_if_sparse;
use crate::sip::{Message, Method, ResponseBuilder};
use crate::transaction::layer::{SendError, TxId};
use crate::transaction::Event;
use crate::transport::{response_destination, Destination, ListenAddr, Meta, TransportKind};

/// What became of a request handed to the relay.
#[derive(Debug)]
enum Handled {
    /// It is being relayed; its answer will come through the server transaction.
    Relayed,
    /// It was forwarded statelessly or dropped: its server transaction was abandoned.
    Done,
    /// Answer it here (the core builds the response).
    Reply(Reply),
}

/// One relayed request.
struct Call {
    context: ResponseContext,
    /// The request after §16.4 preprocessing: what each branch copies.
    request: Message,
    /// `z9hG4bK<loop hash>.` computed from the request as received (§16.3 item 4 compares it).
    branch_base: String,
    inbound: (TransportKind, SocketAddr),
    record_route: bool,
    /// Its Record-Route signature marks a call the script tracks (`route_sign`).
    tracked: bool,
    /// The router's handle for the later hooks of this request.
    handle: Option<RouteHandle>,
    /// Each branch's attempts, by BranchId.
    branches: Vec<Option<BranchRun>>,
    /// A CANCEL came from upstream (§16.10): branches not yet sent are not sent.
    cancelled: bool,
    /// The failure timer of its attempts (`fr_timer`); `None`: Timer B/F only.
    fr_timer: Option<Duration>,
    /// The request as the failure route left it (headers it added, a Request-URI it
    /// rewrote): what the branches it starts copy instead of `request`. Branches sent
    /// before keep theirs.
    failover_request: Option<Message>,
}

/// What the script keeps for a call it routed (its pinned state: the `vars` table, the request
/// objects it made, the router's entry), as measured by `tests/call_memory.rs`.
const SCRIPT_STATE_BYTES: usize = 640;

impl Call {
    /// Heap bytes this call keeps, charged to its server transaction against the memory
    /// budget (`limits.transaction_memory_mb`): an estimate from what it holds now, which
    /// `tests/call_memory.rs` checks against what is measured.
    fn footprint(&self) -> usize {
        let branches: usize = self
            .branches
            .iter()
            .flatten()
            .map(|run| {
                run.request.as_ref().map_or(0, Message::heap_bytes)
                    + run.remaining.capacity() * std::mem::size_of::<Candidate>()
            })
            .sum();
        let slot = std::mem::size_of::<(TxId, Box<Call>)>() * 3 / 2;
        std::mem::size_of::<Call>()
            + slot
            + self.request.heap_bytes()
            + self
                .failover_request
                .as_ref()
                .map_or(0, Message::heap_bytes)
            + self.branch_base.capacity()
            + self.branches.capacity() * std::mem::size_of::<Option<BranchRun>>()
            + branches
            + self.context.heap_bytes()
            + self.handle.map_or(0, |_| SCRIPT_STATE_BYTES)
    }
}

/// What waits for a DNS answer.
enum Resolving {
    Branch {
        server: TxId,
        branch: BranchId,
    },
    /// A stateless forward (§16.11) or an ACK for a 2xx: sent to the first usable address.
    Forward(Box<StatelessForward>),
    /// A request whose router waits for the answer (`sip.resolve`).
    Route(Box<Suspended>),
}

/// A new request in server transaction `tx` on its way to being relayed (§16.5-§16.7).
struct NewRequest {
    tx: TxId,
    /// The loop hash of the request as received (§16.3 item 4).
    branch_base: String,
    /// An INVITE's 100 Trying, until it is sent (when relayed, or at once when the router
    /// waits for DNS).
    trying: Option<Bytes>,
}

/// What a routed request is on its way to.
enum Purpose {
    /// A new request (§16.5-§16.7).
    Request(NewRequest),
    /// A CANCEL that matched no transaction, in its own server transaction (§16.10).
    Cancel { tx: TxId },
    /// An ACK for a 2xx, forwarded statelessly (§16.11).
    Ack,
}

/// A request waiting, with its router, for a DNS answer.
struct Suspended {
    purpose: Purpose,
    request: Message,
    meta: Meta,
    handle: RouteHandle,
}

/// Most DNS resolutions one loop waits for at once; beyond it new branches fail as
/// unreachable (503) and stateless forwards are dropped, so a flood of requests for names
/// that never answer cannot grow memory without bound.
const MAX_RESOLVING: usize = 10_000;

pub struct Relay {
    me: ProxyIdentity,
    supported: Vec<&'static str>,
    loop_index: usize,
    bound: Vec<ListenAddr>,
    timer_c: Duration,
    /// `[timers] fr_timer_ms`: the failure timer of transactions that set none.
    fr_timer: Option<Duration>,
    router: Box<dyn Router>,
    next_unique: u64,
    /// Boxed: a call is large, and the map's spare slots should not be.
    calls: IdMap<TxId, Box<Call>>,
    /// Client transaction → (server transaction, branch).
    branch_of: IdMap<TxId, (TxId, BranchId)>,
    timer_c_queue: BinaryHeap<Reverse<(Instant, TxId, usize)>>,
    /// Failure timers of attempts: (due, server transaction, branch, the attempt's client
    /// transaction). Never cancelled: a firing whose attempt was answered or replaced is
    /// ignored, and each attempt has one entry, so the queue holds at most the attempts of the
    /// last `fr_timer`.
    fr_queue: BinaryHeap<Reverse<(Instant, TxId, usize, TxId)>>,
    /// DNS resolutions asked for and not answered yet, by id.
    resolving: IdMap<u64, Resolving>,
    next_resolve: u64,
    /// Callees whose answer carried only our Via, logged once per address per period (per
    /// event loop: a callee answering calls of several loops is logged by each).
    callee_mistakes: Throttle<SocketAddr>,
    /// This loop's dialogs (`crate::dialog`), shared with the router; `None`: not tracked.
    dialogs: Option<DialogTracker>,
    /// `ctl dlg end` requests whose BYEs are being started.
    ends: Vec<PendingEnd>,
    next_end: u64,
}

/// How long a callee's answers carrying only our Via go unlogged after one was logged.
const CALLEE_MISTAKE_LOG_PERIOD: Duration = Duration::from_secs(600);
/// Callee addresses remembered for that, per event loop.
const CALLEE_MISTAKE_LOG_KEYS: usize = 1024;

impl Relay {
    pub fn new(
        me: ProxyIdentity,
        supported: Vec<&'static str>,
        loop_index: usize,
        bound: Vec<ListenAddr>,
        timer_c: Duration,
        router: Box<dyn Router>,
    ) -> Relay {
        Relay {
            me,
            supported,
            loop_index,
            bound,
            timer_c,
            fr_timer: None,
            router,
            next_unique: 0,
            calls: IdMap::default(),
            branch_of: IdMap::default(),
            timer_c_queue: BinaryHeap::new(),
            fr_queue: BinaryHeap::new(),
            resolving: IdMap::default(),
            next_resolve: 0,
            callee_mistakes: Throttle::new(CALLEE_MISTAKE_LOG_PERIOD, CALLEE_MISTAKE_LOG_KEYS),
            dialogs: None,
            ends: Vec::new(),
            next_end: 0,
        }
    }

    /// Gives every attempt that hears nothing within `fr_timer` up (Kamailio's `fr_timer`,
    /// `[timers] fr_timer_ms`), unless its transaction sets its own (`t_set_fr`).
    pub fn with_fr_timer(mut self, fr_timer: Option<Duration>) -> Relay {
        self.fr_timer = fr_timer;
        self
    }

    /// Tracks the dialogs the router manages (`req:dlg_manage()`) in `dialogs`.
    pub fn with_dialogs(mut self, dialogs: DialogTracker) -> Relay {
        self.dialogs = Some(dialogs);
        self
    }

    /// Relayed requests still in progress.
    pub fn calls(&self) -> usize {
        self.calls.len()
    }

    // ----- a new request ------------------------------------------------------------

    /// A new request in server transaction `tx` (§16.3-§16.5).
    pub fn on_request(
        &mut self,
        tx: TxId,
        request: Message,
        meta: Meta,
        now: Instant,
        out: &mut RelayActions,
    ) {
        // The answer, if any, mirrors the request as received (§8.2.6.2), not as routed.
        let handled = self.route_request(tx, request.clone(), meta, now, out);
        reply_if_asked(tx, request, meta, handled, out);
    }

    fn route_request(
        &mut self,
        tx: TxId,
        mut request: Message,
        meta: Meta,
        now: Instant,
        out: &mut RelayActions,
    ) -> Handled {
        if let Err(r) = check_request(&request, &self.supported) {
            return Handled::Reply(Reply {
                unsupported: r.unsupported,
                ..Reply::new(r.code, r.reason)
            });
        }
        if detect_loop(&request, &self.me) {
            return reply(482, "Loop Detected");
        }
        // The loop hash covers the request as received, before its Route is consumed.
        let branch_base = branch_for(&request, "");
        let Some(info) = self.preprocess(&mut request) else {
            return reply(400, "Bad Request (Route)");
        };
        // Built before the router takes the request: a router waiting for DNS holds it.
        let trying = (request.method() == Some(&Method::Invite))
            .then(|| ResponseBuilder::new(&request, 100, "Trying").build());
        let routed = match owner_delivery(&request, &info) {
            Some(routed) => routed,
            None => self.router.route(&mut request, &meta, info),
        };
        self.dialogs_after_router();
        let purpose = Purpose::Request(NewRequest {
            tx,
            branch_base,
            trying,
        });
        self.after_route(purpose, request, meta, routed, now, out)
            .unwrap_or(Handled::Done)
    }

    /// Carries out what the router decided for a request, a CANCEL or an ACK; a
    /// [`Decision::Resolve`] suspends it until [`Relay::on_resolved`]. The answer the caller
    /// owes (none for an ACK).
    fn after_route(
        &mut self,
        purpose: Purpose,
        request: Message,
        meta: Meta,
        routed: Routed,
        now: Instant,
        out: &mut RelayActions,
    ) -> Option<Handled> {
        let Routed { decision, handle } = routed;
        if let Decision::Resolve { query } = decision {
            let purpose = Self::trying_while_waiting(purpose, out);
            return self.suspend(purpose, request, meta, handle, query, out);
        }
        let routed = Routed { decision, handle };
        match purpose {
            Purpose::Request(new) => Some(self.relay_routed(new, request, meta, routed, now, out)),
            Purpose::Cancel { tx } => Some(self.cancel_routed(tx, &request, &meta, routed, out)),
            Purpose::Ack => {
                self.ack_routed(&request, &meta, routed, out);
                None
            }
        }
    }

    /// An INVITE waiting for DNS gets its 100 Trying now (§16.2, §17.2.1: within 200 ms), so
    /// the caller stops retransmitting however long the lookup takes.
    fn trying_while_waiting(purpose: Purpose, out: &mut RelayActions) -> Purpose {
        match purpose {
            Purpose::Request(NewRequest {
                tx,
                branch_base,
                trying: Some(trying),
            }) => {
                out.push(RelayAction::ServerRespond {
                    tx,
                    status: 100,
                    response: trying,
                });
                Purpose::Request(NewRequest {
                    tx,
                    branch_base,
                    trying: None,
                })
            }
            other => other,
        }
    }

    /// The router waits for DNS (`sip.resolve`): the request waits with it.
    fn suspend(
        &mut self,
        purpose: Purpose,
        request: Message,
        meta: Meta,
        handle: Option<RouteHandle>,
        query: dns::Query,
        out: &mut RelayActions,
    ) -> Option<Handled> {
        let answer = match purpose {
            Purpose::Ack => None,
            _ => Some(reply(503, "Service Unavailable (too many DNS lookups)")),
        };
        let Some(handle) = handle else {
            warn!(target: "moonroute::proxy::relay", "the router asked for DNS without a handle to resume; dropping the request");
            return answer.map(|_| reply(500, "Server Internal Error"));
        };
        let suspended = Suspended {
            purpose,
            request,
            meta,
            handle,
        };
        let asked = self.ask_resolve(query, Resolving::Route(Box::new(suspended)), out);
        match asked {
            Ok(()) => Some(Handled::Relayed),
            Err(what) => {
                if let Resolving::Route(suspended) = what {
                    self.router.release(suspended.handle);
                }
                answer
            }
        }
    }

    /// §16.5-§16.7 for a routed request in server transaction `tx`.
    fn relay_routed(
        &mut self,
        new: NewRequest,
        request: Message,
        meta: Meta,
        routed: Routed,
        now: Instant,
        out: &mut RelayActions,
    ) -> Handled {
        let NewRequest {
            tx,
            branch_base,
            trying,
        } = new;
        if request.is_edited() {
            // The router may have changed the top Via (`req:force_rport()`): responses follow.
            if let Ok(via) = request.top_via() {
                let dest = response_destination(&via, &meta);
                out.push(RelayAction::SetResponseDestination { tx, dest });
            }
        }
        let handle = routed.handle;
        let (targets, record_route, timers) = match routed.decision {
            Decision::Relay {
                targets,
                record_route,
                timers,
            } => (targets, record_route, timers),
            other => {
                if let Some(handle) = handle {
                    self.router.release(handle);
                }
                return self.carry_out_stateless(tx, other, &request, &meta, out);
            }
        };
        if let Some(dialogs) = &self.dialogs {
            dialogs.on_relayed_request(&request, now);
            self.dialogs_after_router();
        }
        let targets = match targets.is_empty() {
            false => targets,
            true => match self.request_uri_target(&request) {
                Some(target) => vec![target],
                None => {
                    if let Some(handle) = handle {
                        self.router.release(handle);
                    }
                    // Nowhere to send it but to ourselves.
                    return reply(404, "Not Found");
                }
            },
        };
        if let Some(trying) = trying {
            // §16.2: a stateful proxy answers an INVITE it forwards with 100 Trying at once,
            // so the upstream client stops retransmitting (§17.1.1.2).
            out.push(RelayAction::ServerRespond {
                tx,
                status: 100,
                response: trying,
            });
        }
        let is_invite = request.method() == Some(&Method::Invite);
        let mut actions = Vec::new();
        let context = ResponseContext::new(
            request.clone(),
            targets,
            is_invite,
            timers.no_answer.unwrap_or(self.timer_c),
            now,
            &mut actions,
        );
        let inbound = (meta.kind, meta.local);
        let tracked =
            record_route && is_invite && self.dialogs.as_ref().is_some_and(|d| d.tracks(&request));
        let call = Call {
            context,
            request,
            branch_base,
            inbound,
            record_route,
            tracked,
            handle,
            branches: Vec::new(),
            cancelled: false,
            fr_timer: timers.no_response.or(self.fr_timer),
            failover_request: None,
        };
        self.calls.insert(tx, Box::new(call));
        self.apply(tx, actions, now, out);
        Handled::Relayed
    }

    /// §16.4 route preprocessing and the check of our signature on what it consumed
    /// (`route_sign`), and what they tell the router; `None` for a malformed Route.
    fn preprocess(&self, request: &mut Message) -> Option<RouteInfo> {
        let had_route = request.routes().next().is_some();
        let done = preprocess_routes(request, &self.me).ok()?;
        let signature = self.me.check_route(request, &done, wall_clock());
        let own_route_signed = signature.routes(request.method());
        Some(RouteInfo {
            had_route,
            consumed_own_route: done.consumed_own_route,
            own_route_signed,
            signature,
            tracked_call: own_route_signed && self.me.signed_for_tracked_call(&done),
            owner_flow: done.owner_flow,
        })
    }

    /// §16.7 step 8 for a response relayed statelessly (§16.11, the answer to a `forward()`):
    /// our callee's copies in its Record-Route become the caller's, as for a stateful one.
    pub fn sign_stray_response(&self, response: &mut Message) {
        self.me.sign_response_record_route(response, wall_clock());
    }

    /// The Request-URI as the only target (§16.5), unless it names this proxy and no Route is
    /// left to follow.
    fn request_uri_target(&self, request: &Message) -> Option<Target> {
        let has_route = request.routes().next().is_some();
        let for_me = request.request_uri().is_ok_and(|u| self.me.is_myself(&u));
        if for_me && !has_route {
            return None;
        }
        let uri = request.request_uri_bytes().map(|u| request.share(u))?;
        Some(Target::new(uri, 1000))
    }

    /// A CANCEL that matched no transaction (§16.10: it "MUST statelessly forward" it; the
    /// INVITE may have been forwarded statelessly). The router decides where, as for any
    /// request; a router that does not forward it has it answered (481 by default).
    pub fn on_unmatched_cancel(
        &mut self,
        tx: TxId,
        request: Message,
        meta: Meta,
        now: Instant,
        out: &mut RelayActions,
    ) {
        let handled = self.route_unmatched_cancel(tx, request.clone(), meta, now, out);
        reply_if_asked(tx, request, meta, handled, out);
    }

    fn route_unmatched_cancel(
        &mut self,
        tx: TxId,
        mut request: Message,
        meta: Meta,
        now: Instant,
        out: &mut RelayActions,
    ) -> Handled {
        let Some(info) = self.preprocess(&mut request) else {
            return reply(400, "Bad Request (Route)");
        };
        let routed = self.router.route(&mut request, &meta, info);
        self.after_route(Purpose::Cancel { tx }, request, meta, routed, now, out)
            .unwrap_or(Handled::Done)
    }

    /// A CANCEL from upstream matched INVITE server transaction `invite` (§16.10).
    pub fn cancel(&mut self, invite: TxId, now: Instant, out: &mut RelayActions) {
        let mut actions = Vec::new();
        if let Some(call) = self.calls.get_mut(&invite) {
            if let Some(dialogs) = &self.dialogs {
                dialogs.on_cancel(&call.request);
            }
            call.cancelled = true;
            call.context.cancel_all(&mut actions);
            // A branch still resolving was never sent: it ends as the CANCEL asks (§16.10).
            let unsent = call.branches.iter().enumerate().filter_map(|(index, run)| {
                run.as_ref()
                    .filter(|run| run.current.is_none())
                    .map(|_| BranchId(index))
            });
            for branch in unsent.collect::<Vec<_>>() {
                call.context.on_branch_ended(branch, 487, now, &mut actions);
            }
        }
        self.apply(invite, actions, now, out);
    }

    /// An ACK that matched no transaction: the ACK for a 2xx (or for a non-2xx of a request
    /// forwarded statelessly), forwarded statelessly along its route (§16.11, §13.2.2.4) where
    /// the router says; one addressed to us is absorbed. An ACK is never answered.
    pub fn forward_ack(
        &mut self,
        mut ack: Message,
        meta: Meta,
        now: Instant,
        out: &mut RelayActions,
    ) {
        let dropped = |ack: &Message, reason: &str| {
            info!(target: REFUSED, call_id = %call_id(ack), source = %meta.source, transport = %meta.kind, reason, "ACK dropped");
        };
        if detect_loop(&ack, &self.me) {
            return dropped(
                &ack,
                "loop detected (RFC 3261 §16.3 item 4); an ACK is never answered",
            );
        }
        let Some(info) = self.preprocess(&mut ack) else {
            return dropped(&ack, "its Route set cannot be processed");
        };
        let for_me = ack.request_uri().is_ok_and(|u| self.me.is_myself(&u));
        if for_me && ack.routes().next().is_none() {
            return dropped(&ack, "addressed to this proxy with no Route: it acknowledges no transaction or dialog here");
        }
        let routed = self.router.route(&mut ack, &meta, info);
        self.after_route(Purpose::Ack, ack, meta, routed, now, out);
    }

    // ----- client transaction events ------------------------------------------------

    /// The outcome of [`RelayAction::StartClient`]: the client transaction `dest` is
    /// reached through, or why none was started (the branch then tries its next address).
    pub fn on_client_started(
        &mut self,
        purpose: ClientPurpose,
        dest: Destination,
        started: Result<TxId, SendError>,
        now: Instant,
        out: &mut RelayActions,
    ) {
        match purpose {
            ClientPurpose::Branch(attempt) => self.branch_started(attempt, dest, started, now, out),
            ClientPurpose::Bye { bye, end } => self.bye_started(bye, end, dest.addr, started),
        }
    }

    /// An event of a branch's client transaction; `source` is where a response came from
    /// ([`crate::transaction::layer::Upcall::Client`]), given to the router's `on_reply`.
    pub fn on_client_event(
        &mut self,
        client: TxId,
        event: Event,
        source: Option<Meta>,
        now: Instant,
        out: &mut RelayActions,
    ) {
        let Some(&(server, branch)) = self.branch_of.get(&client) else {
            if let Some(dialogs) = &mut self.dialogs {
                let status = match &event {
                    Event::Response(response) => response.status(),
                    _ => None,
                };
                dialogs.on_bye_response(client, status);
            }
            return;
        };
        let fails_over = match &event {
            Event::Timeout | Event::TransportError => true,
            Event::Response(response) => response.status() == Some(503),
            Event::Ack(_) | Event::AckTimeout => false,
        };
        if fails_over && self.fail_over(server, branch, client, now, out) {
            return;
        }
        let mut actions = Vec::new();
        if let Some(call) = self.calls.get_mut(&server) {
            match event {
                Event::Response(mut response) => {
                    let status = response.status().unwrap_or(0);
                    let provisional = status < 200;
                    if let (Some(dialogs), true) = (&self.dialogs, (200..300).contains(&status)) {
                        let answered_via = call
                            .branches
                            .get(branch.0)
                            .and_then(|run| run.as_ref()?.current.as_ref());
                        if let Some((_, hop)) = answered_via {
                            dialogs.on_answer_hop(&call.request, hop);
                        }
                    }
                    let keep = match call.handle {
                        Some(handle) => {
                            let sent_to = call
                                .branches
                                .get(branch.0)
                                .and_then(|run| run.as_ref()?.current.as_ref())
                                .map(|(_, dest)| dest.addr);
                            let source = source
                                .zip(sent_to)
                                .map(|(meta, sent_to)| ReplySource { meta, sent_to });
                            self.router
                                .on_reply(handle, &call.request, &mut response, source)
                        }
                        None => true,
                    };
                    // After the router: the caller's copy binds the Contact it left.
                    self.me
                        .sign_response_record_route(&mut response, wall_clock());
                    let only_our_via =
                        call.context
                            .on_response(branch, response, now, &mut actions);
                    if only_our_via {
                        let callee = source.map(|meta| meta.source);
                        let key = callee.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
                        if self.callee_mistakes.allow(key, now) {
                            warn!(target: "moonroute::proxy::relay", call_id = %call_id(&call.request), source = callee.map(tracing::field::display), transport = source.map(|meta| tracing::field::display(meta.kind)), status, reason = %format_args!("the callee answered with only this proxy's Via (as if to our CANCEL, RFC 3261 §9.1); relayed upstream with the request's Vias, code kept; its next such answers go unlogged for {} s", CALLEE_MISTAKE_LOG_PERIOD.as_secs()), "callee's response repaired");
                        }
                    }
                    if provisional && !keep {
                        info!(target: REFUSED, call_id = %call_id(&call.request), source = source.map(|meta| tracing::field::display(meta.source)), transport = source.map(|meta| tracing::field::display(meta.kind)), status, reason = "the routing script dropped it in on_reply (not forwarded upstream)", "response dropped");
                        // Dropped by the script: the branch still counts as Proceeding (CANCEL
                        // allowed, Timer C reset), only the upstream copy is withheld.
                        actions.retain(|a| !matches!(a, ContextAction::ForwardUpstream(r) if r.status().is_some_and(|c| c < 200)));
                    }
                }
                Event::Timeout => call.context.on_branch_failed(branch, now, &mut actions),
                Event::TransportError => {
                    call.context
                        .on_branch_unreachable(branch, now, &mut actions)
                }
                Event::Ack(_) | Event::AckTimeout => {}
            }
        }
        self.apply(server, actions, now, out);
    }

    /// The shell could not send to `(kind, addr)`: every branch heading there has a transport
    /// error (§8.1.3.1, §17.1.4), which its response context counts as a 503.
    pub fn on_unreachable(
        &mut self,
        kind: TransportKind,
        addr: SocketAddr,
        out: &mut RelayActions,
    ) {
        let failed: Vec<TxId> = self
            .calls
            .values()
            .flat_map(|call| call.branches.iter().flatten())
            .filter_map(|run| run.current.as_ref())
            .filter(|(_, dest)| dest.kind == kind && dest.addr == addr)
            .map(|(tx, _)| *tx)
            .collect();
        for tx in failed {
            // The events come back through the layer as Upcall::Client and reach the branch.
            out.push(RelayAction::FailClient { client: tx });
        }
    }

    /// A transaction ended: forget what pointed at it. An INVITE call answered with a 2xx
    /// lives as long as its server transaction, so every 2xx of every fork still reaches it
    /// (RFC 6026: they all go up); other calls are gone by then (see [`Relay::settle`]).
    pub fn on_terminated(&mut self, tx: TxId) {
        if let Some(dialogs) = &mut self.dialogs {
            dialogs.on_terminated(tx);
        }
        self.branch_of.remove(&tx);
        shrink_if_sparse(&mut self.branch_of);
        if let Some(call) = self.calls.remove(&tx) {
            self.forget(call);
        }
    }

    /// Frees a call, or slims it, once its response context is finished (§16.7: a final
    /// response went upstream and every branch has its own). Its server transaction lingers
    /// 32 s more (Timer J, or RFC 6026's L for an INVITE), absorbing retransmissions by
    /// itself: a call whose context would act on nothing that can still arrive
    /// ([`ResponseContext::is_settled`]) goes now, with the script's state for it; an INVITE
    /// answered with a 2xx keeps what forwarding further 2xx needs (the request and the
    /// script's state, for `on_reply`) and lets go of the rest.
    fn settle(&mut self, server: TxId) {
        let Some(call) = self.calls.get_mut(&server) else {
            return;
        };
        if !call.context.is_finished() {
            return;
        }
        if call.context.is_settled() {
            if let Some(call) = self.calls.remove(&server) {
                for (client, _) in call
                    .branches
                    .iter()
                    .flatten()
                    .filter_map(|r| r.current.as_ref())
                {
                    self.branch_of.remove(client);
                }
                self.forget(call);
            }
            return;
        }
        call.context.shed();
        for run in call.branches.iter_mut().flatten() {
            run.request = None;
            run.remaining = VecDeque::new();
        }
    }

    /// Releases what a call held outside itself, and the maps' room once mostly empty.
    fn forget(&mut self, call: Box<Call>) {
        if let Some(handle) = call.handle {
            self.router.release(handle);
        }
        shrink_if_sparse(&mut self.calls);
        shrink_if_sparse(&mut self.branch_of);
    }

    /// Hands the records of the calls that just ended (by the relay's events, or by the
    /// router's decision: a dialog managed, then answered by the script itself) to the router's
    /// `on_dialog_end` and to the CDR file.
    fn dialogs_after_router(&mut self) {
        let Some(dialogs) = &self.dialogs else {
            return;
        };
        for cdr in dialogs.take_ended() {
            self.router.on_dialog_end(&cdr);
            dialogs.write(&cdr);
        }
    }

    // ----- carrying out the response context's actions ------------------------------

    /// The shell's answer to resolution `id` ([`RelayAction::Resolve`]); a request whose
    /// router was waiting for it is routed on.
    pub fn on_resolved(
        &mut self,
        id: u64,
        result: Result<Vec<Candidate>, ResolveError>,
        now: Instant,
        out: &mut RelayActions,
    ) {
        match self.resolving.remove(&id) {
            None => {}
            Some(Resolving::Route(suspended)) => {
                let Suspended {
                    purpose,
                    mut request,
                    meta,
                    handle,
                } = *suspended;
                let routed = self.router.resume(handle, &mut request, result);
                self.dialogs_after_router();
                let tx = match &purpose {
                    Purpose::Request(NewRequest { tx, .. }) | Purpose::Cancel { tx } => Some(*tx),
                    Purpose::Ack => None,
                };
                let original = request.clone();
                let handled = self.after_route(purpose, request, meta, routed, now, out);
                if let Some((tx, handled)) = tx.zip(handled) {
                    reply_if_asked(tx, original, meta, handled, out);
                }
            }
            Some(Resolving::Forward(forward)) => match result {
                Ok(candidates) => self.send_stateless(&forward, None, &candidates, out),
                Err(error) => forward_failed(&forward, None, &error.to_string()),
            },
            Some(Resolving::Branch { server, branch }) => {
                let waiting = self.calls.get(&server).is_some_and(|call| {
                    call.context.branch_state(branch) == Some(BranchState::Pending)
                });
                if !waiting {
                    // Timer C, or a CANCEL, ended the branch while it was resolving.
                    return;
                }
                let mut more = Vec::new();
                match result {
                    Ok(candidates) => {
                        if let Some(run) = self.run_mut(server, branch) {
                            run.remaining = candidates.into();
                        }
                        let next = self.next_attempt(server);
                        self.attempt(server, branch, next, now, out, &mut more);
                    }
                    Err(error) => {
                        self.branch_unreachable(server, branch, &error.to_string(), now, &mut more)
                    }
                }
                self.apply(server, more, now, out);
            }
        }
    }

    /// Requests and branches waiting for a DNS answer.
    pub fn resolving(&self) -> usize {
        self.resolving.len()
    }

    /// Asks the shell to resolve `query` for `what`; gives `what` back when too many
    /// resolutions are in flight already.
    fn ask_resolve(
        &mut self,
        query: dns::Query,
        what: Resolving,
        out: &mut RelayActions,
    ) -> Result<(), Resolving> {
        if self.resolving.len() >= MAX_RESOLVING {
            warn!(target: "moonroute::proxy::relay", host = %query.host, limit = MAX_RESOLVING, "too many DNS lookups in flight");
            return Err(what);
        }
        self.next_resolve += 1;
        let id = self.next_resolve;
        debug!(target: "moonroute::proxy::relay", host = %query.host, id, "resolving next hop");
        self.resolving.insert(id, what);
        out.push(RelayAction::Resolve { id, query });
        Ok(())
    }
}

/// The wall-clock time, the one clock the relay reads itself: Record-Route signatures expire in
/// wall-clock time, as they outlive the process and other servers check them (`route_sign`,
/// whose functions take it as an explicit `now`).
fn wall_clock() -> SystemTime {
    SystemTime::now()
}

/// Asks the core to answer server transaction `tx` when `handled` says so.
fn reply_if_asked(
    tx: TxId,
    request: Message,
    meta: Meta,
    handled: Handled,
    out: &mut RelayActions,
) {
    if let Handled::Reply(reply) = handled {
        out.push(RelayAction::Reply {
            tx,
            request,
            meta,
            reply,
        });
    }
}

fn reply(code: u16, reason: &'static str) -> Handled {
    Handled::Reply(Reply::new(code, reason))
}

/// A request another node of the cluster sent here over an owner route this server signed
/// (`route_sign`, "Owner routes"): that node's router chose the binding, this one only holds
/// its flow. It is relayed to its Request-URI on that flow, with our Record-Route so the
/// dialog's requests from the caller's side come back through us to the flow too (RFC 5626
/// §5.3, an edge proxy's part). `None` for every other request (the router decides).
fn owner_delivery(request: &Message, info: &RouteInfo) -> Option<Routed> {
    let flow = info.owner_flow?;
    // Only a new request with nothing left to follow: our token names where it goes.
    if request.routes().next().is_some() || request.method() == Some(&Method::Ack) {
        return None;
    }
    let uri = request.request_uri_bytes().map(|u| request.share(u))?;
    debug!(target: "moonroute::proxy::relay", flow = ?flow, "owner route: delivering on the flow this node holds");
    let mut target = Target::new(uri, 1000);
    target.destination = Some(flow);
    Some(Routed::from(Decision::Relay {
        targets: vec![target],
        record_route: true,
        timers: FailureTimers::default(),
    }))
}

impl Relay {
    /// The Call-ID of the request DNS answer `id` resumes (for its log span).
    pub fn call_id_of_resolution(&self, id: u64) -> Option<&[u8]> {
        let request = match self.resolving.get(&id)? {
            Resolving::Branch { server, .. } => &self.calls.get(server)?.request,
            Resolving::Forward(forward) => &forward.request,
            Resolving::Route(suspended) => &suspended.request,
        };
        request.call_id().ok()
    }

    /// The Call-ID of the request a client transaction (a branch) carries.
    pub fn call_id_of_client(&self, client: TxId) -> Option<&[u8]> {
        let (server, _) = self.branch_of.get(&client)?;
        self.calls.get(server)?.request.call_id().ok()
    }
}

#[cfg(test)]
mod sans_io_tests;
