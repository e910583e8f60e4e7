//! The dispatcher: load balancing and failover over destination sets (gateways, media
//! servers, PBXs), with health probing. Kamailio's `dispatcher`, OpenSIPS's `load_balancer`.
//!
//! Owns:
//! - `config`: the `[dispatcher]` section ([`DispatcherConfig`]) and the health rules it sets.
//! - `set`: destination sets as configured (`[[dispatcher.set]]`, the sets file) and their
//!   validation.
//! - `algorithm`: which destination a request goes to, and the failover order of the others
//!   (hashes, round robin, random, priority, weighted, call load).
//! - `health`: each destination's state (`active`, `inactive`, `probing`, `disabled`) and how
//!   probes, failed calls and the operator move it, with explicit `now`.
//! - `probe`: the probe requests of the first event loop, as client transactions (RFC 3261
//!   §11, §17.1), and their outcomes fed back into `health`.
//! - [`Dispatcher`]: the sets serving now, shared by every event loop (reads take a read lock
//!   and atomics; a reload swaps the whole table), the counters per destination, and the
//!   probe schedule the server's shell carries out.
//!
//! Nothing here does I/O except [`Dispatcher::reload`] reading the sets file (`probe` asks
//! the loop to send and resolve). What a selection
//! means for a request (RFC 3261 §16.5: the destinations become the target set; §16.7 step 6
//! and §16.6: on a failure the next one is tried as a new branch of the same transaction) is
//! bound in `script::api::dispatcher`.

pub mod algorithm;
mod config;
pub mod health;
pub mod probe;
pub mod set;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

pub use algorithm::Algorithm;
pub use config::DispatcherConfig;
pub use health::{ProbeOutcome, Rules, State, Transition};
pub use set::{DestinationConfig, SetConfig};

use algorithm::{Candidate, Draw};
use health::{Health, LastProbe};

use crate::sip::{Host, Message, Uri};

/// One destination: where it is, its health and its counters. One per distinct URI, shared
/// by every set listing it (probed once), kept across reloads while a set still lists it.
pub struct Destination {
    uri: Arc<str>,
    seed: u64,
    /// The URI's host when it is an IP literal (`is_from_list`).
    ip: Option<IpAddr>,
    health: Mutex<Health>,
    /// Calls in progress through this node.
    calls: AtomicU64,
    /// Requests sent here first or on failover.
    sent: AtomicU64,
    /// Failures here that moved a request to the next destination.
    failovers: AtomicU64,
}

impl Destination {
    fn new(uri: &str, rules: &Rules) -> Destination {
        let parsed = Uri::parse(uri.as_bytes()).ok();
        let ip = parsed
            .as_ref()
            .and_then(Uri::as_sip)
            .and_then(|sip| match sip.host {
                Host::Ip(ip) => Some(ip),
                Host::Domain(_) => None,
            });
        Destination {
            uri: Arc::from(uri),
            seed: algorithm::hash_bytes(uri.as_bytes()),
            ip,
            health: Mutex::new(Health::new(rules)),
            calls: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
        }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        // A panic elsewhere cannot leave Health inconsistent (every update is one assignment).
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn state(&self) -> State {
        self.health().state()
    }
}

/// A destination as one set lists it.
struct Member {
    destination: Arc<Destination>,
    weight: u32,
    priority: i32,
    attrs: Arc<str>,
}

/// One set serving now.
struct Set {
    id: u32,
    members: Vec<Member>,
    /// Round robin position.
    turn: AtomicU64,
    /// Smooth weighted round robin state, one value per member.
    smooth: Mutex<Vec<i64>>,
}

/// Every set serving now.
#[derive(Default)]
struct Table {
    /// Sorted by id.
    sets: Vec<Set>,
    /// Every destination, by URI.
    destinations: HashMap<Arc<str>, Arc<Destination>>,
}

impl Table {
    /// Builds the table for `configs` (validated), reusing `old`'s destinations (their health
    /// and counters) for URIs it already had.
    fn build(configs: &[SetConfig], old: &Table, rules: &Rules) -> Table {
        let mut destinations: HashMap<Arc<str>, Arc<Destination>> = HashMap::new();
        let mut sets: Vec<Set> = configs
            .iter()
            .map(|config| {
                let members = config
                    .destinations
                    .iter()
                    .map(|d| {
                        let uri = d.uri.trim();
                        let destination = match destinations.get(uri) {
                            Some(existing) => existing.clone(),
                            None => {
                                let made = old
                                    .destinations
                                    .get(uri)
                                    .cloned()
                                    .unwrap_or_else(|| Arc::new(Destination::new(uri, rules)));
                                destinations.insert(made.uri.clone(), made.clone());
                                made
                            }
                        };
                        Member {
                            destination,
                            weight: d.weight.max(1),
                            priority: d.priority,
                            attrs: Arc::from(d.attrs.as_str()),
                        }
                    })
                    .collect::<Vec<_>>();
                Set {
                    id: config.id,
                    smooth: Mutex::new(vec![0; members.len()]),
                    members,
                    turn: AtomicU64::new(0),
                }
            })
            .collect();
        sets.sort_by_key(|s| s.id);
        Table { sets, destinations }
    }

    fn set(&self, id: u32) -> Option<&Set> {
        self.sets
            .binary_search_by_key(&id, |s| s.id)
            .ok()
            .map(|i| &self.sets[i])
    }
}

/// Why a selection found nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SelectError {
    /// No set has this id.
    UnknownSet(u32),
    /// Every destination of the set is `inactive` or `disabled`.
    NoneUsable(u32),
}

impl std::fmt::Display for SelectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SelectError::UnknownSet(id) => write!(f, "no dispatcher set {id}"),
            SelectError::NoneUsable(id) => {
                write!(
                    f,
                    "dispatcher set {id}: every destination is down or disabled"
                )
            }
        }
    }
}

/// One destination of one set as `ctl ds list` and `sip.ds.list` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationView {
    pub set: u32,
    pub uri: String,
    pub state: State,
    pub weight: u32,
    pub priority: i32,
    pub attrs: String,
    pub calls: u64,
    pub sent: u64,
    pub failovers: u64,
    pub probes_failed: u64,
    /// The last probe's result and how long ago, at the `now` of the listing.
    pub last_probe: Option<(ProbeOutcome, Duration)>,
}

/// The dispatcher of one server, shared by its event loops.
pub struct Dispatcher {
    rules: Rules,
    /// Sets from the configuration (not reloaded: the configuration is read at start).
    configured: Vec<SetConfig>,
    /// The sets file `reload` reads.
    file: Option<PathBuf>,
    table: RwLock<Arc<Table>>,
    /// State of the `random` algorithm's generator.
    random: AtomicU64,
    /// Counts state changes; watchers (`ctl`, tests) wake on each.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Dispatcher {
    /// A dispatcher over `configured` sets and, when given, the sets in `file` (read now).
    pub fn new(
        rules: Rules,
        configured: Vec<SetConfig>,
        file: Option<PathBuf>,
    ) -> Result<Dispatcher, String> {
        let dispatcher = Dispatcher {
            rules,
            configured,
            file,
            table: RwLock::new(Arc::new(Table::default())),
            random: AtomicU64::new(seed_from_clock()),
            changes: tokio::sync::watch::Sender::new(0),
        };
        dispatcher.reload()?;
        Ok(dispatcher)
    }

    /// A dispatcher without sets (`sip.ds.select` finds none): offline runs, tests.
    pub fn empty() -> Dispatcher {
        Dispatcher {
            rules: Rules::default(),
            configured: Vec::new(),
            file: None,
            table: RwLock::new(Arc::new(Table::default())),
            random: AtomicU64::new(seed_from_clock()),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The `[dispatcher]` section of `config`.
    pub fn from_config(config: &DispatcherConfig) -> Result<Dispatcher, String> {
        Dispatcher::new(
            config.rules()?,
            config.set.clone(),
            config.sets_file.clone(),
        )
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Re-reads the sets file and serves the configured sets and the file's from now on;
    /// a file that does not read, parse or validate is refused and the old sets keep serving.
    /// Destinations still listed keep their state and counters. Returns (sets, destinations).
    pub fn reload(&self) -> Result<(usize, usize), String> {
        let mut sets = self.configured.clone();
        if let Some(file) = &self.file {
            sets.extend(set::SetsFile::load(file)?);
        }
        set::validate(&sets)?;
        let old = self.table();
        let table = Table::build(&sets, &old, &self.rules);
        let counts = (table.sets.len(), table.destinations.len());
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        Ok(counts)
    }

    fn table(&self) -> Arc<Table> {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The set's usable destinations in the order to try them: the selected one first, then
    /// the failover order; `active` destinations before `probing` ones. `key` is the hash
    /// input for the hash algorithms (see [`hash_key`]); without one they take turns.
    pub fn select(
        &self,
        set_id: u32,
        algorithm: Algorithm,
        key: Option<&[u8]>,
    ) -> Result<Vec<Arc<str>>, SelectError> {
        let table = self.table();
        let set = table.set(set_id).ok_or(SelectError::UnknownSet(set_id))?;
        let states: Vec<State> = set.members.iter().map(|m| m.destination.state()).collect();
        let mut ordered = Vec::with_capacity(set.members.len());
        for tier in [0, 1] {
            let members: Vec<usize> = (0..set.members.len())
                .filter(|&i| states[i].tier() == Some(tier))
                .collect();
            if members.is_empty() {
                continue;
            }
            let candidates: Vec<Candidate> = members
                .iter()
                .map(|&i| candidate(&set.members[i]))
                .collect();
            let draw = self.draw(
                set,
                algorithm,
                key,
                &members,
                &candidates,
                ordered.is_empty(),
            );
            let order = algorithm::order(algorithm, &candidates, draw);
            ordered.extend(order.into_iter().map(|i| members[i]));
        }
        let first = ordered.first().ok_or(SelectError::NoneUsable(set_id))?;
        set.members[*first]
            .destination
            .sent
            .fetch_add(1, Ordering::Relaxed);
        Ok(ordered
            .into_iter()
            .map(|i| set.members[i].destination.uri.clone())
            .collect())
    }

    /// The varying input of one tier's order. Only the tier that provides the selected
    /// destination (`selecting`) advances the shared counters.
    fn draw(
        &self,
        set: &Set,
        algorithm: Algorithm,
        key: Option<&[u8]>,
        members: &[usize],
        candidates: &[Candidate],
        selecting: bool,
    ) -> Draw {
        if let (true, Some(key)) = (algorithm.is_hash(), key) {
            return Draw::Key(algorithm::hash_bytes(key));
        }
        if !selecting {
            return match algorithm {
                Algorithm::Weighted => Draw::Chosen(usize::MAX),
                _ => Draw::Turn(0),
            };
        }
        match algorithm {
            Algorithm::Weighted => {
                let mut smooth = set.smooth.lock().unwrap_or_else(PoisonError::into_inner);
                let mut current: Vec<i64> = members.iter().map(|&i| smooth[i]).collect();
                let chosen = algorithm::smooth_weighted(&mut current, candidates);
                for (&i, value) in members.iter().zip(current) {
                    smooth[i] = value;
                }
                Draw::Chosen(chosen)
            }
            Algorithm::Random => {
                let state = self
                    .random
                    .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
                Draw::Turn(algorithm::mix(state))
            }
            _ => Draw::Turn(set.turn.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// The first of `remaining` (the failover order a selection returned, minus what was
    /// tried) that is still usable now, removed from it with everything before it. The
    /// destination that failed (`failed`), when given, counts one failover.
    pub fn next(&self, failed: Option<&str>, remaining: &mut Vec<Arc<str>>) -> Option<Arc<str>> {
        let table = self.table();
        if let Some(failed) = failed.and_then(|uri| table.destinations.get(uri)) {
            failed.failovers.fetch_add(1, Ordering::Relaxed);
        }
        while !remaining.is_empty() {
            let uri = remaining.remove(0);
            let Some(destination) = table.destinations.get(&uri) else {
                continue; // removed by a reload meanwhile
            };
            if destination.state().tier().is_some() {
                destination.sent.fetch_add(1, Ordering::Relaxed);
                return Some(uri);
            }
        }
        None
    }

    /// The operator or the script sets a destination's state. `Err` when no set lists `uri`.
    pub fn mark(&self, uri: &str, state: State, by: &str) -> Result<(), String> {
        let destination = self.destination(uri)?;
        let transition = destination.health().mark(state);
        self.changed(&destination.uri, transition, by);
        Ok(())
    }

    /// A call sent to `uri` failed with `code` (408 for a timeout): marked `inactive` when
    /// `[dispatcher] mark_on` lists it. Unknown URIs are ignored (a reload removed them).
    pub fn call_failed(&self, uri: &str, code: u16) {
        if let Ok(destination) = self.destination(uri) {
            let transition = destination.health().call_failed(code, &self.rules);
            self.changed(
                &destination.uri,
                transition,
                &format!("a call failed with {code}"),
            );
        }
    }

    /// A call to `uri` starts: counted there (the load `call_load` uses) until the returned
    /// slot is dropped. `None` when no set lists `uri` (a reload removed it).
    pub fn count_call(&self, uri: &str) -> Option<CallSlot> {
        let destination = self.destination(uri).ok()?;
        destination.calls.fetch_add(1, Ordering::Relaxed);
        Some(CallSlot { destination })
    }

    fn destination(&self, uri: &str) -> Result<Arc<Destination>, String> {
        self.table()
            .destinations
            .get(uri.trim())
            .cloned()
            .ok_or_else(|| format!("no dispatcher set lists {uri}"))
    }

    /// The state of `uri`, `None` when no set lists it.
    pub fn state(&self, uri: &str) -> Option<State> {
        self.destination(uri).ok().map(|d| d.state())
    }

    /// Whether `ip` is the address of a destination of `set` (of any set when `None`).
    /// Only destinations written with an IP address match (names are not resolved).
    pub fn is_from_list(&self, ip: IpAddr, set: Option<u32>) -> bool {
        let ip = ip.to_canonical();
        let table = self.table();
        let matches = |d: &Destination| d.ip.is_some_and(|own| own.to_canonical() == ip);
        match set {
            Some(id) => table
                .set(id)
                .is_some_and(|s| s.members.iter().any(|m| matches(&m.destination))),
            None => table.destinations.values().any(|d| matches(d)),
        }
    }

    /// The destinations of `set` (every set when `None`), set by set in configured order.
    pub fn list(&self, set: Option<u32>, now: Instant) -> Vec<DestinationView> {
        let table = self.table();
        table
            .sets
            .iter()
            .filter(|s| set.is_none_or(|id| s.id == id))
            .flat_map(|s| s.members.iter().map(move |m| (s.id, m)))
            .map(|(set, member)| view(set, member, now))
            .collect()
    }

    /// The set ids serving now.
    pub fn set_ids(&self) -> Vec<u32> {
        self.table().sets.iter().map(|s| s.id).collect()
    }

    /// The probes to send at `now` (URIs), after failing those that waited past the timeout.
    /// Each returned probe is in flight until [`Dispatcher::probe_answered`] or its timeout.
    pub fn due_probes(&self, now: Instant) -> Vec<Arc<str>> {
        let table = self.table();
        let mut due = Vec::new();
        for destination in table.destinations.values() {
            let mut health = destination.health();
            let transition = health.probe_expired(now, &self.rules);
            let send = health.due(now, &self.rules);
            drop(health);
            self.changed(&destination.uri, transition, "a probe timed out");
            if send {
                due.push(destination.uri.clone());
            }
        }
        due
    }

    /// The probe to `uri` ended with `outcome`.
    pub fn probe_answered(&self, uri: &str, outcome: ProbeOutcome, now: Instant) {
        if let Ok(destination) = self.destination(uri) {
            let transition = destination
                .health()
                .probe_answered(outcome, now, &self.rules);
            self.changed(&destination.uri, transition, &format!("probe: {outcome}"));
        }
    }
}

/// One call counted at a destination (`calls`, what `call_load` balances on) for as long as
/// the slot lives: whoever owns the call (the transaction's script state, or the call's dialog
/// once it is tracked) holds it, and dropping it, whatever ended the call, takes the call off
/// exactly once. It holds the destination itself, so a reload that keeps the destination keeps
/// the count right, and one that removes it loses nothing but the removed counter.
pub struct CallSlot {
    destination: Arc<Destination>,
}

impl CallSlot {
    /// The destination this call counts at.
    pub fn uri(&self) -> &str {
        &self.destination.uri
    }
}

impl std::fmt::Debug for CallSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CallSlot({})", self.destination.uri)
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let _ = self
            .destination
            .calls
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

/// Destinations the metrics list at most (each is five to eight series).
pub const MAX_METRIC_DESTINATIONS: usize = 2_000;

/// The families of `moonroute_dispatcher_*`, read from `dispatcher` at each scrape (nothing
/// is counted twice on the call path): per destination URI, its state (one series per state,
/// 1 for the current one), calls in progress, requests sent, failovers and failed probes.
/// Without `dispatcher` (dropped) they are empty.
pub fn register_metrics(registry: &crate::metrics::Registry, dispatcher: &Arc<Dispatcher>) {
    use crate::metrics::Kind;
    type Read = fn(&DestinationView) -> f64;
    let families: [(&str, &str, Kind, Read); 4] = [
        (
            "moonroute_dispatcher_calls",
            "Calls in progress through this node per dispatcher destination (call_load uses them): from the INVITE to the end of its dialog when tracked (req:dlg_manage()), else of its transaction.",
            Kind::Gauge,
            |v| v.calls as f64,
        ),
        (
            "moonroute_dispatcher_sent_total",
            "Requests the dispatcher sent to a destination, first or on failover.",
            Kind::Counter,
            |v| v.sent as f64,
        ),
        (
            "moonroute_dispatcher_failovers_total",
            "Failures at a destination that moved a request on to the next one (req:ds_next).",
            Kind::Counter,
            |v| v.failovers as f64,
        ),
        (
            "moonroute_dispatcher_probes_failed_total",
            "Probes of a destination that failed (timeout, unreachable, an answer not in alive_codes).",
            Kind::Counter,
            |v| v.probes_failed as f64,
        ),
    ];
    for (name, help, kind, read) in families {
        let weak = Arc::downgrade(dispatcher);
        registry.collect(
            name,
            help,
            kind,
            Box::new(move |out| {
                for view in metric_views(&weak) {
                    out.sample(name, &[("destination", &view.uri)], read(&view));
                }
            }),
        );
    }
    let weak = Arc::downgrade(dispatcher);
    registry.collect(
        "moonroute_dispatcher_state",
        "A dispatcher destination's state: 1 for the current one of active, inactive, probing, disabled.",
        Kind::Gauge,
        Box::new(move |out| {
            for view in metric_views(&weak) {
                for state in [State::Active, State::Inactive, State::Probing, State::Disabled] {
                    let labels = [("destination", view.uri.as_str()), ("state", state.name())];
                    let value = if view.state == state { 1.0 } else { 0.0 };
                    out.sample("moonroute_dispatcher_state", &labels, value);
                }
            }
        }),
    );
}

/// Every destination once (a URI in several sets is one destination), at most
/// [`MAX_METRIC_DESTINATIONS`].
fn metric_views(dispatcher: &std::sync::Weak<Dispatcher>) -> Vec<DestinationView> {
    let Some(dispatcher) = dispatcher.upgrade() else {
        return Vec::new();
    };
    let mut seen = std::collections::HashSet::new();
    dispatcher
        .list(None, Instant::now())
        .into_iter()
        .filter(|v| seen.insert(v.uri.clone()))
        .take(MAX_METRIC_DESTINATIONS)
        .collect()
}

fn candidate(member: &Member) -> Candidate {
    Candidate {
        weight: member.weight,
        priority: member.priority,
        load: member.destination.calls.load(Ordering::Relaxed),
        seed: member.destination.seed,
    }
}

fn view(set: u32, member: &Member, now: Instant) -> DestinationView {
    let destination = &member.destination;
    let health = destination.health();
    DestinationView {
        set,
        uri: destination.uri.to_string(),
        state: health.state(),
        weight: member.weight,
        priority: member.priority,
        attrs: member.attrs.to_string(),
        calls: destination.calls.load(Ordering::Relaxed),
        sent: destination.sent.load(Ordering::Relaxed),
        failovers: destination.failovers.load(Ordering::Relaxed),
        probes_failed: health.probes_failed,
        last_probe: health
            .last_probe
            .map(|LastProbe { at, outcome }| (outcome, now.saturating_duration_since(at))),
    }
}

impl Dispatcher {
    /// One line per state change (operators grep for these when a gateway flaps), and a
    /// wake-up for the watchers of [`Dispatcher::watch`].
    fn changed(&self, uri: &str, transition: Option<Transition>, cause: &str) {
        let Some(Transition { from, to }) = transition else {
            return;
        };
        if to == State::Inactive {
            warn!(destination = uri, %from, %to, cause, "dispatcher destination down");
        } else {
            info!(destination = uri, %from, %to, cause, "dispatcher destination state changed");
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// Changes with every change of a destination's state (its value counts them).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

fn seed_from_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x5eed)
}

/// The hash input `algorithm` takes from `request`: the Call-ID, or `user@host` of the From,
/// To or Request-URI (host lower-cased, port and parameters left out, so the same caller
/// hashes the same whatever its transport). `None` for the other algorithms, or when the
/// header does not parse (the caller then takes turns).
pub fn hash_key(algorithm: Algorithm, request: &Message) -> Option<Vec<u8>> {
    match algorithm {
        Algorithm::CallId => request.call_id().ok().map(<[u8]>::to_vec),
        Algorithm::FromUri => uri_key(&request.from().ok()?.uri),
        Algorithm::ToUri => uri_key(&request.to().ok()?.uri),
        Algorithm::RequestUri => uri_key(&request.request_uri().ok()?),
        _ => None,
    }
}

fn uri_key(uri: &Uri<'_>) -> Option<Vec<u8>> {
    let Some(sip) = uri.as_sip() else {
        return Some(uri.raw().to_vec());
    };
    let mut key = sip.user.map(<[u8]>::to_vec).unwrap_or_default();
    key.push(b'@');
    key.extend(sip.host.to_string().to_ascii_lowercase().bytes());
    Some(key)
}

/// The URI a request goes to through `destination`: the destination's when it has a user
/// part, else the destination's with the Request-URI's user (Kamailio's `ds_select_domain`:
/// a gateway receives `sip:+15551234@gw`). The next hop is the destination's host, port and
/// transport either way (RFC 3263 on its URI).
pub fn target_uri(destination: &str, request_uri: Option<&[u8]>) -> String {
    let destination_has_user = Uri::parse(destination.as_bytes())
        .ok()
        .and_then(|u| u.as_sip().map(|s| s.user.is_some()))
        .unwrap_or(true);
    let user = request_uri
        .and_then(|raw| Uri::parse(raw).ok())
        .and_then(|u| u.as_sip().and_then(|s| s.user.map(<[u8]>::to_vec)));
    match (destination_has_user, user, destination.split_once(':')) {
        (false, Some(user), Some((scheme, rest))) => {
            format!("{scheme}:{}@{rest}", String::from_utf8_lossy(&user))
        }
        _ => destination.to_owned(),
    }
}

#[cfg(test)]
mod tests;
