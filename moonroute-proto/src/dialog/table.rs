//! One event loop's dialogs (RFC 3261 §12), sans-IO: events in (a managed INVITE, its
//! responses, CANCEL, in-dialog requests, the clock), ended dialogs out as [`Cdr`]s, and
//! deadlines the shell turns into timers ([`DialogTable::next_deadline`],
//! [`DialogTable::on_timer`]). Every call takes an explicit [`Stamp`].
//!
//! A dialog is keyed by Call-ID and the caller's From tag (§12: the dialog ID is Call-ID, local
//! and remote tag; the To tag is learnt from the answer). Early dialogs forked by the INVITE
//! (§12.1, §13.2.2.4: one per To tag in a provisional response) belong to the same entry, so a
//! forked call counts once; the 2xx fixes the To tag. A second 2xx from another fork
//! (§13.2.2.4) is remembered so its ACK and BYE still pass [`DialogTable::known`], but it does
//! not change the call.
//!
//! States: early (INVITE relayed, no final answer), confirmed (2xx), terminated (BYE from either
//! side, a final failure or CANCEL before the answer, max duration, lifetime, `ctl`). A
//! terminated dialog lingers [`Limits::linger`] so the BYE's retransmissions, its
//! authenticated retry and a crossing BYE from the other party still reach it; nothing else
//! does.
//!
//! Timers: a dialog's max duration (`req:dlg_set_timeout`, Kamailio's `dlg_bye` on timeout)
//! ends a confirmed call with BYEs to both parties ([`Expired::byes`]); its lifetime (like
//! Kamailio's `default_timeout`, 12 h) forgets a call whose BYE was lost, without BYEs; an early
//! dialog without any final answer is forgotten after [`Limits::early_lifetime`] (the
//! relay's Timer C normally ends it first with 408).
//!
//! Dialogs are all the messages of one Call-ID, which `server::affinity` hands to one loop, so
//! the table is per loop and lock-free; only profile counts are shared (`profiles`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::cdr::{Cdr, EndReason};
use super::directory::Directory;
use super::metrics::DialogMetrics;
use super::profiles::{JoinError, Membership, Profiles};
use crate::id_map::IdMap;
use crate::sip::Uri;
use crate::transport::{ConnectionId, Destination, TransportKind};

/// The monotonic instant (deadlines) and the wall-clock time (CDRs) of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub at: Instant,
    pub wall: SystemTime,
}

impl Stamp {
    pub fn now() -> Stamp {
        Stamp {
            at: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// The event loop's `now` (taken when its current batch of work began, possibly a few
    /// milliseconds ago under load) with the wall-clock time of that same instant, so a CDR's
    /// times agree with the deadlines: a call cut at its max duration lasts that long in its
    /// CDR, not that less the loop's delay.
    pub fn at(now: Instant) -> Stamp {
        let since = Instant::now().saturating_duration_since(now);
        Stamp {
            at: now,
            wall: SystemTime::now()
                .checked_sub(since)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }

    /// This stamp moved `by` later on both clocks (tests, simulated time).
    pub fn after(self, by: Duration) -> Stamp {
        Stamp {
            at: self.at + by,
            wall: self.wall + by,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Early,
    Confirmed,
    Terminated,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Early => "early",
            State::Confirmed => "confirmed",
            State::Terminated => "terminated",
        }
    }
}

/// The two parties: the caller sent the INVITE, the callee answered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Caller,
    Callee,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Caller => "caller",
            Side::Callee => "callee",
        }
    }
}

/// Table bounds and timers (the `[dialog]` configuration).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most dialogs one loop tracks.
    pub max_dialogs: usize,
    /// Most bytes one loop's dialogs may hold (see [`Dialog::footprint`]).
    pub memory_budget: usize,
    /// Max duration of a confirmed call unless the script sets one; `None`: unlimited.
    pub default_max_duration: Option<Duration>,
    /// A dialog is forgotten this long after it was created, BYE or not.
    pub lifetime: Duration,
    /// An early dialog without a final answer is forgotten after this.
    pub early_lifetime: Duration,
    /// How long a terminated dialog is kept for its BYE's retries (64*T1 by default, the
    /// lifetime of a non-INVITE transaction, §17.1.2.2).
    pub linger: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_dialogs: 100_000,
            memory_budget: 256 << 20,
            default_max_duration: None,
            lifetime: Duration::from_secs(12 * 3600),
            early_lifetime: Duration::from_secs(300),
            linger: Duration::from_secs(32),
        }
    }
}

/// Most To tags of forked early dialogs (and extra 2xx) kept per dialog.
const MAX_FORK_TAGS: usize = 8;
/// Most variables per dialog, and the longest name and value.
pub const MAX_VARS: usize = 32;
pub const MAX_VAR_NAME: usize = 64;
pub const MAX_VAR_VALUE: usize = 1024;
/// Most profiles one dialog joins.
pub const MAX_MEMBERSHIPS: usize = 16;

/// The caller's side of a new dialog, from the INVITE the script manages.
#[derive(Clone, Debug)]
pub struct NewDialog {
    pub call_id: Bytes,
    pub from_uri: Bytes,
    pub from_tag: Bytes,
    pub to_uri: Bytes,
    /// The caller's Contact URI (its target, §12.1.2), as the callee will see it.
    pub caller_contact: Option<Bytes>,
    pub caller_cseq: u32,
    /// Where the INVITE came from (the CDR's caller source; BYEs to the caller go there).
    pub source: SocketAddr,
    pub transport: TransportKind,
    /// The stream connection the INVITE came on (a BYE to the caller goes back on it).
    pub conn: Option<ConnectionId>,
    /// The Request-URI the INVITE arrived with.
    pub request_uri: Bytes,
}

/// Why a dialog was not created, joined, or given a variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `limits.max_dialogs` reached.
    TooMany,
    /// `limits.memory_budget` reached.
    OutOfMemory,
    /// No dialog for this key (ended, or never managed).
    Unknown,
    /// The request has no From tag (§8.1.1.3 requires one): no dialog can be keyed on it.
    NoFromTag,
    /// Too many variables or profiles, or a name or value too long.
    TooLarge,
    /// The profile is at its limit.
    ProfileFull { count: u32 },
}

impl Refusal {
    /// For the log line and the script's error.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TooMany => "dialog table full (dialog.max_dialogs)",
            Refusal::OutOfMemory => "dialog memory budget reached (dialog.memory_mb)",
            Refusal::Unknown => "no such dialog",
            Refusal::NoFromTag => "request without From tag",
            Refusal::TooLarge => "too many or too long dialog variables or profiles",
            Refusal::ProfileFull { .. } => "profile limit reached",
        }
    }
}

impl From<JoinError> for Refusal {
    fn from(e: JoinError) -> Refusal {
        match e {
            JoinError::BadKey => Refusal::TooLarge,
            JoinError::Full { count } => Refusal::ProfileFull { count },
        }
    }
}

/// A dialog's handle in its table; stable for the dialog's life, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DialogId(pub u64);

/// A variable kept for the dialog's life (`dlg.vars`); `acc` ones go into the CDR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Var {
    pub name: Box<str>,
    pub value: Box<str>,
    pub acc: bool,
}

/// One party's dialog state.
#[derive(Clone, Debug, Default)]
pub struct Party {
    /// Its target URI (its Contact, §12.1).
    pub contact: Option<Bytes>,
    /// The highest CSeq it sent in this dialog (a proxy-made BYE to the other party uses the
    /// next one in its name).
    pub cseq: u32,
}

/// What a call holds at the destination it was routed to for as long as it lives (a
/// dispatcher destination's `call_load` count, kept by the shell): dropping it uncounts the
/// call, whatever ended it.
pub trait CountedCall: std::fmt::Debug + Send + 'static {}

impl<T: std::fmt::Debug + Send + 'static> CountedCall for T {}

/// A [`CountedCall`] held by a dialog.
pub type CallCount = Box<dyn CountedCall>;

#[derive(Debug)]
pub struct Dialog {
    pub id: DialogId,
    pub call_id: Bytes,
    pub from_uri: Bytes,
    pub from_tag: Bytes,
    pub to_uri: Bytes,
    /// The answering party's tag, once confirmed.
    pub to_tag: Option<Bytes>,
    /// To tags of forked early dialogs, then of extra 2xx from other forks.
    pub fork_tags: Vec<Bytes>,
    pub state: State,
    pub caller: Party,
    pub callee: Party,
    pub caller_source: SocketAddr,
    pub caller_transport: TransportKind,
    pub caller_conn: Option<ConnectionId>,
    pub request_uri: Bytes,
    /// Where the answered branch was sent (the CDR's callee target).
    pub callee_target: Option<Bytes>,
    /// The transport address the answered branch was sent to: the next hop toward the
    /// callee, where a proxy-made BYE to it goes.
    pub callee_hop: Option<Destination>,
    /// The 2xx's Record-Route values, top first (§12.1.2).
    pub route_set: Vec<Bytes>,
    pub created: Stamp,
    pub answered: Option<Stamp>,
    pub ended: Option<Stamp>,
    /// The INVITE's final status, 0 before it.
    pub status: u16,
    pub cancelled: bool,
    pub end_reason: Option<EndReason>,
    pub max_duration: Option<Duration>,
    pub vars: Vec<Var>,
    pub profiles: Vec<Membership>,
    /// The call counted at the dispatcher destination it was sent to (`call_load`), held
    /// until the dialog terminates ([`DialogTable::count_dispatched`]).
    pub dispatched: Option<CallCount>,
}

impl Dialog {
    /// Heap and inline bytes this dialog holds: what the memory budget counts. Besides the
    /// dialog's own fields: its slot in the table (counted twice: a hash map keeps up to as
    /// much room spare), its `ctl dlg` summary (`directory`, counted as the same strings
    /// again, although its entry now shares the dialog's), its index entry and timer entries.
    pub fn footprint(&self) -> usize {
        let bytes = |b: &Bytes| b.len();
        let opt = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
        const TIMER_AND_INDEX_ENTRIES: usize = 6 * 32;
        2 * std::mem::size_of::<Dialog>()
            + std::mem::size_of::<super::directory::Summary>()
            + TIMER_AND_INDEX_ENTRIES
            + bytes(&self.call_id)
            + bytes(&self.from_uri)
            + bytes(&self.from_tag)
            + bytes(&self.to_uri)
            + opt(&self.to_tag)
            + opt(&self.callee.contact)
            + 64
            + bytes(&self.call_id)
            + bytes(&self.from_uri)
            + bytes(&self.from_tag)
            + bytes(&self.to_uri)
            + opt(&self.to_tag)
            + self.fork_tags.iter().map(bytes).sum::<usize>()
            + opt(&self.caller.contact)
            + opt(&self.callee.contact)
            + bytes(&self.request_uri)
            + opt(&self.callee_target)
            + self.route_set.iter().map(bytes).sum::<usize>()
            + self
                .vars
                .iter()
                .map(|v| std::mem::size_of::<Var>() + v.name.len() + v.value.len())
                .sum::<usize>()
            + self
                .profiles
                .iter()
                .map(Membership::footprint)
                .sum::<usize>()
    }

    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|v| &*v.name == name)
            .map(|v| &*v.value)
    }

    /// Seconds from answer to end (0 for an unanswered call).
    pub fn duration(&self) -> Duration {
        match (self.answered, self.ended) {
            (Some(a), Some(e)) => e.wall.duration_since(a.wall).unwrap_or_default(),
            _ => Duration::ZERO,
        }
    }

    /// When this dialog next needs the clock.
    fn deadline(&self, limits: &Limits) -> Instant {
        let lifetime = self.created.at + limits.lifetime;
        match self.state {
            State::Early => lifetime.min(self.created.at + limits.early_lifetime),
            State::Confirmed => match (self.max_duration, self.answered) {
                (Some(max), Some(answered)) => lifetime.min(answered.at + max),
                _ => lifetime,
            },
            State::Terminated => self.ended.map_or(lifetime, |e| e.at + limits.linger),
        }
    }

    fn side_of(&self, from_tag: &[u8], to_tag: Option<&[u8]>) -> Option<Side> {
        let ours = |tag: &[u8]| {
            self.to_tag.as_deref() == Some(tag) || self.fork_tags.iter().any(|t| t == tag)
        };
        if from_tag == self.from_tag && to_tag.is_some_and(ours) {
            Some(Side::Caller)
        } else if to_tag == Some(&self.from_tag[..]) && ours(from_tag) {
            Some(Side::Callee)
        } else {
            None
        }
    }

    /// Whether `from_tag` is the answering fork's (not a secondary 2xx's).
    fn is_main_leg(&self, side: Side, from_tag: &[u8], to_tag: &[u8]) -> bool {
        let callee_tag = match side {
            Side::Caller => to_tag,
            Side::Callee => from_tag,
        };
        self.to_tag.as_deref() == Some(callee_tag)
    }

    /// Returns the bytes its profile memberships held.
    fn terminate(&mut self, reason: EndReason, now: Stamp) -> usize {
        self.state = State::Terminated;
        self.end_reason = Some(reason);
        self.ended = Some(now);
        // Profiles and the dispatcher count live calls: leave them now, not when the entry
        // is dropped after its linger.
        let freed = self.profiles.iter().map(Membership::footprint).sum();
        self.profiles.clear();
        self.dispatched = None;
        freed
    }

    fn push_fork_tag(&mut self, tag: &[u8]) {
        if self.fork_tags.len() < MAX_FORK_TAGS && !self.fork_tags.iter().any(|t| t == tag) {
            self.fork_tags.push(Bytes::copy_from_slice(tag));
        }
    }
}

/// What [`DialogTable::known`] found for an in-dialog request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    /// It belongs to a live dialog and goes to the other party's target; `Side` sent it.
    Yes(Side),
    /// A BYE for a dialog that ended less than `linger` ago (a retry or a crossing BYE).
    EndedBye(Side),
    /// Its tags match a dialog, but its Request-URI is not the other party's target.
    WrongTarget,
    /// The dialog ended (other than a lingering BYE), or its route set says this server
    /// tracked it and it is gone.
    Ended,
    /// A dialog is tracked for this Call-ID and one of the tags, but the other tag is not
    /// its party's: not a request of the dialog.
    Unknown,
    /// No dialog is tracked with this Call-ID and either tag: one this proxy did not manage
    /// (or managed before it restarted). A call that ended more than [`Limits::linger`] ago
    /// is gone from the table too; its signed Route tells it apart (`proxy::route_sign`,
    /// "Tracked calls"), and `req:dlg_known()` says `ended` for it.
    Untracked,
}

impl Known {
    /// What `req:dlg_known()` answers.
    pub fn admits(self) -> bool {
        matches!(self, Known::Yes(_) | Known::EndedBye(_))
    }

    /// Why it does not admit, for `req:dlg_known()`'s second value.
    pub fn as_str(self) -> &'static str {
        match self {
            Known::Yes(_) => "confirmed",
            Known::EndedBye(_) => "ending",
            Known::WrongTarget => "wrong_target",
            Known::Ended => "ended",
            Known::Unknown => "unknown",
            Known::Untracked => "untracked",
        }
    }
}

/// The BYE the proxy sends one party to end a call (max duration, `ctl dlg end`), in the name
/// of the other party (§15.1.1; Kamailio's `dlg_bye`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bye {
    pub to_side: Side,
    pub call_id: Bytes,
    /// The receiving party's target.
    pub request_uri: Option<Bytes>,
    /// From: the other party (URI and tag); To: the receiving party.
    pub from_uri: Bytes,
    pub from_tag: Bytes,
    pub to_uri: Bytes,
    pub to_tag: Bytes,
    /// The other party's last CSeq plus one.
    pub cseq: u32,
    /// The dialog's full route set (top first, ours among them): the sender keeps the part on
    /// the receiving party's side of this proxy.
    pub route_set: Vec<Bytes>,
    /// Where to send it: for the caller, where its INVITE came from (on the same connection
    /// for streams: reaches it behind a NAT); for the callee, where the answered branch went.
    /// `None` when that is unknown (the BYE is not sent).
    pub destination: Option<Destination>,
}

/// A dialog ended by the clock.
#[derive(Debug)]
pub struct Expired {
    pub cdr: Cdr,
    /// For a max-duration cut: the BYEs to the caller and to the callee.
    pub byes: Vec<Bye>,
}

/// Counts since start, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub created: u64,
    pub refused: u64,
    pub ended: [u64; EndReason::COUNT],
}

/// One event loop's dialogs (see the module doc).
pub struct DialogTable {
    limits: Limits,
    profiles: Arc<Profiles>,
    dialogs: IdMap<DialogId, Dialog>,
    /// Call-ID → its dialogs (one, but for a caller reusing a Call-ID with another From tag).
    index: HashMap<Bytes, Vec<DialogId>>,
    /// Deadlines, possibly stale: an entry counts only if the dialog still has that deadline.
    timers: BinaryHeap<Reverse<(Instant, DialogId)>>,
    next_id: u64,
    memory: usize,
    counters: Counters,
    /// CDRs of dialogs ended where no caller takes them (see [`DialogTable::defer`]).
    deferred: Vec<Cdr>,
    /// Shared by every loop's table.
    metrics: Arc<DialogMetrics>,
    /// Where `ctl dlg` reads this loop's calls, and the loop's index there.
    directory: Option<(Arc<Directory>, usize)>,
}

impl Drop for DialogTable {
    /// A loop stopping takes its calls out of the shared gauges (its profile memberships
    /// leave by themselves).
    fn drop(&mut self) {
        self.metrics.memory.add(-(self.memory as f64));
        if let Some((directory, loop_index)) = &self.directory {
            for id in self.dialogs.keys() {
                directory.remove(*loop_index, *id);
            }
        }
        for dialog in self.dialogs.values() {
            match dialog.state {
                State::Early => self.metrics.early.add(-1.0),
                State::Confirmed => self.metrics.confirmed.add(-1.0),
                State::Terminated => {}
            }
        }
    }
}

impl DialogTable {
    pub fn new(limits: Limits, profiles: Arc<Profiles>) -> DialogTable {
        DialogTable {
            limits,
            profiles,
            dialogs: IdMap::default(),
            index: HashMap::new(),
            timers: BinaryHeap::new(),
            next_id: 1,
            memory: 0,
            counters: Counters::default(),
            deferred: Vec::new(),
            metrics: DialogMetrics::detached(),
            directory: None,
        }
    }

    /// Publishes this loop's calls (index `loop_index`) in `directory` for `ctl dlg`.
    pub fn with_directory(mut self, directory: Arc<Directory>, loop_index: usize) -> DialogTable {
        self.directory = Some((directory, loop_index));
        self
    }

    fn publish(&self, id: DialogId) {
        if let (Some((directory, loop_index)), Some(dialog)) =
            (&self.directory, self.dialogs.get(&id))
        {
            directory.publish(*loop_index, dialog);
        }
    }

    /// `ctl dlg end` requests for this loop's calls (see `directory`).
    pub fn take_end_requests(&self) -> Vec<super::directory::EndRequest> {
        match &self.directory {
            Some((directory, loop_index)) => directory.take_end_requests(*loop_index),
            None => Vec::new(),
        }
    }

    /// Counts into `metrics` (the server's, see `dialog::metrics`).
    pub fn with_metrics(mut self, metrics: Arc<DialogMetrics>) -> DialogTable {
        self.metrics = metrics;
        self
    }

    /// Keeps `cdr` for the shell to take with [`DialogTable::take_deferred`] (a call ended
    /// by the script, which has no sink).
    pub fn defer(&mut self, cdr: Cdr) {
        self.deferred.push(cdr);
    }

    pub fn take_deferred(&mut self) -> Vec<Cdr> {
        std::mem::take(&mut self.deferred)
    }

    /// Forgets an early dialog whose INVITE was not relayed and not answered by us (dropped,
    /// forwarded statelessly): no call was attempted, so no CDR.
    pub fn abandon(&mut self, id: DialogId) {
        if self
            .dialogs
            .get(&id)
            .is_some_and(|d| d.state == State::Early)
        {
            self.remove(id);
        }
    }

    pub fn profiles(&self) -> &Arc<Profiles> {
        &self.profiles
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Bytes the live dialogs hold.
    pub fn memory(&self) -> usize {
        self.memory
    }

    /// Dialogs in `state`.
    pub fn count(&self, state: State) -> usize {
        self.dialogs.values().filter(|d| d.state == state).count()
    }

    pub fn len(&self) -> usize {
        self.dialogs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dialogs.is_empty()
    }

    pub fn get(&self, id: DialogId) -> Option<&Dialog> {
        self.dialogs.get(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Dialog> {
        self.dialogs.values()
    }

    /// The dialog of an initial INVITE, by its Call-ID and From tag.
    pub fn find(&self, call_id: &[u8], from_tag: &[u8]) -> Option<DialogId> {
        self.by_call_id(call_id)
            .find(|d| d.from_tag == from_tag)
            .map(|d| d.id)
    }

    /// The dialogs of `call_id` (for `ctl dlg show|end`).
    pub fn by_call_id<'a>(&'a self, call_id: &[u8]) -> impl Iterator<Item = &'a Dialog> + 'a {
        self.index
            .get(call_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.dialogs.get(id))
    }

    /// Tracks the dialog of an initial INVITE (`req:dlg_manage()`). Managing the same INVITE
    /// again (a second call in the script, a retransmission routed again) gives the same
    /// dialog; a new INVITE with the key of a terminated one (a retry after a 401) replaces it.
    pub fn manage(&mut self, new: NewDialog, now: Stamp) -> Result<DialogId, Refusal> {
        if new.from_tag.is_empty() {
            return Err(Refusal::NoFromTag);
        }
        if let Some(id) = self.find(&new.call_id, &new.from_tag) {
            if self.dialogs[&id].state != State::Terminated {
                return Ok(id);
            }
            self.remove(id);
        }
        let id = DialogId(self.next_id);
        let dialog = Dialog {
            id,
            call_id: new.call_id,
            from_uri: new.from_uri,
            from_tag: new.from_tag,
            to_uri: new.to_uri,
            to_tag: None,
            fork_tags: Vec::new(),
            state: State::Early,
            caller: Party {
                contact: new.caller_contact,
                cseq: new.caller_cseq,
            },
            callee: Party::default(),
            caller_source: new.source,
            caller_transport: new.transport,
            caller_conn: new.conn,
            request_uri: new.request_uri,
            callee_target: None,
            callee_hop: None,
            route_set: Vec::new(),
            created: now,
            answered: None,
            ended: None,
            status: 0,
            cancelled: false,
            end_reason: None,
            max_duration: self.limits.default_max_duration,
            vars: Vec::new(),
            profiles: Vec::new(),
            dispatched: None,
        };
        let size = dialog.footprint();
        if self.dialogs.len() >= self.limits.max_dialogs {
            self.counters.refused += 1;
            self.metrics.refused.inc();
            return Err(Refusal::TooMany);
        }
        if self.memory + size > self.limits.memory_budget {
            self.counters.refused += 1;
            self.metrics.refused.inc();
            return Err(Refusal::OutOfMemory);
        }
        self.next_id += 1;
        account(&mut self.memory, &self.metrics, |held| held + size);
        self.counters.created += 1;
        self.metrics.created.inc();
        self.metrics.early.add(1.0);
        self.timers
            .push(Reverse((dialog.deadline(&self.limits), id)));
        self.index
            .entry(dialog.call_id.clone())
            .or_default()
            .push(id);
        self.dialogs.insert(id, dialog);
        self.publish(id);
        Ok(id)
    }

    /// Sets a variable (`dlg.vars[name] = value`); `acc` puts it in the CDR.
    pub fn set_var(
        &mut self,
        id: DialogId,
        name: &str,
        value: &str,
        acc: bool,
    ) -> Result<(), Refusal> {
        if name.is_empty() || name.len() > MAX_VAR_NAME || value.len() > MAX_VAR_VALUE {
            return Err(Refusal::TooLarge);
        }
        let dialog = self.dialogs.get_mut(&id).ok_or(Refusal::Unknown)?;
        let existing = dialog.vars.iter().position(|v| &*v.name == name);
        let (grows, shrinks) = match existing {
            Some(i) => (value.len(), dialog.vars[i].value.len()),
            None if dialog.vars.len() >= MAX_VARS => return Err(Refusal::TooLarge),
            None => (std::mem::size_of::<Var>() + name.len() + value.len(), 0),
        };
        if self.memory + grows > self.limits.memory_budget + shrinks {
            self.counters.refused += 1;
            return Err(Refusal::OutOfMemory);
        }
        match existing {
            Some(i) => {
                let var = &mut dialog.vars[i];
                var.value = value.into();
                var.acc |= acc;
            }
            None => dialog.vars.push(Var {
                name: name.into(),
                value: value.into(),
                acc,
            }),
        }
        account(&mut self.memory, &self.metrics, |held| {
            (held + grows).saturating_sub(shrinks)
        });
        Ok(())
    }

    /// Adds the dialog to profile `name` with `value`, refused when the profile already
    /// counts `limit` live dialogs for it (see `profiles`). Joining twice is a no-op.
    pub fn join_profile(
        &mut self,
        id: DialogId,
        name: &str,
        value: &str,
        limit: Option<u32>,
    ) -> Result<(), Refusal> {
        let dialog = self.dialogs.get_mut(&id).ok_or(Refusal::Unknown)?;
        if dialog.state == State::Terminated {
            return Err(Refusal::Unknown);
        }
        if dialog
            .profiles
            .iter()
            .any(|m| m.name() == name && m.value() == value)
        {
            return Ok(());
        }
        if dialog.profiles.len() >= MAX_MEMBERSHIPS {
            return Err(Refusal::TooLarge);
        }
        let membership = self.profiles.join(name, value, limit)?;
        account(&mut self.memory, &self.metrics, |held| {
            held + membership.footprint()
        });
        dialog.profiles.push(membership);
        Ok(())
    }

    /// The call now counts at a dispatcher destination (`call_load`) for the dialog's life:
    /// `slot` is dropped when the dialog terminates (BYE, failure, CANCEL, timeout, `ctl`),
    /// replacing the one it held (a failover to the next destination). A terminated or
    /// unknown dialog gives the slot back.
    pub fn count_dispatched<T: CountedCall>(&mut self, id: DialogId, slot: T) -> Result<(), T> {
        match self.dialogs.get_mut(&id) {
            Some(dialog) if dialog.state != State::Terminated => {
                dialog.dispatched = Some(Box::new(slot));
                Ok(())
            }
            _ => Err(slot),
        }
    }

    /// The call no longer counts at its dispatcher destination (it failed there).
    pub fn release_dispatched(&mut self, id: DialogId) {
        if let Some(dialog) = self.dialogs.get_mut(&id) {
            dialog.dispatched = None;
        }
    }

    /// Sets the max duration (`req:dlg_set_timeout`), counted from the answer; for a call
    /// already answered, `max` from `now` (as Kamailio's `dlg_set_timeout` on a confirmed
    /// dialog). Zero removes it.
    pub fn set_max_duration(
        &mut self,
        id: DialogId,
        max: Duration,
        now: Instant,
    ) -> Result<(), Refusal> {
        let dialog = self.dialogs.get_mut(&id).ok_or(Refusal::Unknown)?;
        if dialog.state == State::Terminated {
            return Err(Refusal::Unknown);
        }
        let since_answer = dialog
            .answered
            .map_or(Duration::ZERO, |a| now.saturating_duration_since(a.at));
        dialog.max_duration = (!max.is_zero()).then(|| since_answer + max);
        let deadline = dialog.deadline(&self.limits);
        self.timers.push(Reverse((deadline, id)));
        Ok(())
    }

    /// The answered branch of an early dialog was sent to `hop` (a 2xx came back through it).
    pub fn set_callee_hop(&mut self, id: DialogId, hop: Destination) {
        if let Some(dialog) = self.dialogs.get_mut(&id) {
            if dialog.state == State::Early {
                dialog.callee_hop = Some(hop);
            }
        }
    }

    /// The caller's target as the relayed INVITE carried it (after the script's edits, such
    /// as `fix_nated_contact`): the Contact the callee's requests will be addressed to.
    pub fn set_caller_contact(&mut self, id: DialogId, contact: Option<Bytes>) {
        if let (Some(dialog), Some(contact)) = (self.dialogs.get_mut(&id), contact) {
            let before = dialog.footprint();
            dialog.caller.contact = Some(contact);
            account(&mut self.memory, &self.metrics, |held| {
                (held + dialog.footprint()).saturating_sub(before)
            });
        }
    }

    /// A target refresh (§12.2: a re-INVITE or UPDATE, or its 2xx) from `side` of the dialog
    /// of these tags carried `contact`: its requests now go there.
    pub fn refresh_target(
        &mut self,
        call_id: &[u8],
        from_tag: &[u8],
        to_tag: &[u8],
        sender_is_requester: bool,
        contact: Bytes,
    ) {
        let Some((dialog, side)) = self.leg(call_id, from_tag, to_tag) else {
            return;
        };
        if !dialog.is_main_leg(side, from_tag, to_tag) || dialog.state != State::Confirmed {
            return;
        }
        let id = dialog.id;
        let Some(dialog) = self.dialogs.get_mut(&id) else {
            return;
        };
        let before = dialog.footprint();
        let refreshed = match (side, sender_is_requester) {
            (Side::Caller, true) | (Side::Callee, false) => &mut dialog.caller,
            (Side::Callee, true) | (Side::Caller, false) => &mut dialog.callee,
        };
        refreshed.contact = Some(contact);
        account(&mut self.memory, &self.metrics, |held| {
            (held + dialog.footprint()).saturating_sub(before)
        });
    }

    /// A CANCEL for the INVITE was relayed: its final response ends the call as cancelled.
    pub fn on_cancel(&mut self, id: DialogId) {
        if let Some(dialog) = self.dialogs.get_mut(&id) {
            if dialog.state == State::Early {
                dialog.cancelled = true;
            }
        }
    }

    /// A response to the managed INVITE is relayed upstream (or, for a 2xx, any branch's
    /// 2xx). `contact` and `record_route` are the response's; `target` the branch's
    /// Request-URI. Returns the CDR of a call that failed.
    #[allow(clippy::too_many_arguments)]
    pub fn on_invite_response(
        &mut self,
        id: DialogId,
        status: u16,
        to_tag: Option<&[u8]>,
        contact: Option<Bytes>,
        record_route: Vec<Bytes>,
        target: Option<Bytes>,
        now: Stamp,
    ) -> Option<Cdr> {
        let dialog = self.dialogs.get_mut(&id)?;
        let before = dialog.footprint();
        let mut ended = false;
        let mut answered = false;
        match (dialog.state, status) {
            (State::Early, 101..=199) => {
                if let Some(tag) = to_tag {
                    dialog.push_fork_tag(tag);
                }
            }
            (State::Early, 200..=299) => {
                let Some(tag) = to_tag else {
                    // §12.1.1 requires the tag; without it no request can reach this dialog.
                    return None;
                };
                dialog.state = State::Confirmed;
                self.metrics.early.add(-1.0);
                self.metrics.confirmed.add(1.0);
                answered = true;
                dialog.to_tag = Some(Bytes::copy_from_slice(tag));
                dialog.fork_tags.retain(|t| t != tag);
                dialog.callee.contact = contact;
                dialog.route_set = record_route;
                dialog.callee_target = target;
                dialog.answered = Some(now);
                dialog.status = status;
                self.timers
                    .push(Reverse((dialog.deadline(&self.limits), id)));
            }
            (State::Confirmed, 200..=299) => {
                if let Some(tag) = to_tag.filter(|t| dialog.to_tag.as_deref() != Some(*t)) {
                    dialog.push_fork_tag(tag);
                }
            }
            (State::Early, 300..=699) => {
                dialog.status = status;
                let reason = if dialog.cancelled {
                    EndReason::Cancelled
                } else {
                    EndReason::Failed
                };
                // Counted by the footprint difference below.
                dialog.terminate(reason, now);
                ended = true;
            }
            _ => {}
        }
        let after = dialog.footprint();
        account(&mut self.memory, &self.metrics, |held| {
            (held + after).saturating_sub(before)
        });
        if answered {
            self.publish(id);
        }
        if ended {
            Some(self.ended(id))
        } else {
            None
        }
    }

    /// Whether an in-dialog request (with `from_tag` and `to_tag`) belongs to a tracked
    /// dialog and goes to the other party's target (`req:dlg_known()`). A captured Route
    /// replayed by a stranger fails here: it cannot name a party's target with the dialog's
    /// tags unless it is the dialog.
    pub fn known(
        &self,
        call_id: &[u8],
        from_tag: &[u8],
        to_tag: &[u8],
        is_bye: bool,
        request_uri: &[u8],
    ) -> Known {
        let Some((dialog, side)) = self.leg(call_id, from_tag, to_tag) else {
            return match self.index.contains_key(call_id) {
                true => Known::Unknown,
                false => Known::Untracked,
            };
        };
        let target = match side {
            Side::Caller => dialog
                .callee
                .contact
                .as_ref()
                .filter(|_| dialog.is_main_leg(side, from_tag, to_tag)),
            Side::Callee => dialog.caller.contact.as_ref(),
        };
        // A secondary fork's requests go to that fork's Contact, which is not kept: the tags
        // match, and the route set was ours, which is all that is checked for it.
        let target_ok = match target {
            Some(target) => same_target(target, request_uri),
            None => side == Side::Caller && !dialog.is_main_leg(side, from_tag, to_tag),
        };
        match dialog.state {
            State::Terminated if is_bye && target_ok => Known::EndedBye(side),
            State::Terminated => Known::Ended,
            _ if !target_ok => Known::WrongTarget,
            _ => Known::Yes(side),
        }
    }

    /// An in-dialog request was relayed: its CSeq is remembered (for proxy-made BYEs), a BYE
    /// on the answered leg ends the call. Returns its CDR.
    pub fn on_request(
        &mut self,
        call_id: &[u8],
        from_tag: &[u8],
        to_tag: &[u8],
        is_bye: bool,
        cseq: u32,
        now: Stamp,
    ) -> Option<Cdr> {
        let (dialog, side) = self.leg(call_id, from_tag, to_tag)?;
        let main = dialog.is_main_leg(side, from_tag, to_tag);
        let id = dialog.id;
        let dialog = self.dialogs.get_mut(&id)?;
        if !main || dialog.state != State::Confirmed {
            return None;
        }
        let party = match side {
            Side::Caller => &mut dialog.caller,
            Side::Callee => &mut dialog.callee,
        };
        party.cseq = party.cseq.max(cseq);
        if !is_bye {
            return None;
        }
        let freed = dialog.terminate(EndReason::Bye(side), now);
        account(&mut self.memory, &self.metrics, |held| {
            held.saturating_sub(freed)
        });
        self.timers
            .push(Reverse((dialog.deadline(&self.limits), id)));
        Some(self.ended(id))
    }

    /// Ends a call from outside (`ctl dlg end`): a confirmed one with BYEs to both parties.
    /// An early one is only forgotten (CANCEL is the caller's to send).
    pub fn end(&mut self, id: DialogId, now: Stamp) -> Option<Expired> {
        let dialog = self.dialogs.get_mut(&id)?;
        let byes = match dialog.state {
            State::Terminated => return None,
            State::Confirmed => byes_of(dialog),
            State::Early => Vec::new(),
        };
        let freed = dialog.terminate(EndReason::Control, now);
        account(&mut self.memory, &self.metrics, |held| {
            held.saturating_sub(freed)
        });
        self.timers
            .push(Reverse((dialog.deadline(&self.limits), id)));
        Some(Expired {
            cdr: self.ended(id),
            byes,
        })
    }

    /// When [`DialogTable::on_timer`] next has work.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            match self.dialogs.get(&id) {
                Some(d) if d.deadline(&self.limits) == at => return Some(at),
                _ => {
                    self.timers.pop();
                }
            }
        }
        None
    }

    /// Runs the deadlines due at `now`: max-duration cuts (with BYEs), lifetimes, early
    /// dialogs without an answer, and the end of a terminated dialog's linger.
    pub fn on_timer(&mut self, now: Stamp) -> Vec<Expired> {
        let mut expired = Vec::new();
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now.at {
                break;
            }
            self.timers.pop();
            let Some(dialog) = self.dialogs.get_mut(&id) else {
                continue;
            };
            if dialog.deadline(&self.limits) != at {
                continue;
            }
            let lifetime_over = now.at >= dialog.created.at + self.limits.lifetime;
            let (reason, byes) = match dialog.state {
                State::Terminated => {
                    self.remove(id);
                    continue;
                }
                State::Early if !lifetime_over => {
                    dialog.status = 408;
                    (EndReason::Timeout, Vec::new())
                }
                State::Confirmed if !lifetime_over => (EndReason::MaxDuration, byes_of(dialog)),
                _ => (EndReason::Timeout, Vec::new()),
            };
            let freed = dialog.terminate(reason, now);
            account(&mut self.memory, &self.metrics, |held| {
                held.saturating_sub(freed)
            });
            self.timers
                .push(Reverse((dialog.deadline(&self.limits), id)));
            expired.push(Expired {
                cdr: self.ended(id),
                byes,
            });
        }
        crate::memory::shrink_heap_if_sparse(&mut self.timers);
        expired
    }

    /// The dialog and the sending side of an in-dialog request: the caller's requests carry
    /// its tag in From, the callee's in To (§12.2.1.1).
    fn leg(&self, call_id: &[u8], from_tag: &[u8], to_tag: &[u8]) -> Option<(&Dialog, Side)> {
        // One lookup of the Call-ID (SipHash: a peer chooses it) for both tags.
        let ids = self.index.get(call_id)?;
        [from_tag, to_tag].into_iter().find_map(|caller_tag| {
            let dialog = ids
                .iter()
                .filter_map(|id| self.dialogs.get(id))
                .find(|d| d.from_tag == caller_tag)?;
            dialog
                .side_of(from_tag, Some(to_tag))
                .map(|side| (dialog, side))
        })
    }

    fn ended(&mut self, id: DialogId) -> Cdr {
        self.publish(id);
        let dialog = &self.dialogs[&id];
        let reason = dialog.end_reason.unwrap_or(EndReason::Timeout);
        self.counters.ended[reason.index()] += 1;
        self.metrics.ended[reason.index()].inc();
        // Confirmed is the state with an answer: what the dialog was until now.
        match dialog.answered {
            Some(_) => self.metrics.confirmed.add(-1.0),
            None => self.metrics.early.add(-1.0),
        }
        Cdr::of(dialog)
    }

    fn remove(&mut self, id: DialogId) {
        if let Some(dialog) = self.dialogs.remove(&id) {
            if let Some((directory, loop_index)) = &self.directory {
                directory.remove(*loop_index, id);
            }
            account(&mut self.memory, &self.metrics, |held| {
                held.saturating_sub(dialog.footprint())
            });
            if let Some(ids) = self.index.get_mut(&dialog.call_id) {
                ids.retain(|other| *other != id);
                if ids.is_empty() {
                    self.index.remove(&dialog.call_id);
                }
            }
            crate::memory::shrink_if_sparse(&mut self.dialogs);
            crate::memory::shrink_if_sparse(&mut self.index);
        }
    }
}

/// Sets a table's bytes held to `change(held)`, and the shared gauge by the difference.
fn account(held: &mut usize, metrics: &DialogMetrics, change: impl FnOnce(usize) -> usize) {
    let now = change(*held);
    metrics.memory.add(now as f64 - *held as f64);
    *held = now;
}

/// The BYEs that end a confirmed call: to the callee in the caller's name, to the caller in
/// the callee's.
fn byes_of(dialog: &Dialog) -> Vec<Bye> {
    let callee_tag = dialog.to_tag.clone().unwrap_or_default();
    vec![
        Bye {
            to_side: Side::Caller,
            call_id: dialog.call_id.clone(),
            request_uri: dialog.caller.contact.clone(),
            from_uri: dialog.to_uri.clone(),
            from_tag: callee_tag.clone(),
            to_uri: dialog.from_uri.clone(),
            to_tag: dialog.from_tag.clone(),
            cseq: dialog.callee.cseq.saturating_add(1),
            route_set: dialog.route_set.clone(),
            destination: Some(Destination {
                kind: dialog.caller_transport,
                addr: dialog.caller_source,
                conn: dialog.caller_conn,
                local: None,
                tls_name: None,
                reuse_only: dialog.caller_transport.is_stream(),
            }),
        },
        Bye {
            to_side: Side::Callee,
            call_id: dialog.call_id.clone(),
            request_uri: dialog.callee.contact.clone(),
            from_uri: dialog.from_uri.clone(),
            from_tag: dialog.from_tag.clone(),
            to_uri: dialog.to_uri.clone(),
            to_tag: callee_tag,
            cseq: dialog.caller.cseq.saturating_add(1),
            route_set: dialog.route_set.clone(),
            destination: dialog.callee_hop.clone(),
        },
    ]
}

/// Where a SIP URI sends its requests: its `maddr`, else its host (§19.1.1).
fn host_of<'a>(uri: &crate::sip::SipUri<'a>) -> crate::sip::Host<'a> {
    uri.maddr()
        .and_then(|m| crate::sip::Host::parse(m).ok())
        .unwrap_or(uri.host)
}

/// Whether `request_uri` reaches the party whose target is `target`: same host (or `maddr`)
/// and port, as the signed Record-Route binds it (`proxy::route_sign`), so a target refresh
/// that changes only the user part or parameters keeps working. Non-SIP URIs compare whole.
fn same_target(target: &[u8], request_uri: &[u8]) -> bool {
    // The usual case, an in-dialog request sent to the Contact as it was given: one parse
    // (the URI must still be one) instead of two and the comparison.
    if target == request_uri {
        return Uri::parse(target).is_ok();
    }
    let (Ok(a), Ok(b)) = (Uri::parse(target), Uri::parse(request_uri)) else {
        return false;
    };
    let (Some(a), Some(b)) = (a.as_sip(), b.as_sip()) else {
        return target.eq_ignore_ascii_case(request_uri);
    };
    let default_port = |u: &crate::sip::SipUri<'_>| if u.secure { 5061 } else { 5060 };
    host_of(a).eq_host(&host_of(b))
        && a.port.unwrap_or(default_port(a)) == b.port.unwrap_or(default_port(b))
}

#[cfg(test)]
mod same_target_tests {
    use super::same_target;

    #[test]
    fn the_contact_itself_or_its_host_and_port_is_the_target() {
        let contact = b"sip:bob@192.0.2.5:5080;transport=udp";
        assert!(same_target(contact, contact));
        assert!(same_target(contact, b"sip:other@192.0.2.5:5080"));
        assert!(!same_target(contact, b"sip:bob@192.0.2.6:5080"));
        assert!(same_target(b"tel:+15551234", b"tel:+15551234"));
        assert!(
            !same_target(b"sip:bob@", b"sip:bob@"),
            "identical text that is no URI is no target"
        );
    }
}
