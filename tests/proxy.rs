//! The stateful proxy (RFC 3261 §16) over real loopback sockets: the real server with its
//! built-in router or a test router, and test user agents (`tests/common/ua.rs`) as callers and
//! callees. Nothing sleeps: every wait is for a message, bounded by a timeout; timeouts the
//! proxy must hit (Timer B, Timer C) are made short through the configuration.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

use common::ua::{expect_status, show, Dialog, TestUa, WAIT};
use moonroute::config::Config;
use moonroute::proxy::response_context::Target;
use moonroute::proxy::router::{Decision, FailureDecision, RouteHandle, RouteInfo, Routed, Router};
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::{HeaderName, Message};
use moonroute::transport::{ListenAddr, Meta, TransportKind};

/// A configuration listening on UDP and TCP on 127.0.0.1 (ephemeral ports), two event loops.
fn config() -> Config {
    Config {
        listen: vec![
            "udp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
            "tcp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
        ],
        workers: 2,
        ..Config::default()
    }
}

/// The proxy as an open relay to the Request-URI.
fn relay_config() -> Config {
    let mut config = config();
    config.proxy.relay_to_request_uri = true;
    config
}

fn start(config: &Config) -> ServerHandle {
    Server::start(config, Arc::new(CoreFactory::new(config))).expect("server starts")
}

/// A server whose every loop routes with a clone of `router`.
fn start_with<R: Router + Clone + Send + Sync + 'static>(
    config: &Config,
    router: R,
) -> ServerHandle {
    let factory = CoreFactory::with_router(
        config,
        Arc::new(move |_loop_index, _: &_| Box::new(router.clone()) as Box<dyn Router>),
    );
    Server::start(config, Arc::new(factory)).expect("server starts")
}

fn udp_addr(server: &ServerHandle) -> SocketAddr {
    server.local_addr(TransportKind::Udp).unwrap()
}

fn target(ua: &TestUa) -> Target {
    Target::new(Bytes::from(ua.uri()), 1000)
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
        if in_dialog {
            return Decision::Relay {
                targets: Vec::new(),
                record_route: false,
                timers: Default::default(),
            }
            .into();
        }
        Decision::Relay {
            targets: self.first.clone(),
            record_route: true,
            timers: Default::default(),
        }
        .into()
    }

    fn on_failure(
        &mut self,
        _handle: Option<RouteHandle>,
        _request: &Message,
        _best: &Message,
        _branches: &[moonroute::proxy::response_context::BranchOutcome],
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

fn record_routes(m: &Message) -> Vec<String> {
    m.headers_named("Record-Route")
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

fn method_of_response(m: &Message) -> String {
    m.cseq().unwrap().method.as_str().to_string()
}

/// Asserts that the next response `ua` gets is the 200 to an OPTIONS sent to the proxy now:
/// whatever else the proxy sends before it (a stray or duplicate response) fails the test.
async fn probe_is_next(ua: &mut TestUa, proxy: SocketAddr) {
    let options = ua.options(&format!("sip:{proxy}")).to(proxy).await;
    let answer = ua.recv_response(WAIT).await;
    assert_eq!(
        answer.call_id().unwrap(),
        options.call_id().unwrap(),
        "{}: the next response should answer the probe, got\n{}",
        ua.name,
        show(&answer)
    );
    expect_status(&answer, 200);
}

/// INVITE / 100 / 180 / 200 / ACK / BYE / 200 from `alice` (whose outbound proxy is the
/// proxy, or who sends to it) to `bob` through the proxy. `request_uri` is the INVITE's.
async fn call_through(alice: &mut TestUa, bob: &mut TestUa, request_uri: &str, proxy_rr: &str) {
    let invite = alice.invite(request_uri).await;

    let incoming = bob.expect_request("INVITE").await;
    assert_eq!(incoming.body(), invite.body(), "the SDP offer arrives");
    assert_eq!(
        incoming.max_forwards().unwrap().unwrap(),
        69,
        "Max-Forwards decremented"
    );
    assert_eq!(
        via_count(&incoming),
        2,
        "the proxy's Via on top of the caller's"
    );
    let caller_via =
        String::from_utf8_lossy(incoming.values(HeaderName::Via).nth(1).unwrap().unwrap())
            .into_owned();
    let branch = String::from_utf8_lossy(invite.top_via().unwrap().branch().unwrap()).into_owned();
    assert!(
        caller_via.contains(&branch) && caller_via.contains("received="),
        "the caller's Via kept below, stamped (§18.2.1): {caller_via}"
    );
    let rr = record_routes(&incoming);
    assert!(!rr.is_empty(), "Record-Route added:\n{}", show(&incoming));
    assert!(
        rr[0].contains(proxy_rr) && rr[0].contains(";lr"),
        "the proxy's loose Record-Route on top, got {rr:?}"
    );
    bob.respond(&incoming, 180, "Ringing").await;
    bob.respond(&incoming, 200, "OK").await;

    let trying = alice.expect_response(100).await;
    assert_eq!(via_count(&trying), 1);
    let ringing = alice.expect_response(180).await;
    assert_eq!(via_count(&ringing), 1, "the proxy's Via is removed");
    let answer = alice.expect_response(200).await;
    assert_eq!(via_count(&answer), 1, "the proxy's Via is removed");
    // Back in the 2xx, our entry re-signed for the caller (§16.7 step 8, `route_sign`): the
    // callee holds the request's copy (`q`), the caller the response's (`s`).
    let unsigned = |values: Vec<String>| -> Vec<String> {
        values
            .iter()
            .map(|v| common::without_signature(v))
            .collect()
    };
    let answered = record_routes(&answer);
    assert_eq!(
        unsigned(answered.clone()),
        unsigned(rr.clone()),
        "Record-Route comes back in the 2xx"
    );
    assert!(
        rr[0].contains(";mrs=q") && answered[0].contains(";mrs=s"),
        "{rr:?} {answered:?}"
    );

    let mut dialog = alice.ack_2xx(&answer).await;
    assert!(!dialog.route_set.is_empty());
    let ack = bob.expect_request("ACK").await;
    assert_eq!(ack.cseq().unwrap().seq, invite.cseq().unwrap().seq);
    assert_eq!(ack.request_uri_bytes(), Some(bob.uri().as_bytes()));
    assert_eq!(via_count(&ack), 2, "the ACK traversed the proxy");

    let bye = alice.bye(&mut dialog).await;
    let incoming_bye = bob.expect_request("BYE").await;
    assert_eq!(via_count(&incoming_bye), 2, "the BYE traversed the proxy");
    let top = incoming_bye.top_via().unwrap();
    assert!(
        String::from_utf8_lossy(top.branch().unwrap()).starts_with("z9hG4bK"),
        "the proxy's Via on top of the BYE"
    );
    assert_ne!(
        incoming_bye.top_via().unwrap().branch(),
        bye.top_via().unwrap().branch()
    );
    assert_eq!(incoming_bye.call_id().unwrap(), invite.call_id().unwrap());
    assert!(
        incoming_bye.headers_named("Route").next().is_none(),
        "the proxy's own Route is consumed"
    );
    bob.respond(&incoming_bye, 200, "OK").await;
    let bye_ok = alice.expect_response(200).await;
    assert_eq!(bye_ok.cseq().unwrap(), bye.cseq().unwrap());
}

// ----- 1-3: basic calls ---------------------------------------------------------------------

#[tokio::test]
async fn basic_call_relayed_to_the_request_uri() {
    let server = start(&relay_config());
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let mut bob = TestUa::udp("bob").await;
    let bob_uri = bob.uri();
    call_through(&mut alice, &mut bob, &bob_uri, &proxy.to_string()).await;
}

#[tokio::test]
async fn basic_call_over_a_static_route() {
    let mut bob = TestUa::udp("bob").await;
    let mut config = config();
    config.proxy.static_route = bob.uri();
    let server = start(&config);
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    call_through(
        &mut alice,
        &mut bob,
        &format!("sip:bob@{proxy}"),
        &proxy.to_string(),
    )
    .await;
}

/// The built-in router's static route is where initial requests go, whatever Route their
/// sender pre-loaded: a MESSAGE with `Route: <sip:127.0.0.9:PORT;lr>` (127.0.0.9 standing in
/// for a foreign host) reaches the static route without that Route, and nothing reaches the
/// foreign host (RFC 3261 §16.6 step 7 would have sent it there).
#[tokio::test]
async fn a_static_route_ignores_a_preloaded_route() {
    let foreign = tokio::net::UdpSocket::bind("127.0.0.9:0").await.unwrap();
    let foreign_port = foreign.local_addr().unwrap().port();
    let mut bob = TestUa::udp("bob").await;
    let mut config = config();
    config.proxy.static_route = bob.uri();
    let server = start(&config);
    let proxy = udp_addr(&server);
    let mut stranger = TestUa::udp("stranger").await.via_proxy(proxy);
    stranger
        .request("MESSAGE", &format!("sip:bob@{proxy}"))
        .body("text/plain", "hello")
        .header("Route", &format!("<sip:127.0.0.9:{foreign_port};lr>"))
        .await;
    let incoming = bob.expect_request("MESSAGE").await;
    assert!(
        incoming.headers_named("Route").next().is_none(),
        "the pre-loaded Route is not passed on\n{}",
        show(&incoming)
    );
    bob.respond(&incoming, 200, "OK").await;
    stranger.expect_final(200).await;
    let mut buf = [0u8; 2048];
    let reached = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        foreign.recv_from(&mut buf),
    )
    .await;
    assert!(reached.is_err(), "the foreign host was reached");
}

#[tokio::test]
async fn basic_call_from_tcp_to_udp() {
    let server = start(&relay_config());
    let proxy_tcp = server.local_addr(TransportKind::Tcp).unwrap();
    let proxy_udp = udp_addr(&server);
    let mut alice = TestUa::tcp("alice", proxy_tcp).await;
    let mut bob = TestUa::udp("bob").await;
    let bob_uri = bob.uri();
    // The callee sees the UDP side of the proxy on top (a double Record-Route when the
    // transport changes, RFC 5658).
    call_through(&mut alice, &mut bob, &bob_uri, &proxy_udp.to_string()).await;
}

// ----- 4: CANCEL ------------------------------------------------------------------------------

#[tokio::test]
async fn cancel_of_a_ringing_call() {
    let server = start(&relay_config());
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let mut bob = TestUa::udp("bob").await;
    let invite = alice.invite(&bob.uri()).await;
    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 180, "Ringing").await;
    alice.expect_response(100).await;
    alice.expect_response(180).await;

    alice.cancel(&invite).await;
    let cancel = bob.expect_request("CANCEL").await;
    assert_eq!(
        cancel.top_via().unwrap().branch(),
        incoming.top_via().unwrap().branch(),
        "the CANCEL matches the branch's INVITE"
    );
    assert_eq!(cancel.cseq().unwrap().seq, incoming.cseq().unwrap().seq);
    bob.respond(&cancel, 200, "OK").await;
    bob.respond(&incoming, 487, "Request Terminated").await;
    let ack = bob.expect_request("ACK").await;
    assert_eq!(
        ack.top_via().unwrap().branch(),
        incoming.top_via().unwrap().branch(),
        "the proxy ACKs the 487 hop by hop"
    );

    let mut got = Vec::new();
    while got.len() < 2 {
        let r = alice.recv_response(WAIT).await;
        got.push((method_of_response(&r), r.status().unwrap()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![("CANCEL".to_string(), 200), ("INVITE".to_string(), 487)]
    );
    probe_is_next(&mut alice, proxy).await;
}

/// A sloppy callee (issue 18 item 4) answers the CANCEL with 200, then the INVITE with a 487
/// whose only Via is the one of our CANCEL (the proxy's: §9.1 gives a CANCEL one Via). The
/// 487 matches the branch's INVITE client transaction: the caller gets it, with the Vias of
/// its INVITE, not a synthesized 408; twice in a row (the mistake is logged once, and only
/// the log is throttled).
#[tokio::test]
async fn a_487_carrying_only_the_proxys_via_reaches_the_caller() {
    // One event loop: each loop keeps its own log throttle.
    let server = start(&Config {
        workers: 1,
        ..relay_config()
    });
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let mut bob = TestUa::udp("bob").await;
    let mut log = common::refused_log::subscribe();
    for _ in 0..2 {
        let invite = alice.invite(&bob.uri()).await;
        let incoming = bob.expect_request("INVITE").await;
        let ringing = bob.respond(&incoming, 180, "Ringing").await;
        alice.expect_response(100).await;
        alice.expect_response(180).await;
        alice.cancel(&invite).await;
        let cancel = bob.expect_request("CANCEL").await;
        bob.respond(&cancel, 200, "OK").await;

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
        bob.send_raw(&sloppy.to_bytes(), proxy).await;
        let ack = bob.expect_request("ACK").await;
        assert_eq!(
            ack.top_via().unwrap().branch(),
            incoming.top_via().unwrap().branch(),
            "the proxy's client transaction took the 487 as its own and ACKed it"
        );

        let mut got = Vec::new();
        while got.len() < 2 {
            let r = alice.recv_response(WAIT).await;
            got.push((method_of_response(&r), r.status().unwrap(), r));
        }
        got.sort_by_key(|(method, status, _)| (method.clone(), *status));
        let statuses: Vec<(&str, u16)> = got.iter().map(|(m, s, _)| (m.as_str(), *s)).collect();
        assert_eq!(statuses, [("CANCEL", 200), ("INVITE", 487)]);
        let terminated = &got[1].2;
        assert_eq!(via_count(terminated), 1, "{}", show(terminated));
        assert_eq!(
            terminated.top_via().unwrap().branch(),
            invite.top_via().unwrap().branch(),
            "the 487 carries the caller's Via\n{}",
            show(terminated)
        );
        assert_eq!(
            terminated.to().unwrap().tag(),
            ringing.to().unwrap().tag(),
            "the callee's 487, not one the proxy made up"
        );
    }
    // Logged before the first 487 went up, once for both.
    assert_eq!(log.count_logged(bob.local, "only this proxy's Via"), 1);
    probe_is_next(&mut alice, proxy).await;
}

// ----- 5-7: forking ----------------------------------------------------------------------------

#[tokio::test]
async fn parallel_fork_2xx_cancels_the_other_branch() {
    let mut bob1 = TestUa::udp("bob1").await;
    let mut bob2 = TestUa::udp("bob2").await;
    let router = TestRouter {
        first: vec![target(&bob1), target(&bob2)],
        then: Vec::new(),
    };
    let server = start_with(&config(), router);
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let invite = alice.invite(&format!("sip:bob@{proxy}")).await;

    let in1 = bob1.expect_request("INVITE").await;
    let in2 = bob2.expect_request("INVITE").await;
    assert_eq!(in1.request_uri_bytes(), Some(bob1.uri().as_bytes()));
    assert_eq!(in2.request_uri_bytes(), Some(bob2.uri().as_bytes()));
    assert_ne!(
        in1.top_via().unwrap().branch(),
        in2.top_via().unwrap().branch()
    );
    bob1.respond(&in1, 180, "Ringing").await;
    bob2.respond(&in2, 180, "Ringing").await;
    // Both 180s must have reached the proxy before the 200, so bob2's branch may be CANCELled.
    alice.expect_response(100).await;
    alice.expect_response(180).await;
    alice.expect_response(180).await;
    bob1.respond(&in1, 200, "OK").await;

    let answer = alice.expect_final(200).await;
    assert_eq!(answer.call_id().unwrap(), invite.call_id().unwrap());
    let cancel = bob2.expect_request("CANCEL").await;
    assert_eq!(
        cancel.top_via().unwrap().branch(),
        in2.top_via().unwrap().branch()
    );
    bob2.respond(&cancel, 200, "OK").await;
    bob2.respond(&in2, 487, "Request Terminated").await;
    bob2.expect_request("ACK").await;

    let mut dialog = alice.ack_2xx(&answer).await;
    bob1.expect_request("ACK").await;
    alice.bye(&mut dialog).await;
    let bye = bob1.expect_request("BYE").await;
    bob1.respond(&bye, 200, "OK").await;
    // The 487 of the cancelled branch never reaches alice: the next response is the BYE's.
    let bye_ok = alice.recv_response(WAIT).await;
    expect_status(&bye_ok, 200);
    assert_eq!(method_of_response(&bye_ok), "BYE", "got\n{}", show(&bye_ok));
}

#[tokio::test]
async fn all_branches_fail_best_response_goes_upstream() {
    let mut bob1 = TestUa::udp("bob1").await;
    let mut bob2 = TestUa::udp("bob2").await;
    let router = TestRouter {
        first: vec![target(&bob1), target(&bob2)],
        then: Vec::new(),
    };
    let server = start_with(&config(), router);
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    alice.invite(&format!("sip:bob@{proxy}")).await;

    let in1 = bob1.expect_request("INVITE").await;
    let in2 = bob2.expect_request("INVITE").await;
    bob1.respond(&in1, 486, "Busy Here").await;
    let ack1 = bob1.expect_request("ACK").await;
    assert_eq!(
        ack1.top_via().unwrap().branch(),
        in1.top_via().unwrap().branch(),
        "the proxy's client transaction ACKs the 486"
    );
    bob2.respond(&in2, 404, "Not Found").await;
    let ack2 = bob2.expect_request("ACK").await;
    assert_eq!(
        ack2.top_via().unwrap().branch(),
        in2.top_via().unwrap().branch()
    );

    // §16.7 step 6: lowest class (4xx), first received within it: the 486.
    let best = alice.expect_final(486).await;
    assert_eq!(via_count(&best), 1);
    probe_is_next(&mut alice, proxy).await;
}

#[tokio::test]
async fn serial_failover_after_503() {
    let mut bob1 = TestUa::udp("bob1").await;
    let mut bob2 = TestUa::udp("bob2").await;
    let router = TestRouter {
        first: vec![target(&bob1)],
        then: vec![target(&bob2)],
    };
    let server = start_with(&config(), router);
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    alice.invite(&format!("sip:bob@{proxy}")).await;

    let in1 = bob1.expect_request("INVITE").await;
    bob1.respond(&in1, 503, "Service Unavailable").await;
    bob1.expect_request("ACK").await;
    let in2 = bob2.expect_request("INVITE").await;
    assert_eq!(in2.request_uri_bytes(), Some(bob2.uri().as_bytes()));
    bob2.respond(&in2, 180, "Ringing").await;
    bob2.respond(&in2, 200, "OK").await;

    alice.expect_response(100).await;
    alice.expect_response(180).await;
    let answer = alice.expect_response(200).await;
    alice.ack_2xx(&answer).await;
    bob2.expect_request("ACK").await;
}

// ----- 8-10: robustness ----------------------------------------------------------------------

#[tokio::test]
async fn retransmitted_invite_is_absorbed() {
    let server = start(&relay_config());
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let mut bob = TestUa::udp("bob").await;
    bob.absorb_retransmissions = false; // see every INVITE the proxy sends
    let invite = alice.invite(&bob.uri()).await;
    alice.expect_response(100).await;
    alice.send_raw(invite.source_bytes(), proxy).await;
    // The server transaction answers the retransmission with its last response.
    alice.expect_response(100).await;

    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 200, "OK").await;
    let answer = alice.expect_response(200).await;
    alice.ack_2xx(&answer).await;
    let next = bob.recv_request(WAIT).await;
    assert_eq!(
        next.method().unwrap().as_str(),
        "ACK",
        "the INVITE is relayed once, got\n{}",
        show(&next)
    );
}

#[tokio::test]
async fn stray_and_malformed_responses_are_dropped() {
    let server = start(&relay_config());
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await;
    let local = alice.local;
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
        alice.send_raw(response(branch).as_bytes(), proxy).await;
    }
    // Malformed: no Via, no CSeq, a bad status line, garbage.
    let malformed: [&[u8]; 4] = [
        b"SIP/2.0 200 OK\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: m1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKm2\r\nCall-ID: m2\r\nContent-Length: 0\r\n\r\n",
        b"SIP/2.0 abc Broken\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKm3\r\n\r\n",
        b"\x00\x01\x02 not SIP at all",
    ];
    for data in malformed {
        alice.send_raw(data, proxy).await;
    }
    probe_is_next(&mut alice, proxy).await;
}

#[tokio::test]
async fn max_forwards_zero_gets_483() {
    let server = start(&relay_config());
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let bob = TestUa::udp("bob").await;
    alice.invite(&bob.uri()).max_forwards(0).await;
    let answer = alice.recv_response(WAIT).await;
    expect_status(&answer, 483);
    probe_is_next(&mut alice, proxy).await;
}

// ----- 11-12: timeouts and unreachable next hops ---------------------------------------------

#[tokio::test]
async fn timer_c_cancels_a_ringing_branch() {
    // Default T1: Timer C is the only timer that runs out here (a 20 ms T1 also gave bob
    // 1.28 s of Timer B to ring, short on a loaded machine).
    let mut config = relay_config();
    config.timers.timer_c_secs = 1;
    let server = start(&config);
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let mut bob = TestUa::udp("bob").await;
    alice.invite(&bob.uri()).await;
    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 180, "Ringing").await;
    alice.expect_response(100).await;
    alice.expect_response(180).await;

    // Timer C (1 s) fires: the proxy CANCELs the branch.
    let cancel = bob.expect_request("CANCEL").await;
    assert_eq!(
        cancel.top_via().unwrap().branch(),
        incoming.top_via().unwrap().branch()
    );
    bob.respond(&cancel, 200, "OK").await;
    bob.respond(&incoming, 487, "Request Terminated").await;
    bob.expect_request("ACK").await;
    alice.expect_final(487).await;
    probe_is_next(&mut alice, proxy).await;
}

#[tokio::test]
async fn silent_callee_gets_408() {
    // Default T1 (Timer B 32 s): Timer C alone ends the silent branch, deterministically.
    let mut config = relay_config();
    config.timers.timer_c_secs = 1;
    let server = start(&config);
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let mut bob = TestUa::udp("bob").await;
    alice.invite(&bob.uri()).await;
    bob.expect_request("INVITE").await; // and never answers (retransmissions are absorbed)
    alice.expect_response(100).await;
    // Timer C (1 s) with nothing heard: the branch counts as 408 (§16.8), no CANCEL.
    alice.expect_final(408).await;
    probe_is_next(&mut alice, proxy).await;
}

#[tokio::test]
async fn host_name_next_hop_gets_500() {
    let server = start(&relay_config());
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    alice.invite("sip:bob@example.invalid").await;
    // The branch counts as 503 (unreachable), which goes upstream as 500 (§16.7 step 6).
    let answer = alice.expect_final(500).await;
    assert_eq!(via_count(&answer), 1);
    probe_is_next(&mut alice, proxy).await;
}

/// In-dialog requests from the callee back to the caller follow the recorded route too.
#[tokio::test]
async fn callee_hangs_up_through_the_proxy() {
    let server = start(&relay_config());
    let proxy = udp_addr(&server);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let mut bob = TestUa::udp("bob").await;
    alice.invite(&bob.uri()).await;
    let incoming = bob.expect_request("INVITE").await;
    let ok = bob.respond(&incoming, 200, "OK").await;
    let answer = alice.expect_final(200).await;
    alice.ack_2xx(&answer).await;
    bob.expect_request("ACK").await;

    let mut dialog = Dialog::from_uas(&incoming, &ok);
    assert_eq!(
        dialog.next_hop(),
        proxy,
        "bob's route set starts at the proxy"
    );
    bob.bye(&mut dialog).await;
    let bye = alice.expect_request("BYE").await;
    assert_eq!(via_count(&bye), 2, "the BYE traversed the proxy");
    alice.respond(&bye, 200, "OK").await;
    bob.expect_response(200).await;
}

/// A next hop the shell cannot reach (TCP connect refused) is reported back at once
/// (§8.1.3.1): the branch counts as 503 and the caller gets 500 without waiting for Timer B.
#[tokio::test]
async fn refused_tcp_next_hop_gets_500_at_once() {
    let server = start(&relay_config());
    let proxy = udp_addr(&server);
    let closed = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    alice
        .invite(&format!("sip:bob@{closed};transport=tcp"))
        .await;
    let started = std::time::Instant::now();
    let answer = alice.expect_final(500).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "answered by the transport error, not Timer B (32 s)"
    );
    assert_eq!(via_count(&answer), 1);
    probe_is_next(&mut alice, proxy).await;
}
