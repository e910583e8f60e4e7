//! One event loop's transaction layer (RFC 3261 §17): matches every received message to its
//! transaction (§17.1.3, §17.2.3), creates server transactions for new requests and client
//! transactions for requests the core sends, drives the four state machines, keeps their timers
//! in a deadline heap, and tells the core (the transaction user) what it must know.
//!
//! Sans-IO like the machines: inputs carry `now`, outputs are [`LayerOutput`]s the shell carries
//! out.
//!
//! Memory is bounded by a budget in bytes (`limits.transaction_memory_mb`), shared by the
//! layers of all event loops: each transaction is charged what it holds (its entry, its key,
//! the messages it may send again) and what its user keeps for it (the proxy's call state,
//! [`TransactionLayer::charge_user_state`]), recomputed whenever it changes, and a new request
//! arriving while the live transactions hold the budget is answered 503 with Retry-After
//! (§21.5.4). Transactions stay lean in their wait states: once a final response has been
//! sent or received, a machine keeps only what absorbing retransmissions needs (the last
//! response, or an ACK), and keys are copied out of the request so they do not keep the
//! whole received message alive for the 32 s of Timers J, L and M. A terminated transaction
//! is freed at once; timer entries of terminated transactions are compacted away once they
//! outnumber the live ones, and the maps give back their room when they are mostly empty
//! again after a burst ([`crate::memory`]).

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::mem::size_of;
use std::time::Instant;

use bytes::Bytes;
use tracing::{debug, warn};

use super::client_invite::InviteClient;
use super::client_non_invite::NonInviteClient;
use super::key::{ClientKey, ServerKey};
use super::metrics::{OverloadReason, TransactionKind, TransactionMetrics};
use super::server_invite::InviteServer;
use super::server_non_invite::NonInviteServer;
use super::{Action, Event, Timer, TimerValues};
use crate::id_map::IdMap;
use crate::logging::{call_id, REFUSED};
use crate::memory::{shrink_heap_if_sparse, shrink_if_sparse};
use crate::sip::{Message, Method, ResponseBuilder};
use crate::transport::{response_destination, Destination, Meta};

/// Identifies a transaction within one layer (client and server share the numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId(pub u64);

#[derive(Clone, Copy, Debug)]
pub struct LayerConfig {
    pub timers: TimerValues,
    /// Bytes the live transactions of every loop may hold together (see the module doc); a
    /// new request beyond it is refused with 503. Client transactions, which only requests
    /// already accepted start, may go a quarter beyond it before they are refused too.
    pub memory_budget: usize,
    /// Live transactions (client + server) this loop keeps at most: the deprecated
    /// `limits.max_transactions`, off (`usize::MAX`) unless configured.
    pub max_live: usize,
    /// Send 100 Trying as soon as an INVITE server transaction starts (§16.2: a proxy does,
    /// since forwarding takes longer than 200 ms whenever the callee is a person).
    pub send_trying: bool,
    /// Retry-After seconds in the 503 sent when the cap is reached.
    pub retry_after_secs: u32,
}

impl Default for LayerConfig {
    fn default() -> Self {
        LayerConfig {
            timers: TimerValues::default(),
            memory_budget: DEFAULT_MEMORY_BUDGET,
            max_live: usize::MAX,
            send_trying: true,
            retry_after_secs: 5,
        }
    }
}

/// `limits.transaction_memory_mb`'s default, in bytes.
pub const DEFAULT_MEMORY_BUDGET: usize = 512 << 20;

/// What the layer tells the core.
#[derive(Debug)]
pub enum Upcall {
    /// A request that started a new server transaction; answer it with [`TransactionLayer::respond`].
    Request {
        tx: TxId,
        request: Message,
        meta: Meta,
    },
    /// A CANCEL, in its own transaction `tx`, with the INVITE server transaction it targets when
    /// that one is live (§9.2).
    Cancel {
        tx: TxId,
        cancelled: Option<TxId>,
        request: Message,
        meta: Meta,
    },
    /// An ACK that matched no transaction: the ACK for a 2xx, routed end to end (§13.2.2.4,
    /// §16.4), or a stray.
    Ack { request: Message, meta: Meta },
    /// An event of a client transaction (responses, Timeout, TransportError). `source` is
    /// the transport information of the response that caused it (`None` for the others): a
    /// proxy checking for a NATed UAS compares it with the response's Contact.
    Client {
        tx: TxId,
        event: Event,
        source: Option<Meta>,
    },
    /// An event of a server transaction (Ack while Accepted, AckTimeout, TransportError).
    Server { tx: TxId, event: Event },
    /// A response that matched no client transaction (§17.1.3); the proxy forwards it
    /// statelessly or drops it (§16.7, §16.11).
    StrayResponse { response: Message, meta: Meta },
    /// The transaction ended and was forgotten.
    Terminated { tx: TxId },
}

#[derive(Debug)]
pub enum LayerOutput {
    Send { dest: Destination, data: Bytes },
    Up(Upcall),
}

/// Why [`TransactionLayer::send_request`] refused to start a client transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The memory budget (or the deprecated live-transaction cap) is exhausted.
    Overloaded,
    /// The request has no top Via with a branch (ours must carry one, §8.1.1.7).
    NoBranch,
    /// ACK never has a transaction of its own (§17.1.1.3).
    Ack,
    /// A transaction with this key is already live.
    Duplicate,
}

enum ClientMachine {
    Invite(InviteClient),
    NonInvite(NonInviteClient),
}

enum ServerMachine {
    Invite(InviteServer),
    NonInvite(NonInviteServer),
}

struct ClientEntry {
    key: ClientKey,
    machine: ClientMachine,
    dest: Destination,
    /// What this transaction is charged against the memory budget now.
    charged: usize,
}

struct ServerEntry {
    key: ServerKey,
    machine: ServerMachine,
    dest: Destination,
    charged: usize,
    /// What the transaction user keeps for this transaction (the proxy's call state), charged
    /// with it: see [`TransactionLayer::charge_user_state`].
    user_state: usize,
}

/// Bytes a transaction costs besides what its machine and key hold: its boxed entry, its
/// share of the two map slots that find it (by id and by key) at the maps' usual fill (a map
/// grows by doubling and runs between 7/16 and 7/8 full: about 3/2 slots per entry), a
/// timer entry or two, and the allocator's overhead on its few allocations. The figures of
/// `tests/transaction_memory.rs` check the estimate against what is measured.
const fn entry_cost(entry: usize, key: usize) -> usize {
    const ALLOCATOR: usize = 4 * 16;
    let slots = (size_of::<(TxId, Box<ServerEntry>)>() + key + size_of::<TxId>() + 2) * 3 / 2;
    let timers = 2 * size_of::<TimerEntry>() * 3 / 2;
    entry + slots + timers + ALLOCATOR
}

const SERVER_ENTRY_COST: usize = entry_cost(size_of::<ServerEntry>(), size_of::<ServerKey>());
const CLIENT_ENTRY_COST: usize = entry_cost(size_of::<ClientEntry>(), size_of::<ClientKey>());

impl ServerEntry {
    fn footprint(&self) -> usize {
        let machine = match &self.machine {
            ServerMachine::Invite(m) => m.retained_bytes(),
            ServerMachine::NonInvite(m) => m.retained_bytes(),
        };
        SERVER_ENTRY_COST + self.key.heap_bytes() + machine + self.user_state
    }
}

impl ClientEntry {
    fn footprint(&self) -> usize {
        let machine = match &self.machine {
            ClientMachine::Invite(m) => m.retained_bytes(),
            ClientMachine::NonInvite(m) => m.retained_bytes(),
        };
        CLIENT_ENTRY_COST + self.key.branch.len() + machine
    }
}

struct TimerEntry {
    at: Instant,
    seq: u64,
    tx: TxId,
    timer: Timer,
}

impl PartialEq for TimerEntry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for TimerEntry {}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

pub struct TransactionLayer {
    config: LayerConfig,
    next_id: u64,
    clients: IdMap<TxId, Box<ClientEntry>>,
    client_keys: HashMap<ClientKey, TxId>,
    servers: IdMap<TxId, Box<ServerEntry>>,
    server_keys: HashMap<ServerKey, TxId>,
    /// What this layer's transactions are charged in all (its share of the budget).
    charged: usize,
    timers: BinaryHeap<Reverse<TimerEntry>>,
    timer_seq: u64,
    /// Requests refused because of the cap, for a log line that cannot become a flood.
    overload_refusals: u64,
    /// Why the core is shedding new requests, if it is, and what share (see
    /// [`TransactionLayer::set_shedding`]).
    shedding: Option<Shedding>,
    /// The refusals owed so far: grows by the share for each sheddable request, one request is
    /// refused each time it reaches 1 (so the refusals are spread evenly, not in bursts).
    shed_credit: f64,
    /// Requests refused while shedding, for the same kind of log line.
    backlog_refusals: u64,
    /// Reused for every machine call, so driving a machine allocates nothing once warm.
    scratch: Vec<Action>,
    /// Transactions created, timed out, live; retransmissions; overload refusals.
    metrics: TransactionMetrics,
}

impl Drop for TransactionLayer {
    fn drop(&mut self) {
        // The live and memory gauges are shared by every loop: take this loop's share out.
        self.metrics.ended(self.live());
        self.metrics.release_memory(self.charged);
    }
}

/// Timer entries kept beyond the live ones before the heap is compacted.
const STALE_TIMER_SLACK: usize = 1024;

impl TransactionLayer {
    pub fn new(config: LayerConfig) -> Self {
        TransactionLayer {
            config,
            next_id: 1,
            clients: IdMap::default(),
            client_keys: HashMap::new(),
            servers: IdMap::default(),
            server_keys: HashMap::new(),
            charged: 0,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            overload_refusals: 0,
            shedding: None,
            shed_credit: 0.0,
            backlog_refusals: 0,
            scratch: Vec::new(),
            metrics: TransactionMetrics::default(),
        }
    }

    /// Counts into `metrics` (the server's `moonroute_transactions_*`, retransmission and
    /// overload families) from now on; call before the first transaction.
    pub fn set_metrics(&mut self, metrics: TransactionMetrics) {
        debug_assert_eq!(self.live(), 0, "metrics set after transactions started");
        self.metrics = metrics;
    }

    /// Whether the core is past one of its overload limits, which (for the log line), and
    /// what share of the new requests to refuse. While it is, that share of the requests that
    /// would start a server transaction outside a dialog, but CANCEL, get a stateless 503 with
    /// Retry-After (RFC 3261 §21.5.4), spread evenly. ACKs, CANCELs, responses,
    /// retransmissions of live transactions and requests inside a dialog (a To tag, §12.2.2:
    /// a BYE, a re-INVITE) are handled as usual: they finish work already accepted, and
    /// refusing them would only make their senders retransmit (RFC 6357 §4).
    pub fn set_shedding(&mut self, shedding: Option<Shedding>) {
        match (self.shedding, shedding) {
            (_, None) => self.shed_credit = 0.0,
            // Half a refusal owed from the start: the share is met to the nearest request.
            (None, Some(_)) => self.shed_credit = 0.5,
            (Some(_), Some(_)) => {}
        }
        self.shedding = shedding;
    }

    /// Why to refuse `request` (a new server transaction, not an ACK) while shedding, if it
    /// must be refused.
    fn sheds(&mut self, request: &Message) -> Option<&'static str> {
        let shedding = self.shedding?;
        if request.method() == Some(&Method::Cancel) || request.is_in_dialog() {
            return None;
        }
        self.shed_credit += shedding.fraction;
        if self.shed_credit < 1.0 {
            return None;
        }
        self.shed_credit -= 1.0;
        Some(shedding.reason)
    }

    /// Live transactions, client and server.
    pub fn live(&self) -> usize {
        self.clients.len() + self.servers.len()
    }

    /// Bytes this layer's live transactions are charged against the memory budget.
    pub fn charged_bytes(&self) -> usize {
        self.charged
    }

    /// The limit a new transaction would pass, if any: the memory budget (held by the live
    /// transactions of every loop; client transactions get a quarter more, see
    /// [`LayerConfig::memory_budget`]) or the deprecated count cap of this loop.
    fn exhausted(&self, side: Side) -> Option<&'static str> {
        let budget = match side {
            Side::Server => self.config.memory_budget,
            Side::Client => self
                .config
                .memory_budget
                .saturating_add(self.config.memory_budget / 4),
        };
        if self.metrics.memory_bytes() >= budget as u64 {
            Some("limits.transaction_memory_mb reached")
        } else if self.live() >= self.config.max_live {
            Some("limits.max_transactions reached")
        } else {
            None
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse(t)| t.at)
    }

    fn new_id(&mut self) -> TxId {
        let id = TxId(self.next_id);
        self.next_id += 1;
        id
    }

    // ----- received requests (§17.2.3) -------------------------------------------------

    /// A validated request from the network: a retransmission or ACK for a live server
    /// transaction goes to it; anything else starts one (or, for an unmatched ACK, goes up).
    pub fn on_request(
        &mut self,
        request: Message,
        meta: Meta,
        now: Instant,
        out: &mut Vec<LayerOutput>,
    ) {
        let key = match ServerKey::of_request(&request) {
            Ok(key) => key,
            Err(error) => {
                warn!(target: REFUSED, call_id = %call_id(&request), source = %meta.source, transport = %meta.kind, reason = %format_args!("no transaction key can be built ({error})"), "message dropped");
                return;
            }
        };
        let is_ack = request.method() == Some(&Method::Ack);
        if let Some(&tx) = self.server_keys.get(&key) {
            return self.pass_to_live_server(tx, request, is_ack, now, out);
        }
        if is_ack {
            if acknowledges_our_503(&request) {
                // §17.2.1: the ACK of a non-2xx final response is hop by hop, ours to absorb;
                // the 503 was stateless, so no transaction does it (nor the script).
                debug!(target: "moonroute::transaction::layer", "ACK of a stateless 503 absorbed");
                return;
            }
            out.push(LayerOutput::Up(Upcall::Ack { request, meta }));
            return;
        }
        if let Some(limit) = self.exhausted(Side::Server) {
            return self.refuse_overloaded(limit, &request, &meta, out);
        }
        if let Some(reason) = self.sheds(&request) {
            return self.refuse_shedding(reason, &request, &meta, out);
        }
        self.start_server(key, request, meta, now, out);
    }

    fn pass_to_live_server(
        &mut self,
        tx: TxId,
        request: Message,
        is_ack: bool,
        now: Instant,
        out: &mut Vec<LayerOutput>,
    ) {
        let mut actions = std::mem::take(&mut self.scratch);
        if !is_ack {
            self.metrics.retransmissions_received.inc();
        }
        if let Some(entry) = self.servers.get_mut(&tx) {
            match (&mut entry.machine, is_ack) {
                (ServerMachine::Invite(m), true) => m.on_ack(request, now, &mut actions),
                (ServerMachine::Invite(m), false) => m.on_retransmission(now, &mut actions),
                (ServerMachine::NonInvite(m), false) => m.on_retransmission(now, &mut actions),
                // An ACK key names INVITE, so it cannot match a non-INVITE transaction.
                (ServerMachine::NonInvite(_), true) => {}
            }
        }
        if !is_ack {
            // §17.2.1/§17.2.2: the last response, sent again for the retransmitted request.
            self.count_resends(&actions);
        }
        self.apply_server(tx, &mut actions, out);
        self.scratch = actions;
    }

    fn start_server(
        &mut self,
        key: ServerKey,
        request: Message,
        meta: Meta,
        now: Instant,
        out: &mut Vec<LayerOutput>,
    ) {
        let Ok(via) = request.top_via() else { return };
        let dest = response_destination(&via, &meta);
        let reliable = meta.kind.is_reliable();
        let tx = self.new_id();
        let mut actions = std::mem::take(&mut self.scratch);
        let method = request.method().cloned();
        let machine = match method {
            Some(Method::Invite) => ServerMachine::Invite(InviteServer::start(
                &request,
                reliable,
                self.config.timers,
                self.config.send_trying,
                now,
                &mut actions,
            )),
            _ => ServerMachine::NonInvite(NonInviteServer::start(reliable, self.config.timers)),
        };
        let cancelled = match method {
            Some(Method::Cancel) => self.server_keys.get(&key.cancelled_invite()).copied(),
            _ => None,
        };
        self.metrics.created(match machine {
            ServerMachine::Invite(_) => TransactionKind::InviteServer,
            ServerMachine::NonInvite(_) => TransactionKind::NonInviteServer,
        });
        // The stored key must not keep the request's buffer alive once the request is gone.
        let key = key.detached();
        self.server_keys.insert(key.clone(), tx);
        let entry = ServerEntry {
            key,
            machine,
            dest,
            charged: 0,
            user_state: 0,
        };
        self.servers.insert(tx, Box::new(entry));
        self.apply_server(tx, &mut actions, out);
        self.scratch = actions;
        let up = match method {
            Some(Method::Cancel) => Upcall::Cancel {
                tx,
                cancelled,
                request,
                meta,
            },
            _ => Upcall::Request { tx, request, meta },
        };
        out.push(LayerOutput::Up(up));
    }

    /// §21.5.4: 503 with Retry-After when the cap is reached, sent statelessly (a transaction
    /// for it would defeat the cap).
    fn refuse_overloaded(
        &mut self,
        limit: &'static str,
        request: &Message,
        meta: &Meta,
        out: &mut Vec<LayerOutput>,
    ) {
        let Ok(via) = request.top_via() else { return };
        self.overload_refusals += 1;
        self.metrics
            .overloaded(match limit.starts_with("limits.max_transactions") {
                true => OverloadReason::MaxTransactions,
                false => OverloadReason::TransactionMemory,
            });
        // One line per refused request, as for any refusal (`moonroute::refused=error` in
        // `log_level` silences them when the log itself would add to the load).
        warn!(
            target: REFUSED,
            call_id = %call_id(request),
            source = %meta.source,
            transport = %meta.kind,
            code = 503,
            live = self.live(),
            memory_mb = self.metrics.memory_bytes() >> 20,
            refused_so_far = self.overload_refusals,
            reason = %format_args!("{limit}: answered 503 with Retry-After"),
            "request refused"
        );
        self.send_503(request, &via, meta, out);
    }

    /// Like [`TransactionLayer::refuse_overloaded`], for the core's own limits.
    fn refuse_shedding(
        &mut self,
        reason: &'static str,
        request: &Message,
        meta: &Meta,
        out: &mut Vec<LayerOutput>,
    ) {
        let Ok(via) = request.top_via() else { return };
        self.backlog_refusals += 1;
        self.metrics.overloaded(overload_reason(reason));
        warn!(
            target: REFUSED,
            call_id = %call_id(request),
            source = %meta.source,
            transport = %meta.kind,
            code = 503,
            refused_so_far = self.backlog_refusals,
            reason = %format_args!("{reason}: answered 503 with Retry-After"),
            "request refused"
        );
        self.send_503(request, &via, meta, out);
    }

    /// A stateless 503 with Retry-After (§21.5.4): the client retries later, elsewhere if it
    /// can (RFC 3263 §4.3), instead of retransmitting into a server that cannot keep up.
    fn send_503(
        &self,
        request: &Message,
        via: &crate::sip::Via<'_>,
        meta: &Meta,
        out: &mut Vec<LayerOutput>,
    ) {
        let retry_after = self.config.retry_after_secs.to_string();
        let data = ResponseBuilder::new(request, 503, "Service Unavailable")
            .to_tag(STATELESS_503_TAG)
            .header("Retry-After", retry_after.as_bytes())
            .build();
        out.push(LayerOutput::Send {
            dest: response_destination(via, meta),
            data,
        });
    }

    /// Charges server transaction `tx` `bytes` more, for what the transaction user keeps as
    /// long as it lives (the proxy's state of a relayed request): the budget then bounds the
    /// memory a request costs, not only its transaction's. Replaces the previous figure;
    /// unknown transactions are ignored.
    pub fn charge_user_state(&mut self, tx: TxId, bytes: usize) {
        if let Some(entry) = self.servers.get_mut(&tx) {
            entry.user_state = bytes;
            self.recharge(Side::Server, tx);
        }
    }

    /// Sends the responses of server transaction `tx` to `dest` from now on: the request's top
    /// Via was changed after the transaction started (a script's `req:force_rport()`, RFC 3581
    /// §4). Unknown transactions are ignored.
    pub fn set_response_destination(&mut self, tx: TxId, dest: Destination) {
        if let Some(entry) = self.servers.get_mut(&tx) {
            entry.dest = dest;
        }
    }

    /// A response from the core for server transaction `tx` (§17.2.1, §17.2.2).
    pub fn respond(
        &mut self,
        tx: TxId,
        status: u16,
        response: Bytes,
        now: Instant,
        out: &mut Vec<LayerOutput>,
    ) {
        let mut actions = std::mem::take(&mut self.scratch);
        match self.servers.get_mut(&tx).map(|e| &mut e.machine) {
            Some(ServerMachine::Invite(m)) => m.respond(status, response, now, &mut actions),
            Some(ServerMachine::NonInvite(m)) => m.respond(status, response, now, &mut actions),
            None => debug!(target: "moonroute::transaction::layer",
                tx = tx.0,
                status, "response for a transaction that has ended"
            ),
        }
        self.apply_server(tx, &mut actions, out);
        self.scratch = actions;
    }

    // ----- requests the core sends, and their responses (§17.1) ---------------------------

    /// Starts a client transaction for `request` (whose top Via is ours) towards `dest`.
    pub fn send_request(
        &mut self,
        request: Message,
        dest: Destination,
        now: Instant,
        out: &mut Vec<LayerOutput>,
    ) -> Result<TxId, SendError> {
        let method = request.method().cloned();
        if method == Some(Method::Ack) {
            return Err(SendError::Ack);
        }
        let key = ClientKey::of_request(&request).map_err(|_| SendError::NoBranch)?;
        if self.client_keys.contains_key(&key) {
            return Err(SendError::Duplicate);
        }
        if self.exhausted(Side::Client).is_some() {
            return Err(SendError::Overloaded);
        }
        let tx = self.new_id();
        let reliable = dest.kind.is_reliable();
        let mut actions = std::mem::take(&mut self.scratch);
        let timers = self.config.timers;
        let machine = match method {
            Some(Method::Invite) => ClientMachine::Invite(InviteClient::start(
                request,
                reliable,
                timers,
                now,
                &mut actions,
            )),
            _ => ClientMachine::NonInvite(NonInviteClient::start(
                request,
                reliable,
                timers,
                now,
                &mut actions,
            )),
        };
        self.metrics.created(match machine {
            ClientMachine::Invite(_) => TransactionKind::InviteClient,
            ClientMachine::NonInvite(_) => TransactionKind::NonInviteClient,
        });
        // Our branch is usually in an edit of the request (the Via we added), but a request
        // sent as it was received would otherwise stay alive through its key.
        let key = ClientKey {
            branch: Bytes::copy_from_slice(&key.branch),
            method: key.method,
        };
        self.client_keys.insert(key.clone(), tx);
        let entry = ClientEntry {
            key,
            machine,
            dest,
            charged: 0,
        };
        self.clients.insert(tx, Box::new(entry));
        self.apply_client(tx, &mut actions, out);
        self.scratch = actions;
        Ok(tx)
    }

    /// A response from the network: to its client transaction, or up as a stray.
    pub fn on_response(
        &mut self,
        response: Message,
        meta: Meta,
        now: Instant,
        out: &mut Vec<LayerOutput>,
    ) {
        let tx = ClientKey::of_response(&response)
            .ok()
            .and_then(|k| self.client_keys.get(&k).copied());
        let Some(tx) = tx else {
            out.push(LayerOutput::Up(Upcall::StrayResponse { response, meta }));
            return;
        };
        let mut actions = std::mem::take(&mut self.scratch);
        match self.clients.get_mut(&tx).map(|e| &mut e.machine) {
            Some(ClientMachine::Invite(m)) => m.on_response(response, now, &mut actions),
            Some(ClientMachine::NonInvite(m)) => m.on_response(response, now, &mut actions),
            None => {}
        }
        self.apply(Side::Client, tx, &mut actions, Some(meta), out);
        self.scratch = actions;
    }

    /// The INVITE a client transaction sent, for building its CANCEL (§9.1).
    /// `None` once the transaction has its final response (there is nothing left to cancel).
    pub fn client_request(&self, tx: TxId) -> Option<&Message> {
        self.clients.get(&tx).and_then(|e| match &e.machine {
            ClientMachine::Invite(m) => m.request(),
            ClientMachine::NonInvite(m) => m.request(),
        })
    }

    /// The shell could not send for transaction `tx` (§17.1.4, §17.2.4).
    pub fn on_transport_error(&mut self, tx: TxId, out: &mut Vec<LayerOutput>) {
        let mut actions = std::mem::take(&mut self.scratch);
        if let Some(entry) = self.clients.get_mut(&tx) {
            match &mut entry.machine {
                ClientMachine::Invite(m) => m.on_transport_error(&mut actions),
                ClientMachine::NonInvite(m) => m.on_transport_error(&mut actions),
            }
            self.apply_client(tx, &mut actions, out);
        } else if let Some(entry) = self.servers.get_mut(&tx) {
            match &mut entry.machine {
                ServerMachine::Invite(m) => m.on_transport_error(&mut actions),
                ServerMachine::NonInvite(m) => m.on_transport_error(&mut actions),
            }
            self.apply_server(tx, &mut actions, out);
        }
        self.scratch = actions;
    }

    // ----- timers ---------------------------------------------------------------------------

    /// Fires every timer due at `now`, in deadline order.
    pub fn on_timer(&mut self, now: Instant, out: &mut Vec<LayerOutput>) {
        while let Some(Reverse(next)) = self.timers.peek() {
            if next.at > now {
                break;
            }
            let Some(Reverse(entry)) = self.timers.pop() else {
                break;
            };
            self.fire(entry.tx, entry.timer, now, out);
        }
        shrink_heap_if_sparse(&mut self.timers);
    }

    fn fire(&mut self, tx: TxId, timer: Timer, now: Instant, out: &mut Vec<LayerOutput>) {
        let mut actions = std::mem::take(&mut self.scratch);
        if let Some(entry) = self.clients.get_mut(&tx) {
            match &mut entry.machine {
                ClientMachine::Invite(m) => m.on_timer(timer, now, &mut actions),
                ClientMachine::NonInvite(m) => m.on_timer(timer, now, &mut actions),
            }
            // Timers A and E: the request sent again.
            self.count_resends(&actions);
            self.apply_client(tx, &mut actions, out);
        } else if let Some(entry) = self.servers.get_mut(&tx) {
            match &mut entry.machine {
                ServerMachine::Invite(m) => m.on_timer(timer, now, &mut actions),
                ServerMachine::NonInvite(m) => m.on_timer(timer, now, &mut actions),
            }
            // Timer G: the final response sent again.
            self.count_resends(&actions);
            self.apply_server(tx, &mut actions, out);
        }
        // else: the transaction ended before its timer; nothing to do.
        self.scratch = actions;
    }

    fn schedule(&mut self, tx: TxId, timer: Timer, at: Instant) {
        self.timer_seq += 1;
        self.timers.push(Reverse(TimerEntry {
            at,
            seq: self.timer_seq,
            tx,
            timer,
        }));
        if self.timers.len() > 4 * self.live() + STALE_TIMER_SLACK {
            self.compact_timers();
        }
    }

    /// Drops the entries of transactions that have ended, keeping memory proportional to the
    /// live transactions even when many end before their timers (reliable transports).
    fn compact_timers(&mut self) {
        let (clients, servers) = (&self.clients, &self.servers);
        let live: Vec<Reverse<TimerEntry>> = std::mem::take(&mut self.timers)
            .into_iter()
            .filter(|Reverse(t)| clients.contains_key(&t.tx) || servers.contains_key(&t.tx))
            .collect();
        let mut timers = BinaryHeap::from(live);
        shrink_heap_if_sparse(&mut timers);
        self.timers = timers;
    }

    // ----- carrying out a machine's actions --------------------------------------------

    fn apply_client(&mut self, tx: TxId, actions: &mut Vec<Action>, out: &mut Vec<LayerOutput>) {
        self.apply(Side::Client, tx, actions, None, out);
    }

    fn apply_server(&mut self, tx: TxId, actions: &mut Vec<Action>, out: &mut Vec<LayerOutput>) {
        self.apply(Side::Server, tx, actions, None, out);
    }

    fn apply(
        &mut self,
        side: Side,
        tx: TxId,
        actions: &mut Vec<Action>,
        source: Option<Meta>,
        out: &mut Vec<LayerOutput>,
    ) {
        // Taken first: a machine may send and terminate in one step (e.g. a final response
        // over a reliable transport).
        let dest = match side {
            Side::Client => self.clients.get(&tx).map(|e| e.dest.clone()),
            Side::Server => self.servers.get(&tx).map(|e| e.dest.clone()),
        };
        let client_kind = match side {
            Side::Client => self.clients.get(&tx).map(|e| match e.machine {
                ClientMachine::Invite(_) => TransactionKind::InviteClient,
                ClientMachine::NonInvite(_) => TransactionKind::NonInviteClient,
            }),
            Side::Server => None,
        };
        for action in actions.drain(..) {
            match action {
                Action::Send(data) => {
                    if let Some(dest) = &dest {
                        out.push(LayerOutput::Send {
                            dest: dest.clone(),
                            data,
                        });
                    }
                }
                Action::StartTimer { timer, at } => self.schedule(tx, timer, at),
                Action::Deliver(event) => {
                    match (&event, client_kind) {
                        (Event::Timeout, Some(kind)) => self.metrics.timed_out(kind),
                        (Event::AckTimeout, _) => {
                            self.metrics.timed_out(TransactionKind::InviteServer)
                        }
                        _ => {}
                    }
                    let up = match side {
                        Side::Client => {
                            let source = source.filter(|_| matches!(event, Event::Response(_)));
                            Upcall::Client { tx, event, source }
                        }
                        Side::Server => Upcall::Server { tx, event },
                    };
                    out.push(LayerOutput::Up(up));
                }
                Action::Terminated => {
                    if self.forget(side, tx) {
                        out.push(LayerOutput::Up(Upcall::Terminated { tx }));
                    }
                }
            }
        }
        self.recharge(side, tx);
    }

    /// Charges transaction `tx` what it holds now (after a step of its machine, which may
    /// have kept or let go of a message).
    fn recharge(&mut self, side: Side, tx: TxId) {
        let (charged, now) = match side {
            Side::Client => match self.clients.get_mut(&tx) {
                Some(e) => {
                    let now = e.footprint();
                    (&mut e.charged, now)
                }
                None => return,
            },
            Side::Server => match self.servers.get_mut(&tx) {
                Some(e) => {
                    let now = e.footprint();
                    (&mut e.charged, now)
                }
                None => return,
            },
        };
        let before = std::mem::replace(charged, now);
        if now != before {
            self.charged = self.charged + now - before;
            self.metrics.charge_memory(before, now);
        }
    }

    /// Ends server transaction `tx` without a response: the request was forwarded statelessly
    /// or dropped by the routing script (§16.11: a stateless proxy keeps no transaction, so a
    /// retransmission is routed again). Its timers fire into nothing and are compacted away.
    pub fn abandon_server(&mut self, tx: TxId) {
        self.forget(Side::Server, tx);
    }

    /// Counts the sends among `actions`: a machine driven by a timer or by a retransmitted
    /// request only ever sends something again.
    fn count_resends(&self, actions: &[Action]) {
        let sends = actions
            .iter()
            .filter(|a| matches!(a, Action::Send(_)))
            .count();
        if sends > 0 {
            self.metrics.retransmissions_sent.add(sends as u64);
        }
    }

    /// Frees a terminated transaction and its key; false if it was already gone.
    fn forget(&mut self, side: Side, tx: TxId) -> bool {
        let forgotten = self.forget_entry(side, tx);
        if forgotten {
            self.metrics.ended(1);
        }
        forgotten
    }

    fn forget_entry(&mut self, side: Side, tx: TxId) -> bool {
        let charged = match side {
            Side::Client => self.clients.remove(&tx).map(|e| {
                self.client_keys.remove(&e.key);
                shrink_if_sparse(&mut self.clients);
                shrink_if_sparse(&mut self.client_keys);
                e.charged
            }),
            Side::Server => self.servers.remove(&tx).map(|e| {
                self.server_keys.remove(&e.key);
                shrink_if_sparse(&mut self.servers);
                shrink_if_sparse(&mut self.server_keys);
                e.charged
            }),
        };
        let Some(charged) = charged else {
            return false;
        };
        self.charged -= charged;
        self.metrics.release_memory(charged);
        true
    }
}

/// The limit a shedding reason names (see [`TransactionLayer::set_shedding`]): the reasons
/// start with their `limits.*` key.
fn overload_reason(reason: &str) -> OverloadReason {
    if reason.starts_with("limits.overload_after_ms") {
        OverloadReason::Saturated
    } else {
        OverloadReason::MaxBacklog
    }
}

/// Why and how much the core sheds (see [`TransactionLayer::set_shedding`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shedding {
    /// The limit, starting with its `limits.*` key, for the log line and the metric.
    pub reason: &'static str,
    /// The share of new requests to refuse, from 0 to 1 (everything).
    pub fraction: f64,
}

/// The To tag of the 503s sent without a transaction, recognised in their ACKs.
const STATELESS_503_TAG: &[u8] = b"mr503";

/// An ACK for a 503 this layer sent without a transaction (its To tag is ours).
fn acknowledges_our_503(ack: &Message) -> bool {
    ack.to().is_ok_and(|to| to.tag() == Some(STATELESS_503_TAG))
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Server,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transport::TransportKind;

    /// The next hop of the client transactions these tests start.
    fn destination(kind: TransportKind) -> Destination {
        Destination {
            kind,
            addr: "127.0.0.1:5080".parse().unwrap(),
            conn: None,
            local: None,
            tls_name: None,
            reuse_only: false,
        }
    }

    fn meta(kind: TransportKind) -> Meta {
        Meta {
            kind,
            source: "127.0.0.1:5070".parse().unwrap(),
            local: "127.0.0.1:5060".parse().unwrap(),
            conn: None,
            worker: 0,
        }
    }

    fn request(method: &str, branch: &str, cseq_method: &str) -> Message {
        let text = format!(
            "{method} sip:bob@127.0.0.1:5080 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch={branch}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>\r\n\
             Call-ID: layer-test@127.0.0.1\r\nCSeq: 1 {cseq_method}\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(Bytes::from(text)).unwrap()
    }

    fn response_to(req: &Message, code: u16) -> Message {
        Message::parse(
            ResponseBuilder::new(req, code, "Test")
                .to_tag(b"b1")
                .build(),
        )
        .unwrap()
    }

    fn sends(out: &[LayerOutput]) -> Vec<u16> {
        out.iter()
            .filter_map(|o| match o {
                LayerOutput::Send { data, .. } => {
                    Message::parse(data.clone()).ok().and_then(|m| m.status())
                }
                _ => None,
            })
            .collect()
    }

    fn layer() -> TransactionLayer {
        TransactionLayer::new(LayerConfig::default())
    }

    fn shed_all(reason: &'static str) -> Option<Shedding> {
        Some(Shedding {
            reason,
            fraction: 1.0,
        })
    }

    /// `request` with a To tag: inside a dialog.
    fn in_dialog_request(method: &str, branch: &str) -> Message {
        let text = String::from_utf8(request(method, branch, method).to_bytes().to_vec())
            .unwrap()
            .replace(
                "To: <sip:bob@example.com>",
                "To: <sip:bob@example.com>;tag=b1",
            );
        Message::parse(Bytes::from(text)).unwrap()
    }

    #[test]
    fn shedding_a_share_refuses_evenly_and_never_inside_a_dialog() {
        let mut l = layer();
        let now = Instant::now();
        let mut out = Vec::new();
        l.set_shedding(Some(Shedding {
            reason: "limits.overload_after_ms (test)",
            fraction: 0.25,
        }));
        let mut refused = Vec::new();
        for n in 0..8 {
            out.clear();
            let branch = format!("z9hG4bKshare{n}");
            l.on_request(
                request("INVITE", &branch, "INVITE"),
                meta(TransportKind::Udp),
                now,
                &mut out,
            );
            refused.push(sends(&out) == [503]);
            // A BYE inside a dialog in between is never refused.
            out.clear();
            l.on_request(
                in_dialog_request("BYE", &format!("z9hG4bKbye{n}")),
                meta(TransportKind::Udp),
                now,
                &mut out,
            );
            assert!(
                matches!(out.last(), Some(LayerOutput::Up(Upcall::Request { .. }))),
                "{out:?}"
            );
        }
        assert_eq!(
            refused,
            [false, true, false, false, false, true, false, false]
        );
    }

    #[test]
    fn the_ack_of_a_stateless_503_is_absorbed() {
        let mut l = layer();
        let now = Instant::now();
        let mut out = Vec::new();
        l.set_shedding(shed_all("test"));
        let invite = request("INVITE", "z9hG4bKack503", "INVITE");
        l.on_request(invite.clone(), meta(TransportKind::Udp), now, &mut out);
        let answer = match out.as_slice() {
            [LayerOutput::Send { data, .. }] => Message::parse(data.clone()).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(answer.status(), Some(503));
        let tag = answer.to().unwrap().tag().unwrap().to_vec();
        // The client's ACK (§17.1.1.3: its To is the response's, with our tag).
        let ack = String::from_utf8(request("ACK", "z9hG4bKack503", "ACK").to_bytes().to_vec())
            .unwrap()
            .replace(
                "To: <sip:bob@example.com>",
                &format!(
                    "To: <sip:bob@example.com>;tag={}",
                    String::from_utf8(tag).unwrap()
                ),
            );
        out.clear();
        l.on_request(
            Message::parse(Bytes::from(ack)).unwrap(),
            meta(TransportKind::Udp),
            now,
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn invite_gets_trying_retransmission_is_absorbed_and_ack_matches() {
        let mut l = layer();
        let now = Instant::now();
        let mut out = Vec::new();
        let invite = request("INVITE", "z9hG4bKinv1", "INVITE");
        l.on_request(invite.clone(), meta(TransportKind::Udp), now, &mut out);
        assert_eq!(sends(&out), [100], "100 Trying at once (§16.2)");
        let tx = match out.last() {
            Some(LayerOutput::Up(Upcall::Request { tx, .. })) => *tx,
            other => panic!("{other:?}"),
        };
        out.clear();
        l.on_request(invite.clone(), meta(TransportKind::Udp), now, &mut out);
        assert_eq!(
            sends(&out),
            [100],
            "retransmission answered with the last provisional"
        );
        assert!(
            !out.iter().any(|o| matches!(o, LayerOutput::Up(_))),
            "and not passed up"
        );
        out.clear();
        let busy = ResponseBuilder::new(&invite, 486, "Busy Here")
            .to_tag(b"b1")
            .build();
        l.respond(tx, 486, busy, now, &mut out);
        assert_eq!(sends(&out), [486]);
        out.clear();
        l.on_request(
            request("ACK", "z9hG4bKinv1", "ACK"),
            meta(TransportKind::Udp),
            now,
            &mut out,
        );
        assert!(out.is_empty(), "ACK for the 486 is absorbed: {out:?}");
        // Timer I (T4) ends it.
        l.on_timer(now + Duration::from_secs(6), &mut out);
        assert!(out
            .iter()
            .any(|o| matches!(o, LayerOutput::Up(Upcall::Terminated { tx: t }) if *t == tx)));
        assert_eq!(l.live(), 0);
    }

    #[test]
    fn unmatched_ack_goes_up_and_cancel_names_its_invite() {
        let mut l = layer();
        let now = Instant::now();
        let mut out = Vec::new();
        l.on_request(
            request("ACK", "z9hG4bKother", "ACK"),
            meta(TransportKind::Udp),
            now,
            &mut out,
        );
        assert!(matches!(
            out.as_slice(),
            [LayerOutput::Up(Upcall::Ack { .. })]
        ));
        out.clear();
        l.on_request(
            request("INVITE", "z9hG4bKc1", "INVITE"),
            meta(TransportKind::Udp),
            now,
            &mut out,
        );
        let invite_tx = out.iter().find_map(|o| match o {
            LayerOutput::Up(Upcall::Request { tx, .. }) => Some(*tx),
            _ => None,
        });
        out.clear();
        l.on_request(
            request("CANCEL", "z9hG4bKc1", "CANCEL"),
            meta(TransportKind::Udp),
            now,
            &mut out,
        );
        match out.last() {
            Some(LayerOutput::Up(Upcall::Cancel { cancelled, .. })) => {
                assert_eq!(*cancelled, invite_tx)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn client_transaction_delivers_responses_and_times_out() {
        let mut l = layer();
        let now = Instant::now();
        let mut out = Vec::new();
        let dest = destination(TransportKind::Udp);
        let options = request("OPTIONS", "z9hG4bKcli1", "OPTIONS");
        let tx = l
            .send_request(options.clone(), dest.clone(), now, &mut out)
            .unwrap();
        assert!(matches!(out.as_slice(), [LayerOutput::Send { .. }]));
        assert_eq!(
            l.send_request(options.clone(), dest.clone(), now, &mut out),
            Err(SendError::Duplicate)
        );
        out.clear();
        l.on_response(
            response_to(&options, 200),
            meta(TransportKind::Udp),
            now,
            &mut out,
        );
        assert!(out.iter().any(|o| matches!(o, LayerOutput::Up(Upcall::Client { tx: t, event: Event::Response(_), .. }) if *t == tx)));
        out.clear();
        // A response nobody asked for is stray.
        let stray = response_to(&request("OPTIONS", "z9hG4bKnobody", "OPTIONS"), 200);
        l.on_response(stray, meta(TransportKind::Udp), now, &mut out);
        assert!(matches!(
            out.as_slice(),
            [LayerOutput::Up(Upcall::StrayResponse { .. })]
        ));

        // An unanswered INVITE: A retransmits, B (64*T1) times out.
        out.clear();
        let invite = request("INVITE", "z9hG4bKcli2", "INVITE");
        let tx = l.send_request(invite, dest, now, &mut out).unwrap();
        let mut t = now;
        let mut timeouts = 0;
        let mut sent = 0;
        while let Some(at) = l.next_deadline() {
            t = at.max(t);
            out.clear();
            l.on_timer(t, &mut out);
            sent += out
                .iter()
                .filter(|o| matches!(o, LayerOutput::Send { .. }))
                .count();
            timeouts += out
                .iter()
                .filter(|o| matches!(o, LayerOutput::Up(Upcall::Client { tx: x, event: Event::Timeout, .. }) if *x == tx))
                .count();
        }
        assert_eq!(timeouts, 1);
        assert_eq!(sent, 6, "A fires at 0.5, 1.5, 3.5, 7.5, 15.5 and 31.5 s (intervals doubling from T1), then B at 32 s");
        assert_eq!(l.live(), 0);
    }

    #[test]
    fn metrics_count_transactions_retransmissions_timeouts_and_refusals() {
        let metrics = TransactionMetrics::default();
        let mut l = TransactionLayer::new(LayerConfig {
            max_live: 2,
            ..LayerConfig::default()
        });
        l.set_metrics(metrics.clone());
        let now = Instant::now();
        let mut out = Vec::new();
        // A server transaction, its response, a retransmission of the request: absorbed,
        // answered again (§17.2.2).
        let options = request("OPTIONS", "z9hG4bKmet1", "OPTIONS");
        l.on_request(options.clone(), meta(TransportKind::Udp), now, &mut out);
        let Some(LayerOutput::Up(Upcall::Request { tx, .. })) = out.pop() else {
            panic!("{out:?}")
        };
        l.respond(
            tx,
            200,
            response_to(&options, 200).to_bytes(),
            now,
            &mut out,
        );
        out.clear();
        l.on_request(options, meta(TransportKind::Udp), now, &mut out);
        assert!(
            matches!(out.as_slice(), [LayerOutput::Send { .. }]),
            "{out:?}"
        );
        assert_eq!(metrics.retransmissions_received.get(), 1);
        assert_eq!(metrics.retransmissions_sent.get(), 1);
        assert_eq!(metrics.created_count(TransactionKind::NonInviteServer), 1);
        assert_eq!(metrics.live(), 1);

        // An unanswered INVITE: Timer A sends it 6 more times, Timer B times it out.
        let dest = destination(TransportKind::Udp);
        let invite = request("INVITE", "z9hG4bKmet2", "INVITE");
        l.send_request(invite, dest, now, &mut out).unwrap();
        assert_eq!(metrics.created_count(TransactionKind::InviteClient), 1);
        assert_eq!(metrics.live(), 2);
        // The cap (2) is reached: a new request is refused with 503.
        out.clear();
        l.on_request(
            request("OPTIONS", "z9hG4bKmet3", "OPTIONS"),
            meta(TransportKind::Udp),
            now,
            &mut out,
        );
        assert_eq!(metrics.overload_count(OverloadReason::MaxTransactions), 1);
        let mut t = now;
        while let Some(at) = l.next_deadline() {
            t = at.max(t);
            l.on_timer(t, &mut out);
        }
        assert_eq!(metrics.timed_out_count(TransactionKind::InviteClient), 1);
        assert_eq!(metrics.retransmissions_sent.get(), 1 + 6);
        assert_eq!(metrics.live(), 0, "both ended");

        l.set_shedding(shed_all("limits.max_backlog reached (test)"));
        l.on_request(
            request("OPTIONS", "z9hG4bKmet4", "OPTIONS"),
            meta(TransportKind::Udp),
            t,
            &mut out,
        );
        assert_eq!(metrics.overload_count(OverloadReason::MaxBacklog), 1);
        drop(l);
        assert_eq!(metrics.live(), 0);
    }

    #[test]
    fn dropping_a_layer_takes_its_live_transactions_out_of_the_gauge() {
        let metrics = TransactionMetrics::default();
        let mut l = layer();
        l.set_metrics(metrics.clone());
        let mut out = Vec::new();
        l.on_request(
            request("OPTIONS", "z9hG4bKdrop", "OPTIONS"),
            meta(TransportKind::Udp),
            Instant::now(),
            &mut out,
        );
        assert_eq!(metrics.live(), 1);
        drop(l);
        assert_eq!(metrics.live(), 0);
    }

    #[test]
    fn cap_answers_503_with_retry_after() {
        let mut l = TransactionLayer::new(LayerConfig {
            max_live: 1,
            ..LayerConfig::default()
        });
        let now = Instant::now();
        let mut out = Vec::new();
        l.on_request(
            request("OPTIONS", "z9hG4bKcap1", "OPTIONS"),
            meta(TransportKind::Udp),
            now,
            &mut out,
        );
        out.clear();
        l.on_request(
            request("OPTIONS", "z9hG4bKcap2", "OPTIONS"),
            meta(TransportKind::Udp),
            now,
            &mut out,
        );
        let LayerOutput::Send { data, .. } = &out[0] else {
            panic!("{out:?}")
        };
        let answer = Message::parse(data.clone()).unwrap();
        assert_eq!(answer.status(), Some(503));
        assert_eq!(answer.headers_named("Retry-After").next(), Some(&b"5"[..]));
        assert_eq!(l.live(), 1);
    }

    #[test]
    fn the_memory_budget_answers_503_and_frees_up_as_transactions_end() {
        let metrics = TransactionMetrics::default();
        let mut l = TransactionLayer::new(LayerConfig {
            memory_budget: 4096,
            ..LayerConfig::default()
        });
        l.set_metrics(metrics.clone());
        let now = Instant::now();
        let mut out = Vec::new();
        let mut accepted = 0;
        for i in 0..20 {
            let req = request("OPTIONS", &format!("z9hG4bKbudget{i}"), "OPTIONS");
            l.on_request(req.clone(), meta(TransportKind::Udp), now, &mut out);
            let Some(LayerOutput::Up(Upcall::Request { tx, .. })) = out.last() else {
                break;
            };
            let tx = *tx;
            accepted += 1;
            l.respond(tx, 200, response_to(&req, 200).to_bytes(), now, &mut out);
            out.clear();
        }
        assert!((2..20).contains(&accepted), "{accepted} accepted");
        assert_eq!(metrics.memory_bytes(), l.charged_bytes() as u64);
        assert!(l.charged_bytes() >= 4096);
        let refused = sends(&out);
        assert_eq!(refused, [503], "{out:?}");
        assert_eq!(metrics.overload_count(OverloadReason::TransactionMemory), 1);
        // A client transaction of a request already accepted gets a quarter more room.
        let dest = destination(TransportKind::Udp);
        let bye = request("BYE", "z9hG4bKbudgetc", "BYE");
        assert!(l.send_request(bye, dest, now, &mut out).is_ok());
        // Timer J ends them all: the budget is free again.
        l.on_timer(now + Duration::from_secs(40), &mut out);
        assert_eq!(
            (l.live(), l.charged_bytes(), metrics.memory_bytes()),
            (0, 0, 0)
        );
        out.clear();
        l.on_request(
            request("OPTIONS", "z9hG4bKbudgetz", "OPTIONS"),
            meta(TransportKind::Udp),
            now + Duration::from_secs(40),
            &mut out,
        );
        assert!(matches!(
            out.last(),
            Some(LayerOutput::Up(Upcall::Request { .. }))
        ));
        drop(l);
        assert_eq!(
            metrics.memory_bytes(),
            0,
            "a dropped layer takes its share out"
        );
    }

    /// RFC 3261 §17.1.1.2, §17.1.2.2, §17.2.1, §17.2.2: Timers D, K, I and J are zero over
    /// reliable transports, so those wait states end at once; RFC 6026's Accepted states
    /// (Timers L and M) last 64*T1 on every transport, since a 2xx from another fork or the
    /// TU may still come.
    #[test]
    fn over_a_reliable_transport_the_wait_states_of_rfc_3261_last_no_time() {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut tcp = meta(TransportKind::Tcp);
        tcp.conn = Some(crate::transport::ConnectionId(7));
        let dest = destination(TransportKind::Tcp);
        let ended = |out: &[LayerOutput]| {
            out.iter()
                .any(|o| matches!(o, LayerOutput::Up(Upcall::Terminated { .. })))
        };
        let mut l = layer();

        // Non-INVITE server: the final response ends it (Timer J = 0).
        let options = request("OPTIONS", "z9hG4bKrelj", "OPTIONS");
        l.on_request(options.clone(), tcp, now, &mut out);
        let Some(LayerOutput::Up(Upcall::Request { tx, .. })) = out.pop() else {
            panic!()
        };
        l.respond(
            tx,
            200,
            response_to(&options, 200).to_bytes(),
            now,
            &mut out,
        );
        assert!(ended(&out) && l.live() == 0, "J");
        out.clear();

        // INVITE server: the ACK of its 486 ends it (Timer I = 0).
        let invite = request("INVITE", "z9hG4bKreli", "INVITE");
        l.on_request(invite.clone(), tcp, now, &mut out);
        let Some(LayerOutput::Up(Upcall::Request { tx, .. })) = out.pop() else {
            panic!()
        };
        l.respond(tx, 486, response_to(&invite, 486).to_bytes(), now, &mut out);
        l.on_request(request("ACK", "z9hG4bKreli", "ACK"), tcp, now, &mut out);
        assert!(ended(&out) && l.live() == 0, "I");
        out.clear();

        // Non-INVITE client: its final response ends it (Timer K = 0).
        let bye = request("BYE", "z9hG4bKrelk", "BYE");
        l.send_request(bye.clone(), dest.clone(), now, &mut out)
            .unwrap();
        l.on_response(response_to(&bye, 200), tcp, now, &mut out);
        assert!(ended(&out) && l.live() == 0, "K");
        out.clear();

        // INVITE client: a non-2xx ends it once ACKed (Timer D = 0).
        let invite = request("INVITE", "z9hG4bKreld", "INVITE");
        l.send_request(invite.clone(), dest.clone(), now, &mut out)
            .unwrap();
        l.on_response(response_to(&invite, 486), tcp, now, &mut out);
        assert!(ended(&out) && l.live() == 0, "D");
        out.clear();

        // Accepted (RFC 6026): both sides wait 64*T1 whatever the transport.
        let invite = request("INVITE", "z9hG4bKrell", "INVITE");
        l.on_request(invite.clone(), tcp, now, &mut out);
        let Some(LayerOutput::Up(Upcall::Request { tx, .. })) = out.pop() else {
            panic!()
        };
        l.respond(tx, 200, response_to(&invite, 200).to_bytes(), now, &mut out);
        let outgoing = request("INVITE", "z9hG4bKrelm", "INVITE");
        l.send_request(outgoing.clone(), dest, now, &mut out)
            .unwrap();
        l.on_response(response_to(&outgoing, 200), tcp, now, &mut out);
        assert_eq!(l.live(), 2, "L and M");
        let t1x64 = TimerValues::default().t1x64();
        l.on_timer(now + t1x64, &mut out);
        assert_eq!(l.live(), 0);
    }

    #[test]
    fn a_full_backlog_refuses_new_requests_but_not_retransmissions_acks_or_cancels() {
        let mut l = layer();
        let now = Instant::now();
        let mut out = Vec::new();
        let invite = request("INVITE", "z9hG4bKbl1", "INVITE");
        l.on_request(invite.clone(), meta(TransportKind::Udp), now, &mut out);
        assert!(matches!(
            out.last(),
            Some(LayerOutput::Up(Upcall::Request { .. }))
        ));
        l.set_shedding(shed_all("test"));
        let sent_503 = |out: &[LayerOutput]| {
            out.iter().any(|o| match o {
                LayerOutput::Send { data, .. } => {
                    let answer = Message::parse(data.clone()).unwrap();
                    answer.status() == Some(503)
                        && answer.headers_named("Retry-After").next() == Some(&b"5"[..])
                }
                _ => false,
            })
        };
        // A new request: 503 with Retry-After, no transaction.
        out.clear();
        let live = l.live();
        l.on_request(
            request("OPTIONS", "z9hG4bKbl2", "OPTIONS"),
            meta(TransportKind::Udp),
            now,
            &mut out,
        );
        assert!(sent_503(&out), "{out:?}");
        assert_eq!(l.live(), live);
        // The INVITE's retransmission is absorbed by its transaction, its CANCEL goes up.
        out.clear();
        l.on_request(invite, meta(TransportKind::Udp), now, &mut out);
        assert!(!sent_503(&out), "{out:?}");
        out.clear();
        l.on_request(
            request("CANCEL", "z9hG4bKbl1", "CANCEL"),
            meta(TransportKind::Udp),
            now,
            &mut out,
        );
        assert!(matches!(
            out.last(),
            Some(LayerOutput::Up(Upcall::Cancel { .. }))
        ));
        // A stray ACK still goes up (it may be the ACK of a 2xx, routed end to end).
        out.clear();
        l.on_request(
            request("ACK", "z9hG4bKbl3", "ACK"),
            meta(TransportKind::Udp),
            now,
            &mut out,
        );
        assert!(matches!(
            out.last(),
            Some(LayerOutput::Up(Upcall::Ack { .. }))
        ));
        // Below the limit again: served.
        l.set_shedding(None);
        out.clear();
        l.on_request(
            request("OPTIONS", "z9hG4bKbl4", "OPTIONS"),
            meta(TransportKind::Udp),
            now,
            &mut out,
        );
        assert!(matches!(
            out.last(),
            Some(LayerOutput::Up(Upcall::Request { .. }))
        ));
    }

    #[test]
    fn timer_heap_stays_proportional_to_live_transactions() {
        // Five times the slack: without compaction the stale entries would be ~5x the bound
        // checked below (20,000 took 18 s of a debug test run for the same check).
        const MANY: usize = 5 * STALE_TIMER_SLACK;
        let mut l = layer();
        let now = Instant::now();
        let mut out = Vec::new();
        for i in 0..MANY {
            let req = request("OPTIONS", &format!("z9hG4bKmany{i}"), "OPTIONS");
            l.on_request(req.clone(), meta(TransportKind::Udp), now, &mut out);
            let tx = TxId(l.next_id - 1);
            l.respond(
                tx,
                200,
                ResponseBuilder::new(&req, 200, "OK").build(),
                now,
                &mut out,
            );
            out.clear();
        }
        // Every transaction waits in Completed for Timer J: all live, one timer each.
        assert_eq!(l.live(), MANY);
        l.on_timer(now + Duration::from_secs(40), &mut out);
        assert_eq!(l.live(), 0);
        assert!(l.timers.is_empty());
        // Over a reliable transport they end at once; their stale timers get compacted.
        for i in 0..MANY {
            let mut m = meta(TransportKind::Tcp);
            m.conn = Some(crate::transport::ConnectionId(1));
            let req = request("INVITE", &format!("z9hG4bKrel{i}"), "INVITE");
            l.on_request(req.clone(), m, now, &mut out);
            let tx = TxId(l.next_id - 1);
            l.respond(
                tx,
                486,
                ResponseBuilder::new(&req, 486, "Busy").to_tag(b"x").build(),
                now,
                &mut out,
            );
            l.on_request(
                request("ACK", &format!("z9hG4bKrel{i}"), "ACK"),
                m,
                now,
                &mut out,
            );
            out.clear();
        }
        assert_eq!(l.live(), 0);
        assert!(
            l.timers.len() <= STALE_TIMER_SLACK + 4,
            "{} timer entries kept",
            l.timers.len()
        );
    }
}
