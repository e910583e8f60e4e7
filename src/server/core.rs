//! One event loop's engine, sans-IO: [`Core`] takes the transport shell's inputs (received
//! messages, framing errors, unreachable hops, DNS answers, wake-ups) with an explicit `now`
//! and returns what to send, resolve or hand to another loop ([`Worker`]). [`CoreFactory`]
//! builds one per loop from the configuration.
//!
//! Owns the path of a received message: which loop handles it (`server::affinity`), parsing
//! and the received-side Via processing (§18.2.1, RFC 3581), then either the transaction layer
//! (RFC 3261 §17), whose requests go to the relay (the proxy core, §16, and through it the
//! router) and whose responses go back through their transactions, or a stateless answer. The
//! jobs around that path live in the submodules: `options` (OPTIONS for this server, §11),
//! `refusals` (malformed input, §8.2, RFC 4475), `responses` (how this server words its own
//! answers, §8.2.6), `stray` (responses for another loop or for no transaction, §16.11),
//! `parked` (registrar answers waiting for a durable write, §10.3), `shedding` (refusing new
//! requests under overload), `keepalives` (NAT keep-alives) and `probes` (dispatcher probes).

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, info};

use crate::config::Config;
use crate::dispatcher::probe::Prober;
use crate::location::{CommitState, LocationStore};
use crate::logging::{self, REFUSED};
use crate::metrics::EngineMetrics;
use crate::nat::keepalive::{Scheduler, Settings};
use crate::proxy::relay::{Relay, RelayAction, RelayActions, Reply};
use crate::proxy::router::{BuiltinRouter, Router};
use crate::proxy::{ProxyIdentity, RouteSigner};
use crate::server::affinity::Affinity;
use crate::server::overload::Overload;
use crate::sip::extensions::SUPPORTED;
use crate::sip::{prescan, Message, Method};
use crate::transaction::client_invite::cancel_for;
use crate::transaction::layer::{LayerConfig, LayerOutput, TransactionLayer, TxId, Upcall};
use crate::transport::{
    response_destination, Destination, Input, ListenAddr, LoadSample, Meta, Output, TransportKind,
    Worker, WorkerFactory,
};
use crate::wake::WakeSignal;

/// The Allow header (§20.5) of this server's OPTIONS answers and of every 501: the methods it
/// answers whatever the script decides, which is OPTIONS (§11). What else it serves (REGISTER,
/// relayed INVITEs...) is the script's choice, so it is not promised here.
const ALLOW_ALWAYS: &str = "OPTIONS";
use crate::proxy::identity::LocalIdentity;
use crate::proxy::router::RouterFactory;

#[cfg(test)]
mod failure_timer_tests;
mod keepalives;
mod options;
mod parked;
mod probes;
mod refusals;
mod responses;
mod shedding;
mod stray;

use keepalives::Keepalives;
use parked::{Parked, PARK_TIMEOUT};

pub struct CoreFactory {
    domains: Vec<String>,
    listen: Vec<ListenAddr>,
    /// The global `advertise`, for listeners without their own.
    advertise: Option<crate::transport::Advertise>,
    tag_hasher: RandomState,
    layer: LayerConfig,
    timer_c: Duration,
    /// `[timers] fr_timer_ms`.
    fr_timer: Option<Duration>,
    router: RouterFactory,
    builtin_relays: bool,
    /// `[nat] force_rport`.
    force_rport: bool,
    /// `[nat]` keep-alives, with the store whose NATed bindings get them (see
    /// [`CoreFactory::with_keepalives`]).
    keepalive: Option<(Settings, Arc<dyn LocationStore>)>,
    /// The `[nat]` keep-alive settings, `None` when off.
    keepalive_config: Option<Settings>,
    max_backlog: usize,
    /// `limits.overload_after_ms` (`None`: off).
    overload_after: Option<Duration>,
    /// Signs Record-Route; one for all event loops, so any of them recognises the Route
    /// entries another wrote (see [`CoreFactory::with_route_signer`]).
    route_signer: RouteSigner,
    /// `[proxy] record_route_lifetime_secs`, given to the signer.
    route_lifetime: Duration,
    /// The engine's metric handles, shared by every loop (see [`CoreFactory::with_metrics`]).
    metrics: Arc<EngineMetrics>,
    /// The script's view of open WebSocket flows (see [`CoreFactory::with_flows`]).
    flows: Option<Arc<crate::transport::registry::Flows>>,
    /// `[dialog]`: each loop's dialog table limits, the profile counts all loops share, and
    /// the CDR file.
    dialogs: DialogSetup,
    /// The dispatcher whose destinations the first loop probes
    /// ([`CoreFactory::with_dispatcher`]).
    dispatcher: Option<Arc<crate::dispatcher::Dispatcher>>,
}

/// What each loop's dialog table is made with (`crate::dialog`).
struct DialogSetup {
    limits: crate::dialog::Limits,
    profiles: Arc<crate::dialog::Profiles>,
    cdr: Option<Arc<crate::dialog::CdrSink>>,
    metrics: Arc<crate::dialog::DialogMetrics>,
    directory: Arc<crate::dialog::Directory>,
}

impl DialogSetup {
    fn tracker(&self, index: usize, router: &mut dyn Router) -> crate::dialog::DialogTracker {
        let table = crate::dialog::DialogTable::new(self.limits, Arc::clone(&self.profiles))
            .with_metrics(Arc::clone(&self.metrics))
            .with_directory(Arc::clone(&self.directory), index);
        let table = std::rc::Rc::new(std::cell::RefCell::new(table));
        router.attach_dialogs(std::rc::Rc::clone(&table));
        let cdr = self
            .cdr
            .clone()
            .map(|sink| sink as Arc<dyn crate::dialog::CdrWriter>);
        crate::dialog::DialogTracker::new(table, cdr)
    }
}

impl CoreFactory {
    pub fn new(config: &Config) -> CoreFactory {
        let layer = LayerConfig {
            timers: config.timers.transaction_timers(),
            memory_budget: config.limits.transaction_memory(),
            max_live: config.limits.max_transactions.unwrap_or(usize::MAX),
            // A relayed INVITE gets its 100 Trying from the relay (§16.2); what this core
            // answers itself is answered at once (§17.2.1's 200 ms rule).
            send_trying: false,
            ..LayerConfig::default()
        };
        let static_route = config.proxy.static_route.trim();
        let builtin = BuiltinRouter {
            static_route: (!static_route.is_empty()).then(|| Bytes::from(static_route.to_owned())),
            relay_to_request_uri: config.proxy.relay_to_request_uri,
        };
        let builtin_relays = builtin.relays();
        let router: RouterFactory = Arc::new(move |_, _| Box::new(builtin.clone()));
        CoreFactory {
            domains: config.domains.clone(),
            listen: config.listen.clone(),
            advertise: config.advertise.clone(),
            tag_hasher: RandomState::new(),
            layer,
            timer_c: config.timers.timer_c(),
            fr_timer: config.timers.fr_timer(),
            router,
            builtin_relays,
            force_rport: config.nat.force_rport,
            keepalive: None,
            keepalive_config: config.nat.keepalive_interval().map(|interval| Settings {
                interval,
                max_failures: config.nat.keepalive_failures,
                batch: config.nat.keepalive_batch,
            }),
            max_backlog: config.limits.max_backlog,
            overload_after: config.limits.overload_after(),
            route_signer: RouteSigner::random().with_lifetime(config.proxy.record_route_lifetime()),
            route_lifetime: config.proxy.record_route_lifetime(),
            metrics: EngineMetrics::detached(),
            flows: None,
            dialogs: DialogSetup {
                limits: config.dialog.limits(),
                profiles: crate::dialog::Profiles::new(),
                cdr: config
                    .dialog
                    .cdr_settings(&config.data_dir)
                    .map(crate::dialog::CdrSink::new),
                metrics: crate::dialog::DialogMetrics::detached(),
                directory: crate::dialog::Directory::new(),
            },
            dispatcher: None,
        }
    }

    /// Probes the destinations of `dispatcher` from the first event loop (`[dispatcher]
    /// probe_interval_*`; nothing when probing is off).
    pub fn with_dispatcher(
        mut self,
        dispatcher: Arc<crate::dispatcher::Dispatcher>,
    ) -> CoreFactory {
        self.dispatcher = Some(dispatcher);
        self
    }

    /// Counts into `metrics` (the server's registry, see `metrics::engine`): the loops and
    /// the transport shell. Without it the counts go to a registry nobody serves.
    pub fn with_metrics(mut self, metrics: Arc<EngineMetrics>) -> CoreFactory {
        self.dialogs.metrics =
            crate::dialog::DialogMetrics::register(metrics.registry(), &self.dialogs.profiles);
        self.metrics = metrics;
        self
    }

    /// Signs Record-Route with `signer`, from the server key (`crate::secret::server_key`), so
    /// dialogs stay routable across restarts and across servers sharing the key. Without it
    /// the key is random per process. Its signatures live `[proxy] record_route_lifetime_secs`.
    pub fn with_route_signer(mut self, signer: RouteSigner) -> CoreFactory {
        self.route_signer = signer.with_lifetime(self.route_lifetime);
        self
    }

    /// Lets location lookups through `flows` (the script host's) see which WebSocket
    /// connections are open, so bindings whose connection closed are skipped (RFC 7118 §5).
    pub fn with_flows(mut self, flows: Arc<crate::transport::registry::Flows>) -> CoreFactory {
        self.flows = Some(flows);
        self
    }

    /// Sends `[nat]` keep-alives to the NATed bindings of `store` (from the first event loop;
    /// bindings whose keep-alives fail are removed from it). Nothing when keep-alives are off.
    pub fn with_keepalives(mut self, store: Arc<dyn LocationStore>) -> CoreFactory {
        self.keepalive = self.keepalive_config.map(|settings| (settings, store));
        self
    }

    /// The calls every loop tracks, for `moonroute ctl dlg`.
    pub fn dialog_directory(&self) -> Arc<crate::dialog::Directory> {
        Arc::clone(&self.dialogs.directory)
    }

    /// Whether the `[proxy]` built-in router is configured to relay anything.
    pub fn relays(&self) -> bool {
        self.builtin_relays
    }

    /// The cores of `config` with routing decided by `router` (the script's, or a test's).
    pub fn with_router(config: &Config, router: RouterFactory) -> CoreFactory {
        CoreFactory::new(config).routed_by(router)
    }

    /// Routing decided by `router` instead of the `[proxy]` built-in router.
    pub fn routed_by(mut self, router: RouterFactory) -> CoreFactory {
        self.router = router;
        self
    }

    fn core(&self, index: usize, loops: usize, bound: &[ListenAddr]) -> Core {
        let bound: Vec<ListenAddr> = bound
            .iter()
            .map(|l| ListenAddr {
                advertise: l.advertise.clone().or_else(|| self.advertise.clone()),
                ..l.clone()
            })
            .collect();
        let identity = LocalIdentity::of_listeners(&self.domains, &bound);
        let mut router = (self.router)(index, &identity);
        let dialogs = self.dialogs.tracker(index, router.as_mut());
        let probes = match (index, &self.dispatcher) {
            (0, Some(dispatcher)) => Prober::new(
                Arc::clone(dispatcher),
                index,
                bound.clone(),
                self.tag_hasher.hash_one(("dispatcher", index)),
                Instant::now(),
            ),
            _ => None,
        };
        let relay = Relay::new(
            ProxyIdentity::new(identity.clone()).with_signer(self.route_signer.clone()),
            SUPPORTED.to_vec(),
            index,
            bound,
            self.timer_c,
            router,
        )
        .with_fr_timer(self.fr_timer)
        .with_dialogs(dialogs);
        let mut core = Core::new(identity, self.layer, relay, index, loops);
        // `ctl dlg end` reaches this loop's calls through its wake signal.
        self.dialogs
            .directory
            .attach_loop(index, Arc::clone(&core.wake));
        core.tag_hasher = self.tag_hasher.clone();
        core.force_rport = self.force_rport;
        if index == 0 {
            // One loop probes every NATed binding; answers find it by the loop in the branch.
            core.keepalive = self.keepalive.as_ref().map(|(settings, store)| Keepalives {
                scheduler: Scheduler::new(*settings, Instant::now()),
                store: Arc::clone(store),
                nonce: self.tag_hasher.hash_one(index),
            });
        }
        core.probes = probes;
        core.max_backlog = self.max_backlog;
        core.overload = Overload::new(self.overload_after, index);
        core.transactions
            .set_metrics(self.metrics.transactions.clone());
        core.metrics = Arc::clone(&self.metrics);
        core
    }
}

impl WorkerFactory for CoreFactory {
    fn make_worker(&self, index: usize) -> Box<dyn Worker> {
        Box::new(self.core(index, 1, &self.listen))
    }

    fn make_bound_worker(
        &self,
        index: usize,
        loops: usize,
        bound: &[ListenAddr],
    ) -> Box<dyn Worker> {
        Box::new(self.core(index, loops, bound))
    }

    fn metrics(&self) -> Option<crate::transport::metrics::ShellMetrics> {
        Some(self.metrics.shell())
    }

    fn flows(&self) -> Option<Arc<crate::transport::registry::Flows>> {
        self.flows.clone()
    }
}

/// One event loop's core: its transaction layer, its relay (the stateful proxy), and what
/// answers the requests addressed to the server itself.
pub struct Core {
    identity: LocalIdentity,
    /// Shared by all loops, so a retransmitted request gets the same To tag wherever it lands.
    tag_hasher: RandomState,
    /// The Supported header value, joined once.
    supported: String,
    transactions: TransactionLayer,
    relay: Relay,
    loop_index: usize,
    loops: usize,
    /// Which loop handles a received request.
    affinity: Affinity,
    /// Reused for every call into the layer.
    pending: Vec<LayerOutput>,
    /// Reused for every call into the relay.
    relay_actions: RelayActions,
    /// Answers waiting for a durable write, oldest first.
    parked: VecDeque<Parked>,
    /// Notified by the location store's flusher after each flush.
    wake: Arc<WakeSignal>,
    /// `limits.max_backlog`: see [`Core::backlog`].
    max_backlog: usize,
    /// Whether this loop is saturated, and what share of new requests it refuses
    /// (`limits.overload_after_ms`).
    overload: Overload,
    /// The largest backlog seen, for a debug line at each new power of two.
    backlog_high_water: usize,
    /// RFC 3581 `rport` on every request (`[nat] force_rport`).
    force_rport: bool,
    /// Keep-alives of NATed bindings (the first loop only).
    keepalive: Option<Keepalives>,
    /// Probes of the dispatcher's destinations (the first loop only).
    probes: Option<Prober>,
    /// Requests and responses received, parse errors (the server's handles, shared).
    metrics: Arc<EngineMetrics>,
    /// Set while timers or transport failures (not a received message) drive the layer: the
    /// branch events they cause enter their request's log span themselves.
    timer_driven: bool,
}

impl Worker for Core {
    fn on_input(&mut self, input: Input, now: Instant, out: &mut Vec<Output>) {
        match input {
            Input::Message { data, meta } => {
                self.overload.on_message();
                self.on_message(data, meta, now, out)
            }
            Input::FramingError { head, error, meta } => {
                self.on_framing_error(head, &error, &meta, out)
            }
            Input::Unreachable { kind, addr } => {
                if let Some(keepalive) = &mut self.keepalive {
                    keepalive.scheduler.on_unreachable(kind, addr);
                }
                let mut pending = std::mem::take(&mut self.pending);
                if let Some(probes) = &mut self.probes {
                    probes.on_unreachable(kind, addr, &mut self.transactions, &mut pending);
                }
                self.timer_driven = true;
                let mut actions = std::mem::take(&mut self.relay_actions);
                self.relay.on_unreachable(kind, addr, &mut actions);
                self.apply_relay_actions(actions, now, &mut pending, out);
                self.drain(pending, now, out);
                self.timer_driven = false;
            }
            Input::Wake => {
                let mut pending = std::mem::take(&mut self.pending);
                self.release_parked(now, &mut pending);
                let mut actions = std::mem::take(&mut self.relay_actions);
                self.relay.on_wake(now, &mut actions);
                self.apply_relay_actions(actions, now, &mut pending, out);
                self.drain(pending, now, out);
            }
            Input::Resolved { id, result } if Prober::owns_resolution(id) => {
                let mut pending = std::mem::take(&mut self.pending);
                if let Some(probes) = &mut self.probes {
                    let layer = &mut self.transactions;
                    probes.on_resolved(id, result, now, &self.identity, layer, &mut pending);
                }
                self.drain(pending, now, out);
            }
            Input::Resolved { id, result } => {
                // A DNS answer resumes one message's routing: its lines carry that Call-ID.
                let span = self.relay.call_id_of_resolution(id).map(logging::call_span);
                let _entered = span.as_ref().map(tracing::Span::enter);
                let mut pending = std::mem::take(&mut self.pending);
                let mut actions = std::mem::take(&mut self.relay_actions);
                self.relay.on_resolved(id, result, now, &mut actions);
                self.apply_relay_actions(actions, now, &mut pending, out);
                self.drain(pending, now, out);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.transactions.next_deadline(),
            self.relay.next_deadline(),
            self.parked.front().map(|p| p.deadline),
            self.keepalive.as_ref().map(|k| k.scheduler.next_deadline()),
            self.probes.as_ref().map(Prober::next_deadline),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_timer(&mut self, now: Instant, out: &mut Vec<Output>) {
        let mut pending = std::mem::take(&mut self.pending);
        self.timer_driven = true;
        self.transactions.on_timer(now, &mut pending);
        let mut actions = std::mem::take(&mut self.relay_actions);
        self.relay.on_timer(now, &mut actions);
        self.apply_relay_actions(actions, now, &mut pending, out);
        self.release_parked(now, &mut pending);
        self.drain(pending, now, out);
        self.timer_driven = false;
        self.keepalive_round(now, out);
        self.probe_round(now, out);
    }

    fn wake_signal(&self) -> Option<Arc<WakeSignal>> {
        Some(Arc::clone(&self.wake))
    }

    fn on_load(&mut self, sample: LoadSample) {
        self.overload.on_sample(sample);
    }
}

impl Core {
    pub fn new(
        identity: LocalIdentity,
        layer: LayerConfig,
        relay: Relay,
        loop_index: usize,
        loops: usize,
    ) -> Core {
        Core {
            identity,
            tag_hasher: RandomState::new(),
            supported: SUPPORTED.join(", "),
            transactions: TransactionLayer::new(layer),
            relay,
            loop_index,
            loops,
            affinity: Affinity::new(loop_index, loops),
            pending: Vec::new(),
            relay_actions: RelayActions::default(),
            parked: VecDeque::new(),
            wake: WakeSignal::new(),
            force_rport: false,
            keepalive: None,
            probes: None,
            timer_driven: false,
            max_backlog: crate::config::Limits::default().max_backlog,
            overload: Overload::new(
                crate::config::Limits::default().overload_after(),
                loop_index,
            ),
            backlog_high_water: 0,
            metrics: EngineMetrics::detached(),
        }
    }

    fn on_message(&mut self, data: Bytes, meta: Meta, now: Instant, out: &mut Vec<Output>) {
        // A request belongs to the loop of its Call-ID (see `server::affinity`), found before
        // parsing. An OPTIONS may be for this server, answered statelessly wherever it lands:
        // parsed first to tell.
        let owner = self.affinity.request_owner_elsewhere(&data, &meta);
        if let Some(owner) = owner.filter(|_| prescan::method(&data) != Some(b"OPTIONS")) {
            return hand_over(owner, data, meta, out);
        }
        let mut msg = match Message::parse(data.clone()) {
            Ok(m) => m,
            Err(e) => {
                self.metrics.transport.parse_error(meta.kind);
                return self.refuse_unparsable(data, e, &meta, out);
            }
        };
        // Everything logged about this message, down to the script's `sip.log`, carries its
        // Call-ID (see `crate::logging`).
        let span = logging::message_span(&msg);
        let _entered = span.enter();
        if msg.is_response() {
            if let Some(owner) = self.owner_elsewhere(&msg) {
                // The kernel picked this loop for the flow; the transaction lives in `owner`
                // (which counts it).
                return hand_over(owner, data, meta, out);
            }
            if let Some(code) = msg.status() {
                self.metrics.responses_received.inc(code);
            }
            if self.is_keepalive_answer(&msg) {
                return;
            }
            let mut pending = std::mem::take(&mut self.pending);
            self.transactions.on_response(msg, meta, now, &mut pending);
            return self.drain(pending, now, out);
        }
        if let Some(owner) = owner.filter(|_| !self.is_for_me_options(&msg)) {
            return hand_over(owner, data, meta, out);
        }
        if let Some(method) = msg.method() {
            self.metrics.request_received(method);
        }
        // Forced on datagrams only: a stream's responses go back on its connection anyway.
        let force_rport = self.force_rport && meta.kind == TransportKind::Udp;
        if let Err(e) = msg.stamp_received_rport(meta.source, force_rport) {
            self.metrics.transport.parse_error(meta.kind);
            return self.refuse(&msg, e, &meta, out);
        }
        if let Err(e) = msg.check_valid() {
            // Answered statelessly: a request this broken may not even yield a transaction key.
            self.metrics.transport.parse_error(meta.kind);
            return self.refuse(&msg, e, &meta, out);
        }
        if self.is_for_me_options(&msg) {
            // §8.2.7 stateless UAS: OPTIONS to this server (keep-alives, monitoring) gets its
            // answer without a transaction. The To tag is derived from the request, so a
            // retransmission is answered identically; a transaction would hold ~2 KB for
            // Timer J's 32 s per request and cap keep-alives at a few thousand per second.
            let (code, response) = self.answer(&msg, &meta);
            if let Ok(via) = msg.top_via() {
                out.push(Output::Send {
                    dest: response_destination(&via, &meta),
                    data: response,
                });
            }
            debug!(code, "answered statelessly");
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        let shedding = self.shedding();
        self.transactions.set_shedding(shedding);
        self.transactions.on_request(msg, meta, now, &mut pending);
        self.drain(pending, now, out);
    }

    /// Carries out what the transaction layer asked for; answering a request it delivered may
    /// make it ask for more, so this runs until nothing is left.
    fn drain(&mut self, mut pending: Vec<LayerOutput>, now: Instant, out: &mut Vec<Output>) {
        let mut next = Vec::new();
        while !pending.is_empty() {
            for output in pending.drain(..) {
                match output {
                    LayerOutput::Send { dest, data } => out.push(Output::Send { dest, data }),
                    LayerOutput::Up(up) => self.on_upcall(up, now, &mut next, out),
                }
            }
            std::mem::swap(&mut pending, &mut next);
        }
        self.pending = pending;
    }

    /// Carries out what the relay asked for ([`RelayAction`]), in order: on the transaction
    /// layer (its outputs into `next`), and DNS lookups for the shell (into `out`). A client
    /// transaction started is reported back to the relay, which may ask for more.
    fn apply_relay_actions(
        &mut self,
        mut actions: RelayActions,
        now: Instant,
        next: &mut Vec<LayerOutput>,
        out: &mut Vec<Output>,
    ) {
        while let Some(action) = actions.pop() {
            match action {
                RelayAction::ServerRespond {
                    tx,
                    status,
                    response,
                } => self.transactions.respond(tx, status, response, now, next),
                RelayAction::Reply {
                    tx,
                    request,
                    meta,
                    reply,
                } => self.send_relay_reply(tx, &request, &meta, reply, now, next),
                RelayAction::SetResponseDestination { tx, dest } => {
                    self.transactions.set_response_destination(tx, dest)
                }
                RelayAction::AbandonServer { tx } => self.transactions.abandon_server(tx),
                RelayAction::ChargeServer { tx, bytes } => {
                    self.transactions.charge_user_state(tx, bytes)
                }
                RelayAction::StartClient {
                    request,
                    dest,
                    purpose,
                } => {
                    let started = self
                        .transactions
                        .send_request(request, dest.clone(), now, next);
                    self.relay
                        .on_client_started(purpose, dest, started, now, &mut actions);
                }
                RelayAction::CancelClient { client, dest } => {
                    self.cancel_client(client, dest, now, next)
                }
                RelayAction::FailClient { client } => {
                    self.transactions.on_transport_error(client, next)
                }
                RelayAction::SendStateless { dest, data } => {
                    next.push(LayerOutput::Send { dest, data })
                }
                RelayAction::Resolve { id, query } => out.push(Output::Resolve { id, query }),
            }
        }
        self.relay_actions = actions;
    }

    /// Cancels INVITE client transaction `client` (§9.1): a CANCEL built from its request, in
    /// a transaction of its own whose 200 needs no action (§16.10: the branch's final arrives
    /// through the INVITE's transaction).
    fn cancel_client(
        &mut self,
        client: TxId,
        dest: Destination,
        now: Instant,
        next: &mut Vec<LayerOutput>,
    ) {
        let Some(invite) = self.transactions.client_request(client) else {
            return;
        };
        let Ok(cancel) = Message::parse(cancel_for(invite)) else {
            return;
        };
        if let Err(e) = self.transactions.send_request(cancel, dest, now, next) {
            debug!(error = ?e, "CANCEL not sent");
        }
    }

    fn on_upcall(
        &mut self,
        up: Upcall,
        now: Instant,
        next: &mut Vec<LayerOutput>,
        out: &mut Vec<Output>,
    ) {
        let mut actions = std::mem::take(&mut self.relay_actions);
        match up {
            Upcall::Request { tx, request, meta } => {
                self.relay.on_request(tx, request, meta, now, &mut actions)
            }
            Upcall::Cancel {
                tx,
                cancelled: Some(invite),
                request,
                meta,
            } => {
                // §9.2 / §16.10: 200 for the CANCEL, then the INVITE's branches are cancelled.
                debug!(source = %meta.source, "answering CANCEL");
                let response = self.build_response(&request, 200, "OK", &[]);
                self.transactions.respond(tx, 200, response, now, next);
                self.relay.cancel(invite, now, &mut actions);
            }
            Upcall::Cancel {
                tx,
                cancelled: None,
                request,
                meta,
            } => self
                .relay
                .on_unmatched_cancel(tx, request, meta, now, &mut actions),
            Upcall::Ack { request, meta } => {
                self.relay.forward_ack(request, meta, now, &mut actions)
            }
            Upcall::Client { tx, event, .. }
                if self.probes.as_ref().is_some_and(|p| p.owns(tx)) =>
            {
                if let Some(probes) = &mut self.probes {
                    probes.on_client_event(tx, event, now);
                }
            }
            Upcall::Client { tx, event, source } => {
                // A timer's event (Timer B/F, a transport failure) runs outside any message's
                // span: enter the span of the request the branch carries.
                let span = match self.timer_driven {
                    true => self.relay.call_id_of_client(tx).map(logging::call_span),
                    false => None,
                };
                let _entered = span.as_ref().map(tracing::Span::enter);
                self.relay
                    .on_client_event(tx, event, source, now, &mut actions)
            }
            Upcall::StrayResponse { response, meta } => {
                self.forward_stray_response(response, &meta, next)
            }
            Upcall::Terminated { tx } => {
                if let Some(probes) = &mut self.probes {
                    probes.on_terminated(tx);
                }
                self.relay.on_terminated(tx)
            }
            Upcall::Server { .. } => {}
        }
        self.apply_relay_actions(actions, now, next, out);
    }

    /// Sends the answer the relay asked for ([`RelayAction::Reply`]).
    fn send_relay_reply(
        &mut self,
        tx: TxId,
        request: &Message,
        meta: &Meta,
        reply: Reply,
        now: Instant,
        next: &mut Vec<LayerOutput>,
    ) {
        let Reply {
            code,
            reason,
            unsupported,
            headers,
            wait_for,
        } = reply;
        // A refusal the router decided gets the one `moonroute::refused` line; answers that are
        // routine (2xx, the 401/407 of digest authentication) stay at debug.
        if code >= 300 && code != 401 && code != 407 {
            info!(target: REFUSED, call_id = %logging::call_id(request), source = %meta.source, transport = %meta.kind, code, reason = %format_args!("answered {code} {reason}"), "request refused");
        } else {
            debug!(code, %reason, "answering request");
        }
        let mut extra: Vec<(&str, &str)> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        match &unsupported {
            Some(tags) => extra.push(("Unsupported", tags.as_str())),
            None if code == 501 => extra.push(("Allow", ALLOW_ALWAYS)),
            None => {}
        }
        let response = self.build_response(request, code, &reason, &extra);
        match wait_for {
            Some(ticket) if ticket.state() != CommitState::Durable => {
                ticket.subscribe(&self.wake);
                self.parked.push_back(Parked {
                    tx,
                    request: request.clone(),
                    code,
                    response,
                    ticket,
                    deadline: now + PARK_TIMEOUT,
                });
                // The flush may have completed before the subscription.
                self.release_parked(now, next);
            }
            _ => self.send_answer(tx, request, code, response, now, next),
        }
    }

    /// Sends an answer decided here through its server transaction. A REGISTER's transaction
    /// then ends at once, as with Kamailio's `sl_send_reply` (§8.2.7 allows a stateless UAS):
    /// kept, it would hold ~2 KB for Timer J's 32 s per registration and cap a loop at a few
    /// thousand registrations per second. A retransmission runs the script again, and the
    /// registrar answers a request it already applied (same Call-ID and CSeq) with the same
    /// 200 without writing anything (see `registrar::process`).
    fn send_answer(
        &mut self,
        tx: TxId,
        request: &Message,
        code: u16,
        response: Bytes,
        now: Instant,
        next: &mut Vec<LayerOutput>,
    ) {
        self.transactions.respond(tx, code, response, now, next);
        if code >= 200 && request.method() == Some(&Method::Register) {
            self.transactions.abandon_server(tx);
        }
    }
}

/// Passes a received message to event loop `owner`, which handles it as if it had received it.
fn hand_over(owner: usize, data: Bytes, meta: Meta, out: &mut Vec<Output>) {
    out.push(Output::HandOver {
        worker: owner,
        input: Input::Message { data, meta },
    });
}
