//! Building a response to a received request (RFC 3261 §8.2.6).
//!
//! Via, From, Call-ID and CSeq are copied from the request byte for byte (§8.2.6.2: they MUST
//! equal the request's), Via in order; To is copied and gets a tag when it has none and the
//! response is not a 100 (§8.2.6.2); a 100 echoes Timestamp (§8.2.6.1).

use bytes::{BufMut, Bytes, BytesMut};

use super::header::HeaderName;
use super::message::Message;

pub struct ResponseBuilder<'r> {
    request: &'r Message,
    code: u16,
    reason: &'r str,
    to_tag: Option<&'r [u8]>,
    extra: Vec<(&'r str, &'r [u8])>,
    body: Option<(&'r str, &'r [u8])>,
}

impl<'r> ResponseBuilder<'r> {
    pub fn new(request: &'r Message, code: u16, reason: &'r str) -> Self {
        ResponseBuilder {
            request,
            code,
            reason,
            to_tag: None,
            extra: Vec::new(),
            body: None,
        }
    }

    /// The tag to add to To when the request's To has none (callers make it stable per
    /// request so a retransmitted request gets the same answer).
    pub fn to_tag(mut self, tag: &'r [u8]) -> Self {
        self.to_tag = Some(tag);
        self
    }

    /// An extra header field. Names and values come from the engine or a validated script.
    pub fn header(mut self, name: &'r str, value: &'r [u8]) -> Self {
        self.extra.push((name, value));
        self
    }

    pub fn body(mut self, content_type: &'r str, body: &'r [u8]) -> Self {
        self.body = Some((content_type, body));
        self
    }

    pub fn build(&self) -> Bytes {
        // Sized to fit: a response kept by a transaction for 32 s (Timer J) keeps its whole
        // allocation, not just the bytes written.
        let mut out = BytesMut::with_capacity(self.encoded_len_bound());
        out.put_slice(b"SIP/2.0 ");
        out.put_slice(self.code.to_string().as_bytes());
        out.put_u8(b' ');
        put_clean(&mut out, self.reason.as_bytes());
        out.put_slice(b"\r\n");
        for h in self.request.headers() {
            match h.name {
                HeaderName::Via | HeaderName::From | HeaderName::CallId | HeaderName::CSeq => {
                    put_line(&mut out, h.text)
                }
                HeaderName::To => self.put_to(&mut out, h.raw_name, h.value),
                HeaderName::Timestamp if self.code == 100 => put_line(&mut out, h.text),
                _ => {}
            }
        }
        for (name, value) in &self.extra {
            put_clean(&mut out, name.as_bytes());
            out.put_slice(if value.is_empty() { b":" } else { b": " });
            put_clean(&mut out, value);
            out.put_slice(b"\r\n");
        }
        let body: &[u8] = match self.body {
            Some((ct, body)) => {
                out.put_slice(b"Content-Type: ");
                put_clean(&mut out, ct.as_bytes());
                out.put_slice(b"\r\n");
                body
            }
            None => b"",
        };
        out.put_slice(b"Content-Length: ");
        out.put_slice(body.len().to_string().as_bytes());
        out.put_slice(b"\r\n\r\n");
        out.put_slice(body);
        out.freeze()
    }

    /// At least the length [`ResponseBuilder::build`] writes (a To tag is counted whether
    /// or not it is added).
    fn encoded_len_bound(&self) -> usize {
        const CRLF: usize = 2;
        let status_line = "SIP/2.0 ".len() + 5 + self.reason.len() + CRLF;
        let copied: usize = self
            .request
            .headers()
            .map(|h| match h.name {
                HeaderName::Via | HeaderName::From | HeaderName::CallId | HeaderName::CSeq => {
                    h.text.len() + CRLF
                }
                HeaderName::To => {
                    let tag = self.to_tag.map_or(0, |t| ";tag=".len() + t.len());
                    h.raw_name.len() + ": ".len() + h.value.len() + tag + CRLF
                }
                HeaderName::Timestamp if self.code == 100 => h.text.len() + CRLF,
                _ => 0,
            })
            .sum();
        let extra: usize = self
            .extra
            .iter()
            .map(|(name, value)| name.len() + ": ".len() + value.len() + CRLF)
            .sum();
        let body = self.body.map_or(0, |(ct, body)| {
            "Content-Type: ".len() + ct.len() + CRLF + body.len()
        });
        status_line + copied + extra + body + "Content-Length: ".len() + 20 + 2 * CRLF
    }

    fn put_to(&self, out: &mut BytesMut, raw_name: &[u8], value: &[u8]) {
        out.put_slice(raw_name);
        out.put_slice(b": ");
        out.put_slice(value);
        let has_tag = self.request.to_tag().is_some();
        if let (false, true, Some(tag)) = (has_tag, self.code > 100, self.to_tag) {
            out.put_slice(b";tag=");
            put_clean(out, tag);
        }
        out.put_slice(b"\r\n");
    }
}

fn put_line(out: &mut BytesMut, text: &[u8]) {
    out.put_slice(text);
    out.put_slice(b"\r\n");
}

/// Writes text that must stay on one line: CR and LF become spaces, so nothing a caller passes
/// can inject a header.
fn put_clean(out: &mut BytesMut, text: &[u8]) {
    for &b in text {
        out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_is_sized_to_the_response() {
        let request = Message::parse(Bytes::from_static(
            b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKr1\r\n\
              Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bKr0\r\nMax-Forwards: 70\r\n\
              From: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>\r\n\
              Call-ID: r1@127.0.0.1\r\nCSeq: 1 INVITE\r\nTimestamp: 54\r\nContent-Length: 0\r\n\r\n",
        ))
        .unwrap();
        for builder in [
            ResponseBuilder::new(&request, 100, "Trying"),
            ResponseBuilder::new(&request, 486, "Busy Here").to_tag(b"t1"),
            ResponseBuilder::new(&request, 200, "OK")
                .to_tag(b"t2")
                .header("Contact", b"<sip:bob@127.0.0.1>")
                .body("application/sdp", b"v=0\r\n"),
        ] {
            let built = builder.build();
            let bound = builder.encoded_len_bound();
            assert!(
                bound >= built.len() && bound - built.len() < 32,
                "{bound} for {}",
                built.len()
            );
        }
    }
}
