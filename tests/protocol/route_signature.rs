//! Record-Route signatures bound to the dialog's parties, with an expiry
//! (`moonroute-proto/src/proxy/route_sign.rs`), in the harness: the shipped `scripts/default.lua` (digest
//! authentication off: "our users" are a From in our domain) or a stateless script, UDP and
//! TCP agents, sled in the server's data directory, Record-Route signed with the server key
//! as `moonroute run` does.
//!
//! Hosts: alice (our user) on 127.0.0.2, bob (registered) on 127.0.0.3 and his second phone on
//! 127.0.0.5, eve (a stranger) on 127.0.0.4, and on 127.0.0.9 a "foreign host": a gateway that
//! trusts this proxy, a UDP agent and a TCP agent on one port that must receive nothing.
//!
//! The probe: eve rings bob, reads our Record-Route from the 180 (then the 200), and sends
//! `MESSAGE` and `INVITE sip:+15551234567@127.0.0.9` with that Route, the dialog's Call-ID and
//! a To tag, over UDP and TCP: refused (404), nothing reaches 127.0.0.9. Expired, forged and
//! old-format signatures are refused (an expired one still carries a BYE). Real dialogs still
//! route: re-INVITEs and BYE from either side, ACK for 2xx, a fork answered by two phones, a
//! double Record-Route across UDP and TCP (RFC 5658), a NATed callee whose Contact
//! `fix_nated_contact` rewrote, and a stateless `forward()` that record-routes.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use moonroute::proxy::route_sign::{Binding, Holder};
use moonroute::proxy::RouteSigner;
use moonroute::sip::Uri;

use super::harness::{
    config, default_script_without_auth, show, Harness, HeaderName, LocationBackend, Message,
    TransportKind, UaId,
};
use super::ua::{sdp, Dialog};

const DOMAIN: &str = "moonroute.test";
const ALICE: &str = "127.0.0.2:5060";
const BOB: &str = "127.0.0.3:5060";
const STRANGER: &str = "127.0.0.4:5060";
const BOB2: &str = "127.0.0.5:5060";
/// The foreign host, on UDP and TCP.
const FOREIGN: &str = "127.0.0.9:5060";
/// What the NATed phone believes its address is.
const PRIVATE: &str = "192.168.1.10:5060";

/// A server routed by `script` (`scripts/default.lua` without digest authentication, or a
/// path in the repository), two event loops, sled in its data directory, Record-Route signed
/// with the server key. The key, for the test to sign its own Routes with.
fn start(script: &str) -> (Harness, Vec<u8>) {
    let text = match script {
        "scripts/default.lua" => default_script_without_auth(),
        other => {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(other);
            std::fs::read_to_string(path).expect("the script")
        }
    };
    let mut config = config();
    config.domains = vec![DOMAIN.to_owned()];
    config.location.store = LocationBackend::Sled;
    config.validate().unwrap();
    let key = RefCell::new(Vec::new());
    let h = Harness::with_script_using(&config, &text, |factory, config| {
        let server_key = config.server_key().expect("the server key");
        let signer = RouteSigner::new(&server_key);
        *key.borrow_mut() = server_key;
        factory.with_route_signer(signer)
    });
    (h, key.into_inner())
}

fn aor(user: &str) -> String {
    format!("sip:{user}@{DOMAIN}")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A UDP phone at `addr` whose outbound proxy is the server; `domain` is its From host.
fn phone(h: &mut Harness, name: &str, addr: &str, domain: &str) -> UaId {
    let ua = h.add_ua_via_proxy(name, addr);
    h.ua(ua).from_domain = Some(domain.to_owned());
    ua
}

fn register(h: &mut Harness, ua: UaId, user: &str) {
    h.ua(ua)
        .request("REGISTER", &aor(user))
        .header("Expires", "600")
        .send();
    h.expect_final(ua, 200);
}

/// bob, registered from 127.0.0.3 over UDP.
fn registered_bob(h: &mut Harness) -> UaId {
    let bob = phone(h, "bob", BOB, DOMAIN);
    register(h, bob, "bob");
    bob
}

/// The gateway that trusts us, on 127.0.0.9: UDP and TCP on one port.
struct Foreign {
    udp: UaId,
    tcp: UaId,
}

impl Foreign {
    fn bind(h: &mut Harness) -> Foreign {
        Foreign {
            udp: h.add_ua("gateway", FOREIGN),
            tcp: h.add_tcp_ua("gateway", FOREIGN),
        }
    }

    /// The number the stranger wants to call through the gateway.
    fn uri(kind: TransportKind) -> String {
        let transport = match kind {
            TransportKind::Tcp => ";transport=tcp",
            _ => "",
        };
        format!("sip:+15551234567@{FOREIGN}{transport}")
    }

    /// Nothing reached it, on either transport: the server sent nothing to 127.0.0.9 (no
    /// datagram, no connection) and neither agent there received anything.
    fn receives_nothing(&self, h: &mut Harness) {
        let foreign_ip: std::net::IpAddr = [127, 0, 0, 9].into();
        let sent: Vec<String> = (h.sent_by_server.iter())
            .filter(|(_, to, _)| to.ip() == foreign_ip)
            .map(|(_, to, data)| format!("{to}: {}", text(data)))
            .collect();
        assert!(sent.is_empty(), "the foreign host was reached: {sent:#?}");
        h.expect_nothing(self.udp);
        h.expect_nothing(self.tcp);
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
fn probe_foreign(h: &mut Harness, caller: UaId, dialog: &Dialog, kind: TransportKind) {
    let target = Foreign::uri(kind);
    for to_tag in [None, Some("forged-tag")] {
        let mut probe = aimed_at(dialog, &target, to_tag);
        h.ua(caller)
            .in_dialog("MESSAGE", &mut probe)
            .body("text/plain", "hello")
            .send();
        h.expect_final(caller, 404);
        let offer = sdp("eve");
        h.ua(caller)
            .in_dialog("INVITE", &mut probe)
            .body("application/sdp", &offer)
            .send();
        h.expect_final(caller, 404);
    }
}

/// The probe, with the stranger on `kind` (bob on UDP: over TCP it meets a double
/// Record-Route).
fn a_captured_route_reaches_nobody_else(kind: TransportKind) {
    let (mut h, _) = start("scripts/default.lua");
    let bob = registered_bob(&mut h);
    let foreign = Foreign::bind(&mut h);
    let eve = match kind {
        TransportKind::Tcp => h.add_tcp_ua("eve", STRANGER),
        _ => h.add_ua_via_proxy("eve", STRANGER),
    };
    h.ua(eve).from_domain = Some("elsewhere.example".to_owned());

    // Eve rings bob (anyone may call our users) and reads the Record-Route of the 180.
    let invite = h.ua(eve).invite(&aor("bob"));
    let incoming = h.expect_request(bob, "INVITE");
    h.ua(bob).respond(&incoming, 180, "Ringing");
    h.expect_response(eve, 100);
    let ringing = h.expect_response(eve, 180);
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
    probe_foreign(&mut h, eve, &early, kind);

    // Answered: the route set of the 2xx, the same refusal; the call itself works.
    h.ua(bob).respond(&incoming, 200, "OK");
    let ok = h.expect_final(eve, 200);
    let mut dialog = h.ua(eve).ack_2xx(&ok);
    h.expect_request(bob, "ACK");
    probe_foreign(&mut h, eve, &dialog, kind);
    hang_up(&mut h, eve, &mut dialog, bob);
    foreign.receives_nothing(&mut h);
}

#[test]
fn a_captured_route_reaches_nobody_else_over_udp() {
    a_captured_route_reaches_nobody_else(TransportKind::Udp);
}

#[test]
fn a_captured_route_reaches_nobody_else_over_tcp() {
    a_captured_route_reaches_nobody_else(TransportKind::Tcp);
}

/// alice calls bob (our users): INVITE, 200, ACK. Returns alice's dialog and bob's.
fn answered_call(h: &mut Harness, alice: UaId, bob: UaId) -> (Dialog, Dialog) {
    let invite = h.ua(alice).invite(&aor("bob"));
    let incoming = h.expect_request(bob, "INVITE");
    let answer = h.ua(bob).respond(&incoming, 200, "OK");
    let ok = h.expect_final(alice, 200);
    let dialog = h.ua(alice).ack_2xx(&ok);
    let ack = h.expect_request(bob, "ACK");
    assert_eq!(ack.cseq().unwrap().seq, invite.cseq().unwrap().seq);
    (dialog, Dialog::from_uas(&incoming, &answer))
}

/// A BYE from `from` in `dialog`, reaching `to` (its next request) through us, answered 200.
fn hang_up(h: &mut Harness, from: UaId, dialog: &mut Dialog, to: UaId) {
    h.ua(from).bye(dialog);
    let bye = h.expect_request(to, "BYE");
    assert_eq!(
        bye.headers_named("Via").count(),
        2,
        "the BYE through the proxy"
    );
    h.ua(to).respond(&bye, 200, "OK");
    h.expect_final(from, 200);
}

/// Two calls from alice to bob: in the first each re-INVITEs and bob hangs up, in the second
/// alice hangs up; every in-dialog request through us.
fn dialogs_route_both_ways(h: &mut Harness, alice: UaId, bob: UaId) {
    let (mut alices, mut bobs) = answered_call(h, alice, bob);
    reinvite(h, alice, &mut alices, bob);
    reinvite(h, bob, &mut bobs, alice);
    hang_up(h, bob, &mut bobs, alice);
    let (mut alices, _) = answered_call(h, alice, bob);
    hang_up(h, alice, &mut alices, bob);
}

/// `dialog`'s first Route (ours) with `signature` instead of the one it carries.
fn route_signed(dialog: &Dialog, signature: &str) -> Vec<String> {
    let ours = &dialog.route_set[0];
    let mut route = dialog.route_set.clone();
    route[0] = ours.replace(signature_of(ours), signature);
    route
}

#[test]
fn expired_forged_and_old_signatures_are_refused() {
    let (mut h, key) = start("scripts/default.lua");
    let bob = registered_bob(&mut h);
    let alice = phone(&mut h, "alice", ALICE, DOMAIN);
    let (dialog, _) = answered_call(&mut h, alice, bob);

    // What the server would write for alice's requests, signed here with the server key, valid
    // an hour more or expired two minutes ago.
    let signer = RouteSigner::new(&key);
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
    h.ua(alice)
        .in_dialog("MESSAGE", &mut sending)
        .body("text/plain", "signed here")
        .send();
    let message = h.expect_request(bob, "MESSAGE");
    h.ua(bob).respond(&message, 200, "OK");
    h.expect_final(alice, 200);

    // Expired, forged (one digit), old format: 404, nothing relayed to bob.
    for signature in [&expired, &forged, &old] {
        sending.route_set = route_signed(&dialog, signature);
        h.ua(alice)
            .in_dialog("MESSAGE", &mut sending)
            .body("text/plain", "refused")
            .send();
        let refused = h.expect_final(alice, 404);
        assert_eq!(
            refused.reason().map(text).as_deref(),
            Some("Not Here"),
            "{signature}"
        );
    }

    // An expired signature still ends the dialog: the BYE is the next request bob sees.
    sending.route_set = route_signed(&dialog, &expired);
    h.ua(alice).bye(&mut sending);
    let bye = h.expect_request(bob, "BYE");
    h.ua(bob).respond(&bye, 200, "OK");
    h.expect_final(alice, 200);
}

/// The ACK for a 2xx to a re-INVITE `reinvite` sent in `dialog` (its CSeq number, along the
/// dialog's route set: a re-INVITE does not change it, §12.2.1.2).
fn ack_reinvite(h: &mut Harness, ua: UaId, dialog: &Dialog, reinvite: &Message) {
    let mut for_ack = dialog.clone();
    for_ack.local_cseq = reinvite.cseq().unwrap().seq - 1;
    h.ua(ua).in_dialog("ACK", &mut for_ack).send();
}

/// A re-INVITE from `from` in `dialog` to `to`, answered 200 and ACKed; both through us.
fn reinvite(h: &mut Harness, from: UaId, dialog: &mut Dialog, to: UaId) {
    let offer = sdp(&h.ua(from).name.clone());
    let reinvite = h
        .ua(from)
        .in_dialog("INVITE", dialog)
        .body("application/sdp", &offer)
        .send();
    let incoming = h.expect_request(to, "INVITE");
    assert_eq!(
        incoming.headers_named("Via").count(),
        2,
        "through the proxy"
    );
    h.ua(to).respond(&incoming, 200, "OK");
    h.expect_final(from, 200);
    ack_reinvite(h, from, dialog, &reinvite);
    let ack = h.expect_request(to, "ACK");
    assert_eq!(
        ack.headers_named("Via").count(),
        2,
        "the ACK through the proxy"
    );
}

#[test]
fn calls_with_reinvites_and_bye_from_either_side_still_route() {
    let (mut h, _) = start("scripts/default.lua");
    let bob = registered_bob(&mut h);
    let alice = phone(&mut h, "alice", ALICE, DOMAIN);

    dialogs_route_both_ways(&mut h, alice, bob);
}

#[test]
fn a_fork_answered_by_two_phones_gives_each_dialog_its_own_route() {
    let (mut h, _) = start("scripts/default.lua");
    let bob = registered_bob(&mut h);
    let bob2 = phone(&mut h, "bob", BOB2, DOMAIN);
    register(&mut h, bob2, "bob");
    let alice = phone(&mut h, "alice", ALICE, DOMAIN);

    h.ua(alice).invite(&aor("bob"));
    let to_first = h.expect_request(bob, "INVITE");
    let to_second = h.expect_request(bob2, "INVITE");
    // Both answer (RFC 6026: every 2xx goes upstream), each with its own tag and Contact.
    h.ua(bob).respond(&to_first, 200, "OK");
    let first = h.expect_final(alice, 200);
    h.ua(bob2).respond(&to_second, 200, "OK");
    let second = h.expect_final(alice, 200);
    let mut one = h.ua(alice).ack_2xx(&first);
    h.expect_request(bob, "ACK");
    let mut two = h.ua(alice).ack_2xx(&second);
    h.expect_request(bob2, "ACK");
    assert_ne!(one.remote_tag, two.remote_tag);
    assert_ne!(
        signature_of(&one.route_set[0]),
        signature_of(&two.route_set[0]),
        "each answer signed for its own callee"
    );

    // One dialog's route toward the other phone: refused, with either tag.
    for to_tag in [None, Some(two.remote_tag.as_str())] {
        let mut crossed = aimed_at(&one, &two.remote_target, to_tag);
        h.ua(alice)
            .in_dialog("MESSAGE", &mut crossed)
            .body("text/plain", "crossed")
            .send();
        h.expect_final(alice, 404);
        one.local_cseq = crossed.local_cseq;
    }

    // Each BYE reaches its own phone (and is the next request each sees).
    hang_up(&mut h, alice, &mut one, bob);
    hang_up(&mut h, alice, &mut two, bob2);
}

#[test]
fn a_double_record_route_across_udp_and_tcp_routes_both_ways() {
    let (mut h, _) = start("scripts/default.lua");
    // bob registers over TCP and is reached on that connection; alice calls over UDP.
    let bob = h.add_tcp_ua("bob", BOB);
    h.ua(bob).from_domain = Some(DOMAIN.to_owned());
    register(&mut h, bob, "bob");
    let alice = phone(&mut h, "alice", ALICE, DOMAIN);

    let (mut alices, mut bobs) = answered_call(&mut h, alice, bob);
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

    reinvite(&mut h, alice, &mut alices, bob);
    reinvite(&mut h, bob, &mut bobs, alice);
    hang_up(&mut h, bob, &mut bobs, alice);
}

#[test]
fn a_nated_callee_whose_contact_was_fixed_still_routes() {
    let (mut h, _) = start("scripts/default.lua");
    // bob behind a NAT: the server sees him on 127.0.0.3, his Via and Contact say
    // 192.168.1.10.
    let bob = phone(&mut h, "bob", BOB, DOMAIN);
    let public = h.ua(bob).local;
    h.ua(bob).private = Some(PRIVATE.parse().unwrap());
    register(&mut h, bob, "bob");
    let alice = phone(&mut h, "alice", ALICE, DOMAIN);

    let (mut alices, _) = answered_call(&mut h, alice, bob);
    assert!(
        alices.remote_target.contains(&public.to_string()),
        "on_reply's fix_nated_contact rewrote bob's Contact to {public}: {}",
        alices.remote_target
    );
    hang_up(&mut h, alice, &mut alices, bob);
    dialogs_route_both_ways(&mut h, alice, bob);
}

#[test]
fn a_stateless_forward_signs_the_response_for_the_caller() {
    let (mut h, _) = start("tests/data/scripts/stateless_rr.lua");
    let bob = registered_bob(&mut h);
    let alice = phone(&mut h, "alice", ALICE, DOMAIN);
    let foreign = Foreign::bind(&mut h);

    let invite = h.ua(alice).invite(&aor("bob"));
    let incoming = h.expect_request(bob, "INVITE");
    let bobs = record_routes(&incoming);
    h.ua(bob).respond(&incoming, 200, "OK");
    let ok = h.expect_final(alice, 200);
    let alices = record_routes(&ok);
    assert!(
        signature_of(&bobs[0]).starts_with('q') && signature_of(&alices[0]).starts_with('s'),
        "the statelessly relayed 2xx carries the caller's copy: {bobs:?} {alices:?}\n{}",
        show(&ok)
    );
    assert_eq!(invite.call_id().unwrap(), ok.call_id().unwrap());
    let mut dialog = h.ua(alice).ack_2xx(&ok);
    h.expect_request(bob, "ACK");
    let mut probe = aimed_at(&dialog, &Foreign::uri(TransportKind::Udp), None);
    h.ua(alice)
        .in_dialog("MESSAGE", &mut probe)
        .body("text/plain", "hello")
        .send();
    h.expect_final(alice, 404);
    dialog.local_cseq = probe.local_cseq;
    hang_up(&mut h, alice, &mut dialog, bob);
    foreign.receives_nothing(&mut h);
}
