//! The location service: owns the storage of bindings and their lookup.
//!
//! A binding associates an address-of-record (AOR) with a contact address (RFC 3261 §10: "a
//! location service" holding bindings, created and updated by a registrar, read by a proxy
//! routing to the AOR, §16.5). Each binding also keeps what a proxy needs to reach the contact
//! later: the source the REGISTER came from and the socket it arrived on (for contacts behind
//! NAT), the Path route set it was registered through (RFC 3327 §5.3), and the RFC 5626
//! `+sip.instance` / `reg-id` of the registering UA.
//!
//! This module only keeps bindings; what they become after a REGISTER is decided by
//! [`crate::registrar`] (§10.3), which also defines the AOR normalization used as the key.
//! [`LocationStore`] is the interface. [`MemoryLocation`] keeps bindings in memory only;
//! [`SledLocation`] is the durable store: the same in-memory index serves every lookup, and
//! each change is also written to sled, made durable by group commit ([`commit`]), in the
//! record format of [`record`]. [`RedisLocation`] keeps them on a Redis server shared by
//! several nodes ([`redis_store`]).
//!
//! # Fixture format
//!
//! [`MemoryLocation::from_fixture`] (used by `moonroute test --location FIXTURE`) reads one
//! binding per line:
//!
//! ```text
//! # AOR                      CONTACT                          options
//! sip:alice@example.com      sip:alice@192.0.2.10:5060        q=0.5 expires=600
//! sip:alice@example.com      sip:alice@198.51.100.7:5070;transport=tcp
//! sip:bob@example.com        sip:bob@192.0.2.20               # a trailing comment
//! ```
//!
//! - fields are separated by white space; blank lines are ignored;
//! - `#` at the start of a line or after white space starts a comment (a `#` inside a URI,
//!   such as in `tel:*21#`, does not);
//! - `AOR` is a `sip:` or `sips:` URI, normalized like a REGISTER's To (the [`AorKeys`]
//!   given to the loader, [`crate::registrar::AorRule`]);
//! - `CONTACT` is a bare URI (no `<>`, no display name);
//! - options: `q=QVALUE` (RFC 3261 §20.10 qvalue, default 1) and `expires=SECONDS` (default
//!   3600, counted from the `now` given to the loader; 0 gives an already expired binding);
//! - the same contact twice for one AOR is an error.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

pub mod commit;
mod open;
pub mod record;
mod redis_store;
mod sled_store;

pub use commit::{Acknowledgement, Commit, CommitError, CommitState, CommitTicket};
pub use open::{open_configured, LocationBackend, LocationConfig};
pub use redis_store::RedisLocation;
pub use sled_store::{LoadReport, SledLocation};

use crate::sip::name_addr::parse_qvalue;
use crate::sip::Uri;
use crate::transport::TransportKind;

/// One contact address bound to an address-of-record (RFC 3261 §10.3 step 7: the binding
/// records the contact, its expiry, its q-value and the Call-ID and CSeq of the request that
/// last wrote it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The normalized address-of-record ([`crate::registrar::aor_of`]): the store's key.
    pub aor: String,
    /// The contact URI as registered: the URI only, without the `<>`, display name or header
    /// parameters of the Contact field.
    pub contact: String,
    /// When the binding expires (wall clock, so that a persistent store survives restarts).
    pub expires_at: SystemTime,
    /// The q-value in thousandths (RFC 3261 §20.10), 1000 when the Contact had none.
    pub q: u16,
    pub call_id: String,
    pub cseq: u32,
    /// Transport and source address the REGISTER came from.
    pub received: Option<(TransportKind, SocketAddr)>,
    /// Our socket the REGISTER arrived on.
    pub local: Option<SocketAddr>,
    /// The Path header field values of the REGISTER, in order (RFC 3327 §5.3).
    pub path: Vec<String>,
    /// The `+sip.instance` Contact parameter without its quotes, e.g. `<urn:uuid:...>`
    /// (RFC 5626 §4.1).
    pub instance: Option<String>,
    /// The `reg-id` Contact parameter (RFC 5626 §4.2).
    pub reg_id: Option<u32>,
    /// The User-Agent header field of the REGISTER.
    pub user_agent: Option<String>,
    /// Registered from behind a NAT (`req:fix_nated_contact()` or `req:nat_detect()` before
    /// `req:save()`): requests reach the contact through `received`, not its own address,
    /// and it gets keep-alives ([`crate::nat::keepalive`]).
    pub nated: bool,
    /// The node this binding was registered through (its `[cluster] node_uri`), when the
    /// location store is shared by several nodes ([`crate::cluster`]).
    pub node: Option<String>,
    /// The Route to the owning node for a binding only that node can reach (connection-bound,
    /// or behind a NAT whose pinhole it holds): the node's URI with a flow token it signed
    /// ([`crate::cluster::FlowSigner`]). Other nodes relay through it (RFC 3327 §5.3 semantics,
    /// RFC 5626 §5.3's edge proxy); `None` for a binding every node reaches directly.
    pub owner_route: Option<String>,
}

impl Binding {
    /// A binding known only by what a REGISTER must give (its contact, expiry, q, Call-ID and
    /// CSeq): no source address, socket, Path, instance or User-Agent (a fixture, `ctl ul add`).
    pub fn new(
        aor: &str,
        contact: &str,
        expires_at: SystemTime,
        q: u16,
        call_id: String,
        cseq: u32,
    ) -> Binding {
        Binding {
            aor: aor.to_owned(),
            contact: contact.to_owned(),
            expires_at,
            q,
            call_id,
            cseq,
            received: None,
            local: None,
            path: Vec::new(),
            instance: None,
            reg_id: None,
            user_agent: None,
            nated: false,
            node: None,
            owner_route: None,
        }
    }

    /// True while the binding has not expired.
    pub fn is_live(&self, now: SystemTime) -> bool {
        self.expires_at > now
    }

    /// Seconds until it expires, rounded up (what a REGISTER's 200 lists, §10.3 step 8);
    /// 0 once expired.
    pub fn seconds_left(&self, now: SystemTime) -> u64 {
        let left = self
            .expires_at
            .duration_since(now)
            .unwrap_or(Duration::ZERO);
        left.as_secs() + u64::from(left.subsec_nanos() > 0)
    }
}

/// How the registrar names AORs, as a store needs to know it: the key an AOR is stored under,
/// and one binding list from the lists of two keys that name one AOR. A durable store opened
/// with a rule that names some stored keys differently (they were written under an older
/// rule, or before a domain was configured) moves them to their key, merging with what is
/// there ([`SledLocation::open_rekeyed`]). Implemented by [`crate::registrar::AorRule`].
pub trait AorKeys: Send + Sync {
    /// The key of `aor` (a URI, or a stored key), `None` when it is not an AOR.
    fn key_of(&self, aor: &str) -> Option<String>;

    /// The bindings of one AOR from those `kept` under its key and those `moved` there from
    /// another key.
    fn merge(&self, kept: Vec<Binding>, moved: Vec<Binding>) -> Vec<Binding>;
}

/// Storage of bindings, keyed by normalized AOR. Implementations are shared by every event
/// loop, hence `Send + Sync`; calls are short and never wait for the disk: a durable store
/// returns a [`Commit`] ticket that says when the write is on disk, and the caller holds its
/// acknowledgement until then.
///
/// This is the boundary a shared backend for several nodes would implement; the registrar,
/// the script API and the control socket see nothing else.
pub trait LocationStore: Send + Sync {
    /// Unexpired bindings of `aor`, highest q first (stable by registration order). Served
    /// from memory.
    fn lookup(&self, aor: &str, now: SystemTime) -> Vec<Binding>;

    /// Replaces the whole binding list of `aor` (empty = remove the AOR). Returns an error
    /// string if the store refuses (e.g. a capacity limit, a write error); the AOR is then
    /// left unchanged.
    fn replace(&self, aor: &str, bindings: Vec<Binding>) -> Result<Commit, String>;

    /// Removes expired bindings (from memory and from disk); returns how many.
    fn sweep(&self, now: SystemTime) -> usize;

    /// Number of bindings stored (expired ones not yet swept included).
    fn count(&self) -> usize;

    /// Every AOR that has bindings (expired ones not yet swept included), sorted.
    fn aors(&self) -> Vec<String>;

    /// A slice of a walk over the AORs: up to `limit` (at least 1) AORs from `cursor` on (start
    /// with [`AorCursor::default`]), and where the walk resumes (`None`: it is over). Every AOR
    /// present for the whole walk is listed exactly once; one added or removed meanwhile may
    /// or may not be. The order is the store's own. For callers that must visit a large store
    /// without holding it (or an event loop) for long: NAT keep-alives.
    fn aors_page(&self, cursor: &AorCursor, limit: usize) -> (Vec<String>, Option<AorCursor>);

    /// Read-modify-write of one AOR: `f` gets the unexpired bindings of `aor` and returns the
    /// new list to store, or `None` to leave the AOR untouched. RFC 3261 §10.3 wants binding
    /// updates committed all at once; implementations make this atomic with respect to other
    /// updates of the same AOR (two REGISTERs for one AOR handled on two event loops must not
    /// lose one another's bindings).
    ///
    /// The [`Commit`] says when what `f` saw and wrote is durable; with `None` from `f` it
    /// still covers the writes `f` saw, so an answer listing them waits for them too.
    fn update(
        &self,
        aor: &str,
        now: SystemTime,
        f: &mut dyn FnMut(Vec<Binding>) -> Option<Vec<Binding>>,
    ) -> Result<Commit, String>;

    /// [`LocationStore::update`] for a caller that waits for the write without blocking (an
    /// event loop parking its answer on the [`Commit`]): a remote store may return once `f`
    /// has run on what it read, before its write is acknowledged. If another writer changed
    /// the AOR between that read and the write, the ticket fails (the caller answers 500, as
    /// RFC 3261 §10.3 wants for a commit that fails) instead of running `f` again.
    fn update_parked(
        &self,
        aor: &str,
        now: SystemTime,
        f: &mut dyn FnMut(Vec<Binding>) -> Option<Vec<Binding>>,
    ) -> Result<Commit, String> {
        self.update(aor, now, f)
    }

    /// [`LocationStore::lookup`], or why the store could not answer (a shared store over the
    /// network that is unreachable): the caller must not take that for "no bindings" (a false
    /// 404 makes callers give up). Stores in this process always answer.
    fn try_lookup(&self, aor: &str, now: SystemTime) -> Result<Vec<Binding>, String> {
        Ok(self.lookup(aor, now))
    }

    /// False while a shared store is unreachable: its failed calls are answered 503 with
    /// Retry-After (try again later, or another node), not 500.
    fn reachable(&self) -> bool {
        true
    }

    /// One line on the backend's health for `ctl status` (`None`: nothing to say beyond the
    /// count).
    fn health(&self) -> Option<String> {
        None
    }

    /// Registers the backend's own metrics (a shared store's link), if it has any.
    fn register_metrics(&self, _registry: &crate::metrics::Registry) {}

    /// The Redis link of a store shared by several nodes (`crate::cluster` runs its heartbeat
    /// on it); `None` for a store of this process alone.
    fn shared_link(&self) -> Option<std::sync::Arc<crate::redis_link::RedisLink>> {
        None
    }
}

/// Where a walk over a store's AORs resumes ([`LocationStore::aors_page`]); opaque.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AorCursor {
    /// The shard the walk is in.
    shard: usize,
    /// The last AOR listed from that shard (`None`: none yet).
    after: Option<String>,
}

/// Number of shards of [`MemoryLocation`]: enough that event loops on different threads
/// rarely wait for one another.
const SHARDS: usize = 32;

/// The default bound on the number of bindings a [`MemoryLocation`] holds.
pub const DEFAULT_MAX_BINDINGS: usize = 1_000_000;

/// Expiry of a fixture binding without `expires=`, in seconds.
const FIXTURE_DEFAULT_EXPIRES: u64 = 3600;

/// One shard's AORs, ordered by name so that [`LocationStore::aors_page`] can resume a walk
/// after any AOR in `O(log n)`.
type Shard = BTreeMap<String, Vec<Binding>>;

/// In-memory [`LocationStore`]: AORs spread over 32 mutex-protected shards by hash, each
/// ordered by name (for [`LocationStore::aors_page`]); each AOR's bindings kept in
/// registration order. The total number of bindings is bounded so that a flood of
/// registrations cannot exhaust memory.
pub struct MemoryLocation {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    count: AtomicUsize,
    max_bindings: usize,
}

impl Default for MemoryLocation {
    fn default() -> Self {
        MemoryLocation::new(DEFAULT_MAX_BINDINGS)
    }
}

impl std::fmt::Debug for MemoryLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLocation")
            .field("count", &self.count())
            .field("max_bindings", &self.max_bindings)
            .finish()
    }
}

impl MemoryLocation {
    /// An empty store holding at most `max_bindings` bindings; beyond it
    /// [`LocationStore::replace`] refuses to grow an AOR.
    pub fn new(max_bindings: usize) -> MemoryLocation {
        MemoryLocation {
            shards: (0..SHARDS).map(|_| Mutex::new(BTreeMap::new())).collect(),
            hasher: RandomState::new(),
            count: AtomicUsize::new(0),
            max_bindings,
        }
    }

    pub fn max_bindings(&self) -> usize {
        self.max_bindings
    }

    /// Loads bindings from the fixture format described in the module documentation; `now`
    /// is the time `expires=` counts from, `keys` names the AORs. Errors name the offending
    /// line.
    pub fn from_fixture(
        text: &str,
        now: SystemTime,
        keys: &dyn AorKeys,
    ) -> Result<MemoryLocation, String> {
        let mut by_aor: HashMap<String, Vec<Binding>> = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let Some(binding) = parse_fixture_line(line, number, now, keys)
                .map_err(|e| format!("line {number}: {e}"))?
            else {
                continue;
            };
            let slot = by_aor.entry(binding.aor.clone()).or_default();
            if slot.iter().any(|b| b.contact == binding.contact) {
                return Err(format!(
                    "line {number}: {} is already bound to {}",
                    binding.contact, binding.aor
                ));
            }
            slot.push(binding);
        }
        let store = MemoryLocation::default();
        for (aor, bindings) in by_aor {
            store.replace(&aor, bindings)?;
        }
        Ok(store)
    }

    /// Stores `bindings` in the locked shard, keeping the global count within bounds.
    fn store_locked(
        &self,
        shard: &mut Shard,
        aor: &str,
        bindings: Vec<Binding>,
    ) -> Result<(), String> {
        let old = shard.get(aor).map_or(0, Vec::len);
        let new = bindings.len();
        if new > old {
            let grow = new - old;
            let max = self.max_bindings;
            self.count
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    n.checked_add(grow).filter(|total| *total <= max)
                })
                .map_err(|_| format!("location store full ({max} bindings)"))?;
        } else {
            self.count.fetch_sub(old - new, Ordering::AcqRel);
        }
        if bindings.is_empty() {
            shard.remove(aor);
        } else {
            shard.insert(aor.to_owned(), bindings);
        }
        Ok(())
    }

    fn shard(&self, aor: &str) -> MutexGuard<'_, Shard> {
        let index = (self.hasher.hash_one(aor) % SHARDS as u64) as usize;
        lock(&self.shards[index])
    }
}

/// Locks a shard. A poisoned mutex (a panic while holding it, which no code path here can
/// cause) still holds consistent data: every write is a single insert or remove.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Unexpired bindings, highest q first; the sort is stable, so equal q keep registration
/// order.
fn live_sorted(bindings: &[Binding], now: SystemTime) -> Vec<Binding> {
    let mut live: Vec<Binding> = bindings
        .iter()
        .filter(|b| b.is_live(now))
        .cloned()
        .collect();
    live.sort_by_key(|b| std::cmp::Reverse(b.q));
    live
}

/// Writes an AOR's new binding list to a store's backing medium (empty: remove the AOR),
/// called with the AOR's shard locked, before memory changes: a write that fails leaves
/// memory as it was.
pub type Persist<'a> = &'a mut dyn FnMut(&str, &[Binding]) -> Result<(), String>;

impl MemoryLocation {
    /// [`LocationStore::update`], with `persist` called before a new list is kept. Returns
    /// whether a new list was stored.
    pub fn update_persisting(
        &self,
        aor: &str,
        now: SystemTime,
        f: &mut dyn FnMut(Vec<Binding>) -> Option<Vec<Binding>>,
        persist: Persist<'_>,
    ) -> Result<bool, String> {
        let mut shard = self.shard(aor);
        let current: Vec<Binding> = shard.get(aor).map_or_else(Vec::new, |b| {
            b.iter().filter(|b| b.is_live(now)).cloned().collect()
        });
        match f(current) {
            Some(bindings) => {
                self.check_capacity(&shard, aor, bindings.len())?;
                persist(aor, &bindings)?;
                self.store_locked(&mut shard, aor, bindings)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// [`LocationStore::replace`], with `persist` called first.
    pub fn replace_persisting(
        &self,
        aor: &str,
        bindings: Vec<Binding>,
        persist: Persist<'_>,
    ) -> Result<(), String> {
        let mut shard = self.shard(aor);
        self.check_capacity(&shard, aor, bindings.len())?;
        persist(aor, &bindings)?;
        self.store_locked(&mut shard, aor, bindings)
    }

    /// [`LocationStore::sweep`], with `persist` told each AOR that lost bindings. A failed
    /// write is logged and memory is swept anyway: expired bindings are ignored on load.
    /// A shard is locked once to find its AORs with expired bindings, then once per such AOR,
    /// so a large sweep never holds a shard (and the event loops using it) for more than one
    /// AOR's write.
    pub fn sweep_persisting(&self, now: SystemTime, persist: Persist<'_>) -> usize {
        let mut removed = 0;
        for shard in &self.shards {
            let expiring: Vec<String> = lock(shard)
                .iter()
                .filter(|(_, bindings)| bindings.iter().any(|b| !b.is_live(now)))
                .map(|(aor, _)| aor.clone())
                .collect();
            for aor in expiring {
                let mut shard = lock(shard);
                let Some(bindings) = shard.get_mut(&aor) else {
                    continue;
                };
                let before = bindings.len();
                bindings.retain(|b| b.is_live(now));
                let gone = before - bindings.len();
                if gone == 0 {
                    continue;
                }
                removed += gone;
                self.count.fetch_sub(gone, Ordering::AcqRel);
                if let Err(error) = persist(&aor, bindings) {
                    tracing::warn!(%aor, %error, "location store: could not remove expired bindings from disk");
                }
                if bindings.is_empty() {
                    shard.remove(&aor);
                }
            }
        }
        removed
    }

    /// Refuses a list that would grow the store past its bound (checked again, atomically,
    /// when stored; this early check keeps a refused write off the disk).
    fn check_capacity(&self, shard: &Shard, aor: &str, new: usize) -> Result<(), String> {
        let old = shard.get(aor).map_or(0, Vec::len);
        let total = self.count.load(Ordering::Acquire);
        if new > old && total.saturating_add(new - old) > self.max_bindings {
            return Err(format!(
                "location store full ({} bindings)",
                self.max_bindings
            ));
        }
        Ok(())
    }
}

fn no_persist(_: &str, _: &[Binding]) -> Result<(), String> {
    Ok(())
}

impl LocationStore for MemoryLocation {
    fn health(&self) -> Option<String> {
        Some("memory (this node only, lost on restart)".to_owned())
    }

    fn lookup(&self, aor: &str, now: SystemTime) -> Vec<Binding> {
        self.shard(aor)
            .get(aor)
            .map_or_else(Vec::new, |b| live_sorted(b, now))
    }

    fn replace(&self, aor: &str, bindings: Vec<Binding>) -> Result<Commit, String> {
        self.replace_persisting(aor, bindings, &mut no_persist)
            .map(|()| Commit::Done)
    }

    fn sweep(&self, now: SystemTime) -> usize {
        self.sweep_persisting(now, &mut no_persist)
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    fn aors(&self) -> Vec<String> {
        let mut aors: Vec<String> = self
            .shards
            .iter()
            .flat_map(|shard| lock(shard).keys().cloned().collect::<Vec<_>>())
            .collect();
        aors.sort();
        aors
    }

    /// Shard by shard, each in name order: one shard locked at a time, for `O(log n + limit)`.
    fn aors_page(&self, cursor: &AorCursor, limit: usize) -> (Vec<String>, Option<AorCursor>) {
        use std::ops::Bound::{Excluded, Unbounded};
        let limit = limit.max(1);
        let mut page = Vec::with_capacity(limit.min(1024));
        let mut shard_index = cursor.shard;
        let mut after = cursor.after.clone();
        while shard_index < SHARDS {
            let shard = lock(&self.shards[shard_index]);
            let from = after.as_deref().map_or(Unbounded, Excluded);
            let wanted = limit - page.len();
            page.extend(
                shard
                    .range::<str, _>((from, Unbounded))
                    .take(wanted)
                    .map(|(aor, _)| aor.clone()),
            );
            if page.len() == limit {
                let last = page.last().cloned();
                let next = AorCursor {
                    shard: shard_index,
                    after: last,
                };
                return (page, Some(next));
            }
            shard_index += 1;
            after = None;
        }
        (page, None)
    }

    /// Atomic per AOR: the shard stays locked while `f` runs (`f` is the registrar's
    /// sans-IO rules: no I/O, no waiting).
    fn update(
        &self,
        aor: &str,
        now: SystemTime,
        f: &mut dyn FnMut(Vec<Binding>) -> Option<Vec<Binding>>,
    ) -> Result<Commit, String> {
        self.update_persisting(aor, now, f, &mut no_persist)
            .map(|_| Commit::Done)
    }
}

/// Drops a comment: `#` at the start of the line or after white space.
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    let cut = bytes
        .iter()
        .enumerate()
        .find(|&(i, &b)| b == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()))
        .map_or(line.len(), |(i, _)| i);
    &line[..cut]
}

/// One fixture line: `Ok(None)` for a blank or comment line.
fn parse_fixture_line(
    line: &str,
    number: usize,
    now: SystemTime,
    keys: &dyn AorKeys,
) -> Result<Option<Binding>, String> {
    let mut fields = strip_comment(line).split_whitespace();
    let Some(aor_text) = fields.next() else {
        return Ok(None);
    };
    let aor = Uri::parse(aor_text.as_bytes())
        .ok()
        .and(keys.key_of(aor_text))
        .ok_or_else(|| format!("'{aor_text}' is not a sip: or sips: address-of-record"))?;
    let contact = fields.next().ok_or("missing CONTACT after the AOR")?;
    if Uri::parse(contact.as_bytes()).is_err() {
        return Err(format!("'{contact}' is not a valid URI"));
    }
    let mut q = 1000;
    let mut expires = FIXTURE_DEFAULT_EXPIRES;
    for option in fields {
        match option.split_once('=') {
            Some(("q", v)) => {
                q = parse_qvalue(v.as_bytes())
                    .ok_or_else(|| format!("bad q value '{v}' (0 to 1, 3 decimals)"))?;
            }
            Some(("expires", v)) => {
                expires = v
                    .parse()
                    .map_err(|_| format!("bad expires '{v}' (seconds)"))?;
            }
            _ => {
                return Err(format!(
                    "unknown option '{option}' (expected q=QVALUE or expires=SECONDS)"
                ))
            }
        }
    }
    let expires_at = now
        .checked_add(Duration::from_secs(expires))
        .ok_or_else(|| format!("expires={expires} is too far in the future"))?;
    Ok(Some(Binding::new(
        &aor,
        contact,
        expires_at,
        q,
        format!("fixture-line-{number}"),
        0,
    )))
}

#[cfg(test)]
mod tests;
