//! Malformed input (RFC 3261 §8.2, §16.3 item 1, RFC 4475): a request that fails to parse or
//! validate, or a stream whose framing is lost (§18.3), is answered statelessly with 400, 413
//! or 505 and a reason phrase naming the problem, or dropped with one `moonroute::refused` line
//! when no answer can be routed (no Via, an ACK, no request line).

use bytes::Bytes;
use tracing::{info, warn};

use super::Core;
use crate::logging::{Lossy, REFUSED};
use crate::sip::{Message, Method, ParseError};
use crate::transport::{FramingError, Meta, Output};

impl Core {
    pub(super) fn refuse_unparsable(
        &self,
        data: Bytes,
        error: ParseError,
        meta: &Meta,
        out: &mut Vec<Output>,
    ) {
        match Message::salvage_request(data) {
            Some(req) => self.refuse(&req, error, meta, out),
            None => {
                warn!(target: REFUSED, source = %meta.source, transport = %meta.kind, reason = %format_args!("unparsable ({error}); no answer can be routed"), "message dropped")
            }
        }
    }

    pub(super) fn refuse(
        &self,
        req: &Message,
        error: ParseError,
        meta: &Meta,
        out: &mut Vec<Output>,
    ) {
        let call_id = req.call_id().ok().map(Lossy);
        let call_id = call_id.as_ref().map(tracing::field::display);
        if req.method() == Some(&Method::Ack) {
            warn!(target: REFUSED, call_id, source = %meta.source, transport = %meta.kind, reason = %format_args!("malformed ACK ({error}); an ACK is never answered"), "message dropped");
            return;
        }
        let code = error.status();
        let reason = refusal_reason(&error);
        if req.top_via().is_err() {
            warn!(target: REFUSED, call_id, source = %meta.source, transport = %meta.kind, %reason, "message dropped: no Via to answer to");
            return;
        }
        info!(target: REFUSED, call_id, source = %meta.source, transport = %meta.kind, code, %reason, "request refused");
        self.reply(req, meta, code, &reason, &[], out);
    }

    pub(super) fn on_framing_error(
        &self,
        head: Bytes,
        error: &FramingError,
        meta: &Meta,
        out: &mut Vec<Output>,
    ) {
        self.metrics.transport.parse_error(meta.kind);
        let (code, reason) = match error {
            FramingError::TooLarge { .. } => (413, format!("Request Entity Too Large ({error})")),
            FramingError::MissingContentLength => (
                400,
                "Bad Request (Content-Length is mandatory on streams)".to_string(),
            ),
            FramingError::BadContentLength => {
                (400, "Bad Request (invalid Content-Length)".to_string())
            }
            FramingError::HeadTooLarge { .. } => (0, String::new()),
        };
        match (code, Message::salvage_request(head)) {
            (0, _) | (_, None) => {
                warn!(target: REFUSED, source = %meta.source, transport = %meta.kind, reason = %format_args!("stream framing lost ({error}); no answer possible, connection closed"), "message dropped")
            }
            (code, Some(req)) => {
                let call_id = req.call_id().ok().map(Lossy);
                let call_id = call_id.as_ref().map(tracing::field::display);
                info!(target: REFUSED, call_id, source = %meta.source, transport = %meta.kind, code, reason = %format_args!("{reason}; connection closed"), "request refused");
                self.reply(&req, meta, code, &reason, &[], out);
            }
        }
        if let Some(conn) = meta.conn {
            out.push(Output::Close(conn));
        }
    }
}

/// A reason phrase that names the problem, e.g. "Bad Request (CSeq: method does not match the
/// request method)".
fn refusal_reason(error: &ParseError) -> String {
    let standard = match error.status() {
        505 => "Version Not Supported",
        413 => "Request Entity Too Large",
        _ => "Bad Request",
    };
    format!("{standard} ({error})")
}
