//! SIP messages (RFC 3261 §7): start line, header fields in their original order, body.
//!
//! Parsing is zero-copy and lazy. [`Message::parse`] splits the start line and header fields of
//! one received buffer (`bytes::Bytes`) into spans, classifies header names and frames the body
//! by Content-Length (§18.3); typed values (Via, CSeq, From, ...) are parsed on demand into
//! borrowed views. [`Message::validate`] checks what a server must check before acting on a
//! message (§8.1.1, §8.2.2), so RFC 4475's invalid messages are refused with a reason.
//!
//! Edits (Via and Record-Route insertion, Request-URI rewrite, header removal) write new text into
//! a side buffer; every header field that was not edited keeps its original bytes, order, name
//! spelling and folding, so a proxy forwards what it does not understand untouched (§16.6).
//! An unedited message serializes to the very bytes it was parsed from.

use std::cell::{Cell, OnceCell};
use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use memchr::memchr;

use super::error::{ParseError, Result};
use super::header::HeaderName;
use super::method::Method;
use super::name_addr::{parse_delta_seconds, Contact, ContactLayout, NameAddr, NameAddrLayout};
use super::params::Params;
use super::scan;
use super::typed::{self, CSeq};
use super::uri::{Uri, UriLayout};
use super::via::{Via, ViaLayout};

/// Upper bound on header fields in one message, so hostile input cannot grow the index without
/// limit beyond what the message size limit already bounds.
pub const MAX_HEADERS: usize = 512;

/// A range of bytes in the received buffer (`own == false`) or in the edit buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    own: bool,
    start: u32,
    end: u32,
}

impl Span {
    fn orig(start: usize, end: usize) -> Span {
        Span {
            own: false,
            start: start as u32,
            end: end as u32,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct HeaderEntry {
    name: HeaderName,
    /// The whole field as written: name, colon, value, folds; without the final line break.
    text: Span,
    raw_name: Span,
    value: Span,
}

#[derive(Clone, Debug)]
enum Kind {
    Request { method: Method, uri: Span },
    Response { code: u16, reason: Span },
}

/// A parsed SIP request or response.
#[derive(Clone, Debug)]
pub struct Message {
    buf: Bytes,
    own: Vec<u8>,
    kind: Kind,
    start_line: Span,
    headers: Vec<HeaderEntry>,
    body: Bytes,
    /// The unedited message is `buf[..wire_end]` minus `wire_start` leading CRLFs (offsets as
    /// small as a `Span`'s: kept small, a message fits in the events that carry it).
    wire_start: u32,
    wire_end: u32,
    edited: bool,
    /// [`Message::check_valid`] passed and nothing was edited since: [`Message::validate`] has
    /// nothing left to find (the core validates every request on receipt; `req:sanity()` then
    /// costs nothing for a message the script has not touched).
    valid: bool,
    /// The top Via, Request-URI, From, To and first Contact as parsed the first time they were
    /// asked for (the Request-URI when the message was parsed): the core, the transaction
    /// layer, the proxy, the dialog tracker and the script each read them, and parsing each
    /// once is enough (a value that does not parse is not kept: the error is found again).
    /// Boxed, and allocated when first needed: messages travel inside events and transaction
    /// state, which layouts kept inline would make several hundred bytes larger.
    parsed: OnceCell<Box<Parsed>>,
}

/// Parses kept by a message, each with the place of the text it was parsed from, and used only
/// while the value asked for is still that text. The edit buffer only grows, so a place names
/// one text for the message's whole life: an edited field has a new place, and its old parse
/// is simply never used again (no edit has to remember to drop it).
#[derive(Clone, Debug, Default)]
struct Parsed {
    /// Of the first Via field (whose first value is the top Via).
    top_via: Cell<Option<Kept<ViaLayout>>>,
    request_uri: Cell<Option<Kept<UriLayout>>>,
    from: Cell<Option<Kept<NameAddrLayout>>>,
    to: Cell<Option<Kept<NameAddrLayout>>>,
    first_contact: Cell<Option<Kept<ContactLayout>>>,
    /// Of the first Route value: read by validation, the relay and §16.4 preprocessing.
    first_route: Cell<Option<Kept<NameAddrLayout>>>,
    /// Of the first Record-Route value: read by validation and §16.7 step 8's re-signing.
    first_record_route: Cell<Option<Kept<NameAddrLayout>>>,
}

/// A value's layout and where its text lies in the message.
#[derive(Clone, Copy, Debug)]
struct Kept<L> {
    text: Span,
    layout: L,
}

/// A header field as seen by callers: its classified name and borrowed text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderRef<'a> {
    pub name: HeaderName,
    pub raw_name: &'a [u8],
    /// The value, trimmed; may still contain folds (which count as white space).
    pub value: &'a [u8],
    /// The whole field as written (name, colon, value), without its line break.
    pub text: &'a [u8],
}

impl HeaderRef<'_> {
    /// True when this field is called `name` (any case, compact forms included).
    pub fn is(&self, name: &str) -> bool {
        NameMatch::new(name).matches(self.name, self.raw_name)
    }
}

/// A header name to look for, classified once so that scanning the fields compares enums
/// (§7.3.5: names are case-insensitive; compact forms name the same field).
#[derive(Clone, Copy)]
struct NameMatch<'n> {
    known: HeaderName,
    raw: &'n [u8],
}

impl<'n> NameMatch<'n> {
    fn new(name: &'n str) -> Self {
        NameMatch {
            known: HeaderName::classify(name.as_bytes()),
            raw: name.as_bytes(),
        }
    }

    fn matches(&self, name: HeaderName, raw_name: &[u8]) -> bool {
        match self.known {
            HeaderName::Other => name == HeaderName::Other && scan::eq_ic(raw_name, self.raw),
            known => name == known,
        }
    }
}

impl Message {
    /// Parses one message from a datagram or one framed stream message (§7, §18.3).
    ///
    /// Leading CRLFs are skipped (§7.5). The body is the Content-Length bytes after the empty
    /// line; bytes past it are discarded, and a Content-Length larger than what arrived is an
    /// error (§18.3, RFC 4475 §3.1.1.8 and §3.1.2.2). Without Content-Length the body is the
    /// rest of the buffer (datagrams only: the stream framer insists on the header).
    pub fn parse(buf: Bytes) -> Result<Message> {
        let b = &buf[..];
        let mut pos = 0;
        while b[pos..].starts_with(b"\r\n") || b[pos..].starts_with(b"\n") {
            pos += if b[pos] == b'\r' { 2 } else { 1 };
        }
        let wire_start = pos;
        let (line_end, next) =
            line_at(b, pos).ok_or(ParseError::bad("start line", "message has no line end"))?;
        let start_line = Span::orig(pos, line_end);
        refuse_bare_cr(&b[pos..line_end])?;
        let (kind, uri_layout) = parse_start_line(&b[pos..line_end], pos)?;
        pos = next;

        let mut headers: Vec<HeaderEntry> = Vec::with_capacity(16);
        let mut content_length: Option<usize> = None;
        let body_start = loop {
            let Some((end, next)) = line_at(b, pos) else {
                // The buffer ended without the empty line: tolerate a message that ends right
                // after its last header line (some keep-alive senders do that).
                if pos == b.len() {
                    break pos;
                }
                return Err(ParseError::bad(
                    "headers",
                    "message ends inside a header line",
                ));
            };
            if end == pos {
                break next;
            }
            refuse_bare_cr(&b[pos..end])?;
            if b[pos] == b' ' || b[pos] == b'\t' {
                let last = headers.last_mut().ok_or(ParseError::bad(
                    "headers",
                    "continuation line before any header",
                ))?;
                last.text.end = end as u32;
                // A fold is white space (§7.3.1): the value grows to the last visible byte.
                if let Some(last_visible) = b[pos..end].iter().rposition(|&c| !scan::is_ws(c)) {
                    last.value.end = (pos + last_visible + 1) as u32;
                }
                pos = next;
                continue;
            }
            if headers.len() >= MAX_HEADERS {
                return Err(ParseError::bad("headers", "too many header fields"));
            }
            let entry = parse_header_line(b, pos, end)?;
            headers.push(entry);
            pos = next;
        };
        trim_value_starts(b, &mut headers);
        for h in &headers {
            if h.name == HeaderName::ContentLength {
                if content_length.is_some() {
                    return Err(ParseError::bad(
                        "Content-Length",
                        "more than one Content-Length header",
                    ));
                }
                let text = scan::trim_ws(&b[h.value.start as usize..h.value.end as usize]);
                let n = scan::parse_decimal(text, u32::MAX as u64)
                    .ok_or(ParseError::bad("Content-Length", "not a valid length"))?;
                content_length = Some(n as usize);
            }
        }
        let available = b.len() - body_start;
        let body_len = match content_length {
            Some(n) if n > available => {
                return Err(ParseError::bad(
                    "Content-Length",
                    "larger than the message body received",
                ))
            }
            Some(n) => n,
            None => available,
        };
        let wire_end = body_start + body_len;
        let body = buf.slice(body_start..wire_end);
        let parsed = OnceCell::new();
        if let (Kind::Request { uri, .. }, Some(layout)) = (&kind, uri_layout) {
            let kept = Parsed::default();
            kept.request_uri.set(Some(Kept { text: *uri, layout }));
            let _ = parsed.set(Box::new(kept));
        }
        Ok(Message {
            buf,
            own: Vec::new(),
            kind,
            start_line,
            headers,
            body,
            wire_start: wire_start as u32,
            wire_end: wire_end as u32,
            edited: false,
            valid: false,
            parsed,
        })
    }

    /// A best-effort reading of a buffer that [`Message::parse`] refused, for the sole purpose
    /// of answering it with an error (§8.2: a malformed request still deserves a 400 when it can
    /// be routed back). Header lines that do not parse are skipped; Content-Length is ignored.
    /// Returns `None` for responses (never answered, §8.1.3.3) and when there is no Via to send
    /// an answer along.
    pub fn salvage_request(buf: Bytes) -> Option<Message> {
        let b = &buf[..];
        let mut pos = b.iter().position(|&c| c != b'\r' && c != b'\n')?;
        let (line_end, next) = line_at(b, pos).unwrap_or((b.len(), b.len()));
        let line = &b[pos..line_end];
        if line.len() >= 4 && scan::eq_ic(&line[..4], b"SIP/") {
            return None;
        }
        let method_end = scan::token_end(line, 0);
        let method = Method::parse(&line[..method_end])
            .unwrap_or(Method::Other(Bytes::from_static(b"UNKNOWN")));
        let start_line = Span::orig(pos, line_end);
        let kind = Kind::Request {
            method,
            uri: Span::orig(pos, pos),
        };
        pos = next;
        let mut headers: Vec<HeaderEntry> = Vec::new();
        while let Some((end, next)) = line_at(b, pos) {
            if end == pos || headers.len() >= MAX_HEADERS {
                break;
            }
            if b[pos] == b' ' || b[pos] == b'\t' {
                if let Some(last) = headers.last_mut() {
                    last.text.end = end as u32;
                    if let Some(v) = b[pos..end].iter().rposition(|&c| !scan::is_ws(c)) {
                        last.value.end = (pos + v + 1) as u32;
                    }
                }
            } else if let Ok(entry) = parse_header_line(b, pos, end) {
                headers.push(entry);
            }
            pos = next;
        }
        trim_value_starts(b, &mut headers);
        let msg = Message {
            buf: buf.clone(),
            own: Vec::new(),
            kind,
            start_line,
            headers,
            body: Bytes::new(),
            wire_start: 0,
            wire_end: 0,
            edited: true,
            valid: false,
            parsed: OnceCell::new(),
        };
        msg.top_via().ok()?;
        Some(msg)
    }

    fn text(&self, s: Span) -> &[u8] {
        span_text(&self.buf, &self.own, s)
    }

    fn push_own(&mut self, text: &[u8]) -> Span {
        let start = self.own.len();
        self.own.extend_from_slice(text);
        Span {
            own: true,
            start: start as u32,
            end: self.own.len() as u32,
        }
    }

    // ----- start line -------------------------------------------------------------------

    pub fn is_request(&self) -> bool {
        matches!(self.kind, Kind::Request { .. })
    }

    pub fn is_response(&self) -> bool {
        !self.is_request()
    }

    /// The request method, `None` for a response (see [`Message::cseq`] for its method).
    pub fn method(&self) -> Option<&Method> {
        match &self.kind {
            Kind::Request { method, .. } => Some(method),
            Kind::Response { .. } => None,
        }
    }

    /// The raw Request-URI, `None` for a response.
    pub fn request_uri_bytes(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Request { uri, .. } => Some(self.text(*uri)),
            Kind::Response { .. } => None,
        }
    }

    /// The parsed Request-URI (validated at parse time, so this only fails for responses).
    pub fn request_uri(&self) -> Result<Uri<'_>> {
        let raw = self
            .request_uri_bytes()
            .ok_or(ParseError::bad("Request-URI", "a response has none"))?;
        self.kept(
            |p| &p.request_uri,
            raw,
            Uri::parse,
            Uri::layout,
            Uri::rebuild,
        )
    }

    pub fn status(&self) -> Option<u16> {
        match &self.kind {
            Kind::Response { code, .. } => Some(*code),
            Kind::Request { .. } => None,
        }
    }

    pub fn reason(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Response { reason, .. } => Some(self.text(*reason)),
            Kind::Request { .. } => None,
        }
    }

    pub fn start_line(&self) -> &[u8] {
        self.text(self.start_line)
    }

    // ----- header access ----------------------------------------------------------------

    pub fn headers(&self) -> impl Iterator<Item = HeaderRef<'_>> + '_ {
        self.headers.iter().map(|h| self.header_ref(h))
    }

    fn header_ref(&self, h: &HeaderEntry) -> HeaderRef<'_> {
        HeaderRef {
            name: h.name,
            raw_name: self.text(h.raw_name),
            value: self.text(h.value),
            text: self.text(h.text),
        }
    }

    /// Number of header fields (lines, not list values).
    pub fn header_count(&self) -> usize {
        self.headers.len()
    }

    /// The value of the first field with this known name.
    pub fn header(&self, name: HeaderName) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| self.text(h.value))
    }

    /// Every field called `name` (any name, known or not; case-insensitive).
    pub fn headers_named<'m>(&'m self, name: &'m str) -> impl Iterator<Item = &'m [u8]> + 'm {
        let wanted = NameMatch::new(name);
        self.headers()
            .filter(move |h| wanted.matches(h.name, h.raw_name))
            .map(|h| h.value)
    }

    /// All values of a list header across its fields, split at top-level commas (§7.3.1).
    pub fn values(&self, name: HeaderName) -> impl Iterator<Item = Result<&[u8]>> + '_ {
        self.headers
            .iter()
            .filter(move |h| h.name == name)
            .flat_map(|h| scan::split_commas(self.text(h.value)))
    }

    pub fn has(&self, name: HeaderName) -> bool {
        self.headers.iter().any(|h| h.name == name)
    }

    fn single(&self, name: HeaderName, ctx: &'static str) -> Result<&[u8]> {
        self.header(name).ok_or(ParseError::bad(ctx, "missing"))
    }

    pub fn vias(&self) -> impl Iterator<Item = Result<Via<'_>>> + '_ {
        self.values(HeaderName::Via)
            .map(|v| v.map_err(|e| e.in_context("Via")).and_then(Via::parse))
    }

    /// The first value of the first Via field (what [`Message::vias`] yields first), parsed
    /// once per message (see [`Parsed`]).
    pub fn top_via(&self) -> Result<Via<'_>> {
        let field = self.single(HeaderName::Via, "Via")?;
        let parse = |field| {
            let first = scan::split_commas(field).next();
            let first = first.unwrap_or(Err(ParseError::bad("Via", "missing")));
            first.map_err(|e| e.in_context("Via")).and_then(Via::parse)
        };
        self.kept(|p| &p.top_via, field, parse, Via::layout, Via::rebuild)
    }

    pub fn from(&self) -> Result<NameAddr<'_>> {
        let value = self.single(HeaderName::From, "From")?;
        let parse = |v| NameAddr::parse(v).map_err(|e| e.in_context("From"));
        self.kept(
            |p| &p.from,
            value,
            parse,
            NameAddr::layout,
            NameAddr::rebuild,
        )
    }

    pub fn to(&self) -> Result<NameAddr<'_>> {
        let value = self.single(HeaderName::To, "To")?;
        let parse = |v| NameAddr::parse(v).map_err(|e| e.in_context("To"));
        self.kept(|p| &p.to, value, parse, NameAddr::layout, NameAddr::rebuild)
    }

    /// What `text`, a slice of this message, parses to: the parse kept in `slot` when it was
    /// taken from this very text (see [`Parsed`]), else `parse`d now and kept.
    fn kept<'m, L: Copy, T>(
        &'m self,
        slot: fn(&Parsed) -> &Cell<Option<Kept<L>>>,
        text: &'m [u8],
        parse: impl FnOnce(&'m [u8]) -> Result<T>,
        layout: impl FnOnce(&T, &[u8]) -> L,
        rebuild: impl FnOnce(&L, &'m [u8]) -> T,
    ) -> Result<T> {
        let Some(span) = self.span_of(text) else {
            return parse(text);
        };
        let cell = slot(self.parsed.get_or_init(Box::default));
        if let Some(kept) = cell.get().filter(|k| k.text == span) {
            return Ok(rebuild(&kept.layout, text));
        }
        let value = parse(text)?;
        cell.set(Some(Kept {
            text: span,
            layout: layout(&value, text),
        }));
        Ok(value)
    }

    /// Where `part`, a non-empty slice of this message's text, lies.
    fn span_of(&self, part: &[u8]) -> Option<Span> {
        let within = |base: &[u8]| {
            let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
            (start + part.len() <= base.len()).then_some(start)
        };
        if part.is_empty() {
            return None;
        }
        if let Some(start) = within(&self.buf) {
            return Some(Span::orig(start, start + part.len()));
        }
        within(&self.own).map(|start| Span {
            own: true,
            start: start as u32,
            end: (start + part.len()) as u32,
        })
    }

    /// The From tag: `self.from().ok().and_then(|f| f.tag())`, without parsing the URI once
    /// the message is known valid (see [`Message::check_valid`]).
    pub fn from_tag(&self) -> Option<&[u8]> {
        self.tag_of(HeaderName::From, Self::from)
    }

    /// The To tag: `self.to().ok().and_then(|t| t.tag())` (see [`Message::from_tag`]).
    pub fn to_tag(&self) -> Option<&[u8]> {
        self.tag_of(HeaderName::To, Self::to)
    }

    /// Whether this request is sent inside a dialog: its To has a tag (RFC 3261 §12.2; a
    /// request outside a dialog has none, §8.1.1.2). Proxies route such requests by their
    /// Route set (§16.4, §16.12) rather than as initial requests.
    pub fn is_in_dialog(&self) -> bool {
        self.to_tag().is_some()
    }

    fn tag_of<'m>(
        &'m self,
        name: HeaderName,
        parsed: fn(&'m Self) -> Result<NameAddr<'m>>,
    ) -> Option<&'m [u8]> {
        if !self.valid {
            return parsed(self).ok().and_then(|n| n.tag());
        }
        let value = self.header(name)?;
        Params::from_validated(NameAddr::header_params_of_valid(value)).value("tag")
    }

    pub fn call_id(&self) -> Result<&[u8]> {
        typed::parse_call_id(self.single(HeaderName::CallId, "Call-ID")?)
    }

    pub fn cseq(&self) -> Result<CSeq> {
        CSeq::parse(self.single(HeaderName::CSeq, "CSeq")?)
    }

    /// `None` when absent; an out-of-range value is an error (0-255, §20.22).
    pub fn max_forwards(&self) -> Option<Result<u8>> {
        self.header(HeaderName::MaxForwards)
            .map(typed::parse_max_forwards)
    }

    /// Every Contact value; the first is parsed once per message (see [`Parsed`]).
    pub fn contacts(&self) -> impl Iterator<Item = Result<Contact<'_>>> + '_ {
        let mut values = self.values(HeaderName::Contact);
        let first = values.next().map(|v| {
            v.and_then(|v| {
                let parse = Contact::parse;
                self.kept(
                    |p| &p.first_contact,
                    v,
                    parse,
                    Contact::layout,
                    Contact::rebuild,
                )
            })
            .map_err(|e| e.in_context("Contact"))
        });
        let rest = values.map(|v| {
            v.and_then(Contact::parse)
                .map_err(|e| e.in_context("Contact"))
        });
        first.into_iter().chain(rest)
    }

    fn name_addrs(
        &self,
        name: HeaderName,
        ctx: &'static str,
    ) -> impl Iterator<Item = Result<NameAddr<'_>>> + '_ {
        self.values(name)
            .map(move |v| v.and_then(NameAddr::parse).map_err(|e| e.in_context(ctx)))
    }

    /// [`Message::name_addrs`] with the first value parsed once per message, kept in `slot`.
    fn name_addrs_first_kept(
        &self,
        name: HeaderName,
        ctx: &'static str,
        slot: fn(&Parsed) -> &Cell<Option<Kept<NameAddrLayout>>>,
    ) -> impl Iterator<Item = Result<NameAddr<'_>>> + '_ {
        let mut values = self.values(name);
        let first = values.next().map(|v| {
            v.and_then(|v| {
                self.kept(
                    slot,
                    v,
                    NameAddr::parse,
                    NameAddr::layout,
                    NameAddr::rebuild,
                )
            })
            .map_err(|e| e.in_context(ctx))
        });
        let rest = values.map(move |v| v.and_then(NameAddr::parse).map_err(|e| e.in_context(ctx)));
        first.into_iter().chain(rest)
    }

    /// Every Route value; the first (the one §16.4 looks at) is parsed once per message.
    pub fn routes(&self) -> impl Iterator<Item = Result<NameAddr<'_>>> + '_ {
        self.name_addrs_first_kept(HeaderName::Route, "Route", |p| &p.first_route)
    }

    /// Every Record-Route value; the first is parsed once per message.
    pub fn record_routes(&self) -> impl Iterator<Item = Result<NameAddr<'_>>> + '_ {
        self.name_addrs_first_kept(HeaderName::RecordRoute, "Record-Route", |p| {
            &p.first_record_route
        })
    }

    /// Path (RFC 3327), same grammar as Route.
    pub fn paths(&self) -> impl Iterator<Item = Result<NameAddr<'_>>> + '_ {
        self.name_addrs(HeaderName::Path, "Path")
    }

    /// Expires header in seconds; `None` when absent or malformed (§20.19: treat as absent).
    pub fn expires(&self) -> Option<u32> {
        self.header(HeaderName::Expires)
            .and_then(|v| parse_delta_seconds(scan::trim_ws(v)))
    }

    /// Option tags of Require, Proxy-Require, Supported or Unsupported. An empty Supported
    /// header is valid and names no tag (§20.37, §25.1: `Supported = ... HCOLON [option-tag
    /// *(COMMA option-tag)]`; baresip 1.0 sends `Supported:` in its INVITEs); the other three
    /// need at least one tag.
    pub fn option_tags(&self, name: HeaderName) -> impl Iterator<Item = Result<&[u8]>> + '_ {
        self.headers
            .iter()
            .filter(move |h| h.name == name)
            .filter(move |h| {
                name != HeaderName::Supported || !scan::trim_ws(self.text(h.value)).is_empty()
            })
            .flat_map(|h| scan::split_commas(self.text(h.value)))
            .map(move |v| {
                v.and_then(|t| {
                    if scan::is_token(t) {
                        Ok(t)
                    } else {
                        Err(ParseError::bad(name.as_str(), "bad option tag"))
                    }
                })
            })
    }

    /// The Content-Length value (validated when the message was parsed, §20.14).
    pub fn content_length(&self) -> Option<u32> {
        self.header(HeaderName::ContentLength)
            .and_then(|v| scan::parse_decimal(scan::trim_ws(v), u64::from(u32::MAX)))
            .map(|n| n as u32)
    }

    pub fn content_type(&self) -> Option<&[u8]> {
        self.header(HeaderName::ContentType)
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The buffer the message was parsed from.
    pub fn source_bytes(&self) -> &Bytes {
        &self.buf
    }

    /// Heap bytes this message keeps alive: the buffer it was parsed from, its header index,
    /// the text of its edits and its kept parses (what a transaction holding it costs; see
    /// `transaction::layer`'s memory budget).
    pub fn heap_bytes(&self) -> usize {
        self.buf.len()
            + self.headers.capacity() * std::mem::size_of::<HeaderEntry>()
            + self.own.capacity()
            + self
                .parsed
                .get()
                .map_or(0, |_| std::mem::size_of::<Parsed>())
    }

    /// `part`, a slice borrowed from this message, as owned bytes: shared with the received
    /// buffer when it lies inside it (no copy), copied when it comes from an edit.
    pub fn share(&self, part: &[u8]) -> Bytes {
        let buf_start = self.buf.as_ptr() as usize;
        let part_start = part.as_ptr() as usize;
        let inside =
            part_start >= buf_start && part_start + part.len() <= buf_start + self.buf.len();
        if inside {
            self.buf.slice_ref(part)
        } else {
            Bytes::copy_from_slice(part)
        }
    }

    // ----- validation -------------------------------------------------------------------

    /// Checks a received message before the engine acts on it: the mandatory header fields of
    /// §8.1.1 are present and well formed, fields that may appear once do (RFC 4475 §3.3.8),
    /// the CSeq method matches the request method (§8.1.1.5, RFC 4475 §3.1.2.17), the
    /// Request-URI of a request carries no headers (§19.1.1 table, RFC 4475 §3.1.2.11), and
    /// every Via, Contact, Route, Record-Route, option tag and Date parses.
    pub fn validate(&self) -> Result<()> {
        if self.valid {
            return Ok(());
        }
        let mut seen: u64 = 0;
        for h in self.headers.iter().filter(|h| h.name.is_single()) {
            let bit = 1u64 << (h.name as u8);
            if seen & bit != 0 {
                return Err(ParseError::bad(h.name.as_str(), "appears more than once"));
            }
            seen |= bit;
        }
        let mut via_count = 0;
        for v in self.vias() {
            v?;
            via_count += 1;
        }
        if via_count == 0 {
            return Err(ParseError::bad("Via", "missing"));
        }
        self.from()?;
        self.to()?;
        self.call_id()?;
        let cseq = self.cseq()?;
        if let Some(mf) = self.max_forwards() {
            mf?;
        }
        if let Some(date) = self.header(HeaderName::Date) {
            typed::check_date(date)?;
        }
        for c in self.contacts() {
            if let Contact::Addr(a) = c? {
                if let Some(Err(e)) = Contact::Addr(a).q() {
                    return Err(e);
                }
            }
        }
        for r in self
            .routes()
            .chain(self.record_routes())
            .chain(self.paths())
        {
            r?;
        }
        for name in [
            HeaderName::Require,
            HeaderName::ProxyRequire,
            HeaderName::Supported,
        ] {
            for t in self.option_tags(name) {
                t?;
            }
        }
        if let Kind::Request { method, .. } = &self.kind {
            if &cseq.method != method {
                return Err(ParseError::bad(
                    "CSeq",
                    "method does not match the request method",
                ));
            }
            if let Uri::Sip(u) = self.request_uri()? {
                if u.headers.is_some() {
                    return Err(ParseError::bad("Request-URI", "must not contain headers"));
                }
            }
        }
        Ok(())
    }

    /// [`Message::validate`], remembering a success until the next edit, so that later checks
    /// of the unedited message (the script's `req:sanity()`) do not parse it all again.
    pub fn check_valid(&mut self) -> Result<()> {
        self.validate()?;
        self.valid = true;
        Ok(())
    }

    // ----- edits ------------------------------------------------------------------------

    /// Every edit goes through here: the message is no longer its received bytes, and what
    /// [`Message::check_valid`] found no longer holds.
    fn touched(&mut self) {
        self.edited = true;
        self.valid = false;
    }

    /// After removing fields or values of `name`: what [`Message::validate`] checks of the
    /// others still holds (every remaining value was checked, and nothing it counts can appear
    /// more often), unless `name` is one a message cannot be without. Proxies remove their own
    /// Route entry (§16.4) from every in-dialog request before the script's `req:sanity()`.
    fn removed(&mut self, name: HeaderName) {
        let mandatory = matches!(
            name,
            HeaderName::Via
                | HeaderName::From
                | HeaderName::To
                | HeaderName::CallId
                | HeaderName::CSeq
        );
        let valid = self.valid && !mandatory;
        self.touched();
        self.valid = valid;
    }

    /// Replaces the Request-URI (§16.6 step 2); `uri` must parse. Setting the Request-URI the
    /// request already has is no edit (a proxy forwarding an in-dialog request to its own
    /// Request-URI, or a script setting it back): the URI was parsed with the start line.
    pub fn set_request_uri(&mut self, uri: &[u8]) -> Result<()> {
        if self.request_uri_bytes() == Some(uri) && self.request_uri().is_ok() {
            return Ok(());
        }
        let layout = Uri::parse(uri)?.layout(uri);
        let Kind::Request { method, .. } = &self.kind else {
            return Err(ParseError::bad("Request-URI", "a response has none"));
        };
        let line = [method.as_str().as_bytes(), b" ", uri, b" SIP/2.0"].concat();
        let method_len = method.as_str().len();
        let span = self.push_own(&line);
        let uri_span = Span {
            own: true,
            start: span.start + method_len as u32 + 1,
            end: span.end - 8,
        };
        if let Kind::Request { uri, .. } = &mut self.kind {
            *uri = uri_span;
        }
        self.start_line = span;
        self.touched();
        let kept = Some(Kept {
            text: uri_span,
            layout,
        });
        self.parsed.get_or_init(Box::default).request_uri.set(kept);
        Ok(())
    }

    fn new_entry(&mut self, raw_name: &[u8], value: &[u8]) -> Result<HeaderEntry> {
        if !scan::is_token(raw_name) {
            return Err(ParseError::bad("header", "name is not a token"));
        }
        if value.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(ParseError::bad(
                "header",
                "value contains a line break or NUL",
            ));
        }
        let start = self.own.len();
        self.own.reserve(raw_name.len() + 2 + value.len());
        self.own.extend_from_slice(raw_name);
        self.own.extend_from_slice(b": ");
        self.own.extend_from_slice(value);
        let text = Span {
            own: true,
            start: start as u32,
            end: self.own.len() as u32,
        };
        let name_end = text.start + raw_name.len() as u32;
        Ok(HeaderEntry {
            name: HeaderName::classify(raw_name),
            text,
            raw_name: Span {
                own: true,
                start: text.start,
                end: name_end,
            },
            value: Span {
                own: true,
                start: name_end + 2,
                end: text.end,
            },
        })
    }

    /// Inserts a field above the first field of the same name, or at the top when there is
    /// none: the position for Via (§16.6 step 8) and Record-Route (§16.6 step 4).
    pub fn prepend_header(&mut self, name: &str, value: &[u8]) -> Result<()> {
        let entry = self.new_entry(name.as_bytes(), value)?;
        let at = self.position_of(name).unwrap_or(0);
        self.headers.insert(at, entry);
        self.touched();
        Ok(())
    }

    /// Adds a field after all others.
    pub fn append_header(&mut self, name: &str, value: &[u8]) -> Result<()> {
        let entry = self.new_entry(name.as_bytes(), value)?;
        self.headers.push(entry);
        self.touched();
        Ok(())
    }

    /// Sets the single field `name` to `value`: replaces the first one in place, drops others.
    pub fn set_header(&mut self, name: &str, value: &[u8]) -> Result<()> {
        let entry = self.new_entry(name.as_bytes(), value)?;
        match self.position_of(name) {
            Some(at) => {
                self.headers[at] = entry;
                let wanted = NameMatch::new(name);
                let (buf, own) = (&self.buf, &self.own);
                let mut index = 0;
                self.headers.retain(|h| {
                    index += 1;
                    index - 1 <= at || !wanted.matches(h.name, span_text(buf, own, h.raw_name))
                });
            }
            None => self.headers.push(entry),
        }
        self.touched();
        Ok(())
    }

    /// Removes every field called `name`; returns how many were removed.
    pub fn remove_headers(&mut self, name: &str) -> usize {
        let before = self.headers.len();
        let wanted = NameMatch::new(name);
        let (buf, own) = (&self.buf, &self.own);
        self.headers
            .retain(|h| !wanted.matches(h.name, span_text(buf, own, h.raw_name)));
        let removed = before - self.headers.len();
        if removed > 0 {
            self.removed(HeaderName::classify(name.as_bytes()));
        }
        removed
    }

    fn position_of(&self, name: &str) -> Option<usize> {
        let wanted = NameMatch::new(name);
        self.headers
            .iter()
            .position(|h| wanted.matches(h.name, self.text(h.raw_name)))
    }

    /// Replaces the value of the `index`-th field called `name` (counting from 0 among the
    /// fields of that name), in place: other fields and their order are kept, e.g. one
    /// Record-Route field line a proxy rewrites (§16.7 step 8). Returns false when there is no
    /// such field.
    pub fn set_nth_header(&mut self, name: HeaderName, index: usize, value: &[u8]) -> Result<bool> {
        let Some(at) = self
            .headers
            .iter()
            .enumerate()
            .filter(|(_, h)| h.name == name)
            .nth(index)
            .map(|(at, _)| at)
        else {
            return Ok(false);
        };
        let raw_name = self.text(self.headers[at].raw_name).to_vec();
        let entry = self.new_entry(&raw_name, value)?;
        self.headers[at] = entry;
        self.touched();
        Ok(true)
    }

    /// Removes the first value of a list header (the top Via of a response, §16.7 step 3; our
    /// own Route, §16.4), rewriting only the field that held it. Returns false when absent.
    pub fn remove_first_value(&mut self, name: HeaderName) -> Result<bool> {
        self.replace_first_value(name, None)
    }

    /// Replaces the first value of a list header, e.g. the top Via after adding `received`
    /// (§18.2.1). Other values sharing its field line are kept as written.
    pub fn set_first_value(&mut self, name: HeaderName, value: &[u8]) -> Result<bool> {
        if value.iter().any(|&b| b == b'\r' || b == b'\n') {
            return Err(ParseError::bad("header", "value contains a line break"));
        }
        self.replace_first_value(name, Some(value))
    }

    fn replace_first_value(&mut self, name: HeaderName, value: Option<&[u8]>) -> Result<bool> {
        let Some(at) = self.headers.iter().position(|h| h.name == name) else {
            return Ok(false);
        };
        let h = self.headers[at];
        let field_value = self.text(h.value);
        let mut parts = scan::split_commas(field_value);
        parts.next().transpose()?;
        let rest: Option<Vec<u8>> = match parts.next() {
            Some(second) => {
                let second = second?;
                let offset = second.as_ptr() as usize - field_value.as_ptr() as usize;
                let mut rest = Vec::with_capacity(field_value.len() - offset);
                scan::push_unfolded(&mut rest, &field_value[offset..]);
                Some(rest)
            }
            None => None,
        };
        let raw_name = self.text(h.raw_name).to_vec();
        let new_value = match (value, rest) {
            (Some(v), Some(r)) => Some([v, b", ", &r].concat()),
            (Some(v), None) => Some(v.to_vec()),
            (None, Some(r)) => Some(r),
            (None, None) => None,
        };
        match new_value {
            Some(v) => {
                let entry = self.new_entry(&raw_name, &v)?;
                self.headers[at] = entry;
            }
            None => {
                self.headers.remove(at);
            }
        }
        match value {
            Some(_) => self.touched(),
            None => self.removed(name),
        }
        Ok(true)
    }

    /// Records the received address and port in the top Via of a request (§18.2.1, RFC 3581
    /// §4). Returns whether the Via changed.
    pub fn stamp_received(&mut self, source: SocketAddr) -> Result<bool> {
        self.stamp_received_rport(source, false)
    }

    /// [`Message::stamp_received`] with RFC 3581 `rport` forced on (as if the top Via had a
    /// bare `rport`) when `force_rport`: see [`Via::with_received_rport`].
    pub fn stamp_received_rport(&mut self, source: SocketAddr, force_rport: bool) -> Result<bool> {
        let new_value = match self.top_via()?.with_received_rport(source, force_rport) {
            Some(v) => v,
            None => return Ok(false),
        };
        self.set_first_value(HeaderName::Via, &new_value)
    }

    /// Replaces the body and sets Content-Length (and Content-Type when given).
    pub fn set_body(&mut self, body: Bytes, content_type: Option<&str>) -> Result<()> {
        if let Some(ct) = content_type {
            self.set_header("Content-Type", ct.as_bytes())?;
        }
        self.set_header("Content-Length", body.len().to_string().as_bytes())?;
        self.body = body;
        self.touched();
        Ok(())
    }

    /// Adds Content-Length when it is missing, as a stream transport requires (§18.3, §20.14).
    pub fn ensure_content_length(&mut self) -> Result<()> {
        if !self.has(HeaderName::ContentLength) {
            let len = self.body.len().to_string();
            self.append_header("Content-Length", len.as_bytes())?;
        }
        Ok(())
    }

    // ----- serialization ----------------------------------------------------------------

    /// Whether the message was changed since it was parsed.
    pub fn is_edited(&self) -> bool {
        self.edited
    }

    /// The message as it goes on the wire. Without edits, these are the received bytes
    /// (minus leading CRLFs and trailing octets past Content-Length), shared, not copied.
    pub fn to_bytes(&self) -> Bytes {
        if !self.edited {
            return self
                .buf
                .slice(self.wire_start as usize..self.wire_end as usize);
        }
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.write_to(&mut out);
        out.freeze()
    }

    fn encoded_len(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|h| (h.text.end - h.text.start) as usize + 2)
            .sum();
        (self.start_line.end - self.start_line.start) as usize + 2 + headers + 2 + self.body.len()
    }

    pub fn write_to(&self, out: &mut BytesMut) {
        out.reserve(self.encoded_len());
        out.put_slice(self.text(self.start_line));
        out.put_slice(b"\r\n");
        for h in &self.headers {
            out.put_slice(self.text(h.text));
            out.put_slice(b"\r\n");
        }
        out.put_slice(b"\r\n");
        out.put_slice(&self.body);
    }
}

/// Values of folded fields may start on a continuation line ("Route:\r\n <sip:...>"): move
/// each value's start to its first visible byte.
fn trim_value_starts(b: &[u8], headers: &mut [HeaderEntry]) {
    for h in headers {
        let v = &b[h.value.start as usize..h.value.end as usize];
        h.value.start += scan::skip_ws(v, 0) as u32;
    }
}

fn span_text<'a>(buf: &'a [u8], own: &'a [u8], s: Span) -> &'a [u8] {
    let src = if s.own { own } else { buf };
    &src[s.start as usize..s.end as usize]
}

/// Lines end in CRLF (§7); a CR anywhere else is refused. Parsers disagree on whether a lone CR
/// ends a line, and since unedited fields are forwarded byte-exact, accepting one would let a
/// sender smuggle a header past us into a downstream element that splits there.
fn refuse_bare_cr(line: &[u8]) -> Result<()> {
    match memchr(b'\r', line) {
        Some(_) => Err(ParseError::bad("headers", "CR without LF inside a line")),
        None => Ok(()),
    }
}

/// Finds the line starting at `pos`: returns (end of its content, start of the next line).
/// Accepts CRLF and, for robustness, a bare LF.
pub(super) fn line_at(b: &[u8], pos: usize) -> Option<(usize, usize)> {
    let nl = pos + memchr(b'\n', &b[pos..])?;
    let end = if nl > pos && b[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    Some((end, nl + 1))
}

fn parse_header_line(b: &[u8], pos: usize, end: usize) -> Result<HeaderEntry> {
    let line = &b[pos..end];
    let colon =
        memchr(b':', line).ok_or(ParseError::bad("headers", "header line without a colon"))?;
    // HCOLON = *( SP / HTAB ) ":" SWS
    let name_end = line[..colon]
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(0, |p| p + 1);
    let raw_name = &line[..name_end];
    if !scan::is_token(raw_name) {
        return Err(ParseError::bad("headers", "header name is not a token"));
    }
    let value = scan::trim_ws(&line[colon + 1..]);
    let value_start = if value.is_empty() {
        end
    } else {
        pos + colon + 1 + scan::skip_ws(&line[colon + 1..], 0)
    };
    Ok(HeaderEntry {
        name: HeaderName::classify(raw_name),
        text: Span::orig(pos, end),
        raw_name: Span::orig(pos, pos + name_end),
        value: Span::orig(value_start, value_start + value.len()),
    })
}

/// Request-Line = Method SP Request-URI SP SIP-Version; Status-Line = SIP-Version SP
/// Status-Code SP Reason-Phrase (§7.1, §7.2). Exactly one SP between elements (RFC 4475
/// §3.1.2.9, §3.1.2.10).
fn parse_start_line(line: &[u8], offset: usize) -> Result<(Kind, Option<UriLayout>)> {
    if line.len() >= 4 && scan::eq_ic(&line[..4], b"SIP/") {
        return parse_status_line(line, offset).map(|kind| (kind, None));
    }
    let sp1 = memchr(b' ', line).ok_or(ParseError::bad("start line", "not a SIP request line"))?;
    let sp2 = memchr::memrchr(b' ', line)
        .filter(|&p| p > sp1)
        .ok_or(ParseError::bad("start line", "not a SIP request line"))?;
    let method = Method::parse(&line[..sp1]).map_err(|e| e.in_context("start line"))?;
    check_version(&line[sp2 + 1..])?;
    let uri = &line[sp1 + 1..sp2];
    if uri.is_empty() || uri.iter().any(|&c| c == b' ' || c == b'\t') {
        return Err(ParseError::bad("Request-URI", "contains white space"));
    }
    let layout = Uri::parse(uri)
        .map_err(|e| e.in_context("Request-URI"))?
        .layout(uri);
    let kind = Kind::Request {
        method,
        uri: Span::orig(offset + sp1 + 1, offset + sp2),
    };
    Ok((kind, Some(layout)))
}

fn parse_status_line(line: &[u8], offset: usize) -> Result<Kind> {
    let sp1 = memchr(b' ', line).ok_or(ParseError::bad("status line", "no status code"))?;
    check_version(&line[..sp1])?;
    let rest = &line[sp1 + 1..];
    let code_end = memchr(b' ', rest).unwrap_or(rest.len());
    let code = &rest[..code_end];
    if code.len() != 3 {
        return Err(ParseError::bad(
            "status line",
            "status code is not 3 digits",
        ));
    }
    let code = scan::parse_decimal(code, 699)
        .filter(|c| *c >= 100)
        .ok_or(ParseError::bad("status line", "status code out of range"))? as u16;
    let reason_start = (sp1 + 1 + code_end + 1).min(line.len());
    Ok(Kind::Response {
        code,
        reason: Span::orig(offset + reason_start, offset + line.len()),
    })
}

/// SIP-Version is case-insensitive (§7.1); only 2.0 is served (505 otherwise, §21.5.7).
fn check_version(v: &[u8]) -> Result<()> {
    if scan::eq_ic(v, b"SIP/2.0") {
        Ok(())
    } else if v.len() > 4 && scan::eq_ic(&v[..4], b"SIP/") {
        Err(ParseError::with_status(
            505,
            "start line",
            "SIP version not supported",
        ))
    } else {
        Err(ParseError::bad("start line", "bad SIP version"))
    }
}

#[cfg(test)]
mod validity_memo_tests {
    use super::*;

    const INVITE: &str = "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Content-Length: 0\r\n\
\r\n";

    #[test]
    fn removing_an_optional_value_keeps_the_check_but_removing_a_mandatory_one_does_not() {
        let text = INVITE.replace(
            "Max-Forwards: 70\r\n",
            "Max-Forwards: 70\r\nRoute: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n",
        );
        let mut m = Message::parse(Bytes::from(text)).unwrap();
        m.check_valid().unwrap();
        assert!(m.remove_first_value(HeaderName::Route).unwrap());
        assert_eq!(m.routes().count(), 1);
        assert!(m.valid);
        assert_eq!(m.remove_headers("route"), 1);
        assert!(m.valid);
        m.validate().unwrap();
        assert_eq!(m.remove_headers("Call-ID"), 1);
        assert!(!m.valid);
        assert!(m.validate().is_err());
        let mut m = Message::parse(Bytes::from_static(INVITE.as_bytes())).unwrap();
        m.check_valid().unwrap();
        assert!(m.remove_first_value(HeaderName::Via).unwrap());
        assert!(m.validate().is_err());
    }

    #[test]
    fn the_kept_first_route_follows_edits_of_route() {
        let text = INVITE.replace(
            "Max-Forwards: 70\r\n",
            "Max-Forwards: 70\r\nRoute: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n\
             Record-Route: <sip:p0.example.com;lr>\r\n",
        );
        let mut m = Message::parse(Bytes::from(text)).unwrap();
        m.check_valid().unwrap();
        let top = |m: &Message| m.routes().next().unwrap().unwrap().uri.raw().to_vec();
        assert_eq!(top(&m), b"sip:p1.example.com;lr");
        assert_eq!(top(&m), b"sip:p1.example.com;lr");
        let rr = m.record_routes().next().unwrap().unwrap();
        assert_eq!(rr.uri.raw(), b"sip:p0.example.com;lr");
        assert!(m.remove_first_value(HeaderName::Route).unwrap());
        assert_eq!(top(&m), b"sip:p2.example.com;lr");
        m.set_header("Route", b"<sip:p3.example.com;lr>").unwrap();
        assert_eq!(top(&m), b"sip:p3.example.com;lr");
        assert_eq!(m.routes().count(), 1);
    }

    #[test]
    fn setting_the_request_uri_it_has_is_no_edit() {
        let mut m = Message::parse(Bytes::from_static(INVITE.as_bytes())).unwrap();
        m.set_request_uri(b"sip:bob@biloxi.example.com").unwrap();
        assert!(!m.is_edited());
        assert_eq!(m.to_bytes(), INVITE.as_bytes());
        m.set_request_uri(b"sip:bob@192.0.2.4").unwrap();
        assert!(m.is_edited());
        assert_eq!(m.request_uri_bytes(), Some(&b"sip:bob@192.0.2.4"[..]));
        assert!(m.set_request_uri(b"sip:bob@192.0.2.4 x").is_err());
    }
}
