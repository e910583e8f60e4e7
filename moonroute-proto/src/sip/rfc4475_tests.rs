//! RFC 4475 torture messages (files in tests/data/rfc4475, listed in MANIFEST.tsv). Parsed only:
//! they name hosts that are not ours and are never sent anywhere.
//!
//! Codec-level expectations: every `valid` message parses, validates and serializes back to its
//! own bytes; every `invalid` one is refused by [`Message::parse`] or [`Message::validate`] with
//! the status the RFC names and a reason; `semantic` ones parse (the engine's answer to them, such
//! as 416 or 420, is checked by the server's integration tests) except those whose problem is in
//! the header syntax itself (insuf, multi01, mcl01).

use std::path::PathBuf;

use bytes::Bytes;

use super::*;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/rfc4475")
}

fn load(name: &str) -> Bytes {
    let path = dir().join(name);
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn parse_and_validate(data: Bytes) -> Result<Message, ParseError> {
    let m = Message::parse(data)?;
    m.validate()?;
    Ok(m)
}

struct Case {
    file: String,
    class: String,
    expect: String,
}

fn manifest() -> Vec<Case> {
    let text = std::fs::read_to_string(dir().join("MANIFEST.tsv")).expect("manifest");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            Case {
                file: cols[0].into(),
                class: cols[2].into(),
                expect: cols[3].into(),
            }
        })
        .collect()
}

/// Semantic cases whose defect is a header-syntax rule the codec enforces.
const SEMANTIC_REFUSED_BY_CODEC: [&str; 3] = ["insuf.sip", "multi01.sip", "mcl01.sip"];

#[test]
fn every_manifest_message_behaves() {
    let cases = manifest();
    assert!(cases.len() >= 49, "manifest lists {} messages", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let data = load(&c.file);
        let outcome = parse_and_validate(data.clone());
        let refused_by_codec =
            c.class == "invalid" || SEMANTIC_REFUSED_BY_CODEC.contains(&c.file.as_str());
        match (&outcome, refused_by_codec) {
            (Ok(m), false) => {
                let out = m.to_bytes();
                if !data.starts_with(&out) {
                    failures.push(format!("{}: not byte-exact after round trip", c.file));
                }
            }
            (Err(e), true) => {
                let wanted: Vec<u16> = match c.expect.as_str() {
                    "505" => vec![505],
                    "501" => vec![501, 400],
                    _ => vec![400],
                };
                if !wanted.contains(&e.status()) {
                    failures.push(format!(
                        "{}: refused with {} ({e}), expected {:?}",
                        c.file,
                        e.status(),
                        wanted
                    ));
                }
            }
            (Ok(_), true) => failures.push(format!("{}: accepted, expected refusal", c.file)),
            (Err(e), false) => failures.push(format!("{}: refused: {e}", c.file)),
        }
    }
    assert!(
        failures.is_empty(),
        "RFC 4475 failures:\n{}",
        failures.join("\n")
    );
}

fn ok(name: &str) -> Message {
    parse_and_validate(load(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn wsinv_details() {
    let m = ok("wsinv.sip");
    assert_eq!(m.max_forwards().unwrap().unwrap(), 68);
    assert_eq!(
        m.cseq().unwrap(),
        CSeq {
            seq: 9,
            method: Method::Invite
        }
    );
    assert_eq!(m.to().unwrap().tag(), Some(&b"1918181833n"[..]));
    assert_eq!(m.from().unwrap().tag(), Some(&b"98asjd8"[..]));
    let vias: Vec<_> = m.vias().map(|v| v.unwrap()).collect();
    assert_eq!(vias.len(), 3);
    assert_eq!(vias[1].branch(), Some(&b"z9hG4bK9ikj8"[..]));
    assert_eq!(vias[2].branch(), Some(&b"z9hG4bK30239"[..]));
    assert_eq!(m.header(HeaderName::Subject), Some(&b""[..]));
    let route = m.routes().next().unwrap().unwrap();
    assert!(route.uri.as_sip().unwrap().has_lr());
    let contact = m.contacts().next().unwrap().unwrap();
    assert_eq!(contact.q().unwrap().unwrap(), 330);
    assert_eq!(m.body().len(), 150);
}

#[test]
fn valid_message_details() {
    let m = ok("intmeth.sip");
    assert_eq!(
        m.method().unwrap().as_str(),
        "!interesting-Method0123456789_*+`.%indeed'~"
    );
    let m = ok("esc02.sip");
    assert!(matches!(m.method(), Some(Method::Other(_))));
    assert_eq!(
        m.contacts().count(),
        2,
        "C%6Fntact is an extension header, not Contact"
    );
    let m = ok("escnull.sip");
    let users: Vec<Vec<u8>> = m
        .contacts()
        .map(|c| match c.unwrap() {
            Contact::Addr(a) => a.uri.as_sip().unwrap().user.unwrap().to_vec(),
            Contact::Star => unreachable!(),
        })
        .collect();
    assert_eq!(users, [b"%00".to_vec(), b"%00%00".to_vec()]);
    let m = ok("semiuri.sip");
    let uri = m.request_uri().unwrap();
    assert_eq!(
        &*scan::unescape(uri.as_sip().unwrap().user.unwrap()),
        b"user;par=u@example.net"
    );
    assert_eq!(ok("longreq.sip").vias().count(), 34);
    assert_eq!(ok("transports.sip").vias().count(), 5);
    assert_eq!(ok("mpart01.sip").body().len(), 553);
    assert_eq!(ok("noreason.sip").reason(), Some(&b""[..]));
    assert_eq!(ok("inv2543.sip").body().len(), 105);
    let dbl = ok("dblreq.sip");
    assert_eq!(dbl.method(), Some(&Method::Register));
    assert!(dbl.body().is_empty());
    assert!(
        !dbl.to_bytes().windows(6).any(|w| w == b"INVITE"),
        "trailing octets must not be forwarded"
    );
}

#[test]
fn semantic_messages_expose_what_the_engine_needs() {
    assert!(!ok("unkscm.sip").request_uri().unwrap().is_routable_scheme());
    assert!(!ok("novelsc.sip")
        .request_uri()
        .unwrap()
        .is_routable_scheme());
    let bext = ok("bext01.sip");
    assert!(bext.option_tags(HeaderName::Require).count() > 0);
    assert!(bext.option_tags(HeaderName::ProxyRequire).count() > 0);
    assert_eq!(ok("zeromf.sip").max_forwards().unwrap().unwrap(), 0);
    let c = ok("cparam01.sip");
    let Contact::Addr(a) = c.contacts().next().unwrap().unwrap() else {
        panic!()
    };
    assert!(a.params.has("unknownparam") && !a.uri.as_sip().unwrap().params.has("unknownparam"));
    let c = ok("cparam02.sip");
    let Contact::Addr(a) = c.contacts().next().unwrap().unwrap() else {
        panic!()
    };
    assert!(a.uri.as_sip().unwrap().params.has("unknownparam"));
    let r = ok("regescrt.sip");
    let Contact::Addr(a) = r.contacts().next().unwrap().unwrap() else {
        panic!()
    };
    assert!(a.uri.as_sip().unwrap().headers.is_some());
}

#[test]
fn refusals_name_the_problem() {
    for (file, needle) in [
        ("mismatch01.sip", "CSeq"),
        ("insuf.sip", "missing"),
        ("multi01.sip", "more than once"),
        ("mcl01.sip", "Content-Length"),
        ("clerr.sip", "Content-Length"),
        ("escruri.sip", "Request-URI"),
        ("badvers.sip", "version"),
    ] {
        let e = parse_and_validate(load(file)).unwrap_err();
        assert!(e.to_string().contains(needle), "{file}: {e}");
    }
}
