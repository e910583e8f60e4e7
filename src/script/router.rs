//! The script behind the proxy's [`Router`] seam, and hot reload.
//!
//! [`ScriptHost`] (one per server, shared by the loops) holds the current script version.
//! A reload reads the file and loads it into a fresh, throwaway Lua state: syntax, top-level
//! code and `on_request` are checked *before* anything switches. Only an accepted version is
//! published; a broken one is refused with its `file:line` error and the old version keeps
//! serving.
//!
//! [`ScriptRouter`] (one per event loop) notices a new version at its next request and loads
//! it into a fresh state of its own (Lua states never cross threads). A request's later hooks
//! (`on_branch`, `on_reply`, `on_failure`) run in the state that ran its `on_request`, with
//! the same `req.vars` table, whatever reloads happen meanwhile; an old state is dropped when
//! its last transaction ends (reference counting).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use mlua::{AnyUserData, Function, Table, Thread};
use tracing::{debug, error, info, warn};

use super::api::dialog as dialog_api;
use super::api::names::HOOKS;
use super::api::{Role, ScriptMsg};
use super::engine::{Engine, Env, Limits, LogSink, ScriptError, ScriptSource, Step};
use super::Services;
use crate::id_map::IdMap;
use crate::metrics::{Counter, Gauge, Histogram, Registry, DURATION_BUCKETS};
use crate::proxy::identity::LocalIdentity;
use crate::proxy::request::{remove_preloaded_route, route_set};
use crate::proxy::response_context::{BranchOutcome, Target};
use crate::proxy::router::RouterFactory;
use crate::proxy::router::{
    BranchEdit, Decision, FailureDecision, ReplySource, RouteHandle, RouteInfo, Routed, Router,
};
use crate::sip::{Message, Method};
use crate::transport::Meta;

/// The script shared by all event loops: the current version and how to reload it.
pub struct ScriptHost {
    path: PathBuf,
    limits: Limits,
    services: Arc<Services>,
    domains: Vec<String>,
    current: Mutex<Arc<ScriptSource>>,
    /// The current version number, read by every loop before each request (one atomic load).
    version: AtomicU64,
    /// `moonroute_script_reloads_total`, `moonroute_script_reload_failures_total`.
    reloads: Counter,
    failed_reloads: Counter,
    /// `moonroute_script_version`.
    version_gauge: Gauge,
    /// Calls, errors and duration of each hook.
    hook_metrics: HookMetrics,
}

/// `moonroute_script_hook_calls_total{hook}`, `..._errors_total{hook}` and
/// `moonroute_script_hook_duration_seconds{hook}`, resolved once per hook so a call costs
/// three relaxed atomic updates and two clock reads.
pub(crate) struct HookMetrics([HookCells; HOOKS.len()]);

/// The metric handles of one hook.
pub(crate) struct HookCells {
    /// The hook's name, for its log lines.
    name: &'static str,
    calls: Counter,
    errors: Counter,
    duration: Histogram,
}

impl HookMetrics {
    fn new(registry: &Registry) -> HookMetrics {
        let calls = registry
            .counter_family(
                "moonroute_script_hook_calls_total",
                "Calls of each script hook.",
                &["hook"],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let errors = registry
            .counter_family(
                "moonroute_script_hook_errors_total",
                "Script hook calls that failed: Lua errors, instruction budget or memory limit exhausted.",
                &["hook"],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let duration = registry
            .histogram_family(
                "moonroute_script_hook_duration_seconds",
                "Time spent in each script hook call.",
                &["hook"],
                DURATION_BUCKETS,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        HookMetrics(HOOKS.map(|hook| HookCells {
            name: hook,
            calls: calls.with(&[hook]),
            errors: errors.with(&[hook]),
            duration: duration.with(&[hook]),
        }))
    }

    /// The handles of hook `name` (one of [`HOOKS`]).
    pub(crate) fn of(&self, name: &str) -> &HookCells {
        let index = HOOKS.iter().position(|h| *h == name).unwrap_or(0);
        &self.0[index]
    }
}

impl HookCells {
    /// One finished call (or slice, for a hook resumed after `sip.resolve`) of the hook.
    fn record(&self, started: Instant, failed: bool, new_call: bool) {
        if new_call {
            self.calls.inc();
        }
        if failed {
            self.errors.inc();
        }
        self.duration.observe_duration(elapsed_since(started));
    }
}

fn elapsed_since(started: Instant) -> Duration {
    Instant::now().saturating_duration_since(started)
}

impl ScriptHost {
    /// Loads and checks the script at `path`; the server does not start without a valid one.
    pub fn load(
        path: &Path,
        limits: Limits,
        services: Arc<Services>,
        domains: &[String],
    ) -> Result<Arc<ScriptHost>, ScriptError> {
        let registry = &services.metrics;
        let reloads = registry.counter(
            "moonroute_script_reloads_total",
            "Script reloads accepted since start.",
        );
        let failed_reloads = registry.counter(
            "moonroute_script_reload_failures_total",
            "Script reloads refused since start (the running version kept serving).",
        );
        let version_gauge = registry.gauge(
            "moonroute_script_version",
            "Version number of the script serving new requests (1 at start, +1 per accepted reload).",
        );
        let hook_metrics = HookMetrics::new(registry);
        let host = ScriptHost {
            path: path.to_owned(),
            limits,
            services,
            domains: domains.to_vec(),
            current: Mutex::new(Arc::new(ScriptSource {
                name: String::new(),
                text: String::new(),
                version: 0,
            })),
            version: AtomicU64::new(0),
            reloads,
            failed_reloads,
            version_gauge,
            hook_metrics,
        };
        let source = host.read_and_check(1)?;
        host.publish(source);
        Ok(Arc::new(host))
    }

    /// The script named by `config`, with the services a server gives it: a fresh `sip.kv`
    /// store, the registrar over the configured location store (`[location]`; the durable
    /// one is loaded from disk here, before the server answers anything) and the digest
    /// authenticator over `<data_dir>/subscribers` (`[auth]`). Reads the server key
    /// (`crate::secret::server_key`); a server that has it already gives it to
    /// [`ScriptHost::with_server_key`].
    pub fn from_config(config: &crate::config::Config) -> Result<Arc<ScriptHost>, ScriptError> {
        let server_key = config.server_key().map_err(ScriptError)?;
        ScriptHost::with_server_key(config, server_key)
    }

    /// [`ScriptHost::from_config`] with the server key read already: it signs digest nonces
    /// and, in a cluster, this node's flow tokens.
    pub fn with_server_key(
        config: &crate::config::Config,
        server_key: Vec<u8>,
    ) -> Result<Arc<ScriptHost>, ScriptError> {
        // AORs of our own domains are port-free; the stored keys follow the rule before the
        // first lookup. The listen addresses as configured: one on port 0 names us on any
        // port (the port is chosen when the loops bind, after the store is loaded).
        let aors = crate::registrar::AorRule::new(LocalIdentity::new(
            &config.domains,
            config.listen.iter().map(|l| l.addr),
        ));
        let crate::location::Opened { store, shared_link } =
            crate::location::open_configured(&config.location, &config.data_dir, &aors)
                .map_err(ScriptError)?;
        let metrics = crate::metrics::Registry::new();
        let engine = register_service_metrics(&metrics, &store);
        let mut registrar = crate::registrar::Registrar::new(
            store,
            crate::registrar::Rules::from(&config.registrar),
        )
        .with_aor_rule(aors)
        .with_registrations_counter(engine.registrations);
        let cluster = shared_link.and_then(|link| cluster_node(config, &server_key, link));
        if let Some(node) = &cluster {
            node.register_metrics(&metrics);
            registrar = registrar.with_node(node.clone());
        }
        // Nonces are signed with the server key (`[auth] secret`, else `<data_dir>/secret`), so
        // they survive a restart: phones are not answered `stale` after one.
        let settings = config.auth.settings(server_key);
        let auth = crate::auth::open(&settings, &config.data_dir).map_err(ScriptError)?;
        let dispatcher = Arc::new(
            crate::dispatcher::Dispatcher::from_config(&config.dispatcher).map_err(ScriptError)?,
        );
        crate::dispatcher::register_metrics(&metrics, &dispatcher);
        let kv = Arc::new(open_kv(&config.kv).map_err(ScriptError)?);
        kv.register_metrics(&metrics);
        let services = Services {
            kv,
            registrar: Some(Arc::new(registrar)),
            cluster,
            auth: Some(Arc::new(auth)),
            pike: Arc::new(
                crate::flood::Pike::new((&config.pike).into())
                    .with_blocks_counter(engine.pike_blocks),
            ),
            metrics,
            dispatcher,
            flows: Arc::default(),
            clock: None,
        };
        ScriptHost::load(
            &config.script,
            Limits::from(&config.lua),
            Arc::new(services),
            &config.domains,
        )
    }

    /// Reads the file again and switches every loop to it if it is valid; returns the new
    /// version. On error the old version keeps serving.
    pub fn reload(&self) -> Result<u64, ScriptError> {
        let next = self.version() + 1;
        let started = Instant::now();
        match self.read_and_check(next) {
            Ok(source) => {
                self.publish(source);
                self.reloads.inc();
                info!(
                    script = %self.path.display(),
                    version = next,
                    check_us = started.elapsed().as_micros() as u64,
                    "script reloaded"
                );
                Ok(next)
            }
            Err(e) => {
                self.failed_reloads.inc();
                error!(error = %e, version = self.version(), "script refused; the running version keeps serving");
                Err(e)
            }
        }
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Accepted and refused reloads since start.
    pub fn reload_counts(&self) -> (u64, u64) {
        (self.reloads.get(), self.failed_reloads.get())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// The current version's source.
    pub fn current(&self) -> Arc<ScriptSource> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A factory giving each event loop its own [`ScriptRouter`].
    pub fn router_factory(self: &Arc<Self>) -> RouterFactory {
        let host = self.clone();
        Arc::new(move |loop_index, identity: &LocalIdentity| {
            Box::new(ScriptRouter::new(
                host.clone(),
                identity.clone(),
                loop_index,
            )) as Box<dyn Router>
        })
    }

    fn read_and_check(&self, version: u64) -> Result<ScriptSource, ScriptError> {
        let source = read_source(&self.path, version)?;
        let env = Env {
            identity: LocalIdentity::new(&self.domains, []),
            services: self.services.clone(),
            log: LogSink::Tracing,
        };
        Engine::load(&source, self.limits, env)?;
        Ok(source)
    }

    fn publish(&self, source: ScriptSource) {
        let version = source.version;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(source);
        self.version.store(version, Ordering::Release);
        self.version_gauge.set(version as f64);
    }
}

/// The `sip.kv` store `[kv]` asks for: this node's memory, or a Redis server shared with other
/// nodes (the node starts when Redis is not there yet: `sip.kv` calls fail until it is).
/// This node of a cluster on the shared location store behind `link` (`crate::cluster`):
/// `[location] node_uri`, else the first listener; `None` (with a warning: other nodes then
/// reach its TCP and NATed phones directly, which may fail) when neither names it.
fn cluster_node(
    config: &crate::config::Config,
    server_key: &[u8],
    link: Arc<crate::redis_link::RedisLink>,
) -> Option<Arc<crate::cluster::Node>> {
    let uri = match config.location.node_uri.trim() {
        "" => crate::cluster::default_node_uri(&config.domains, &config.listen),
        uri => Some(uri.to_owned()),
    };
    let Some(uri) = uri else {
        warn!("cluster: no node URI (first listener on port 0 and no [location] node_uri): other nodes reach this node's TCP and NATed phones directly");
        return None;
    };
    info!(node = %uri, "cluster: this node's URI");
    let signer = crate::proxy::route_sign::RouteSigner::new(server_key);
    Some(crate::cluster::Node::start(uri, signer, link))
}

fn open_kv(config: &crate::config::Kv) -> Result<super::kv::KvStore, String> {
    match config.backend {
        crate::config::KvBackend::Memory => Ok(super::kv::KvStore::new(super::KV_MAX_KEYS)),
        crate::config::KvBackend::Redis => {
            let link = crate::redis_link::RedisLink::open(&config.redis_url)?;
            if let Err(error) = link.ping(std::time::Duration::from_secs(2)) {
                tracing::warn!(url = %link.url_for_logs(), %error, "sip.kv: Redis does not answer yet");
            }
            Ok(super::kv::KvStore::on_redis(link))
        }
    }
}

/// Reads a script file into a [`ScriptSource`].
pub fn read_source(path: &Path, version: u64) -> Result<ScriptSource, ScriptError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ScriptError(format!("cannot read script {name}: {e}")))?;
    Ok(ScriptSource {
        name,
        text,
        version,
    })
}

/// Per-transaction state kept between hooks.
struct Pinned {
    engine: Rc<Engine>,
    vars: Table,
    /// `on_request` waiting in `sip.resolve` for its DNS answer.
    suspended: Option<Suspension>,
    /// The current dialog of that suspended run (`api::dialog`).
    dialog: dialog_api::Current,
}

/// An `on_request` run suspended in `sip.resolve`.
struct Suspension {
    thread: Thread,
    request: AnyUserData,
    method: Option<Method>,
    /// `sip.resolve` calls this request made so far.
    resolves: u32,
}

/// Most `sip.resolve` calls one request may make: each holds the request for a DNS round trip,
/// so a script resolving in a loop would otherwise hold it forever.
pub(crate) const MAX_RESOLVES_PER_REQUEST: u32 = 16;

/// One event loop's script runner.
pub struct ScriptRouter {
    host: Arc<ScriptHost>,
    identity: LocalIdentity,
    loop_index: usize,
    engine: Option<Rc<Engine>>,
    calls: IdMap<u64, Pinned>,
    next_handle: u64,
    /// Stands in for a request while the script holds it (cheap to clone: shared bytes).
    placeholder: Message,
    log: LogSink,
    /// The loop's dialog table, given to every Lua state this router loads.
    dialogs: Option<crate::dialog::SharedTable>,
}

impl ScriptRouter {
    pub fn new(host: Arc<ScriptHost>, identity: LocalIdentity, loop_index: usize) -> Self {
        ScriptRouter {
            host,
            identity,
            loop_index,
            engine: None,
            calls: IdMap::default(),
            next_handle: 0,
            placeholder: placeholder(),
            log: LogSink::Tracing,
            dialogs: None,
        }
    }

    /// Sends `sip.log` output to `lines` instead of the log (offline runs).
    pub fn capture_logs(&mut self, lines: Rc<RefCell<Vec<String>>>) {
        self.log = LogSink::Capture(lines);
        self.engine = None;
    }

    /// Transactions whose hooks still need their script state.
    pub fn pinned(&self) -> usize {
        self.calls.len()
    }

    /// The engine for new requests: the host's current version, loaded into this loop's own
    /// fresh state when it changed. If that fails (it passed the host's check, so only a
    /// resource problem can cause it) the loop keeps its previous version.
    fn current_engine(&mut self) -> Option<Rc<Engine>> {
        let wanted = self.host.version();
        if let Some(engine) = &self.engine {
            if engine.version() == wanted {
                return Some(engine.clone());
            }
        }
        let source = self.host.current();
        let env = Env {
            identity: self.identity.clone(),
            services: self.host.services.clone(),
            log: self.log.clone(),
        };
        let started = Instant::now();
        match Engine::load(&source, self.host.limits, env) {
            Ok(engine) => {
                if let Some(table) = &self.dialogs {
                    dialog_api::attach(engine.lua(), table.clone());
                }
                info!(
                    loop_index = self.loop_index,
                    version = engine.version(),
                    pause_us = started.elapsed().as_micros() as u64,
                    "event loop switched to script version"
                );
                self.engine = Some(Rc::new(engine));
            }
            Err(e) => {
                error!(loop_index = self.loop_index, error = %e, "cannot load the new script version in this event loop; keeping the old one");
            }
        }
        self.engine.clone()
    }

    /// The engine, one of its hooks and the vars of the transaction behind `handle`, when that
    /// hook is defined.
    fn pinned_hook(
        &self,
        handle: RouteHandle,
        pick: impl Fn(&super::engine::Hooks) -> &Option<Function>,
    ) -> Option<(Rc<Engine>, Function, Table)> {
        let pinned = self.calls.get(&handle.0)?;
        let hook = pick(pinned.engine.hooks()).clone()?;
        Some((pinned.engine.clone(), hook, pinned.vars.clone()))
    }

    fn pin(&mut self, engine: Rc<Engine>, vars: Table) -> RouteHandle {
        self.next_handle += 1;
        let pinned = Pinned {
            engine,
            vars,
            suspended: None,
            dialog: dialog_api::Current::default(),
        };
        self.calls.insert(self.next_handle, pinned);
        RouteHandle(self.next_handle)
    }

    /// After `on_request` (or a slice of it, resumed after DNS): the current dialog waits
    /// with a suspended run; a relayed call's dispatcher count moves to the dialog the script
    /// manages for it; a dialog the script managed but did not relay is settled.
    fn settle_dialog(&mut self, engine: &Engine, routed: &Routed) {
        let current = dialog_api::take_current(engine.lua());
        match (&routed.decision, routed.handle) {
            (Decision::Resolve { .. }, Some(handle)) => {
                if let Some(pinned) = self.calls.get_mut(&handle.0) {
                    pinned.dialog = current;
                }
            }
            (Decision::Relay { .. }, Some(handle)) => {
                if let (Some(id), true, Some(pinned)) =
                    (current.id, current.managed, self.calls.get(&handle.0))
                {
                    super::api::dispatcher::bind_dialog(engine.lua(), &pinned.vars, id);
                }
            }
            _ => dialog_api::settle_managed(engine.lua(), current, routed),
        }
    }

    /// Turns the end of an `on_request` run into the routing decision. `handle` is the pin a
    /// resumed run already has; it is kept only if the later hooks need it.
    fn conclude(
        &mut self,
        engine: Rc<Engine>,
        vars: Table,
        run: Result<RequestRun, ScriptError>,
        method: Option<Method>,
        request: &mut Message,
        (handle, resolves_before): (Option<RouteHandle>, u32),
    ) -> Routed {
        let unpin = |router: &mut Self| {
            if let Some(handle) = handle {
                router.calls.remove(&handle.0);
            }
        };
        let state = match run {
            Ok(RequestRun::Done(state, Ok(()))) => state,
            Ok(RequestRun::Suspended {
                query,
                thread,
                request: ud,
            }) => {
                let handle = handle.unwrap_or_else(|| self.pin(engine, vars));
                let resolves = resolves_before + 1;
                if resolves > MAX_RESOLVES_PER_REQUEST {
                    self.calls.remove(&handle.0);
                    error!(
                        limit = MAX_RESOLVES_PER_REQUEST,
                        "on_request called sip.resolve too often; answering 500"
                    );
                    return failed_decision(&method);
                }
                if let Some(pinned) = self.calls.get_mut(&handle.0) {
                    pinned.suspended = Some(Suspension {
                        thread,
                        request: ud,
                        method,
                        resolves,
                    });
                }
                return Routed {
                    decision: Decision::Resolve { query },
                    handle: Some(handle),
                };
            }
            Ok(RequestRun::Done(state, Err(e))) => {
                *request = state.msg;
                super::api::dispatcher::end_call(engine.lua(), &vars);
                unpin(self);
                error!(call_id = %call_id(request), error = %e, "on_request failed");
                return failed_decision_for(&method, &e.to_string());
            }
            Err(e) => {
                super::api::dispatcher::end_call(engine.lua(), &vars);
                unpin(self);
                error!(call_id = %call_id(request), error = %e, "on_request failed");
                return failed_decision_for(&method, &e.to_string());
            }
        };
        let mut state = state;
        let mut decision = match state.decision.take() {
            Some((decision, _)) => decision,
            None => undecided(&method, &state.msg),
        };
        super::api::tm::complete(&state, &mut decision);
        guard_preloaded_route(&mut state, &decision);
        *request = state.msg;
        // A call counted at a dispatcher destination is counted until the transaction ends
        // (`release`).
        let keeps_state = matches!(decision, Decision::Relay { .. })
            && (engine.hooks().on_reply.is_some()
                || engine.hooks().on_failure.is_some()
                || engine.hooks().on_branch.is_some()
                || engine.hooks().on_branch_failure.is_some()
                || super::api::dispatcher::holds_call(engine.lua(), &vars));
        let handle = match (keeps_state, handle) {
            (true, Some(handle)) => Some(handle),
            (true, None) => Some(self.pin(engine, vars)),
            (false, _) => {
                super::api::dispatcher::end_call(engine.lua(), &vars);
                unpin(self);
                None
            }
        };
        Routed { decision, handle }
    }
}

/// Keeps a request the script relays or forwards from following a Route its sender pre-loaded,
/// unless the script asked for it with `req:follow_preloaded_route()`: RFC 3261 §16.6 step 7
/// would send it to the top Route, wherever the sender pointed it (an open relay, and with
/// `;transport=tcp` and a port, a port scanner of the hosts this server reaches). A route set
/// this server issued (`loose_route()`) is not pre-loaded and is followed; a Route the script
/// wrote itself is its own decision (`remove_preloaded_route`). One `info` line per request
/// whose Route is removed.
pub(crate) fn guard_preloaded_route(state: &mut ScriptMsg, decision: &Decision) {
    let relays = matches!(decision, Decision::Relay { .. } | Decision::Forward { .. });
    if !relays || state.follows_preloaded_route || state.preloaded_route.is_empty() {
        return;
    }
    if let Ok(true) = remove_preloaded_route(&mut state.msg, &state.preloaded_route) {
        let route = state
            .preloaded_route
            .iter()
            .map(|v| String::from_utf8_lossy(v))
            .collect::<Vec<_>>()
            .join(", ");
        info!(
            call_id = %call_id(&state.msg),
            source = state.meta.map(|m| tracing::field::display(m.source)),
            route,
            "pre-loaded Route removed, not followed (the script did not call req:follow_preloaded_route())"
        );
    }
}

/// The answer to a request whose `on_request` failed: 500, except that an ACK is dropped.
fn failed_decision(method: &Option<Method>) -> Routed {
    match method {
        Some(Method::Ack) => Decision::drop().into(),
        _ => Decision::reply(500, "Server Internal Error").into(),
    }
}

/// [`failed_decision`] for a hook that failed with `error`: a shared store (`sip.kv` on
/// Redis) that could not be reached makes it 503 with Retry-After (RFC 3261 §21.5.4: a
/// temporary condition; another node, or this one later, may serve the request).
fn failed_decision_for(method: &Option<Method>, error: &str) -> Routed {
    if method == &Some(Method::Ack) || !error.contains(super::kv::UNAVAILABLE) {
        return failed_decision(method);
    }
    Decision::Reply {
        code: 503,
        reason: std::borrow::Cow::Borrowed("Service Unavailable (shared store unreachable)"),
        headers: vec![(
            "Retry-After".to_owned(),
            crate::registrar::UNREACHABLE_RETRY_AFTER.to_string(),
        )],
        wait_for: None,
    }
    .into()
}

impl Router for ScriptRouter {
    fn route(&mut self, request: &mut Message, meta: &Meta, info: RouteInfo) -> Routed {
        let Some(engine) = self.current_engine() else {
            return Decision::reply(500, "Server Internal Error (no routing script)").into();
        };
        let method = request.method().cloned();
        let Ok(vars) = engine.lua().create_table() else {
            return Decision::reply(500, "Server Internal Error (script out of memory)").into();
        };
        let taken = std::mem::replace(request, self.placeholder.clone());
        dialog_api::take_current(engine.lua());
        let started = Instant::now();
        let run = run_request_hook(&engine, taken, meta, info, vars.clone());
        self.host
            .hook_metrics
            .of("on_request")
            .record(started, run_failed(&run), true);
        let lua_engine = engine.clone();
        let routed = self.conclude(engine, vars, run, method, request, (None, 0));
        self.settle_dialog(&lua_engine, &routed);
        routed
    }

    fn resume(
        &mut self,
        handle: RouteHandle,
        request: &mut Message,
        answer: Result<Vec<crate::dns::Candidate>, crate::dns::ResolveError>,
    ) -> Routed {
        let Some(pinned) = self.calls.get_mut(&handle.0) else {
            return Decision::reply(500, "Server Internal Error (nothing to resume)").into();
        };
        let Some(suspension) = pinned.suspended.take() else {
            self.calls.remove(&handle.0);
            return Decision::reply(500, "Server Internal Error (nothing to resume)").into();
        };
        let engine = pinned.engine.clone();
        let vars = pinned.vars.clone();
        let resolves = suspension.resolves;
        let method = suspension.method.clone();
        dialog_api::restore_current(engine.lua(), pinned.dialog);
        let started = Instant::now();
        let run = resume_request_hook(&engine, suspension.thread, suspension.request, &answer);
        self.host
            .hook_metrics
            .of("on_request")
            .record(started, run_failed(&run), false);
        let lua_engine = engine.clone();
        let routed = self.conclude(engine, vars, run, method, request, (Some(handle), resolves));
        self.settle_dialog(&lua_engine, &routed);
        routed
    }

    fn on_branch(&mut self, handle: RouteHandle, request: &Message, target: &Target) -> BranchEdit {
        let Some((engine, hook, vars)) = self.pinned_hook(handle, |h| &h.on_branch) else {
            return BranchEdit::Unchanged;
        };
        let mut copy = request.clone();
        if copy.set_request_uri(&target.uri).is_err() {
            return BranchEdit::Unchanged;
        }
        let pair = [(request.clone(), Role::View), (copy, Role::Branch)];
        match call_pair(
            &engine,
            &hook,
            &vars,
            pair,
            request,
            self.host.hook_metrics.of("on_branch"),
        ) {
            Some([_, b]) if b.dropped => BranchEdit::Skip,
            Some([_, b]) if b.edited => BranchEdit::Edited(b.msg),
            _ => BranchEdit::Unchanged,
        }
    }

    fn on_reply(
        &mut self,
        handle: RouteHandle,
        request: &Message,
        response: &mut Message,
        source: Option<ReplySource>,
    ) -> bool {
        let Some((engine, hook, vars)) = self.pinned_hook(handle, |h| &h.on_reply) else {
            return true;
        };
        let pair = [
            (request.clone(), Role::View),
            (response.clone(), Role::Response),
        ];
        let with_source = |res: &mut ScriptMsg| {
            res.meta = source.map(|s| s.meta);
            res.sent_to = source.map(|s| s.sent_to);
        };
        let mut dropped = false;
        if let Some([_, res]) = call_pair_with(
            &engine,
            &hook,
            &vars,
            pair,
            with_source,
            request,
            self.host.hook_metrics.of("on_reply"),
        ) {
            dropped = res.dropped;
            if res.edited {
                // `res:fix_nated_contact()`: the rewritten response is the one forwarded.
                *response = res.msg;
            }
        }
        if dropped && response.status().is_some_and(|c| c >= 200) {
            warn!(call_id = %call_id(request), "on_reply: a final response cannot be dropped; passing it on");
        }
        !dropped
    }

    fn on_failure(
        &mut self,
        handle: Option<RouteHandle>,
        request: &Message,
        best: &Message,
        branches: &[BranchOutcome],
    ) -> FailureDecision {
        let Some((engine, hook, vars)) =
            handle.and_then(|h| self.pinned_hook(h, |hooks| &hooks.on_failure))
        else {
            return FailureDecision::SendBest;
        };
        let pair = [
            (request.clone(), Role::Failure),
            (best.clone(), Role::Response),
        ];
        let Some([mut req, _]) = call_pair_with(
            &engine,
            &hook,
            &vars,
            pair,
            |res| res.branches = Some(branches.to_vec()),
            request,
            self.host.hook_metrics.of("on_failure"),
        ) else {
            return FailureDecision::SendBest;
        };
        let Some((mut decision, _)) = req.decision.take() else {
            return FailureDecision::SendBest;
        };
        super::api::tm::complete(&req, &mut decision);
        failure_decision(decision, req.edited.then(|| Box::new(req.msg)))
    }

    fn on_branch_failure(
        &mut self,
        handle: RouteHandle,
        request: &Message,
        outcome: &BranchOutcome,
        response: &dyn Fn() -> Option<Message>,
    ) {
        let Some((engine, hook, vars)) = self.pinned_hook(handle, |h| &h.on_branch_failure) else {
            return;
        };
        let Some(response) = response() else {
            return;
        };
        let pair = [(request.clone(), Role::View), (response, Role::Response)];
        call_pair_with(
            &engine,
            &hook,
            &vars,
            pair,
            |res| res.branch = Some(outcome.clone()),
            request,
            self.host.hook_metrics.of("on_branch_failure"),
        );
    }

    fn on_dialog_end(&mut self, cdr: &crate::dialog::Cdr) {
        let Some(engine) = self.current_engine() else {
            return;
        };
        let Some(hook) = engine.hooks().on_dialog_end.clone() else {
            return;
        };
        let started = Instant::now();
        let result = dialog_api::cdr_table(engine.lua(), cdr)
            .map_err(|e| ScriptError(e.to_string()))
            .and_then(|dlg| engine.call(&hook, dlg));
        self.host
            .hook_metrics
            .of("on_dialog_end")
            .record(started, result.is_err(), true);
        if let Err(e) = result {
            error!(call_id = %cdr.call_id, error = %e, "on_dialog_end failed");
        }
    }

    fn attach_dialogs(&mut self, dialogs: crate::dialog::SharedTable) {
        if let Some(engine) = &self.engine {
            dialog_api::attach(engine.lua(), dialogs.clone());
        }
        self.dialogs = Some(dialogs);
    }

    fn release(&mut self, handle: RouteHandle) {
        match self.calls.remove(&handle.0) {
            Some(pinned) => super::api::dispatcher::end_call(pinned.engine.lua(), &pinned.vars),
            None => debug!(handle = handle.0, "released an unknown route handle"),
        }
        crate::memory::shrink_if_sparse(&mut self.calls);
    }
}

/// How a run of `on_request` ended.
// Not boxed: the value lives for one call and boxing `Done` would allocate per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum RequestRun {
    /// It returned, or failed: the message object as the script left it, and the result.
    Done(ScriptMsg, Result<(), ScriptError>),
    /// It waits in `sip.resolve` for the answer to `query` ([`resume_request_hook`]).
    Suspended {
        query: crate::dns::Query,
        thread: Thread,
        request: AnyUserData,
    },
}

/// Calls `on_request` with `request` as `req`, in a coroutine so `sip.resolve` can suspend it.
/// An error when the message object could not be made or taken back.
pub(crate) fn run_request_hook(
    engine: &Engine,
    request: Message,
    meta: &Meta,
    info: RouteInfo,
    vars: Table,
) -> Result<RequestRun, ScriptError> {
    let mut state = ScriptMsg::new(request, Role::Request);
    state.meta = Some(*meta);
    state.info = info;
    state.vars = Some(vars);
    if info.had_route && !info.own_route_signed {
        // Parsed by §16.4 already; only requests that still carry a Route pay for this.
        state.preloaded_route = route_set(&state.msg).unwrap_or_default();
    }
    let ud = engine
        .lua()
        .create_userdata(state)
        .map_err(|e| ScriptError(e.to_string()))?;
    let step = engine.start(&engine.hooks().on_request, ud.clone());
    settle(engine, ud, step)
}

/// Continues an `on_request` suspended in `sip.resolve`, which returns `answer`.
pub(crate) fn resume_request_hook(
    engine: &Engine,
    thread: Thread,
    request: AnyUserData,
    answer: &Result<Vec<crate::dns::Candidate>, crate::dns::ResolveError>,
) -> Result<RequestRun, ScriptError> {
    let values =
        super::api::resolve_answer(engine.lua(), answer).map_err(|e| ScriptError(e.to_string()))?;
    let step = engine.resume(&thread, values).map(|step| (step, thread));
    settle(engine, request, step)
}

fn settle(
    engine: &Engine,
    ud: AnyUserData,
    step: Result<(Step, Thread), ScriptError>,
) -> Result<RequestRun, ScriptError> {
    let result = match step {
        Ok((Step::Resolve(query), thread)) => {
            return Ok(RequestRun::Suspended {
                query,
                thread,
                request: ud,
            })
        }
        Ok((Step::Finished, thread)) => {
            engine.recycle(thread);
            Ok(())
        }
        Err(e) => Err(e),
    };
    let state = ud.take::<ScriptMsg>().map_err(|e| {
        ScriptError(format!(
            "{}: the request object was lost: {e}",
            engine.name()
        ))
    })?;
    Ok(RequestRun::Done(state, result))
}

/// Calls a later hook with two message objects sharing the transaction's vars; returns them as
/// the script left them, or `None` when the hook failed (logged: the engine's default applies).
fn call_pair(
    engine: &Engine,
    hook: &Function,
    vars: &Table,
    messages: [(Message, Role); 2],
    request: &Message,
    metrics: &HookCells,
) -> Option<[ScriptMsg; 2]> {
    call_pair_with(engine, hook, vars, messages, |_| {}, request, metrics)
}

/// [`call_pair`], with `prepare` filling in the second message object before the call (the
/// transport information of a response).
fn call_pair_with(
    engine: &Engine,
    hook: &Function,
    vars: &Table,
    messages: [(Message, Role); 2],
    prepare: impl FnOnce(&mut ScriptMsg),
    request: &Message,
    metrics: &HookCells,
) -> Option<[ScriptMsg; 2]> {
    let name = metrics.name;
    let lua = engine.lua();
    let [(msg_a, role_a), (msg_b, role_b)] = messages;
    let mut a = ScriptMsg::new(msg_a, role_a);
    a.vars = Some(vars.clone());
    let mut b = ScriptMsg::new(msg_b, role_b);
    b.vars = Some(vars.clone());
    prepare(&mut b);
    let [a, b] = [a, b].map(|state| lua.create_userdata(state));
    let (a, b) = (a.ok()?, b.ok()?);
    let started = Instant::now();
    let result = engine.call(hook, (a.clone(), b.clone()));
    metrics.record(started, result.is_err(), true);
    if let Err(e) = result {
        error!(call_id = %call_id(request), error = %e, hook = name, "hook failed; the engine's default applies");
        return None;
    }
    Some([a.take::<ScriptMsg>().ok()?, b.take::<ScriptMsg>().ok()?])
}

/// What the engine does after `on_failure` decided: new branches copy the request as the
/// script left it when it edited it; `reply` answers upstream with the script's final.
fn failure_decision(decision: Decision, edited: Option<Box<Message>>) -> FailureDecision {
    match decision {
        Decision::Relay {
            targets, timers, ..
        } => FailureDecision::Targets {
            targets,
            timers,
            request: edited,
        },
        Decision::Reply {
            code,
            reason,
            headers,
            ..
        } => FailureDecision::Reply {
            code,
            reason,
            headers,
        },
        _ => FailureDecision::SendBest,
    }
}

/// Whether an `on_request` run ended in a Lua error (budget and memory exhaustion included).
fn run_failed(run: &Result<RequestRun, ScriptError>) -> bool {
    matches!(run, Err(_) | Ok(RequestRun::Done(_, Err(_))))
}

/// What happens to a request the script neither answered nor relayed: an ACK is dropped (it is
/// never answered), a CANCEL that matched nothing gets 481 (§9.2), anything else 500 with a
/// warning, so a forgotten branch in a script shows up in the log instead of as a silent
/// timeout at the caller.
pub(crate) fn undecided(method: &Option<Method>, request: &Message) -> Decision {
    match method {
        Some(Method::Ack) => Decision::drop(),
        Some(Method::Cancel) => Decision::reply(481, "Call/Transaction Does Not Exist"),
        _ => {
            warn!(call_id = %call_id(request), method = ?method, "on_request returned without a decision; answering 500");
            Decision::reply(500, "Server Internal Error (no routing decision)")
        }
    }
}

fn call_id(request: &Message) -> String {
    String::from_utf8_lossy(request.call_id().unwrap_or(b"")).into_owned()
}

fn placeholder() -> Message {
    const TEXT: &[u8] = b"OPTIONS sip:placeholder.invalid SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKplaceholder\r\nFrom: <sip:placeholder.invalid>;tag=p\r\nTo: <sip:placeholder.invalid>\r\nCall-ID: placeholder\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
    match Message::parse(Bytes::from_static(TEXT)) {
        Ok(m) => m,
        Err(e) => unreachable!("the placeholder request is valid: {e}"),
    }
}

/// The engine counters of the shared services, registered in the server's registry.
struct ServiceMetrics {
    registrations: crate::metrics::Counter,
    pike_blocks: crate::metrics::Counter,
}

/// `moonroute_location_bindings` (read from the store at scrape time),
/// `moonroute_registrations_total` and `moonroute_pike_blocks_total`.
fn register_service_metrics(
    metrics: &crate::metrics::Registry,
    store: &Arc<dyn crate::location::LocationStore>,
) -> ServiceMetrics {
    store.register_metrics(metrics);
    let bindings = Arc::downgrade(store);
    metrics.gauge_fn(
        "moonroute_location_bindings",
        "Registered contacts (bindings) in the location store, all AORs, expired ones not yet swept included.",
        move || bindings.upgrade().map_or(0.0, |store| store.count() as f64),
    );
    ServiceMetrics {
        registrations: metrics.counter(
            "moonroute_registrations_total",
            "REGISTER requests the registrar answered 200 (new, refreshed, removed or queried bindings; retransmissions included).",
        ),
        pike_blocks: metrics.counter(
            "moonroute_pike_blocks_total",
            "Requests sip.pike_check found over the [pike] rate limit of their source.",
        ),
    }
}
