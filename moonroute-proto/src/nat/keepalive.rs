//! Keep-alives for bindings registered through a NAT: the sans-IO scheduler (explicit `now`).
//!
//! A NAT forgets a UDP mapping after tens of seconds without traffic, and a phone that went
//! away leaves a binding that swallows calls until it expires. So every NATed binding gets a
//! probe each interval, to the address its REGISTER came from:
//! - UDP: an out-of-dialog OPTIONS (RFC 3261 §11) with `Max-Forwards: 70` and a Via branch of
//!   its own, recognisable by its prefix (`proxy::via_branch::KEEPALIVE_PREFIX`). Any response, even 4xx/5xx, proves the phone
//!   and the NAT mapping alive (Kamailio's nathelper `sipping`). No answer by its next probe
//!   is a failure.
//! - TCP/TLS: a CRLFCRLF ping on the connection the REGISTER came on (RFC 5626 §4.4.1; the
//!   phone need not answer it, the write keeps the NAT and the connection open). A connection
//!   that is gone (the write is reported unreachable) is a failure: no new one is opened.
//!
//! After [`Settings::max_failures`] consecutive failures the binding is reported with
//! [`Action::Remove`]; an answer resets the count.
//!
//! Rounds are spread over the interval, so that a store of 100k NATed bindings neither
//! stalls the event loop for a whole round nor sends 100k probes in one burst (overflowing
//! socket buffers, losing probes, then removing live bindings). A *pass* walks the store's
//! AORs in slices ([`LocationStore::aors_page`]) of [`Settings::batch`] AORs per *tick*; a
//! pass starts every interval and its ticks are spaced `interval / ceil(bindings / batch)`
//! apart (the store's binding count at the start of the pass), so every binding is probed
//! about once per interval, at about the same place of each pass, and a tick reads at most
//! `batch` AORs and probes their NATed bindings. A binding's probe is judged when the next
//! pass reaches it, one interval later. A binding seen in one pass and not in the next has
//! left the store (or stopped being NATed): it is forgotten, never reported. If the store
//! grows during a pass, the pass runs over its interval at the same pace and the next pass
//! starts when it ends.
//!
//! The caller owns the I/O: it calls [`Scheduler::on_tick`] when [`Scheduler::next_deadline`]
//! is due, sends what the actions say, feeds answers back ([`Scheduler::on_response`]) and
//! transport failures ([`Scheduler::on_unreachable`]), and removes the reported bindings
//! from the store ([`remove_binding`]). The scheduler reads the store's memory index itself
//! (no I/O, no clock: time is the `now` given).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use crate::location::{AorCursor, LocationStore, StoreError};
use crate::proxy::identity::{SentBy, SERVER};
use crate::transport::TransportKind;

/// A binding to keep alive, as the location store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub aor: String,
    pub contact: String,
    /// The transport and source address its REGISTER came from.
    pub kind: TransportKind,
    pub addr: SocketAddr,
    /// Our socket the REGISTER arrived on (the NAT's mapping is towards it).
    pub local: Option<SocketAddr>,
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send [`options_request`] with branch [`branch`]`(loop, seq)` to the peer over UDP.
    SendOptions { peer: Peer, seq: u64 },
    /// Write CRLFCRLF on the open connection to the peer (never open one).
    SendPing { peer: Peer },
    /// The binding failed `failures` keep-alives in a row: remove it from the store.
    Remove { peer: Peer, failures: u32 },
}

/// How keep-alives are paced (`[nat]` `keepalive_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Each NATed binding is probed once per interval.
    pub interval: Duration,
    /// Failed probes in a row after which a binding is removed (at least 1).
    pub max_failures: u32,
    /// AORs read from the store per tick (at least 1); their NATed bindings are probed.
    pub batch: usize,
}

#[derive(Debug)]
struct State {
    peer: Peer,
    /// Consecutive failed probes.
    failures: u32,
    /// The OPTIONS last sent, while unanswered.
    outstanding: Option<u64>,
    /// The transport reported the peer unreachable since the last probe.
    unreachable: bool,
    /// The pass that last probed it.
    pass: u64,
}

/// A pass under way: where the walk over the store stands and when it goes on.
#[derive(Debug)]
struct Pass {
    started: Instant,
    cursor: AorCursor,
    next_tick: Instant,
    tick: Duration,
}

type Key = (String, String);

/// The keep-alive schedule of one event loop.
#[derive(Debug)]
pub struct Scheduler {
    settings: Settings,
    /// When the next pass starts, while none is under way.
    next_pass: Instant,
    pass: Option<Pass>,
    /// The number of the current (or last) pass.
    pass_number: u64,
    peers: HashMap<Key, State>,
    outstanding: HashMap<u64, Key>,
    next_seq: u64,
}

impl Scheduler {
    /// A schedule with `settings`; the first pass starts one interval after `now`.
    pub fn new(settings: Settings, now: Instant) -> Scheduler {
        let settings = Settings {
            max_failures: settings.max_failures.max(1),
            batch: settings.batch.max(1),
            ..settings
        };
        Scheduler {
            settings,
            next_pass: now + settings.interval,
            pass: None,
            pass_number: 0,
            peers: HashMap::new(),
            outstanding: HashMap::new(),
            next_seq: 1,
        }
    }

    /// When [`Scheduler::on_tick`] is due.
    pub fn next_deadline(&self) -> Instant {
        self.pass
            .as_ref()
            .map_or(self.next_pass, |pass| pass.next_tick)
    }

    /// Bindings being kept alive.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// One tick, when due (else nothing): starts a pass if none is under way, reads the
    /// next `batch` AORs of `store` (bindings live at `wall`), judges their NATed bindings'
    /// last probes and probes them again; at the end of the walk forgets the bindings the
    /// pass did not meet.
    pub fn on_tick(
        &mut self,
        now: Instant,
        store: &dyn LocationStore,
        wall: SystemTime,
        out: &mut Vec<Action>,
    ) {
        if now < self.next_deadline() {
            return;
        }
        let mut pass = match self.pass.take() {
            Some(pass) => pass,
            None => self.start_pass(now, store.count()),
        };
        let (aors, next) = store.aors_page(&pass.cursor, self.settings.batch);
        for aor in aors {
            for binding in store.lookup(&aor, wall) {
                if let (true, Some((kind, addr))) = (binding.nated, binding.received) {
                    let peer = Peer {
                        aor: binding.aor,
                        contact: binding.contact,
                        kind,
                        addr,
                        local: binding.local,
                    };
                    self.visit(peer, out);
                }
            }
        }
        match next {
            Some(cursor) => {
                pass.cursor = cursor;
                // From the planned time, so a late loop does not stretch the pass.
                pass.next_tick += pass.tick;
                self.pass = Some(pass);
            }
            None => self.end_pass(pass.started + self.settings.interval),
        }
    }

    /// A new pass from `now`, its ticks spaced so that `bindings` (the store's count, an
    /// upper bound on its AORs) are read within the interval.
    fn start_pass(&mut self, now: Instant, bindings: usize) -> Pass {
        self.pass_number += 1;
        let ticks = bindings.div_ceil(self.settings.batch).max(1);
        let ticks = u32::try_from(ticks).unwrap_or(u32::MAX);
        Pass {
            started: now,
            cursor: AorCursor::default(),
            next_tick: now,
            tick: self.settings.interval / ticks,
        }
    }

    /// The walk is over: bindings the pass did not meet left the store (or are no longer
    /// NATed) and are forgotten; the next pass starts at `next`.
    fn end_pass(&mut self, next: Instant) {
        let pass = self.pass_number;
        let outstanding = &mut self.outstanding;
        self.peers.retain(|_, state| {
            let met = state.pass == pass;
            if !met {
                if let Some(seq) = state.outstanding {
                    outstanding.remove(&seq);
                }
            }
            met
        });
        self.next_pass = next;
    }

    /// A NATed binding met by the pass: its last probe judged, then a new probe (or its
    /// removal after too many failures).
    fn visit(&mut self, peer: Peer, out: &mut Vec<Action>) {
        let key = (peer.aor.clone(), peer.contact.clone());
        let pass = self.pass_number;
        let state = match self.peers.get_mut(&key) {
            // Already probed by this pass (an AOR listed twice): once is enough.
            Some(state) if state.pass == pass => return,
            // Unchanged since the last pass: judge its probe.
            Some(state) if state.peer == peer => {
                let unanswered = state.outstanding.take();
                if let Some(seq) = unanswered {
                    self.outstanding.remove(&seq);
                }
                let failed = unanswered.is_some() || state.unreachable;
                state.failures = if failed { state.failures + 1 } else { 0 };
                if state.failures >= self.settings.max_failures {
                    let failures = state.failures;
                    if let Some(state) = self.peers.remove(&key) {
                        out.push(Action::Remove {
                            peer: state.peer,
                            failures,
                        });
                    }
                    return;
                }
                state
            }
            // New, or re-registered from elsewhere: a new mapping, a new count.
            _ => {
                let fresh = State {
                    peer,
                    failures: 0,
                    outstanding: None,
                    unreachable: false,
                    pass,
                };
                if let Some(old) = self.peers.insert(key.clone(), fresh) {
                    if let Some(seq) = old.outstanding {
                        self.outstanding.remove(&seq);
                    }
                }
                match self.peers.get_mut(&key) {
                    Some(state) => state,
                    None => return,
                }
            }
        };
        state.pass = pass;
        state.unreachable = false;
        if state.peer.kind.is_stream() {
            out.push(Action::SendPing {
                peer: state.peer.clone(),
            });
        } else {
            let seq = self.next_seq;
            self.next_seq += 1;
            state.outstanding = Some(seq);
            self.outstanding.insert(seq, key);
            out.push(Action::SendOptions {
                peer: state.peer.clone(),
                seq,
            });
        }
    }

    /// A response to keep-alive `seq` arrived (any status): its binding is alive. False when
    /// `seq` is not an unjudged probe (late or forged): ignored.
    pub fn on_response(&mut self, seq: u64) -> bool {
        let Some(key) = self.outstanding.remove(&seq) else {
            return false;
        };
        if let Some(state) = self.peers.get_mut(&key) {
            state.outstanding = None;
        }
        true
    }

    /// The transport could not send to `addr` (a stream connection that is gone, a failed
    /// UDP send): the bindings reached there failed their current probe.
    pub fn on_unreachable(&mut self, kind: TransportKind, addr: SocketAddr) {
        for state in self.peers.values_mut() {
            if state.peer.kind == kind && state.peer.addr == addr {
                state.unreachable = true;
            }
        }
    }
}

/// The keep-alive OPTIONS for `peer` (RFC 3261 §11.1, §8.1.1): Request-URI the registered
/// contact, Via naming `source` (what we advertise for the socket the binding registered on,
/// `crate::proxy::identity`) with `rport` so the answer comes back through the NAT,
/// `Max-Forwards: 70`, From/To/Call-ID/CSeq of a request outside any dialog, in our host.
/// `nonce` makes Call-IDs unique across restarts.
pub fn options_request(
    peer: &Peer,
    source: &SentBy<'_>,
    branch: &str,
    seq: u64,
    nonce: u64,
) -> Bytes {
    let mut text = String::with_capacity(400);
    let host = &source.host;
    // Writing into a String cannot fail.
    let _ = write!(
        text,
        "OPTIONS {contact} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {source};branch={branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:keepalive@{host}>;tag=ka{nonce:x}\r\n\
         To: <{contact}>\r\n\
         Call-ID: ka{seq}-{nonce:016x}@{host}\r\n\
         CSeq: 1 OPTIONS\r\n\
         User-Agent: {agent}\r\n\
         Content-Length: 0\r\n\r\n",
        contact = peer.contact,
        transport = peer.kind.via_name(),
        agent = SERVER,
    );
    Bytes::from(text)
}

/// Removes `peer`'s binding from `store` (durably, through [`LocationStore::update`]) if it is
/// still the one probed: same contact, still NATed at the same received address (a phone
/// that re-registered from elsewhere meanwhile keeps its new binding). Whether it was removed.
pub fn remove_binding(
    store: &dyn LocationStore,
    peer: &Peer,
    now: SystemTime,
) -> Result<bool, StoreError> {
    let mut removed = false;
    store.update(&peer.aor, now, &mut |mut bindings| {
        let before = bindings.len();
        bindings.retain(|b| {
            !(b.contact == peer.contact && b.nated && b.received == Some((peer.kind, peer.addr)))
        });
        removed = bindings.len() < before;
        removed.then_some(bindings)
    })?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::location::{Binding, MemoryLocation};
    use crate::sip::Message;
    use std::collections::HashSet;

    const SECOND: Duration = Duration::from_secs(1);

    fn peer(user: &str, kind: TransportKind, addr: &str) -> Peer {
        Peer {
            aor: format!("sip:{user}@example.com"),
            contact: format!("sip:{user}@192.168.1.10:5060"),
            kind,
            addr: addr.parse().unwrap(),
            local: Some("127.0.0.1:5060".parse().unwrap()),
        }
    }

    fn user_peer(i: usize) -> Peer {
        let port = 1024 + i as u16;
        peer(
            &format!("u{i}"),
            TransportKind::Udp,
            &format!("127.0.0.2:{port}"),
        )
    }

    fn wall() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    /// Stores `peer` as the NATed binding `req:fix_nated_contact()` + `req:save()` leave.
    fn register(store: &MemoryLocation, peer: &Peer) {
        let mut binding = Binding::new(
            &peer.aor,
            &peer.contact,
            wall() + Duration::from_secs(86_400),
            1000,
            "c1".to_owned(),
            1,
        );
        binding.received = Some((peer.kind, peer.addr));
        binding.local = peer.local;
        binding.nated = true;
        store.replace(&peer.aor, vec![binding]).unwrap();
    }

    fn unregister(store: &MemoryLocation, peer: &Peer) {
        store.replace(&peer.aor, Vec::new()).unwrap();
    }

    fn store_of(peers: &[Peer]) -> MemoryLocation {
        let store = MemoryLocation::default();
        for p in peers {
            register(&store, p);
        }
        store
    }

    fn settings(interval: Duration, max_failures: u32, batch: usize) -> Settings {
        Settings {
            interval,
            max_failures,
            batch,
        }
    }

    /// One tick at `now`: its actions.
    fn tick(s: &mut Scheduler, store: &MemoryLocation, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        s.on_tick(now, store, wall(), &mut out);
        out
    }

    /// Every tick due up to `until`, at its deadline, answering the probes of the peers
    /// `alive` says and removing the reported bindings from `store` as the caller does; the
    /// actions with their times and passes.
    fn run(
        s: &mut Scheduler,
        store: &MemoryLocation,
        until: Instant,
        alive: impl Fn(&Peer) -> bool,
    ) -> Vec<(Instant, u64, Action)> {
        let mut all = Vec::new();
        while s.next_deadline() <= until {
            let now = s.next_deadline();
            for action in tick(s, store, now) {
                match &action {
                    Action::SendOptions { peer, seq } if alive(peer) => {
                        assert!(s.on_response(*seq));
                    }
                    // What the caller does.
                    Action::Remove { peer, .. } => {
                        assert!(remove_binding(store, peer, wall()).unwrap());
                    }
                    _ => {}
                }
                all.push((now, s.pass_number, action));
            }
        }
        all
    }

    fn seqs(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendOptions { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    fn removed(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Remove { peer, .. } => Some(peer.aor.clone()),
                _ => None,
            })
            .collect()
    }

    fn probed_aor(action: &Action) -> Option<&str> {
        match action {
            Action::SendOptions { peer, .. } | Action::SendPing { peer } => Some(&peer.aor),
            Action::Remove { .. } => None,
        }
    }

    #[test]
    fn answered_probes_keep_a_binding_unanswered_ones_remove_it() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(settings(30 * SECOND, 3, 100), t0);
        assert_eq!(s.next_deadline(), t0 + 30 * SECOND);
        let alive = peer("alice", TransportKind::Udp, "127.0.0.2:40000");
        let silent = peer("bob", TransportKind::Udp, "127.0.0.3:40000");
        let store = store_of(&[alive.clone(), silent.clone()]);
        let mut now = t0;
        for round in 1..=3 {
            now += 30 * SECOND;
            assert_eq!(
                s.next_deadline(),
                now,
                "a small store: one tick per interval"
            );
            let out = tick(&mut s, &store, now);
            assert!(removed(&out).is_empty(), "round {round}");
            assert_eq!(out.len(), 2, "one probe each");
            for action in &out {
                if let Action::SendOptions { peer, seq } = action {
                    if peer.aor == alive.aor {
                        assert!(s.on_response(*seq));
                        assert!(!s.on_response(*seq), "a duplicate answer is ignored");
                    }
                }
            }
        }
        // Round 4 judges round 3: bob has now failed rounds 1, 2 and 3.
        now += 30 * SECOND;
        let out = tick(&mut s, &store, now);
        assert_eq!(removed(&out), vec![silent.aor.clone()]);
        assert_eq!(seqs(&out).len(), 1, "only alice is probed again");
        assert_eq!(s.len(), 1);
        assert_eq!(s.next_deadline(), now + 30 * SECOND);
    }

    #[test]
    fn an_answer_resets_the_count() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(settings(SECOND, 2, 100), t0);
        let p = peer("carol", TransportKind::Udp, "127.0.0.4:5060");
        let store = store_of(std::slice::from_ref(&p));
        tick(&mut s, &store, t0 + SECOND); // probe 1, unanswered
        let out = tick(&mut s, &store, t0 + 2 * SECOND); // failure 1; probe 2
        assert!(removed(&out).is_empty());
        assert!(s.on_response(seqs(&out)[0]));
        tick(&mut s, &store, t0 + 3 * SECOND); // ok; probe 3 unanswered
        let out = tick(&mut s, &store, t0 + 4 * SECOND); // failure 1 again
        assert!(removed(&out).is_empty());
        let out = tick(&mut s, &store, t0 + 5 * SECOND); // failure 2: removed
        assert_eq!(removed(&out), vec![p.aor.clone()]);
    }

    #[test]
    fn streams_get_pings_and_fail_when_unreachable() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(settings(SECOND, 2, 100), t0);
        let p = peer("dave", TransportKind::Tcp, "127.0.0.5:41000");
        let store = store_of(std::slice::from_ref(&p));
        let out = tick(&mut s, &store, t0 + SECOND);
        assert_eq!(out, vec![Action::SendPing { peer: p.clone() }]);
        // A ping written without complaint is a success.
        let out = tick(&mut s, &store, t0 + 2 * SECOND);
        assert!(removed(&out).is_empty());
        s.on_unreachable(TransportKind::Tcp, p.addr);
        s.on_unreachable(TransportKind::Udp, "127.0.0.9:1".parse().unwrap());
        let out = tick(&mut s, &store, t0 + 3 * SECOND);
        assert!(removed(&out).is_empty(), "one failure of two");
        s.on_unreachable(TransportKind::Tcp, p.addr);
        let out = tick(&mut s, &store, t0 + 4 * SECOND);
        assert_eq!(removed(&out), vec![p.aor.clone()]);
    }

    #[test]
    fn bindings_that_leave_the_store_are_forgotten_and_moves_reset() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(settings(SECOND, 1, 100), t0);
        let p = peer("erin", TransportKind::Udp, "127.0.0.6:5060");
        let store = store_of(std::slice::from_ref(&p));
        let out = tick(&mut s, &store, t0 + SECOND);
        let old_seq = seqs(&out)[0];
        // Unregistered: not probed, never removed by us.
        unregister(&store, &p);
        let out = tick(&mut s, &store, t0 + 2 * SECOND);
        assert!(out.is_empty() && s.is_empty());
        assert!(
            !s.on_response(old_seq),
            "a late answer of a past round is ignored"
        );
        // Re-registered from a new address after an unanswered probe: a new count.
        register(&store, &p);
        tick(&mut s, &store, t0 + 3 * SECOND);
        let moved = Peer {
            addr: "127.0.0.6:6000".parse().unwrap(),
            ..p.clone()
        };
        register(&store, &moved);
        let out = tick(&mut s, &store, t0 + 4 * SECOND);
        assert!(removed(&out).is_empty());
        assert_eq!(seqs(&out).len(), 1);
    }

    #[test]
    fn a_pass_is_spread_over_the_interval_in_bounded_ticks() {
        let t0 = Instant::now();
        let interval = 10 * SECOND;
        let mut s = Scheduler::new(settings(interval, 2, 10), t0);
        let peers: Vec<Peer> = (0..1000).map(user_peer).collect();
        let store = store_of(&peers);
        let passes = 5;
        let actions = run(
            &mut s,
            &store,
            t0 + passes * interval - SECOND / 1000,
            |_| true,
        );
        assert!(removed(
            &actions
                .iter()
                .map(|(_, _, a)| a.clone())
                .collect::<Vec<_>>()
        )
        .is_empty());
        // 100 ticks of at most 10 probes per pass, 100 ms apart.
        let mut per_tick: HashMap<Instant, usize> = HashMap::new();
        for (at, _, _) in &actions {
            *per_tick.entry(*at).or_default() += 1;
        }
        assert!(per_tick.values().all(|n| *n <= 10));
        assert_eq!(per_tick.len(), 100 * (passes as usize - 1));
        let mut times: Vec<Instant> = per_tick.keys().copied().collect();
        times.sort();
        assert!(times.windows(2).all(|w| w[1] - w[0] == interval / 100));
        // Every binding probed once per interval, an interval apart.
        let mut probes: HashMap<&str, Vec<Instant>> = HashMap::new();
        for (at, _, action) in &actions {
            probes
                .entry(probed_aor(action).unwrap())
                .or_default()
                .push(*at);
        }
        assert_eq!(probes.len(), 1000);
        for (aor, at) in &probes {
            assert_eq!(at.len(), passes as usize - 1, "{aor}");
            assert!(at.windows(2).all(|w| w[1] - w[0] == interval), "{aor}");
        }
    }

    #[test]
    fn spreading_keeps_the_failure_count_per_binding() {
        let t0 = Instant::now();
        let interval = 10 * SECOND;
        let mut s = Scheduler::new(settings(interval, 3, 7), t0);
        let peers: Vec<Peer> = (0..100).map(user_peer).collect();
        let store = store_of(&peers);
        let silent = |p: &Peer| p.addr.port() % 2 == 0;
        // Probes in passes 1..=3 fail; pass 4 judges the third failure.
        let mut removals = Vec::new();
        for pass in 1..=4u32 {
            let end = t0 + interval * (pass + 1) - SECOND / 1000;
            let actions: Vec<Action> = run(&mut s, &store, end, |p| !silent(p))
                .into_iter()
                .map(|(_, _, a)| a)
                .collect();
            let gone = removed(&actions);
            if pass < 4 {
                assert!(gone.is_empty(), "pass {pass}: {gone:?}");
            }
            removals.extend(gone);
        }
        let expected: HashSet<String> = peers
            .iter()
            .filter(|p| silent(p))
            .map(|p| p.aor.clone())
            .collect();
        assert_eq!(removals.len(), expected.len(), "each removed once");
        assert_eq!(removals.into_iter().collect::<HashSet<_>>(), expected);
        assert_eq!(s.len(), 50);
    }

    #[test]
    fn bindings_added_or_removed_between_slices() {
        let t0 = Instant::now();
        let interval = 10 * SECOND;
        let mut s = Scheduler::new(settings(interval, 1, 10), t0);
        let peers: Vec<Peer> = (0..100).map(user_peer).collect();
        let store = store_of(&peers);
        // Pass 1, nobody answers (one failure removes).
        run(&mut s, &store, t0 + 2 * interval - SECOND / 1000, |_| false);
        assert_eq!(s.len(), 100);
        // Pass 2, halfway: half the store unregisters (probed or not yet), newcomers arrive,
        // and the store grows past what the pass planned for.
        let half = t0 + 2 * interval + interval / 2 - SECOND / 1000;
        let first_half = run(&mut s, &store, half, |_| false);
        let met_first: HashSet<&str> = first_half
            .iter()
            .filter_map(|(_, _, a)| match a {
                Action::Remove { peer, .. } => Some(peer.aor.as_str()),
                _ => None,
            })
            .collect();
        assert!(!met_first.is_empty() && met_first.len() < 100);
        for p in peers.iter().step_by(2) {
            unregister(&store, p);
        }
        let newcomers: Vec<Peer> = (1000..1150).map(user_peer).collect();
        for p in &newcomers {
            register(&store, p);
        }
        let rest = run(&mut s, &store, t0 + 10 * interval, |p| {
            p.addr.port() >= 2024
        });
        let actions: Vec<Action> = first_half
            .iter()
            .chain(&rest)
            .map(|(_, _, a)| a.clone())
            .collect();
        let gone = removed(&actions);
        // Unregistered bindings not yet met are never reported; the others are, once.
        for p in peers.iter().step_by(2) {
            if !met_first.contains(p.aor.as_str()) {
                assert!(!gone.contains(&p.aor), "{} left the store", p.aor);
            }
        }
        let unique: HashSet<&String> = gone.iter().collect();
        assert_eq!(unique.len(), gone.len(), "no binding reported twice");
        for p in peers.iter().skip(1).step_by(2) {
            assert!(gone.contains(&p.aor), "{} failed", p.aor);
        }
        // Newcomers, all answering, are probed (at most once per pass) and stay.
        for p in &newcomers {
            assert!(!gone.contains(&p.aor), "{} answers", p.aor);
        }
        assert_eq!(s.len(), newcomers.len());
        let mut per_pass: HashMap<(u64, &str), usize> = HashMap::new();
        for (_, pass, action) in &rest {
            if let Some(aor) = probed_aor(action) {
                *per_pass.entry((*pass, aor)).or_default() += 1;
            }
        }
        assert!(per_pass.values().all(|n| *n == 1));
        let last = s.pass_number;
        assert!(last >= 4);
        assert!(newcomers
            .iter()
            .all(|p| per_pass.contains_key(&(last - 1, p.aor.as_str()))));
    }

    #[test]
    fn the_options_request_parses_and_its_branch_is_recognised() {
        let p = peer("frank", TransportKind::Udp, "127.0.0.7:5060");
        let b = crate::proxy::via_branch::keepalive(1, 42);
        let source = SentBy {
            host: "sip.example.com".into(),
            port: 5062,
        };
        let data = options_request(&p, &source, &b, 42, 7);
        let m = Message::parse(data).unwrap();
        m.validate().unwrap();
        let via = m.top_via().unwrap();
        assert_eq!(
            (via.host.to_string(), via.port),
            ("sip.example.com".to_owned(), Some(5062))
        );
        assert!(m.call_id().unwrap().ends_with(b"@sip.example.com"));
        assert_eq!(
            m.from().unwrap().uri.raw(),
            b"sip:keepalive@sip.example.com"
        );
        assert_eq!(m.request_uri_bytes().unwrap(), p.contact.as_bytes());
        assert_eq!(m.max_forwards(), Some(Ok(70)));
        assert_eq!(m.top_via().unwrap().branch().unwrap(), b.as_bytes());
        assert!(m.to().unwrap().tag().is_none(), "out of dialog");
    }
}
