//! Arbitrary bytes through everything the server does with a received message: parse, validate,
//! typed access, the proxy's edits, serialization and re-parsing. Any panic is a bug; so is a
//! message that validated but whose edited form no longer parses or validates.

#![no_main]

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use moonroute::sip::{Contact, HeaderName, Message};

const PEER: &str = "127.0.0.1:40000";
const OUR_VIA: &[u8] = b"SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKfuzz";
const OUR_RR: &[u8] = b"<sip:127.0.0.1;lr>";
const NEXT_HOP: &[u8] = b"sip:bob@127.0.0.1:5062";

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = Message::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    let valid = msg.validate().is_ok();
    touch_typed(&msg);

    // The unedited form is a slice of the input and must read back as the same message.
    let wire = msg.to_bytes();
    let again = Message::parse(wire.clone()).expect("unedited message re-parses");
    assert_eq!(again.to_bytes(), wire);
    assert_eq!(again.validate().is_ok(), valid);
    // write_to rebuilds the message with CRLF line ends (the input may use bare LF), so it
    // must describe the same message rather than repeat the same bytes.
    let mut written = BytesMut::new();
    msg.write_to(&mut written);
    let rebuilt = Message::parse(written.freeze()).expect("rebuilt message re-parses");
    assert_eq!(rebuilt.header_count(), msg.header_count());
    assert_eq!(rebuilt.body(), msg.body());
    assert_eq!(rebuilt.validate().is_ok(), valid);

    if msg.is_request() {
        proxy_request(msg, valid);
    } else {
        proxy_response(msg, valid);
    }
});

fn touch_typed(m: &Message) {
    let _ = (m.method(), m.status(), m.reason(), m.start_line());
    let _ = m
        .request_uri()
        .map(|u| (u.is_routable_scheme(), u.as_sip().map(|s| s.has_lr())));
    for v in m.vias().flatten() {
        let _ = (v.branch(), v.received(), v.rport(), v.maddr());
        let _ = v.with_received(PEER.parse().unwrap());
    }
    let _ = m.top_via();
    for a in [m.from(), m.to()].into_iter().flatten() {
        let _ = (a.tag(), a.display_name());
    }
    let _ = (m.call_id(), m.cseq(), m.max_forwards(), m.expires());
    for c in m.contacts().flatten() {
        let _ = (c.expires(), c.q());
        if let Contact::Addr(a) = c {
            let _ = a.display_name();
        }
    }
    let _ = m.routes().chain(m.record_routes()).chain(m.paths()).count();
    let _ = m.option_tags(HeaderName::Supported).count();
    let _ = (m.content_type(), m.body().len(), m.header_count());
    for h in m.headers() {
        let _ = h.is("x-fuzz");
    }
}

/// What a proxy does before forwarding a request (RFC 3261 §16.6, §18.2.1).
fn proxy_request(mut m: Message, valid: bool) {
    let peer: SocketAddr = PEER.parse().unwrap();
    let stamped = m.stamp_received(peer);
    let mf = match m.max_forwards() {
        Some(Ok(n)) => n.saturating_sub(1),
        _ => 70,
    };
    let edits = [
        stamped.map(|_| ()),
        m.prepend_header("Via", OUR_VIA),
        m.prepend_header("Record-Route", OUR_RR),
        m.set_header("Max-Forwards", mf.to_string().as_bytes()),
        m.set_request_uri(NEXT_HOP),
    ];
    let edited = m.to_bytes();
    let reparsed = Message::parse(edited.clone());
    if !valid {
        if let Ok(r) = reparsed {
            let _ = r.validate();
            touch_typed(&r);
        }
        return;
    }
    for (i, e) in edits.iter().enumerate() {
        assert!(e.is_ok(), "edit {i} failed on a valid request: {e:?}");
    }
    let r = reparsed.expect("edited valid request re-parses");
    r.validate().expect("edited valid request validates");
    assert_eq!(r.to_bytes(), edited);
    assert_eq!(r.top_via().unwrap().raw(), OUR_VIA);
    assert_eq!(r.request_uri_bytes(), Some(NEXT_HOP));
    assert_eq!(r.max_forwards().unwrap().unwrap(), mf);
    assert_eq!(r.header(HeaderName::RecordRoute), Some(OUR_RR));
    assert_eq!(r.vias().count(), m.vias().count());
    assert_eq!(r.body(), m.body());
}

/// What a proxy does before forwarding a response upstream (§16.7 step 3).
fn proxy_response(mut m: Message, valid: bool) {
    let vias = m.vias().count();
    let removed = m.remove_first_value(HeaderName::Via);
    let edited = m.to_bytes();
    let reparsed = Message::parse(edited);
    if !valid {
        return;
    }
    assert_eq!(removed, Ok(true));
    let r = reparsed.expect("edited valid response re-parses");
    assert_eq!(r.vias().count(), vias - 1);
    assert!(r.vias().all(|v| v.is_ok()));
    assert_eq!(r.body(), m.body());
}
