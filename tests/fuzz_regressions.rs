//! Inputs the `parse` fuzz target (fuzz/) found failing, kept so the fixes stay fixed. Hosts are
//! example domains or 127.0.0.1; nothing is sent anywhere.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use moonroute::sip::{HeaderName, Message};

fn peer() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

/// The proxy's edits on a request that validated must leave a message that still parses and
/// validates.
fn proxy_edits_keep_it_valid(mut m: Message) -> Message {
    m.validate().unwrap();
    m.stamp_received(peer()).unwrap();
    m.prepend_header("Via", b"SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKregress")
        .unwrap();
    m.prepend_header("Record-Route", b"<sip:127.0.0.1;lr>")
        .unwrap();
    m.set_header("Max-Forwards", b"69").unwrap();
    m.set_request_uri(b"sip:bob@127.0.0.1:5062").unwrap();
    let again = Message::parse(m.to_bytes()).expect("edited request re-parses");
    again.validate().expect("edited request validates");
    again
}

/// RFC 4475 §3.1.1.1 (wsinv) folds its top Via across three lines. Stamping `received` rewrote
/// the Via with the folds' CRLFs inside, which the edit refuses, so the server answered this
/// valid request with 400.
#[test]
fn folded_top_via_can_be_stamped() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/rfc4475/wsinv.sip");
    let m = Message::parse(Bytes::from(std::fs::read(path).unwrap())).unwrap();
    let again = proxy_edits_keep_it_valid(m);
    let vias: Vec<_> = again.vias().map(Result::unwrap).collect();
    assert_eq!(vias.len(), 4);
    assert_eq!(vias[1].received(), Some(&b"127.0.0.1"[..]));
    assert_eq!(vias[1].branch(), Some(&b"390skdjuw"[..]));
    assert_eq!(vias[1].transport, b"UDP");
}

/// Minimised from a fuzzer crash: bare CRs inside a Via line holding two values. Rewriting the
/// first value copied the CRs into the new line and the edit refused it. Folds are now unfolded
/// on rewrite, and a CR outside CRLF is refused at parse time (a smuggling vector: downstream
/// parsers may end a line there), so this message gets 400 naming the problem.
#[test]
fn bare_cr_inside_a_line_is_refused() {
    let text = b"INVITE sip:bob@example.com SIP/2.0\r\n\
To: <sip:bob@example.com>\n\
From: <sip:alice@example.com>;tag=1\n\
Call-ID: r2@example.com\n\
CSeq: 9\rINVITE\n\
v: SIP/2.0/UDP\ra.example.com;branch=z9hG4bK1,SIP /2.0/ UDP\r b.example.com;branch=z9hG4bK2\n\
\n";
    let e = Message::parse(Bytes::from_static(text)).unwrap_err();
    assert_eq!(e.status(), 400);
    assert!(e.to_string().contains("CR"), "{e}");
    let smuggle = b"OPTIONS sip:a@example.com SIP/2.0\r\nX-A: x\rVia: SIP/2.0/UDP evil\r\n\r\n";
    assert!(Message::parse(Bytes::from_static(smuggle)).is_err());
}

/// The response-side twin: removing the top value of a folded Via line kept the rest of the line
/// with its CRLF folds, and the edit refused it (§16.7 step 3 could not be done).
#[test]
fn top_value_of_folded_via_line_can_be_removed() {
    let text = b"SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP a.example.com;branch=z9hG4bK1 ,\r\n SIP/2.0/UDP b.example.com\r\n ;branch=z9hG4bK2\r\n\
From: <sip:alice@example.com>;tag=1\r\n\
To: <sip:bob@example.com>;tag=2\r\n\
Call-ID: r3@example.com\r\n\
CSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\
\r\n";
    let mut m = Message::parse(Bytes::from_static(text)).unwrap();
    m.validate().unwrap();
    assert_eq!(m.remove_first_value(HeaderName::Via), Ok(true));
    let again = Message::parse(m.to_bytes()).unwrap();
    again.validate().unwrap();
    let vias: Vec<_> = again.vias().map(Result::unwrap).collect();
    assert_eq!(vias.len(), 1);
    assert_eq!(vias[0].branch(), Some(&b"z9hG4bK2"[..]));
}
