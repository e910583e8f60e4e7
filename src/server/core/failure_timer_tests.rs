//! The failure timers (`fr_timer`, `fr_inv_timer`) and the branch outcomes, through a core of
//! one event loop fed messages and timer runs at explicit instants: nothing sleeps, and 32 s
//! of Timer B are never waited for.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::Config;
use crate::proxy::identity::LocalIdentity;
use crate::proxy::response_context::{BranchOutcome, Target};
use crate::proxy::router::RouterFactory;
use crate::proxy::router::{
    Decision, FailureDecision, FailureTimers, RouteHandle, RouteInfo, Routed, Router,
};
use crate::server::core::CoreFactory;
use crate::sip::{Message, ResponseBuilder};
use crate::transport::{Input, Meta, Output, TransportKind, Worker, WorkerFactory};

const CALLER: &str = "127.0.0.1:5070";
const PROXY: &str = "127.0.0.1:5060";
/// A gateway that never answers, and one that does (stand-in hosts on loopback).
const DEAD: &str = "127.0.0.9:5080";
const ALIVE: &str = "127.0.0.10:5080";

/// What the router saw in its failure hooks.
#[derive(Default)]
struct Seen {
    failures: Vec<Vec<BranchOutcome>>,
    branch_failures: Vec<(BranchOutcome, Option<u16>)>,
}

/// Relays every INVITE to `first` with `timers`, and on failure once to `then`.
struct FailoverRouter {
    first: &'static str,
    then: Option<&'static str>,
    timers: FailureTimers,
    /// Set by the failure route for the branches it adds.
    then_timers: FailureTimers,
    /// A header the failure route adds to the request its new branches copy.
    then_header: Option<(&'static str, &'static str)>,
    /// The failure route answers with this instead of failing over.
    then_reply: Option<(u16, &'static str, &'static str, &'static str)>,
    seen: Arc<Mutex<Seen>>,
}

fn target(hostport: &str) -> Target {
    Target::new(Bytes::from(format!("sip:gw@{hostport}")), 1000)
}

impl Router for FailoverRouter {
    fn route(&mut self, _request: &mut Message, _meta: &Meta, _info: RouteInfo) -> Routed {
        Routed {
            decision: Decision::Relay {
                targets: vec![target(self.first)],
                record_route: false,
                timers: self.timers,
            },
            handle: Some(RouteHandle(1)),
        }
    }

    fn on_failure(
        &mut self,
        _handle: Option<RouteHandle>,
        request: &Message,
        _best: &Message,
        branches: &[BranchOutcome],
    ) -> FailureDecision {
        self.seen.lock().unwrap().failures.push(branches.to_vec());
        if let Some((code, reason, name, value)) = self.then_reply.take() {
            return FailureDecision::Reply {
                code,
                reason: reason.into(),
                headers: vec![(name.to_owned(), value.to_owned())],
            };
        }
        let edited = self.then_header.map(|(name, value)| {
            let mut edited = request.clone();
            edited.append_header(name, value.as_bytes()).unwrap();
            Box::new(edited)
        });
        match self.then.take() {
            Some(next) => FailureDecision::Targets {
                targets: vec![target(next)],
                timers: self.then_timers,
                request: edited,
            },
            None => FailureDecision::SendBest,
        }
    }

    fn on_branch_failure(
        &mut self,
        _handle: RouteHandle,
        _request: &Message,
        outcome: &BranchOutcome,
        response: &dyn Fn() -> Option<Message>,
    ) {
        let status = response().and_then(|r| r.status());
        let mut seen = self.seen.lock().unwrap();
        seen.branch_failures.push((outcome.clone(), status));
    }
}

struct Rig {
    core: Box<dyn Worker>,
    t0: Instant,
    seen: Arc<Mutex<Seen>>,
}

fn rig(fr_timer_ms: Option<u64>, router: FailoverRouter) -> Rig {
    let mut config = Config::default();
    config.timers.fr_timer_ms = fr_timer_ms;
    let seen = router.seen.clone();
    let router = Mutex::new(Some(router));
    let factory: RouterFactory = Arc::new(move |_, _: &LocalIdentity| {
        Box::new(router.lock().unwrap().take().expect("one event loop")) as Box<dyn Router>
    });
    let core = CoreFactory::with_router(&config, factory).make_bound_worker(0, 1, &config.listen);
    Rig {
        core,
        t0: Instant::now(),
        seen,
    }
}

fn router(
    first: &'static str,
    then: Option<&'static str>,
    timers: FailureTimers,
) -> FailoverRouter {
    FailoverRouter {
        first,
        then,
        timers,
        then_timers: FailureTimers::default(),
        then_header: None,
        then_reply: None,
        seen: Arc::default(),
    }
}

fn fr(ms: u64) -> FailureTimers {
    FailureTimers {
        no_response: Some(Duration::from_millis(ms)),
        no_answer: None,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn meta_from(source: &str) -> Meta {
    Meta {
        kind: TransportKind::Udp,
        source: addr(source),
        local: addr(PROXY),
        conn: None,
        worker: 0,
    }
}

const INVITE: &str = "INVITE sip:+15551234@example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-fr-1;rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:caller@example.com>;tag=c1\r\n\
To: <sip:+15551234@example.com>\r\n\
Call-ID: fr-timer-1@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:caller@127.0.0.1:5070>\r\n\
Content-Length: 0\r\n\r\n";

impl Rig {
    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn input(&mut self, data: Bytes, from: &str, ms: u64) -> Vec<(SocketAddr, Message)> {
        let mut out = Vec::new();
        let input = Input::Message {
            data,
            meta: meta_from(from),
        };
        self.core.on_input(input, self.at(ms), &mut out);
        sent(out)
    }

    /// Runs the timers due up to `ms` (each deadline in turn, as the shell does).
    fn run_until(&mut self, ms: u64) -> Vec<(SocketAddr, Message)> {
        let end = self.at(ms);
        let mut all = Vec::new();
        while let Some(due) = self.core.next_deadline().filter(|d| *d <= end) {
            let mut out = Vec::new();
            self.core.on_timer(due, &mut out);
            all.extend(sent(out));
        }
        all
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }
}

fn sent(out: Vec<Output>) -> Vec<(SocketAddr, Message)> {
    out.into_iter()
        .filter_map(|o| match o {
            Output::Send { dest, data } => Some((dest.addr, Message::parse(data).ok()?)),
            _ => None,
        })
        .collect()
}

fn requests_to<'a>(sent: &'a [(SocketAddr, Message)], to: &str, method: &str) -> Vec<&'a Message> {
    sent.iter()
        .filter(|(a, m)| *a == addr(to) && m.method().is_some_and(|x| x.as_str() == method))
        .map(|(_, m)| m)
        .collect()
}

fn statuses_to(sent: &[(SocketAddr, Message)], to: &str) -> Vec<u16> {
    sent.iter()
        .filter(|(a, _)| *a == addr(to))
        .filter_map(|(_, m)| m.status())
        .collect()
}

fn answer(request: &Message, code: u16) -> Bytes {
    ResponseBuilder::new(request, code, "Test")
        .to_tag(b"gw")
        .build()
}

#[test]
fn a_silent_destination_is_given_up_at_fr_timer_and_the_call_fails_over() {
    let mut rig = rig(None, router(DEAD, Some(ALIVE), fr(2000)));
    let out = rig.input(Bytes::from_static(INVITE.as_bytes()), CALLER, 0);
    assert_eq!(statuses_to(&out, CALLER), [100]);
    assert_eq!(requests_to(&out, DEAD, "INVITE").len(), 1);

    // Retransmissions to the dead one (T1 = 500 ms), nothing else until 2 s.
    let out = rig.run_until(1999);
    assert!(requests_to(&out, ALIVE, "INVITE").is_empty());
    assert!(rig.seen().failures.is_empty());

    let out = rig.run_until(2000);
    let to_alive = requests_to(&out, ALIVE, "INVITE");
    assert_eq!(to_alive.len(), 1, "failed over at fr_timer: {out:?}");
    {
        let seen = rig.seen();
        let [branches] = &seen.failures[..] else {
            panic!("one failure route: {:?}", seen.failures)
        };
        assert_eq!(branches.len(), 1);
        let dead = &branches[0];
        assert_eq!(&dead.uri[..], b"sip:gw@127.0.0.9:5080");
        assert_eq!((dead.code, dead.timeout, dead.local), (408, true, true));
        assert_eq!(dead.reason, "Request Timeout");
        let [(outcome, status)] = &seen.branch_failures[..] else {
            panic!("one branch failure: {:?}", seen.branch_failures)
        };
        assert_eq!((outcome, *status), (dead, Some(408)));
    }

    // The other destination answers: its 200 goes to the caller, 2 s after the INVITE.
    let invite = to_alive[0].clone();
    let out = rig.input(answer(&invite, 200), ALIVE, 2050);
    assert_eq!(statuses_to(&out, CALLER), [200]);
    assert!(rig.seen().failures.len() == 1, "no second failure route");
}

#[test]
fn a_provisional_before_fr_timer_keeps_the_branch() {
    let mut rig = rig(None, router(DEAD, Some(ALIVE), fr(2000)));
    let out = rig.input(Bytes::from_static(INVITE.as_bytes()), CALLER, 0);
    let invite = requests_to(&out, DEAD, "INVITE")[0].clone();
    rig.input(answer(&invite, 100), DEAD, 300);
    let out = rig.run_until(10_000);
    assert!(requests_to(&out, ALIVE, "INVITE").is_empty());
    assert!(rig.seen().failures.is_empty());
    // It answers after all.
    let out = rig.input(answer(&invite, 486), DEAD, 10_100);
    let seen = rig.seen();
    assert_eq!(seen.failures.len(), 1);
    assert_eq!(
        (seen.failures[0][0].code, seen.failures[0][0].timeout),
        (486, false)
    );
    assert_eq!(seen.failures[0][0].reason, "Test");
    assert!(!seen.failures[0][0].local);
    drop(seen);
    assert_eq!(requests_to(&out, ALIVE, "INVITE").len(), 1);
}

#[test]
fn the_configured_fr_timer_applies_when_the_router_sets_none() {
    let mut rig = rig(
        Some(1500),
        router(DEAD, Some(ALIVE), FailureTimers::default()),
    );
    rig.input(Bytes::from_static(INVITE.as_bytes()), CALLER, 0);
    assert!(requests_to(&rig.run_until(1499), ALIVE, "INVITE").is_empty());
    assert_eq!(requests_to(&rig.run_until(1500), ALIVE, "INVITE").len(), 1);
}

#[test]
fn without_fr_timer_a_silent_destination_waits_for_timer_b() {
    let mut rig = rig(None, router(DEAD, Some(ALIVE), FailureTimers::default()));
    rig.input(Bytes::from_static(INVITE.as_bytes()), CALLER, 0);
    assert!(requests_to(&rig.run_until(31_000), ALIVE, "INVITE").is_empty());
    // Timer B = 64*T1 = 32 s.
    assert_eq!(
        requests_to(&rig.run_until(32_400), ALIVE, "INVITE").len(),
        1
    );
}

#[test]
fn a_late_provisional_from_a_branch_given_up_is_cancelled() {
    let mut rig = rig(None, router(DEAD, Some(ALIVE), fr(2000)));
    let out = rig.input(Bytes::from_static(INVITE.as_bytes()), CALLER, 0);
    let invite = requests_to(&out, DEAD, "INVITE")[0].clone();
    rig.run_until(2000);
    // The "dead" one wakes up and rings: it gets a CANCEL (§9.1), the caller sees nothing.
    let out = rig.input(answer(&invite, 180), DEAD, 2500);
    assert_eq!(requests_to(&out, DEAD, "CANCEL").len(), 1, "{out:?}");
    assert!(statuses_to(&out, CALLER).is_empty());
}

#[test]
fn fr_timer_set_by_the_failure_route_applies_to_the_branches_it_adds() {
    let mut router = router(DEAD, Some("127.0.0.11:5080"), fr(1000));
    router.then_timers = fr(3000);
    let mut rig = rig(None, router);
    rig.input(Bytes::from_static(INVITE.as_bytes()), CALLER, 0);
    let out = rig.run_until(1000);
    assert_eq!(requests_to(&out, "127.0.0.11:5080", "INVITE").len(), 1);
    // The second destination is silent too: given up 3 s after it was tried, not 1 s.
    rig.run_until(3999);
    assert_eq!(rig.seen().failures.len(), 1);
    let out = rig.run_until(4000);
    assert_eq!(rig.seen().failures.len(), 2);
    // Nothing left to try: the best response, a 408, goes to the caller.
    assert_eq!(statuses_to(&out, CALLER), [408]);
    let seen = rig.seen();
    let uris: Vec<_> = seen.failures[1].iter().map(|b| b.uri.clone()).collect();
    assert_eq!(
        uris,
        [
            &b"sip:gw@127.0.0.9:5080"[..],
            &b"sip:gw@127.0.0.11:5080"[..]
        ]
    );
    assert!(seen.failures[1].iter().all(|b| b.timeout));
}

#[test]
fn noanswer_timer_cancels_a_ringing_branch() {
    let timers = FailureTimers {
        no_response: Some(Duration::from_millis(2000)),
        no_answer: Some(Duration::from_millis(5000)),
    };
    let mut rig = rig(None, router(DEAD, None, timers));
    let out = rig.input(Bytes::from_static(INVITE.as_bytes()), CALLER, 0);
    let invite = requests_to(&out, DEAD, "INVITE")[0].clone();
    rig.input(answer(&invite, 180), DEAD, 100);
    assert!(requests_to(&rig.run_until(5099), DEAD, "CANCEL").is_empty());
    assert_eq!(requests_to(&rig.run_until(5100), DEAD, "CANCEL").len(), 1);
}

fn header<'a>(message: &'a Message, name: &'a str) -> Vec<&'a [u8]> {
    message.headers_named(name).collect()
}

#[test]
fn a_reply_from_the_failure_route_goes_upstream_instead_of_the_best() {
    let mut router = router(ALIVE, None, FailureTimers::default());
    router.then_reply = Some((480, "Gone Fishing", "X-Why", "busy-elsewhere"));
    let mut rig = rig(None, router);
    let out = rig.input(Bytes::from_static(INVITE.as_bytes()), CALLER, 0);
    let invite = requests_to(&out, ALIVE, "INVITE")[0].clone();
    let out = rig.input(answer(&invite, 486), ALIVE, 100);
    let finals: Vec<_> = out
        .iter()
        .filter(|(a, m)| *a == addr(CALLER) && m.status().is_some_and(|s| s >= 200))
        .map(|(_, m)| m)
        .collect();
    let [reply] = &finals[..] else {
        panic!("one final to the caller: {out:?}")
    };
    assert_eq!(reply.status(), Some(480));
    assert_eq!(reply.reason(), Some(&b"Gone Fishing"[..]));
    assert_eq!(header(reply, "X-Why"), [&b"busy-elsewhere"[..]]);
    // Built from the caller's request (§8.2.6): its Via, Call-ID, CSeq, and a To tag of ours.
    let via = reply.header(crate::sip::HeaderName::Via).unwrap();
    assert!(via.starts_with(b"SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-fr-1"));
    let to = String::from_utf8_lossy(reply.header(crate::sip::HeaderName::To).unwrap());
    assert!(to.contains(";tag=mr"), "{to}");
    assert_eq!(
        reply.header(crate::sip::HeaderName::CallId),
        Some(&b"fr-timer-1@127.0.0.1"[..])
    );
    // The callee's 486 is ACKed hop by hop, never relayed.
    assert!(statuses_to(&out, CALLER).iter().all(|s| *s != 486));
}

#[test]
fn a_2xx_or_provisional_reply_from_the_failure_route_sends_the_best_instead() {
    for code in [183, 200] {
        let mut router = router(ALIVE, None, FailureTimers::default());
        router.then_reply = Some((code, "Nope", "X-Why", "x"));
        let mut rig = rig(None, router);
        let out = rig.input(Bytes::from_static(INVITE.as_bytes()), CALLER, 0);
        let invite = requests_to(&out, ALIVE, "INVITE")[0].clone();
        let out = rig.input(answer(&invite, 486), ALIVE, 100);
        assert_eq!(statuses_to(&out, CALLER), [486], "{code}");
    }
}

#[test]
fn header_edits_of_the_failure_route_reach_only_its_new_branches() {
    let mut router = router(DEAD, Some(ALIVE), fr(1000));
    router.then_header = Some(("X-Original-To", "sip:+15551234@example.com"));
    let mut rig = rig(None, router);
    let out = rig.input(Bytes::from_static(INVITE.as_bytes()), CALLER, 0);
    let first = requests_to(&out, DEAD, "INVITE")[0].clone();
    assert!(header(&first, "X-Original-To").is_empty());
    let out = rig.run_until(1000);
    // The first branch's retransmissions stay as it was sent.
    for request in requests_to(&out, DEAD, "INVITE") {
        assert!(header(request, "X-Original-To").is_empty());
    }
    let to_alive = requests_to(&out, ALIVE, "INVITE");
    let [second] = &to_alive[..] else {
        panic!("failed over once: {out:?}")
    };
    assert_eq!(
        header(second, "X-Original-To"),
        [&b"sip:+15551234@example.com"[..]]
    );
    assert_eq!(
        second.request_uri_bytes(),
        Some(&b"sip:gw@127.0.0.10:5080"[..])
    );
}
