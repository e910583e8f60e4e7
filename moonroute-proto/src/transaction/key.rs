//! Matching messages to transactions (RFC 3261 §17.1.3, §17.2.3, §9.2).
//!
//! Keys hold zero-copy slices of the message that created them ([`Message::share`]), and host
//! names compare case-insensitively (§19.1.4 applied to sent-by), so building a key for every
//! received message costs no allocation when the fields were not edited.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use bytes::Bytes;

use crate::sip::via::MAGIC_COOKIE;
use crate::sip::{Host, Message, Method, ParseError};

/// §17.1.3: a response matches a client transaction by the branch of its top Via and the
/// method of its CSeq (CANCEL shares the INVITE's branch).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub branch: Bytes,
    pub method: Method,
}

impl ClientKey {
    /// The key of the client transaction a response belongs to.
    pub fn of_response(response: &Message) -> Result<ClientKey, ParseError> {
        let via = response.top_via()?;
        let branch = via.branch().ok_or(ParseError::bad("Via", "no branch"))?;
        Ok(ClientKey {
            branch: response.share(branch),
            method: response.cseq()?.method,
        })
    }

    /// The key of a request this element sends (its top Via is ours).
    pub fn of_request(request: &Message) -> Result<ClientKey, ParseError> {
        let via = request.top_via()?;
        let branch = via.branch().ok_or(ParseError::bad("Via", "no branch"))?;
        let method = request
            .method()
            .cloned()
            .ok_or(ParseError::bad("", "not a request"))?;
        Ok(ClientKey {
            branch: request.share(branch),
            method,
        })
    }
}

/// §17.2.3: the server transaction a request belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ServerKey {
    /// The top Via branch carries the magic cookie: branch, sent-by and method (an ACK matches
    /// the INVITE it acknowledges).
    Rfc3261 {
        branch: Bytes,
        sent_by: SentBy,
        method: Method,
    },
    /// RFC 2543 fallback (no magic cookie), boxed: rare, and larger than the usual key.
    Rfc2543(Box<Rfc2543Key>),
}

/// RFC 2543 matching: Request-URI, From tag, Call-ID, CSeq and the whole top Via. The To tag
/// is left out: for an INVITE and its retransmissions it is the same, and an ACK carries the
/// tag of our response, which the INVITE did not have (§17.2.3 then requires it to match that
/// response's tag, which a transaction created by that INVITE has sent, so leaving it out
/// matches the same transactions).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rfc2543Key {
    pub request_uri: Bytes,
    pub from_tag: Bytes,
    pub call_id: Bytes,
    pub cseq: u32,
    pub method: Method,
    pub top_via: Bytes,
}

/// A Via sent-by: host (case-insensitive) and port.
#[derive(Clone, Debug)]
pub struct SentBy {
    pub host: Bytes,
    pub port: Option<u16>,
}

impl PartialEq for SentBy {
    fn eq(&self, other: &Self) -> bool {
        self.port == other.port && self.host.eq_ignore_ascii_case(&other.host)
    }
}

impl Eq for SentBy {}

impl Hash for SentBy {
    /// The host lowercased (equal hosts in any case hash alike, as [`PartialEq`] needs), fed
    /// to the hasher a chunk at a time: one `write` per key, not one per byte (every received
    /// request hashes its key).
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.port.hash(state);
        let mut lower = [0u8; 64];
        for chunk in self.host.chunks(lower.len()) {
            let lower = &mut lower[..chunk.len()];
            lower.copy_from_slice(chunk);
            lower.make_ascii_lowercase();
            state.write(lower);
        }
    }
}

/// Several short byte strings copied into one buffer, then sliced out of it.
struct Copied(Vec<u8>);

impl Copied {
    fn with_capacity(capacity: usize) -> Copied {
        Copied(Vec::with_capacity(capacity))
    }

    fn push(&mut self, part: &[u8]) -> std::ops::Range<usize> {
        let start = self.0.len();
        self.0.extend_from_slice(part);
        start..self.0.len()
    }

    fn freeze(self) -> Bytes {
        Bytes::from(self.0)
    }
}

/// ACK belongs to the INVITE transaction (§17.2.3 rule 3).
fn matching_method(method: &Method) -> Method {
    match method {
        Method::Ack => Method::Invite,
        other => other.clone(),
    }
}

impl ServerKey {
    pub fn of_request(request: &Message) -> Result<ServerKey, ParseError> {
        let method = request
            .method()
            .ok_or(ParseError::bad("", "not a request"))?;
        let via = request.top_via()?;
        match via.branch() {
            Some(branch) if branch.starts_with(MAGIC_COOKIE) => {
                let host = match via.host {
                    Host::Domain(name) => request.share(name.as_bytes()),
                    // An IPv4 address is written without `fmt` (every request builds a key).
                    Host::Ip(IpAddr::V4(_)) => via
                        .host
                        .with_text(|text| Bytes::copy_from_slice(text.as_bytes())),
                    Host::Ip(ip) => Bytes::from(ip.to_string()),
                };
                Ok(ServerKey::Rfc3261 {
                    branch: request.share(branch),
                    sent_by: SentBy {
                        host,
                        port: via.port,
                    },
                    method: matching_method(method),
                })
            }
            _ => Self::rfc2543(request, method),
        }
    }

    fn rfc2543(request: &Message, method: &Method) -> Result<ServerKey, ParseError> {
        let uri = request
            .request_uri_bytes()
            .ok_or(ParseError::bad("", "not a request"))?;
        let from = request.from()?;
        let top_via = request.top_via()?.raw();
        Ok(ServerKey::Rfc2543(Box::new(Rfc2543Key {
            request_uri: request.share(uri),
            from_tag: from.tag().map(|t| request.share(t)).unwrap_or_default(),
            call_id: request.share(request.call_id()?),
            cseq: request.cseq()?.seq,
            method: matching_method(method),
            top_via: request.share(top_via),
        })))
    }

    /// The same key holding copies of its few bytes instead of slices of the request: a key
    /// that outlives its request (a transaction lingering for 32 s after its final response)
    /// then keeps tens of bytes alive, not the whole received message. One allocation.
    pub fn detached(&self) -> ServerKey {
        match self {
            ServerKey::Rfc3261 {
                branch,
                sent_by,
                method,
            } => {
                let mut copy = Copied::with_capacity(branch.len() + sent_by.host.len());
                let branch = copy.push(branch);
                let host = copy.push(&sent_by.host);
                let copy = copy.freeze();
                ServerKey::Rfc3261 {
                    branch: copy.slice(branch),
                    sent_by: SentBy {
                        host: copy.slice(host),
                        port: sent_by.port,
                    },
                    method: method.clone(),
                }
            }
            ServerKey::Rfc2543(key) => {
                let parts = [&key.request_uri, &key.from_tag, &key.call_id, &key.top_via];
                let mut copy = Copied::with_capacity(parts.iter().map(|p| p.len()).sum());
                let [uri, tag, call_id, via] = parts.map(|part| copy.push(part));
                let copy = copy.freeze();
                ServerKey::Rfc2543(Box::new(Rfc2543Key {
                    request_uri: copy.slice(uri),
                    from_tag: copy.slice(tag),
                    call_id: copy.slice(call_id),
                    cseq: key.cseq,
                    method: key.method.clone(),
                    top_via: copy.slice(via),
                }))
            }
        }
    }

    /// Heap bytes a detached key holds (the memory budget's share of it).
    pub fn heap_bytes(&self) -> usize {
        match self {
            ServerKey::Rfc3261 {
                branch, sent_by, ..
            } => branch.len() + sent_by.host.len(),
            ServerKey::Rfc2543(key) => {
                std::mem::size_of::<Rfc2543Key>()
                    + key.request_uri.len()
                    + key.from_tag.len()
                    + key.call_id.len()
                    + key.top_via.len()
            }
        }
    }

    /// For a CANCEL's key, the key of the INVITE transaction it cancels (§9.2: same matching
    /// rules, with the method of the request being cancelled).
    pub fn cancelled_invite(&self) -> ServerKey {
        let mut key = self.clone();
        match &mut key {
            ServerKey::Rfc3261 { method, .. } => *method = Method::Invite,
            ServerKey::Rfc2543(key) => key.method = Method::Invite,
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(text: &str) -> Message {
        Message::parse(Bytes::from(text.to_string())).unwrap()
    }

    fn request(method: &str, via: &str, cseq_method: &str) -> Message {
        msg(&format!(
            "{method} sip:bob@example.com SIP/2.0\r\nVia: {via}\r\nFrom: <sip:a@example.com>;tag=f1\r\n\
             To: <sip:bob@example.com>\r\nCall-ID: c1@127.0.0.1\r\nCSeq: 7 {cseq_method}\r\nContent-Length: 0\r\n\r\n"
        ))
    }

    const VIA: &str = "SIP/2.0/UDP Host.Example.COM:5060;branch=z9hG4bKabc";

    #[test]
    fn ack_and_retransmission_match_the_invite_cancel_does_not() {
        let invite = ServerKey::of_request(&request("INVITE", VIA, "INVITE")).unwrap();
        let again = ServerKey::of_request(&request(
            "INVITE",
            "SIP/2.0/UDP host.example.com:5060;branch=z9hG4bKabc",
            "INVITE",
        ))
        .unwrap();
        assert_eq!(invite, again, "sent-by host compares case-insensitively");
        let ack = ServerKey::of_request(&request("ACK", VIA, "ACK")).unwrap();
        assert_eq!(ack, invite);
        let cancel = ServerKey::of_request(&request("CANCEL", VIA, "CANCEL")).unwrap();
        assert_ne!(cancel, invite);
        assert_eq!(cancel.cancelled_invite(), invite);
        let other_port = ServerKey::of_request(&request(
            "INVITE",
            "SIP/2.0/UDP host.example.com:5062;branch=z9hG4bKabc",
            "INVITE",
        ))
        .unwrap();
        assert_ne!(
            other_port, invite,
            "same branch from another sent-by is another transaction"
        );
    }

    #[test]
    fn sent_by_hosts_equal_in_any_case_hash_alike() {
        use std::hash::BuildHasher;
        let long = "Proxy-1.".repeat(12) + "Example.COM";
        let hasher = std::collections::hash_map::RandomState::new();
        for host in ["Host.Example.COM", long.as_str()] {
            let key = |host: String| SentBy {
                host: Bytes::from(host),
                port: Some(5060),
            };
            let (mixed, lower) = (key(host.to_string()), key(host.to_ascii_lowercase()));
            assert_eq!(mixed, lower);
            assert_eq!(hasher.hash_one(&mixed), hasher.hash_one(&lower), "{host}");
        }
    }

    #[test]
    fn rfc2543_requests_match_on_dialog_fields() {
        let via = "SIP/2.0/UDP 127.0.0.1:5060";
        let invite = ServerKey::of_request(&request("INVITE", via, "INVITE")).unwrap();
        assert!(matches!(invite, ServerKey::Rfc2543(_)));
        let ack = ServerKey::of_request(&request("ACK", via, "ACK")).unwrap();
        assert_eq!(ack, invite);
        let bye = ServerKey::of_request(&request("BYE", via, "BYE")).unwrap();
        assert_ne!(bye, invite);
        let cookie_only = ServerKey::of_request(&request(
            "INVITE",
            "SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK",
            "INVITE",
        ))
        .unwrap();
        assert!(matches!(cookie_only, ServerKey::Rfc3261 { .. }));
    }

    #[test]
    fn responses_match_by_branch_and_cseq_method() {
        let invite = request("INVITE", VIA, "INVITE");
        let key = ClientKey::of_request(&invite).unwrap();
        let response = msg(&format!(
            "SIP/2.0 180 Ringing\r\nVia: {VIA}\r\nFrom: <sip:a@example.com>;tag=f1\r\nTo: <sip:bob@example.com>;tag=t\r\n\
             Call-ID: c1@127.0.0.1\r\nCSeq: 7 INVITE\r\nContent-Length: 0\r\n\r\n"
        ));
        assert_eq!(ClientKey::of_response(&response).unwrap(), key);
        let cancel_ok = msg(&format!(
            "SIP/2.0 200 OK\r\nVia: {VIA}\r\nFrom: <sip:a@example.com>;tag=f1\r\nTo: <sip:bob@example.com>;tag=t\r\n\
             Call-ID: c1@127.0.0.1\r\nCSeq: 7 CANCEL\r\nContent-Length: 0\r\n\r\n"
        ));
        assert_ne!(ClientKey::of_response(&cancel_ok).unwrap(), key);
    }

    #[test]
    fn a_detached_key_equals_the_original_and_shares_nothing_with_the_request() {
        for via in [VIA, "SIP/2.0/UDP 127.0.0.1:5060"] {
            let invite = request("INVITE", via, "INVITE");
            let key = ServerKey::of_request(&invite).unwrap();
            let detached = key.detached();
            assert_eq!(detached, key);
            let [a, b] = [&key, &detached].map(|k| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                k.hash(&mut h);
                h.finish()
            });
            assert_eq!(a, b, "same hash");
            let buf = invite.source_bytes().as_ptr_range();
            let inside = |b: &Bytes| buf.contains(&b.as_ptr());
            match &detached {
                ServerKey::Rfc3261 {
                    branch, sent_by, ..
                } => {
                    assert!(!inside(branch) && !inside(&sent_by.host))
                }
                ServerKey::Rfc2543(k) => {
                    assert!(!inside(&k.request_uri) && !inside(&k.call_id) && !inside(&k.top_via))
                }
            }
        }
    }

    #[test]
    fn keys_share_the_received_buffer() {
        let invite = request("INVITE", VIA, "INVITE");
        let ServerKey::Rfc3261 { branch, .. } = ServerKey::of_request(&invite).unwrap() else {
            panic!()
        };
        let buf = invite.source_bytes();
        let start = buf.as_ptr() as usize;
        assert!(
            (branch.as_ptr() as usize) >= start && (branch.as_ptr() as usize) < start + buf.len()
        );
    }
}
