//! The shipped `scripts/default.lua`, unchanged, with everything on at once (issue 7): digest
//! authentication (RFC 3261 §22, RFC 2617, RFC 8760), NAT traversal (RFC 3581, `moonroute-proto/src/nat`,
//! keep-alives) and flood protection (pike + ban list), over real UDP and TCP on loopback,
//! with sled (location and subscribers) in a temporary data directory. The users are
//! provisioned through `moonroute::auth::Subscribers` before the server starts.
//!
//! The phones are on 127.0.0.2 (alice, behind a simulated NAT: her Via and Contact say
//! 192.168.1.10:5060), 127.0.0.3 (bob, not NATed), 127.0.0.4 (a stranger) and 127.0.0.5 (a
//! flooder); never on 127.0.0.1, which the script trusts (no rate limit).
//!
//! What a deployment relies on, together: REGISTER challenged (401) and accepted with SHA-256
//! and MD5, refreshed and unregistered with the same nonce and nc + 1; calls from our users
//! challenged (407), delivered without our credentials to the NATed phone's registered
//! contact at its public address (UDP, and TCP on its registering connection), Contacts of
//! NATed callers and callees rewritten, ACK/BYE/re-INVITE through Record-Route; strangers
//! refused (403 relay, 407 forever with wrong credentials, 401 for our AORs); a flood banned
//! while the phones keep working; keep-alives answered keep the binding.
//!
//! In-dialog requests are not challenged: default.lua routes them by `loose_route` before
//! authentication, as Kamailio's default configuration does (`route(WITHINDLG)` before
//! `route(AUTH)`): a UA cannot answer a challenge to an ACK, and re-challenging every BYE
//! would cost a round trip per request for nothing the initial INVITE did not prove. What
//! makes that safe: `loose_route()` is true only for a Route this proxy signed for the dialog
//! (`moonroute-proto/src/proxy/route_sign.rs`), so a stranger's hand-written in-dialog request with
//! `Route: <sip:proxy;lr>` or a tampered signature is answered 404 and relayed nowhere, while
//! the signing key (`<data_dir>/secret`) keeps dialogs routable across a restart.
//!
//! Nothing sleeps: every wait is for a message, bounded by a timeout; waiting for the absence
//! of a message is a bounded wait too.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::auth::{answer_challenge, Answer, Challenge};
use common::flood::Flooder;
use common::ua::{header_text, show, TestUa, WAIT};
use moonroute::auth::Subscriber;
use moonroute::config::{Config, LocationBackend};
use moonroute::location::{Binding, LocationStore};
use moonroute::proxy::RouteSigner;
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::{HeaderName, Message};
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;
use tokio::net::UdpSocket;

const DOMAIN: &str = "moonroute.test";
/// What the phone behind the NAT believes its address is.
const PRIVATE: &str = "192.168.1.10:5060";
const ALICE_IP: [u8; 4] = [127, 0, 0, 2];
const BOB_IP: [u8; 4] = [127, 0, 0, 3];
const STRANGER_IP: [u8; 4] = [127, 0, 0, 4];
const FLOODER_IP: [u8; 4] = [127, 0, 0, 5];

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

    /// What `moonroute ctl ul show` would list for `user`.
    fn bindings(&self, user: &str) -> Vec<Binding> {
        self.store().lookup(&aor(user), SystemTime::now())
    }
}

fn aor(user: &str) -> String {
    format!("sip:{user}@{DOMAIN}")
}

fn password(user: &str) -> String {
    format!("{user}-secret")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The shipped default.lua on UDP and TCP of 127.0.0.1, sled in a fresh data directory,
/// keep-alives on, alice and bob provisioned; `edit` adjusts the configuration.
fn start(edit: impl FnOnce(&mut Config)) -> Running {
    start_in(TempDir::new().unwrap(), edit)
}

impl Running {
    /// Stops the server (its event loops joined, its stores closed) and gives back the data
    /// directory, to start again on it.
    fn stop(self) -> TempDir {
        drop(self.server);
        drop(self.host);
        self._dir
    }
}

/// As [`start`], on the data directory `dir` (which may hold a previous run's data and key),
/// wired as `moonroute run` wires it: Record-Route signed with the server key.
fn start_in(dir: TempDir, edit: impl FnOnce(&mut Config)) -> Running {
    let mut config = Config {
        listen: vec![
            "udp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
            "tcp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
        ],
        domains: vec![DOMAIN.to_owned()],
        workers: 2,
        script: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/default.lua"),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Sled;
    edit(&mut config);
    config.validate().unwrap();
    let host = ScriptHost::from_config(&config).expect("the script and the stores load");
    let auth = host.services().auth.clone().expect("an authenticator");
    for user in ["alice", "bob"] {
        auth.subscribers()
            .add(
                &format!("{user}@{DOMAIN}"),
                &Subscriber::with_password(user, DOMAIN, &password(user)),
            )
            .unwrap();
    }
    let store = host.services().registrar.as_ref().unwrap().store().clone();
    let signer = RouteSigner::new(&config.server_key().unwrap());
    let factory = CoreFactory::with_router(&config, host.router_factory())
        .with_keepalives(store)
        .with_route_signer(signer);
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        tcp: server.local_addr(TransportKind::Tcp).unwrap(),
        server,
        host,
        _dir: dir,
    }
}

/// Alice behind the NAT over UDP: her socket on 127.0.0.2 (the NAT's public side, what the
/// server sees), her Via and Contact saying 192.168.1.10:5060. Returns her public address.
async fn nated_alice(proxy: &Running) -> (TestUa, SocketAddr) {
    let mut ua = TestUa::udp_on("alice", SocketAddr::from((ALICE_IP, 0))).await;
    let public = ua.local;
    ua.local = PRIVATE.parse().unwrap();
    ua.from_domain = Some(DOMAIN.to_owned());
    ua.outbound = Some(proxy.udp);
    (ua, public)
}

/// Bob on 127.0.0.3, not NATed.
async fn plain_bob(proxy: &Running) -> TestUa {
    let mut ua = TestUa::udp_on("bob", SocketAddr::from((BOB_IP, 0))).await;
    ua.from_domain = Some(DOMAIN.to_owned());
    ua.outbound = Some(proxy.udp);
    ua
}

/// The challenge for `algorithm` among a 401's or 407's.
fn challenge(response: &Message, header: &str, algorithm: &str) -> Challenge {
    let list: Vec<Challenge> = response
        .headers_named(header)
        .map(|v| Challenge::parse(&text(v)))
        .collect();
    assert_eq!(
        list.iter()
            .map(|c| c.algorithm.as_str())
            .collect::<Vec<_>>(),
        ["SHA-256", "MD5"],
        "SHA-256 offered first (RFC 8760 §2.4)\n{}",
        show(response)
    );
    list.into_iter().find(|c| c.algorithm == algorithm).unwrap()
}

/// What a phone keeps of its last challenge: the nonce it reuses with an incremented count
/// (RFC 2617 §3.2.2: nc counts the requests sent with that nonce).
struct Credentials {
    user: &'static str,
    challenge: Challenge,
    nc: u32,
}

impl Credentials {
    /// The next credentials value for `method` to `uri` with this nonce (nc + 1).
    fn next(&mut self, method: &str, uri: &str) -> String {
        self.nc += 1;
        answer_challenge(
            &self.challenge,
            &Answer {
                user: self.user,
                password: &password(self.user),
                method,
                uri,
                nc: self.nc,
            },
        )
    }
}

/// REGISTER → 401 → the same REGISTER (CSeq + 1) answering with `algorithm` → 200. Returns
/// the request accepted and the credentials to refresh with.
async fn register(ua: &mut TestUa, user: &'static str, algorithm: &str) -> (Message, Credentials) {
    let first = ua
        .request("REGISTER", &aor(user))
        .header("Expires", "600")
        .await;
    let unauthorized = ua.expect_final(401).await;
    let mut credentials = Credentials {
        user,
        challenge: challenge(&unauthorized, "WWW-Authenticate", algorithm),
        nc: 0,
    };
    let value = credentials.next("REGISTER", &aor(user));
    let accepted = ua
        .request("REGISTER", &aor(user))
        .retry_of(&first)
        .header("Expires", "600")
        .header("Authorization", &value)
        .await;
    ua.expect_final(200).await;
    (accepted, credentials)
}

/// A refresh of the registration `previous` (same Call-ID, CSeq + 1, §10.2.4), with the nonce
/// of the last challenge and nc + 1: accepted without a new challenge.
async fn refresh(ua: &mut TestUa, previous: &Message, credentials: &mut Credentials) -> Message {
    let value = credentials.next("REGISTER", &aor(credentials.user));
    let refreshed = ua
        .request("REGISTER", &aor(credentials.user))
        .retry_of(previous)
        .header("Expires", "600")
        .header("Authorization", &value)
        .await;
    ua.expect_final(200).await;
    refreshed
}

/// INVITE → 407 (ACKed by the UA) → the INVITE again with Proxy-Authorization. Returns the
/// INVITE sent with credentials and the credentials for the next requests.
async fn authenticated_invite(
    ua: &mut TestUa,
    user: &'static str,
    target: &str,
    algorithm: &str,
) -> (Message, Credentials) {
    let first = ua.invite(target).await;
    let required = ua.expect_final(407).await;
    let mut credentials = Credentials {
        user,
        challenge: challenge(&required, "Proxy-Authenticate", algorithm),
        nc: 0,
    };
    let value = credentials.next("INVITE", target);
    let invite = ua
        .invite(target)
        .retry_of(&first)
        .header("Proxy-Authorization", &value)
        .await;
    (invite, credentials)
}

/// An INVITE with the nonce already held (nc + 1): no challenge round trip.
async fn invite_with(ua: &mut TestUa, target: &str, credentials: &mut Credentials) -> Message {
    let value = credentials.next("INVITE", target);
    ua.invite(target)
        .header("Proxy-Authorization", &value)
        .await
}

/// The URI host:port of a Contact header value.
fn contact_hostport(m: &Message) -> String {
    let contact = header_text(m, "Contact").expect("Contact");
    let uri = contact.trim_start_matches('<');
    let after_user = uri.split_once('@').map_or(uri, |(_, rest)| rest);
    after_user.split([';', '>', '?']).next().unwrap().to_owned()
}

/// The next `method` request to the NATed phone, answering the keep-alive probes (OPTIONS)
/// that arrive meanwhile, as a phone does.
async fn request_between_probes(phone: &mut TestUa, method: &str) -> Message {
    loop {
        let request = phone.recv_request(WAIT).await;
        match request.method().map(|m| m.as_str().to_owned()) {
            Some(got) if got == method => return request,
            Some(got) if got == "OPTIONS" => {
                phone.respond(&request, 200, "OK").await;
            }
            _ => panic!(
                "{}: expected a {method}, got\n{}",
                phone.name,
                show(&request)
            ),
        }
    }
}

/// The call after bob's authenticated INVITE was sent: alice (NATed, reached at `public`)
/// receives it with her registered contact as Request-URI and no credentials, answers 200
/// with her private Contact; bob sees that Contact rewritten to `public`; bob's ACK and BYE
/// go through the proxy (Record-Route) unchallenged to alice; the BYE's 200 comes back.
async fn answered_call(
    alice: &mut TestUa,
    bob: &mut TestUa,
    public: SocketAddr,
    proxy: SocketAddr,
) {
    let incoming = request_between_probes(alice, "INVITE").await;
    let registered = match alice.uri().ends_with(";transport=tcp") {
        true => format!("sip:alice@{PRIVATE};transport=tcp"),
        false => format!("sip:alice@{PRIVATE}"),
    };
    assert_eq!(
        text(incoming.request_uri_bytes().unwrap()),
        registered,
        "the Request-URI is the registered contact\n{}",
        show(&incoming)
    );
    assert!(
        header_text(&incoming, "Proxy-Authorization").is_none(),
        "our credentials are not for the next hop (consume_credentials)\n{}",
        show(&incoming)
    );
    assert!(
        header_text(&incoming, "Record-Route").is_some(),
        "{}",
        show(&incoming)
    );
    let answer = alice.respond(&incoming, 200, "OK").await;
    assert_eq!(contact_hostport(&answer), PRIVATE);
    let ok = bob.expect_final(200).await;
    assert_eq!(
        contact_hostport(&ok),
        public.to_string(),
        "the NATed callee's Contact is where its answer came from\n{}",
        show(&ok)
    );

    let mut dialog = bob.ack_2xx(&ok).await;
    assert_eq!(dialog.next_hop(), proxy, "the ACK goes through the proxy");
    let ack = request_between_probes(alice, "ACK").await;
    assert!(
        text(ack.request_uri_bytes().unwrap()).starts_with(&format!("sip:alice@{public}")),
        "{}",
        show(&ack)
    );
    // In-dialog requests are not challenged (Kamailio's default: route(WITHINDLG) comes
    // before route(AUTH)); bob's BYE has no credentials and gets the callee's 200.
    let _bye = bob.bye(&mut dialog).await;
    let bye = request_between_probes(alice, "BYE").await;
    assert!(header_text(&bye, "Proxy-Authorization").is_none());
    alice.respond(&bye, 200, "OK").await;
    bob.expect_final(200).await;
}

#[tokio::test]
async fn a_nated_phone_registers_with_digest_and_is_called_by_an_authenticated_phone() {
    let proxy = start(|_| {});
    let (mut alice, public) = nated_alice(&proxy).await;
    register(&mut alice, "alice", "SHA-256").await;
    let stored = proxy.bindings("alice");
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].contact, format!("sip:alice@{PRIVATE}"));
    assert!(stored[0].nated, "saved as NATed: {:?}", stored[0]);
    assert_eq!(stored[0].received, Some((TransportKind::Udp, public)));

    let mut bob = plain_bob(&proxy).await;
    let (_, _) = register(&mut bob, "bob", "MD5").await;
    let stored = proxy.bindings("bob");
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(!stored[0].nated, "bob is not behind a NAT: {:?}", stored[0]);

    let _invite = authenticated_invite(&mut bob, "bob", &aor("alice"), "MD5").await;
    answered_call(&mut alice, &mut bob, public, proxy.udp).await;
}

#[tokio::test]
async fn over_tcp_the_nated_phone_is_called_on_its_registering_connection() {
    let proxy = start(|_| {});
    let mut alice = TestUa::tcp("alice", proxy.tcp).await;
    let public = alice.local;
    assert_eq!(
        public.ip(),
        std::net::Ipv4Addr::LOCALHOST,
        "TestUa::tcp binds 127.0.0.1"
    );
    alice.local = PRIVATE.parse().unwrap();
    alice.from_domain = Some(DOMAIN.to_owned());
    register(&mut alice, "alice", "SHA-256").await;
    let stored = proxy.bindings("alice");
    assert!(stored[0].nated, "{:?}", stored[0]);
    assert_eq!(stored[0].received, Some((TransportKind::Tcp, public)));
    let connections = proxy.server.connection_count();

    let mut bob = plain_bob(&proxy).await;
    register(&mut bob, "bob", "MD5").await;
    let _invite = authenticated_invite(&mut bob, "bob", &aor("alice"), "SHA-256").await;
    // Alice has no listener: the only way in is the connection she registered on.
    answered_call(&mut alice, &mut bob, public, proxy.udp).await;
    assert_eq!(
        proxy.server.connection_count(),
        connections,
        "no connection was opened to the NATed phone"
    );
}

/// A UDP socket standing for a foreign host: counts what arrives.
async fn listening_host(ip: [u8; 4]) -> (UdpSocket, SocketAddr) {
    let socket = UdpSocket::bind(SocketAddr::from((ip, 0))).await.unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// Nothing arrives at `socket` within a bounded wait.
async fn nothing_arrives(socket: &UdpSocket, wait: Duration) {
    let mut buf = vec![0u8; 65535];
    if let Ok(received) = tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
        let (n, from) = received.unwrap();
        panic!("{from} sent out:\n{}", text(&buf[..n]));
    }
}

#[tokio::test]
async fn strangers_cannot_relay_nor_pass_as_our_users() {
    let proxy = start(|_| {});
    // A "foreign" SIP server the stranger wants to reach through us.
    let (foreign, foreign_addr) = listening_host([127, 0, 0, 6]).await;
    let target = format!("sip:victim@{foreign_addr}");

    // From a foreign domain to a foreign destination: no open relay.
    let mut eve = TestUa::udp_on("eve", SocketAddr::from((STRANGER_IP, 0))).await;
    eve.from_domain = Some("elsewhere.example".to_owned());
    eve.outbound = Some(proxy.udp);
    eve.invite(&target).await;
    let refused = eve.expect_final(403).await;
    assert_eq!(
        refused.reason().map(text).as_deref(),
        Some("Relaying Forbidden")
    );

    // Claiming to be one of our users: challenged, and wrong credentials never get through,
    // neither a wrong password for alice nor a user we do not have.
    let mut mallory = TestUa::udp_on("alice", SocketAddr::from((STRANGER_IP, 0))).await;
    mallory.from_domain = Some(DOMAIN.to_owned());
    mallory.outbound = Some(proxy.udp);
    let mut previous = mallory.invite(&target).await;
    let mut required = mallory.expect_final(407).await;
    for (user, guess) in [("alice", "password"), ("alice", "alice"), ("mallory", "x")] {
        let credentials = answer_challenge(
            &challenge(&required, "Proxy-Authenticate", "MD5"),
            &Answer {
                user,
                password: guess,
                method: "INVITE",
                uri: &target,
                nc: 1,
            },
        );
        previous = mallory
            .invite(&target)
            .retry_of(&previous)
            .header("Proxy-Authorization", &credentials)
            .await;
        required = mallory.expect_final(407).await;
    }
    nothing_arrives(&foreign, Duration::from_millis(300)).await;
}

/// An in-dialog MESSAGE a stranger writes by hand: a To tag, a Route naming the proxy, and a
/// Request-URI on a foreign host.
fn crafted_in_dialog_message(from: SocketAddr, route: &str, request_uri: &str, n: u32) -> String {
    format!(
        "MESSAGE {request_uri} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch=z9hG4bK-crafted-{n};rport\r\n\
         Max-Forwards: 70\r\n\
         Route: {route}\r\n\
         From: <sip:eve@elsewhere.example>;tag=e{n}\r\n\
         To: <{request_uri}>;tag=v{n}\r\n\
         Call-ID: crafted-{n}@{}\r\n\
         CSeq: 1 MESSAGE\r\n\
         Content-Type: text/plain\r\n\
         Content-Length: 5\r\n\r\nhello",
        from.ip()
    )
}

/// The hole found by the end-to-end tests: a stranger's in-dialog request with `Route: <us;lr>`
/// and a foreign Request-URI used to be relayed by `loose_route()` before any authentication.
/// Our Record-Route entries are signed now; a Route naming us without our signature (none, a
/// forged one, or one in any spelling of our address) is not loose-routed: 404, nothing out.
#[tokio::test]
async fn a_crafted_in_dialog_request_from_a_stranger_is_not_relayed() {
    let proxy = start(|_| {});
    let (foreign, foreign_addr) = listening_host([127, 0, 0, 6]).await;
    let victim = format!("sip:victim@{foreign_addr}");
    let mut eve = TestUa::udp_on("eve", SocketAddr::from((STRANGER_IP, 0))).await;
    let routes = [
        format!("<sip:{};lr>", proxy.udp),
        format!("<sip:{};transport=udp;lr>", proxy.udp),
        format!("<sip:{};transport=udp;lr;mrs=0123456789abcdef>", proxy.udp),
        format!("<sip:{DOMAIN};lr>"),
    ];
    for (n, route) in (1..).zip(&routes) {
        let message = crafted_in_dialog_message(eve.local, route, &victim, n);
        eve.send_raw(message.as_bytes(), proxy.udp).await;
        let refused = eve.expect_final(404).await;
        assert_eq!(
            refused.reason().map(text).as_deref(),
            Some("Not Here"),
            "{route}"
        );
    }
    nothing_arrives(&foreign, Duration::from_millis(300)).await;
}

/// A stranger calls our user (allowed, not challenged) and so learns our signed Record-Route;
/// changing one digit of the signature to send into the dialog elsewhere is refused, and the
/// dialog itself keeps working.
#[tokio::test]
async fn a_tampered_route_signature_is_refused() {
    let proxy = start(|_| {});
    let mut bob = plain_bob(&proxy).await;
    register(&mut bob, "bob", "MD5").await;
    let (foreign, foreign_addr) = listening_host([127, 0, 0, 6]).await;

    let mut eve = TestUa::udp_on("eve", SocketAddr::from((STRANGER_IP, 0))).await;
    eve.from_domain = Some("elsewhere.example".to_owned());
    eve.outbound = Some(proxy.udp);
    eve.invite(&aor("bob")).await;
    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 200, "OK").await;
    let ok = eve.expect_final(200).await;
    let mut dialog = eve.ack_2xx(&ok).await;
    bob.expect_request("ACK").await;
    assert_eq!(dialog.route_set.len(), 1, "{:?}", dialog.route_set);
    let signed = dialog.route_set[0].clone();
    assert!(
        signed.contains(";mrs="),
        "our Record-Route is signed: {signed}"
    );

    let mut tampered = dialog.clone();
    // The last digit of the MAC (`;mrs=s<expiry>.<16 hex digits>`).
    let at = signed.find(";mrs=").unwrap() + ";mrs=".len() + 25;
    let digit = if signed.as_bytes()[at] == b'0' {
        "1"
    } else {
        "0"
    };
    tampered.route_set[0] = format!("{}{digit}{}", &signed[..at], &signed[at + 1..]);
    tampered.remote_target = format!("sip:victim@{foreign_addr}");
    eve.in_dialog("MESSAGE", &mut tampered)
        .body("text/plain", "hello")
        .await;
    eve.expect_final(404).await;
    nothing_arrives(&foreign, Duration::from_millis(300)).await;

    // The untouched route set still routes: the BYE reaches bob.
    eve.bye(&mut dialog).await;
    let bye = bob.expect_request("BYE").await;
    bob.respond(&bye, 200, "OK").await;
    eve.expect_final(200).await;
}

/// Dialogs outlive a restart of the proxy: the key signing Record-Route is kept in
/// `<data_dir>/secret`, so a BYE carrying the Route issued before the restart is routed after
/// it by the new process.
#[tokio::test]
async fn in_dialog_routing_survives_a_restart() {
    let first = start(|_| {});
    let (udp, tcp) = (first.udp, first.tcp);
    let mut bob = plain_bob(&first).await;
    register(&mut bob, "bob", "MD5").await;
    let mut eve = TestUa::udp_on("eve", SocketAddr::from((STRANGER_IP, 0))).await;
    eve.from_domain = Some("elsewhere.example".to_owned());
    eve.outbound = Some(udp);
    eve.invite(&aor("bob")).await;
    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 200, "OK").await;
    let ok = eve.expect_final(200).await;
    let mut dialog = eve.ack_2xx(&ok).await;
    bob.expect_request("ACK").await;
    let dir = first.stop();
    assert!(
        dir.path().join("secret").exists(),
        "the key is in the data directory"
    );

    // The same data directory and addresses (the route set names them).
    let _second = start_in(dir, |config| {
        config.listen = vec![
            format!("udp:{udp}").parse::<ListenAddr>().unwrap(),
            format!("tcp:{tcp}").parse::<ListenAddr>().unwrap(),
        ];
    });
    eve.bye(&mut dialog).await;
    let bye = bob.expect_request("BYE").await;
    assert!(
        bye.headers_named("Route").next().is_none(),
        "our Route entry was consumed\n{}",
        show(&bye)
    );
    bob.respond(&bye, 200, "OK").await;
    eve.expect_final(200).await;
}

#[tokio::test]
async fn a_flood_does_not_disturb_registered_phones_and_gets_banned() {
    const FLOOD: u32 = 600;
    const LIMIT: u32 = 100;
    let proxy = start(|config| {
        config.pike.max_requests = LIMIT;
        // What is tested is the script's ban. A debug build on a loaded machine can be
        // 500 ms behind its socket during the burst and would then (rightly) refuse the
        // phones' new requests too; tests/flood.rs tests the receive-lag limit.
        config.limits.overload_after_ms = 0;
    });
    let (mut alice, public) = nated_alice(&proxy).await;
    let (mut registration, mut alice_credentials) = register(&mut alice, "alice", "SHA-256").await;
    let mut bob = plain_bob(&proxy).await;
    register(&mut bob, "bob", "MD5").await;
    let (_, mut bob_credentials) =
        authenticated_invite(&mut bob, "bob", &aor("alice"), "SHA-256").await;
    answered_call(&mut alice, &mut bob, public, proxy.udp).await;

    // The flood, as fast as the socket takes it; every 100 requests alice refreshes her
    // registration and bob calls her, both reusing their nonce with nc + 1 (no challenge).
    let mut flooder = Flooder::bind(FLOODER_IP, DOMAIN).await;
    let mut exchanges = 0;
    for n in 1..=FLOOD {
        flooder.send(proxy.udp, "alice").await;
        if n % 100 == 0 {
            registration = refresh(&mut alice, &registration, &mut alice_credentials).await;
            invite_with(&mut bob, &aor("alice"), &mut bob_credentials).await;
            answered_call(&mut alice, &mut bob, public, proxy.udp).await;
            exchanges += 1;
        }
    }
    assert_eq!(
        exchanges,
        FLOOD / 100,
        "every exchange during the flood succeeded"
    );
    assert_eq!(alice_credentials.nc, 1 + FLOOD / 100);
    assert_eq!(bob_credentials.nc, 1 + FLOOD / 100);

    // The flooder was challenged up to pike's limit (at most twice it, should the burst
    // straddle two windows), then banned: its requests are dropped.
    let answered = flooder.drain(Duration::from_millis(500), 407).await;
    assert!(
        (LIMIT as usize..=2 * LIMIT as usize).contains(&answered),
        "answered {answered} of {FLOOD} flood requests"
    );
    let ban = format!("ipban:{}", std::net::Ipv4Addr::from(FLOODER_IP));
    assert!(
        proxy.host.services().kv.get(&ban, Instant::now()).is_some(),
        "{ban} in sip.kv"
    );
    flooder.send(proxy.udp, "alice").await;
    assert_eq!(
        flooder.drain(Duration::from_millis(300), 407).await,
        0,
        "banned"
    );

    // The phones are served after the flood too, and were never banned.
    refresh(&mut alice, &registration, &mut alice_credentials).await;
    invite_with(&mut bob, &aor("alice"), &mut bob_credentials).await;
    answered_call(&mut alice, &mut bob, public, proxy.udp).await;
    for ip in [ALICE_IP, BOB_IP] {
        let key = format!("ipban:{}", std::net::Ipv4Addr::from(ip));
        assert!(
            proxy.host.services().kv.get(&key, Instant::now()).is_none(),
            "{key}"
        );
    }
    assert_eq!(proxy.bindings("alice").len(), 1);
}

#[tokio::test]
async fn keepalives_keep_the_binding_of_a_nated_phone_that_answers() {
    let proxy = start(|config| {
        config.nat.keepalive_interval_ms = 100;
        config.nat.keepalive_failures = 2;
    });
    let (mut alice, public) = nated_alice(&proxy).await;
    register(&mut alice, "alice", "SHA-256").await;
    // More probes than the failures that would remove the binding, each answered.
    for _ in 0..4 {
        let probe = alice.expect_request("OPTIONS").await;
        assert_eq!(
            text(probe.request_uri_bytes().unwrap()),
            format!("sip:alice@{PRIVATE}")
        );
        assert!(
            header_text(&probe, "Authorization").is_none()
                && header_text(&probe, "Proxy-Authorization").is_none()
        );
        alice.respond(&probe, 200, "OK").await;
    }
    let stored = proxy.bindings("alice");
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].received, Some((TransportKind::Udp, public)));
    // Still reachable: bob calls her (the probes did not disturb the registration).
    let mut bob = plain_bob(&proxy).await;
    register(&mut bob, "bob", "MD5").await;
    let _invite = authenticated_invite(&mut bob, "bob", &aor("alice"), "MD5").await;
    answered_call(&mut alice, &mut bob, public, proxy.udp).await;
}

#[tokio::test]
async fn a_nated_caller_is_challenged_at_its_public_address_and_reached_in_the_dialog() {
    let proxy = start(|_| {});
    let mut bob = plain_bob(&proxy).await;
    register(&mut bob, "bob", "MD5").await;
    let (mut alice, public) = nated_alice(&proxy).await;
    // No registration: a caller need not be registered. The 407 comes to her public
    // address (rport, RFC 3581 §4), where her answer goes from.
    let _invite = authenticated_invite(&mut alice, "alice", &aor("bob"), "SHA-256").await;
    let incoming = bob.expect_request("INVITE").await;
    assert!(header_text(&incoming, "Proxy-Authorization").is_none());
    assert_eq!(
        contact_hostport(&incoming),
        public.to_string(),
        "the NATed caller's Contact is where it sends from\n{}",
        show(&incoming)
    );
    // The callee hangs up: its BYE (no credentials: in dialog) reaches alice through the NAT.
    let bye = callee_hangs_up_on(&mut alice, &mut bob, &incoming, proxy.udp).await;
    assert_eq!(
        text(bye.request_uri_bytes().unwrap()),
        format!("sip:alice@{public}")
    );
    alice.respond(&bye, 200, "OK").await;
    bob.expect_final(200).await;
}

/// The callee answers `incoming` 200, the NATed caller ACKs, then the callee sends BYE, which
/// must go through the proxy (its Record-Route) and reach the caller: returns that BYE.
async fn callee_hangs_up_on(
    caller: &mut TestUa,
    callee: &mut TestUa,
    incoming: &Message,
    proxy: SocketAddr,
) -> Message {
    let answer = callee.respond(incoming, 200, "OK").await;
    let ok = caller.expect_final(200).await;
    let _dialog = caller.ack_2xx(&ok).await;
    callee.expect_request("ACK").await;
    let mut dialog = common::ua::Dialog::from_uas(incoming, &answer);
    assert_eq!(dialog.next_hop(), proxy, "the BYE goes through the proxy");
    let _bye = callee.bye(&mut dialog).await;
    caller.expect_request("BYE").await
}

#[tokio::test]
async fn an_authenticated_invite_to_a_nated_phone_can_be_cancelled() {
    let proxy = start(|_| {});
    let (mut alice, _public) = nated_alice(&proxy).await;
    register(&mut alice, "alice", "SHA-256").await;
    let mut bob = plain_bob(&proxy).await;
    let (invite, _) = authenticated_invite(&mut bob, "bob", &aor("alice"), "MD5").await;
    let incoming = alice.expect_request("INVITE").await;
    alice.respond(&incoming, 180, "Ringing").await;
    // 100 Trying from the proxy first, then the callee's 180.
    while bob.recv_response(WAIT).await.status() != Some(180) {}
    // A CANCEL cannot be challenged (RFC 3261 §22.1): it has no credentials and must pass.
    bob.cancel(&invite).await;
    let cancel = alice.expect_request("CANCEL").await;
    alice.respond(&cancel, 200, "OK").await;
    alice.respond(&incoming, 487, "Request Terminated").await;
    let mut finals = Vec::new();
    while finals.len() < 2 {
        let response = bob.recv_response(WAIT).await;
        if response.status().unwrap() >= 200 {
            finals.push((
                response.status().unwrap(),
                text(response.cseq().unwrap().method.as_str().as_bytes()),
            ));
        }
    }
    finals.sort();
    assert_eq!(
        finals,
        [(200, "CANCEL".to_owned()), (487, "INVITE".to_owned())]
    );
    alice.expect_request("ACK").await;
}

#[tokio::test]
async fn a_stranger_may_call_our_users_without_credentials_but_not_register_them() {
    let proxy = start(|_| {});
    let (mut alice, _public) = nated_alice(&proxy).await;
    register(&mut alice, "alice", "SHA-256").await;
    // A call from outside (From in a foreign domain) to our user: not challenged (it cannot
    // have credentials here), delivered.
    let mut eve = TestUa::udp_on("eve", SocketAddr::from((STRANGER_IP, 0))).await;
    eve.from_domain = Some("elsewhere.example".to_owned());
    eve.outbound = Some(proxy.udp);
    eve.invite(&aor("alice")).await;
    let incoming = alice.expect_request("INVITE").await;
    alice.respond(&incoming, 486, "Busy Here").await;
    eve.expect_final(486).await;
    // Registering alice's AOR to the stranger's phone: challenged, never accepted.
    let mut hijack = TestUa::udp_on("alice", SocketAddr::from((STRANGER_IP, 0))).await;
    hijack.outbound = Some(proxy.udp);
    hijack
        .request("REGISTER", &aor("alice"))
        .header("Expires", "600")
        .await;
    hijack.expect_final(401).await;
    assert_eq!(proxy.bindings("alice").len(), 1, "only alice's own binding");
}

#[tokio::test]
async fn a_nat_rebinding_moves_the_binding_and_an_unregister_removes_it() {
    let proxy = start(|_| {});
    let (mut alice, first_public) = nated_alice(&proxy).await;
    let (registration, mut credentials) = register(&mut alice, "alice", "SHA-256").await;
    // The NAT gives the phone a new public port (its mapping expired): the refresh (same
    // Call-ID, CSeq + 1, the same nonce with nc + 1) comes from there.
    let (mut moved, public) = nated_alice(&proxy).await;
    assert_ne!(public, first_public);
    let registration = refresh(&mut moved, &registration, &mut credentials).await;
    let stored = proxy.bindings("alice");
    assert_eq!(stored.len(), 1, "the same contact, one binding: {stored:?}");
    assert_eq!(stored[0].received, Some((TransportKind::Udp, public)));
    // Calls now reach the new mapping.
    let mut bob = plain_bob(&proxy).await;
    let _invite = authenticated_invite(&mut bob, "bob", &aor("alice"), "MD5").await;
    answered_call(&mut moved, &mut bob, public, proxy.udp).await;

    // Unregistering (Expires: 0, RFC 3261 §10.2.2) the contact the phone registered.
    let value = credentials.next("REGISTER", &aor("alice"));
    moved
        .request("REGISTER", &aor("alice"))
        .retry_of(&registration)
        .header("Expires", "0")
        .header("Authorization", &value)
        .await;
    moved.expect_final(200).await;
    assert!(
        proxy.bindings("alice").is_empty(),
        "{:?}",
        proxy.bindings("alice")
    );
}

#[tokio::test]
async fn the_nated_callee_refreshes_the_target_and_hangs_up_without_credentials() {
    let proxy = start(|_| {});
    let (mut alice, public) = nated_alice(&proxy).await;
    register(&mut alice, "alice", "SHA-256").await;
    let mut bob = plain_bob(&proxy).await;
    register(&mut bob, "bob", "MD5").await;
    let _invite = authenticated_invite(&mut bob, "bob", &aor("alice"), "MD5").await;
    let incoming = alice.expect_request("INVITE").await;
    let answer = alice.respond(&incoming, 200, "OK").await;
    let ok = bob.expect_final(200).await;
    let _ = bob.ack_2xx(&ok).await;
    alice.expect_request("ACK").await;

    // Alice's re-INVITE (a target refresh, RFC 3261 §12.2) with her private Contact: not
    // challenged (in dialog), her Contact fixed to where she sends from.
    let mut dialog = common::ua::Dialog::from_uas(&incoming, &answer);
    assert_eq!(dialog.next_hop(), proxy.udp, "through the proxy");
    let sdp = common::ua::sdp("alice");
    let _reinvite = alice
        .in_dialog("INVITE", &mut dialog)
        .body("application/sdp", &sdp)
        .await;
    let reinvite = bob.expect_request("INVITE").await;
    assert_eq!(
        contact_hostport(&reinvite),
        public.to_string(),
        "{}",
        show(&reinvite)
    );
    bob.respond(&reinvite, 200, "OK").await;
    alice.expect_final(200).await;
    // The ACK of the re-INVITE's 2xx repeats its CSeq number (§13.2.2.4).
    let mut for_ack = dialog.clone();
    for_ack.local_cseq -= 1;
    alice.in_dialog("ACK", &mut for_ack).no_body().await;
    bob.expect_request("ACK").await;

    // Alice hangs up: her BYE reaches bob, his 200 comes back to her public address.
    let _bye = alice.bye(&mut dialog).await;
    let bye = bob.expect_request("BYE").await;
    bob.respond(&bye, 200, "OK").await;
    alice.expect_final(200).await;
}

#[tokio::test]
async fn a_nated_phone_unregisters_every_contact_with_a_star() {
    let proxy = start(|_| {});
    let (mut alice, _public) = nated_alice(&proxy).await;
    let (registration, mut credentials) = register(&mut alice, "alice", "SHA-256").await;
    // `Contact: *` with Expires 0 (RFC 3261 §10.2.2): TestUa always writes its own Contact,
    // so the request is written here, in the registration's Call-ID with CSeq + 1.
    let value = credentials.next("REGISTER", &aor("alice"));
    let header = |name| text(registration.header(name).unwrap());
    let request = format!(
        "REGISTER {aor} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {PRIVATE};branch=z9hG4bK-star-1;rport\r\n\
         Max-Forwards: 70\r\n\
         From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\n\
         Contact: *\r\nExpires: 0\r\nAuthorization: {value}\r\nContent-Length: 0\r\n\r\n",
        aor = aor("alice"),
        from = header(HeaderName::From),
        to = header(HeaderName::To),
        call_id = header(HeaderName::CallId),
        cseq = registration.cseq().unwrap().seq + 1,
    );
    alice.send_raw(request.as_bytes(), proxy.udp).await;
    alice.expect_final(200).await;
    assert!(
        proxy.bindings("alice").is_empty(),
        "{:?}",
        proxy.bindings("alice")
    );
}

/// A foreign SIP server at `bind`, on UDP: a UAS the proxy relays to by IP.
async fn foreign_phone(name: &str, bind: [u8; 4]) -> TestUa {
    TestUa::udp_on(name, SocketAddr::from((bind, 0))).await
}

#[tokio::test]
async fn a_nated_phone_calling_another_domain_is_reached_by_the_far_end() {
    let proxy = start(|_| {});
    let (mut alice, public) = nated_alice(&proxy).await;
    let mut carol = foreign_phone("carol", [127, 0, 0, 6]).await;
    let target = carol.uri();
    // Our user, authenticated, calls out: relayed (From in our domain), record-routed.
    let _invite = authenticated_invite(&mut alice, "alice", &target, "SHA-256").await;
    let incoming = carol.expect_request("INVITE").await;
    assert!(header_text(&incoming, "Proxy-Authorization").is_none());
    assert_eq!(
        contact_hostport(&incoming),
        public.to_string(),
        "the NATed caller's Contact is where it sends from, as for calls to our users\n{}",
        show(&incoming)
    );
    // The far end hangs up: its BYE comes through us and reaches alice through her NAT.
    let bye = callee_hangs_up_on(&mut alice, &mut carol, &incoming, proxy.udp).await;
    alice.respond(&bye, 200, "OK").await;
    carol.expect_final(200).await;
}

#[tokio::test]
async fn a_reused_nonce_count_is_challenged_again() {
    let proxy = start(|_| {});
    let (mut alice, _public) = nated_alice(&proxy).await;
    register(&mut alice, "alice", "SHA-256").await;
    let mut bob = plain_bob(&proxy).await;
    let (_, mut credentials) = authenticated_invite(&mut bob, "bob", &aor("alice"), "MD5").await;
    let incoming = alice.expect_request("INVITE").await;
    alice.respond(&incoming, 486, "Busy Here").await;
    bob.expect_final(486).await;
    alice.expect_request("ACK").await; // the proxy's, for the 486 (§17.1.1.3)

    // A new INVITE (not a retransmission) with the nonce count already used: a replay
    // (RFC 2617 §3.2.2: the server detects replays by its own copy of nc), challenged anew.
    credentials.nc -= 1;
    invite_with(&mut bob, &aor("alice"), &mut credentials).await;
    let required = bob.expect_final(407).await;
    let fresh = challenge(&required, "Proxy-Authenticate", "MD5");
    assert_ne!(fresh.nonce, credentials.challenge.nonce, "a new nonce");
    // The next count with the same nonce is accepted again.
    invite_with(&mut bob, &aor("alice"), &mut credentials).await;
    let incoming = alice.expect_request("INVITE").await;
    alice.respond(&incoming, 486, "Busy Here").await;
    bob.expect_final(486).await;
    alice.expect_request("ACK").await; // the proxy's, for the 486 (§17.1.1.3)
}

// ---- a wildcard listener advertising its address (issue 18 item 2) -----------------------

/// What the wildcard listeners of [`start_advertising`] advertise: another loopback address,
/// which a wildcard socket receives on but which no socket of the server is bound to, so a
/// message reaching it was sent where the server said it was.
const ADVERTISED_IP: [u8; 4] = [127, 0, 0, 9];

/// [`start`] listening on `0.0.0.0` (UDP and TCP, free ports) and advertising 127.0.0.9 at
/// each listener's own port; `udp` and `tcp` are where the phones first send (127.0.0.1: the
/// tests send to loopback only), the advertised addresses are returned beside.
fn start_advertising(edit: impl FnOnce(&mut Config)) -> (Running, SocketAddr, SocketAddr) {
    let mut proxy = start(|config| {
        config.listen = vec![
            "udp:0.0.0.0:0,advertise=127.0.0.9".parse().unwrap(),
            "tcp:0.0.0.0:0,advertise=127.0.0.9".parse().unwrap(),
        ];
        edit(config);
    });
    assert!(proxy.udp.ip().is_unspecified() && proxy.tcp.ip().is_unspecified());
    let advertised_udp = SocketAddr::from((ADVERTISED_IP, proxy.udp.port()));
    let advertised_tcp = SocketAddr::from((ADVERTISED_IP, proxy.tcp.port()));
    proxy.udp.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    proxy.tcp.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    (proxy, advertised_udp, advertised_tcp)
}

/// `message`'s top Via is sent by `via`, its Record-Route entries (signatures aside) start
/// with `record_route`, and the wildcard appears nowhere.
fn assert_names_us_as(message: &Message, via: SocketAddr, record_route: &[String]) {
    let shown = show(message);
    let top = message.top_via().unwrap();
    assert_eq!(
        (top.host.to_string(), top.port),
        (via.ip().to_string(), Some(via.port())),
        "our Via names the advertised address\n{shown}"
    );
    let rr = record_route_entries(message);
    assert_eq!(rr[..record_route.len()], record_route[..], "\n{shown}");
    assert!(!shown.contains("0.0.0.0"), "the wildcard leaked\n{shown}");
}

/// The Record-Route entries of `message`, in order, without their signatures.
fn record_route_entries(message: &Message) -> Vec<String> {
    message
        .values(HeaderName::RecordRoute)
        .map(|v| common::without_signature(&text(v.unwrap())))
        .collect()
}

/// Our Record-Route entry for `advertised` over `transport`, without its signature.
fn rr_entry(advertised: SocketAddr, transport: &str) -> String {
    format!("<sip:{advertised};transport={transport};lr>")
}

#[tokio::test]
async fn behind_a_wildcard_listener_calls_and_keepalives_carry_the_advertised_address() {
    let (proxy, at_udp, _) = start_advertising(|config| {
        config.nat.keepalive_interval_ms = 100;
    });
    let (mut alice, _public) = nated_alice(&proxy).await;
    register(&mut alice, "alice", "SHA-256").await;
    // The keep-alive's Via, From and Call-ID name the advertised address, where its answer
    // comes back to.
    let probe = alice.expect_request("OPTIONS").await;
    assert_names_us_as(&probe, at_udp, &[]);
    assert!(
        header_text(&probe, "From").unwrap().contains("@127.0.0.9>"),
        "{}",
        show(&probe)
    );
    alice.respond(&probe, 200, "OK").await;

    let mut bob = plain_bob(&proxy).await;
    register(&mut bob, "bob", "MD5").await;
    authenticated_invite(&mut bob, "bob", &aor("alice"), "MD5").await;
    let incoming = request_between_probes(&mut alice, "INVITE").await;
    let record_route = [rr_entry(at_udp, "udp")];
    assert_names_us_as(&incoming, at_udp, &record_route);
    // Alice answers where our Via says; bob learns the route set from the 200.
    alice.respond(&incoming, 200, "OK").await;
    let ok = bob.expect_final(200).await;
    assert_eq!(record_route_entries(&ok), record_route);
    let mut dialog = bob.ack_2xx(&ok).await;
    assert_eq!(
        dialog.next_hop(),
        at_udp,
        "in the dialog, bob sends to the advertised address"
    );
    request_between_probes(&mut alice, "ACK").await;
    bob.bye(&mut dialog).await;
    let bye = request_between_probes(&mut alice, "BYE").await;
    assert_names_us_as(&bye, at_udp, &[]);
    alice.respond(&bye, 200, "OK").await;
    bob.expect_final(200).await;
}

#[tokio::test]
async fn a_caller_on_a_wildcard_tcp_listener_is_record_routed_at_the_advertised_address() {
    let (proxy, at_udp, at_tcp) = start_advertising(|_| {});
    let (mut alice, _public) = nated_alice(&proxy).await;
    register(&mut alice, "alice", "SHA-256").await;
    // Bob's connection to 127.0.0.1 has that local address on our side: what the wildcard
    // listener advertises goes into the Record-Route for his side all the same.
    let mut bob = TestUa::tcp("bob", proxy.tcp).await;
    bob.from_domain = Some(DOMAIN.to_owned());
    register(&mut bob, "bob", "MD5").await;
    authenticated_invite(&mut bob, "bob", &aor("alice"), "MD5").await;
    let incoming = request_between_probes(&mut alice, "INVITE").await;
    // Two entries (RFC 5658): alice's side over UDP on top, bob's side over TCP below.
    assert_names_us_as(
        &incoming,
        at_udp,
        &[rr_entry(at_udp, "udp"), rr_entry(at_tcp, "tcp")],
    );
    alice.respond(&incoming, 200, "OK").await;
    let ok = bob.expect_final(200).await;
    let mut dialog = bob.ack_2xx(&ok).await;
    assert_eq!(
        dialog.next_hop(),
        at_tcp,
        "bob's side of the route is over TCP"
    );
    request_between_probes(&mut alice, "ACK").await;
    bob.bye(&mut dialog).await;
    let bye = request_between_probes(&mut alice, "BYE").await;
    alice.respond(&bye, 200, "OK").await;
    bob.expect_final(200).await;
}

#[tokio::test]
async fn the_advertised_name_names_the_server() {
    let proxy = start(|config| {
        config.listen = vec![
            "udp:127.0.0.1:0,advertise=sip.moonroute.test:5099"
                .parse()
                .unwrap(),
            "tcp:127.0.0.1:0,advertise=sip.moonroute.test:5099"
                .parse()
                .unwrap(),
        ];
    });
    let mut eve = TestUa::udp_on("eve", SocketAddr::from((STRANGER_IP, 0))).await;
    eve.from_domain = Some("elsewhere.example".to_owned());
    eve.outbound = Some(proxy.udp);
    // Addressed to the server by its advertised name: answered by the server itself (§11).
    eve.options("sip:sip.moonroute.test:5099").await;
    let answer = eve.expect_final(200).await;
    assert!(
        header_text(&answer, "Server").is_some_and(|s| s.starts_with("moonroute")),
        "{}",
        show(&answer)
    );
    // The same name at another port is another host: relaying there is refused.
    eve.options("sip:sip.moonroute.test:5098").await;
    eve.expect_final(403).await;
}
