//! Record-Route signatures bound to the dialog's parties, with an expiry (issue 17 item 2,
//! `src/proxy/route_sign.rs`), end to end: the shipped `scripts/default.lua` (digest
//! authentication off: "our users" are a From in our domain) or a stateless script, on real UDP
//! and TCP sockets of 127.0.0.1, sled in a temporary data directory, Record-Route signed with
//! the server key as `moonroute run` does.
//!
//! Hosts: alice (our user) on 127.0.0.2, bob (registered) on 127.0.0.3 and his second phone on
//! 127.0.0.5, eve (a stranger) on 127.0.0.4, and on 127.0.0.9 a "foreign host": a gateway that
//! trusts this proxy, a UDP socket and a TCP listener on one port that must receive nothing.
//!
//! The probe: eve rings bob, reads our Record-Route from the 180 (then the 200), and
//! sends `MESSAGE` and `INVITE sip:+15551234567@127.0.0.9` with that Route, the dialog's Call-ID
//! and a To tag, over UDP and TCP: refused (404), nothing reaches 127.0.0.9. Expired, forged and
//! old-format signatures are refused (an expired one still carries a BYE). Real dialogs still
//! route: re-INVITEs and BYE from either side, ACK for 2xx, a fork answered by two phones, a
//! double Record-Route across UDP and TCP (RFC 5658), a NATed callee whose Contact
//! `fix_nated_contact` rewrote, and a stateless `forward()` that record-routes.
//!
//! Nothing sleeps: every wait is for a message, bounded by a timeout; waiting for the absence of
//! a message is a bounded wait too.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::ua::{sdp, show, Dialog, TestUa};
use moonroute::config::{Config, LocationBackend};
use moonroute::proxy::route_sign::{Binding, Holder};
use moonroute::proxy::RouteSigner;
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::{HeaderName, Message, Uri};
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;
use tokio::net::{TcpListener, UdpSocket};

const DOMAIN: &str = "moonroute.test";
const ALICE_IP: [u8; 4] = [127, 0, 0, 2];
const BOB_IP: [u8; 4] = [127, 0, 0, 3];
const STRANGER_IP: [u8; 4] = [127, 0, 0, 4];
const BOB2_IP: [u8; 4] = [127, 0, 0, 5];
const FOREIGN_IP: [u8; 4] = [127, 0, 0, 9];
/// What the NATed phone believes its address is.
const PRIVATE: &str = "192.168.1.10:5060";

struct Running {
    _server: ServerHandle,
    _host: Arc<ScriptHost>,
    udp: SocketAddr,
    tcp: SocketAddr,
    /// The server key: what a test signs its own (expired, old-format) Routes with.
    key: Vec<u8>,
    _dir: TempDir,
}

/// `script` (a path in the repository; `scripts/default.lua` without digest authentication)
/// on UDP and TCP of 127.0.0.1, two event loops, sled in a fresh data directory, Record-Route
/// signed with the server key.
fn start(script: &str) -> Running {
    let dir = TempDir::new().unwrap();
    let mut config = Config {
        listen: vec![
            "udp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
            "tcp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
        ],
        domains: vec![DOMAIN.to_owned()],
        workers: 2,
        script: match script {
            "scripts/default.lua" => common::default_script_without_auth(),
            other => Path::new(env!("CARGO_MANIFEST_DIR")).join(other),
        },
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Sled;
    config.validate().unwrap();
    let host = ScriptHost::from_config(&config).expect("the script and the store load");
    let key = config.server_key().unwrap();
    let factory = CoreFactory::with_router(&config, host.router_factory())
        .with_route_signer(RouteSigner::new(&key));
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        tcp: server.local_addr(TransportKind::Tcp).unwrap(),
        _server: server,
        _host: host,
        key,
        _dir: dir,
    }
}

fn aor(user: &str) -> String {
    format!("sip:{user}@{DOMAIN}")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A UDP phone on `ip` whose outbound proxy is the server; `domain` is its From host.
async fn phone(name: &str, ip: [u8; 4], proxy: &Running, domain: &str) -> TestUa {
    let mut ua = TestUa::udp_on(name, SocketAddr::from((ip, 0))).await;
    ua.from_domain = Some(domain.to_owned());
    ua.outbound = Some(proxy.udp);
    ua
}

async fn register(ua: &mut TestUa, user: &str) {
    ua.request("REGISTER", &aor(user))
        .header("Expires", "600")
        .await;
    ua.expect_final(200).await;
}

/// bob, registered from 127.0.0.3 over UDP.
async fn registered_bob(proxy: &Running) -> TestUa {
    let mut bob = phone("bob", BOB_IP, proxy, DOMAIN).await;
    register(&mut bob, "bob").await;
    bob
}

/// The gateway that trusts us, on 127.0.0.9: UDP and TCP on one port.
struct Foreign {
    udp: UdpSocket,
    tcp: TcpListener,
    port: u16,
}

impl Foreign {
    async fn bind() -> Foreign {
        for _ in 0..20 {
            let udp = UdpSocket::bind(SocketAddr::from((FOREIGN_IP, 0)))
                .await
                .unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = TcpListener::bind(SocketAddr::from((FOREIGN_IP, port))).await {
                return Foreign { udp, tcp, port };
            }
        }
        panic!("no port free for both UDP and TCP on 127.0.0.9");
    }

    /// The number the stranger wants to call through the gateway.
    fn uri(&self, kind: TransportKind) -> String {
        let transport = match kind {
            TransportKind::Tcp => ";transport=tcp",
            _ => "",
        };
        format!("sip:+15551234567@127.0.0.9:{}{transport}", self.port)
    }

    /// Nothing arrives, on either transport, within a bounded wait.
    async fn receives_nothing(&self) {
        let mut buf = vec![0u8; 65535];
        let anything = async {
            tokio::select! {
                received = self.udp.recv_from(&mut buf) => {
                    let (n, from) = received.unwrap();
                    format!("{from} over UDP:\n{}", text(&buf[..n]))
                }
                accepted = self.tcp.accept() => {
                    format!("{:?} over TCP", accepted.map(|(_, peer)| peer))
                }
            }
        };
        if let Ok(what) = tokio::time::timeout(Duration::from_millis(300), anything).await {
            panic!("the foreign host was reached: {what}");
        }
    }
}

/// The signature (`mrs` value) of a Record-Route or Route value.
fn signature_of(value: &str) -> &str {
    let start = value.find(";mrs=").expect("a signed entry") + ";mrs=".len();
    let len = value[start..]
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '.')
        .unwrap_or(value.len() - start);
    &value[start..start + len]
}

fn record_routes(m: &Message) -> Vec<String> {
    m.values(HeaderName::RecordRoute)
        .map(|v| text(v.unwrap()))
        .collect()
}

/// `dialog` with its Request-URI and To pointed at `target`; `to_tag` replaces the To tag.
fn aimed_at(dialog: &Dialog, target: &str, to_tag: Option<&str>) -> Dialog {
    let mut probe = dialog.clone();
    probe.remote_target = target.to_owned();
    if let Some(tag) = to_tag {
        probe.remote = format!("<{target}>;tag={tag}");
        probe.remote_tag = tag.to_owned();
    }
    probe
}

/// `caller` sends MESSAGE and INVITE in `dialog` to the foreign host, with the dialog's To tag
/// and with another: each refused with 404.
async fn probe_foreign(
    caller: &mut TestUa,
    dialog: &Dialog,
    foreign: &Foreign,
    kind: TransportKind,
) {
    let target = foreign.uri(kind);
    for to_tag in [None, Some("forged-tag")] {
        let mut probe = aimed_at(dialog, &target, to_tag);
        caller
            .in_dialog("MESSAGE", &mut probe)
            .body("text/plain", "hello")
            .await;
        caller.expect_final(404).await;
        let offer = sdp("eve");
        caller
            .in_dialog("INVITE", &mut probe)
            .body("application/sdp", &offer)
            .await;
        caller.expect_final(404).await;
    }
}

/// The probe, with the stranger on `kind` (bob on UDP: over TCP it meets a double
/// Record-Route).
async fn a_captured_route_reaches_nobody_else(kind: TransportKind) {
    let proxy = start("scripts/default.lua");
    let mut bob = registered_bob(&proxy).await;
    let foreign = Foreign::bind().await;
    let mut eve = match kind {
        TransportKind::Tcp => TestUa::tcp("eve", proxy.tcp).await,
        _ => TestUa::udp_on("eve", SocketAddr::from((STRANGER_IP, 0))).await,
    };
    eve.from_domain = Some("elsewhere.example".to_owned());
    if kind == TransportKind::Udp {
        eve.outbound = Some(proxy.udp);
    }

    // Eve rings bob (anyone may call our users) and reads the Record-Route of the 180.
    let invite = eve.invite(&aor("bob")).await;
    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 180, "Ringing").await;
    eve.expect_response(100).await;
    let ringing = eve.expect_response(180).await;
    let early = Dialog::from_uac(&invite, &ringing);
    let bobs = record_routes(&incoming);
    let eves = record_routes(&ringing);
    assert_eq!(eves.len(), if kind == TransportKind::Tcp { 2 } else { 1 });
    assert!(
        bobs.iter().all(|v| signature_of(v).starts_with('t'))
            && eves.iter().all(|v| signature_of(v).starts_with('u')),
        "the callee holds the request's copy, the caller the response's, both of a call \
         default.lua tracks (`t`, `u` rather than `q`, `s`): {bobs:?} {eves:?}"
    );
    probe_foreign(&mut eve, &early, &foreign, kind).await;

    // Answered: the route set of the 2xx, the same refusal; the call itself works.
    bob.respond(&incoming, 200, "OK").await;
    let ok = eve.expect_final(200).await;
    let mut dialog = eve.ack_2xx(&ok).await;
    bob.expect_request("ACK").await;
    probe_foreign(&mut eve, &dialog, &foreign, kind).await;
    hang_up(&mut eve, &mut dialog, &mut bob).await;
    foreign.receives_nothing().await;
}

#[tokio::test]
async fn a_captured_route_reaches_nobody_else_over_udp() {
    a_captured_route_reaches_nobody_else(TransportKind::Udp).await;
}

#[tokio::test]
async fn a_captured_route_reaches_nobody_else_over_tcp() {
    a_captured_route_reaches_nobody_else(TransportKind::Tcp).await;
}

/// alice calls bob (our users, both on UDP): INVITE, 200, ACK. Returns alice's dialog and
/// bob's.
async fn answered_call(alice: &mut TestUa, bob: &mut TestUa) -> (Dialog, Dialog) {
    let invite = alice.invite(&aor("bob")).await;
    let incoming = bob.expect_request("INVITE").await;
    let answer = bob.respond(&incoming, 200, "OK").await;
    let ok = alice.expect_final(200).await;
    let dialog = alice.ack_2xx(&ok).await;
    let ack = bob.expect_request("ACK").await;
    assert_eq!(ack.cseq().unwrap().seq, invite.cseq().unwrap().seq);
    (dialog, Dialog::from_uas(&incoming, &answer))
}

/// A BYE from `from` in `dialog`, reaching `to` (its next request) through us, answered 200.
async fn hang_up(from: &mut TestUa, dialog: &mut Dialog, to: &mut TestUa) {
    from.bye(dialog).await;
    let bye = to.expect_request("BYE").await;
    assert_eq!(
        bye.headers_named("Via").count(),
        2,
        "the BYE through the proxy"
    );
    to.respond(&bye, 200, "OK").await;
    from.expect_final(200).await;
}

/// Two calls from alice to bob: in the first each re-INVITEs and bob hangs up, in the second
/// alice hangs up; every in-dialog request through us.
async fn dialogs_route_both_ways(alice: &mut TestUa, bob: &mut TestUa) {
    let (mut alices, mut bobs) = answered_call(alice, bob).await;
    reinvite(alice, &mut alices, bob).await;
    reinvite(bob, &mut bobs, alice).await;
    hang_up(bob, &mut bobs, alice).await;
    let (mut alices, _) = answered_call(alice, bob).await;
    hang_up(alice, &mut alices, bob).await;
}

/// `dialog`'s first Route (ours) with `signature` instead of the one it carries.
fn route_signed(dialog: &Dialog, signature: &str) -> Vec<String> {
    let ours = &dialog.route_set[0];
    let mut route = dialog.route_set.clone();
    route[0] = ours.replace(signature_of(ours), signature);
    route
}

#[tokio::test]
async fn expired_forged_and_old_signatures_are_refused() {
    let proxy = start("scripts/default.lua");
    let mut bob = registered_bob(&proxy).await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;
    let (dialog, _) = answered_call(&mut alice, &mut bob).await;

    // What the server would write for alice's requests, signed here with the server key, valid
    // an hour more or expired two minutes ago.
    let signer = RouteSigner::new(&proxy.key);
    let target = dialog.remote_target.clone();
    let binding = Binding {
        holder: Holder::Caller,
        tracked: false,
        call_id: dialog.call_id.as_bytes(),
        caller_tag: dialog.local_tag.as_bytes(),
        callee_tag: dialog.remote_tag.as_bytes(),
        target: Some(Uri::parse(target.as_bytes()).unwrap()),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let valid = signer.sign(&binding, [], now + 3600);
    let expired = signer.sign(&binding, [], now - 120);
    let last = if valid.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &valid[..valid.len() - 1]);
    let old = signer.sign_legacy(dialog.call_id.as_bytes(), dialog.local_tag.as_bytes());

    // The test's own signature is one the server accepts: the MESSAGE reaches bob.
    let mut sending = dialog.clone();
    sending.route_set = route_signed(&dialog, &valid);
    alice
        .in_dialog("MESSAGE", &mut sending)
        .body("text/plain", "signed here")
        .await;
    let message = bob.expect_request("MESSAGE").await;
    bob.respond(&message, 200, "OK").await;
    alice.expect_final(200).await;

    // Expired, forged (one digit), old format: 404, nothing relayed to bob.
    for signature in [&expired, &forged, &old] {
        sending.route_set = route_signed(&dialog, signature);
        alice
            .in_dialog("MESSAGE", &mut sending)
            .body("text/plain", "refused")
            .await;
        let refused = alice.expect_final(404).await;
        assert_eq!(
            refused.reason().map(text).as_deref(),
            Some("Not Here"),
            "{signature}"
        );
    }

    // An expired signature still ends the dialog: the BYE is the next request bob sees.
    sending.route_set = route_signed(&dialog, &expired);
    alice.bye(&mut sending).await;
    let bye = bob.expect_request("BYE").await;
    bob.respond(&bye, 200, "OK").await;
    alice.expect_final(200).await;
}

/// The ACK for a 2xx to a re-INVITE `reinvite` sent in `dialog` (its CSeq number, along the
/// dialog's route set: a re-INVITE does not change it, §12.2.1.2).
async fn ack_reinvite(ua: &mut TestUa, dialog: &Dialog, reinvite: &Message) {
    let mut for_ack = dialog.clone();
    for_ack.local_cseq = reinvite.cseq().unwrap().seq - 1;
    ua.in_dialog("ACK", &mut for_ack).await;
}

/// A re-INVITE from `from` in `dialog` to `to`, answered 200 and ACKed; both through us.
async fn reinvite(from: &mut TestUa, dialog: &mut Dialog, to: &mut TestUa) {
    let offer = sdp(&from.name);
    let reinvite = from
        .in_dialog("INVITE", dialog)
        .body("application/sdp", &offer)
        .await;
    let incoming = to.expect_request("INVITE").await;
    assert_eq!(
        incoming.headers_named("Via").count(),
        2,
        "through the proxy"
    );
    to.respond(&incoming, 200, "OK").await;
    from.expect_final(200).await;
    ack_reinvite(from, dialog, &reinvite).await;
    let ack = to.expect_request("ACK").await;
    assert_eq!(
        ack.headers_named("Via").count(),
        2,
        "the ACK through the proxy"
    );
}

#[tokio::test]
async fn calls_with_reinvites_and_bye_from_either_side_still_route() {
    let proxy = start("scripts/default.lua");
    let mut bob = registered_bob(&proxy).await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;

    dialogs_route_both_ways(&mut alice, &mut bob).await;
}

#[tokio::test]
async fn a_fork_answered_by_two_phones_gives_each_dialog_its_own_route() {
    let proxy = start("scripts/default.lua");
    let mut bob = registered_bob(&proxy).await;
    let mut bob2 = phone("bob", BOB2_IP, &proxy, DOMAIN).await;
    register(&mut bob2, "bob").await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;

    alice.invite(&aor("bob")).await;
    let to_first = bob.expect_request("INVITE").await;
    let to_second = bob2.expect_request("INVITE").await;
    // Both answer (RFC 6026: every 2xx goes upstream), each with its own tag and Contact.
    bob.respond(&to_first, 200, "OK").await;
    let first = alice.expect_final(200).await;
    bob2.respond(&to_second, 200, "OK").await;
    let second = alice.expect_final(200).await;
    let mut one = alice.ack_2xx(&first).await;
    bob.expect_request("ACK").await;
    let mut two = alice.ack_2xx(&second).await;
    bob2.expect_request("ACK").await;
    assert_ne!(one.remote_tag, two.remote_tag);
    assert_ne!(
        signature_of(&one.route_set[0]),
        signature_of(&two.route_set[0]),
        "each answer signed for its own callee"
    );

    // One dialog's route toward the other phone: refused, with either tag.
    for to_tag in [None, Some(two.remote_tag.as_str())] {
        let mut crossed = aimed_at(&one, &two.remote_target, to_tag);
        alice
            .in_dialog("MESSAGE", &mut crossed)
            .body("text/plain", "crossed")
            .await;
        alice.expect_final(404).await;
        one.local_cseq = crossed.local_cseq;
    }

    // Each BYE reaches its own phone (and is the next request each sees).
    hang_up(&mut alice, &mut one, &mut bob).await;
    hang_up(&mut alice, &mut two, &mut bob2).await;
}

#[tokio::test]
async fn a_double_record_route_across_udp_and_tcp_routes_both_ways() {
    let proxy = start("scripts/default.lua");
    // bob registers over TCP and is reached on that connection; alice calls over UDP.
    let mut bob = TestUa::tcp("bob", proxy.tcp).await;
    bob.from_domain = Some(DOMAIN.to_owned());
    register(&mut bob, "bob").await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;

    let (mut alices, mut bobs) = answered_call(&mut alice, &mut bob).await;
    assert_eq!(bobs.route_set.len(), 2, "{:?}", bobs.route_set);
    assert_eq!(alices.route_set.len(), 2, "{:?}", alices.route_set);
    assert!(
        bobs.route_set[0].contains("transport=tcp")
            && alices.route_set[0].contains("transport=udp")
    );
    assert_eq!(
        signature_of(&bobs.route_set[0]),
        signature_of(&bobs.route_set[1])
    );
    assert_eq!(
        signature_of(&alices.route_set[0]),
        signature_of(&alices.route_set[1])
    );

    reinvite(&mut alice, &mut alices, &mut bob).await;
    reinvite(&mut bob, &mut bobs, &mut alice).await;
    hang_up(&mut bob, &mut bobs, &mut alice).await;
}

#[tokio::test]
async fn a_nated_callee_whose_contact_was_fixed_still_routes() {
    let proxy = start("scripts/default.lua");
    // bob behind a NAT: his socket on 127.0.0.3, his Via and Contact saying 192.168.1.10.
    let mut bob = phone("bob", BOB_IP, &proxy, DOMAIN).await;
    let public = bob.local;
    bob.local = PRIVATE.parse().unwrap();
    register(&mut bob, "bob").await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;

    let (mut alices, _) = answered_call(&mut alice, &mut bob).await;
    assert!(
        alices.remote_target.contains(&public.to_string()),
        "on_reply's fix_nated_contact rewrote bob's Contact to {public}: {}",
        alices.remote_target
    );
    hang_up(&mut alice, &mut alices, &mut bob).await;
    dialogs_route_both_ways(&mut alice, &mut bob).await;
}

#[tokio::test]
async fn a_stateless_forward_signs_the_response_for_the_caller() {
    let proxy = start("tests/data/scripts/stateless_rr.lua");
    let mut bob = registered_bob(&proxy).await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;
    let foreign = Foreign::bind().await;

    let invite = alice.invite(&aor("bob")).await;
    let incoming = bob.expect_request("INVITE").await;
    let bobs = record_routes(&incoming);
    bob.respond(&incoming, 200, "OK").await;
    let ok = alice.expect_final(200).await;
    let alices = record_routes(&ok);
    assert!(
        signature_of(&bobs[0]).starts_with('q') && signature_of(&alices[0]).starts_with('s'),
        "the statelessly relayed 2xx carries the caller's copy: {bobs:?} {alices:?}\n{}",
        show(&ok)
    );
    assert_eq!(invite.call_id().unwrap(), ok.call_id().unwrap());
    let mut dialog = alice.ack_2xx(&ok).await;
    bob.expect_request("ACK").await;
    let mut probe = aimed_at(&dialog, &foreign.uri(TransportKind::Udp), None);
    alice
        .in_dialog("MESSAGE", &mut probe)
        .body("text/plain", "hello")
        .await;
    alice.expect_final(404).await;
    dialog.local_cseq = probe.local_cseq;
    hang_up(&mut alice, &mut dialog, &mut bob).await;
    foreign.receives_nothing().await;
}
