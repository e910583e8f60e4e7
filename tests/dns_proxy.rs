//! RFC 3263 through the proxy, end to end: a real DNS server on 127.0.0.1
//! (`tests/common/dns_server.rs`) holds the test zone, the server resolves next hops with it
//! (NAPTR → SRV → A), and test user agents on loopback sockets play the targets. Covers the
//! order of the candidates, failover to the next address on a 503, a refused connection and a
//! timeout (§4.3) with only the final outcome going upstream, a name that does not resolve,
//! caching, and `sip.resolve` from a script. Names under `.test` exist only in the test
//! server; nothing is sent beyond 127.0.0.1. Nothing sleeps: every wait is bounded.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use common::dns_server::{DnsServer, Record, RecordType};
use common::ua::{show, TestUa, WAIT};
use moonroute::config::{Config, LocationBackend};
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::Message;
use moonroute::transport::{ListenAddr, TransportKind};

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
const TTL: u32 = 300;

/// A relaying proxy (to the Request-URI) on UDP and TCP, resolving with `dns`. Default timers:
/// an answering target has Timer B/F (32 s) to answer, however loaded the machine; the one test
/// that waits for a silent target to time out shortens T1 itself.
fn config(dns: &DnsServer) -> Config {
    let mut config = Config {
        listen: vec![
            "udp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
            "tcp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
        ],
        workers: 1,
        ..Config::default()
    };
    config.proxy.relay_to_request_uri = true;
    config.dns = dns.config(1000);
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Memory;
    config
}

fn start(config: &Config) -> (ServerHandle, SocketAddr) {
    let server = Server::start(config, Arc::new(CoreFactory::new(config))).expect("server starts");
    let udp = server.local_addr(TransportKind::Udp).unwrap();
    (server, udp)
}

/// The proxy routed by `tests/data/scripts/resolve.lua` (`sip.resolve` of the X-Hop header).
fn start_script(mut config: Config) -> (ServerHandle, SocketAddr) {
    config.proxy.relay_to_request_uri = false;
    config.script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/scripts/resolve.lua");
    let host = ScriptHost::from_config(&config).expect("the script loads");
    let factory = CoreFactory::with_router(&config, host.router_factory());
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    let udp = server.local_addr(TransportKind::Udp).unwrap();
    (server, udp)
}

/// A port on 127.0.0.1 where nothing listens (bound, then released).
fn closed_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn send_message(alice: &mut TestUa, proxy: SocketAddr, uri: &str) -> Message {
    alice.request("MESSAGE", uri).to(proxy).await
}

#[tokio::test]
async fn naptr_srv_a_order_with_failover_on_503() {
    // NAPTR prefers UDP; its SRV lists carol (priority 10) before bob (priority 20).
    let mut carol = TestUa::udp("carol").await;
    let mut bob = TestUa::udp("bob").await;
    let dns = DnsServer::start(vec![
        Record::naptr(
            "example.test",
            10,
            10,
            "s",
            "SIP+D2U",
            "",
            "_sip._udp.example.test",
            TTL,
        ),
        Record::naptr(
            "example.test",
            20,
            10,
            "s",
            "SIP+D2T",
            "",
            "_sip._tcp.example.test",
            TTL,
        ),
        Record::srv(
            "_sip._udp.example.test",
            20,
            0,
            bob.local.port(),
            "bob.example.test",
            TTL,
        ),
        Record::srv(
            "_sip._udp.example.test",
            10,
            0,
            carol.local.port(),
            "carol.example.test",
            TTL,
        ),
        Record::a("bob.example.test", LOCALHOST, TTL),
        Record::a("carol.example.test", LOCALHOST, TTL),
    ]);
    let (_server, proxy) = start(&config(&dns));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);

    send_message(&mut alice, proxy, "sip:bob@example.test").await;
    let first = carol.expect_request("MESSAGE").await;
    carol.respond(&first, 503, "Service Unavailable").await;
    let second = bob.expect_request("MESSAGE").await;
    assert_ne!(
        common::ua::header_text(&first, "Via"),
        common::ua::header_text(&second, "Via"),
        "each address gets its own transaction (a new branch)"
    );
    bob.respond(&second, 200, "OK").await;
    let answer = alice.recv_response(WAIT).await;
    assert_eq!(
        answer.status(),
        Some(200),
        "only the final outcome goes up:\n{}",
        show(&answer)
    );

    // The answers are cached: a second request asks nothing new.
    let asked = dns.total_queries();
    send_message(&mut alice, proxy, "sip:bob@example.test").await;
    let again = carol.expect_request("MESSAGE").await;
    carol.respond(&again, 200, "OK").await;
    alice.expect_final(200).await;
    assert_eq!(dns.total_queries(), asked, "{:?}", dns.query_log());
    assert_eq!(dns.queries("example.test", RecordType::NAPTR), 1);
    assert_eq!(dns.queries("_sip._udp.example.test", RecordType::SRV), 1);
}

#[tokio::test]
async fn invite_fails_over_on_503_and_the_caller_sees_one_call() {
    let mut carol = TestUa::udp("carol").await;
    let mut bob = TestUa::udp("bob").await;
    let dns = DnsServer::start(vec![
        Record::srv(
            "_sip._udp.pbx.test",
            10,
            0,
            carol.local.port(),
            "a.pbx.test",
            TTL,
        ),
        Record::srv(
            "_sip._udp.pbx.test",
            20,
            0,
            bob.local.port(),
            "b.pbx.test",
            TTL,
        ),
        Record::a("a.pbx.test", LOCALHOST, TTL),
        Record::a("b.pbx.test", LOCALHOST, TTL),
    ]);
    let (_server, proxy) = start(&config(&dns));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);

    alice.invite("sip:bob@pbx.test;transport=udp").await;
    let first = carol.expect_request("INVITE").await;
    carol.respond(&first, 503, "Service Unavailable").await;
    // The proxy's client transaction ACKs the 503 (§17.1.1.3) before the next address.
    carol.expect_request("ACK").await;
    let second = bob.expect_request("INVITE").await;
    bob.respond(&second, 180, "Ringing").await;
    bob.respond(&second, 200, "OK").await;
    alice.expect_response(100).await;
    alice.expect_response(180).await;
    let ok = alice.expect_response(200).await;
    let mut dialog = alice.ack_2xx(&ok).await;
    bob.expect_request("ACK").await;
    alice.bye(&mut dialog).await;
    let bye = bob.expect_request("BYE").await;
    bob.respond(&bye, 200, "OK").await;
    alice.expect_final(200).await;
}

#[tokio::test]
async fn refused_connection_and_timeout_move_to_the_next_address() {
    // TCP: the first address refuses the connection (a transport error, at once).
    let mut bob_tcp = TestUa::tcp_listener("bob").await;
    // UDP: the first address never answers (Timer F), the second does.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut bob_udp = TestUa::udp("bob").await;
    let dns = DnsServer::start(vec![
        Record::srv(
            "_sip._tcp.tcp.test",
            10,
            0,
            closed_tcp_port(),
            "h.tcp.test",
            TTL,
        ),
        Record::srv(
            "_sip._tcp.tcp.test",
            20,
            0,
            bob_tcp.local.port(),
            "h.tcp.test",
            TTL,
        ),
        Record::a("h.tcp.test", LOCALHOST, TTL),
        Record::srv(
            "_sip._udp.udp.test",
            10,
            0,
            silent.local_addr().unwrap().port(),
            "h.udp.test",
            TTL,
        ),
        Record::srv(
            "_sip._udp.udp.test",
            20,
            0,
            bob_udp.local.port(),
            "h.udp.test",
            TTL,
        ),
        Record::a("h.udp.test", LOCALHOST, TTL),
    ]);
    // The silent address times out after Timer F = 64*T1 = 1.6 s; an answering address has as
    // long to answer (a T1 of 10 ms left it 0.64 s, short on a loaded machine).
    let mut config = config(&dns);
    config.timers.t1_ms = 25;
    let (_server, proxy) = start(&config);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);

    send_message(&mut alice, proxy, "sip:bob@tcp.test;transport=tcp").await;
    let request = bob_tcp.expect_request("MESSAGE").await;
    bob_tcp.respond(&request, 200, "OK").await;
    alice.expect_final(200).await;

    send_message(&mut alice, proxy, "sip:bob@udp.test;transport=udp").await;
    silent.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 4096];
    let (got, _) = silent
        .recv_from(&mut buf)
        .expect("the first address is tried first");
    assert!(buf[..got].starts_with(b"MESSAGE "));
    let request = bob_udp.expect_request("MESSAGE").await;
    bob_udp.respond(&request, 200, "OK").await;
    alice.expect_final(200).await;
    drop(silent);
}

#[tokio::test]
async fn every_address_failing_or_no_such_name_gives_500() {
    let dns = DnsServer::start(vec![
        Record::srv(
            "_sip._tcp.down.test",
            10,
            0,
            closed_tcp_port(),
            "h.down.test",
            TTL,
        ),
        Record::srv(
            "_sip._tcp.down.test",
            20,
            0,
            closed_tcp_port(),
            "h.down.test",
            TTL,
        ),
        Record::a("h.down.test", LOCALHOST, TTL),
    ]);
    let (_server, proxy) = start(&config(&dns));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    send_message(&mut alice, proxy, "sip:bob@down.test;transport=tcp").await;
    alice.expect_final(500).await;
    send_message(&mut alice, proxy, "sip:bob@nowhere.test").await;
    alice.expect_final(500).await;
}

#[tokio::test]
async fn a_script_sees_the_ordered_targets_of_sip_resolve() {
    let dns = DnsServer::start(vec![
        Record::srv("_sip._udp.lb.test", 10, 0, 5070, "one.lb.test", TTL),
        Record::srv("_sip._udp.lb.test", 20, 0, 5080, "two.lb.test", TTL),
        Record::a("one.lb.test", Ipv4Addr::new(127, 0, 0, 11), TTL),
        Record::a("two.lb.test", Ipv4Addr::new(127, 0, 0, 12), TTL),
    ]);
    let (_server, proxy) = start_script(config(&dns));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    alice
        .request("MESSAGE", "sip:anyone@127.0.0.1")
        .to(proxy)
        .header("X-Hop", "sip:lb.test;transport=udp")
        .header("X-Test", "show")
        .await;
    let shown = alice.expect_final(200).await;
    assert_eq!(
        String::from_utf8_lossy(shown.reason().unwrap()),
        "sip:127.0.0.11:5070;transport=udp|udp|127.0.0.11|5070 \
         sip:127.0.0.12:5080;transport=udp|udp|127.0.0.12|5080"
    );
    alice
        .request("MESSAGE", "sip:anyone@127.0.0.1")
        .to(proxy)
        .header("X-Hop", "sip:nowhere.test")
        .header("X-Test", "show")
        .await;
    let unresolved = alice.expect_final(502).await;
    assert!(
        String::from_utf8_lossy(unresolved.reason().unwrap()).starts_with("Unresolved: "),
        "{}",
        show(&unresolved)
    );
}

#[tokio::test]
async fn a_hook_waiting_for_dns_blocks_nothing_and_an_invite_gets_100_at_once() {
    let dns = DnsServer::start(vec![Record::a("slow.test", LOCALHOST, TTL)]);
    dns.silence("slow.test");
    let mut config = config(&dns);
    config.dns.timeout_ms = 200;
    let (_server, proxy) = start_script(config);

    let mut alice = TestUa::udp("alice").await.via_proxy(proxy);
    let invite = alice
        .invite("sip:anyone@127.0.0.1")
        .header("X-Hop", "sip:slow.test:5060")
        .await;
    let trying = alice.expect_response(100).await;
    assert_eq!(trying.call_id(), invite.call_id());

    // The loop serves others while the INVITE's hook waits for the silent name server.
    let mut bob = TestUa::udp("bob").await.via_proxy(proxy);
    bob.request("MESSAGE", "sip:anyone@127.0.0.1")
        .header("X-Hop", "sip:127.0.0.1:5999")
        .header("X-Test", "show")
        .await;
    bob.expect_final(200).await;

    // The lookup gives up; the script answers.
    let unresolved = alice.expect_final(502).await;
    assert_eq!(unresolved.call_id(), invite.call_id());
    assert!(dns.queries("slow.test", RecordType::A) >= 1);
}
