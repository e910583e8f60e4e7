//! NAT traversal: the sans-IO rules (no sockets, no clock).
//!
//! Owns:
//! - [`detect`]: whether a request's sender is behind a NAT, from what the request says about
//!   itself (top Via, first Contact) against the address its packet came from; Kamailio's
//!   `nat_uac_test` with one sensible set of checks (see [`NatCheck`]).
//! - [`detect_response`]: the same for a response a proxy received from a UAS (Contact
//!   private, or answered from elsewhere than the request was sent to), and
//!   [`response_contact_is_target`]: which responses' Contacts may be fixed.
//! - [`is_private`]: the addresses that cannot be reached from the Internet: RFC 1918,
//!   RFC 6598 shared address space (carrier-grade NAT), link-local (RFC 3927), IPv6 unique
//!   local (RFC 4193) and link-local (RFC 4291 §2.5.6).
//! - [`contact_with_source`]: a Contact value whose URI host:port is replaced by the source
//!   address (Kamailio's `fix_nated_contact`).
//! - [`keepalive`]: the keep-alive scheduler for bindings registered through a NAT (which
//!   bindings to probe, when, and which failed and must be removed).
//!
//! What the rest of the server does with them: RFC 3581 `received`/`rport` are stamped by the
//! core on every request (`[nat] force_rport`, `req:force_rport()`); a REGISTER saved as NATed
//! stores its binding with [`crate::location::Binding::nated`], and `lookup` then routes to
//! the binding's received address (a destination override, like Kamailio's `$du`), on the
//! connection the REGISTER came on for TCP/TLS (RFC 5626 §5.3 reaches a flow, not an address).

pub mod keepalive;

use std::net::{IpAddr, SocketAddr};

use crate::sip::{Contact, Message};
use crate::transport::TransportKind;

/// Addresses that are not globally reachable: a Contact or Via naming one was written by a UA
/// behind a NAT (or on a private network the server cannot route to).
pub fn is_private(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private() // RFC 1918: 10/8, 172.16/12, 192.168/16
                || (a == 100 && (64..128).contains(&b)) // RFC 6598: 100.64/10
                || v4.is_link_local() // RFC 3927: 169.254/16
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            (first & 0xfe00) == 0xfc00 // RFC 4193: fc00::/7
                || (first & 0xffc0) == 0xfe80 // RFC 4291: fe80::/10
        }
    }
}

/// What [`detect`] checked, each true when it points at a NAT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatCheck {
    /// The first Contact's host is a private address ([`is_private`]) while the packet did
    /// not come from that address.
    pub contact_private: bool,
    /// The top Via's sent-by host is a private address other than the source address.
    pub via_private: bool,
    /// The top Via's sent-by differs from where the packet came from: another IP address, or
    /// over UDP another port (streams use ephemeral source ports, so only the IP counts).
    pub via_differs: bool,
    /// Responses ([`detect_response`]): the response came from another address than its
    /// request was sent to (over UDP: or another port).
    pub source_differs: bool,
    /// The message came over WebSocket (RFC 7118 §5): its Contact and Via hosts are
    /// `.invalid` names and only its connection reaches it, so it is handled as behind a NAT
    /// (Kamailio's `nat_uac_test` flag 64): `fix_nated_contact` gives its dialogs a Contact
    /// at the connection's address, `save` pins its bindings to the connection.
    pub websocket: bool,
}

impl NatCheck {
    /// True when any check points at a NAT.
    pub fn is_nated(&self) -> bool {
        self.contact_private
            || self.via_private
            || self.via_differs
            || self.source_differs
            || self.websocket
    }

    /// The checks that matched, for a log line: e.g. `contact-private,via-differs`.
    pub fn reasons(&self) -> String {
        let names = [
            (self.contact_private, "contact-private"),
            (self.via_private, "via-private"),
            (self.via_differs, "via-differs"),
            (self.source_differs, "source-differs"),
            (self.websocket, "websocket"),
        ];
        let matched: Vec<&str> = names.iter().filter(|(m, _)| *m).map(|(_, n)| *n).collect();
        matched.join(",")
    }
}

/// Whether `request`, received from `source` over `kind`, comes from behind a NAT: its first
/// Contact names a private address, or its top Via names a private address or another
/// address (over UDP: or another port) than the packet's source. A Contact's port is not
/// compared: a REGISTER may bind contacts of other devices (§10.2.1). A Contact `*` or one
/// that does not parse is not looked at (the registrar and the proxy judge those).
pub fn detect(request: &Message, source: SocketAddr, kind: TransportKind) -> NatCheck {
    let mut check = NatCheck::default();
    let default_port = kind.default_port();
    let differs = |ip: IpAddr, port: Option<u16>| {
        ip.to_canonical() != source.ip().to_canonical()
            || (!kind.is_stream() && port.unwrap_or(default_port) != source.port())
    };
    let private_elsewhere = |ip: IpAddr| is_private(ip) && ip.to_canonical() != source.ip();
    if let Ok(via) = request.top_via() {
        // A name in the Via is a UA that cannot say its address: nothing to compare.
        if let Some(ip) = via.host.ip() {
            check.via_private = private_elsewhere(ip);
            check.via_differs = differs(ip, via.port);
        }
    }
    check.contact_private = contact_private(request, source);
    check.websocket = kind.is_websocket();
    check
}

/// Whether the first Contact of `message` names a private address ([`is_private`]) other than
/// `source`'s.
fn contact_private(message: &Message, source: SocketAddr) -> bool {
    let Some(Ok(Contact::Addr(addr))) = message.contacts().next() else {
        return false;
    };
    let ip = addr.uri.as_sip().and_then(|sip| sip.host.ip());
    ip.is_some_and(|ip| is_private(ip) && ip.to_canonical() != source.ip().to_canonical())
}

/// Whether `response`, received from `source` over `kind` on a branch whose request was sent
/// to `sent_to`, comes from a UAS behind a NAT (Kamailio's `nat_uac_test` in an
/// `onreply_route`): its first Contact names a private address other than the source, or it
/// came from another address than the request went to (over UDP: or another port; streams
/// answer on the connection, so only a new IP counts). The Via is ours and says nothing.
pub fn detect_response(
    response: &Message,
    source: SocketAddr,
    kind: TransportKind,
    sent_to: SocketAddr,
) -> NatCheck {
    let ip_differs = source.ip().to_canonical() != sent_to.ip().to_canonical();
    NatCheck {
        contact_private: contact_private(response, source),
        source_differs: ip_differs || (!kind.is_stream() && source.port() != sent_to.port()),
        websocket: kind.is_websocket(),
        ..NatCheck::default()
    }
}

/// Whether a response's Contact is a remote target a proxy may fix for a NAT: a provisional
/// (101-199) or 2xx response, which set the dialog's remote target (RFC 3261 §12.1.2, §12.2.1.2
/// for target refreshes), and not to a REGISTER (its 200 lists the bindings, §10.3 step 8). A
/// 3xx's Contacts are redirect targets (§8.1.3.4): never rewritten.
pub fn response_contact_is_target(response: &Message) -> bool {
    let status_fits = response.status().is_some_and(|c| (101..300).contains(&c));
    let method = response.cseq().ok().map(|c| c.method);
    status_fits && method.is_some_and(|m| m != crate::sip::Method::Register)
}

/// `value` (one Contact header field value) with its URI's host and port replaced by
/// `source` (Kamailio's `fix_nated_contact`): user, parameters (`transport`, `ob`...), URI
/// headers, display name and header parameters stay. `None` for `*`, a value that does not
/// parse, or a URI that is not sip:/sips:.
pub fn contact_with_source(value: &[u8], source: SocketAddr) -> Option<Vec<u8>> {
    let Ok(Contact::Addr(addr)) = Contact::parse(value) else {
        return None;
    };
    let sip = addr.uri.as_sip()?;
    let raw = addr.uri.raw();
    // `raw` is a slice of `value`: where it starts, found from the two addresses.
    let start = (raw.as_ptr() as usize).checked_sub(value.as_ptr() as usize)?;
    if start + raw.len() > value.len() {
        return None;
    }
    let mut uri = Vec::with_capacity(raw.len() + 24);
    uri.extend_from_slice(if sip.secure { b"sips:" } else { b"sip:" });
    if let Some(user) = sip.user {
        uri.extend_from_slice(user);
        if let Some(password) = sip.password {
            uri.push(b':');
            uri.extend_from_slice(password);
        }
        uri.push(b'@');
    }
    // SocketAddr's Display brackets an IPv6 address, as a hostport needs (§25.1).
    let source = SocketAddr::new(source.ip().to_canonical(), source.port());
    uri.extend_from_slice(source.to_string().as_bytes());
    uri.extend_from_slice(sip.params.raw());
    if let Some(headers) = sip.headers {
        uri.push(b'?');
        uri.extend_from_slice(headers);
    }
    // Without angle brackets the field's parameters follow the URI (§20.10): they stay too.
    let mut out = Vec::with_capacity(value.len() + 24);
    out.extend_from_slice(&value[..start]);
    out.extend_from_slice(&uri);
    out.extend_from_slice(&value[start + raw.len()..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn request(via: &str, contact: &str) -> Message {
        let text = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP {via};branch=z9hG4bK1\r\n\
             Max-Forwards: 70\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:a@example.com>\r\n\
             Call-ID: c1\r\nCSeq: 1 REGISTER\r\nContact: {contact}\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(Bytes::from(text)).unwrap()
    }

    #[test]
    fn private_ranges() {
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.10",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.7.7",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "::ffff:192.168.0.1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "192.0.2.1",
            "172.32.0.1",
            "100.128.0.1",
            "100.63.255.255",
            "8.8.8.8",
            "127.0.0.2",
            "2001:db8::1",
            "fec0::1",
        ] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn a_client_behind_a_nat_is_detected() {
        let req = request("192.168.1.10:5060", "<sip:alice@192.168.1.10:5060>");
        let check = detect(&req, addr("127.0.0.2:40000"), TransportKind::Udp);
        assert!(check.is_nated());
        assert!(check.contact_private && check.via_private);
        assert!(check.via_differs);
        assert_eq!(check.reasons(), "contact-private,via-private,via-differs");
    }

    #[test]
    fn a_client_saying_where_it_is_is_not_nated() {
        let req = request("192.0.2.7:5070", "<sip:alice@192.0.2.7:5070;transport=udp>");
        assert!(!detect(&req, addr("192.0.2.7:5070"), TransportKind::Udp).is_nated());
        // Default port 5060 when the Via and Contact omit it.
        let req = request("192.0.2.7", "<sip:alice@192.0.2.7>");
        assert!(!detect(&req, addr("192.0.2.7:5060"), TransportKind::Udp).is_nated());
        // A private network the server is on is not a NAT.
        let req = request("10.0.0.5:5060", "<sip:alice@10.0.0.5:5060>");
        assert!(!detect(&req, addr("10.0.0.5:5060"), TransportKind::Udp).is_nated());
    }

    #[test]
    fn port_mismatch_counts_on_udp_only() {
        let req = request("192.0.2.7:5060", "<sip:alice@192.0.2.7:5060>");
        let check = detect(&req, addr("192.0.2.7:31000"), TransportKind::Udp);
        assert!(check.via_differs && !check.contact_private);
        // A contact of another device (third-party registration) is no NAT.
        let req = request("192.0.2.7:5060", "<sip:alice@198.51.100.9:5070>");
        assert!(!detect(&req, addr("192.0.2.7:5060"), TransportKind::Udp).is_nated());
        // Streams come from ephemeral ports.
        assert!(!detect(&req, addr("192.0.2.7:31000"), TransportKind::Tcp).is_nated());
        assert!(detect(&req, addr("198.51.100.1:31000"), TransportKind::Tcp).is_nated());
        // A WebSocket client is reached on its connection only, whatever it says.
        let check = detect(&req, addr("192.0.2.7:31000"), TransportKind::Wss);
        assert!(check.is_nated());
        assert_eq!(check.reasons(), "websocket");
    }

    #[test]
    fn names_and_stars_are_not_judged() {
        let req = request("pc.example.com:5060", "*");
        assert!(!detect(&req, addr("192.0.2.7:5060"), TransportKind::Udp).is_nated());
    }

    #[test]
    fn contact_rewrite_keeps_everything_but_host_and_port() {
        let source = addr("203.0.113.9:40123");
        let cases = [
            (
                "\"Alice\" <sip:alice@192.168.1.10:5060;transport=udp;ob>;expires=60;+sip.instance=\"<urn:x>\"",
                "\"Alice\" <sip:alice@203.0.113.9:40123;transport=udp;ob>;expires=60;+sip.instance=\"<urn:x>\"",
            ),
            ("<sip:192.168.1.10>", "<sip:203.0.113.9:40123>"),
            (
                "<sips:bob:pw@[fd00::5]:5061?X-a=b>",
                "<sips:bob:pw@203.0.113.9:40123?X-a=b>",
            ),
            (
                "sip:carol@10.0.0.1:5062;expires=30",
                "sip:carol@203.0.113.9:40123;expires=30",
            ),
        ];
        for (before, after) in cases {
            let out = contact_with_source(before.as_bytes(), source).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), after, "{before}");
        }
        let v6 = contact_with_source(b"<sip:a@10.0.0.1>", addr("[2001:db8::1]:5060")).unwrap();
        assert_eq!(v6, b"<sip:a@[2001:db8::1]:5060>");
        assert!(contact_with_source(b"*", source).is_none());
        assert!(contact_with_source(b"<tel:+1555>", source).is_none());
        assert!(contact_with_source(b"<sip:a@", source).is_none());
    }

    fn response(status: &str, cseq: &str, contact: &str) -> Message {
        let text = format!(
            "SIP/2.0 {status}\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1\r\n\
             From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n\
             Call-ID: c1\r\nCSeq: {cseq}\r\nContact: {contact}\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(Bytes::from(text)).unwrap()
    }

    #[test]
    fn a_uas_behind_a_nat_is_detected_from_its_response() {
        let sent_to = addr("127.0.0.2:40000");
        let ok = response("200 OK", "1 INVITE", "<sip:bob@192.168.1.10:5060>");
        let check = detect_response(&ok, sent_to, TransportKind::Udp, sent_to);
        assert!(check.contact_private && !check.source_differs);
        assert_eq!(check.reasons(), "contact-private");
        // A public Contact from where the request went: no NAT.
        let ok = response("200 OK", "1 INVITE", "<sip:bob@127.0.0.2:40000>");
        assert!(!detect_response(&ok, sent_to, TransportKind::Udp, sent_to).is_nated());
        // Answered from another port (UDP) or another address: a NAT between.
        let elsewhere = addr("127.0.0.2:40001");
        let check = detect_response(&ok, elsewhere, TransportKind::Udp, sent_to);
        assert_eq!(check.reasons(), "source-differs");
        assert!(!detect_response(&ok, elsewhere, TransportKind::Tcp, sent_to).is_nated());
        let other_ip = addr("127.0.0.9:40000");
        assert!(detect_response(&ok, other_ip, TransportKind::Tcp, sent_to).is_nated());
    }

    #[test]
    fn only_dialog_targets_are_fixed_in_responses() {
        let c = "<sip:bob@192.168.1.10>";
        assert!(response_contact_is_target(&response(
            "200 OK", "1 INVITE", c
        )));
        assert!(response_contact_is_target(&response(
            "180 Ringing",
            "1 INVITE",
            c
        )));
        assert!(response_contact_is_target(&response(
            "202 Accepted",
            "1 SUBSCRIBE",
            c
        )));
        assert!(!response_contact_is_target(&response(
            "100 Trying",
            "1 INVITE",
            c
        )));
        assert!(!response_contact_is_target(&response(
            "302 Moved",
            "1 INVITE",
            c
        )));
        assert!(!response_contact_is_target(&response(
            "200 OK",
            "1 REGISTER",
            c
        )));
        assert!(!response_contact_is_target(&response(
            "486 Busy Here",
            "1 INVITE",
            c
        )));
    }
}
