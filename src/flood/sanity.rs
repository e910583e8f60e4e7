//! `req:sanity()`: the checks of Kamailio's `sanity_check()` with its module defaults, for a
//! request as the script sees it (possibly edited), and stricter checks a script may ask for.
//! The engine already refuses malformed requests before the script runs
//! ([`Message::validate`] in the server core); this is for scripts that edited the message or
//! want the stricter rules below, which a proxy would otherwise tolerate.
//!
//! What [`check`] checks by default (Kamailio's `default_checks`: Request-URI version and
//! scheme, required headers, CSeq method and value, Content-Length, Expires, Proxy-Require,
//! digest credentials), and where each rule comes from:
//! - everything [`Message::validate`] checks: Via, From, To, Call-ID and CSeq present and well
//!   formed, single-valued headers at most once (§7.3.1, §20), Max-Forwards a number
//!   (§20.22), the CSeq method equal to the request method (§8.1.1.5, §20.16), no headers in
//!   the Request-URI (§19.1.5), Contact, Route and option tags well formed when present;
//! - the CSeq number under 2^31 (§8.1.1.5: "MUST be less than 2**31"; Kamailio's CSeq value
//!   check);
//! - the Request-URI's scheme is sip, sips (§19.1) or tel (RFC 3966): anything else is 416
//!   (§8.2.2.1);
//! - Content-Length, when present, equals the body's length (§20.14, §18.3);
//! - Expires, when present, is a number of seconds (§20.19).
//!
//! Not checked by default, so that an RFC 2543 request passes (RFC 4475 §3.4.1: an INVITE
//! with no Contact, no Max-Forwards and no branch cookie "should be accepted by RFC 3261
//! elements which want to maintain backwards compatibility"), as Kamailio's defaults let it:
//! - Max-Forwards' presence, although §8.1.1 makes it mandatory for a UAC: a proxy must pass a
//!   request without one (§16.3 step 3) and add it (§16.6 step 3);
//! - an INVITE's Contact (§8.1.1.8 is a UAC's duty; RFC 2543 made it optional). Opt-in:
//!   [`Strict::invite_contact`];
//! - the top Via's branch and its magic cookie (§8.1.1.7; RFC 2543 had neither). Opt-in:
//!   [`Strict::via_branch`].
//!
//! Kamailio's Proxy-Require check is the engine's here (420 before the script runs, §16.3
//! step 5), its digest credentials check `req:authorize()`'s (malformed credentials are
//! refused there).

use crate::sip::{Contact, HeaderName, Message, Method, Uri};

/// §8.1.1.5: a CSeq number "MUST be less than 2**31".
const CSEQ_LIMIT: u32 = 1 << 31;

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

/// The checks a script may add to the defaults (`req:sanity{invite_contact = true}`): each
/// refuses requests RFC 3261 UACs never send but RFC 2543 ones may.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Strict {
    /// An INVITE has exactly one Contact, a SIP or SIPS URI (§8.1.1.8).
    pub invite_contact: bool,
    /// The top Via has a branch starting with the magic cookie `z9hG4bK` (§8.1.1.7; Kamailio's
    /// checks 1<<14, a branch, and 1<<15, its cookie).
    pub via_branch: bool,
}

/// Checks `request` with the defaults (see the module docs).
pub fn check(request: &Message) -> Result<(), Insane> {
    check_with(request, Strict::default())
}

/// Checks `request` with the defaults and the `strict` checks asked for.
pub fn check_with(request: &Message, strict: Strict) -> Result<(), Insane> {
    let method = request
        .method()
        .ok_or_else(|| Insane::bad("not a request"))?;
    request.validate().map_err(|e| Insane {
        code: e.status(),
        reason: e.to_string(),
    })?;
    check_request_uri(request)?;
    check_cseq_number(request)?;
    if strict.via_branch {
        check_via_branch(request)?;
    }
    if strict.invite_contact && *method == Method::Invite {
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

fn check_cseq_number(request: &Message) -> Result<(), Insane> {
    match request.cseq() {
        Ok(cseq) if cseq.seq < CSEQ_LIMIT => Ok(()),
        Ok(_) => Err(Insane::bad("CSeq: number not less than 2^31")),
        Err(e) => Err(Insane::bad(e.to_string())),
    }
}

fn check_via_branch(request: &Message) -> Result<(), Insane> {
    match request.top_via() {
        Ok(via) if via.is_rfc3261_branch() => Ok(()),
        Ok(via) if via.branch().is_none() => Err(Insane::bad("Via: no branch")),
        Ok(_) => Err(Insane::bad("Via: branch without the z9hG4bK cookie")),
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

    fn strict_reason(message: &Message, strict: Strict) -> String {
        check_with(message, strict).unwrap_err().reason
    }

    const INVITE_CONTACT: Strict = Strict {
        invite_contact: true,
        via_branch: false,
    };
    const VIA_BRANCH: Strict = Strict {
        invite_contact: false,
        via_branch: true,
    };

    #[test]
    fn an_invite_has_one_sip_contact_when_asked() {
        let none = with("Contact: <sip:alice@192.0.2.1>\n", "");
        assert_eq!(check(&none), Ok(()), "not by default");
        assert_eq!(
            strict_reason(&none, INVITE_CONTACT),
            "Contact: missing in INVITE"
        );
        let two = with(
            "Contact: <sip:alice@192.0.2.1>",
            "Contact: <sip:alice@192.0.2.1>, <sip:alice@192.0.2.2>",
        );
        assert_eq!(check(&two), Ok(()));
        assert!(strict_reason(&two, INVITE_CONTACT).contains("more than one"));
        let tel = with("Contact: <sip:alice@192.0.2.1>", "Contact: <tel:+15551234>");
        assert!(strict_reason(&tel, INVITE_CONTACT).contains("SIP or SIPS"));
        assert_eq!(check_with(&request(INVITE), INVITE_CONTACT), Ok(()));
        // Only INVITE needs one.
        let bye = request(
            &INVITE
                .replace("INVITE", "BYE")
                .replace("Contact: <sip:alice@192.0.2.1>\n", ""),
        );
        assert_eq!(check_with(&bye, INVITE_CONTACT), Ok(()));
    }

    #[test]
    fn a_via_branch_with_the_cookie_when_asked() {
        let none = with(";branch=z9hG4bK1", "");
        assert_eq!(check(&none), Ok(()), "not by default");
        assert_eq!(strict_reason(&none, VIA_BRANCH), "Via: no branch");
        let old = with(";branch=z9hG4bK1", ";branch=1");
        assert_eq!(check(&old), Ok(()));
        assert_eq!(
            strict_reason(&old, VIA_BRANCH),
            "Via: branch without the z9hG4bK cookie"
        );
        assert_eq!(check_with(&request(INVITE), VIA_BRANCH), Ok(()));
    }

    #[test]
    fn an_rfc_2543_invite_passes_the_defaults() {
        // RFC 4475 §3.4.1: no Contact, no Max-Forwards, no branch, no From tag.
        let message = Message::parse(Bytes::from_static(include_bytes!(
            "../../tests/data/rfc4475/inv2543.sip"
        )))
        .expect("parses");
        assert_eq!(check(&message), Ok(()));
        assert_eq!(strict_reason(&message, VIA_BRANCH), "Via: no branch");
        assert_eq!(
            strict_reason(&message, INVITE_CONTACT),
            "Contact: missing in INVITE"
        );
    }

    #[test]
    fn the_cseq_number_is_under_2_to_the_31() {
        assert_eq!(
            check(&with("CSeq: 1 INVITE", "CSeq: 2147483647 INVITE")),
            Ok(())
        );
        assert_eq!(
            reason(&with("CSeq: 1 INVITE", "CSeq: 2147483648 INVITE")),
            "CSeq: number not less than 2^31"
        );
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
