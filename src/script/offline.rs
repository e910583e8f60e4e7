//! Scripts without a network: `moonroute check SCRIPT` (does it load?) and
//! `moonroute test SCRIPT --message FILE.sip` (what does it decide for this message?), plus
//! `moonroute test --lua FILE`, where a Lua test file calls `moonroute.run{...}` and asserts
//! on the outcome, so operators can unit-test their routing policy in CI.
//!
//! A test run does what the server does before `on_request` (received/rport stamping, §16.3
//! checks are left out, §16.4 route preprocessing) and then runs the hook in a fresh state
//! with a location store loaded from a fixture; nothing is sent anywhere.
//!
//! Record-Route signatures (`crate::proxy::route_sign`) use the fixed key [`OFFLINE_KEY`]
//! here, not the server's: a test file gets the signature for an in-dialog request from
//! `moonroute.route_signature{call_id=..., from_tag=..., to_tag=..., ruri=...}` to write a
//! Route the "server" accepts.
//!
//! Digest authentication (RFC 3261 §22) is checked against a subscriber fixture
//! (`--subscribers`, `moonroute.run{subscribers = ...}`) loaded into a temporary subscriber
//! table, with nonces signed by the fixed [`OFFLINE_AUTH_SECRET`]: a nonce from one run's
//! challenge is valid in the next, and `moonroute.digest{...}` computes the credentials a UA
//! would send (RFC 2617 §3.2.2, RFC 8760). Without a fixture there is no authenticator.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use mlua::{Lua, Table, Value};

use super::api::{Role, ScriptMsg};
use super::engine::{Engine, Env, Limits, LogSink, ScriptError, ScriptSource};
use super::kv::KvStore;
use super::router::{
    guard_preloaded_route, read_source, resume_request_hook, run_request_hook, undecided,
    RequestRun, MAX_RESOLVES_PER_REQUEST,
};
use super::{Services, KV_MAX_KEYS};
use crate::auth::{Authenticator, Subscribers};
use crate::dns::{Candidate, Query, ResolveError, Resolver};
use crate::location::MemoryLocation;
use crate::proxy::response_context::{BranchOutcome as ProxyOutcome, Target};
use crate::proxy::route_sign::{Binding, Holder};
use crate::proxy::router::{Decision, RouteInfo};
use crate::proxy::RouteSigner;

/// The key offline runs sign and check Record-Route with (never a server's).
pub const OFFLINE_KEY: &[u8] = b"moonroute offline test key";
/// The secret offline runs sign digest nonces with (never a server's), the same for every
/// run: a challenge's nonce from one run is accepted by the next.
pub const OFFLINE_AUTH_SECRET: &[u8] = b"moonroute offline digest nonce secret";
use crate::proxy::identity::LocalIdentity;
use crate::proxy::{preprocess_routes, ProxyIdentity};
use crate::registrar::{AorRule, Registrar, Rules};
use crate::sip::{Message, Uri};
use crate::transport::{ListenAddr, Meta, TransportKind};

/// The address an offline run pretends to listen on.
const LOCAL: &str = "127.0.0.1:5060";

/// `moonroute check`: loads the script as a reload would, then lints it (`script::lint`): a
/// one-line summary, or the load error, or one `file:line: message` line per mistake found.
pub fn check(path: &Path) -> Result<String, ScriptError> {
    let source = read_source(path, 1)?;
    let env = Env {
        identity: LocalIdentity::default(),
        services: Arc::new(Services::default()),
        log: LogSink::Capture(Rc::default()),
    };
    let engine = Engine::load(&source, Limits::default(), env)?;
    let names = EngineNames::new(engine.lua())?;
    let findings = super::lint::lint(&source.text, &names);
    if !findings.is_empty() {
        let lines: Vec<String> = findings
            .iter()
            .map(|f| format!("{}:{}: {}", source.name, f.line, f.message))
            .collect();
        return Err(ScriptError(lines.join("\n")));
    }
    let hooks = engine.hooks();
    let mut defined = vec!["on_request"];
    for (name, present) in [
        ("on_reply", hooks.on_reply.is_some()),
        ("on_failure", hooks.on_failure.is_some()),
        ("on_branch", hooks.on_branch.is_some()),
        ("on_dialog_end", hooks.on_dialog_end.is_some()),
        ("on_branch_failure", hooks.on_branch_failure.is_some()),
    ] {
        if present {
            defined.push(name);
        }
    }
    Ok(format!("{}: ok ({})", source.name, defined.join(", ")))
}

/// The names a loaded engine knows, for the lint: a message object is asked whether it has
/// a field (its fallback `__index` answers "no"), the `sip` table is walked.
struct EngineNames<'a> {
    lua: &'a Lua,
    probe: mlua::AnyUserData,
}

impl<'a> EngineNames<'a> {
    fn new(lua: &'a Lua) -> Result<EngineNames<'a>, ScriptError> {
        let request = parse_message(
            b"OPTIONS sip:probe.invalid SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKprobe\r\nFrom: <sip:probe.invalid>;tag=p\r\nTo: <sip:probe.invalid>\r\nCall-ID: probe\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        )?;
        let probe = lua
            .create_userdata(ScriptMsg::new(request, Role::Request))
            .map_err(|e| ScriptError(e.to_string()))?;
        Ok(EngineNames { lua, probe })
    }
}

impl super::lint::Names for EngineNames<'_> {
    fn message_has(&self, name: &str) -> bool {
        use mlua::ObjectLike as _;
        self.probe.get::<Value>(name).is_ok()
    }

    fn sip_keys(&self, path: &[String]) -> Option<Vec<String>> {
        let mut table: Table = self.lua.globals().get("sip").ok()?;
        for key in path {
            table = match table.raw_get::<Value>(key.as_str()).ok()? {
                Value::Table(t) => t,
                _ => return None,
            };
        }
        let mut keys = Vec::new();
        for pair in table.pairs::<Value, Value>() {
            let (key, value) = pair.ok()?;
            // A namespace holds functions and namespaces; a table of data takes any key.
            if !matches!(value, Value::Function(_) | Value::Table(_)) {
                return None;
            }
            keys.push(key.to_string().ok()?);
        }
        Some(keys)
    }
}

/// Options of a test run.
#[derive(Clone, Debug)]
pub struct TestOptions {
    pub source: ListenAddr,
    pub domains: Vec<String>,
    /// A location fixture file.
    pub location: Option<PathBuf>,
    /// Stamp `rport` on UDP requests as if asked for, as the server does with `[nat]
    /// force_rport` (its default, true).
    pub force_rport: bool,
    /// A subscriber fixture file (`USER@DOMAIN PASSWORD [REALM]` per line): with it, the run
    /// has an authenticator; without, `authorize` finds none.
    pub subscribers: Option<PathBuf>,
    /// The time the run pretends it is (digest nonces, location expiry); `None`: the clock.
    pub clock: Option<SystemTime>,
}

impl Default for TestOptions {
    fn default() -> Self {
        TestOptions {
            source: ListenAddr::new(TransportKind::Udp, ([127, 0, 0, 1], 5070).into()),
            domains: Vec::new(),
            location: None,
            force_rport: crate::config::Nat::default().force_rport,
            subscribers: None,
            clock: None,
        }
    }
}

/// A script variable's value, as a test shows it.
#[derive(Clone, Debug, PartialEq)]
pub enum VarValue {
    Str(String),
    Int(i64),
    Num(f64),
    Bool(bool),
    /// Tables and functions, shown by `tostring`.
    Other(String),
}

/// What one run decided.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub request_line: String,
    /// `reply`, `relay`, `forward` or `drop`.
    pub decision: &'static str,
    /// The primitive that decided, or `None` when the script decided nothing.
    pub primitive: Option<&'static str>,
    pub code: Option<u16>,
    pub reason: Option<String>,
    pub reply_headers: Vec<(String, String)>,
    pub targets: Vec<(String, u16)>,
    pub record_route: bool,
    pub ruri_before: String,
    pub ruri_after: String,
    pub headers_added: Vec<String>,
    pub headers_removed: Vec<String>,
    pub vars: Vec<(String, VarValue)>,
    pub logs: Vec<String>,
    /// The hook failed (the server answers 500).
    pub error: Option<String>,
    /// The samples of the script's metrics after the run (`name{labels}`, value).
    pub metrics: Vec<(String, f64)>,
    /// With responses fed: each branch, in the order it started.
    pub branches: Vec<BranchOutcome>,
    /// With responses fed: every response `on_reply` saw, in order.
    pub replies: Vec<u16>,
    /// With responses fed: each `on_failure` call.
    pub failures: Vec<FailureOutcome>,
    /// With responses fed: the final response the caller gets (a 2xx, or the best).
    pub final_code: Option<u16>,
    /// Errors of `on_branch`/`on_reply` (the server logs them and applies its default).
    pub hook_errors: Vec<String>,
}

/// `moonroute test SCRIPT --message FILE`: runs the script and formats the outcome.
pub fn test_message(
    script: &Path,
    message: &Path,
    options: &TestOptions,
) -> Result<String, ScriptError> {
    let text = std::fs::read(message)
        .map_err(|e| ScriptError(format!("cannot read message {}: {e}", message.display())))?;
    let read_fixture = |path: &Option<PathBuf>, what: &str| match path {
        Some(path) => std::fs::read_to_string(path)
            .map(Some)
            .map_err(|e| ScriptError(format!("cannot read {what} {}: {e}", path.display()))),
        None => Ok(None),
    };
    let location = read_fixture(&options.location, "location fixture")?;
    let subscribers = read_fixture(&options.subscribers, "subscriber fixture")?;
    let fixtures = Fixtures {
        location: location.as_deref(),
        subscribers: subscribers.as_deref(),
    };
    let source = read_source(script, 1)?;
    let outcome = run_with(&source, &text, &fixtures, options)?;
    Ok(format_outcome(&source.name, &outcome))
}

/// The fixtures of a run, as text.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fixtures<'a> {
    /// The location store (`MemoryLocation::from_fixture`'s format).
    pub location: Option<&'a str>,
    /// The subscriber table (`Subscribers::from_fixture`'s format).
    pub subscribers: Option<&'a str>,
}

/// Runs `on_request` of `source` once on `message`, with a location fixture only.
pub fn run_once(
    source: &ScriptSource,
    message: &[u8],
    location: Option<&str>,
    options: &TestOptions,
) -> Result<Outcome, ScriptError> {
    let fixtures = Fixtures {
        location,
        subscribers: None,
    };
    run_with(source, message, &fixtures, options)
}

/// Runs `on_request` of `source` once on `message` with `fixtures`.
pub fn run_with(
    source: &ScriptSource,
    message: &[u8],
    fixtures: &Fixtures<'_>,
    options: &TestOptions,
) -> Result<Outcome, ScriptError> {
    Session::new(source, fixtures, options)?.run(message, options, &[])
}

/// One branch's outcome fed to an offline run (`moonroute.run{responses = ...}`): the
/// responses its target sends, provisional ones first, or none at all (`timeout`: the
/// engine's 408, which `on_reply` does not see).
#[derive(Clone, Debug, PartialEq)]
pub enum Feed {
    Responses(Vec<u16>),
    /// Provisional responses (possibly none), then no final answer.
    Timeout(Vec<u16>),
}

/// What happened to one branch of a run fed with responses.
#[derive(Clone, Debug)]
pub struct BranchOutcome {
    pub target: String,
    /// The final code, or 408 for a timeout.
    pub code: u16,
    pub timeout: bool,
    /// `on_branch` dropped the branch (`branch:drop()`): it got no request, so no outcome.
    pub dropped: bool,
    /// `on_branch` edited the branch's request: its Request-URI then.
    pub ruri: String,
}

/// What `on_failure` decided in a run fed with responses.
#[derive(Clone, Debug)]
pub struct FailureOutcome {
    /// The best response it saw (§16.7 step 6, with 503 kept as it is).
    pub code: u16,
    /// New targets, when it relayed again; empty: the best response goes upstream.
    pub targets: Vec<String>,
    /// The code of its own failure when it answered with `req:reply` (it goes upstream
    /// instead of the best response).
    pub reply: Option<u16>,
    pub error: Option<String>,
}

/// An engine state kept across runs (`moonroute.session{...}`): the Lua state (its globals),
/// `sip.kv`, the location store, the authenticator (its nonce counts) and the metrics live as
/// long as the session, as they do in a server; each run is one request.
pub struct Session {
    engine: Engine,
    services: Services,
    identity: LocalIdentity,
    logs: Rc<RefCell<Vec<String>>>,
}

impl Session {
    pub fn new(
        source: &ScriptSource,
        fixtures: &Fixtures<'_>,
        options: &TestOptions,
    ) -> Result<Session, ScriptError> {
        let local: std::net::SocketAddr =
            LOCAL.parse().map_err(|_| ScriptError("bad local".into()))?;
        let identity = LocalIdentity::new(&options.domains, [local]);
        let services = services(fixtures, options.clock, &identity)?;
        let logs = Rc::new(RefCell::new(Vec::new()));
        let env = Env {
            services: Arc::new(services.share(options.clock)),
            identity: identity.clone(),
            log: LogSink::Capture(logs.clone()),
        };
        let engine = Engine::load(source, Limits::default(), env)?;
        Ok(Session {
            engine,
            services,
            identity,
            logs,
        })
    }

    /// The store behind `sip.kv`, to pre-fill or read.
    pub fn kv(&self) -> &KvStore {
        &self.services.kv
    }

    /// The metric samples (`name{labels}`, value) the script's `sip.metrics` made.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        self.services
            .metrics
            .render()
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    /// Runs `on_request` on `message`; when it relays and `feed` is not empty, the branches
    /// get `feed`'s outcomes in order, running `on_branch`, `on_reply` and `on_failure` as the
    /// server would.
    pub fn run(
        &mut self,
        message: &[u8],
        options: &TestOptions,
        feed: &[Feed],
    ) -> Result<Outcome, ScriptError> {
        let mut request = parse_message(message)?;
        let local: std::net::SocketAddr =
            LOCAL.parse().map_err(|_| ScriptError("bad local".into()))?;
        let meta = Meta {
            kind: options.source.kind,
            source: options.source.addr,
            local,
            conn: None,
            worker: 0,
        };
        // As the server core does (`src/server/core.rs`): forced on datagrams only.
        let force_rport = options.force_rport && meta.kind == TransportKind::Udp;
        request
            .stamp_received_rport(meta.source, force_rport)
            .map_err(|e| ScriptError(format!("the message's Via: {e}")))?;
        let had_route = request.routes().next().is_some();
        let me =
            ProxyIdentity::new(self.identity.clone()).with_signer(RouteSigner::new(OFFLINE_KEY));
        let done = preprocess_routes(&mut request, &me)
            .map_err(|e| ScriptError(format!("the message's Route: {e}")))?;
        let signature = me.check_route(
            &request,
            &done,
            options.clock.unwrap_or_else(SystemTime::now),
        );
        // The clock of this run: a session's runs may each pretend another time.
        self.engine.lua().set_app_data(Env {
            services: Arc::new(self.services.share(options.clock)),
            identity: self.identity.clone(),
            log: LogSink::Capture(self.logs.clone()),
        });
        self.logs.borrow_mut().clear();
        let engine = &self.engine;
        let before = request.clone();
        let info = RouteInfo {
            had_route,
            consumed_own_route: done.consumed_own_route,
            own_route_signed: signature.routes(request.method()),
            signature,
            tracked_call: signature.routes(request.method()) && me.signed_for_tracked_call(&done),
            // A test run has no cluster: the script routes the request.
            owner_flow: None,
        };
        let vars = engine
            .lua()
            .create_table()
            .map_err(|e| ScriptError(e.to_string()))?;
        let mut run = run_request_hook(engine, request, &meta, info, vars.clone())?;
        let mut resolves = 0;
        let (mut state, result) = loop {
            match run {
                RequestRun::Done(state, result) => break (state, result),
                RequestRun::Suspended {
                    query,
                    thread,
                    request,
                } => {
                    resolves += 1;
                    let answer = if resolves > MAX_RESOLVES_PER_REQUEST {
                        Err(ResolveError::Failed("too many sip.resolve calls".into()))
                    } else {
                        resolve_offline(&query)
                    };
                    run = resume_request_hook(engine, thread, request, &answer)?;
                }
            }
        };
        let (mut outcome, decision) = describe_state(&before, &mut state, &vars);
        if let Err(e) = result {
            outcome.decision = "reply";
            outcome.primitive = None;
            outcome.code = Some(500);
            outcome.reason = Some("Server Internal Error".into());
            outcome.error = Some(e.0);
        } else if let (Decision::Relay { targets, .. }, false) = (decision, feed.is_empty()) {
            let targets = if targets.is_empty() {
                let uri = state.msg.request_uri_bytes().unwrap_or_default();
                vec![Target::new(Bytes::copy_from_slice(uri), 1000)]
            } else {
                targets
            };
            self.drive_branches(&state.msg, targets, &vars, feed, &mut outcome)?;
        }
        outcome.vars = table_entries(&vars);
        outcome.logs = self.logs.borrow().clone();
        outcome.metrics = self.metrics();
        Ok(outcome)
    }

    /// The branches of a relayed request, group by group (§16.6, highest q first), each fed
    /// the next entry of `feed`; when every branch failed, `on_failure` with the best
    /// response, and its new targets fed the same way.
    fn drive_branches(
        &self,
        request: &Message,
        mut targets: Vec<Target>,
        vars: &Table,
        feed: &[Feed],
        outcome: &mut Outcome,
    ) -> Result<(), ScriptError> {
        let hooks = self.engine.hooks();
        let mut feed = feed.iter();
        let mut request = request.clone();
        // How each branch ended, every round: `res.branches` in on_failure, as the server's.
        let mut ended: Vec<ProxyOutcome> = Vec::new();
        // Failure routes may relay again: bounded as the server bounds serial forking.
        for _round in 0..MAX_FAILURE_ROUNDS {
            let mut finals = Vec::new();
            targets.sort_by_key(|t| std::cmp::Reverse(t.q));
            for group in targets.chunk_by(|a, b| a.q == b.q) {
                for target in group {
                    let mut branch = request.clone();
                    branch.set_request_uri(&target.uri).map_err(|e| {
                        ScriptError(format!("branch to {}: {e}", lossy(&target.uri)))
                    })?;
                    let mut dropped = false;
                    if let Some(hook) = &hooks.on_branch {
                        let [_, b] = self.call_hook(
                            hook,
                            vars,
                            [
                                (request.clone(), Role::View),
                                (branch.clone(), Role::Branch),
                            ],
                            outcome,
                        )?;
                        dropped = b.dropped;
                        if b.edited {
                            branch = b.msg;
                        }
                    }
                    let ruri = lossy(branch.request_uri_bytes().unwrap_or_default());
                    let target_text = lossy(&target.uri);
                    if dropped {
                        outcome.branches.push(BranchOutcome {
                            target: target_text,
                            code: 0,
                            timeout: false,
                            dropped,
                            ruri,
                        });
                        continue;
                    }
                    let entry = feed.next().ok_or_else(|| {
                        ScriptError(format!(
                            "responses: no outcome given for branch {} ({target_text})",
                            outcome.branches.len() + 1
                        ))
                    })?;
                    let (codes, timeout) = match entry {
                        Feed::Responses(codes) => (codes.as_slice(), false),
                        Feed::Timeout(codes) => (codes.as_slice(), true),
                    };
                    for &code in codes {
                        let response = synthetic_response(&branch, code)?;
                        if let Some(hook) = &hooks.on_reply {
                            self.call_hook(
                                hook,
                                vars,
                                [(request.clone(), Role::View), (response, Role::Response)],
                                outcome,
                            )?;
                        }
                        outcome.replies.push(code);
                    }
                    let code = match (timeout, codes.last()) {
                        (true, _) => 408,
                        (false, Some(&code)) if code >= 200 => code,
                        _ => {
                            return Err(ScriptError(format!(
                                "responses: branch {} ({target_text}) has no final response (end it with a code >= 200, or use \"timeout\")",
                                outcome.branches.len() + 1
                            )))
                        }
                    };
                    finals.push(code);
                    let proxy_outcome = ProxyOutcome {
                        uri: target.uri.clone(),
                        code,
                        reason: super::api::default_reason(code).to_owned(),
                        timeout,
                        local: timeout,
                    };
                    if let (Some(hook), true) = (&hooks.on_branch_failure, code >= 300) {
                        let response = synthetic_response(&branch, code)?;
                        let pair = [(request.clone(), Role::View), (response, Role::Response)];
                        let this = proxy_outcome.clone();
                        self.call_hook_with(hook, vars, pair, outcome, |res| {
                            res.branch = Some(this)
                        })?;
                    }
                    ended.push(proxy_outcome);
                    outcome.branches.push(BranchOutcome {
                        target: target_text,
                        code,
                        timeout,
                        dropped,
                        ruri,
                    });
                }
                if finals.iter().any(|c| (200..300).contains(c)) {
                    break;
                }
            }
            if let Some(&ok) = finals.iter().find(|c| (200..300).contains(*c)) {
                outcome.final_code = Some(ok);
                return Ok(());
            }
            let best = finals
                .iter()
                .copied()
                .min_by_key(|&code| crate::proxy::response_context::rank(code))
                .unwrap_or(408);
            outcome.final_code = Some(best);
            let Some(hook) = &hooks.on_failure else {
                return Ok(());
            };
            let response = synthetic_response(&request, best)?;
            let pair = [(request.clone(), Role::Failure), (response, Role::Response)];
            let mut failure = FailureOutcome {
                code: best,
                targets: Vec::new(),
                reply: None,
                error: None,
            };
            let branches = ended.clone();
            let result = self.call_hook_with(hook, vars, pair, outcome, |res| {
                res.branches = Some(branches)
            });
            let next = match result {
                Ok([mut req, _]) => match req.decision.take() {
                    Some((Decision::Relay { targets, .. }, _)) if !targets.is_empty() => {
                        // The new branches copy the request as on_failure left it.
                        request = req.msg;
                        Some(targets)
                    }
                    // Its own failure goes upstream instead of the best (the method refuses
                    // a 2xx here).
                    Some((Decision::Reply { code, .. }, _)) => {
                        failure.reply = Some(code);
                        outcome.final_code = Some(code);
                        None
                    }
                    _ => None,
                },
                Err(e) => {
                    failure.error = Some(e.0);
                    None
                }
            };
            failure.targets = next.iter().flatten().map(|t| lossy(&t.uri)).collect();
            outcome.failures.push(failure);
            match next {
                Some(next) => targets = next,
                None => return Ok(()),
            }
        }
        Err(ScriptError(format!(
            "on_failure relayed {MAX_FAILURE_ROUNDS} times in a row: stopped"
        )))
    }

    /// Calls `hook` with two message objects; a Lua error fails the run unless it is
    /// `on_failure`'s (then the engine sends the best response, and the outcome says why).
    fn call_hook(
        &self,
        hook: &mlua::Function,
        vars: &Table,
        pair: [(Message, Role); 2],
        outcome: &mut Outcome,
    ) -> Result<[ScriptMsg; 2], ScriptError> {
        self.call_hook_with(hook, vars, pair, outcome, |_| {})
    }

    /// [`Self::call_hook`], with `prepare` run on the second object (`res.branches`,
    /// `res.branch`) before the call.
    fn call_hook_with(
        &self,
        hook: &mlua::Function,
        vars: &Table,
        pair: [(Message, Role); 2],
        outcome: &mut Outcome,
        prepare: impl FnOnce(&mut ScriptMsg),
    ) -> Result<[ScriptMsg; 2], ScriptError> {
        let lua = self.engine.lua();
        let failure = pair[0].1 == Role::Failure;
        let [(msg_a, role_a), (msg_b, role_b)] = pair;
        let mut states = [ScriptMsg::new(msg_a, role_a), ScriptMsg::new(msg_b, role_b)];
        prepare(&mut states[1]);
        let [a, b] = states.map(|mut state| {
            state.vars = Some(vars.clone());
            lua.create_userdata(state)
        });
        let (a, b) = (
            a.map_err(|e| ScriptError(e.to_string()))?,
            b.map_err(|e| ScriptError(e.to_string()))?,
        );
        if let Err(e) = self.engine.call(hook, (a.clone(), b.clone())) {
            if !failure {
                // The server logs it and applies its default; a test wants to see it.
                outcome.hook_errors.push(e.0.clone());
            }
            return Err(e);
        }
        let take = |ud: mlua::AnyUserData| {
            ud.take::<ScriptMsg>()
                .map_err(|e| ScriptError(e.to_string()))
        };
        Ok([take(a)?, take(b)?])
    }
}

/// How many times in a row `on_failure` may relay again within one offline run.
const MAX_FAILURE_ROUNDS: usize = 16;

/// A response to `request` with `code`, as a UAS would send it (a To tag on all but 100).
fn synthetic_response(request: &Message, code: u16) -> Result<Message, ScriptError> {
    let reason = super::api::default_reason(code);
    let builder = crate::sip::ResponseBuilder::new(request, code, reason);
    let builder = if code > 100 {
        builder.to_tag(b"offline")
    } else {
        builder
    };
    Message::parse(builder.build())
        .map_err(|e| ScriptError(format!("a {code} response to the request: {e}")))
}

fn parse_message(text: &[u8]) -> Result<Message, ScriptError> {
    let mut text = text.to_vec();
    // Files written by hand often end without the empty line that closes the header block.
    if !text.windows(2).any(|w| w == b"\n\n") && !text.windows(4).any(|w| w == b"\r\n\r\n") {
        while text.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            text.pop();
        }
        text.extend_from_slice(b"\r\n\r\n");
    }
    let message = Message::parse(Bytes::from(text))
        .map_err(|e| ScriptError(format!("the message does not parse: {e}")))?;
    if !message.is_request() {
        return Err(ScriptError(
            "the message is a response; on_request needs a request".into(),
        ));
    }
    message
        .validate()
        .map_err(|e| ScriptError(format!("the message is invalid: {e}")))?;
    Ok(message)
}

fn services(
    fixtures: &Fixtures<'_>,
    clock: Option<SystemTime>,
    identity: &LocalIdentity,
) -> Result<Services, ScriptError> {
    let now = clock.unwrap_or_else(SystemTime::now);
    let aors = AorRule::new(identity.clone());
    let store = match fixtures.location {
        Some(text) => MemoryLocation::from_fixture(text, now, &aors)
            .map_err(|e| ScriptError(format!("location fixture: {e}")))?,
        None => MemoryLocation::new(100_000),
    };
    Ok(Services {
        kv: Arc::new(KvStore::new(KV_MAX_KEYS)),
        cluster: None,
        registrar: Some(Arc::new(
            Registrar::new(
                Arc::new(store),
                Rules::from(&crate::config::Registrar::default()),
            )
            .with_aor_rule(aors),
        )),
        auth: fixtures.subscribers.map(authenticator).transpose()?,
        pike: Arc::new(crate::flood::Pike::default()),
        metrics: crate::metrics::Registry::new(),
        dispatcher: Arc::new(crate::dispatcher::Dispatcher::empty()),
        flows: Arc::default(),
        clock,
    })
}

impl Services {
    /// The same stores and tables, with another clock (one run of a session).
    fn share(&self, clock: Option<SystemTime>) -> Services {
        Services {
            kv: self.kv.clone(),
            registrar: self.registrar.clone(),
            cluster: self.cluster.clone(),
            auth: self.auth.clone(),
            pike: self.pike.clone(),
            metrics: self.metrics.clone(),
            dispatcher: self.dispatcher.clone(),
            flows: self.flows.clone(),
            clock,
        }
    }
}

/// The authenticator of a run with a subscriber fixture: the server's defaults (`[auth]`:
/// SHA-256 and MD5, 300 s nonces) with [`OFFLINE_AUTH_SECRET`]. A fresh replay table per run,
/// as each run is a fresh server.
fn authenticator(fixture: &str) -> Result<Arc<Authenticator>, ScriptError> {
    let subscribers = Subscribers::from_fixture(fixture)
        .map_err(|e| ScriptError(format!("subscriber fixture: {e}")))?;
    let settings = crate::config::Auth::default().settings(OFFLINE_AUTH_SECRET.to_vec());
    Ok(Arc::new(Authenticator::new(
        &settings,
        Arc::new(subscribers),
    )))
}

/// The outcome of `on_request` as the script left `state`, and its decision (the engine's
/// default when it made none); `state.msg` is the request as it would be relayed.
fn describe_state(before: &Message, state: &mut ScriptMsg, vars: &Table) -> (Outcome, Decision) {
    let primitive = state.decision.as_ref().map(|(_, p)| *p);
    let decision = match state.decision.take() {
        Some((d, _)) => d,
        None => undecided(&state.msg.method().cloned(), &state.msg),
    };
    // As the server does: a pre-loaded Route the script did not choose to follow is removed.
    guard_preloaded_route(state, &decision);
    let after = &state.msg;
    let (added, removed) = header_changes(before, after);
    let mut outcome = Outcome {
        request_line: String::from_utf8_lossy(before.start_line()).into_owned(),
        decision: "",
        primitive,
        code: None,
        reason: None,
        reply_headers: Vec::new(),
        targets: Vec::new(),
        record_route: state.record_route,
        ruri_before: lossy(before.request_uri_bytes().unwrap_or_default()),
        ruri_after: lossy(after.request_uri_bytes().unwrap_or_default()),
        headers_added: added,
        headers_removed: removed,
        vars: table_entries(vars),
        logs: Vec::new(),
        error: None,
        metrics: Vec::new(),
        branches: Vec::new(),
        replies: Vec::new(),
        failures: Vec::new(),
        final_code: None,
        hook_errors: Vec::new(),
    };
    let as_targets = |targets: &[crate::proxy::response_context::Target]| {
        targets.iter().map(|t| (lossy(&t.uri), t.q)).collect()
    };
    match &decision {
        Decision::Reply {
            code,
            reason,
            headers,
            ..
        } => {
            outcome.decision = "reply";
            outcome.code = Some(*code);
            outcome.reason = Some(reason.to_string());
            outcome.reply_headers = headers.clone();
            outcome.targets = as_targets(&state.targets);
        }
        Decision::Relay {
            targets,
            record_route,
            ..
        } => {
            outcome.decision = "relay";
            outcome.record_route = *record_route;
            outcome.targets = if targets.is_empty() {
                vec![(outcome.ruri_after.clone(), 1000)]
            } else {
                as_targets(targets)
            };
        }
        Decision::Forward {
            target,
            record_route,
        } => {
            outcome.decision = "forward";
            outcome.record_route = *record_route;
            outcome.targets = vec![(
                target
                    .as_ref()
                    .map_or_else(|| outcome.ruri_after.clone(), |t| lossy(t)),
                1000,
            )];
        }
        Decision::Drop { reason } => {
            outcome.decision = "drop";
            outcome.reason = reason.as_ref().map(|r| r.to_string());
        }
        // Offline runs answer sip.resolve themselves, so the hook never ends suspended.
        Decision::Resolve { .. } => outcome.decision = "resolve",
    }
    (outcome, decision)
}

/// `sip.resolve` in an offline run: IP literals and `localhost` are answered at once; a host
/// name is looked up with the system's resolver configuration.
fn resolve_offline(query: &Query) -> Result<Vec<Candidate>, ResolveError> {
    if let Some(answer) = crate::dns::numeric(query) {
        return answer;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ResolveError::Failed(e.to_string()))?;
    let transports = [TransportKind::Udp, TransportKind::Tcp, TransportKind::Tls];
    runtime.block_on(async {
        let resolver = Resolver::from_config(&crate::config::Dns::default())?;
        resolver.locate(query, &transports).await
    })
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Headers present after but not before (added), and before but not after (removed), as
/// `Name: value` lines; a header changed in place shows in both.
fn header_changes(before: &Message, after: &Message) -> (Vec<String>, Vec<String>) {
    let lines = |m: &Message| -> Vec<String> {
        m.headers()
            .map(|h| format!("{}: {}", lossy(h.raw_name), lossy(h.value)))
            .collect()
    };
    let (old, new) = (lines(before), lines(after));
    let mut removed = old.clone();
    let mut added = Vec::new();
    for line in new {
        match removed.iter().position(|l| *l == line) {
            Some(i) => {
                removed.remove(i);
            }
            None => added.push(line),
        }
    }
    (added, removed)
}

fn table_entries(table: &Table) -> Vec<(String, VarValue)> {
    let mut entries: Vec<(String, VarValue)> = table
        .pairs::<Value, Value>()
        .filter_map(Result::ok)
        .map(|(k, v)| {
            let key = k.to_string().unwrap_or_else(|_| "?".into());
            let value = match v {
                Value::String(s) => VarValue::Str(s.to_string_lossy()),
                Value::Integer(i) => VarValue::Int(i),
                Value::Number(n) => VarValue::Num(n),
                Value::Boolean(b) => VarValue::Bool(b),
                other => VarValue::Other(other.to_string().unwrap_or_else(|_| "?".into())),
            };
            (key, value)
        })
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries
}

fn format_outcome(script: &str, o: &Outcome) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "script:    {script}");
    let _ = writeln!(s, "request:   {}", o.request_line);
    if let Some(error) = &o.error {
        let _ = writeln!(s, "error:     {error}");
    }
    let by = match &o.error {
        Some(_) => " (the hook failed)".to_string(),
        None => o
            .primitive
            .map(|p| format!(" (req:{p})"))
            .unwrap_or_else(|| " (no decision: engine default)".into()),
    };
    match o.decision {
        "reply" => {
            let _ = writeln!(
                s,
                "decision:  reply {} {}{by}",
                o.code.unwrap_or_default(),
                o.reason.as_deref().unwrap_or_default()
            );
            for (name, value) in &o.reply_headers {
                let _ = writeln!(s, "  header:  {name}: {value}");
            }
        }
        "drop" if o.reason.is_some() => {
            let reason = o.reason.as_deref().unwrap_or_default();
            let _ = writeln!(s, "decision:  drop ({reason}){by}");
        }
        other => {
            let _ = writeln!(s, "decision:  {other}{by}");
        }
    }
    if o.decision != "drop" && o.decision != "reply" {
        let _ = writeln!(
            s,
            "record-route: {}",
            if o.record_route { "yes" } else { "no" }
        );
    }
    if !o.targets.is_empty() {
        let _ = writeln!(s, "targets:");
        for (uri, q) in &o.targets {
            let _ = writeln!(s, "  {uri} (q={})", f64::from(*q) / 1000.0);
        }
    }
    if o.ruri_before != o.ruri_after {
        let _ = writeln!(s, "request-uri: {} -> {}", o.ruri_before, o.ruri_after);
    }
    for line in &o.headers_added {
        let _ = writeln!(s, "+ {line}");
    }
    for line in &o.headers_removed {
        let _ = writeln!(s, "- {line}");
    }
    if !o.vars.is_empty() {
        let _ = writeln!(s, "vars:");
        for (key, value) in &o.vars {
            let shown = match value {
                VarValue::Str(v) => format!("{v:?}"),
                VarValue::Int(v) => v.to_string(),
                VarValue::Num(v) => v.to_string(),
                VarValue::Bool(v) => v.to_string(),
                VarValue::Other(v) => v.clone(),
            };
            let _ = writeln!(s, "  {key} = {shown}");
        }
    }
    if !o.logs.is_empty() {
        let _ = writeln!(s, "logs:");
        for line in &o.logs {
            let _ = writeln!(s, "  {line}");
        }
    }
    s
}

// ----- Lua test files --------------------------------------------------------------------

/// `moonroute test --lua FILE`: runs a Lua test file in which `moonroute.run{script=...,
/// message=..., location=..., subscribers=..., time=..., source=..., domains={...}}` returns
/// the outcome as a table, and `moonroute.digest{...}` answers a challenge.
/// The file fails on the first Lua error (e.g. a failed `assert`), reported with file:line.
pub fn run_lua_tests(path: &Path) -> Result<String, ScriptError> {
    let test = read_source(path, 1)?;
    let lua = Lua::new();
    let runs = Rc::new(std::cell::Cell::new(0u32));
    let counter = runs.clone();
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let run = lua
        .create_function(move |lua, spec: Table| {
            counter.set(counter.get() + 1);
            lua_run(lua, &base, &spec)
        })
        .map_err(|e| ScriptError(e.to_string()))?;
    let session_runs = runs.clone();
    let session_base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let session = lua
        .create_function(move |_, spec: Table| {
            check_keys(&spec, &[SESSION_KEYS], "moonroute.session")?;
            let (session, clock) = open_session(&session_base, &spec, "moonroute.session")?;
            Ok(LuaSession {
                session,
                clock,
                runs: session_runs.clone(),
            })
        })
        .map_err(|e| ScriptError(e.to_string()))?;
    let route_signature = lua
        .create_function(|_, spec: Value| lua_route_signature(spec))
        .map_err(|e| ScriptError(e.to_string()))?;
    let moonroute = lua.create_table().map_err(|e| ScriptError(e.to_string()))?;
    moonroute
        .set("run", run)
        .map_err(|e| ScriptError(e.to_string()))?;
    moonroute
        .set("session", session)
        .map_err(|e| ScriptError(e.to_string()))?;
    moonroute
        .set("route_signature", route_signature)
        .map_err(|e| ScriptError(e.to_string()))?;
    let digest = lua
        .create_function(|_, spec: Table| lua_digest(&spec))
        .map_err(|e| ScriptError(e.to_string()))?;
    moonroute
        .set("digest", digest)
        .map_err(|e| ScriptError(e.to_string()))?;
    lua.globals()
        .set("moonroute", moonroute)
        .map_err(|e| ScriptError(e.to_string()))?;
    lua.load(test.text.as_str())
        .set_name(format!("@{}", test.name))
        .exec()
        .map_err(|e| super::engine::describe(&e, &test.name))?;
    Ok(format!("{}: ok ({} runs)\n", test.name, runs.get()))
}

/// The keys `moonroute.session{...}` takes (what lives as long as the engine state).
const SESSION_KEYS: &[&str] = &["script", "location", "subscribers", "domains", "kv", "time"];
/// The keys of one run (`session:run{...}`).
const RUN_KEYS: &[&str] = &["message", "time", "source", "force_rport", "responses"];

/// Refuses a key of `spec` not in `allowed`: a misspelt key (`subscriber=`) would otherwise
/// quietly mean "not given".
fn check_keys(spec: &Table, allowed: &[&[&str]], what: &str) -> mlua::Result<()> {
    for pair in spec.pairs::<Value, Value>() {
        let (key, _) = pair?;
        let name = match &key {
            Value::String(s) => s.to_string_lossy(),
            other => {
                return Err(mlua::Error::runtime(format!(
                    "{what}: keys are names, not a {}",
                    other.type_name()
                )))
            }
        };
        let all = allowed.iter().flat_map(|list| list.iter().copied());
        if !all.clone().any(|k| k == name) {
            let hint = super::api::names::did_you_mean(&name, all.clone())
                .map(|s| format!(" (did you mean {s}?)"))
                .unwrap_or_default();
            let keys: Vec<&str> = all.collect();
            return Err(mlua::Error::runtime(format!(
                "{what}: unknown key {name:?}{hint}; the keys are {}",
                keys.join(", ")
            )));
        }
    }
    Ok(())
}

fn epoch_time(spec: &Table, what: &str) -> mlua::Result<Option<SystemTime>> {
    match spec.get::<Option<f64>>("time")? {
        Some(time) if time.is_finite() && time >= 0.0 => Ok(Some(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(time),
        )),
        Some(_) => Err(mlua::Error::runtime(format!(
            "{what}: time must be seconds since the epoch (os.time())"
        ))),
        None => Ok(None),
    }
}

/// A session of a Lua test file: the engine state and where its script was found.
struct LuaSession {
    session: Session,
    /// The session's clock unless a run gives its own `time`.
    clock: Option<SystemTime>,
    runs: Rc<std::cell::Cell<u32>>,
}

impl mlua::UserData for LuaSession {
    fn add_methods<M: mlua::UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method_mut("run", |lua, s, spec: Table| {
            check_keys(&spec, &[RUN_KEYS], "session:run")?;
            s.runs.set(s.runs.get() + 1);
            let clock = s.clock;
            session_run(lua, &mut s.session, clock, &spec, "session:run")
        });
        methods.add_method("kv", |lua, s, key: String| {
            kv_value(lua, s.session.kv().get(&key, std::time::Instant::now()))
        });
        methods.add_method("metrics", |lua, s, ()| {
            metrics_table(lua, &s.session.metrics())
        });
    }
}

fn kv_value(lua: &Lua, value: Option<crate::script::kv::KvValue>) -> mlua::Result<Value> {
    Ok(match value {
        Some(crate::script::kv::KvValue::Int(i)) => Value::Integer(i),
        Some(crate::script::kv::KvValue::Str(s)) => Value::String(lua.create_string(&s)?),
        None => Value::Nil,
    })
}

/// Starts a session from `spec`'s session keys (script, fixtures, domains, kv, time).
fn open_session(
    base: &Path,
    spec: &Table,
    what: &str,
) -> mlua::Result<(Session, Option<SystemTime>)> {
    let script: String = spec.get::<Option<String>>("script")?.ok_or_else(|| {
        mlua::Error::runtime(format!("{what}: `script` is required (the script's path)"))
    })?;
    let location: Option<String> = spec.get("location")?;
    let subscribers: Option<String> = spec.get("subscribers")?;
    let mut options = TestOptions {
        clock: epoch_time(spec, what)?,
        ..TestOptions::default()
    };
    if let Some(domains) = spec.get::<Option<Vec<String>>>("domains")? {
        options.domains = domains;
    }
    // Scripts are found relative to the working directory first, then to the test file.
    let script_path = {
        let direct = PathBuf::from(&script);
        if direct.exists() {
            direct
        } else {
            base.join(&script)
        }
    };
    let source = read_source(&script_path, 1).map_err(|e| mlua::Error::runtime(e.0))?;
    let fixtures = Fixtures {
        location: location.as_deref(),
        subscribers: subscribers.as_deref(),
    };
    let session = Session::new(&source, &fixtures, &options)
        .map_err(|e| mlua::Error::runtime(format!("{what}: {e}")))?;
    if let Some(kv) = spec.get::<Option<Table>>("kv")? {
        prefill(session.kv(), &kv, what)?;
    }
    Ok((session, options.clock))
}

/// `kv = {key = value, ...}`: integers and strings, no expiry.
fn prefill(store: &KvStore, kv: &Table, what: &str) -> mlua::Result<()> {
    for pair in kv.pairs::<String, Value>() {
        let (key, value) = pair?;
        let value = match value {
            Value::Integer(i) => crate::script::kv::KvValue::Int(i),
            Value::Number(n) if n.fract() == 0.0 => crate::script::kv::KvValue::Int(n as i64),
            Value::String(s) => crate::script::kv::KvValue::Str(s.to_str()?.to_owned()),
            other => {
                return Err(mlua::Error::runtime(format!(
                    "{what}: kv.{key}: values are integers or strings, not {}",
                    other.type_name()
                )))
            }
        };
        store
            .set(&key, value, None, std::time::Instant::now())
            .map_err(|e| mlua::Error::runtime(format!("{what}: kv.{key}: {e}")))?;
    }
    Ok(())
}

/// `responses = {486, "timeout", {180, 486}, {183, "timeout"}}`: one entry per branch.
fn feed_from(spec: &Table, what: &str) -> mlua::Result<Vec<Feed>> {
    let Some(list) = spec.get::<Option<Table>>("responses")? else {
        return Ok(Vec::new());
    };
    let bad = |entry: &str| {
        mlua::Error::runtime(format!(
            "{what}: responses: {entry} is not a branch outcome (a code 100-699, \"timeout\", or a list of them ending with a final code or \"timeout\")"
        ))
    };
    let code = |value: &Value| -> Option<u16> {
        value
            .as_integer()
            .or_else(|| {
                value
                    .as_number()
                    .filter(|n| n.fract() == 0.0)
                    .map(|n| n as i64)
            })
            .and_then(|c| u16::try_from(c).ok())
            .filter(|c| (100..700).contains(c))
    };
    let is_timeout = |value: &Value| value.as_string().is_some_and(|s| s == "timeout");
    let mut feed = Vec::new();
    for entry in list.sequence_values::<Value>() {
        let entry = entry?;
        let shown = format!("{entry:?}");
        let steps: Vec<Value> = match &entry {
            Value::Table(steps) => steps
                .sequence_values::<Value>()
                .collect::<mlua::Result<_>>()?,
            other => vec![other.clone()],
        };
        let mut codes = Vec::new();
        let mut timeout = false;
        for (i, step) in steps.iter().enumerate() {
            if is_timeout(step) && i + 1 == steps.len() {
                timeout = true;
            } else {
                codes.push(code(step).ok_or_else(|| bad(&shown))?);
            }
        }
        if steps.is_empty() {
            return Err(bad(&shown));
        }
        feed.push(if timeout {
            Feed::Timeout(codes)
        } else {
            Feed::Responses(codes)
        });
    }
    Ok(feed)
}

fn session_run(
    lua: &Lua,
    session: &mut Session,
    clock: Option<SystemTime>,
    spec: &Table,
    what: &str,
) -> mlua::Result<Table> {
    let message: String = spec.get::<Option<String>>("message")?.ok_or_else(|| {
        mlua::Error::runtime(format!(
            "{what}: `message` is required (the request's text)"
        ))
    })?;
    let mut options = TestOptions {
        clock: epoch_time(spec, what)?.or(clock),
        ..TestOptions::default()
    };
    if let Some(source) = spec.get::<Option<String>>("source")? {
        options.source = source
            .parse()
            .map_err(|e| mlua::Error::runtime(format!("{what}: source: {e}")))?;
    }
    if let Some(force_rport) = spec.get::<Option<bool>>("force_rport")? {
        options.force_rport = force_rport;
    }
    let feed = feed_from(spec, what)?;
    let message = message.replace("\r\n", "\n").replace('\n', "\r\n");
    let outcome = session
        .run(message.trim_start().as_bytes(), &options, &feed)
        .map_err(|e| mlua::Error::runtime(format!("{what}: {e}")))?;
    outcome_table(lua, &outcome)
}

fn lua_run(lua: &Lua, base: &Path, spec: &Table) -> mlua::Result<Table> {
    check_keys(spec, &[SESSION_KEYS, RUN_KEYS], "moonroute.run")?;
    let (mut session, clock) = open_session(base, spec, "moonroute.run")?;
    session_run(lua, &mut session, clock, spec, "moonroute.run")
}

fn metrics_table(lua: &Lua, samples: &[(String, f64)]) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for (name, value) in samples {
        t.set(name.as_str(), *value)?;
    }
    Ok(t)
}

/// `moonroute.route_signature{call_id=..., from_tag=..., to_tag=..., ruri=..., routes={...},
/// expires=...}`: the `mrs` value offline runs accept in a Route of ours on an in-dialog request
/// with that Call-ID, From tag, To tag, Request-URI (its host and port count) and Route entries
/// after ours (`routes`, default none), until `expires` (seconds since the epoch; default a
/// lifetime from now). It is the copy a caller holds (`route_sign`); it works in either
/// direction, as it binds the tags as the request carries them.
fn lua_route_signature(spec: Value) -> mlua::Result<String> {
    let Value::Table(spec) = spec else {
        return Err(mlua::Error::runtime(
            "moonroute.route_signature: give a table {call_id=..., from_tag=..., to_tag=..., \
             ruri=..., routes={...}}: the signature binds the dialog's tags, the Request-URI's \
             host and port and the Route after ours",
        ));
    };
    let text = |name: &str| -> mlua::Result<String> {
        spec.get::<Option<String>>(name)?.ok_or_else(|| {
            mlua::Error::runtime(format!("moonroute.route_signature: `{name}` is missing"))
        })
    };
    let (call_id, from_tag, to_tag, ruri) = (
        text("call_id")?,
        text("from_tag")?,
        text("to_tag")?,
        text("ruri")?,
    );
    let routes: Vec<String> = spec
        .get::<Option<Vec<String>>>("routes")?
        .unwrap_or_default();
    let target = Uri::parse(ruri.as_bytes())
        .map_err(|e| mlua::Error::runtime(format!("moonroute.route_signature: ruri: {e}")))?;
    let signer = RouteSigner::new(OFFLINE_KEY);
    let expires = match spec.get::<Option<f64>>("expires")? {
        Some(at) if at.is_finite() && at >= 0.0 => at as u64,
        Some(_) => {
            return Err(mlua::Error::runtime(
                "moonroute.route_signature: expires must be seconds since the epoch",
            ))
        }
        None => signer.expiry(SystemTime::now()),
    };
    let binding = Binding {
        holder: Holder::Caller,
        tracked: spec.get::<Option<bool>>("tracked")?.unwrap_or(false),
        call_id: call_id.as_bytes(),
        caller_tag: from_tag.as_bytes(),
        callee_tag: to_tag.as_bytes(),
        target: Some(target),
    };
    let rest: Vec<&[u8]> = routes
        .iter()
        .map(|route| route_uri_text(route.as_bytes()))
        .collect();
    Ok(signer.sign(&binding, rest, expires))
}

/// The URI of a Route value written as `<uri>` (or a bare URI).
fn route_uri_text(value: &[u8]) -> &[u8] {
    let value = value.trim_ascii();
    value
        .strip_prefix(b"<")
        .and_then(|rest| rest.split(|&b| b == b'>').next())
        .unwrap_or(value)
}

/// `moonroute.digest{challenge=..., user=..., password=..., method=..., uri=..., nc=1,
/// cnonce=...}`: the credentials value a UA would send (`crate::auth::digest::answer`).
/// `challenge` is a challenge value, or a `reply_headers` entry (`"WWW-Authenticate: Digest
/// ..."`).
fn lua_digest(spec: &Table) -> mlua::Result<String> {
    let field = |name: &str| -> mlua::Result<String> {
        spec.get::<Option<String>>(name)?
            .ok_or_else(|| mlua::Error::runtime(format!("moonroute.digest: {name} is required")))
    };
    let challenge = field("challenge")?;
    let challenge = match challenge.split_once(':') {
        Some((name, value))
            if name.trim().eq_ignore_ascii_case("WWW-Authenticate")
                || name.trim().eq_ignore_ascii_case("Proxy-Authenticate") =>
        {
            value.trim()
        }
        _ => challenge.trim(),
    };
    let (user, password, method, uri) = (
        field("user")?,
        field("password")?,
        field("method")?,
        field("uri")?,
    );
    let nc = spec.get::<Option<u32>>("nc")?.unwrap_or(1);
    let cnonce = spec
        .get::<Option<String>>("cnonce")?
        .unwrap_or_else(|| "moonroute-test".to_owned());
    let answer = crate::auth::digest::Answer {
        username: &user,
        password: &password,
        method: &method,
        uri: &uri,
        nc,
        cnonce: &cnonce,
    };
    crate::auth::digest::answer(challenge.as_bytes(), &answer)
        .map_err(|e| mlua::Error::runtime(format!("moonroute.digest: {e}")))
}

fn outcome_table(lua: &Lua, o: &Outcome) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("decision", o.decision)?;
    t.set("primitive", o.primitive)?;
    t.set("code", o.code)?;
    t.set("reason", o.reason.clone())?;
    t.set("error", o.error.clone())?;
    t.set("record_route", o.record_route)?;
    t.set("ruri", o.ruri_after.clone())?;
    let headers = lua.create_table()?;
    for (name, value) in &o.reply_headers {
        headers.push(format!("{name}: {value}"))?;
    }
    t.set("reply_headers", headers)?;
    t.set(
        "targets",
        lua.create_sequence_from(o.targets.iter().map(|(uri, _)| uri.clone()))?,
    )?;
    t.set(
        "headers_added",
        lua.create_sequence_from(o.headers_added.clone())?,
    )?;
    t.set(
        "headers_removed",
        lua.create_sequence_from(o.headers_removed.clone())?,
    )?;
    t.set("logs", lua.create_sequence_from(o.logs.clone())?)?;
    let vars = lua.create_table()?;
    for (key, value) in &o.vars {
        match value {
            VarValue::Str(v) => vars.set(key.as_str(), v.as_str())?,
            VarValue::Int(v) => vars.set(key.as_str(), *v)?,
            VarValue::Num(v) => vars.set(key.as_str(), *v)?,
            VarValue::Bool(v) => vars.set(key.as_str(), *v)?,
            VarValue::Other(v) => vars.set(key.as_str(), v.as_str())?,
        }
    }
    t.set("vars", vars)?;
    t.set("metrics", metrics_table(lua, &o.metrics)?)?;
    let branches = lua.create_table()?;
    for b in &o.branches {
        let entry = lua.create_table()?;
        entry.set("target", b.target.as_str())?;
        entry.set("ruri", b.ruri.as_str())?;
        if b.dropped {
            entry.set("dropped", true)?;
        } else {
            entry.set("code", b.code)?;
            entry.set("timeout", b.timeout)?;
        }
        branches.push(entry)?;
    }
    t.set("branches", branches)?;
    t.set(
        "replies",
        lua.create_sequence_from(o.replies.iter().copied())?,
    )?;
    let failures = lua.create_table()?;
    for f in &o.failures {
        let entry = lua.create_table()?;
        entry.set("code", f.code)?;
        entry.set("targets", lua.create_sequence_from(f.targets.clone())?)?;
        entry.set("reply", f.reply)?;
        entry.set("error", f.error.clone())?;
        failures.push(entry)?;
    }
    t.set("failures", failures)?;
    t.set("final", o.final_code)?;
    t.set(
        "hook_errors",
        lua.create_sequence_from(o.hook_errors.clone())?,
    )?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &[u8] = b"INVITE sip:bob@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-unit-1\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@127.0.0.1:5060>;tag=a1\r\n\
To: <sip:bob@127.0.0.1:5060>\r\n\
Call-ID: unit-1@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\r\n";

    fn source(text: &str) -> ScriptSource {
        ScriptSource {
            name: "unit.lua".into(),
            text: text.into(),
            version: 1,
        }
    }

    fn run(text: &str) -> Outcome {
        run_once(&source(text), INVITE, None, &TestOptions::default()).unwrap()
    }

    #[test]
    fn udp_requests_get_rport_as_the_server_gives_it() {
        let script = source(
            "function on_request(req) req.vars.via = req:header('Via') return req:reply(404) end",
        );
        let mut options = TestOptions {
            source: "udp:127.0.0.1:40000".parse().unwrap(),
            ..TestOptions::default()
        };
        let via = |o: Outcome| match o.vars.into_iter().find(|(k, _)| k == "via") {
            Some((_, VarValue::Str(via))) => via,
            other => panic!("{other:?}"),
        };
        let forced = via(run_once(&script, INVITE, None, &options).unwrap());
        assert!(forced.ends_with(";rport=40000"), "{forced}");
        options.force_rport = false;
        let plain = via(run_once(&script, INVITE, None, &options).unwrap());
        assert!(!plain.contains("rport"), "{plain}");
        // Streams: never forced (their responses go back on the connection).
        options.force_rport = true;
        options.source = "tcp:127.0.0.1:40000".parse().unwrap();
        let stream = via(run_once(&script, INVITE, None, &options).unwrap());
        assert!(!stream.contains("rport"), "{stream}");
    }

    fn load_error(text: &str) -> String {
        let env = Env {
            identity: LocalIdentity::default(),
            services: Arc::new(Services::default()),
            log: LogSink::Capture(Rc::default()),
        };
        match Engine::load(&source(text), Limits::default(), env) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn load_errors_name_file_and_line() {
        assert_eq!(
            load_error("\n\nfunction on_request(req) return req:reply(404 end"),
            "unit.lua:3: ')' expected near 'end'"
        );
        assert!(load_error("x = 1").contains("on_request is not defined"));
        assert!(load_error("on_request = 5").contains("must be a function"));
        assert!(load_error("\nerror('top level fails')").starts_with("unit.lua:2: top level fails"));
        assert!(load_error("while true do end\nfunction on_request() end")
            .contains("instruction budget exceeded"));
    }

    #[test]
    fn runtime_errors_name_the_scripts_line() {
        let o = run("function on_request(req)\n  local x = nil\n  return x.y\nend");
        assert_eq!(o.code, Some(500));
        let error = o.error.unwrap();
        assert!(error.starts_with("unit.lua:3:"), "{error}");
        // Raised in Rust (a bad argument): the line comes from the traceback.
        let o = run("function on_request(req)\n\n  req:reply('nope')\nend");
        let error = o.error.unwrap();
        assert!(error.starts_with("unit.lua:3:"), "{error}");
        let o = run("function on_request(req)\n  req:append_header('Via', 'x')\nend");
        let error = o.error.unwrap();
        assert!(
            error.starts_with("unit.lua:2:") && error.contains("managed by the engine"),
            "{error}"
        );
    }

    /// `req:reply` takes final codes (200-699); 100 (the transaction layer's), provisionals
    /// and codes past 699 are script errors at the calling line: the request gets a 500.
    #[test]
    fn reply_takes_final_codes_only_and_names_the_line_of_a_bad_one() {
        for code in [200, 699] {
            let o = run(&format!(
                "function on_request(req)\n  return req:reply({code})\nend"
            ));
            assert_eq!((o.code, o.error), (Some(code), None), "{code}");
        }
        for (code, says) in [
            (100, "transaction layer"),
            (101, "provisional"),
            (199, "provisional"),
            (700, "not a final status code (200-699)"),
        ] {
            let o = run(&format!(
                "function on_request(req)\n\n  return req:reply({code}, 'x')\nend"
            ));
            assert_eq!(o.code, Some(500), "{code}");
            let error = o.error.unwrap();
            assert!(
                error.starts_with("unit.lua:3:") && error.contains(says),
                "{code}: {error}"
            );
        }
    }

    #[test]
    fn runaway_and_memory_hungry_hooks_are_stopped() {
        let o = run("function on_request(req) while true do end end");
        assert!(o.error.unwrap().contains("instruction budget exceeded"));
        let o = run("function on_request(req) local t = {} for i = 1, 1e9 do t[i] = i end end");
        let error = o.error.unwrap();
        assert!(
            error.contains("memory") || error.contains("budget"),
            "{error}"
        );
        let o = run("function f() return f() + 1 end function on_request(req) f() end");
        let error = o.error.unwrap();
        assert!(
            error.contains("stack overflow") || error.contains("budget"),
            "{error}"
        );
    }

    #[test]
    fn one_decision_per_call() {
        let o = run("function on_request(req) req:reply(404) req:t_relay() end");
        let error = o.error.unwrap();
        assert!(error.contains("already handled by req:reply"), "{error}");
    }

    #[test]
    fn decisions_and_edits_are_reported() {
        let o = run("function on_request(req)
               req.vars.who = req.from_uri
               req.ruri_user = 'robert'
               req:append_header('X-Test', 'yes')
               req:record_route()
               sip.log('info', 'routing', req.method)
               return req:fork({'sip:a@127.0.0.1:5080', 'sip:b@127.0.0.1:5081'}, {mode = 'serial'})
             end");
        assert_eq!(o.error, None);
        assert_eq!(o.decision, "relay");
        assert_eq!(o.primitive, Some("fork"));
        assert!(o.record_route);
        assert_eq!(
            o.targets,
            vec![
                ("sip:a@127.0.0.1:5080".to_string(), 1000),
                ("sip:b@127.0.0.1:5081".to_string(), 999)
            ]
        );
        assert_eq!(o.ruri_after, "sip:robert@127.0.0.1:5060");
        assert_eq!(o.headers_added, ["X-Test: yes"]);
        assert_eq!(
            o.vars,
            [(
                "who".to_string(),
                VarValue::Str("sip:alice@127.0.0.1:5060".into())
            )]
        );
        assert_eq!(o.logs, ["info unit.lua:6: routing INVITE"]);
    }

    /// [`INVITE`] with `route` as its Route header field.
    fn invite_with_route(route: &str) -> Vec<u8> {
        let text = String::from_utf8_lossy(INVITE).replacen(
            "Max-Forwards: 70\r\n",
            &format!("Max-Forwards: 70\r\nRoute: {route}\r\n"),
            1,
        );
        text.into_bytes()
    }

    #[test]
    fn a_preloaded_route_is_followed_only_when_the_script_says_so() {
        let options = TestOptions::default();
        let run_on = |script: &str, route: &str| {
            run_once(&source(script), &invite_with_route(route), None, &options).unwrap()
        };
        let foreign = "<sip:127.0.0.9:5099;transport=tcp;lr>";
        // Relayed without a word about it: the engine removes it.
        let o = run_on("function on_request(req) return req:t_relay() end", foreign);
        assert_eq!(o.decision, "relay");
        assert_eq!(o.headers_removed, [format!("Route: {foreign}")]);
        // Opted in: it stays, and follow_preloaded_route() says there was one.
        let o = run_on(
            "function on_request(req)
               req.vars.had = req:follow_preloaded_route()
               return req:t_relay()
             end",
            foreign,
        );
        assert!(o.headers_removed.is_empty(), "{:?}", o.headers_removed);
        assert_eq!(o.vars, [("had".to_string(), VarValue::Bool(true))]);
        // A Route the script adds below the sender's is the script's: only the sender's goes.
        let o = run_on(
            "function on_request(req)
               req:append_header('Route', '<sip:127.0.0.1:5090;lr>')
               return req:forward()
             end",
            foreign,
        );
        assert_eq!(o.decision, "forward");
        assert_eq!(o.headers_removed, [format!("Route: {foreign}")]);
        assert_eq!(o.headers_added, ["Route: <sip:127.0.0.1:5090;lr>"]);
        // Our own entry is consumed by §16.4 before the script runs: nothing is pre-loaded.
        let o = run_on(
            "function on_request(req)
               req.vars.had = req:follow_preloaded_route()
               return req:reply(404)
             end",
            &format!("<sip:{LOCAL};lr>"),
        );
        assert_eq!(o.vars, [("had".to_string(), VarValue::Bool(false))]);
    }

    #[test]
    fn a_drop_may_give_its_reason() {
        let o = run("function on_request(req) return req:drop('scanner user agent') end");
        assert_eq!(o.decision, "drop");
        assert_eq!(o.reason.as_deref(), Some("scanner user agent"));
        let o = run("function on_request(req) return req:drop('two\\r\\nlines') end");
        assert!(o.error.unwrap().contains("CR, LF or NUL"));
    }

    #[test]
    fn no_decision_is_a_500() {
        let o = run("function on_request(req) end");
        assert_eq!((o.decision, o.code), ("reply", Some(500)));
        assert_eq!(o.primitive, None);
    }

    #[test]
    fn kv_is_shared_and_counts() {
        let o = run("function on_request(req)
               sip.kv.set('greeting', 'hi', 10)
               req.vars.n = sip.kv.incr('calls') + sip.kv.incr('calls')
               req.vars.g = sip.kv.get('greeting')
               return req:drop()
             end");
        assert_eq!(o.error, None);
        assert_eq!(o.decision, "drop");
        assert!(o.vars.contains(&("n".to_string(), VarValue::Int(3))));
        assert!(o
            .vars
            .contains(&("g".to_string(), VarValue::Str("hi".into()))));
    }

    #[test]
    fn the_sandbox_has_no_io() {
        let o = run("function on_request(req) io.open('/etc/passwd') end");
        assert!(o.error.is_some());
        let o = run("function on_request(req) os.execute('true') end");
        assert!(o.error.is_some());
        let o = run("function on_request(req) req.vars.t = os.time() return req:drop() end");
        assert_eq!(o.error, None);
    }

    fn fed(text: &str, feed: &[Feed]) -> Outcome {
        let options = TestOptions::default();
        let mut session = Session::new(&source(text), &Fixtures::default(), &options).unwrap();
        session.run(INVITE, &options, feed).unwrap()
    }

    #[test]
    fn reading_an_unknown_field_is_an_error_at_the_line() {
        let o =
            run("function on_request(req)\n  local u = req.ruri_usr\n  return req:reply(404)\nend");
        let error = o.error.unwrap();
        assert!(error.starts_with("unit.lua:2:"), "{error}");
        assert!(error.contains("req.ruri_usr: no such field"), "{error}");
        assert!(error.contains("did you mean req.ruri_user?"), "{error}");
        let o = run("function on_request(req) return req:sl_send_reply(404) end");
        assert!(o
            .error
            .unwrap()
            .contains("req.sl_send_reply: no such field or method"));
    }

    #[test]
    fn from_and_to_parts() {
        let o = run("function on_request(req)
               req.vars.f = req.from_user .. '@' .. req.from_domain
               req.vars.t = req.to_user .. '@' .. req.to_domain
               return req:reply(404)
             end");
        assert_eq!(o.error, None);
        assert!(o
            .vars
            .contains(&("f".into(), VarValue::Str("alice@127.0.0.1".into()))));
        assert!(o
            .vars
            .contains(&("t".into(), VarValue::Str("bob@127.0.0.1".into()))));
    }

    #[test]
    fn regular_expressions() {
        let o = run(r#"function on_request(req)
               req.vars.m = sip.re.match("^[a-z]{3,7}$", req.from_user)
               req.vars.n = sip.re.match("^\\+?[0-9]{7,15}$", req.from_user)
               req.vars.none = sip.re.match("x", nil)
               local host, port = sip.re.find("^sip:[^@]+@([^:;]+):([0-9]+)", req.ruri)
               req.vars.hp = host .. "/" .. port
               req.vars.whole = sip.re.find("b.b", req.ruri)
               return req:reply(404)
             end"#);
        assert_eq!(o.error, None);
        let var = |k: &str| o.vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(var("m"), Some(VarValue::Bool(true)));
        assert_eq!(var("n"), Some(VarValue::Bool(false)));
        assert_eq!(var("none"), Some(VarValue::Bool(false)));
        assert_eq!(var("hp"), Some(VarValue::Str("127.0.0.1/5060".into())));
        assert_eq!(var("whole"), Some(VarValue::Str("bob".into())));
        let o = run("function on_request(req) return sip.re.match('(', 'x') end");
        assert!(o.error.unwrap().contains("sip.re.match: bad pattern"));
    }

    #[test]
    fn the_clock_is_the_runs() {
        // 2026-12-07 08:30 UTC, a Monday: 09:30 in Paris.
        let options = TestOptions {
            clock: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_632_200)),
            ..TestOptions::default()
        };
        let o = run_once(
            &source(
                r#"function on_request(req)
               req.vars.t = os.time()
               req.vars.now = sip.time.now()
               req.vars.d = os.date("!%Y-%m-%d %H:%M")
               req.vars.open = sip.time.match("Mon-Fri 09:00-18:00", "Europe/Paris")
               req.vars.london = sip.time.match("Mon-Fri 09:00-18:00", "Europe/London")
               req.vars.fixed = os.time({year = 2000, month = 1, day = 1, hour = 0})
               return req:reply(404)
             end"#,
            ),
            INVITE,
            None,
            &options,
        )
        .unwrap();
        assert_eq!(o.error, None);
        let var = |k: &str| o.vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(var("t"), Some(VarValue::Int(1_796_632_200)));
        assert_eq!(var("now"), Some(VarValue::Int(1_796_632_200)));
        assert_eq!(var("d"), Some(VarValue::Str("2026-12-07 08:30".into())));
        assert_eq!(var("open"), Some(VarValue::Bool(true)));
        assert_eq!(var("london"), Some(VarValue::Bool(false)));
        assert!(matches!(var("fixed"), Some(VarValue::Int(_))));
        let o = run("function on_request(req) return sip.time.match('Mon', 'Mars/Olympus') end");
        assert!(o.error.unwrap().contains("unknown time zone"));
    }

    const VOICEMAIL: &str = "
        function on_request(req)
          return req:fork({'sip:desk@127.0.0.1:5081', 'sip:mobile@127.0.0.1:5082'})
        end
        function on_branch(req, branch)
          if branch.ruri_port == 5082 then branch:append_header('X-Mobile', 'yes') end
        end
        function on_reply(req, res)
          req.vars.seen = (req.vars.seen or '') .. res.status .. ' '
        end
        function on_failure(req, res)
          if res.status == 486 or res.status == 408 or res.status == 480 then
            req.ruri = 'sip:vm@127.0.0.1:5090'
            return req:t_relay()
          end
        end";

    #[test]
    fn fed_responses_run_every_hook() {
        let o = fed(
            VOICEMAIL,
            &[
                Feed::Responses(vec![180, 486]),
                Feed::Timeout(vec![]),
                Feed::Responses(vec![200]),
            ],
        );
        assert_eq!(o.error, None);
        assert_eq!(o.replies, [180, 486, 200]);
        assert_eq!(o.branches.len(), 3);
        assert_eq!((o.branches[1].code, o.branches[1].timeout), (408, true));
        assert_eq!(o.failures.len(), 1);
        assert_eq!(o.failures[0].code, 486);
        assert_eq!(o.failures[0].targets, ["sip:vm@127.0.0.1:5090"]);
        assert_eq!(o.final_code, Some(200));
        assert!(o
            .vars
            .contains(&("seen".into(), VarValue::Str("180 486 200 ".into()))));
        // A 2xx on the first branch: no failure route.
        let o = fed(
            VOICEMAIL,
            &[Feed::Responses(vec![200]), Feed::Responses(vec![487])],
        );
        assert!(o.failures.is_empty());
        assert_eq!(o.final_code, Some(200));
        // A 6xx wins over a 486, and the script lets it through.
        let o = fed(
            VOICEMAIL,
            &[Feed::Responses(vec![486]), Feed::Responses(vec![603])],
        );
        assert_eq!(o.failures[0].code, 603);
        assert!(o.failures[0].targets.is_empty());
        assert_eq!(o.final_code, Some(603));
    }

    const FAILURE_REPLY: &str = "
        function on_request(req)
          return req:t_relay('sip:desk@127.0.0.1:5081')
        end
        function on_branch(req, branch)
          req.vars.original = (req.vars.original or '') .. tostring(branch:header('X-Original-To')) .. ' '
        end
        function on_branch_failure(req, res)
          req.vars.branch_failed = (req.vars.branch_failed or '') .. res.branch.code .. ' '
        end
        function on_failure(req, res)
          local seen = {}
          for _, b in ipairs(res.branches) do
            seen[#seen + 1] = b.uri .. '/' .. b.code .. '/' .. tostring(b.timeout)
          end
          req.vars.branches = table.concat(seen, ',')
          if res.status == 408 then
            req:append_header('X-Original-To', req.ruri)
            return req:t_relay('sip:mobile@127.0.0.1:5082')
          end
          return req:reply(tonumber(req:header('X-Reply') or '480'), 'Gone')
        end";

    #[test]
    fn fed_responses_run_the_failure_hooks_like_the_server() {
        let var = |o: &Outcome, name: &str| {
            o.vars
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let str_var = |s: &str| Some(VarValue::Str(s.into()));
        let o = fed(
            FAILURE_REPLY,
            &[Feed::Timeout(vec![]), Feed::Responses(vec![180, 486])],
        );
        assert_eq!(o.error, None);
        // The header added in on_failure reaches the second branch only.
        assert_eq!(var(&o, "original"), str_var("nil sip:bob@127.0.0.1:5060 "));
        assert_eq!(var(&o, "branch_failed"), str_var("408 486 "));
        assert_eq!(
            var(&o, "branches"),
            str_var("sip:desk@127.0.0.1:5081/408/true,sip:mobile@127.0.0.1:5082/486/false")
        );
        assert_eq!(o.failures.len(), 2);
        assert_eq!(o.failures[1].code, 486);
        assert_eq!(o.failures[1].reply, Some(480));
        assert_eq!(o.final_code, Some(480), "the script's reply, not the 486");
        // A 2xx there is the script's error: the best response goes upstream.
        let script = FAILURE_REPLY.replace("or '480'", "or '200'");
        let o = fed(
            &script,
            &[Feed::Timeout(vec![]), Feed::Responses(vec![486])],
        );
        assert!(o.failures[1]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("not 200"));
        assert_eq!(o.failures[1].reply, None);
        assert_eq!(o.final_code, Some(486));
    }

    #[test]
    fn a_session_keeps_state_between_runs() {
        let options = TestOptions::default();
        let script = source(
            "
            calls = 0
            function on_request(req)
              calls = calls + 1
              req.vars.calls = calls
              req.vars.kv = sip.kv.incr('n')
              return req:reply(404)
            end",
        );
        let mut session = Session::new(&script, &Fixtures::default(), &options).unwrap();
        session
            .kv()
            .set(
                "n",
                crate::script::kv::KvValue::Int(40),
                None,
                std::time::Instant::now(),
            )
            .unwrap();
        session.run(INVITE, &options, &[]).unwrap();
        let o = session.run(INVITE, &options, &[]).unwrap();
        assert!(o.vars.contains(&("calls".into(), VarValue::Int(2))));
        assert!(o.vars.contains(&("kv".into(), VarValue::Int(42))));
    }
}
