//! The responses this server words itself (RFC 3261 §8.2.6): built from the request, with a To
//! tag stable across the request's retransmissions (§8.2.6.2, §17.2.1), sent through a
//! transaction or, for requests without one, statelessly (§18.2.2).

use std::hash::BuildHasher;

use bytes::Bytes;

use super::Core;
use crate::sip::{HeaderName, Message, ResponseBuilder};
use crate::transport::{response_destination, Meta, Output};

impl Core {
    /// A response to `req` with a To tag stable across its retransmissions.
    pub(super) fn build_response(
        &self,
        req: &Message,
        code: u16,
        reason: &str,
        extra: &[(&str, &str)],
    ) -> Bytes {
        let tag = self.to_tag(req);
        let mut builder = ResponseBuilder::new(req, code, reason).to_tag(tag.as_bytes());
        for (name, value) in extra {
            builder = builder.header(name, value.as_bytes());
        }
        builder.build()
    }

    /// A stateless answer, for requests too malformed to have a transaction (§8.2, §16.11).
    pub(super) fn reply(
        &self,
        req: &Message,
        meta: &Meta,
        code: u16,
        reason: &str,
        extra: &[(&str, &str)],
        out: &mut Vec<Output>,
    ) {
        let Ok(via) = req.top_via() else { return };
        let data = self.build_response(req, code, reason, extra);
        out.push(Output::Send {
            dest: response_destination(&via, meta),
            data,
        });
    }

    /// A To tag stable for one request and its retransmissions (§8.2.6.2, §17.2.1).
    fn to_tag(&self, req: &Message) -> String {
        let from_tag = req.from_tag().unwrap_or(b"");
        let branch = req.top_via().ok().and_then(|v| v.branch()).unwrap_or(b"");
        let call_id = req.header(HeaderName::CallId).unwrap_or(b"");
        let h = self.tag_hasher.hash_one((call_id, from_tag, branch));
        format!("mr{h:016x}")
    }
}
