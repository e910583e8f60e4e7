//! The relay alone, sans-IO: requests, client events and timers fed at explicit instants, the
//! [`RelayAction`]s it asks for checked, and each client transaction it starts answered with a
//! made-up [`TxId`] (no transaction layer, no sockets, no sleeping).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{ClientPurpose, Relay, RelayAction, RelayActions};
use crate::proxy::identity::LocalIdentity;
use crate::proxy::request::ProxyIdentity;
use crate::proxy::response_context::{BranchOutcome, Target};
use crate::proxy::router::{Decision, FailureDecision, FailureTimers, Routed, Router};
use crate::proxy::router::{RouteHandle, RouteInfo};
use crate::sip::{Message, ResponseBuilder};
use crate::transaction::layer::{SendError, TxId};
use crate::transaction::Event;
use crate::transport::{Destination, ListenAddr, Meta, TransportKind};

const PROXY: &str = "127.0.0.1:5060";
const CALLER: &str = "127.0.0.1:5070";
/// Callees: stand-in hosts on loopback.
const ALICE: &str = "127.0.0.9:5080";
const BOB: &str = "127.0.0.10:5080";
const TIMER_C: Duration = Duration::from_secs(180);

const INVITE: &str = "INVITE sip:callee@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-sans-io-1;rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:caller@example.com>;tag=c1\r\n\
To: <sip:callee@example.com>\r\n\
Call-ID: sans-io-1@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:caller@127.0.0.1:5070>\r\n\
Content-Length: 0\r\n\r\n";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn target(hostport: &str) -> Target {
    Target::new(Bytes::from(format!("sip:callee@{hostport}")), 1000)
}

/// Relays every request to `first` (in parallel), and on failure to `then`, one target set at
/// a time (serial forking, as a failure route does).
struct ForkRouter {
    first: Vec<&'static str>,
    then: VecDeque<&'static str>,
}

impl Router for ForkRouter {
    fn route(&mut self, _request: &mut Message, _meta: &Meta, _info: RouteInfo) -> Routed {
        Routed {
            decision: Decision::Relay {
                targets: self.first.iter().map(|t| target(t)).collect(),
                record_route: false,
                timers: FailureTimers::default(),
            },
            handle: Some(RouteHandle(1)),
        }
    }

    fn on_failure(
        &mut self,
        _handle: Option<RouteHandle>,
        _request: &Message,
        _best: &Message,
        _branches: &[BranchOutcome],
    ) -> FailureDecision {
        match self.then.pop_front() {
            Some(next) => FailureDecision::Targets {
                targets: vec![target(next)],
                timers: FailureTimers::default(),
                request: None,
            },
            None => FailureDecision::SendBest,
        }
    }
}

/// A client transaction the relay started: its id, request and destination.
struct Client {
    tx: TxId,
    request: Message,
    dest: Destination,
}

/// The relay and what it asked for, with the transaction layer's part played by hand: every
/// [`RelayAction::StartClient`] gets the next [`TxId`] (or `refuse` one).
struct Rig {
    relay: Relay,
    t0: Instant,
    next_tx: u64,
    /// Client transactions started, in order.
    clients: Vec<Client>,
    /// CANCELs asked for, by client transaction.
    cancelled: Vec<TxId>,
    /// Responses sent upstream through the server transaction, by status.
    upstream: Vec<u16>,
    /// Start requests the "layer" refuses next (a memory budget exhausted).
    refuse: usize,
}

const SERVER: TxId = TxId(1);

fn rig(router: ForkRouter) -> Rig {
    let proxy = addr(PROXY);
    let me = ProxyIdentity::new(LocalIdentity::new(&[], [proxy]));
    let bound = vec![format!("udp:{PROXY}").parse::<ListenAddr>().unwrap()];
    Rig {
        relay: Relay::new(me, Vec::new(), 0, bound, TIMER_C, Box::new(router)),
        t0: Instant::now(),
        next_tx: 100,
        clients: Vec::new(),
        cancelled: Vec::new(),
        upstream: Vec::new(),
        refuse: 0,
    }
}

impl Rig {
    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    /// Carries out `actions` as the core would, recording what they ask.
    fn settle(&mut self, mut actions: RelayActions, now: Instant) {
        while let Some(action) = actions.pop() {
            match action {
                RelayAction::StartClient {
                    request,
                    dest,
                    purpose,
                } => {
                    let started = match self.refuse {
                        0 => {
                            self.next_tx += 1;
                            let tx = TxId(self.next_tx);
                            self.clients.push(Client {
                                tx,
                                request,
                                dest: dest.clone(),
                            });
                            Ok(tx)
                        }
                        _ => {
                            self.refuse -= 1;
                            Err(SendError::Overloaded)
                        }
                    };
                    assert!(matches!(purpose, ClientPurpose::Branch(_)));
                    self.relay
                        .on_client_started(purpose, dest, started, now, &mut actions);
                }
                RelayAction::CancelClient { client, .. } => self.cancelled.push(client),
                RelayAction::ServerRespond { tx, status, .. } => {
                    assert_eq!(tx, SERVER);
                    self.upstream.push(status);
                }
                RelayAction::Reply { reply, .. } => panic!("answered {}", reply.code),
                _ => {}
            }
        }
    }

    fn invite(&mut self, ms: u64) {
        let request = Message::parse(Bytes::from_static(INVITE.as_bytes())).unwrap();
        let meta = Meta {
            kind: TransportKind::Udp,
            source: addr(CALLER),
            local: addr(PROXY),
            conn: None,
            worker: 0,
        };
        let mut actions = RelayActions::default();
        let now = self.at(ms);
        self.relay
            .on_request(SERVER, request, meta, now, &mut actions);
        self.settle(actions, now);
    }

    /// Client `index` (in start order) hears `event`.
    fn event(&mut self, index: usize, event: Event, ms: u64) {
        let mut actions = RelayActions::default();
        let now = self.at(ms);
        let tx = self.clients[index].tx;
        self.relay
            .on_client_event(tx, event, None, now, &mut actions);
        self.settle(actions, now);
    }

    /// Client `index` is answered with `code`.
    fn answer(&mut self, index: usize, code: u16, ms: u64) {
        let response = ResponseBuilder::new(&self.clients[index].request, code, "Test")
            .to_tag(b"callee")
            .build();
        let response = Message::parse(response).unwrap();
        self.event(index, Event::Response(response), ms);
    }

    fn timers(&mut self, ms: u64) {
        let mut actions = RelayActions::default();
        let now = self.at(ms);
        self.relay.on_timer(now, &mut actions);
        self.settle(actions, now);
    }

    fn destinations(&self) -> Vec<SocketAddr> {
        self.clients.iter().map(|c| c.dest.addr).collect()
    }
}

#[test]
fn a_parallel_fork_answered_with_2xx_cancels_the_other_branch() {
    let mut rig = rig(ForkRouter {
        first: vec![ALICE, BOB],
        then: VecDeque::new(),
    });
    rig.invite(0);
    assert_eq!(rig.upstream, [100]);
    assert_eq!(rig.destinations(), [addr(ALICE), addr(BOB)]);
    rig.answer(0, 180, 10);
    rig.answer(1, 180, 20);
    rig.answer(0, 200, 30);
    assert_eq!(rig.upstream, [100, 180, 180, 200]);
    // §16.7 step 10: the 2xx went up; the branch still ringing is cancelled, no other.
    assert_eq!(rig.cancelled, [rig.clients[1].tx]);
    rig.answer(1, 487, 40);
    assert_eq!(rig.upstream, [100, 180, 180, 200], "the 487 stays below");
}

#[test]
fn a_503_fails_over_to_the_failure_routes_next_target() {
    let mut rig = rig(ForkRouter {
        first: vec![ALICE],
        then: VecDeque::from([BOB]),
    });
    rig.invite(0);
    rig.answer(0, 503, 10);
    // Serial forking: the failure route's target, nothing upstream yet (§16.7 step 6).
    assert_eq!(rig.destinations(), [addr(ALICE), addr(BOB)]);
    assert_eq!(rig.upstream, [100]);
    rig.answer(1, 200, 20);
    assert_eq!(rig.upstream, [100, 200]);
    assert!(rig.cancelled.is_empty());
}

#[test]
fn an_upstream_cancel_of_a_ringing_call_cancels_its_branch_and_ends_in_487() {
    let mut rig = rig(ForkRouter {
        first: vec![ALICE],
        then: VecDeque::new(),
    });
    rig.invite(0);
    rig.answer(0, 180, 10);
    let mut actions = RelayActions::default();
    let now = rig.at(20);
    rig.relay.cancel(SERVER, now, &mut actions);
    rig.settle(actions, now);
    assert_eq!(rig.cancelled, [rig.clients[0].tx]);
    // The callee answers the INVITE with 487 (§9.2); it goes upstream as the final answer.
    rig.answer(0, 487, 30);
    assert_eq!(rig.upstream, [100, 180, 487]);
}

#[test]
fn an_unreachable_branch_fails_over() {
    let mut rig = rig(ForkRouter {
        first: vec![ALICE],
        then: VecDeque::from([BOB]),
    });
    rig.invite(0);
    let mut actions = RelayActions::default();
    let now = rig.at(10);
    rig.relay
        .on_unreachable(TransportKind::Udp, addr(ALICE), &mut actions);
    let failed: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            RelayAction::FailClient { client } => Some(*client),
            _ => None,
        })
        .collect();
    assert_eq!(failed, [rig.clients[0].tx]);
    rig.settle(actions, now);
    // The layer turns FailClient into the client's transport error (§17.1.4).
    rig.event(0, Event::TransportError, 10);
    assert_eq!(rig.destinations(), [addr(ALICE), addr(BOB)]);
    rig.answer(1, 200, 20);
    assert_eq!(rig.upstream, [100, 200]);
}

#[test]
fn a_client_transaction_that_cannot_start_counts_as_unreachable() {
    let mut rig = rig(ForkRouter {
        first: vec![ALICE],
        then: VecDeque::from([BOB]),
    });
    rig.refuse = 1;
    rig.invite(0);
    // ALICE's start was refused: no address left, so the failure route sends to BOB.
    assert_eq!(rig.destinations(), [addr(BOB)]);
    rig.answer(0, 200, 10);
    assert_eq!(rig.upstream, [100, 200]);
}

#[test]
fn timer_c_cancels_a_branch_that_rings_too_long() {
    let mut rig = rig(ForkRouter {
        first: vec![ALICE],
        then: VecDeque::new(),
    });
    rig.invite(0);
    rig.answer(0, 180, 1_000);
    // §16.8: Timer C restarts at each provisional: not due 180 s after the INVITE (its entry
    // then is stale), but 180 s after the 180.
    assert_eq!(rig.relay.next_deadline(), Some(rig.at(0) + TIMER_C));
    rig.timers(180_000);
    assert!(rig.cancelled.is_empty());
    assert_eq!(rig.relay.next_deadline(), Some(rig.at(1_000) + TIMER_C));
    rig.timers(180_999);
    assert!(rig.cancelled.is_empty());
    rig.timers(181_000);
    assert_eq!(rig.cancelled, [rig.clients[0].tx]);
    rig.answer(0, 487, 181_010);
    assert_eq!(rig.upstream, [100, 180, 487]);
}
