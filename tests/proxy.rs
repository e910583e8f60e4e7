//! The stateful proxy (RFC 3261 §16) over real loopback sockets, where the transports matter: a
//! call from a TCP caller to a UDP callee through the real server (built-in router), with test
//! user agents (`tests/common/ua.rs`). Nothing sleeps: every wait is for a message, bounded by
//! a timeout. The proxy's protocol behaviour (forking, CANCEL, failover, retransmissions,
//! timers) is tested in process, with simulated time, in `tests/protocol/proxy.rs`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::ua::{show, TestUa};
use moonroute::config::Config;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::{HeaderName, Message};
use moonroute::transport::{ListenAddr, TransportKind};

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

fn udp_addr(server: &ServerHandle) -> SocketAddr {
    server.local_addr(TransportKind::Udp).unwrap()
}

fn via_count(m: &Message) -> usize {
    m.values(HeaderName::Via).count()
}

fn record_routes(m: &Message) -> Vec<String> {
    m.headers_named("Record-Route")
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
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
