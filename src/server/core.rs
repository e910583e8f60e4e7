//! The server core until the proxy core and the Lua engine land: a sans-IO responder behind the
//! transaction layer (RFC 3261 §17), so retransmissions are absorbed and answered from their
//! transaction. It answers OPTIONS addressed to this server with 200 (RFC 3261 §11.2), refuses
//! every other request with a clear error, and turns malformed input into 400/413/505 with a
//! reason phrase naming the problem, or drops it with a log line when no answer can be routed.
//!
//! Received-side Via processing (§18.2.1, RFC 3581) and response routing (§18.2.2) happen here
//! for every request, so the later layers get requests whose top Via already records where they
//! came from.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::dispatcher::probe::Prober;
use crate::location::{CommitState, CommitTicket, LocationStore};
use crate::logging::{self, Lossy, REFUSED};
use crate::metrics::EngineMetrics;
use crate::nat::keepalive::{self, Action as KeepaliveAction, Peer, Scheduler, Settings};
use crate::proxy::relay::{owner_of_branch, Handled, Relay};
use crate::proxy::router::{BuiltinRouter, Router};
use crate::proxy::{is_our_stateless_branch, ProxyIdentity, RouteSigner};
use crate::registrar::UNREACHABLE_RETRY_AFTER;
use crate::server::affinity::Affinity;
use crate::server::overload::Overload;
use crate::sip::{prescan, HeaderName, Message, Method, ParseError, ResponseBuilder, Uri};
use crate::transaction::layer::{
    LayerConfig, LayerOutput, Shedding, TransactionLayer, TxId, Upcall,
};
use crate::transport::{
    response_destination, FramingError, Input, ListenAddr, LoadSample, Meta, Output, TransportKind,
    Worker, WorkerFactory,
};
use crate::wake::WakeSignal;

/// Methods this build answers itself; grows as the engine issues land.
pub const ALLOW: &str = "OPTIONS";
/// Option tags of extensions this build supports (none yet: Require/Proxy-Require with any tag
/// gets 420, §8.2.2.3).
pub const SUPPORTED: &[&str] = &[];
pub use crate::proxy::identity::{LocalIdentity, SERVER};

pub use crate::proxy::router::RouterFactory;

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
        crate::dialog::DialogTracker::new(table, self.cdr.clone())
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

    fn metrics(&self) -> Option<Arc<EngineMetrics>> {
        Some(Arc::clone(&self.metrics))
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

/// The keep-alives one loop sends: the schedule, and the store it reads and prunes.
struct Keepalives {
    scheduler: Scheduler,
    store: Arc<dyn LocationStore>,
    /// Makes the keep-alives' Call-IDs and From tags differ across restarts.
    nonce: u64,
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
                self.relay
                    .on_unreachable(kind, addr, &mut self.transactions, &mut pending);
                self.drain(pending, now, out);
                self.timer_driven = false;
            }
            Input::Wake => {
                let mut pending = std::mem::take(&mut self.pending);
                self.release_parked(now, &mut pending);
                self.relay
                    .on_wake(now, &mut self.transactions, &mut pending);
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
                let owed =
                    self.relay
                        .on_resolved(id, result, now, &mut self.transactions, &mut pending);
                if let Some((tx, request, meta, handled)) = owed {
                    self.answer_if_asked(tx, &request, &meta, handled, now, &mut pending);
                }
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
        self.relay
            .on_timer(now, &mut self.transactions, &mut pending);
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

/// An answer held until the write it reports is on disk (a registrar's 200, RFC 3261 §10.3).
struct Parked {
    tx: TxId,
    request: Message,
    code: u16,
    response: Bytes,
    ticket: CommitTicket,
    /// After this the answer becomes a 500: the disk is not keeping up.
    deadline: Instant,
}

/// How long an answer may wait for its disk flush before the request gets 500 instead; far
/// beyond a flush's milliseconds, well within a client's Timer F (64*T1).
const PARK_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Why new requests are refused now, if they are, and what share: all of them while too
    /// much work waits outside the loop ([`Core::backlog`]); the share [`Overload`] decides
    /// while the loop itself is saturated (`limits.overload_after_ms`: serving every new
    /// request would only make every request late, and their clients retransmit).
    fn shedding(&mut self) -> Option<Shedding> {
        let backlog = self.backlog();
        if backlog > self.backlog_high_water {
            self.backlog_high_water = backlog;
            // Each power of two once: how deep the queues get under a given load, cheaply.
            if backlog.is_power_of_two() {
                debug!(
                    loop_index = self.loop_index,
                    backlog,
                    limit = self.max_backlog,
                    "backlog high-water mark"
                );
            }
        }
        if backlog >= self.max_backlog {
            return Some(Shedding {
                reason: "limits.max_backlog reached (answers waiting for the disk, requests waiting for DNS)",
                fraction: 1.0,
            });
        }
        let fraction = self.overload.shed_fraction();
        (fraction > 0.0).then_some(Shedding {
            reason: "limits.overload_after_ms: the event loop is saturated",
            fraction,
        })
    }

    /// Requests this loop holds while waiting for something outside it: answers parked until
    /// their write is on disk, and requests or branches waiting for DNS. Either queue grows
    /// when what it waits for is slower than the arrival rate; past `limits.max_backlog` new
    /// requests are refused with 503 (see [`Core::shedding`]).
    fn backlog(&self) -> usize {
        self.parked.len() + self.relay.resolving()
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

    /// A response to one of this loop's keep-alive OPTIONS (any status proves the binding
    /// alive); consumed here, before the transaction layer, which never saw the request.
    fn is_keepalive_answer(&mut self, response: &Message) -> bool {
        let Some(keepalive) = &mut self.keepalive else {
            return false;
        };
        let seq = response
            .top_via()
            .ok()
            .and_then(|via| via.branch().and_then(keepalive::seq_of_branch));
        match seq {
            Some(seq) => {
                if !keepalive.scheduler.on_response(seq) {
                    debug!(seq, "keep-alive answer for no current probe: ignored");
                }
                true
            }
            None => false,
        }
    }

    /// Runs a keep-alive tick when one is due: probes the NATed bindings of the next slice of
    /// the store, and removes those whose probes failed too often (one log line each).
    fn keepalive_round(&mut self, now: Instant, out: &mut Vec<Output>) {
        let Some(keepalive) = &mut self.keepalive else {
            return;
        };
        if now < keepalive.scheduler.next_deadline() {
            return;
        }
        let wall = SystemTime::now();
        let mut actions = Vec::new();
        keepalive
            .scheduler
            .on_tick(now, &*keepalive.store, wall, &mut actions);
        for action in actions {
            match action {
                KeepaliveAction::SendOptions { peer, seq } => {
                    let source = self.identity.sent_by(peer.kind, peer.local, peer.addr);
                    let branch = keepalive::branch(self.loop_index, seq);
                    let data =
                        keepalive::options_request(&peer, &source, &branch, seq, keepalive.nonce);
                    out.push(Output::Send {
                        dest: keepalive_destination(&peer, false),
                        data,
                    });
                }
                KeepaliveAction::SendPing { peer } => out.push(Output::Send {
                    dest: keepalive_destination(&peer, true),
                    data: Bytes::from_static(b"\r\n\r\n"),
                }),
                KeepaliveAction::Remove { peer, failures } => {
                    let removed = keepalive::remove_binding(&*keepalive.store, &peer, wall);
                    match removed {
                        Ok(true) => {
                            warn!(aor = %peer.aor, contact = %peer.contact, received = %peer.addr, transport = %peer.kind, failures, "NAT keep-alives failed: binding removed")
                        }
                        Ok(false) => {}
                        Err(error) => {
                            warn!(aor = %peer.aor, contact = %peer.contact, %error, "NAT keep-alives failed but the binding could not be removed")
                        }
                    }
                }
            }
        }
    }

    /// Sends the dispatcher's due probes and fails those past their timeout.
    fn probe_round(&mut self, now: Instant, out: &mut Vec<Output>) {
        let Some(probes) = &mut self.probes else {
            return;
        };
        if now < probes.next_deadline() {
            return;
        }
        let (mut pending, mut resolves) = (std::mem::take(&mut self.pending), Vec::new());
        let layer = &mut self.transactions;
        probes.on_tick(now, &self.identity, layer, &mut pending, &mut resolves);
        self.drain(pending, now, out);
        for (id, query) in resolves {
            out.push(Output::Resolve { id, query });
        }
    }

    /// The loop owning the client transaction of a response, when it is not this one.
    fn owner_elsewhere(&self, response: &Message) -> Option<usize> {
        let via = response.top_via().ok()?;
        let owner = owner_of_branch(via.branch()?)?;
        (owner != self.loop_index && owner < self.loops).then_some(owner)
    }

    /// OPTIONS for this server (§11), or with Max-Forwards 0 (§16.3 step 3: answered as its
    /// final recipient). §11: "If the OPTIONS is addressed to a proxy server, the Request-URI
    /// is set without a user part"; one with a user part (`sip:100@us`, a scanner's favourite
    /// probe) asks about a user's UA and goes to the routing script like any request.
    fn is_for_me_options(&self, request: &Message) -> bool {
        if request.method() != Some(&Method::Options) {
            return false;
        }
        let max_forwards_zero = matches!(request.max_forwards(), Some(Ok(0)));
        let for_me = request.request_uri().is_ok_and(|u| {
            u.as_sip().is_some_and(|sip| sip.user.is_none()) && self.identity.is_myself(&u)
        });
        let in_dialog = request.to_tag().is_some();
        max_forwards_zero || (for_me && !in_dialog)
    }

    /// Carries out what the transaction layer asked for; answering a request it delivered may
    /// make it ask for more, so this runs until nothing is left.
    fn drain(&mut self, mut pending: Vec<LayerOutput>, now: Instant, out: &mut Vec<Output>) {
        let mut next = Vec::new();
        while !pending.is_empty() {
            for output in pending.drain(..) {
                match output {
                    LayerOutput::Send { dest, data } => out.push(Output::Send { dest, data }),
                    LayerOutput::Up(up) => self.on_upcall(up, now, &mut next),
                }
            }
            std::mem::swap(&mut pending, &mut next);
        }
        self.pending = pending;
        for (id, query) in self.relay.take_resolves() {
            out.push(Output::Resolve { id, query });
        }
    }

    fn on_upcall(&mut self, up: Upcall, now: Instant, next: &mut Vec<LayerOutput>) {
        match up {
            Upcall::Request { tx, request, meta } => {
                let handled = self.relay.on_request(
                    tx,
                    request.clone(),
                    meta,
                    now,
                    &mut self.transactions,
                    next,
                );
                self.answer_if_asked(tx, &request, &meta, handled, now, next);
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
                self.relay.cancel(invite, now, &mut self.transactions, next);
            }
            Upcall::Cancel {
                tx,
                cancelled: None,
                request,
                meta,
            } => {
                let handled = self.relay.on_unmatched_cancel(
                    tx,
                    request.clone(),
                    meta,
                    now,
                    &mut self.transactions,
                    next,
                );
                self.answer_if_asked(tx, &request, &meta, handled, now, next);
            }
            Upcall::Ack { request, meta } => {
                self.relay
                    .forward_ack(request, meta, now, &mut self.transactions, next)
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
                    .on_client_event(tx, event, source, now, &mut self.transactions, next)
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
    }

    /// Sends the answer the relay asked for, if it asked for one.
    fn answer_if_asked(
        &mut self,
        tx: TxId,
        request: &Message,
        meta: &Meta,
        handled: Handled,
        now: Instant,
        next: &mut Vec<LayerOutput>,
    ) {
        let Handled::Reply {
            code,
            reason,
            unsupported,
            headers,
            wait_for,
        } = handled
        else {
            return;
        };
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
            None if code == 501 => extra.push(("Allow", ALLOW)),
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

    /// Sends the parked answers whose writes are on disk; those whose flush failed or timed
    /// out get 500 instead (the bindings may not survive a crash, so no 200 may promise it).
    fn release_parked(&mut self, now: Instant, next: &mut Vec<LayerOutput>) {
        let mut index = 0;
        while index < self.parked.len() {
            // Failed (or not on disk in time): 500, the bindings may be lost. Unavailable: the
            // remote store went away before it confirmed; 503 asks the phone to come back.
            let failure = match self.parked[index].ticket.state() {
                CommitState::Durable => None,
                CommitState::Failed(error) => Some((500, error)),
                CommitState::Unavailable(error) => Some((503, error)),
                CommitState::Pending if now >= self.parked[index].deadline => {
                    Some((500, "disk flush timed out".to_owned()))
                }
                CommitState::Pending => {
                    index += 1;
                    continue;
                }
            };
            let Some(parked) = self.parked.remove(index) else {
                break;
            };
            let Some((code, error)) = failure else {
                self.send_answer(
                    parked.tx,
                    &parked.request,
                    parked.code,
                    parked.response,
                    now,
                    next,
                );
                continue;
            };
            let call_id = Lossy(parked.request.call_id().unwrap_or(b""));
            let retry_after = UNREACHABLE_RETRY_AFTER.to_string();
            let (reason, headers): (String, &[(&str, &str)]) = if code == 503 {
                warn!(%call_id, %error, "location store unreachable before it confirmed the write: answering 503");
                let reason = format!("Service Unavailable (location store: {error})");
                (reason, &[("Retry-After", retry_after.as_str())])
            } else {
                warn!(%call_id, %error, "location store write not durable: answering 500");
                (
                    format!("Server Internal Error (location store: {error})"),
                    &[],
                )
            };
            let response = self.build_response(&parked.request, code, &reason, headers);
            self.send_answer(parked.tx, &parked.request, code, response, now, next);
        }
    }

    /// §16.11: a response that matches no transaction is forwarded statelessly when its top Via
    /// is ours and its branch proves the request went out through a stateless forward of this
    /// process: that Via is removed and the response goes where the next one says (§18.2.2).
    /// Anything else is dropped (forged responses are not reflected).
    fn forward_stray_response(
        &self,
        mut response: Message,
        meta: &Meta,
        next: &mut Vec<LayerOutput>,
    ) {
        let ours = response.top_via().is_ok_and(|via| {
            let uri = match via.port {
                Some(port) => format!("sip:{}:{port}", via.host),
                None => format!("sip:{}", via.host),
            };
            Uri::parse(uri.as_bytes()).is_ok_and(|u| self.identity.is_myself(&u))
        });
        let ours = ours && is_our_stateless_branch(&response);
        let status = response.status().unwrap_or(0);
        let dropped = |response: &Message, reason: &str| {
            info!(target: REFUSED, call_id = %logging::call_id(response), source = %meta.source, transport = %meta.kind, status, reason, "response dropped");
        };
        if !ours || !matches!(response.remove_first_value(HeaderName::Via), Ok(true)) {
            return dropped(&response, "no transaction matches it and its top Via is not a stateless forward of this server");
        }
        self.relay.sign_stray_response(&mut response);
        let Ok(via) = response.top_via() else {
            return dropped(
                &response,
                "addressed to this server, which sent no such request",
            );
        };
        let Some(dest) = stateless_response_destination(&via) else {
            return dropped(&response, "its next Via names no address to forward it to");
        };
        next.push(LayerOutput::Send {
            dest,
            data: response.to_bytes(),
        });
    }

    /// The answer to a request delivered by the transaction layer: its status and bytes.
    fn answer(&self, req: &Message, meta: &Meta) -> (u16, Bytes) {
        // Log fields are formatted only when their level is enabled: nothing is built for them
        // on the per-request path.
        let call_id = Lossy(req.call_id().unwrap_or(b""));
        let method = req.method().cloned().unwrap_or(Method::Options);
        if let Some(refusal) = self.check_request(req, &method) {
            let Refusal {
                code,
                reason,
                unsupported,
            } = refusal;
            info!(target: REFUSED, %call_id, %method, source = %meta.source, transport = %meta.kind, code, reason, "request refused");
            let extra: &[(&str, &str)] = match &unsupported {
                Some(tags) => &[("Unsupported", tags.as_str())],
                None if code == 501 => &[("Allow", ALLOW)],
                None => &[],
            };
            return (code, self.build_response(req, code, reason, extra));
        }
        debug!(%call_id, source = %meta.source, "answering OPTIONS");
        (
            200,
            self.build_response(req, 200, "OK", &self.options_headers()),
        )
    }

    /// §11.2: what an OPTIONS answer tells about this server.
    fn options_headers(&self) -> [(&'static str, &str); 6] {
        [
            ("Allow", ALLOW),
            ("Accept", "*/*"),
            ("Accept-Encoding", "identity"),
            ("Accept-Language", "en"),
            ("Supported", &self.supported),
            ("Server", SERVER),
        ]
    }

    /// The checks of §8.2.2 and §16.3 that apply to a server that does not route yet; returns
    /// the refusal, or `None` for an OPTIONS addressed to this server.
    fn check_request(&self, req: &Message, method: &Method) -> Option<Refusal> {
        let refuse = |code, reason| {
            Some(Refusal {
                code,
                reason,
                unsupported: None,
            })
        };
        let uri = req.request_uri().ok()?;
        if !uri.is_routable_scheme() {
            return refuse(416, "Unsupported URI Scheme");
        }
        if let Some(tags) = unsupported_option_tags(req) {
            return Some(Refusal {
                code: 420,
                reason: "Bad Extension",
                unsupported: Some(tags),
            });
        }
        let for_me = self.identity.is_myself(&uri);
        let max_forwards_zero = matches!(req.max_forwards(), Some(Ok(0)));
        match method {
            // §16.3 step 3: an OPTIONS with Max-Forwards 0 may be answered as its final recipient.
            Method::Options if for_me || max_forwards_zero => None,
            _ if max_forwards_zero => refuse(483, "Too Many Hops"),
            _ => refuse(501, "Not Implemented"),
        }
    }

    fn refuse_unparsable(
        &self,
        data: Bytes,
        error: ParseError,
        meta: &Meta,
        out: &mut Vec<Output>,
    ) {
        match Message::salvage_request(data) {
            Some(req) => self.refuse(&req, error, meta, out),
            None => {
                warn!(target: REFUSED, source = %meta.source, transport = %meta.kind, reason = %format_args!("unparsable ({error}); no answer can be routed"), "message dropped")
            }
        }
    }

    fn refuse(&self, req: &Message, error: ParseError, meta: &Meta, out: &mut Vec<Output>) {
        let call_id = req.call_id().ok().map(Lossy);
        let call_id = call_id.as_ref().map(tracing::field::display);
        if req.method() == Some(&Method::Ack) {
            warn!(target: REFUSED, call_id, source = %meta.source, transport = %meta.kind, reason = %format_args!("malformed ACK ({error}); an ACK is never answered"), "message dropped");
            return;
        }
        let code = error.status();
        let reason = refusal_reason(&error);
        if req.top_via().is_err() {
            warn!(target: REFUSED, call_id, source = %meta.source, transport = %meta.kind, %reason, "message dropped: no Via to answer to");
            return;
        }
        info!(target: REFUSED, call_id, source = %meta.source, transport = %meta.kind, code, %reason, "request refused");
        self.reply(req, meta, code, &reason, &[], out);
    }

    fn on_framing_error(
        &self,
        head: Bytes,
        error: &FramingError,
        meta: &Meta,
        out: &mut Vec<Output>,
    ) {
        self.metrics.transport.parse_error(meta.kind);
        let (code, reason) = match error {
            FramingError::TooLarge { .. } => (413, format!("Request Entity Too Large ({error})")),
            FramingError::MissingContentLength => (
                400,
                "Bad Request (Content-Length is mandatory on streams)".to_string(),
            ),
            FramingError::BadContentLength => {
                (400, "Bad Request (invalid Content-Length)".to_string())
            }
            FramingError::HeadTooLarge { .. } => (0, String::new()),
        };
        match (code, Message::salvage_request(head)) {
            (0, _) | (_, None) => {
                warn!(target: REFUSED, source = %meta.source, transport = %meta.kind, reason = %format_args!("stream framing lost ({error}); no answer possible, connection closed"), "message dropped")
            }
            (code, Some(req)) => {
                let call_id = req.call_id().ok().map(Lossy);
                let call_id = call_id.as_ref().map(tracing::field::display);
                info!(target: REFUSED, call_id, source = %meta.source, transport = %meta.kind, code, reason = %format_args!("{reason}; connection closed"), "request refused");
                self.reply(&req, meta, code, &reason, &[], out);
            }
        }
        if let Some(conn) = meta.conn {
            out.push(Output::Close(conn));
        }
    }

    /// A response to `req` with a To tag stable across its retransmissions.
    fn build_response(
        &self,
        req: &Message,
        code: u16,
        reason: &str,
        extra: &[(&str, &str)],
    ) -> Bytes {
        let tag = self.to_tag(req);
        let mut builder = ResponseBuilder::new(req, code, reason).to_tag(tag.as_bytes());
        for (name, value) in extra {
            builder = builder.header(name, value.as_bytes());
        }
        builder.build()
    }

    /// A stateless answer, for requests too malformed to have a transaction (§8.2, §16.11).
    fn reply(
        &self,
        req: &Message,
        meta: &Meta,
        code: u16,
        reason: &str,
        extra: &[(&str, &str)],
        out: &mut Vec<Output>,
    ) {
        let Ok(via) = req.top_via() else { return };
        let data = self.build_response(req, code, reason, extra);
        out.push(Output::Send {
            dest: response_destination(&via, meta),
            data,
        });
    }

    /// A To tag stable for one request and its retransmissions (§8.2.6.2, §17.2.1).
    fn to_tag(&self, req: &Message) -> String {
        let from_tag = req.from_tag().unwrap_or(b"");
        let branch = req.top_via().ok().and_then(|v| v.branch()).unwrap_or(b"");
        let call_id = req.header(HeaderName::CallId).unwrap_or(b"");
        let h = self.tag_hasher.hash_one((call_id, from_tag, branch));
        format!("mr{h:016x}")
    }
}

/// Passes a received message to event loop `owner`, which handles it as if it had received it.
fn hand_over(owner: usize, data: Bytes, meta: Meta, out: &mut Vec<Output>) {
    out.push(Output::HandOver {
        worker: owner,
        input: Input::Message { data, meta },
    });
}

/// Where a statelessly forwarded response goes (§18.2.2): the Via's received/rport when the
/// previous hop recorded them, else its sent-by, which must be an IP literal (no DNS yet).
/// A reliable transport reuses the connection the request came in on when it is still open.
fn stateless_response_destination(
    via: &crate::sip::Via<'_>,
) -> Option<crate::transport::Destination> {
    let kind = TransportKind::from_name(via.transport)?;
    let default_port = kind.default_port();
    let addr = via.recorded_response_addr(default_port)?;
    Some(crate::transport::Destination {
        kind,
        addr,
        conn: None,
        local: None,
        tls_name: None,
        reuse_only: false,
    })
}

/// Where a keep-alive goes: the binding's received address, from the socket it registered
/// on; a stream ping only on an open connection.
fn keepalive_destination(peer: &Peer, stream: bool) -> crate::transport::Destination {
    crate::transport::Destination {
        kind: peer.kind,
        addr: peer.addr,
        conn: None,
        local: peer.local,
        tls_name: None,
        reuse_only: stream,
    }
}

/// Why a request is refused: status, reason phrase, and for 420 the option tags to list in
/// Unsupported (§8.2.2.3).
struct Refusal {
    code: u16,
    reason: &'static str,
    unsupported: Option<String>,
}

/// Require and Proxy-Require tags this build does not support, comma-separated (§8.2.2.3,
/// §16.3 item 5), or `None` when all are supported.
fn unsupported_option_tags(req: &Message) -> Option<String> {
    let mut list = String::new();
    let tags = [HeaderName::Require, HeaderName::ProxyRequire]
        .into_iter()
        .flat_map(|h| req.option_tags(h))
        .filter_map(Result::ok);
    for tag in tags {
        if SUPPORTED
            .iter()
            .any(|s| s.as_bytes().eq_ignore_ascii_case(tag))
        {
            continue;
        }
        if !list.is_empty() {
            list.push_str(", ");
        }
        list.push_str(&String::from_utf8_lossy(tag));
    }
    (!list.is_empty()).then_some(list)
}

/// A reason phrase that names the problem, e.g. "Bad Request (CSeq: method does not match the
/// request method)".
fn refusal_reason(error: &ParseError) -> String {
    let standard = match error.status() {
        505 => "Version Not Supported",
        413 => "Request Entity Too Large",
        _ => "Bad Request",
    };
    format!("{standard} ({error})")
}
