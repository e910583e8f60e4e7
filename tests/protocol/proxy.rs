//! The stateful proxy (RFC 3261 §16) in the harness: calls, CANCEL, forking, failover,
//! retransmissions, and the timers that end a branch, with the built-in router or a test
//! router, two event loops.

use std::time::Duration;

use super::harness::{
    config, expect_status, show, BranchOutcome, Config, Decision, FailureDecision, Fault, Harness,
    HeaderName, Message, Meta, RouteHandle, RouteInfo, Routed, Router, Target, UaId,
};
use super::ua::{record_routes, Dialog};

/// The proxy as an open relay to the Request-URI.
fn relay_config() -> Config {
    let mut config = config();
    config.proxy.relay_to_request_uri = true;
    config
}

/// A router relaying new requests to `first` (Record-Routed) and in-dialog ones to their
/// Request-URI; when the first set fails, `then` is tried once (serial failover).
#[derive(Clone)]
struct TestRouter {
    first: Vec<Target>,
    then: Vec<Target>,
}

impl Router for TestRouter {
    fn route(&mut self, request: &mut Message, _meta: &Meta, _info: RouteInfo) -> Routed {
        let in_dialog = request.to().is_ok_and(|to| to.tag().is_some());
        let (targets, record_route) = match in_dialog {
            true => (Vec::new(), false),
            false => (self.first.clone(), true),
        };
        Decision::Relay {
            targets,
            record_route,
            timers: Default::default(),
        }
        .into()
    }

    fn on_failure(
        &mut self,
        _handle: Option<RouteHandle>,
        _request: &Message,
        _best: &Message,
        _branches: &[BranchOutcome],
    ) -> FailureDecision {
        FailureDecision::Targets {
            targets: std::mem::take(&mut self.then),
            timers: Default::default(),
            request: None,
        }
    }
}

fn via_count(m: &Message) -> usize {
    m.values(HeaderName::Via).count()
}

fn method_of_response(m: &Message) -> String {
    m.cseq().unwrap().method.as_str().to_string()
}

fn branch(m: &Message) -> Vec<u8> {
    m.top_via().unwrap().branch().unwrap().to_vec()
}

/// A harness with `alice` (sending to the proxy) and `bob`, routed by `router` when given,
/// else relaying to the Request-URI.
fn alice_and_bob(router: Option<TestRouter>) -> (Harness, UaId, UaId) {
    let mut h = match router {
        Some(router) => Harness::with_router(&config(), router),
        None => Harness::new(&relay_config()),
    };
    let alice = h.add_ua_via_proxy("alice", "127.0.0.1:5070");
    let bob = h.add_ua("bob", "127.0.0.1:5080");
    (h, alice, bob)
}

/// INVITE / 100 / 180 / 200 / ACK / BYE / 200 from `alice` to `bob` through the proxy.
fn call_through(h: &mut Harness, alice: UaId, bob: UaId, request_uri: &str) {
    let invite = h.ua(alice).invite(request_uri);

    let incoming = h.expect_request(bob, "INVITE");
    assert_eq!(incoming.body(), invite.body(), "the SDP offer arrives");
    assert_eq!(incoming.max_forwards().unwrap().unwrap(), 69);
    assert_eq!(via_count(&incoming), 2, "the proxy's Via on top");
    let caller_via =
        String::from_utf8_lossy(incoming.values(HeaderName::Via).nth(1).unwrap().unwrap())
            .into_owned();
    let caller_branch = String::from_utf8_lossy(&branch(&invite)).into_owned();
    assert!(
        caller_via.contains(&caller_branch) && caller_via.contains("received="),
        "the caller's Via kept below, stamped (§18.2.1): {caller_via}"
    );
    let rr = record_routes(&incoming);
    let proxy = h.proxy().to_string();
    assert!(
        !rr.is_empty() && rr[0].contains(&proxy) && rr[0].contains(";lr"),
        "the proxy's loose Record-Route on top, got {rr:?}"
    );
    h.ua(bob).respond(&incoming, 180, "Ringing");
    h.ua(bob).respond(&incoming, 200, "OK");

    assert_eq!(via_count(&h.expect_response(alice, 100)), 1);
    assert_eq!(via_count(&h.expect_response(alice, 180)), 1);
    let answer = h.expect_response(alice, 200);
    assert_eq!(via_count(&answer), 1, "the proxy's Via is removed");
    // Our entry comes back re-signed for the caller (`route_sign`): `q` in the request's
    // copy, `s` in the response's.
    let answered = record_routes(&answer);
    assert!(
        rr[0].contains(";mrs=q") && answered[0].contains(";mrs=s"),
        "{rr:?} {answered:?}"
    );

    let mut dialog = h.ua(alice).ack_2xx(&answer);
    let ack = h.expect_request(bob, "ACK");
    assert_eq!(ack.cseq().unwrap().seq, invite.cseq().unwrap().seq);
    let bob_uri = h.ua(bob).uri();
    assert_eq!(ack.request_uri_bytes(), Some(bob_uri.as_bytes()));
    assert_eq!(via_count(&ack), 2, "the ACK traversed the proxy");

    let bye = h.ua(alice).bye(&mut dialog);
    let incoming_bye = h.expect_request(bob, "BYE");
    assert_eq!(via_count(&incoming_bye), 2, "the BYE traversed the proxy");
    assert_ne!(branch(&incoming_bye), branch(&bye));
    assert!(
        incoming_bye.headers_named("Route").next().is_none(),
        "the proxy's own Route is consumed"
    );
    h.ua(bob).respond(&incoming_bye, 200, "OK");
    let bye_ok = h.expect_response(alice, 200);
    assert_eq!(bye_ok.cseq().unwrap(), bye.cseq().unwrap());
    h.expect_nothing(alice);
    h.expect_nothing(bob);
}

// ----- basic calls ---------------------------------------------------------------------------

#[test]
fn basic_call_relayed_to_the_request_uri() {
    let (mut h, alice, bob) = alice_and_bob(None);
    let bob_uri = h.ua(bob).uri();
    call_through(&mut h, alice, bob, &bob_uri);
}

#[test]
fn basic_call_over_a_static_route() {
    let mut config = config();
    config.proxy.static_route = "sip:bob@127.0.0.1:5080".into();
    let mut h = Harness::new(&config);
    let alice = h.add_ua_via_proxy("alice", "127.0.0.1:5070");
    let bob = h.add_ua("bob", "127.0.0.1:5080");
    let ruri = format!("sip:bob@{}", h.proxy());
    call_through(&mut h, alice, bob, &ruri);
}

/// The built-in router's static route is where initial requests go, whatever Route their
/// sender pre-loaded: a MESSAGE with `Route: <sip:127.0.0.9:5060;lr>` (a foreign host)
/// reaches the static route without that Route, and nothing reaches the foreign host
/// (RFC 3261 §16.6 step 7 would have sent it there).
#[test]
fn a_static_route_ignores_a_preloaded_route() {
    let mut config = config();
    config.proxy.static_route = "sip:bob@127.0.0.1:5080".into();
    let mut h = Harness::new(&config);
    let stranger = h.add_ua_via_proxy("stranger", "127.0.0.1:5070");
    let bob = h.add_ua("bob", "127.0.0.1:5080");
    let ruri = format!("sip:bob@{}", h.proxy());
    h.ua(stranger)
        .request("MESSAGE", &ruri)
        .body("text/plain", "hello")
        .header("Route", "<sip:127.0.0.9:5060;lr>")
        .send();
    let incoming = h.expect_request(bob, "MESSAGE");
    assert!(
        incoming.headers_named("Route").next().is_none(),
        "the pre-loaded Route is not passed on\n{}",
        show(&incoming)
    );
    h.ua(bob).respond(&incoming, 200, "OK");
    h.expect_final(stranger, 200);
    assert!(
        h.lost.is_empty(),
        "the foreign host was reached: {:?}",
        h.lost
    );
}

/// In-dialog requests from the callee back to the caller follow the recorded route too.
#[test]
fn callee_hangs_up_through_the_proxy() {
    let (mut h, alice, bob) = alice_and_bob(None);
    let bob_uri = h.ua(bob).uri();
    h.ua(alice).invite(&bob_uri);
    let incoming = h.expect_request(bob, "INVITE");
    let ok = h.ua(bob).respond(&incoming, 200, "OK");
    let answer = h.expect_final(alice, 200);
    h.ua(alice).ack_2xx(&answer);
    h.expect_request(bob, "ACK");

    let mut dialog = Dialog::from_uas(&incoming, &ok);
    assert_eq!(
        dialog.next_hop(),
        h.proxy(),
        "bob's route set starts at the proxy"
    );
    h.ua(bob).bye(&mut dialog);
    let bye = h.expect_request(alice, "BYE");
    assert_eq!(via_count(&bye), 2, "the BYE traversed the proxy");
    h.ua(alice).respond(&bye, 200, "OK");
    h.expect_response(bob, 200);
}

// ----- CANCEL ----------------------------------------------------------------------------------

#[test]
fn cancel_of_a_ringing_call() {
    let (mut h, alice, bob) = alice_and_bob(None);
    let bob_uri = h.ua(bob).uri();
    let invite = h.ua(alice).invite(&bob_uri);
    let incoming = h.expect_request(bob, "INVITE");
    h.ua(bob).respond(&incoming, 180, "Ringing");
    h.expect_response(alice, 100);
    h.expect_response(alice, 180);

    h.ua(alice).cancel(&invite);
    let cancel = h.expect_request(bob, "CANCEL");
    assert_eq!(
        branch(&cancel),
        branch(&incoming),
        "the CANCEL matches the branch"
    );
    assert_eq!(cancel.cseq().unwrap().seq, incoming.cseq().unwrap().seq);
    h.ua(bob).respond(&cancel, 200, "OK");
    h.ua(bob).respond(&incoming, 487, "Request Terminated");
    let ack = h.expect_request(bob, "ACK");
    assert_eq!(
        branch(&ack),
        branch(&incoming),
        "the proxy ACKs the 487 hop by hop"
    );

    let mut got = Vec::new();
    while got.len() < 2 {
        let r = h.recv_response(alice);
        got.push((method_of_response(&r), r.status().unwrap()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![("CANCEL".to_string(), 200), ("INVITE".to_string(), 487)]
    );
    h.probe_is_next(alice);
}

/// A sloppy callee answers the CANCEL with 200, then the INVITE with a 487 whose only Via is
/// the one of our CANCEL (the proxy's: §9.1 gives a CANCEL one Via). The 487 matches the
/// branch's INVITE client transaction: the caller gets it, with the Vias of its INVITE, not a
/// synthesized 408; twice in a row (the mistake is logged once: only the log is throttled).
#[test]
fn a_487_carrying_only_the_proxys_via_reaches_the_caller() {
    // One event loop: each loop keeps its own log throttle. An address of its own, so the
    // log line counted is this test's.
    let mut h = Harness::new(&Config {
        workers: 1,
        ..relay_config()
    });
    let alice = h.add_ua_via_proxy("alice", "127.0.0.1:5070");
    let bob = h.add_ua("bob", "127.0.0.1:5487");
    let bob_uri = h.ua(bob).uri();
    let proxy = h.proxy();
    let mut log = super::refused_log::subscribe();
    for _ in 0..2 {
        let invite = h.ua(alice).invite(&bob_uri);
        let incoming = h.expect_request(bob, "INVITE");
        let ringing = h.ua(bob).respond(&incoming, 180, "Ringing");
        h.expect_response(alice, 100);
        h.expect_response(alice, 180);
        h.ua(alice).cancel(&invite);
        let cancel = h.expect_request(bob, "CANCEL");
        h.ua(bob).respond(&cancel, 200, "OK");

        let mut sloppy = Message::parse(
            moonroute::sip::ResponseBuilder::new(&incoming, 487, "Request Terminated")
                .to_tag(ringing.to().unwrap().tag().unwrap())
                .build(),
        )
        .unwrap();
        sloppy.remove_headers("Via");
        let cancel_via = cancel.header(HeaderName::Via).unwrap();
        sloppy.prepend_header("Via", cancel_via).unwrap();
        assert_eq!(via_count(&sloppy), 1, "{}", show(&sloppy));
        h.ua(bob).send_raw(&sloppy.to_bytes(), proxy);
        let ack = h.expect_request(bob, "ACK");
        assert_eq!(
            branch(&ack),
            branch(&incoming),
            "the proxy's client transaction took the 487 as its own and ACKed it"
        );

        let mut got = Vec::new();
        while got.len() < 2 {
            let r = h.recv_response(alice);
            got.push((method_of_response(&r), r.status().unwrap(), r));
        }
        got.sort_by_key(|(method, status, _)| (method.clone(), *status));
        let statuses: Vec<(&str, u16)> = got.iter().map(|(m, s, _)| (m.as_str(), *s)).collect();
        assert_eq!(statuses, [("CANCEL", 200), ("INVITE", 487)]);
        let terminated = &got[1].2;
        assert_eq!(via_count(terminated), 1, "{}", show(terminated));
        assert_eq!(branch(terminated), branch(&invite), "the caller's Via");
        assert_eq!(
            terminated.to().unwrap().tag(),
            ringing.to().unwrap().tag(),
            "the callee's 487, not one the proxy made up"
        );
    }
    let bob_addr = h.ua(bob).local;
    assert_eq!(log.count_logged(bob_addr, "only this proxy's Via"), 1);
    h.probe_is_next(alice);
}

// ----- forking and failover --------------------------------------------------------------------

/// `alice` calling `bob` at the proxy, forked by a `TestRouter` to `bob1` and `bob2`.
fn forked(first: &[usize], then: &[usize]) -> (Harness, UaId, UaId, UaId) {
    const CALLEES: [&str; 2] = ["sip:bob1@127.0.0.1:5081", "sip:bob2@127.0.0.1:5082"];
    let pick = |which: &[usize]| -> Vec<Target> {
        which
            .iter()
            .map(|&i| Target::new(CALLEES[i].into(), 1000))
            .collect()
    };
    let router = TestRouter {
        first: pick(first),
        then: pick(then),
    };
    let mut h = Harness::with_router(&config(), router);
    let alice = h.add_ua_via_proxy("alice", "127.0.0.1:5070");
    let bob1 = h.add_ua("bob1", "127.0.0.1:5081");
    let bob2 = h.add_ua("bob2", "127.0.0.1:5082");
    assert_eq!(h.ua(bob1).uri(), CALLEES[0]);
    (h, alice, bob1, bob2)
}

#[test]
fn parallel_fork_2xx_cancels_the_other_branch() {
    let (mut h, alice, bob1, bob2) = forked(&[0, 1], &[]);
    let ruri = format!("sip:bob@{}", h.proxy());
    let invite = h.ua(alice).invite(&ruri);

    let in1 = h.expect_request(bob1, "INVITE");
    let in2 = h.expect_request(bob2, "INVITE");
    assert_eq!(
        in1.request_uri_bytes(),
        Some(&b"sip:bob1@127.0.0.1:5081"[..])
    );
    assert_eq!(
        in2.request_uri_bytes(),
        Some(&b"sip:bob2@127.0.0.1:5082"[..])
    );
    assert_ne!(branch(&in1), branch(&in2));
    h.ua(bob1).respond(&in1, 180, "Ringing");
    h.ua(bob2).respond(&in2, 180, "Ringing");
    h.expect_response(alice, 100);
    h.expect_response(alice, 180);
    h.expect_response(alice, 180);
    h.ua(bob1).respond(&in1, 200, "OK");

    let answer = h.expect_final(alice, 200);
    assert_eq!(answer.call_id().unwrap(), invite.call_id().unwrap());
    let cancel = h.expect_request(bob2, "CANCEL");
    assert_eq!(branch(&cancel), branch(&in2));
    h.ua(bob2).respond(&cancel, 200, "OK");
    h.ua(bob2).respond(&in2, 487, "Request Terminated");
    h.expect_request(bob2, "ACK");

    let mut dialog = h.ua(alice).ack_2xx(&answer);
    h.expect_request(bob1, "ACK");
    h.ua(alice).bye(&mut dialog);
    let bye = h.expect_request(bob1, "BYE");
    h.ua(bob1).respond(&bye, 200, "OK");
    // The 487 of the cancelled branch never reaches alice: the next response is the BYE's.
    let bye_ok = h.recv_response(alice);
    expect_status(&bye_ok, 200);
    assert_eq!(method_of_response(&bye_ok), "BYE", "got\n{}", show(&bye_ok));
    h.expect_nothing(alice);
}

#[test]
fn all_branches_fail_best_response_goes_upstream() {
    let (mut h, alice, bob1, bob2) = forked(&[0, 1], &[]);
    let ruri = format!("sip:bob@{}", h.proxy());
    h.ua(alice).invite(&ruri);

    let in1 = h.expect_request(bob1, "INVITE");
    let in2 = h.expect_request(bob2, "INVITE");
    h.ua(bob1).respond(&in1, 486, "Busy Here");
    let ack1 = h.expect_request(bob1, "ACK");
    assert_eq!(
        branch(&ack1),
        branch(&in1),
        "the proxy's client transaction ACKs the 486"
    );
    h.ua(bob2).respond(&in2, 404, "Not Found");
    let ack2 = h.expect_request(bob2, "ACK");
    assert_eq!(branch(&ack2), branch(&in2));

    // §16.7 step 6: lowest class (4xx), first received within it: the 486.
    let best = h.expect_final(alice, 486);
    assert_eq!(via_count(&best), 1);
    h.probe_is_next(alice);
}

#[test]
fn serial_failover_after_503() {
    let (mut h, alice, bob1, bob2) = forked(&[0], &[1]);
    let ruri = format!("sip:bob@{}", h.proxy());
    h.ua(alice).invite(&ruri);

    let in1 = h.expect_request(bob1, "INVITE");
    h.ua(bob1).respond(&in1, 503, "Service Unavailable");
    h.expect_request(bob1, "ACK");
    let in2 = h.expect_request(bob2, "INVITE");
    assert_eq!(
        in2.request_uri_bytes(),
        Some(&b"sip:bob2@127.0.0.1:5082"[..])
    );
    h.ua(bob2).respond(&in2, 180, "Ringing");
    h.ua(bob2).respond(&in2, 200, "OK");

    h.expect_response(alice, 100);
    h.expect_response(alice, 180);
    let answer = h.expect_response(alice, 200);
    h.ua(alice).ack_2xx(&answer);
    h.expect_request(bob2, "ACK");
    h.expect_nothing(bob1);
}

/// A branch whose next hop refuses the connection fails over at once (§8.1.3.1: a transport
/// error counts as 503), without waiting for Timer B.
#[test]
fn a_refused_connection_fails_over_at_once() {
    let mut h = Harness::with_router(
        &config(),
        TestRouter {
            first: vec![Target::new(
                "sip:nobody@127.0.0.1:5999;transport=tcp".into(),
                1000,
            )],
            then: vec![Target::new("sip:bob@127.0.0.1:5080".into(), 1000)],
        },
    );
    let alice = h.add_ua_via_proxy("alice", "127.0.0.1:5070");
    let bob = h.add_ua("bob", "127.0.0.1:5080");
    let started = h.now();
    let ruri = format!("sip:bob@{}", h.proxy());
    h.ua(alice).invite(&ruri);
    let incoming = h.expect_request(bob, "INVITE");
    assert_eq!(h.now(), started, "no time passed");
    h.ua(bob).respond(&incoming, 200, "OK");
    h.expect_final(alice, 200);
}

// ----- retransmissions and the network ---------------------------------------------------------

#[test]
fn retransmitted_invite_is_absorbed() {
    let (mut h, alice, bob) = alice_and_bob(None);
    h.ua(bob).absorb_retransmissions = false; // see every INVITE the proxy sends
    let bob_uri = h.ua(bob).uri();
    let proxy = h.proxy();
    let invite = h.ua(alice).invite(&bob_uri);
    h.expect_response(alice, 100);
    h.ua(alice).send_raw(invite.source_bytes(), proxy);
    // The server transaction answers the retransmission with its last response.
    h.expect_response(alice, 100);

    let incoming = h.expect_request(bob, "INVITE");
    h.ua(bob).respond(&incoming, 200, "OK");
    let answer = h.expect_response(alice, 200);
    h.ua(alice).ack_2xx(&answer);
    let next = h.expect_request(bob, "ACK");
    assert_eq!(next.call_id().unwrap(), invite.call_id().unwrap());
    h.expect_nothing(bob);
}

/// The network duplicates the caller's INVITE: the copy is absorbed by the server transaction
/// (§17.2.3), whichever loop it reaches; the callee sees one INVITE.
#[test]
fn a_duplicated_invite_is_relayed_once() {
    let (mut h, alice, bob) = alice_and_bob(None);
    h.ua(bob).absorb_retransmissions = false;
    let proxy = h.proxy();
    h.fault(proxy, Fault::Duplicate, 1);
    let bob_uri = h.ua(bob).uri();
    h.ua(alice).invite(&bob_uri);
    h.expect_response(alice, 100);
    h.expect_response(alice, 100);
    let incoming = h.expect_request(bob, "INVITE");
    h.expect_nothing(bob);
    h.ua(bob).respond(&incoming, 486, "Busy Here");
    h.expect_final(alice, 486);
}

/// The proxy's INVITE to the callee is lost: Timer A retransmits it after T1 (§17.1.1.2), and
/// the call goes on.
#[test]
fn a_lost_invite_is_retransmitted_after_t1() {
    let (mut h, alice, bob) = alice_and_bob(None);
    let bob_uri = h.ua(bob).uri();
    let bob_addr = h.ua(bob).local;
    h.fault(bob_addr, Fault::Drop, 1);
    h.ua(alice).invite(&bob_uri);
    h.expect_response(alice, 100);
    h.expect_nothing(bob);
    h.advance(Duration::from_millis(499));
    h.expect_nothing(bob);
    h.advance(Duration::from_millis(1));
    let incoming = h.expect_request(bob, "INVITE");
    h.ua(bob).respond(&incoming, 200, "OK");
    let answer = h.expect_final(alice, 200);
    h.ua(alice).ack_2xx(&answer);
    h.expect_request(bob, "ACK");
}

/// The callee's 200 is lost: the callee retransmits it (its own Timer G job, done here by
/// hand), and the proxy forwards the retransmission statelessly (§16.7 step 5, RFC 6026).
#[test]
fn a_retransmitted_2xx_reaches_the_caller() {
    let (mut h, alice, bob) = alice_and_bob(None);
    let bob_uri = h.ua(bob).uri();
    let proxy = h.proxy();
    h.ua(alice).invite(&bob_uri);
    let incoming = h.expect_request(bob, "INVITE");
    h.fault(proxy, Fault::Drop, 1);
    let ok = h.ua(bob).respond(&incoming, 200, "OK");
    h.expect_response(alice, 100);
    h.expect_nothing(alice);
    h.ua(bob).send_raw(&ok.to_bytes(), proxy);
    let answer = h.expect_final(alice, 200);
    h.ua(alice).ack_2xx(&answer);
    h.expect_request(bob, "ACK");
}

/// The callee's 180 is delayed on the network and arrives after its 200: the caller gets the
/// 200, and the late provisional is not relayed after the final (§16.7 step 5 relays a
/// provisional only while the transaction has no final; RFC 6026 §7.2 Accepted state).
#[test]
fn a_provisional_arriving_after_the_2xx_is_not_relayed() {
    let (mut h, alice, bob) = alice_and_bob(None);
    let bob_uri = h.ua(bob).uri();
    let proxy = h.proxy();
    h.ua(alice).invite(&bob_uri);
    let incoming = h.expect_request(bob, "INVITE");
    h.fault(proxy, Fault::Delay(Duration::from_millis(200)), 1);
    h.ua(bob).respond(&incoming, 180, "Ringing");
    h.run();
    h.ua(bob).respond(&incoming, 200, "OK");
    h.expect_response(alice, 100);
    let answer = h.expect_response(alice, 200);
    h.ua(alice).ack_2xx(&answer);
    h.expect_request(bob, "ACK");
    h.advance(Duration::from_millis(200));
    h.expect_nothing(alice);
}

#[test]
fn stray_and_malformed_responses_are_dropped() {
    let (mut h, alice, _bob) = alice_and_bob(None);
    let proxy = h.proxy();
    let local = h.ua(alice).local;
    let response = |top_branch: &str| {
        format!(
            "SIP/2.0 200 OK\r\n\
             Via: SIP/2.0/UDP {proxy};branch={top_branch}\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bKalice1;rport\r\n\
             From: <sip:alice@{local}>;tag=a1\r\n\
             To: <sip:bob@127.0.0.1>;tag=b1\r\n\
             Call-ID: stray@{local}\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:bob@127.0.0.1:9>\r\n\
             Content-Length: 0\r\n\r\n"
        )
    };
    // No transaction: a foreign branch, one in the proxy's format for each loop, and one
    // naming a loop that does not exist.
    for branch in [
        "z9hG4bKnobody",
        "z9hG4bK0123456789abcdef.0.1",
        "z9hG4bK0123456789abcdef.1.1",
        "z9hG4bK0123456789abcdef.7.1",
    ] {
        h.ua(alice).send_raw(response(branch).as_bytes(), proxy);
    }
    // Malformed: no Via, no CSeq, a bad status line, garbage.
    let malformed: [&[u8]; 4] = [
        b"SIP/2.0 200 OK\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: m1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKm2\r\nCall-ID: m2\r\nContent-Length: 0\r\n\r\n",
        b"SIP/2.0 abc Broken\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKm3\r\n\r\n",
        b"\x00\x01\x02 not SIP at all",
    ];
    for data in malformed {
        h.ua(alice).send_raw(data, proxy);
    }
    h.run();
    assert!(h.sent_by_server.is_empty(), "nothing sent for strays");
    assert!(h.lost.is_empty());
    h.probe_is_next(alice);
}

#[test]
fn max_forwards_zero_gets_483() {
    let (mut h, alice, bob) = alice_and_bob(None);
    let bob_uri = h.ua(bob).uri();
    h.ua(alice).invite_to(&bob_uri).max_forwards(0).send();
    h.expect_final(alice, 483);
    h.expect_nothing(bob);
    h.probe_is_next(alice);
}

// ----- timeouts and unreachable next hops --------------------------------------------------------

/// Timer C (§16.6 step 11: more than 3 minutes; `timer_c_secs`, default 181 s) runs from the
/// last provisional response (§16.7 step 2): at exactly 181 s after the 180 the proxy CANCELs
/// the ringing branch (§16.8), and the caller gets the callee's 487.
#[test]
fn timer_c_cancels_a_ringing_branch_at_181_s() {
    let timer_c = relay_config().timers.timer_c();
    assert_eq!(timer_c, Duration::from_secs(181));
    let (mut h, alice, bob) = alice_and_bob(None);
    let bob_uri = h.ua(bob).uri();
    h.ua(alice).invite(&bob_uri);
    let incoming = h.expect_request(bob, "INVITE");
    h.advance(Duration::from_secs(10));
    h.ua(bob).respond(&incoming, 180, "Ringing");
    h.expect_response(alice, 100);
    h.expect_response(alice, 180);

    h.advance(timer_c - Duration::from_millis(1));
    h.expect_nothing(bob);
    h.advance(Duration::from_millis(1));
    let cancel = h.expect_request(bob, "CANCEL");
    assert_eq!(branch(&cancel), branch(&incoming));
    h.ua(bob).respond(&cancel, 200, "OK");
    h.ua(bob).respond(&incoming, 487, "Request Terminated");
    h.expect_request(bob, "ACK");
    h.expect_final(alice, 487);
    h.probe_is_next(alice);
}

/// A silent callee (its INVITE absorbed, never answered): Timer A retransmits the INVITE at
/// 0.5, 1.5, 3.5, 7.5, 15.5 and 31.5 s (§17.1.1.2), Timer B gives up at 64*T1 = 32 s, and
/// the caller gets 408 then, not before (§16.7 step 6 "the branch counts as 408").
#[test]
fn silent_callee_gets_408_at_32_s() {
    let (mut h, alice, bob) = alice_and_bob(None);
    let bob_uri = h.ua(bob).uri();
    let bob_addr = h.ua(bob).local;
    let started = h.now();
    h.ua(alice).invite(&bob_uri);
    h.expect_request(bob, "INVITE");
    h.expect_response(alice, 100);
    h.advance(Duration::from_secs(32) - Duration::from_millis(1));
    h.expect_nothing(alice);
    h.advance(Duration::from_millis(1));
    h.expect_final(alice, 408);
    let invites: Vec<Duration> = h
        .sent_by_server
        .iter()
        .filter(|(_, to, data)| *to == bob_addr && data.starts_with(b"INVITE"))
        .map(|(at, _, _)| *at - started)
        .collect();
    let expected: Vec<Duration> = [0, 500, 1500, 3500, 7500, 15500, 31500]
        .into_iter()
        .map(Duration::from_millis)
        .collect();
    assert_eq!(invites, expected, "Timer A doubling from T1");
    h.expect_nothing(bob);
    h.probe_is_next(alice);
}

#[test]
fn host_name_next_hop_gets_500() {
    let (mut h, alice, _bob) = alice_and_bob(None);
    h.ua(alice).invite("sip:bob@example.invalid");
    // The branch counts as 503 (unreachable), which goes upstream as 500 (§16.7 step 6).
    let answer = h.expect_final(alice, 500);
    assert_eq!(via_count(&answer), 1);
    h.probe_is_next(alice);
}

/// A name the DNS answers is relayed to the address it gives (RFC 3263 §4).
#[test]
fn host_name_next_hop_resolved_in_the_dns() {
    let (mut h, alice, bob) = alice_and_bob(None);
    h.dns.insert(
        "bob.example.com".into(),
        vec![super::harness::Candidate {
            kind: super::harness::TransportKind::Udp,
            addr: "127.0.0.1:5080".parse().unwrap(),
            tls_name: None,
        }],
    );
    h.ua(alice)
        .request("MESSAGE", "sip:bob@bob.example.com")
        .send();
    let incoming = h.expect_request(bob, "MESSAGE");
    h.ua(bob).respond(&incoming, 200, "OK");
    h.expect_final(alice, 200);
}

/// A next hop the shell cannot reach (TCP connect refused) is reported back at once
/// (§8.1.3.1): the branch counts as 503 and the caller gets 500 without waiting for Timer B.
#[test]
fn refused_tcp_next_hop_gets_500_at_once() {
    let (mut h, alice, _bob) = alice_and_bob(None);
    let started = h.now();
    h.ua(alice).invite("sip:bob@127.0.0.1:5999;transport=tcp");
    let answer = h.expect_final(alice, 500);
    assert_eq!(
        h.now(),
        started,
        "answered by the transport error, not Timer B"
    );
    assert_eq!(via_count(&answer), 1);
    h.probe_is_next(alice);
}
