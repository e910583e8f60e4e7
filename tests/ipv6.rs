//! IPv6 end to end (RFC 3261 §19.1.1 / §25.1 IPv6 references, §18.2.1 and RFC 3581
//! received/rport, §16.6 Via and Record-Route, RFC 5118): the real server listening on `[::1]`
//! (and on 127.0.0.1 for the mixed-family relay), test user agents (`tests/common/ua.rs`) on
//! `[::1]` sockets.
//!
//! Every test first checks that an IPv6 socket can be bound on `::1`; where the sandbox has no
//! IPv6 loopback it prints a note and passes without testing anything. Nothing sleeps: every
//! wait is for a message, bounded by a timeout.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::ua::{expect_status, show, TestUa, WAIT};
use moonroute::config::{Config, LocationBackend};
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::{Contact, HeaderName, Host, Message, Via};
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;

// ----- helpers -------------------------------------------------------------------------------

const V6_LOOPBACK: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// `[::1]:0`: where the test UAs bind.
fn any_v6_port() -> SocketAddr {
    SocketAddr::new(V6_LOOPBACK, 0)
}

/// Whether UDP and TCP sockets can be bound on `::1`; prints why the test is skipped if not.
fn ipv6_loopback(test: &str) -> bool {
    let udp = std::net::UdpSocket::bind(any_v6_port()).map(drop);
    let tcp = std::net::TcpListener::bind(any_v6_port()).map(drop);
    match udp.and(tcp) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("note: {test} skipped: no IPv6 on the loopback interface ({e})");
            false
        }
    }
}

fn listen(spec: &str) -> ListenAddr {
    spec.parse().unwrap()
}

/// A proxy relaying to the Request-URI (the built-in router) on `listen`, two event loops.
fn start_relay(listen: &[&str]) -> ServerHandle {
    let mut config = Config {
        listen: listen.iter().map(|l| self::listen(l)).collect(),
        workers: 2,
        ..Config::default()
    };
    config.proxy.relay_to_request_uri = true;
    Server::start(&config, Arc::new(CoreFactory::new(&config))).expect("server starts")
}

/// The bound address of `kind` in the family of `ip`.
fn bound(server: &ServerHandle, kind: TransportKind, v6: bool) -> SocketAddr {
    server
        .listen_addrs()
        .iter()
        .find(|l| l.kind == kind && l.addr.is_ipv6() == v6)
        .map(|l| l.addr)
        .expect("a listener of that transport and family")
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A server routed by `script` (registrations in memory) on `listen`, and its script host.
fn start_script(
    script: &Path,
    listen: &[&str],
    domains: &[&str],
) -> (ServerHandle, Arc<ScriptHost>) {
    let mut config = Config {
        listen: listen.iter().map(|l| self::listen(l)).collect(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        workers: 2,
        script: script.to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Memory;
    // No CDR file in the working directory's default data_dir (tests/dialog.rs covers it).
    config.dialog.cdr = false;
    let host = ScriptHost::from_config(&config).expect("the script loads");
    let factory = CoreFactory::with_router(&config, host.router_factory());
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    (server, host)
}

fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Via values in order, as written.
fn vias(m: &Message) -> Vec<String> {
    m.values(HeaderName::Via)
        .map(|v| text(v.unwrap()))
        .collect()
}

/// The Record-Route values, without our signature (checked by `without_signature`).
fn record_routes(m: &Message) -> Vec<String> {
    m.values(HeaderName::RecordRoute)
        .map(|v| common::without_signature(&text(v.unwrap())))
        .collect()
}

/// Asserts the top Via is the proxy's, sent by `proxy` over `transport`, written as an IPv6
/// reference when `proxy` is IPv6 (§25.1: sent-by = host [ COLON port ], host = IPv6reference).
fn assert_proxy_via(m: &Message, transport: &str, proxy: SocketAddr) {
    let top = &vias(m)[0];
    let expected = format!("SIP/2.0/{transport} {proxy};branch=z9hG4bK");
    assert!(
        top.starts_with(&expected),
        "the proxy's Via should start with {expected:?}\n{}",
        show(m)
    );
    let via = Via::parse(top.as_bytes()).unwrap();
    assert_eq!(via.host, Host::Ip(proxy.ip()));
    assert_eq!(via.port, Some(proxy.port()));
}

/// Asserts the Via below the proxy's (the caller's) records `source` (§18.2.1, RFC 3581):
/// `received` as the bare address (RFC 3261 §25.1: received = IPv4address / IPv6address; RFC
/// 5118 §4.5), `rport` filled with the source port.
fn assert_stamped(m: &Message, source: SocketAddr) {
    let caller = &vias(m)[1];
    let via = Via::parse(caller.as_bytes()).unwrap();
    assert_eq!(
        via.received().map(text),
        Some(source.ip().to_string()),
        "received records the source address, without brackets: {caller}"
    );
    assert_eq!(via.received_ip(), Some(source.ip()));
    assert_eq!(via.rport(), Some(Some(source.port())), "{caller}");
}

/// INVITE / 100 / 180 / 200 / ACK / BYE / 200 from `alice` to `bob` through a proxy that
/// Record-Routes with `record_route` (top first, as bob sees them); `proxy_out` is the
/// interface the proxy sends to bob from, `transport` the callee side's Via transport.
async fn call(
    alice: &mut TestUa,
    bob: &mut TestUa,
    request_uri: &str,
    proxy_out: SocketAddr,
    transport: &str,
    record_route: &[String],
) {
    let invite = alice.invite(request_uri).await;

    let incoming = bob.expect_request("INVITE").await;
    assert_eq!(incoming.call_id().unwrap(), invite.call_id().unwrap());
    assert_eq!(vias(&incoming).len(), 2, "{}", show(&incoming));
    assert_proxy_via(&incoming, transport, proxy_out);
    assert_stamped(&incoming, alice.local);
    assert_eq!(
        record_routes(&incoming),
        record_route,
        "the proxy's Record-Route\n{}",
        show(&incoming)
    );
    bob.respond(&incoming, 180, "Ringing").await;
    bob.respond(&incoming, 200, "OK").await;

    alice.expect_response(100).await;
    let ringing = alice.expect_response(180).await;
    assert_eq!(vias(&ringing).len(), 1, "the proxy's Via is removed");
    let answer = alice.expect_response(200).await;
    assert_eq!(vias(&answer).len(), 1, "the proxy's Via is removed");
    assert_eq!(record_routes(&answer), record_route);

    let mut dialog = alice.ack_2xx(&answer).await;
    let ack = bob.expect_request("ACK").await;
    assert_eq!(vias(&ack).len(), 2, "the ACK traversed the proxy");
    assert_proxy_via(&ack, transport, proxy_out);
    assert!(
        ack.headers_named("Route").next().is_none(),
        "the proxy consumed its own Route entries\n{}",
        show(&ack)
    );

    alice.bye(&mut dialog).await;
    let bye = bob.expect_request("BYE").await;
    assert_eq!(vias(&bye).len(), 2, "the BYE traversed the proxy");
    assert_proxy_via(&bye, transport, proxy_out);
    assert!(
        bye.headers_named("Route").next().is_none(),
        "the proxy consumed its own Route entries\n{}",
        show(&bye)
    );
    assert_eq!(bye.request_uri_bytes(), Some(bob.uri().as_bytes()));
    bob.respond(&bye, 200, "OK").await;
    let ok = alice.expect_response(200).await;
    assert_eq!(ok.cseq().unwrap().method.as_str(), "BYE");
}

// ----- calls through the proxy ---------------------------------------------------------------

/// A call over UDP `[::1]`: the proxy's Via sent-by and Record-Route URI are IPv6 references,
/// the caller's Via is stamped with received/rport, in-dialog requests come back through the
/// Record-Route and the proxy recognises its own `[::1]` Route.
#[tokio::test]
async fn udp_call_over_ipv6_loopback() {
    if !ipv6_loopback("udp_call_over_ipv6_loopback") {
        return;
    }
    let server = start_relay(&["udp:[::1]:0"]);
    let proxy = bound(&server, TransportKind::Udp, true);
    let mut alice = TestUa::udp_on("alice", any_v6_port())
        .await
        .via_proxy(proxy);
    let mut bob = TestUa::udp_on("bob", any_v6_port()).await;
    assert!(bob.uri().contains("@[::1]:"), "{}", bob.uri());
    let bob_uri = bob.uri();
    let rr = format!("<sip:[::1]:{};transport=udp;lr>", proxy.port());
    call(&mut alice, &mut bob, &bob_uri, proxy, "UDP", &[rr]).await;
}

/// The same call over TCP `[::1]`: the caller's connection carries the responses, the proxy
/// opens its own connection to the callee's `[::1]` listener.
#[tokio::test]
async fn tcp_call_over_ipv6_loopback() {
    if !ipv6_loopback("tcp_call_over_ipv6_loopback") {
        return;
    }
    let server = start_relay(&["udp:[::1]:0", "tcp:[::1]:0"]);
    let proxy = bound(&server, TransportKind::Tcp, true);
    let mut alice = TestUa::tcp("alice", proxy).await;
    let mut bob = TestUa::tcp_listener_on("bob", any_v6_port()).await;
    let bob_uri = bob.uri();
    assert!(bob_uri.ends_with(";transport=tcp"), "{bob_uri}");
    let rr = format!("<sip:[::1]:{};transport=tcp;lr>", proxy.port());
    call(&mut alice, &mut bob, &bob_uri, proxy, "TCP", &[rr]).await;
}

/// In over IPv4, out to an IPv6 callee. The proxy sends from its `[::1]` listener (the family
/// of the next hop) and, as its Record-Route URI differs per interface, Record-Routes twice
/// (§16.6 step 4 and RFC 5658; the rule of `forward_copy`: two entries whenever the inbound
/// and outbound interfaces' URIs differ): the outbound `[::1]` entry on top, which the callee
/// can reach, the inbound 127.0.0.1 entry below it, which the caller can reach. Both are
/// consumed by the proxy when a request of the dialog comes back, in either direction.
#[tokio::test]
async fn mixed_family_relay_record_routes_both_interfaces() {
    if !ipv6_loopback("mixed_family_relay_record_routes_both_interfaces") {
        return;
    }
    let server = start_relay(&["udp:127.0.0.1:0", "udp:[::1]:0"]);
    let proxy4 = bound(&server, TransportKind::Udp, false);
    let proxy6 = bound(&server, TransportKind::Udp, true);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy4);
    let mut bob = TestUa::udp_on("bob", any_v6_port()).await;
    let bob_uri = bob.uri();
    let rr = [
        format!("<sip:[::1]:{};transport=udp;lr>", proxy6.port()),
        format!("<sip:127.0.0.1:{};transport=udp;lr>", proxy4.port()),
    ];
    call(&mut alice, &mut bob, &bob_uri, proxy6, "UDP", &rr).await;

    // The callee's side of a second dialog: bob hangs up, over IPv6 to the proxy, which sends
    // the BYE to alice from its IPv4 listener.
    let invite = alice.invite(&bob_uri).await;
    let incoming = bob.expect_request("INVITE").await;
    let mut bob_dialog =
        common::ua::Dialog::from_uas(&incoming, &bob.respond(&incoming, 200, "OK").await);
    let route_set: Vec<String> = bob_dialog
        .route_set
        .iter()
        .map(|r| common::without_signature(r))
        .collect();
    assert_eq!(route_set, rr);
    assert_eq!(
        bob_dialog.next_hop(),
        proxy6,
        "bob reaches the proxy over IPv6"
    );
    let answer = alice.expect_final(200).await;
    assert_eq!(answer.call_id().unwrap(), invite.call_id().unwrap());
    alice.ack_2xx(&answer).await;
    bob.expect_request("ACK").await;
    bob.bye(&mut bob_dialog).await;
    let bye = alice.expect_request("BYE").await;
    assert_proxy_via(&bye, "UDP", proxy4);
    assert!(
        bye.headers_named("Route").next().is_none(),
        "both of the proxy's Route entries are consumed\n{}",
        show(&bye)
    );
    alice.respond(&bye, 200, "OK").await;
    bob.expect_response(200).await;
}

/// A client whose Via names another host and port (behind a NAT, or just wrong): the proxy
/// records where the request really came from (`received=::1`, `rport=<source port>`, §18.2.1,
/// RFC 3581 §4) and sends the responses there, not to the Via's sent-by.
#[tokio::test]
async fn wrong_via_host_gets_received_and_rport_over_ipv6() {
    if !ipv6_loopback("wrong_via_host_gets_received_and_rport_over_ipv6") {
        return;
    }
    let server = start_relay(&["udp:[::1]:0"]);
    let proxy = bound(&server, TransportKind::Udp, true);
    let mut alice = TestUa::udp_on("alice", any_v6_port()).await;
    let mut bob = TestUa::udp_on("bob", any_v6_port()).await;
    for rport in [true, false] {
        let n = unique();
        // With rport the response goes to the source port; without, to the sent-by port, so
        // that one names alice's real port.
        let sent_by = if rport {
            "[2001:db8::9]:5999".to_owned()
        } else {
            format!("[2001:db8::9]:{}", alice.local.port())
        };
        let request = format!(
            "OPTIONS {} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {sent_by};branch=z9hG4bK-v6-{n}{}\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:alice@[::1]>;tag=a-{n}\r\n\
             To: <{}>\r\n\
             Call-ID: v6-{n}@[::1]\r\n\
             CSeq: 1 OPTIONS\r\n\
             Content-Length: 0\r\n\r\n",
            bob.uri(),
            if rport { ";rport" } else { "" },
            bob.uri()
        );
        alice.send_raw(request.as_bytes(), proxy).await;
        let incoming = bob.expect_request("OPTIONS").await;
        assert_proxy_via(&incoming, "UDP", proxy);
        let all = vias(&incoming);
        let caller = Via::parse(all[1].as_bytes()).unwrap();
        assert_eq!(
            caller.received().map(text).as_deref(),
            Some("::1"),
            "{}",
            show(&incoming)
        );
        // `[nat] force_rport` (the default) records rport also when it was not asked for.
        let expected_rport = Some(Some(alice.local.port()));
        assert_eq!(caller.rport(), expected_rport, "{}", show(&incoming));
        bob.respond(&incoming, 200, "OK").await;
        let answer = alice.expect_response(200).await;
        assert_eq!(text(answer.call_id().unwrap()), format!("v6-{n}@[::1]"));
        let via = answer.top_via().unwrap();
        assert_eq!(
            via.host,
            Host::Ip("2001:db8::9".parse().unwrap()),
            "sent-by untouched"
        );
        assert_eq!(via.received_ip(), Some(V6_LOOPBACK));
    }
}

/// The stateless forwarder (scripts/stateless.lua, §16.11) over `[::1]`: a response matches
/// no transaction and finds its way back by the Vias alone, so the caller's stamped
/// `received`/`rport` must be followed (§18.2.2, RFC 3581 §4), not its wrong sent-by.
#[tokio::test]
async fn stateless_response_follows_received_and_rport_over_ipv6() {
    if !ipv6_loopback("stateless_response_follows_received_and_rport_over_ipv6") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let mut bob = TestUa::udp_on("bob", any_v6_port()).await;
    let shipped = std::fs::read_to_string(repo_path("scripts/stateless.lua")).unwrap();
    let start = shipped.find("NEXT_HOPS = {").expect("NEXT_HOPS");
    let end = start + shipped[start..].find('}').unwrap() + 1;
    let script = format!(
        "{}NEXT_HOPS = {{ \"sip:{}\" }}{}",
        &shipped[..start],
        bob.local,
        &shipped[end..]
    );
    let path = dir.path().join("stateless.lua");
    std::fs::write(&path, script).unwrap();
    let (server, _host) = start_script(&path, &["udp:[::1]:0"], &[]);
    let proxy = bound(&server, TransportKind::Udp, true);
    let mut alice = TestUa::udp_on("alice", any_v6_port()).await;

    let n = unique();
    let request = format!(
        "OPTIONS sip:service@example.test SIP/2.0\r\n\
         Via: SIP/2.0/UDP [2001:db8::9]:5999;branch=z9hG4bK-sl6-{n};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@[::1]>;tag=a-{n}\r\n\
         To: <sip:service@example.test>\r\n\
         Call-ID: sl6-{n}@[::1]\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    );
    alice.send_raw(request.as_bytes(), proxy).await;
    let incoming = bob.expect_request("OPTIONS").await;
    assert_proxy_via(&incoming, "UDP", proxy);
    assert!(text(incoming.top_via().unwrap().branch().unwrap()).ends_with(".sl"));
    assert_stamped(&incoming, alice.local);
    bob.respond(&incoming, 200, "OK").await;
    let answer = alice.expect_response(200).await;
    assert_eq!(text(answer.call_id().unwrap()), format!("sl6-{n}@[::1]"));
    assert_eq!(vias(&answer).len(), 1);
}

// ----- registrar -----------------------------------------------------------------------------

/// REGISTER over `[::1]` with an IPv6 Contact, then a call to the registered user: the proxy
/// (scripts/default.lua) finds the contact and relays to `sip:alice@[::1]:port`. The Request-URI
/// of the REGISTER names the server by its IPv6 address in another spelling
/// (`[0:0:0:0:0:0:0:1]`), which is still "myself".
#[tokio::test]
async fn register_over_ipv6_then_call_the_contact() {
    if !ipv6_loopback("register_over_ipv6_then_call_the_contact") {
        return;
    }
    const DOMAIN: &str = "moonroute.test";
    let (server, _host) = start_script(
        &common::default_script_without_auth(),
        &["udp:[::1]:0"],
        &[DOMAIN],
    );
    let proxy = bound(&server, TransportKind::Udp, true);
    let mut alice = TestUa::udp_on("alice", any_v6_port()).await;
    let contact = alice.uri();
    assert_eq!(contact, format!("sip:alice@[::1]:{}", alice.local.port()));

    let n = unique();
    let aor = format!("sip:alice@{DOMAIN}");
    let register = format!(
        "REGISTER sip:[0:0:0:0:0:0:0:1]:{} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {};branch=z9hG4bK-reg6-{n};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <{aor}>;tag=reg-{n}\r\n\
         To: <{aor}>\r\n\
         Call-ID: reg6-{n}@[::1]\r\n\
         CSeq: 1 REGISTER\r\n\
         Contact: <{contact}>\r\n\
         Expires: 300\r\n\
         Content-Length: 0\r\n\r\n",
        proxy.port(),
        alice.local
    );
    alice.send_raw(register.as_bytes(), proxy).await;
    let ok = alice.recv_response(WAIT).await;
    expect_status(&ok, 200);
    let listed: Vec<String> = ok
        .contacts()
        .filter_map(|c| match c.unwrap() {
            Contact::Addr(a) => Some(text(a.uri.raw())),
            Contact::Star => None,
        })
        .collect();
    assert_eq!(listed, std::slice::from_ref(&contact), "{}", show(&ok));

    let mut bob = TestUa::udp_on("bob", any_v6_port()).await.via_proxy(proxy);
    let invite = bob.invite(&format!("sip:alice@{DOMAIN}")).await;
    let incoming = alice.expect_request("INVITE").await;
    assert_eq!(
        incoming.request_uri_bytes(),
        Some(contact.as_bytes()),
        "the Request-URI is the registered contact\n{}",
        show(&incoming)
    );
    assert_eq!(incoming.call_id().unwrap(), invite.call_id().unwrap());
    assert_proxy_via(&incoming, "UDP", proxy);
    assert_stamped(&incoming, bob.local);
    let rr = format!("<sip:[::1]:{};transport=udp;lr>", proxy.port());
    assert_eq!(record_routes(&incoming), [rr]);
    alice.respond(&incoming, 180, "Ringing").await;
    alice.respond(&incoming, 200, "OK").await;
    bob.expect_response(100).await;
    bob.expect_response(180).await;
    let answer = bob.expect_response(200).await;
    let mut dialog = bob.ack_2xx(&answer).await;
    alice.expect_request("ACK").await;
    bob.bye(&mut dialog).await;
    let bye = alice.expect_request("BYE").await;
    assert!(
        bye.headers_named("Route").next().is_none(),
        "{}",
        show(&bye)
    );
    alice.respond(&bye, 200, "OK").await;
    bob.expect_response(200).await;
}
