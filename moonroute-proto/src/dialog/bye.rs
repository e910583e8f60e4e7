//! The BYE a proxy sends to end a call it tracks (max duration, `moonroute ctl dlg end`), as
//! Kamailio's `dlg_bye`: one to each party, each in the name of the other (RFC 3261 §15.1.1:
//! "the caller's or callee's UA MUST NOT send a BYE outside of a dialog"; the proxy speaks for
//! the other party inside it, with that party's tags and next CSeq, §12.2.1.1).
//!
//! Each BYE follows the part of the dialog's route set on its party's side of this proxy
//! (§12.2.1.1: the route set is the Record-Route of the 2xx, reversed for the caller), and is
//! sent through a client transaction by the relay (`proxy::relay`), which gives it our Via.

use std::fmt::Write as _;

use bytes::Bytes;

use super::table::{Bye, Side};

impl Bye {
    /// The BYE's text with `via` (a whole Via value: transport, sent-by, branch) on top and
    /// the Route values `routes` (the hops between this proxy and the party, nearest first).
    /// `None` without a target to address it to.
    pub fn render(&self, via: &str, routes: &[Bytes]) -> Option<Bytes> {
        let target = self.request_uri.as_deref()?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let mut out = String::with_capacity(512);
        let _ = write!(out, "BYE {} SIP/2.0\r\nVia: {via}\r\n", text(target));
        out.push_str("Max-Forwards: 70\r\n");
        for route in routes {
            let _ = write!(out, "Route: {}\r\n", text(route));
        }
        let _ = write!(
            out,
            "From: <{}>;tag={}\r\nTo: <{}>;tag={}\r\nCall-ID: {}\r\nCSeq: {} BYE\r\n",
            text(&self.from_uri),
            text(&self.from_tag),
            text(&self.to_uri),
            text(&self.to_tag),
            text(&self.call_id),
            self.cseq
        );
        out.push_str("Content-Length: 0\r\n\r\n");
        Some(Bytes::from(out))
    }

    /// The Route values toward this BYE's party: the dialog's route set (the 2xx's
    /// Record-Route, top first: the callee's end on top) cut at this proxy's entries
    /// (`is_mine`), the callee's part reversed so the nearest hop comes first. Without an entry
    /// of ours (the call was not record-routed here), none: the BYE goes straight to the
    /// party's target through [`Bye::destination`].
    pub fn routes(&self, is_mine: impl Fn(&[u8]) -> bool) -> Vec<Bytes> {
        let ours: Vec<usize> = (0..self.route_set.len())
            .filter(|&i| is_mine(&self.route_set[i]))
            .collect();
        let (Some(&first), Some(&last)) = (ours.first(), ours.last()) else {
            return Vec::new();
        };
        match self.to_side {
            Side::Callee => self.route_set[..first].iter().rev().cloned().collect(),
            Side::Caller => self.route_set[last + 1..].to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bye(to_side: Side, route_set: &[&'static str]) -> Bye {
        Bye {
            to_side,
            call_id: Bytes::from_static(b"c1"),
            request_uri: Some(Bytes::from_static(b"sip:bob@192.0.2.5:5080")),
            from_uri: Bytes::from_static(b"sip:alice@example.com"),
            from_tag: Bytes::from_static(b"ftag"),
            to_uri: Bytes::from_static(b"sip:bob@example.com"),
            to_tag: Bytes::from_static(b"ttag"),
            cseq: 7,
            route_set: route_set
                .iter()
                .map(|r| Bytes::from_static(r.as_bytes()))
                .collect(),
            destination: None,
        }
    }

    #[test]
    fn a_bye_is_a_parsable_in_dialog_request() {
        let b = bye(Side::Callee, &[]);
        let text = b
            .render("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx", &[])
            .unwrap();
        let message = crate::sip::Message::parse(text).unwrap();
        assert_eq!(message.method(), Some(&crate::sip::Method::Bye));
        assert_eq!(
            message.request_uri_bytes(),
            Some(&b"sip:bob@192.0.2.5:5080"[..])
        );
        assert_eq!(
            crate::dialog::tags(&message),
            Some((&b"c1"[..], &b"ftag"[..], &b"ttag"[..]))
        );
        assert_eq!(message.cseq().unwrap().seq, 7);
    }

    #[test]
    fn each_party_gets_the_route_set_on_its_side_of_us() {
        // Record-Route of the 2xx: the callee's proxy on top, ours (double) in the middle,
        // the caller's proxy at the bottom.
        let set = [
            "<sip:b2;lr>",
            "<sip:b1;lr>",
            "<sip:us;transport=tcp;lr>",
            "<sip:us;lr>",
            "<sip:a1;lr>",
        ];
        let mine = |r: &[u8]| r.starts_with(b"<sip:us;");
        let routes = |side| {
            bye(side, &set)
                .routes(mine)
                .into_iter()
                .map(|r| String::from_utf8(r.to_vec()).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(routes(Side::Callee), ["<sip:b1;lr>", "<sip:b2;lr>"]);
        assert_eq!(routes(Side::Caller), ["<sip:a1;lr>"]);
        assert!(bye(Side::Caller, &["<sip:other;lr>"])
            .routes(mine)
            .is_empty());
    }
}
