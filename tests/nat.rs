//! NAT traversal end to end (RFC 3581, `moonroute-proto/src/nat`): the real server routed by
//! `scripts/default.lua` (`req:nat_detect()`, `req:fix_nated_contact()`, `req:save()`,
//! `req:lookup()`) or by `tests/data/scripts/nat.lua`, with test user agents on loopback.
//!
//! A phone behind a simulated NAT binds its socket on 127.0.0.2 (its "public" address, what
//! the server sees) while its Via and Contact claim the private 192.168.1.10:5060. It
//! registers, and is then reached through the address its REGISTER came from, with the
//! registered contact as Request-URI; over TCP on the very connection it registered on.
//! Keep-alives (OPTIONS over UDP) keep a binding that answers and remove one that does not.
//!
//! Nothing sleeps: every wait is for a message, bounded by a timeout.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use common::ua::{expect_status, header_text, show, Dialog, TestUa, WAIT};
use moonroute::config::{Config, LocationBackend};
use moonroute::location::LocationStore;
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::Message;
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

const DOMAIN: &str = "moonroute.test";
/// What the phone behind the NAT believes its address is.
const PRIVATE: &str = "192.168.1.10:5060";
/// The NAT's public side, as the server sees it.
const PUBLIC_IP: [u8; 4] = [127, 0, 0, 2];

struct Running {
    server: ServerHandle,
    host: Arc<ScriptHost>,
    udp: SocketAddr,
    tcp: SocketAddr,
    _dir: TempDir,
}

impl Running {
    fn store(&self) -> Arc<dyn LocationStore> {
        let registrar = self.host.services().registrar.as_ref().expect("registrar");
        registrar.store().clone()
    }

    /// The contacts bound to `user` now.
    fn contacts(&self, user: &str) -> Vec<String> {
        self.store()
            .lookup(&aor(user), SystemTime::now())
            .into_iter()
            .map(|b| b.contact)
            .collect()
    }
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn aor(user: &str) -> String {
    format!("sip:{user}@{DOMAIN}")
}

/// Two event loops on UDP and TCP of 127.0.0.1, `script`, sled in a fresh directory; `edit`
/// adjusts the rest (`[nat]`).
fn start(script: &str, edit: impl FnOnce(&mut Config)) -> Running {
    let dir = TempDir::new().unwrap();
    let mut config = Config {
        listen: vec![
            "udp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
            "tcp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
        ],
        domains: vec![DOMAIN.to_owned()],
        workers: 2,
        // The shipped default without digest auth (tests/auth.rs covers that part).
        script: match script {
            "scripts/default.lua" => common::default_script_without_auth(),
            other => repo_path(other),
        },
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Sled;
    edit(&mut config);
    config.validate().unwrap();
    let host = ScriptHost::from_config(&config).expect("the script and the store load");
    let store = host.services().registrar.as_ref().unwrap().store().clone();
    let factory = CoreFactory::with_router(&config, host.router_factory()).with_keepalives(store);
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        tcp: server.local_addr(TransportKind::Tcp).unwrap(),
        server,
        host,
        _dir: dir,
    }
}

/// A phone behind the NAT: its socket on 127.0.0.2, its Via and Contact saying 192.168.1.10.
async fn nated_udp_phone(name: &str) -> (TestUa, SocketAddr) {
    let mut ua = TestUa::udp_on(name, SocketAddr::from((PUBLIC_IP, 0))).await;
    let public = ua.local;
    ua.local = PRIVATE.parse().unwrap();
    (ua, public)
}

async fn register(ua: &mut TestUa, user: &str, registrar: Option<SocketAddr>) -> Message {
    if let Some(registrar) = registrar {
        ua.outbound = Some(registrar);
    }
    ua.request("REGISTER", &aor(user))
        .header("Expires", "600")
        .await;
    ua.expect_final(200).await
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn a_phone_behind_a_nat_is_reached_through_its_received_address() {
    let proxy = start("scripts/default.lua", |_| {});
    let (mut alice, public) = nated_udp_phone("alice").await;
    let ok = register(&mut alice, "alice", Some(proxy.udp)).await;
    // The registered contact is the one the phone wrote (it is the Request-URI later).
    let contact = format!("sip:alice@{PRIVATE}");
    assert!(
        header_text(&ok, "Contact").is_some_and(|c| c.contains(&contact)),
        "{}",
        show(&ok)
    );
    let stored = proxy.store().lookup(&aor("alice"), SystemTime::now());
    assert_eq!(stored.len(), 1);
    assert!(stored[0].nated, "saved as NATed: {:?}", stored[0]);
    assert_eq!(stored[0].received, Some((TransportKind::Udp, public)));

    let mut bob = TestUa::udp("bob").await.via_proxy(proxy.udp);
    let _invite = bob.invite(&aor("alice")).send().await;
    let incoming = alice.expect_request("INVITE").await;
    assert_eq!(
        incoming.request_uri_bytes(),
        Some(contact.as_bytes()),
        "the Request-URI is the registered contact\n{}",
        show(&incoming)
    );
    alice.respond(&incoming, 486, "Busy Here").await;
    bob.expect_final(486).await;
}

#[tokio::test]
async fn a_nated_caller_gets_its_contact_fixed() {
    let proxy = start("scripts/default.lua", |_| {});
    let mut bob = TestUa::udp("bob").await;
    register(&mut bob, "bob", Some(proxy.udp)).await;
    assert!(!proxy.store().lookup(&aor("bob"), SystemTime::now())[0].nated);

    let (mut alice, public) = nated_udp_phone("alice").await;
    alice.outbound = Some(proxy.udp);
    let _invite = alice.invite(&aor("bob")).send().await;
    let incoming = bob.expect_request("INVITE").await;
    let contact = header_text(&incoming, "Contact").unwrap();
    assert_eq!(
        contact,
        format!("<sip:alice@{public}>"),
        "{}",
        show(&incoming)
    );
    bob.respond(&incoming, 486, "Busy Here").await;
    alice.expect_final(486).await;
}

#[tokio::test]
async fn over_tcp_the_request_comes_on_the_registering_connection() {
    let proxy = start("scripts/default.lua", |_| {});
    let mut alice = TestUa::tcp("alice", proxy.tcp).await;
    alice.local = PRIVATE.parse().unwrap();
    register(&mut alice, "alice", None).await;
    let stored = proxy.store().lookup(&aor("alice"), SystemTime::now());
    assert!(stored[0].nated, "{:?}", stored[0]);
    assert_eq!(stored[0].received.map(|r| r.0), Some(TransportKind::Tcp));

    let mut bob = TestUa::udp("bob").await.via_proxy(proxy.udp);
    let _invite = bob.invite(&aor("alice")).send().await;
    // Alice has no listener: the only way in is the connection she registered on.
    let incoming = alice.expect_request("INVITE").await;
    assert_eq!(
        text(incoming.request_uri_bytes().unwrap()),
        format!("sip:alice@{PRIVATE};transport=tcp")
    );
    alice.respond(&incoming, 486, "Busy Here").await;
    bob.expect_final(486).await;
}

#[tokio::test]
async fn a_nated_stream_binding_whose_connection_is_gone_is_not_reconnected() {
    let proxy = start("scripts/default.lua", |_| {});
    // A raw connection, so that closing it really closes it; SO_REUSEADDR so that its
    // address can be listened on while it is in TIME_WAIT.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut stream = socket.connect(proxy.tcp).await.unwrap();
    let public = stream.local_addr().unwrap();
    let register = format!(
        "REGISTER sip:{DOMAIN} SIP/2.0\r\n\
         Via: SIP/2.0/TCP {PRIVATE};branch=z9hG4bK-gone-1;rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:gone@{DOMAIN}>;tag=g1\r\nTo: <sip:gone@{DOMAIN}>\r\n\
         Call-ID: gone-1@192.168.1.10\r\nCSeq: 1 REGISTER\r\n\
         Contact: <sip:gone@{PRIVATE};transport=tcp>\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(register.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        text(&buf[..n]).starts_with("SIP/2.0 200"),
        "{}",
        text(&buf[..n])
    );
    assert!(proxy.store().lookup(&aor("gone"), SystemTime::now())[0].nated);
    drop(stream);
    // The server must have seen the close (else the INVITE is written to a dying connection
    // and waits for Timer B): wait, bounded, for its registry to drop the connection.
    let deadline = tokio::time::Instant::now() + WAIT;
    while proxy.server.connection_count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection never closed"
        );
        tokio::task::yield_now().await;
    }
    // A listener where the connection was sees any connection attempt to the NAT.
    let nat = tokio::net::TcpListener::bind(public)
        .await
        .expect("listen where the connection was");

    let mut bob = TestUa::udp("bob").await.via_proxy(proxy.udp);
    let _invite = bob.invite(&aor("gone")).send().await;
    let failed = loop {
        let response = bob.recv_response(WAIT).await;
        if response.status().unwrap() >= 200 {
            break response;
        }
    };
    assert!(
        failed.status().unwrap() >= 500,
        "the branch fails as unreachable: {}",
        show(&failed)
    );
    let attempt = tokio::time::timeout(std::time::Duration::ZERO, nat.accept()).await;
    assert!(
        attempt.is_err(),
        "no connection may be opened to a NATed address"
    );
}

#[tokio::test]
async fn keepalives_keep_answering_bindings_and_remove_silent_ones() {
    let proxy = start("scripts/default.lua", |config| {
        config.nat.keepalive_interval_ms = 200;
        config.nat.keepalive_failures = 2;
    });
    let (mut alive, _) = nated_udp_phone("alive").await;
    let mut silent = TestUa::udp_on("silent", SocketAddr::from(([127, 0, 0, 3], 0))).await;
    silent.local = "10.0.0.7:5060".parse().unwrap();
    register(&mut alive, "alive", Some(proxy.udp)).await;
    register(&mut silent, "silent", Some(proxy.udp)).await;
    assert_eq!(proxy.contacts("silent"), vec!["sip:silent@10.0.0.7:5060"]);

    // Each round probes both; the silent binding goes after two unanswered rounds. A round
    // removes before it probes, so once the alive phone has its probe the removal is done.
    let mut rounds = 0;
    while !proxy.contacts("silent").is_empty() {
        rounds += 1;
        assert!(rounds <= 10, "the silent binding was never removed");
        let probe = alive.expect_request("OPTIONS").await;
        assert_eq!(
            text(probe.request_uri_bytes().unwrap()),
            format!("sip:alive@{PRIVATE}")
        );
        assert_eq!(probe.max_forwards(), Some(Ok(70)));
        let branch = text(probe.top_via().unwrap().branch().unwrap());
        assert!(branch.starts_with("z9hG4bK6b656570616c6976."), "{branch}");
        // Any answer proves it alive, even an error.
        alive.respond(&probe, 404, "Not Found").await;
    }
    assert!(rounds >= 3, "two failed rounds are needed, took {rounds}");
    assert_eq!(
        proxy.contacts("alive"),
        vec![format!("sip:alive@{PRIVATE}")]
    );
    // The silent phone got exactly the two probes it ignored.
    for _ in 0..2 {
        silent.expect_request("OPTIONS").await;
    }
    // The alive one keeps being probed and kept.
    let probe = alive.expect_request("OPTIONS").await;
    alive.respond(&probe, 200, "OK").await;
    let probe = alive.expect_request("OPTIONS").await;
    alive.respond(&probe, 200, "OK").await;
    assert_eq!(proxy.contacts("alive").len(), 1);
}

/// Sends `request` from a raw socket and returns the response arriving at `at`.
async fn response_at(at: &UdpSocket) -> Message {
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(WAIT, at.recv_from(&mut buf))
        .await
        .expect("a response within the wait")
        .expect("UDP receive");
    Message::parse(bytes::Bytes::copy_from_slice(&buf[..n])).unwrap()
}

fn options_without_rport(via_port: u16, ruri: &str, branch: &str, extra: &str) -> String {
    format!(
        "MESSAGE {ruri} SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:{via_port};branch=z9hG4bK-{branch}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:carol@{DOMAIN}>;tag=c1\r\n\
         To: <{ruri}>\r\n\
         Call-ID: rport-{branch}@127.0.0.1\r\n\
         CSeq: 1 MESSAGE\r\n{extra}\
         Content-Length: 0\r\n\r\n"
    )
}

#[tokio::test]
async fn responses_follow_the_source_port_with_force_rport() {
    // [nat] force_rport (the default): a Via without rport whose port is not the source's.
    let proxy = start("scripts/default.lua", |_| {});
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let elsewhere = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let via_port = elsewhere.local_addr().unwrap().port();
    let request = options_without_rport(via_port, &aor("nobody"), "fr1", "");
    socket.send_to(request.as_bytes(), proxy.udp).await.unwrap();
    // A server transaction's answer (lookup found nothing: 404), at the source port.
    let response = response_at(&socket).await;
    expect_status(&response, 404);
    let via = header_text(&response, "Via").unwrap();
    let port = socket.local_addr().unwrap().port();
    assert!(
        via.contains(&format!("received=127.0.0.1;rport={port}")),
        "{via}"
    );
}

#[tokio::test]
async fn without_force_rport_the_script_asks_for_it() {
    let proxy = start("tests/data/scripts/nat.lua", |config| {
        config.nat.force_rport = false;
    });
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let elsewhere = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let via_port = elsewhere.local_addr().unwrap().port();
    // RFC 3261 §18.2.2 to the letter: no rport, the answer goes to the Via's port.
    let request = options_without_rport(via_port, &aor("nobody"), "fr2", "");
    socket.send_to(request.as_bytes(), proxy.udp).await.unwrap();
    let response = response_at(&elsewhere).await;
    expect_status(&response, 404);
    // req:force_rport() in the script: the answer goes to the source port.
    let request = options_without_rport(via_port, &aor("nobody"), "fr3", "X-Force-Rport: yes\r\n");
    socket.send_to(request.as_bytes(), proxy.udp).await.unwrap();
    let response = response_at(&socket).await;
    expect_status(&response, 404);
}

// ----- in-dialog requests to NATed phones (res:fix_nated_contact in on_reply) -------------

/// The script the dialog tests run: the shipped default. Kept in one place so the tests can
/// be pointed at a copy (e.g. one with authentication switched off) when the default changes.
const DIALOG_SCRIPT: &str = "scripts/default.lua";

/// A plain phone on 127.0.0.3 (no NAT), registered as `user`.
async fn registered_phone(proxy: &Running, user: &str) -> TestUa {
    let mut ua = TestUa::udp_on(user, SocketAddr::from(([127, 0, 0, 3], 0))).await;
    register(&mut ua, user, Some(proxy.udp)).await;
    ua.outbound = Some(proxy.udp);
    ua
}

/// The URI host:port of a Contact header value.
fn contact_hostport(m: &Message) -> String {
    let contact = header_text(m, "Contact").expect("Contact");
    let uri = contact.trim_start_matches('<');
    let after_user = uri.split_once('@').map_or(uri, |(_, rest)| rest);
    after_user.split([';', '>', '?']).next().unwrap().to_owned()
}

/// A NATed callee (UDP, 127.0.0.2 claiming 192.168.1.10) answers 200; the caller's ACK and
/// BYE, record-routed through the proxy, reach it at its real address, and the BYE's 200
/// comes back. The Contact is checked before the ACK is sent: a failing fix must not make
/// the proxy send to the private address.
async fn nated_callee_dialog(script: &str) {
    let proxy = start(script, |_| {});
    let (mut alice, public) = nated_udp_phone("alice").await;
    register(&mut alice, "alice", Some(proxy.udp)).await;
    let mut bob = registered_phone(&proxy, "bob").await;

    let _invite = bob.invite(&aor("alice")).send().await;
    let incoming = alice.expect_request("INVITE").await;
    assert!(
        header_text(&incoming, "Record-Route").is_some(),
        "{}",
        show(&incoming)
    );
    let sent = alice.respond(&incoming, 200, "OK").await;
    assert_eq!(contact_hostport(&sent), PRIVATE, "{}", show(&sent));
    let ok = bob.expect_final(200).await;
    assert_eq!(
        contact_hostport(&ok),
        public.to_string(),
        "the callee's Contact is where its answer came from\n{}",
        show(&ok)
    );
    assert!(
        header_text(&ok, "Contact").is_some_and(|c| c.starts_with("<sip:alice@")),
        "the user part stays\n{}",
        show(&ok)
    );

    let mut dialog = bob.ack_2xx(&ok).await;
    assert_eq!(
        dialog.next_hop(),
        proxy.udp,
        "the ACK goes through the proxy"
    );
    let ack = alice.expect_request("ACK").await;
    assert_eq!(
        text(ack.request_uri_bytes().unwrap()),
        format!("sip:alice@{public}"),
        "{}",
        show(&ack)
    );
    let _bye = bob.bye(&mut dialog).await;
    let bye = alice.expect_request("BYE").await;
    alice.respond(&bye, 200, "OK").await;
    bob.expect_final(200).await;
}

#[tokio::test]
async fn ack_and_bye_reach_a_nated_callee() {
    nated_callee_dialog(DIALOG_SCRIPT).await;
}

/// A NATed caller (its INVITE's Contact fixed by `req:fix_nated_contact`): the callee's BYE
/// reaches it through the proxy.
async fn nated_caller_dialog(script: &str) {
    let proxy = start(script, |_| {});
    let mut bob = registered_phone(&proxy, "bob").await;
    let (mut alice, public) = nated_udp_phone("alice").await;
    alice.outbound = Some(proxy.udp);

    let _invite = alice.invite(&aor("bob")).send().await;
    let incoming = bob.expect_request("INVITE").await;
    assert_eq!(contact_hostport(&incoming), public.to_string());
    let answer = bob.respond(&incoming, 200, "OK").await;
    let ok = alice.expect_final(200).await;
    assert_eq!(
        contact_hostport(&ok),
        contact_hostport(&answer),
        "a callee that is not NATed keeps its Contact\n{}",
        show(&ok)
    );
    let _dialog = alice.ack_2xx(&ok).await;
    bob.expect_request("ACK").await;

    let mut dialog = Dialog::from_uas(&incoming, &answer);
    assert_eq!(
        dialog.next_hop(),
        proxy.udp,
        "the BYE goes through the proxy"
    );
    let _bye = bob.bye(&mut dialog).await;
    let bye = alice.expect_request("BYE").await;
    assert_eq!(
        text(bye.request_uri_bytes().unwrap()),
        format!("sip:alice@{public}")
    );
    alice.respond(&bye, 200, "OK").await;
    bob.expect_final(200).await;
}

#[tokio::test]
async fn the_callee_bye_reaches_a_nated_caller() {
    nated_caller_dialog(DIALOG_SCRIPT).await;
}

/// Over TCP: the NATed callee's fixed Contact names its connection's address (an ephemeral
/// port), and the ACK and BYE go on that very connection.
#[tokio::test]
async fn over_tcp_in_dialog_requests_use_the_callee_connection() {
    let proxy = start(DIALOG_SCRIPT, |_| {});
    let mut alice = TestUa::tcp("alice", proxy.tcp).await;
    let public = alice.local;
    alice.local = PRIVATE.parse().unwrap();
    register(&mut alice, "alice", None).await;
    let connections = proxy.server.connection_count();
    let mut bob = registered_phone(&proxy, "bob").await;

    let _invite = bob.invite(&aor("alice")).send().await;
    let incoming = alice.expect_request("INVITE").await;
    alice.respond(&incoming, 200, "OK").await;
    let ok = bob.expect_final(200).await;
    assert_eq!(contact_hostport(&ok), public.to_string(), "{}", show(&ok));
    assert!(
        header_text(&ok, "Contact").is_some_and(|c| c.contains(";transport=tcp")),
        "{}",
        show(&ok)
    );
    let mut dialog = bob.ack_2xx(&ok).await;
    alice.expect_request("ACK").await;
    let _bye = bob.bye(&mut dialog).await;
    let bye = alice.expect_request("BYE").await;
    alice.respond(&bye, 200, "OK").await;
    bob.expect_final(200).await;
    assert_eq!(
        proxy.server.connection_count(),
        connections,
        "no new connection was opened"
    );
}
