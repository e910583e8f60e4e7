//! Keep-alives for bindings registered through a NAT: the sans-IO scheduler (explicit `now`).
//!
//! A NAT forgets a UDP mapping after tens of seconds without traffic, and a phone that went
//! away leaves a binding that swallows calls until it expires. So every NATed binding gets a
//! probe each interval, to the address its REGISTER came from:
//! - UDP: an out-of-dialog OPTIONS (RFC 3261 §11) with `Max-Forwards: 70` and a Via branch of
//!   its own, recognisable by [`BRANCH_PREFIX`]. Any response, even 4xx/5xx, proves the phone
//!   and the NAT mapping alive (Kamailio's nathelper `sipping`). No answer by the next round
//!   is a failure.
//! - TCP/TLS: a CRLFCRLF ping on the connection the REGISTER came on (RFC 5626 §4.4.1; the
//!   phone need not answer it, the write keeps the NAT and the connection open). A connection
//!   that is gone (the write is reported unreachable) is a failure: no new one is opened.
//!
//! After [`Scheduler::new`]'s `max_failures` consecutive failures the binding is reported
//! with [`Action::Remove`]; an answer resets the count. The caller owns the I/O: it gives the
//! scheduler the current NATed bindings at each round ([`Scheduler::on_round`]), sends what
//! the actions say, feeds answers back ([`Scheduler::on_response`]) and transport failures
//! ([`Scheduler::on_unreachable`]), and removes the reported bindings from the store.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use crate::location::LocationStore;
use crate::transport::TransportKind;

/// The Via branch of every keep-alive OPTIONS starts with this: the RFC 3261 magic cookie and
/// "keepaliv" in hex, 16 hex digits as the proxy's own branches have, so a response finds its
/// event loop by the loop index that follows (`<prefix><loop>.<seq>`).
pub const BRANCH_PREFIX: &str = "z9hG4bK6b656570616c6976.";

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

#[derive(Debug)]
struct State {
    peer: Peer,
    /// Consecutive failed rounds.
    failures: u32,
    /// The OPTIONS of this round still unanswered.
    outstanding: Option<u64>,
    /// A probe was sent in the last round (a new binding is judged from its second round).
    probed: bool,
    /// The transport reported the peer unreachable since the last round.
    unreachable: bool,
}

/// The keep-alive schedule of one event loop.
#[derive(Debug)]
pub struct Scheduler {
    interval: Duration,
    max_failures: u32,
    next_round: Instant,
    peers: HashMap<(String, String), State>,
    outstanding: HashMap<u64, (String, String)>,
    next_seq: u64,
}

impl Scheduler {
    /// A schedule probing every `interval`, removing after `max_failures` (at least 1)
    /// failed rounds in a row; the first round is one interval after `now`.
    pub fn new(interval: Duration, max_failures: u32, now: Instant) -> Scheduler {
        Scheduler {
            interval,
            max_failures: max_failures.max(1),
            next_round: now + interval,
            peers: HashMap::new(),
            outstanding: HashMap::new(),
            next_seq: 1,
        }
    }

    /// When [`Scheduler::on_round`] is due.
    pub fn next_deadline(&self) -> Instant {
        self.next_round
    }

    /// Bindings being kept alive.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// One round: judges the last round's probes, then probes `current` (the NATed bindings
    /// the store holds now; a binding no longer listed is forgotten).
    pub fn on_round(&mut self, now: Instant, current: Vec<Peer>, out: &mut Vec<Action>) {
        self.next_round = now + self.interval;
        self.outstanding.clear();
        let mut old = std::mem::take(&mut self.peers);
        let mut fresh = HashMap::with_capacity(current.len());
        for peer in current {
            let key = (peer.aor.clone(), peer.contact.clone());
            let state = match old.remove(&key) {
                // Unchanged since the last round: judge its probe.
                Some(mut state) if state.peer == peer => {
                    if state.probed {
                        let failed = state.outstanding.take().is_some() || state.unreachable;
                        state.failures = if failed { state.failures + 1 } else { 0 };
                    }
                    if state.failures >= self.max_failures {
                        out.push(Action::Remove {
                            peer: state.peer,
                            failures: state.failures,
                        });
                        continue;
                    }
                    state
                }
                // New, or re-registered from elsewhere: a new mapping, a new count.
                _ => State {
                    peer,
                    failures: 0,
                    outstanding: None,
                    probed: false,
                    unreachable: false,
                },
            };
            fresh.insert(key, state);
        }
        self.peers = fresh;
        for (key, state) in &mut self.peers {
            state.probed = true;
            state.unreachable = false;
            if state.peer.kind.is_stream() {
                out.push(Action::SendPing {
                    peer: state.peer.clone(),
                });
            } else {
                let seq = self.next_seq;
                self.next_seq += 1;
                state.outstanding = Some(seq);
                self.outstanding.insert(seq, key.clone());
                out.push(Action::SendOptions {
                    peer: state.peer.clone(),
                    seq,
                });
            }
        }
    }

    /// A response to keep-alive `seq` arrived (any status): its binding is alive. False when
    /// `seq` is not a probe of this round (late or forged): ignored.
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
    /// UDP send): the bindings reached there failed this round.
    pub fn on_unreachable(&mut self, kind: TransportKind, addr: SocketAddr) {
        for state in self.peers.values_mut() {
            if state.peer.kind == kind && state.peer.addr == addr {
                state.unreachable = true;
            }
        }
    }
}

/// The Via branch of keep-alive `seq` sent by event loop `loop_index`.
pub fn branch(loop_index: usize, seq: u64) -> String {
    format!("{BRANCH_PREFIX}{loop_index}.{seq}")
}

/// The sequence number of a keep-alive branch, `None` for any other branch.
pub fn seq_of_branch(branch: &[u8]) -> Option<u64> {
    let rest = branch.strip_prefix(BRANCH_PREFIX.as_bytes())?;
    let rest = std::str::from_utf8(rest).ok()?;
    let (_loop, seq) = rest.split_once('.')?;
    seq.parse().ok()
}

/// The keep-alive OPTIONS for `peer` (RFC 3261 §11.1, §8.1.1): Request-URI the registered
/// contact, Via naming `local` (our socket the binding registered on) with `rport` so the
/// answer comes back through the NAT, `Max-Forwards: 70`, From/To/Call-ID/CSeq of a request
/// outside any dialog. `nonce` makes Call-IDs unique across restarts.
pub fn options_request(
    peer: &Peer,
    local: SocketAddr,
    branch: &str,
    seq: u64,
    nonce: u64,
) -> Bytes {
    let mut text = String::with_capacity(400);
    let host = match local.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    };
    // Writing into a String cannot fail.
    let _ = write!(
        text,
        "OPTIONS {contact} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {local};branch={branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:keepalive@{host}>;tag=ka{nonce:x}\r\n\
         To: <{contact}>\r\n\
         Call-ID: ka{seq}-{nonce:016x}@{host}\r\n\
         CSeq: 1 OPTIONS\r\n\
         User-Agent: {agent}\r\n\
         Content-Length: 0\r\n\r\n",
        contact = peer.contact,
        transport = peer.kind.via_name(),
        agent = crate::server::core::SERVER,
    );
    Bytes::from(text)
}

/// The NATed bindings of `store` with a received address, as keep-alive peers. Reads the
/// store's memory index (every AOR: the cost of a round grows with the store).
pub fn nated_peers(store: &dyn LocationStore, now: SystemTime) -> Vec<Peer> {
    let mut peers = Vec::new();
    for aor in store.aors() {
        for binding in store.lookup(&aor, now) {
            if let (true, Some((kind, addr))) = (binding.nated, binding.received) {
                peers.push(Peer {
                    aor: binding.aor,
                    contact: binding.contact,
                    kind,
                    addr,
                    local: binding.local,
                });
            }
        }
    }
    peers
}

/// Removes `peer`'s binding from `store` (durably, through [`LocationStore::update`]) if it is
/// still the one probed: same contact, still NATed at the same received address (a phone
/// that re-registered from elsewhere meanwhile keeps its new binding). Whether it was removed.
pub fn remove_binding(
    store: &dyn LocationStore,
    peer: &Peer,
    now: SystemTime,
) -> Result<bool, String> {
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
    use crate::sip::Message;

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

    #[test]
    fn answered_probes_keep_a_binding_unanswered_ones_remove_it() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(30 * SECOND, 3, t0);
        assert_eq!(s.next_deadline(), t0 + 30 * SECOND);
        let alive = peer("alice", TransportKind::Udp, "127.0.0.2:40000");
        let silent = peer("bob", TransportKind::Udp, "127.0.0.3:40000");
        let mut now = t0;
        for round in 1..=3 {
            now += 30 * SECOND;
            let mut out = Vec::new();
            s.on_round(now, vec![alive.clone(), silent.clone()], &mut out);
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
        let mut out = Vec::new();
        s.on_round(now, vec![alive.clone(), silent.clone()], &mut out);
        assert_eq!(removed(&out), vec![silent.aor.clone()]);
        assert_eq!(seqs(&out).len(), 1, "only alice is probed again");
        assert_eq!(s.len(), 1);
        assert_eq!(s.next_deadline(), now + 30 * SECOND);
    }

    #[test]
    fn an_answer_resets_the_count() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(SECOND, 2, t0);
        let p = peer("carol", TransportKind::Udp, "127.0.0.4:5060");
        let mut out = Vec::new();
        s.on_round(t0 + SECOND, vec![p.clone()], &mut out); // probe 1, unanswered
        out.clear();
        s.on_round(t0 + 2 * SECOND, vec![p.clone()], &mut out); // failure 1; probe 2
        assert!(removed(&out).is_empty());
        assert!(s.on_response(seqs(&out)[0]));
        out.clear();
        s.on_round(t0 + 3 * SECOND, vec![p.clone()], &mut out); // ok; probe 3 unanswered
        out.clear();
        s.on_round(t0 + 4 * SECOND, vec![p.clone()], &mut out); // failure 1 again
        assert!(removed(&out).is_empty());
        out.clear();
        s.on_round(t0 + 5 * SECOND, vec![p.clone()], &mut out); // failure 2: removed
        assert_eq!(removed(&out), vec![p.aor.clone()]);
    }

    #[test]
    fn streams_get_pings_and_fail_when_unreachable() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(SECOND, 2, t0);
        let p = peer("dave", TransportKind::Tcp, "127.0.0.5:41000");
        let mut out = Vec::new();
        s.on_round(t0 + SECOND, vec![p.clone()], &mut out);
        assert_eq!(out, vec![Action::SendPing { peer: p.clone() }]);
        // A ping written without complaint is a success.
        out.clear();
        s.on_round(t0 + 2 * SECOND, vec![p.clone()], &mut out);
        assert!(removed(&out).is_empty());
        s.on_unreachable(TransportKind::Tcp, p.addr);
        s.on_unreachable(TransportKind::Udp, "127.0.0.9:1".parse().unwrap());
        out.clear();
        s.on_round(t0 + 3 * SECOND, vec![p.clone()], &mut out);
        assert!(removed(&out).is_empty(), "one failure of two");
        s.on_unreachable(TransportKind::Tcp, p.addr);
        out.clear();
        s.on_round(t0 + 4 * SECOND, vec![p.clone()], &mut out);
        assert_eq!(removed(&out), vec![p.aor.clone()]);
    }

    #[test]
    fn bindings_that_leave_the_store_are_forgotten_and_moves_reset() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(SECOND, 1, t0);
        let p = peer("erin", TransportKind::Udp, "127.0.0.6:5060");
        let mut out = Vec::new();
        s.on_round(t0 + SECOND, vec![p.clone()], &mut out);
        let old_seq = seqs(&out)[0];
        // Unregistered: not probed, never removed by us.
        out.clear();
        s.on_round(t0 + 2 * SECOND, Vec::new(), &mut out);
        assert!(out.is_empty() && s.is_empty());
        assert!(
            !s.on_response(old_seq),
            "a late answer of a past round is ignored"
        );
        // Re-registered from a new address after an unanswered probe: a new count.
        s.on_round(t0 + 3 * SECOND, vec![p.clone()], &mut out);
        let moved = Peer {
            addr: "127.0.0.6:6000".parse().unwrap(),
            ..p.clone()
        };
        out.clear();
        s.on_round(t0 + 4 * SECOND, vec![moved.clone()], &mut out);
        assert!(removed(&out).is_empty());
        assert_eq!(seqs(&out).len(), 1);
    }

    #[test]
    fn the_options_request_parses_and_its_branch_is_recognised() {
        let p = peer("frank", TransportKind::Udp, "127.0.0.7:5060");
        let b = branch(1, 42);
        assert_eq!(seq_of_branch(b.as_bytes()), Some(42));
        assert_eq!(seq_of_branch(b"z9hG4bK0123456789abcdef.1.42"), None);
        assert_eq!(seq_of_branch(b"z9hG4bK6b656570616c6976.1.x"), None);
        assert_eq!(
            crate::proxy::relay::owner_of_branch(b.as_bytes()),
            Some(1),
            "the response is handed to the loop that sent the probe"
        );
        let data = options_request(&p, "127.0.0.1:5060".parse().unwrap(), &b, 42, 7);
        let m = Message::parse(data).unwrap();
        m.validate().unwrap();
        assert_eq!(m.request_uri_bytes().unwrap(), p.contact.as_bytes());
        assert_eq!(m.max_forwards(), Some(Ok(70)));
        assert_eq!(m.top_via().unwrap().branch().unwrap(), b.as_bytes());
        assert!(m.to().unwrap().tag().is_none(), "out of dialog");
    }
}
