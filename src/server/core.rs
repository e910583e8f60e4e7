//! The server core until the transaction layer and the Lua engine land: a sans-IO, stateless
//! responder. It answers OPTIONS addressed to this server with 200 (RFC 3261 §11.2), refuses
//! every other request with a clear error, and turns malformed input into 400/413/505 with a
//! reason phrase naming the problem, or drops it with a log line when no answer can be routed.
//!
//! Received-side Via processing (§18.2.1, RFC 3581) and response routing (§18.2.2) happen here
//! for every request, so the later layers get requests whose top Via already records where they
//! came from.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::sip::{HeaderName, Message, Method, ParseError, ResponseBuilder, Uri};
use crate::transport::{
    Destination, FramingError, Input, Meta, Output, TransportKind, Worker, WorkerFactory,
};

/// Methods this build answers itself; grows as the engine issues land.
pub const ALLOW: &str = "OPTIONS";
/// Option tags of extensions this build supports (none yet: Require/Proxy-Require with any tag
/// gets 420, §8.2.2.3).
pub const SUPPORTED: &[&str] = &[];
pub const SERVER: &str = concat!("moonroute ", env!("CARGO_PKG_VERSION"));

/// Which URIs name this server (Kamailio's `myself`): a configured domain, or one of the
/// listen addresses (any port when listening on port 0; a wildcard listener matches any IP).
#[derive(Clone, Debug, Default)]
pub struct LocalIdentity {
    domains: Vec<String>,
    listen: Vec<SocketAddr>,
}

impl LocalIdentity {
    pub fn new(domains: &[String], listen: impl IntoIterator<Item = SocketAddr>) -> Self {
        LocalIdentity {
            domains: domains.to_vec(),
            listen: listen.into_iter().collect(),
        }
    }

    pub fn is_myself(&self, uri: &Uri<'_>) -> bool {
        let Some(sip) = uri.as_sip() else {
            return false;
        };
        let default_port = if sip.secure { 5061 } else { 5060 };
        let port = sip.port.unwrap_or(default_port);
        match sip.host.ip() {
            Some(ip) => self
                .listen
                .iter()
                .any(|l| ip_matches(l.ip(), ip) && port_matches(l.port(), port)),
            None => {
                let name = sip.host.to_string();
                let is_domain = self.domains.iter().any(|d| d.eq_ignore_ascii_case(&name));
                let is_localhost = name.eq_ignore_ascii_case("localhost")
                    && self
                        .listen
                        .iter()
                        .any(|l| l.ip().is_loopback() && port_matches(l.port(), port));
                is_domain || is_localhost
            }
        }
    }
}

fn ip_matches(listen: IpAddr, ip: IpAddr) -> bool {
    listen == ip || listen.is_unspecified()
}

fn port_matches(listen: u16, port: u16) -> bool {
    listen == 0 || listen == port
}

pub struct CoreFactory {
    identity: LocalIdentity,
    tag_hasher: RandomState,
}

impl CoreFactory {
    pub fn new(config: &Config) -> CoreFactory {
        let identity = LocalIdentity::new(&config.domains, config.listen.iter().map(|l| l.addr));
        CoreFactory {
            identity,
            tag_hasher: RandomState::new(),
        }
    }
}

impl WorkerFactory for CoreFactory {
    fn make_worker(&self, _index: usize) -> Box<dyn Worker> {
        Box::new(Core {
            identity: self.identity.clone(),
            tag_hasher: self.tag_hasher.clone(),
        })
    }
}

/// One event loop's core. Stateless today; it will own the loop's transactions.
pub struct Core {
    identity: LocalIdentity,
    /// Shared by all loops, so a retransmitted request gets the same To tag wherever it lands.
    tag_hasher: RandomState,
}

impl Worker for Core {
    fn on_input(&mut self, input: Input, _now: Instant, out: &mut Vec<Output>) {
        match input {
            Input::Message { data, meta } => self.on_message(data, &meta, out),
            Input::FramingError { head, error, meta } => {
                self.on_framing_error(head, &error, &meta, out)
            }
        }
    }
}

impl Core {
    pub fn new(identity: LocalIdentity) -> Core {
        Core {
            identity,
            tag_hasher: RandomState::new(),
        }
    }

    fn on_message(&mut self, data: Bytes, meta: &Meta, out: &mut Vec<Output>) {
        let mut msg = match Message::parse(data.clone()) {
            Ok(m) => m,
            Err(e) => return self.refuse_unparsable(data, e, meta, out),
        };
        if msg.is_response() {
            // No client transactions exist yet, so every response is stray (§16.11 lets a
            // stateless element drop what it cannot route).
            debug!(source = %meta.source, status = msg.status(), "dropping response: no transaction");
            return;
        }
        if let Err(e) = msg.stamp_received(meta.source) {
            return self.refuse(&msg, e, meta, out);
        }
        if let Err(e) = msg.validate() {
            return self.refuse(&msg, e, meta, out);
        }
        self.on_request(&msg, meta, out);
    }

    fn on_request(&self, req: &Message, meta: &Meta, out: &mut Vec<Output>) {
        let call_id = String::from_utf8_lossy(req.call_id().unwrap_or(b"")).into_owned();
        let Some(method) = req.method() else { return };
        if *method == Method::Ack {
            // ACK is never answered (§17.2.1: it ends a transaction, or belongs to a 2xx).
            debug!(%call_id, "absorbing ACK");
            return;
        }
        if let Some(reply) = self.check_request(req, method) {
            let (code, reason, extra) = reply;
            info!(%call_id, %method, source = %meta.source, code, reason, "refusing request");
            return self.reply(req, meta, code, reason, &extra, out);
        }
        debug!(%call_id, source = %meta.source, "answering OPTIONS");
        let supported = SUPPORTED.join(", ");
        let extra = [
            ("Allow", ALLOW.to_string()),
            ("Accept", "*/*".to_string()),
            ("Accept-Encoding", "identity".to_string()),
            ("Accept-Language", "en".to_string()),
            ("Supported", supported),
            ("Server", SERVER.to_string()),
        ];
        self.reply(req, meta, 200, "OK", &extra, out);
    }

    /// The checks of §8.2.2 and §16.3 that apply to a server that does not route yet; returns
    /// the refusal, or `None` for an OPTIONS addressed to this server.
    #[allow(clippy::type_complexity)]
    fn check_request(
        &self,
        req: &Message,
        method: &Method,
    ) -> Option<(u16, &'static str, Vec<(&'static str, String)>)> {
        let uri = req.request_uri().ok()?;
        if !uri.is_routable_scheme() {
            return Some((416, "Unsupported URI Scheme", vec![]));
        }
        let unsupported: Vec<String> = [HeaderName::Require, HeaderName::ProxyRequire]
            .into_iter()
            .flat_map(|h| req.option_tags(h))
            .filter_map(Result::ok)
            .filter(|tag| {
                !SUPPORTED
                    .iter()
                    .any(|s| s.as_bytes().eq_ignore_ascii_case(tag))
            })
            .map(|tag| String::from_utf8_lossy(tag).into_owned())
            .collect();
        if !unsupported.is_empty() {
            return Some((
                420,
                "Bad Extension",
                vec![("Unsupported", unsupported.join(", "))],
            ));
        }
        let for_me = self.identity.is_myself(&uri);
        let max_forwards_zero = matches!(req.max_forwards(), Some(Ok(0)));
        match method {
            // §16.3 step 3: an OPTIONS with Max-Forwards 0 may be answered as its final recipient.
            Method::Options if for_me || max_forwards_zero => None,
            _ if max_forwards_zero => Some((483, "Too Many Hops", vec![])),
            // No transactions exist yet, so there is nothing to cancel (§9.2).
            Method::Cancel => Some((481, "Call/Transaction Does Not Exist", vec![])),
            _ => Some((
                501,
                "Not Implemented (no routing engine yet)",
                vec![("Allow", ALLOW.to_string())],
            )),
        }
    }

    fn refuse_unparsable(
        &self,
        data: Bytes,
        error: ParseError,
        meta: &Meta,
        out: &mut Vec<Output>,
    ) {
        match Message::salvage_request(data) {
            Some(req) => self.refuse(&req, error, meta, out),
            None => {
                warn!(source = %meta.source, transport = %meta.kind, %error, "dropping unparsable message: no answer can be routed")
            }
        }
    }

    fn refuse(&self, req: &Message, error: ParseError, meta: &Meta, out: &mut Vec<Output>) {
        if req.method() == Some(&Method::Ack) {
            warn!(source = %meta.source, %error, "dropping malformed ACK (never answered)");
            return;
        }
        let code = error.status();
        let reason = refusal_reason(&error);
        info!(source = %meta.source, transport = %meta.kind, code, %error, "refusing malformed request");
        self.reply(req, meta, code, &reason, &[], out);
    }

    fn on_framing_error(
        &self,
        head: Bytes,
        error: &FramingError,
        meta: &Meta,
        out: &mut Vec<Output>,
    ) {
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
                warn!(source = %meta.source, %error, "closing stream: framing lost, no answer possible")
            }
            (code, Some(req)) => {
                info!(source = %meta.source, code, %error, "refusing stream message and closing");
                self.reply(&req, meta, code, &reason, &[], out);
            }
        }
        if let Some(conn) = meta.conn {
            out.push(Output::Close(conn));
        }
    }

    fn reply(
        &self,
        req: &Message,
        meta: &Meta,
        code: u16,
        reason: &str,
        extra: &[(&str, String)],
        out: &mut Vec<Output>,
    ) {
        let Ok(via) = req.top_via() else { return };
        let default_port = if meta.kind == TransportKind::Tls {
            5061
        } else {
            5060
        };
        let dest = Destination {
            kind: meta.kind,
            addr: if meta.kind.is_reliable() {
                meta.source
            } else {
                via.response_addr(meta.source, default_port)
            },
            conn: meta.conn,
            local: Some(meta.local),
        };
        let tag = self.to_tag(req);
        let mut builder = ResponseBuilder::new(req, code, reason).to_tag(tag.as_bytes());
        for (name, value) in extra {
            builder = builder.header(name, value.as_bytes());
        }
        out.push(Output::Send {
            dest,
            data: builder.build(),
        });
    }

    /// A To tag stable for one request and its retransmissions (§8.2.6.2, §17.2.1).
    fn to_tag(&self, req: &Message) -> String {
        let from_tag = req.from().ok().and_then(|f| f.tag()).unwrap_or(b"");
        let branch = req.top_via().ok().and_then(|v| v.branch()).unwrap_or(b"");
        let call_id = req.header(HeaderName::CallId).unwrap_or(b"");
        let h = self.tag_hasher.hash_one((call_id, from_tag, branch));
        format!("mr{h:016x}")
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
