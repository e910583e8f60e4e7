//! The stateful proxy of one event loop: for each request the router relays, a response context
//! (§16.7) whose branches are client transactions of the loop's transaction layer.
//!
//! Owns: the §16.3 checks and loop detection, §16.4 route preprocessing, building each branch's
//! copy (§16.6) and sending it through a client transaction to its next hop, CANCEL of branches
//! (§9.1, §16.10), Timer C (§16.8), passing responses up through the server transaction
//! (§16.7), and forwarding ACKs for 2xx statelessly along their route (§16.11).
//!
//! Branches this proxy creates carry the owning loop's index (`z9hG4bK<hash>.<loop>.<n>`), so a
//! response that the kernel delivers to another loop can be handed back ([`owner_of_branch`]).
//! Next hops must be IP literals (or `localhost`) until RFC 3263 resolution lands; another host
//! makes the branch fail as unreachable (503, which goes upstream as 500).

use std::borrow::Cow;

use crate::location::CommitTicket;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;

use tracing::{debug, info, warn};

use super::request::{
    branch_for, check_request, detect_loop, forward_copy, next_hop, next_hop_of_uri, preload_route,
    preprocess_routes, stateless_branch, ForwardSpec, NextHop, ProxyIdentity,
};
use super::response_context::{BranchId, ContextAction, ResponseContext, Target};
use super::router::{BranchEdit, Decision, FailureDecision, RouteHandle, RouteInfo, Router};
use crate::sip::{Message, Method, ResponseBuilder};
use crate::transaction::client_invite::cancel_for;
use crate::transaction::layer::{LayerOutput, TransactionLayer, TxId};
use crate::transaction::Event;
use crate::transport::{Destination, ListenAddr, Meta, TransportKind};

/// What became of a request handed to the relay.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    /// It is being relayed; its answer will come through the server transaction.
    Relayed,
    /// It was forwarded statelessly or dropped: its server transaction was abandoned.
    Done,
    /// Answer it here (the caller builds the response).
    Reply {
        code: u16,
        reason: Cow<'static, str>,
        unsupported: Option<String>,
        headers: Vec<(String, String)>,
        /// Send it only once this write is on disk.
        wait_for: Option<CommitTicket>,
    },
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
    /// The router's handle for the later hooks of this request.
    handle: Option<RouteHandle>,
    /// The client transaction and destination of each branch, by BranchId.
    branches: Vec<Option<(TxId, Destination)>>,
}

pub struct Relay {
    me: ProxyIdentity,
    supported: Vec<&'static str>,
    loop_index: usize,
    bound: Vec<ListenAddr>,
    timer_c: Duration,
    router: Box<dyn Router>,
    next_unique: u64,
    calls: HashMap<TxId, Call>,
    /// Client transaction → (server transaction, branch).
    branch_of: HashMap<TxId, (TxId, BranchId)>,
    timer_c_queue: BinaryHeap<Reverse<(Instant, TxId, usize)>>,
}

/// The loop index in a branch this proxy created, if it is one.
pub fn owner_of_branch(branch: &[u8]) -> Option<usize> {
    let rest = branch.strip_prefix(b"z9hG4bK")?;
    let mut parts = rest.split(|&b| b == b'.');
    let hash = parts.next()?;
    let owner = parts.next()?;
    let counter = parts.next()?;
    let is_hex = hash.len() == 16 && hash.iter().all(u8::is_ascii_hexdigit);
    let is_number = |p: &[u8]| !p.is_empty() && p.iter().all(u8::is_ascii_digit);
    if !is_hex || !is_number(owner) || !is_number(counter) || parts.next().is_some() {
        return None;
    }
    std::str::from_utf8(owner).ok()?.parse().ok()
}

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
            router,
            next_unique: 0,
            calls: HashMap::new(),
            branch_of: HashMap::new(),
            timer_c_queue: BinaryHeap::new(),
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.timer_c_queue.peek().map(|Reverse((at, _, _))| *at)
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
        mut request: Message,
        meta: Meta,
        now: Instant,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
    ) -> Handled {
        if let Err(r) = check_request(&request, &self.supported) {
            return Handled::Reply {
                code: r.code,
                reason: Cow::Borrowed(r.reason),
                unsupported: r.unsupported,
                headers: Vec::new(),
                wait_for: None,
            };
        }
        if detect_loop(&request, &self.me) {
            return reply(482, "Loop Detected");
        }
        // The loop hash covers the request as received, before its Route is consumed.
        let branch_base = branch_for(&request, "");
        let Some(info) = self.preprocess(&mut request) else {
            return reply(400, "Bad Request (Route)");
        };
        let routed = self.router.route(&mut request, &meta, info);
        let handle = routed.handle;
        let (targets, record_route) = match routed.decision {
            Decision::Relay {
                targets,
                record_route,
            } => (targets, record_route),
            other => {
                if let Some(handle) = handle {
                    self.router.release(handle);
                }
                return self.carry_out_stateless(tx, other, &request, &meta, layer, out);
            }
        };
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
        let is_invite = request.method() == Some(&Method::Invite);
        if is_invite {
            // §16.2: a stateful proxy answers an INVITE it forwards with 100 Trying at once, so
            // the upstream client stops retransmitting (§17.1.1.2).
            let trying = ResponseBuilder::new(&request, 100, "Trying").build();
            layer.respond(tx, 100, trying, now, out);
        }
        let mut actions = Vec::new();
        let context = ResponseContext::new(
            request.clone(),
            targets,
            is_invite,
            self.timer_c,
            now,
            &mut actions,
        );
        let inbound = (meta.kind, meta.local);
        self.calls.insert(
            tx,
            Call {
                context,
                request,
                branch_base,
                inbound,
                record_route,
                handle,
                branches: Vec::new(),
            },
        );
        self.apply(tx, actions, now, layer, out);
        Handled::Relayed
    }

    /// §16.4 route preprocessing, and what it tells the router; `None` for a malformed Route.
    fn preprocess(&self, request: &mut Message) -> Option<RouteInfo> {
        let had_route = request.routes().next().is_some();
        let consumed_own_route = preprocess_routes(request, &self.me).ok()?;
        Some(RouteInfo {
            had_route,
            consumed_own_route,
        })
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

    /// A decision that keeps no response context: a reply (through the server transaction),
    /// a stateless forward (§16.11) or a drop; the last two abandon the server transaction.
    fn carry_out_stateless(
        &mut self,
        tx: TxId,
        decision: Decision,
        request: &Message,
        meta: &Meta,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
    ) -> Handled {
        match decision {
            Decision::Reply {
                code,
                reason,
                headers,
                wait_for,
            } => {
                return Handled::Reply {
                    code,
                    reason,
                    unsupported: None,
                    headers,
                    wait_for,
                }
            }
            Decision::Forward {
                target,
                record_route,
            } => self.forward_stateless(request, target, record_route, meta, out),
            Decision::Drop | Decision::Relay { .. } => {
                debug!(call_id = %String::from_utf8_lossy(request.call_id().unwrap_or(b"")), "dropping request as the router decided");
            }
        }
        layer.abandon_server(tx);
        Handled::Done
    }

    /// §16.11: forwards `request` without a transaction, to `destination` when given (the
    /// Request-URI is left as it is, like Kamailio's `forward(uri)` / `$du`), else where its
    /// Route set or Request-URI says.
    fn forward_stateless(
        &self,
        request: &Message,
        destination: Option<Bytes>,
        record_route: bool,
        meta: &Meta,
        out: &mut Vec<LayerOutput>,
    ) {
        let Some(ruri) = self.request_uri_target(request).map(|t| t.uri).or_else(|| {
            // Addressed to us with nothing to follow: only an explicit destination helps.
            destination.as_ref()?;
            request.request_uri_bytes().map(|u| request.share(u))
        }) else {
            return debug!("not forwarding a request addressed to this proxy");
        };
        let branch = stateless_branch(request);
        let inbound = (meta.kind, meta.local);
        let built = self.build_branch_to(
            request,
            &ruri,
            destination.as_deref(),
            &branch,
            inbound,
            record_route,
        );
        match built {
            Ok((copy, dest)) => out.push(LayerOutput::Send {
                dest,
                data: copy.to_bytes(),
            }),
            Err(reason) => {
                let to = destination.as_deref().unwrap_or(&ruri);
                info!(target = %String::from_utf8_lossy(to), reason, "cannot forward statelessly")
            }
        }
    }

    /// A CANCEL that matched no transaction (§16.10: it "MUST statelessly forward" it; the
    /// INVITE may have been forwarded statelessly). The router decides where, as for any
    /// request; a router that does not forward it has it answered (481 by default).
    pub fn on_unmatched_cancel(
        &mut self,
        tx: TxId,
        mut request: Message,
        meta: Meta,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
    ) -> Handled {
        let Some(info) = self.preprocess(&mut request) else {
            return reply(400, "Bad Request (Route)");
        };
        let routed = self.router.route(&mut request, &meta, info);
        if let Some(handle) = routed.handle {
            self.router.release(handle);
        }
        let decision = match routed.decision {
            // Stateful relay of a CANCEL without its INVITE makes no sense: forward it.
            Decision::Relay { targets, .. } => Decision::Forward {
                target: targets.into_iter().next().map(|t| t.uri),
                record_route: false,
            },
            other => other,
        };
        self.carry_out_stateless(tx, decision, &request, &meta, layer, out)
    }

    /// A CANCEL from upstream matched INVITE server transaction `invite` (§16.10).
    pub fn cancel(
        &mut self,
        invite: TxId,
        now: Instant,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
    ) {
        let mut actions = Vec::new();
        if let Some(call) = self.calls.get_mut(&invite) {
            call.context.cancel_all(&mut actions);
        }
        self.apply(invite, actions, now, layer, out);
    }

    /// An ACK that matched no transaction: the ACK for a 2xx (or for a non-2xx of a request
    /// forwarded statelessly), forwarded statelessly along its route (§16.11, §13.2.2.4) where
    /// the router says; one addressed to us is absorbed. An ACK is never answered.
    pub fn forward_ack(&mut self, mut ack: Message, meta: Meta, out: &mut Vec<LayerOutput>) {
        if detect_loop(&ack, &self.me) {
            debug!("dropping looped ACK");
            return;
        }
        let Some(info) = self.preprocess(&mut ack) else {
            return;
        };
        let for_me = ack.request_uri().is_ok_and(|u| self.me.is_myself(&u));
        if for_me && ack.routes().next().is_none() {
            debug!("absorbing ACK addressed to this proxy");
            return;
        }
        let routed = self.router.route(&mut ack, &meta, info);
        if let Some(handle) = routed.handle {
            self.router.release(handle);
        }
        let (target, record_route) = match routed.decision {
            Decision::Relay {
                targets,
                record_route,
            } => (targets.into_iter().next().map(|t| t.uri), record_route),
            Decision::Forward {
                target,
                record_route,
            } => (target, record_route),
            Decision::Reply { .. } | Decision::Drop => {
                return debug!("dropping ACK as the router decided");
            }
        };
        self.forward_stateless(&ack, target, record_route, &meta, out);
    }

    // ----- client transaction events ------------------------------------------------

    pub fn on_client_event(
        &mut self,
        client: TxId,
        event: Event,
        now: Instant,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
    ) {
        let Some(&(server, branch)) = self.branch_of.get(&client) else {
            return;
        };
        let mut actions = Vec::new();
        if let Some(call) = self.calls.get_mut(&server) {
            match event {
                Event::Response(response) => {
                    let provisional = response.status().is_some_and(|c| c < 200);
                    let keep = match call.handle {
                        Some(handle) => self.router.on_reply(handle, &call.request, &response),
                        None => true,
                    };
                    call.context
                        .on_response(branch, response, now, &mut actions);
                    if provisional && !keep {
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
        self.apply(server, actions, now, layer, out);
    }

    /// The shell could not send to `(kind, addr)`: every branch heading there has a transport
    /// error (§8.1.3.1, §17.1.4), which its response context counts as a 503.
    pub fn on_unreachable(
        &mut self,
        kind: TransportKind,
        addr: SocketAddr,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
    ) {
        let failed: Vec<TxId> = self
            .calls
            .values()
            .flat_map(|call| call.branches.iter().flatten())
            .filter(|(_, dest)| dest.kind == kind && dest.addr == addr)
            .map(|(tx, _)| *tx)
            .collect();
        for tx in failed {
            // The events come back through the layer as Upcall::Client and reach the branch.
            layer.on_transport_error(tx, out);
        }
    }

    /// A transaction ended: forget what pointed at it. A call lives as long as its server
    /// transaction, so every 2xx of every fork still reaches it (RFC 6026: they all go up).
    pub fn on_terminated(&mut self, tx: TxId) {
        self.branch_of.remove(&tx);
        if let Some(handle) = self.calls.remove(&tx).and_then(|call| call.handle) {
            self.router.release(handle);
        }
    }

    pub fn on_timer(
        &mut self,
        now: Instant,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
    ) {
        while let Some(Reverse((at, server, branch))) = self.timer_c_queue.peek().copied() {
            if at > now {
                break;
            }
            self.timer_c_queue.pop();
            let mut actions = Vec::new();
            if let Some(call) = self.calls.get_mut(&server) {
                call.context.on_timer_c(BranchId(branch), now, &mut actions);
            }
            self.apply(server, actions, now, layer, out);
        }
    }

    // ----- carrying out the response context's actions ------------------------------

    fn apply(
        &mut self,
        server: TxId,
        actions: Vec<ContextAction>,
        now: Instant,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
    ) {
        let mut queue: VecDeque<ContextAction> = actions.into();
        while let Some(action) = queue.pop_front() {
            let mut more = Vec::new();
            match action {
                ContextAction::StartBranch { branch, target } => {
                    self.start_branch(server, branch, &target, now, layer, out, &mut more)
                }
                ContextAction::ForwardUpstream(response)
                | ContextAction::FinalUpstream(response) => {
                    let status = response.status().unwrap_or(500);
                    layer.respond(server, status, response.to_bytes(), now, out);
                }
                ContextAction::Cancel(branches) => {
                    for branch in branches {
                        self.cancel_branch(server, branch, now, layer, out);
                    }
                }
                ContextAction::StartTimerC { branch, at } => {
                    self.timer_c_queue.push(Reverse((at, server, branch.0)));
                }
                ContextAction::BranchSetFailed { best } => {
                    let Some(call) = self.calls.get_mut(&server) else {
                        continue;
                    };
                    match self.router.on_failure(call.handle, &call.request, &best) {
                        FailureDecision::Targets(targets) if !targets.is_empty() => {
                            call.context.add_targets(targets, now, &mut more)
                        }
                        _ => call.context.send_final(&mut more),
                    }
                }
            }
            queue.extend(more);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_branch(
        &mut self,
        server: TxId,
        branch: BranchId,
        target: &Target,
        now: Instant,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
        more: &mut Vec<ContextAction>,
    ) {
        let Some(call) = self.calls.get(&server) else {
            return;
        };
        self.next_unique += 1;
        let branch_id = format!(
            "{}{}.{}",
            call.branch_base, self.loop_index, self.next_unique
        );
        let edit = match call.handle {
            Some(handle) => self.router.on_branch(handle, &call.request, target),
            None => BranchEdit::Unchanged,
        };
        let edit = match (edit, target.route.is_empty()) {
            (BranchEdit::Unchanged, false) => match preload_route(&call.request, &target.route) {
                Ok(request) => BranchEdit::Edited(with_request_uri(request, &target.uri)),
                Err(_) => BranchEdit::Skip,
            },
            (BranchEdit::Edited(request), false) => match preload_route(&request, &target.route) {
                Ok(request) => BranchEdit::Edited(request),
                Err(_) => BranchEdit::Skip,
            },
            (edit, _) => edit,
        };
        let built = match &edit {
            BranchEdit::Unchanged => self.build_branch(
                &call.request,
                &target.uri,
                &branch_id,
                call.inbound,
                call.record_route,
            ),
            BranchEdit::Edited(request) => {
                let uri = request
                    .request_uri_bytes()
                    .map(|u| request.share(u))
                    .unwrap_or_else(|| target.uri.clone());
                self.build_branch(request, &uri, &branch_id, call.inbound, call.record_route)
            }
            BranchEdit::Skip => Err("skipped by the router"),
        };
        let sent = built.and_then(|(copy, dest)| {
            layer
                .send_request(copy, dest.clone(), now, out)
                .map(|tx| (tx, dest))
                .map_err(|e| {
                    warn!(error = ?e, "cannot start a client transaction");
                    "transaction layer refused"
                })
        });
        let Some(call) = self.calls.get_mut(&server) else {
            return;
        };
        match sent {
            Ok((client, dest)) => {
                if call.branches.len() <= branch.0 {
                    call.branches.resize(branch.0 + 1, None);
                }
                call.branches[branch.0] = Some((client, dest));
                self.branch_of.insert(client, (server, branch));
            }
            Err(reason) => {
                info!(target = %String::from_utf8_lossy(&target.uri), reason, "branch unreachable");
                call.context.on_branch_unreachable(branch, now, more);
            }
        }
    }

    /// The copy for one target and where it goes (§16.6 steps 1-8, 10).
    fn build_branch(
        &self,
        request: &Message,
        target: &[u8],
        branch: &str,
        inbound: (TransportKind, SocketAddr),
        record_route: bool,
    ) -> Result<(Message, Destination), &'static str> {
        self.build_branch_to(request, target, None, branch, inbound, record_route)
    }

    /// [`Relay::build_branch`], sent to `destination` instead of the copy's own next hop
    /// when one is given.
    fn build_branch_to(
        &self,
        request: &Message,
        target: &[u8],
        destination: Option<&[u8]>,
        branch: &str,
        inbound: (TransportKind, SocketAddr),
        record_route: bool,
    ) -> Result<(Message, Destination), &'static str> {
        let spec = |outbound| ForwardSpec {
            target,
            record_route,
            inbound,
            outbound,
            branch,
            me: &self.me,
        };
        // A first copy tells the next hop (Route or the new Request-URI), and so the transport.
        let first =
            forward_copy(request, &spec(inbound)).map_err(|_| "cannot build the forwarded copy")?;
        let hop = match destination {
            Some(uri) => next_hop_of_uri(uri).map_err(|_| "the destination is not a SIP URI")?,
            None => next_hop(&first).map_err(|_| "no next hop")?,
        };
        let (kind, addr) = resolve(&hop)?;
        // RFC 5922 §4: the certificate must prove the domain the URI names.
        let tls_name =
            (kind == TransportKind::Tls).then(|| std::sync::Arc::from(hop.host.as_str()));
        let local = self
            .local_for(kind, addr)
            .ok_or("no listener for the next hop's transport")?;
        let copy = if (kind, local) == inbound {
            first
        } else {
            forward_copy(request, &spec((kind, local)))
                .map_err(|_| "cannot build the forwarded copy")?
        };
        Ok((
            copy,
            Destination {
                kind,
                addr,
                conn: None,
                local: Some(local),
                tls_name,
            },
        ))
    }

    /// Our listening address for `kind` in the family of `dest`.
    fn local_for(&self, kind: TransportKind, dest: SocketAddr) -> Option<SocketAddr> {
        self.bound
            .iter()
            .find(|l| l.kind == kind && l.addr.is_ipv4() == dest.is_ipv4())
            .map(|l| l.addr)
    }

    fn cancel_branch(
        &mut self,
        server: TxId,
        branch: BranchId,
        now: Instant,
        layer: &mut TransactionLayer,
        out: &mut Vec<LayerOutput>,
    ) {
        let Some(Some((client, dest))) = self
            .calls
            .get(&server)
            .and_then(|c| c.branches.get(branch.0))
            .cloned()
        else {
            return;
        };
        let Some(invite) = layer.client_request(client) else {
            return;
        };
        let Ok(cancel) = Message::parse(cancel_for(invite)) else {
            return;
        };
        // The CANCEL's own transaction: its 200 needs no action (§16.10: the branch's final
        // arrives through the INVITE's transaction).
        if let Err(e) = layer.send_request(cancel, dest, now, out) {
            debug!(error = ?e, "CANCEL not sent");
        }
    }
}

/// `request` addressed to `uri` (the target's Request-URI, §16.6 step 2), for a branch copy
/// edited before [`Relay::build_branch`] (which then takes the Request-URI from the copy).
/// An unusable URI is left for the branch build to refuse.
fn with_request_uri(mut request: Message, uri: &[u8]) -> Message {
    let _ = request.set_request_uri(uri);
    request
}

fn reply(code: u16, reason: &'static str) -> Handled {
    Handled::Reply {
        code,
        reason: Cow::Borrowed(reason),
        unsupported: None,
        headers: Vec::new(),
        wait_for: None,
    }
}

/// The next hop's transport and address. Without RFC 3263 resolution (a later issue) only IP
/// literals and `localhost` are reachable.
fn resolve(hop: &NextHop) -> Result<(TransportKind, SocketAddr), &'static str> {
    let kind = match hop.transport {
        Some(kind) => kind,
        None if hop.secure => TransportKind::Tls,
        None => TransportKind::Udp,
    };
    let ip: IpAddr = if hop.host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        hop.host
            .parse()
            .map_err(|_| "next hop is a host name and DNS is not available yet")?
    };
    let port = hop.port.unwrap_or(if hop.secure { 5061 } else { 5060 });
    Ok((kind, SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branches_name_their_loop() {
        assert_eq!(owner_of_branch(b"z9hG4bK0123456789abcdef.1.42"), Some(1));
        assert_eq!(owner_of_branch(b"z9hG4bK0123456789abcdef.0.7"), Some(0));
        assert_eq!(owner_of_branch(b"z9hG4bK0123456789abcdef.ack"), None);
        assert_eq!(owner_of_branch(b"z9hG4bKsomebodyelse"), None);
        assert_eq!(owner_of_branch(b"z9hG4bK0123456789abcdex.1.2"), None);
        assert_eq!(owner_of_branch(b"z9hG4bK0123456789abcdef.1.2.3"), None);
    }
}
