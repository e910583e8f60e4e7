use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::*;
use crate::location::MemoryLocation;
use crate::sip::name_addr::parse_qvalue;
use crate::sip::typed::check_date;
use crate::transport::TransportKind;

const ALICE: &str = "sip:alice@example.com";

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn meta() -> Meta {
    Meta {
        kind: TransportKind::Udp,
        source: "192.0.2.10:5062".parse().unwrap(),
        local: "192.0.2.1:5060".parse().unwrap(),
        conn: None,
        worker: 0,
    }
}

fn rules() -> Rules {
    Rules {
        default_expires: 3600,
        min_expires: 60,
        max_expires: 7200,
    }
}

fn message(text: String) -> Message {
    Message::parse(Bytes::from(text)).unwrap()
}

/// A REGISTER for `to` with `extra` header lines (each ending in CRLF).
fn register_to(to: &str, call_id: &str, cseq: u32, extra: &str) -> Message {
    message(format!(
        "REGISTER sip:example.com SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK-{cseq}\r\n\
         Max-Forwards: 70\r\n\
         To: {to}\r\n\
         From: <sip:alice@example.com>;tag=f1\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} REGISTER\r\n\
         {extra}\
         Content-Length: 0\r\n\r\n"
    ))
}

fn register(call_id: &str, cseq: u32, extra: &str) -> Message {
    register_to("<sip:alice@example.com>", call_id, cseq, extra)
}

fn run(req: &Message, current: &[Binding]) -> Outcome {
    process(req, &meta(), &AorRule::default(), current, &rules(), t0())
}

fn updated(o: Outcome) -> (Vec<Binding>, bool) {
    match o {
        Outcome::Updated { bindings, changed } => (bindings, changed),
        other => panic!("expected an update, got {other:?}"),
    }
}

fn refused(o: Outcome) -> (u16, &'static str, Vec<(String, String)>) {
    match o {
        Outcome::Refused {
            code,
            reason,
            headers,
        } => (code, reason, headers),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn stored(contact: &str, call_id: &str, cseq: u32, expires_in: u64) -> Binding {
    Binding {
        aor: ALICE.to_owned(),
        contact: contact.to_owned(),
        expires_at: t0() + secs(expires_in),
        q: 1000,
        call_id: call_id.to_owned(),
        cseq,
        received: None,
        local: None,
        path: Vec::new(),
        instance: None,
        reg_id: None,
        user_agent: None,
        nated: false,
        node: None,
        owner_route: None,
    }
}

fn contacts(bindings: &[Binding]) -> Vec<&str> {
    bindings.iter().map(|b| b.contact.as_str()).collect()
}

fn expiries(bindings: &[Binding]) -> Vec<u64> {
    bindings
        .iter()
        .map(|b| b.expires_at.duration_since(t0()).unwrap().as_secs())
        .collect()
}

fn aor(uri: &str) -> Option<String> {
    aor_of(
        &Uri::parse(uri.as_bytes()).unwrap(),
        &LocalIdentity::default(),
    )
}

/// No home domain: every port is kept.
fn strict() -> AorRule {
    AorRule::default()
}

/// A server listening on 127.0.0.1:5060 and [::1]:5070, responsible for example.com.
fn home() -> AorRule {
    AorRule::new(LocalIdentity::new(
        &["example.com".to_owned()],
        [
            "127.0.0.1:5060".parse().unwrap(),
            "[::1]:5070".parse().unwrap(),
        ],
    ))
}

#[test]
fn aor_normalization() {
    let cases = [
        (
            "sip:alice@Example.COM;transport=tcp?subject=x",
            "sip:alice@example.com",
        ),
        ("SIP:Alice@example.com", "sip:Alice@example.com"),
        ("sip:%61lice@example.com", "sip:alice@example.com"),
        ("sip:a%20b@example.com", "sip:a%20b@example.com"),
        ("sip:a%2fb@example.com", "sip:a/b@example.com"),
        ("sip:alice:secret@example.com", "sip:alice@example.com"),
        ("sip:bob@example.com:5070", "sip:bob@example.com:5070"),
        ("sips:alice@example.com", "sips:alice@example.com"),
        (
            "sip:alice@[2001:DB8:0::1]:5060",
            "sip:alice@[2001:db8::1]:5060",
        ),
        (
            "sip:+15551234@example.com;user=phone",
            "sip:+15551234@example.com",
        ),
        ("sip:example.com", "sip:example.com"),
    ];
    for (input, expected) in cases {
        let got = aor(input).unwrap();
        assert_eq!(got, expected, "{input}");
        assert_eq!(aor(&got).as_deref(), Some(expected), "{input}: idempotent");
    }
    assert_ne!(aor("sip:alice@example.com"), aor("sips:alice@example.com"));
    assert_ne!(aor("sip:Alice@example.com"), aor("sip:alice@example.com"));
    assert_eq!(aor("tel:+15551234"), None);
    assert_eq!(aor("mailto:alice@example.com"), None);
}

#[test]
fn aors_of_our_own_domains_are_port_free() {
    let home = home();
    let of = |uri: &str| home.of_text(uri).unwrap();
    for (input, expected) in [
        // A listen address names us on its port; 5060 is sip's default (§19.1.1).
        ("sip:u1@127.0.0.1", "sip:u1@127.0.0.1"),
        ("sip:u1@127.0.0.1:5060", "sip:u1@127.0.0.1"),
        ("sip:u1@127.0.0.1:5060;transport=udp", "sip:u1@127.0.0.1"),
        ("<sip:u1@127.0.0.1:5060>", "sip:u1@127.0.0.1"),
        ("sip:u1@[::1]:5070", "sip:u1@[::1]"),
        ("sip:u1@[0:0:0:0:0:0:0:1]:5070", "sip:u1@[::1]"),
        // A configured domain names us on any port.
        ("sip:bob@Example.COM:5080", "sip:bob@example.com"),
        ("sips:bob@example.com:5061", "sips:bob@example.com"),
        // Not us: the port is part of the address (§19.1.4).
        ("sip:u1@127.0.0.1:5080", "sip:u1@127.0.0.1:5080"),
        ("sip:u1@[::1]:5060", "sip:u1@[::1]:5060"),
        ("sip:bob@example.org:5060", "sip:bob@example.org:5060"),
        ("sip:bob@example.org", "sip:bob@example.org"),
    ] {
        assert_eq!(of(input), expected, "{input}");
        assert_eq!(of(expected), expected, "{input}: idempotent");
    }
    // sips: defaults to 5061, which is not one of our listeners on 127.0.0.1.
    assert_eq!(of("sips:u1@127.0.0.1:5060"), "sips:u1@127.0.0.1");
    assert_eq!(of("sips:u1@127.0.0.1:5061"), "sips:u1@127.0.0.1:5061");
    // The strict rule keeps every port.
    assert_eq!(
        strict().of_text("sip:u1@127.0.0.1:5060").unwrap(),
        "sip:u1@127.0.0.1:5060"
    );
}

#[test]
fn a_subscribers_aor_follows_the_same_rule() {
    let home = home();
    assert_eq!(
        home.of_user(false, "alice", "127.0.0.1").as_deref(),
        Some("sip:alice@127.0.0.1")
    );
    assert_eq!(
        home.of_user(true, "a b", "example.com").as_deref(),
        Some("sips:a%20b@example.com")
    );
    assert_eq!(
        home.of_user(false, "a b", "example.com"),
        home.of_text("sip:a%20b@example.com:5090")
    );
    assert_eq!(home.of_user(false, "alice", "not a host"), None);
}

#[test]
fn register_and_lookup_agree_on_our_port() {
    let reg = registrar(MemoryLocation::default()).with_aor_rule(home());
    for (to, calls) in [
        (
            "<sip:u1@127.0.0.1>",
            ["sip:u1@127.0.0.1:5060", "sip:u1@127.0.0.1"],
        ),
        (
            "<sip:u2@127.0.0.1:5060>",
            ["sip:u2@127.0.0.1", "sip:u2@127.0.0.1:5060"],
        ),
    ] {
        let req = register_to(to, to, 1, "Contact: <sip:u@192.0.2.10>\r\n");
        let result = reg.save(&req, &meta(), t0());
        assert_eq!(result.code, 200, "{to}");
        for call in calls {
            assert_eq!(
                contacts(&reg.lookup(call, t0())),
                ["sip:u@192.0.2.10"],
                "{to}: {call}"
            );
        }
    }
    assert_eq!(reg.store().aors(), ["sip:u1@127.0.0.1", "sip:u2@127.0.0.1"]);
    // Another server's port on our address is another AOR.
    assert!(reg.lookup("sip:u1@127.0.0.1:5080", t0()).is_empty());
}

#[test]
fn merging_two_spellings_keeps_every_contact_once() {
    let kept = vec![
        stored("sip:a@192.0.2.1", "c1", 5, 600),
        stored("sip:b@192.0.2.2", "c2", 1, 600),
        stored("sip:c@host.example.com", "c3", 1, 600),
    ];
    let moved = vec![
        // The same Call-ID with a higher CSeq: written later, it wins (in a's place).
        stored("sip:a@192.0.2.1", "c1", 7, 300),
        // Another Call-ID: the later expiry wins, here the one kept.
        stored("sip:b@192.0.2.2", "c9", 1, 60),
        // User parts are case-sensitive (§19.1.4): another contact.
        stored("sip:B@192.0.2.2", "c9", 1, 60),
        // Equivalent by §19.1.4 (host case), another Call-ID, a later expiry: it wins.
        stored("sip:c@Host.Example.COM", "c8", 1, 900),
        stored("sip:d@192.0.2.4", "c4", 1, 600),
    ];
    let merged = merge_bindings(kept, moved);
    assert_eq!(
        contacts(&merged),
        [
            "sip:a@192.0.2.1",
            "sip:b@192.0.2.2",
            "sip:c@Host.Example.COM",
            "sip:B@192.0.2.2",
            "sip:d@192.0.2.4",
        ]
    );
    assert_eq!(merged[0].cseq, 7);
    assert_eq!(merged[1].call_id, "c2");
    assert_eq!(merged[2].call_id, "c8");
    // Idempotent: merging the result with itself changes nothing.
    assert_eq!(merge_bindings(merged.clone(), merged.clone()), merged);
}

#[test]
fn new_binding_records_the_request() {
    let req = register(
        "c1@192.0.2.10",
        7,
        "Contact: \"Alice\" <sip:alice@192.0.2.10:5062;transport=udp>;q=0.5;\
         +sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\";reg-id=1\r\n\
         Path: <sip:edge1.example.com;lr>, <sip:edge2.example.com;lr>\r\n\
         Path: <sip:edge3.example.com;lr>\r\n\
         User-Agent: phone/1.0\r\n\
         Expires: 1800\r\n",
    );
    let (bindings, changed) = updated(run(&req, &[]));
    assert!(changed);
    assert_eq!(
        bindings,
        vec![Binding {
            aor: ALICE.to_owned(),
            contact: "sip:alice@192.0.2.10:5062;transport=udp".to_owned(),
            expires_at: t0() + secs(1800),
            q: 500,
            call_id: "c1@192.0.2.10".to_owned(),
            cseq: 7,
            received: Some((TransportKind::Udp, "192.0.2.10:5062".parse().unwrap())),
            local: Some("192.0.2.1:5060".parse::<SocketAddr>().unwrap()),
            path: vec![
                "<sip:edge1.example.com;lr>".to_owned(),
                "<sip:edge2.example.com;lr>".to_owned(),
                "<sip:edge3.example.com;lr>".to_owned(),
            ],
            instance: Some("<urn:uuid:00000000-0000-1000-8000-000A95A0E128>".to_owned()),
            reg_id: Some(1),
            user_agent: Some("phone/1.0".to_owned()),
            nated: false,
            node: None,
            owner_route: None,
        }]
    );
}

#[test]
fn aor_comes_from_to_normalized() {
    let req = register_to(
        "\"Alice\" <sip:%61lice@EXAMPLE.com;user=ip>",
        "c1",
        1,
        "Contact: <sip:alice@192.0.2.10>\r\n",
    );
    let (bindings, _) = updated(run(&req, &[]));
    assert_eq!(bindings[0].aor, ALICE);
}

#[test]
fn expires_param_over_header_over_default() {
    let req = register(
        "c1",
        1,
        "Contact: <sip:a@192.0.2.10>;expires=120, <sip:b@192.0.2.10>\r\nExpires: 1800\r\n",
    );
    let (bindings, _) = updated(run(&req, &[]));
    assert_eq!(expiries(&bindings), [120, 1800]);
    let req = register("c1", 1, "Contact: <sip:a@192.0.2.10>\r\n");
    let (bindings, _) = updated(run(&req, &[]));
    assert_eq!(expiries(&bindings), [3600]);
}

#[test]
fn malformed_expires_counts_as_3600() {
    let req = register(
        "c1",
        1,
        "Contact: <sip:a@192.0.2.10>;expires=soon, <sip:b@192.0.2.10>\r\nExpires: later\r\n",
    );
    let (bindings, _) = updated(run(&req, &[]));
    assert_eq!(expiries(&bindings), [3600, 3600]);
}

#[test]
fn expires_above_max_is_lowered() {
    let req = register("c1", 1, "Contact: <sip:a@192.0.2.10>;expires=100000\r\n");
    let (bindings, _) = updated(run(&req, &[]));
    assert_eq!(expiries(&bindings), [7200]);
    let req = register(
        "c1",
        1,
        "Contact: <sip:a@192.0.2.10>\r\nExpires: 99999999999\r\n",
    );
    let (bindings, _) = updated(run(&req, &[]));
    assert_eq!(expiries(&bindings), [7200]);
}

#[test]
fn too_brief_gets_423_with_min_expires() {
    let req = register("c1", 1, "Contact: <sip:a@192.0.2.10>;expires=30\r\n");
    let (code, reason, headers) = refused(run(&req, &[]));
    assert_eq!((code, reason), (423, "Interval Too Brief"));
    assert_eq!(headers, [("Min-Expires".to_owned(), "60".to_owned())]);
    // At the minimum: accepted.
    let req = register("c1", 1, "Contact: <sip:a@192.0.2.10>;expires=60\r\n");
    assert_eq!(expiries(&updated(run(&req, &[])).0), [60]);
    // §10.3 allows 423 only under one hour: with a minimum above it, an interval between
    // one hour and the minimum is granted as asked.
    let long_min = Rules {
        default_expires: 7200,
        min_expires: 7200,
        max_expires: 86400,
    };
    let req = register("c1", 1, "Contact: <sip:a@192.0.2.10>;expires=5000\r\n");
    let (bindings, _) = updated(process(&req, &meta(), &strict(), &[], &long_min, t0()));
    assert_eq!(expiries(&bindings), [5000]);
    let req = register("c1", 1, "Contact: <sip:a@192.0.2.10>;expires=3599\r\n");
    let (code, _, headers) = refused(process(&req, &meta(), &strict(), &[], &long_min, t0()));
    assert_eq!(code, 423);
    assert_eq!(headers, [("Min-Expires".to_owned(), "7200".to_owned())]);
}

#[test]
fn expires_zero_removes_the_binding() {
    let current = [
        stored("sip:a@192.0.2.10", "other", 50, 600),
        stored("sip:b@192.0.2.10", "other", 50, 600),
    ];
    let req = register("c1", 1, "Contact: <sip:a@192.0.2.10>;expires=0\r\n");
    let (bindings, changed) = updated(run(&req, &current));
    assert!(changed);
    assert_eq!(contacts(&bindings), ["sip:b@192.0.2.10"]);
    // The Expires header field applies too; removing an unknown contact changes nothing.
    let req = register("c1", 1, "Contact: <sip:z@192.0.2.10>\r\nExpires: 0\r\n");
    let (bindings, changed) = updated(run(&req, &current));
    assert!(!changed);
    assert_eq!(bindings, current);
}

#[test]
fn star_needs_expires_zero_and_no_other_contact() {
    for extra in [
        "Contact: *\r\n",
        "Contact: *\r\nExpires: 10\r\n",
        "Contact: *\r\nExpires: zero\r\n",
        "Contact: *, <sip:a@192.0.2.10>\r\nExpires: 0\r\n",
        "Contact: <sip:a@192.0.2.10>\r\nContact: *\r\nExpires: 0\r\n",
    ] {
        let (code, _, _) = refused(run(&register("c1", 1, extra), &[]));
        assert_eq!(code, 400, "{extra:?}");
    }
}

#[test]
fn star_removes_every_binding() {
    let current = [
        stored("sip:a@192.0.2.10", "c1", 5, 600),
        stored("sip:b@192.0.2.11", "someone-else", 90, 600),
    ];
    let req = register("c1", 6, "Contact: *\r\nExpires: 0\r\n");
    let (bindings, changed) = updated(run(&req, &current));
    assert!(changed && bindings.is_empty());
    // Nothing to remove: nothing changes.
    let (bindings, changed) = updated(run(&req, &[]));
    assert!(!changed && bindings.is_empty());
}

#[test]
fn star_is_subject_to_the_cseq_rule() {
    let current = [
        stored("sip:a@192.0.2.10", "c1", 5, 600),
        stored("sip:b@192.0.2.11", "other", 1, 600),
    ];
    let req = register("c1", 4, "Contact: *\r\nExpires: 0\r\n");
    let (code, _, _) = refused(run(&req, &current));
    assert_eq!(code, 500);
}

#[test]
fn same_call_id_needs_a_higher_cseq() {
    let current = [stored("sip:a@192.0.2.10", "c1", 5, 600)];
    let req = register("c1", 6, "Contact: <sip:a@192.0.2.10>;expires=1200\r\n");
    let (bindings, changed) = updated(run(&req, &current));
    assert!(changed);
    assert_eq!(expiries(&bindings), [1200]);
    assert_eq!(bindings[0].cseq, 6);

    let req = register("c1", 4, "Contact: <sip:a@192.0.2.10>;expires=1200\r\n");
    let (code, reason, _) = refused(run(&req, &current));
    assert_eq!(code, 500);
    assert!(reason.starts_with("Server Internal Error"), "{reason}");
}

#[test]
fn same_call_id_and_cseq_is_a_retransmission() {
    let current = [stored("sip:a@192.0.2.10", "c1", 5, 600)];
    let req = register("c1", 5, "Contact: <sip:a@192.0.2.10>;expires=1200\r\n");
    let (bindings, changed) = updated(run(&req, &current));
    assert!(!changed);
    assert_eq!(bindings, current);
    // Its own result, processed again, is unchanged too.
    let first = register("c2", 1, "Contact: <sip:n@192.0.2.10>\r\n");
    let (after_first, _) = updated(run(&first, &[]));
    let (again, changed) = updated(run(&first, &after_first));
    assert!(!changed);
    assert_eq!(again, after_first);
}

#[test]
fn another_call_id_replaces_whatever_its_cseq() {
    let current = [stored("sip:a@192.0.2.10", "old-call", 500, 600)];
    let req = register("new-call", 1, "Contact: <sip:a@192.0.2.10>\r\n");
    let (bindings, changed) = updated(run(&req, &current));
    assert!(changed);
    assert_eq!(bindings.len(), 1);
    assert_eq!(
        (bindings[0].call_id.as_str(), bindings[0].cseq),
        ("new-call", 1)
    );
}

#[test]
fn contacts_match_by_uri_equivalence() {
    let current = [stored("sip:alice@Host.Example.com:5060", "c0", 1, 600)];
    let req = register("c1", 1, "Contact: <sip:alice@host.EXAMPLE.COM:5060>\r\n");
    let (bindings, _) = updated(run(&req, &current));
    assert_eq!(contacts(&bindings), ["sip:alice@host.EXAMPLE.COM:5060"]);
    // transport must match when either side has it (§19.1.4): another binding.
    let req = register(
        "c1",
        1,
        "Contact: <sip:alice@host.example.com:5060;transport=tcp>\r\n",
    );
    let (bindings, _) = updated(run(&req, &current));
    assert_eq!(bindings.len(), 2);
    // An explicit port differs from none: another binding.
    let req = register("c1", 1, "Contact: <sip:alice@host.example.com>\r\n");
    assert_eq!(updated(run(&req, &current)).0.len(), 2);
}

#[test]
fn refresh_keeps_registration_order() {
    let current = [
        stored("sip:a@192.0.2.10", "c1", 1, 600),
        stored("sip:b@192.0.2.11", "c2", 1, 600),
    ];
    let req = register(
        "c1",
        2,
        "Contact: <sip:c@192.0.2.12>, <sip:a@192.0.2.10>;expires=900\r\n",
    );
    let (bindings, _) = updated(run(&req, &current));
    assert_eq!(
        contacts(&bindings),
        ["sip:a@192.0.2.10", "sip:b@192.0.2.11", "sip:c@192.0.2.12"]
    );
    assert_eq!(expiries(&bindings), [900, 600, 3600]);
}

#[test]
fn no_contact_is_a_query() {
    let current = [
        stored("sip:a@192.0.2.10", "c1", 9, 600),
        stored("sip:old@192.0.2.10", "c1", 9, 0),
    ];
    // Even a lower CSeq: a query changes nothing, so it cannot be out of order.
    let req = register("c1", 1, "");
    let (bindings, changed) = updated(run(&req, &current));
    assert!(!changed);
    assert_eq!(contacts(&bindings), ["sip:a@192.0.2.10"]);
}

#[test]
fn expired_bindings_are_ignored_and_dropped() {
    let current = [
        stored("sip:a@192.0.2.10", "c1", 9, 0),
        stored("sip:b@192.0.2.11", "c2", 1, 600),
    ];
    // The expired binding has a higher CSeq for this Call-ID but no longer counts.
    let req = register("c1", 2, "Contact: <sip:a@192.0.2.10>\r\n");
    let (bindings, changed) = updated(run(&req, &current));
    assert!(changed);
    assert_eq!(
        contacts(&bindings),
        ["sip:b@192.0.2.11", "sip:a@192.0.2.10"]
    );
    assert_eq!(bindings[1].cseq, 2);
}

#[test]
fn all_or_nothing() {
    let current = [stored("sip:a@192.0.2.10", "c1", 5, 600)];
    // A new contact and a too brief one: 423, the new contact is not added.
    let req = register(
        "c1",
        6,
        "Contact: <sip:b@192.0.2.11>, <sip:a@192.0.2.10>;expires=30\r\n",
    );
    assert_eq!(refused(run(&req, &current)).0, 423);
    // A new contact and an out-of-order update: 500.
    let req = register(
        "c1",
        4,
        "Contact: <sip:b@192.0.2.11>, <sip:a@192.0.2.10>\r\n",
    );
    assert_eq!(refused(run(&req, &current)).0, 500);
    // A good contact then a bad q: 400.
    let req = register(
        "c1",
        6,
        "Contact: <sip:b@192.0.2.11>\r\nContact: <sip:c@192.0.2.12>;q=2\r\n",
    );
    assert_eq!(refused(run(&req, &current)).0, 400);
}

#[test]
fn a_contact_listed_twice_takes_its_last_value() {
    let req = register(
        "c1",
        1,
        "Contact: <sip:a@192.0.2.10>;expires=100, <sip:a@192.0.2.10>;expires=0, \
         <sip:b@192.0.2.10>;expires=100, <sip:B@192.0.2.10>;expires=300, \
         <sip:b@192.0.2.10>;expires=200\r\n",
    );
    let (bindings, _) = updated(run(&req, &[]));
    // User parts are case-sensitive (§19.1.4): sip:b and sip:B are two contacts.
    assert_eq!(
        contacts(&bindings),
        ["sip:B@192.0.2.10", "sip:b@192.0.2.10"]
    );
    assert_eq!(expiries(&bindings), [300, 200]);
}

#[test]
fn malformed_requests_get_400_404_or_500() {
    let contact = "Contact: <sip:a@192.0.2.10>\r\n";
    let cases = [
        (register_to("<sip:alice@example.com", "c1", 1, contact), 400),
        (register_to("<tel:+15551234>", "c1", 1, contact), 404),
        (
            register("c1", 1, "Contact: <sip:a@192.0.2.10>;q=1.5\r\n"),
            400,
        ),
        (register("c1", 1, "Contact: <sip:a@192.0.2.10\r\n"), 400),
        (
            register("c1", 1, "Contact: <sip:a@192.0.2.10>\r\nPath: sip:\r\n"),
            400,
        ),
    ];
    for (req, code) in cases {
        assert_eq!(refused(run(&req, &[])).0, code, "{:?}", req.to_bytes());
    }
    let options = message(
        "OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1\r\n\
         To: <sip:alice@example.com>\r\nFrom: <sip:a@example.com>;tag=1\r\nCall-ID: x\r\n\
         CSeq: 1 OPTIONS\r\nContact: <sip:a@192.0.2.10>\r\nContent-Length: 0\r\n\r\n"
            .to_owned(),
    );
    assert_eq!(refused(run(&options, &[])).0, 500);
}

#[test]
fn too_many_contacts_or_bindings_get_403() {
    let many: Vec<String> = (0..=MAX_BINDINGS_PER_AOR)
        .map(|i| format!("<sip:u{i}@192.0.2.10>"))
        .collect();
    let req = register("c1", 1, &format!("Contact: {}\r\n", many.join(", ")));
    assert_eq!(refused(run(&req, &[])).0, 403);

    let full: Vec<Binding> = (0..MAX_BINDINGS_PER_AOR)
        .map(|i| stored(&format!("sip:u{i}@192.0.2.10"), "c0", 1, 600))
        .collect();
    let req = register("c1", 1, "Contact: <sip:new@192.0.2.10>\r\n");
    assert_eq!(refused(run(&req, &full)).0, 403);
    // Refreshing or removing stays possible.
    let req = register("c1", 1, "Contact: <sip:u3@192.0.2.10>\r\n");
    assert_eq!(updated(run(&req, &full)).0.len(), MAX_BINDINGS_PER_AOR);
}

#[test]
fn ok_response_lists_current_bindings() {
    let mut half = stored("sip:a@192.0.2.10", "c1", 1, 600);
    half.q = 500;
    let mut low = stored("sip:b@192.0.2.11;transport=tcp", "c1", 1, 30);
    low.q = 5;
    low.expires_at += Duration::from_millis(200);
    let gone = stored("sip:c@192.0.2.12", "c1", 1, 0);
    let full = stored("sip:d@192.0.2.13", "c1", 1, 7200);
    let req = register(
        "c1",
        1,
        "Path: <sip:edge1.example.com;lr>\r\nPath: <sip:edge2.example.com;lr>\r\n",
    );
    let bytes = ok_response(&req, &[half, low, gone, full], t0(), b"reg-tag");
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(text.starts_with("SIP/2.0 200 OK\r\n"), "{text}");
    assert!(
        text.contains("\r\nTo: <sip:alice@example.com>;tag=reg-tag\r\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "\r\nContact: <sip:a@192.0.2.10>;expires=600;q=0.5\r\n\
             Contact: <sip:b@192.0.2.11;transport=tcp>;expires=31;q=0.005\r\n\
             Contact: <sip:d@192.0.2.13>;expires=7200\r\n\
             Path: <sip:edge1.example.com;lr>, <sip:edge2.example.com;lr>\r\n\
             Date: Tue, 14 Nov 2023 22:13:20 GMT\r\n"
        ),
        "{text}"
    );
    let parsed = Message::parse(bytes).unwrap();
    parsed.validate().unwrap();
    assert_eq!(parsed.contacts().count(), 3);
    assert_eq!(parsed.status(), Some(200));

    // No bindings, no Path: just the Date.
    let req = register("c1", 1, "");
    let bytes = ok_response(&req, &[], t0(), b"t");
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(
        !text.contains("Contact:") && !text.contains("Path:"),
        "{text}"
    );
    assert!(text.contains("Date: "), "{text}");
}

#[test]
fn rfc1123_dates() {
    let cases = [
        (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
        (1_700_000_000, "Tue, 14 Nov 2023 22:13:20 GMT"),
        (951_782_400, "Tue, 29 Feb 2000 00:00:00 GMT"),
        (4_102_444_799, "Thu, 31 Dec 2099 23:59:59 GMT"),
    ];
    for (t, expected) in cases {
        let date = rfc1123_date(UNIX_EPOCH + secs(t));
        assert_eq!(date, expected);
        check_date(date.as_bytes()).unwrap();
    }
    assert_eq!(
        rfc1123_date(UNIX_EPOCH - secs(5)),
        "Thu, 01 Jan 1970 00:00:00 GMT"
    );
}

#[test]
fn the_cached_date_follows_the_clock() {
    for t in [1_700_000_000, 1_700_000_000, 1_700_000_001, 951_782_400, 0] {
        let now = UNIX_EPOCH + secs(t) + Duration::from_millis(999);
        assert_eq!(cached_date(now), rfc1123_date(now), "{t}");
    }
}

#[test]
fn q_values_are_written_as_qvalues() {
    for (q, text) in [
        (0, "0"),
        (1, "0.001"),
        (50, "0.05"),
        (500, "0.5"),
        (999, "0.999"),
    ] {
        assert_eq!(format_q(q), text);
        assert_eq!(parse_qvalue(text.as_bytes()), Some(q));
    }
}

fn registrar(store: MemoryLocation) -> Registrar {
    Registrar::new(Arc::new(store), rules())
}

#[test]
fn save_stores_and_lookup_normalizes() {
    let reg = registrar(MemoryLocation::default());
    let req = register_to(
        "<sip:alice@EXAMPLE.com>",
        "c1",
        1,
        "Contact: <sip:a@192.0.2.10>;q=0.5, <sip:b@192.0.2.11>\r\n",
    );
    let result = reg.save(&req, &meta(), t0());
    assert_eq!((result.code, result.reason.as_str()), (200, "OK"));
    assert!(result.changed && result.is_success());
    assert_eq!(result.aor.as_deref(), Some(ALICE));
    assert_eq!(reg.store().count(), 2);
    for uri in [
        "sip:alice@example.com",
        "<sip:alice@Example.Com;transport=tcp>",
        " sip:%61lice@example.com ",
    ] {
        assert_eq!(
            contacts(&reg.lookup(uri, t0())),
            ["sip:b@192.0.2.11", "sip:a@192.0.2.10"],
            "{uri}"
        );
    }
    assert!(reg.lookup("sip:Alice@example.com", t0()).is_empty());
    assert!(reg.lookup("not a uri", t0()).is_empty());
    assert!(reg.lookup(ALICE, t0() + secs(3600)).is_empty());

    // The headers alone make the 200 (for callers that build the response themselves).
    let names: Vec<&str> = result.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["Contact", "Contact", "Date"]);
    let response = result.response(&req, b"tag1");
    let text = std::str::from_utf8(&response).unwrap();
    assert!(text.starts_with("SIP/2.0 200 OK\r\n"), "{text}");
    assert!(
        text.contains("Contact: <sip:a@192.0.2.10>;expires=3600;q=0.5\r\n"),
        "{text}"
    );

    // The same request again (a retransmission): the same answer, nothing written.
    let again = reg.save(&req, &meta(), t0() + secs(1));
    assert_eq!(again.code, 200);
    assert!(!again.changed);
    assert_eq!(again.bindings.len(), 2);

    // A query.
    let query = reg.save(&register("c1", 2, ""), &meta(), t0());
    assert_eq!(
        (query.code, query.changed, query.bindings.len()),
        (200, false, 2)
    );

    // Removal of everything empties the store.
    let star = reg.save(
        &register("c1", 3, "Contact: *\r\nExpires: 0\r\n"),
        &meta(),
        t0(),
    );
    assert_eq!((star.code, star.changed), (200, true));
    assert_eq!(reg.store().count(), 0);
}

#[test]
fn save_refusals_carry_their_headers() {
    let reg = registrar(MemoryLocation::default());
    let req = register("c1", 1, "Contact: <sip:a@192.0.2.10>;expires=10\r\n");
    let result = reg.save(&req, &meta(), t0());
    assert_eq!(result.code, 423);
    assert_eq!(
        result.headers,
        [("Min-Expires".to_owned(), "60".to_owned())]
    );
    assert_eq!(reg.store().count(), 0);
    let response = result.response(&req, b"tag1");
    let text = std::str::from_utf8(&response).unwrap();
    assert!(
        text.starts_with("SIP/2.0 423 Interval Too Brief\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nMin-Expires: 60\r\n"), "{text}");
    assert!(text.contains(";tag=tag1\r\n"), "{text}");

    let tel = register_to(
        "<tel:+15551234>",
        "c1",
        1,
        "Contact: <sip:a@192.0.2.10>\r\n",
    );
    let result = reg.save(&tel, &meta(), t0());
    assert_eq!((result.code, result.aor), (404, None));
}

#[test]
fn save_reports_a_full_store_as_500() {
    let reg = registrar(MemoryLocation::new(1));
    let req = register(
        "c1",
        1,
        "Contact: <sip:a@192.0.2.10>, <sip:b@192.0.2.11>\r\n",
    );
    let result = reg.save(&req, &meta(), t0());
    assert_eq!(result.code, 500);
    assert!(
        result.reason.contains("location store"),
        "{}",
        result.reason
    );
    assert_eq!(reg.store().count(), 0);
}

// ----- RFC 5626 §6: outbound flows --------------------------------------------------------

const INSTANCE: &str = "+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\"";

/// A binding of flow 1 of [`INSTANCE`] at `contact`, as a REGISTER over one connection wrote it.
fn flow_binding(contact: &str, call_id: &str) -> Binding {
    Binding {
        instance: Some("<urn:uuid:00000000-0000-1000-8000-000A95A0E128>".to_owned()),
        reg_id: Some(1),
        ..stored(contact, call_id, 1, 600)
    }
}

#[test]
fn a_new_flow_of_the_same_instance_and_reg_id_replaces_the_old_one() {
    // The phone's connection died; it re-registers over a new one, with a new Contact host.
    let old = flow_binding("sip:alice@old1.invalid;transport=ws", "c1");
    let req = register(
        "c2",
        1,
        &format!("Contact: <sip:alice@new2.invalid;transport=ws;ob>;{INSTANCE};reg-id=1\r\n"),
    );
    let (bindings, changed) = updated(run(&req, std::slice::from_ref(&old)));
    assert!(changed);
    assert_eq!(
        contacts(&bindings),
        ["sip:alice@new2.invalid;transport=ws;ob"]
    );
    assert_eq!(bindings[0].reg_id, Some(1));
    // Another reg-id of the same instance is another flow: both stay (§4.2: one per
    // connection to each outbound proxy).
    let second = register(
        "c3",
        1,
        &format!("Contact: <sip:alice@other.invalid;transport=ws;ob>;{INSTANCE};reg-id=2\r\n"),
    );
    let (bindings, _) = updated(run(&second, &[old]));
    assert_eq!(bindings.len(), 2);
}

#[test]
fn a_flow_replacement_obeys_the_cseq_rule() {
    let old = Binding {
        cseq: 5,
        ..flow_binding("sip:alice@old1.invalid;transport=ws", "c1")
    };
    let stale = register(
        "c1",
        4,
        &format!("Contact: <sip:alice@new2.invalid;transport=ws;ob>;{INSTANCE};reg-id=1\r\n"),
    );
    assert_eq!(refused(run(&stale, std::slice::from_ref(&old))).0, 500);
}

#[test]
fn reg_id_is_ignored_behind_a_proxy_without_outbound() {
    let old = flow_binding("sip:alice@192.0.2.10:5062", "c1");
    let contact = format!("Contact: <sip:alice@192.0.2.10:6000;ob>;{INSTANCE};reg-id=1\r\n");
    // Two Vias, and a Path without `ob`: plain RFC 3261, a second binding and no Require.
    let relayed = |path: &str| {
        register(
            "c2",
            1,
            &format!("Via: SIP/2.0/UDP 192.0.2.20;branch=z9hG4bK-e\r\nPath: {path}\r\n{contact}"),
        )
    };
    let plain = relayed("<sip:edge.example.com;lr>");
    assert!(!outbound_applies(&plain));
    let (bindings, _) = updated(run(&plain, std::slice::from_ref(&old)));
    assert_eq!(bindings.len(), 2);
    assert!(!ok_headers(&plain, &bindings, t0())
        .iter()
        .any(|(name, _)| name == "Require"));
    // The same with `ob` on the edge proxy's Path: outbound applies.
    let edge = relayed("<sip:edge.example.com;lr;ob>");
    assert!(outbound_applies(&edge));
    let (bindings, _) = updated(run(&edge, &[old]));
    assert_eq!(contacts(&bindings), ["sip:alice@192.0.2.10:6000;ob"]);
}

#[test]
fn the_200_requires_outbound_only_for_a_flow() {
    let with_flow = register(
        "c1",
        1,
        &format!("Contact: <sip:alice@a.invalid;transport=ws;ob>;{INSTANCE};reg-id=1\r\n"),
    );
    let headers = ok_headers(&with_flow, &[], t0());
    assert!(headers.contains(&("Require".to_owned(), "outbound".to_owned())));
    // reg-id without an instance is no flow (RFC 5626 §6: the registrar ignores it).
    for contact in [
        "Contact: <sip:alice@a.invalid;transport=ws>;reg-id=1\r\n".to_owned(),
        format!("Contact: <sip:alice@a.invalid;transport=ws>;{INSTANCE}\r\n"),
    ] {
        let plain = register("c1", 1, &contact);
        assert!(!ok_headers(&plain, &[], t0())
            .iter()
            .any(|(name, _)| name == "Require"));
    }
}
