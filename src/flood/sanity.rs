//! `req:sanity()`: the checks of Kamailio's `sanity_check()`, for a request as the script sees
//! it (possibly edited). The engine already refuses malformed requests before the script runs
//! ([`Message::validate`] in the server core); this is for scripts that edited the message or
//! want the stricter rules below, which a proxy would otherwise tolerate.
//!
//! What is checked, and where the rule comes from:
//! - everything [`Message::validate`] checks: Via, From, To, Call-ID and CSeq present and well
//!   formed, single-valued headers at most once (§7.3.1, §20), Max-Forwards a number
//!   (§20.22), the CSeq method equal to the request method (§8.1.1.5, §20.16), no headers in
//!   the Request-URI (§19.1.5);
//! - not Max-Forwards' presence, although §8.1.1 makes it mandatory for a UAC: a proxy must
//!   pass a request without one (§16.3 step 3) and add it (§16.6 step 3), and Kamailio's
//!   `sanity_check` does not require it either;
//! - the Request-URI's scheme is sip, sips (§19.1) or tel (RFC 3966): anything else is 416
//!   (§8.2.2.1);
//! - an INVITE has exactly one Contact, a SIP or SIPS URI (§8.1.1.8);
//! - Content-Length, when present, equals the body's length (§20.14, §18.3);
//! - Expires, when present, is a number of seconds (§20.19).

use crate::sip::{Contact, HeaderName, Message, Method, Uri};

/// Why a request failed [`check`]: the status to answer with and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insane {
    pub code: u16,
    pub reason: String,
}

impl Insane {
    fn bad(reason: impl Into<String>) -> Insane {
        Insane {
            code: 400,
            reason: reason.into(),
        }
    }
}

/// Checks `request` (see the module docs).
pub fn check(request: &Message) -> Result<(), Insane> {
    let method = request
        .method()
        .ok_or_else(|| Insane::bad("not a request"))?;
    request.validate().map_err(|e| Insane {
        code: e.status(),
        reason: e.to_string(),
    })?;
    check_request_uri(request)?;
    if *method == Method::Invite {
        check_invite_contact(request)?;
    }
    if let Some(length) = request.content_length() {
        if length as usize != request.body().len() {
            return Err(Insane::bad("Content-Length: does not match the body"));
        }
    }
    if request.has(HeaderName::Expires) && request.expires().is_none() {
        return Err(Insane::bad("Expires: not a number of seconds"));
    }
    Ok(())
}

fn check_request_uri(request: &Message) -> Result<(), Insane> {
    match request.request_uri() {
        Ok(Uri::Sip(_) | Uri::Tel(_)) => Ok(()),
        Ok(Uri::Other { .. }) => Err(Insane {
            code: 416,
            reason: "Request-URI: unsupported URI scheme".to_owned(),
        }),
        Err(e) => Err(Insane::bad(e.to_string())),
    }
}

fn check_invite_contact(request: &Message) -> Result<(), Insane> {
    let mut contacts = request.contacts();
    match (contacts.next(), contacts.next()) {
        (Some(Ok(Contact::Addr(addr))), None) if addr.uri.as_sip().is_some() => Ok(()),
        (None, _) => Err(Insane::bad("Contact: missing in INVITE")),
        (Some(_), Some(_)) => Err(Insane::bad("Contact: more than one in INVITE")),
        _ => Err(Insane::bad("Contact: not a SIP or SIPS URI")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn request(text: &str) -> Message {
        Message::parse(Bytes::from(text.replace('\n', "\r\n"))).expect("parses")
    }

    const INVITE: &str = "INVITE sip:bob@example.com SIP/2.0
Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1
Max-Forwards: 70
From: <sip:alice@example.com>;tag=1
To: <sip:bob@example.com>
Call-ID: c1
CSeq: 1 INVITE
Contact: <sip:alice@192.0.2.1>
Content-Length: 0

";

    fn with(find: &str, replace: &str) -> Message {
        assert!(INVITE.contains(find), "{find}");
        request(&INVITE.replacen(find, replace, 1))
    }

    fn reason(message: &Message) -> String {
        check(message).unwrap_err().reason
    }

    #[test]
    fn a_well_formed_invite_passes() {
        assert_eq!(check(&request(INVITE)), Ok(()));
    }

    #[test]
    fn required_headers_are_required() {
        for header in [
            "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1\n",
            "From: <sip:alice@example.com>;tag=1\n",
            "To: <sip:bob@example.com>\n",
            "Call-ID: c1\n",
            "CSeq: 1 INVITE\n",
            "Contact: <sip:alice@192.0.2.1>\n",
        ] {
            let message = with(header, "");
            let why = reason(&message);
            let name = header.split(':').next().unwrap();
            assert!(why.contains(name), "without {name}: {why}");
        }
    }

    #[test]
    fn max_forwards_may_be_missing_as_a_proxy_must_accept() {
        assert_eq!(check(&with("Max-Forwards: 70\n", "")), Ok(()));
    }

    #[test]
    fn the_cseq_method_must_be_the_request_method() {
        assert!(reason(&with("CSeq: 1 INVITE", "CSeq: 1 BYE")).contains("CSeq"));
    }

    #[test]
    fn content_length_must_match_the_body() {
        let mut message = request(INVITE);
        // The parser trims a body to its Content-Length; an edit can make them disagree.
        message.set_header("Content-Length", b"12").unwrap();
        assert!(reason(&message).contains("Content-Length"));
    }

    #[test]
    fn the_request_uri_needs_a_supported_scheme() {
        let refused = check(&with(
            "INVITE sip:bob@example.com",
            "INVITE http://example.com",
        ));
        assert_eq!(refused.unwrap_err().code, 416);
        assert_eq!(
            check(&with("INVITE sip:bob@example.com", "INVITE tel:+15551234")),
            Ok(())
        );
    }

    #[test]
    fn single_headers_appear_once_and_numbers_are_numbers() {
        assert!(reason(&with("Call-ID: c1\n", "Call-ID: c1\nCall-ID: c2\n")).contains("Call-ID"));
        assert!(reason(&with("Max-Forwards: 70", "Max-Forwards: many")).contains("Max-Forwards"));
        assert!(reason(&with("Call-ID: c1\n", "Call-ID: c1\nExpires: soon\n")).contains("Expires"));
        assert_eq!(
            check(&with("Call-ID: c1\n", "Call-ID: c1\nExpires: 60\n")),
            Ok(())
        );
    }

    #[test]
    fn an_invite_has_one_sip_contact() {
        let two = with(
            "Contact: <sip:alice@192.0.2.1>",
            "Contact: <sip:alice@192.0.2.1>, <sip:alice@192.0.2.2>",
        );
        assert!(reason(&two).contains("more than one"));
        let tel = with("Contact: <sip:alice@192.0.2.1>", "Contact: <tel:+15551234>");
        assert!(reason(&tel).contains("SIP or SIPS"));
    }

    #[test]
    fn from_and_to_must_parse() {
        assert!(reason(&with(
            "From: <sip:alice@example.com>;tag=1",
            "From: <sip:alice@"
        ))
        .contains("From"));
        assert!(reason(&with("To: <sip:bob@example.com>", "To: <>")).contains("To"));
    }
}
