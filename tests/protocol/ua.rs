//! A simulated SIP user agent for the harness: enough of a UAC and a UAS (RFC 3261 §8, §12,
//! §13, §17) to drive calls through the server and check what comes out, without a socket.
//! What it sends goes to its outbox, which the harness carries; what the harness delivers goes
//! through its transaction-layer rules, then waits in its inbox for the test.
//!
//! It is `tests/common/ua.rs` (the socket UA, whose dialog state and message builders it
//! shares) without the sockets and the waiting. It never retransmits on its own, but on the
//! receiving side:
//! - non-2xx final responses to an INVITE are ACKed automatically, every time one arrives
//!   (§17.1.1.3), and a retransmitted final response is absorbed;
//! - a retransmitted 2xx to an INVITE that was ACKed gets the same ACK again (§13.2.2.4);
//! - a retransmitted request is absorbed and answered with the last response sent for it
//!   (nothing is sent when it was not answered yet).
//!
//! Hops must be IP literals; every Route is treated as loose (`;lr`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;

use bytes::Bytes;

use moonroute::sip::{HeaderName, Message, Method, ResponseBuilder};

pub use super::common_ua::{derived_request, hop_addr, sdp, Dialog};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Record-Route values, one per entry, in message order.
pub fn record_routes(m: &Message) -> Vec<String> {
    m.values(HeaderName::RecordRoute)
        .map(|v| text(v.expect("Record-Route parses")))
        .collect()
}

/// The top Via branch and CSeq method: what identifies a transaction (§17.1.3, §17.2.3).
fn tx_key(m: &Message) -> (Vec<u8>, String) {
    let branch = m.top_via().ok().and_then(|v| v.branch()).unwrap_or(b"");
    let method = m.cseq().map(|c| c.method.as_str().to_string());
    (branch.to_vec(), method.unwrap_or_default())
}

/// Which 2xx an ACK answers: Call-ID, CSeq number, To tag.
type AckKey = (Vec<u8>, u32, Vec<u8>);

pub struct Ua {
    pub name: String,
    /// The address in our Via and Contact, and where the harness delivers to us.
    pub local: SocketAddr,
    /// Where out-of-dialog requests go; `None`: the host:port of the Request-URI.
    pub outbound: Option<SocketAddr>,
    /// Absorb retransmitted requests (answering with the last response sent). On by default.
    pub absorb_retransmissions: bool,
    /// The host of the From URI of out-of-dialog requests (`sip:name@domain`, the user's
    /// AOR); `None`: the agent's own address.
    pub from_domain: Option<String>,
    /// Counter for branches, tags and Call-IDs.
    next: u64,
    cseq: u32,
    outbox: Vec<(SocketAddr, Bytes)>,
    inbox: VecDeque<Message>,
    /// Requests we sent, by transaction, with where they went.
    sent: HashMap<(Vec<u8>, String), (Message, SocketAddr)>,
    /// Final responses seen, by transaction, status and To tag (two callees of a forked
    /// INVITE each send a 2xx: they are two answers, not a retransmission).
    finals_seen: HashSet<(Vec<u8>, String, u16, Vec<u8>)>,
    /// ACKs of 2xx responses, to repeat on a retransmitted 2xx.
    acks_sent: HashMap<AckKey, (Bytes, SocketAddr)>,
    /// Where each received request came from.
    sources: HashMap<(Vec<u8>, String), SocketAddr>,
    /// The last response to each received request, to repeat on a retransmission.
    answered: HashMap<(Vec<u8>, String), Bytes>,
    /// Our To tag per (Call-ID, From tag): stable for every response in a dialog.
    to_tags: HashMap<(Vec<u8>, Vec<u8>), String>,
}

impl Ua {
    pub fn new(name: &str, local: SocketAddr) -> Ua {
        Ua {
            name: name.to_owned(),
            local,
            outbound: None,
            absorb_retransmissions: true,
            from_domain: None,
            next: 0,
            cseq: 0,
            outbox: Vec::new(),
            inbox: VecDeque::new(),
            sent: HashMap::new(),
            finals_seen: HashSet::new(),
            acks_sent: HashMap::new(),
            sources: HashMap::new(),
            answered: HashMap::new(),
            to_tags: HashMap::new(),
        }
    }

    /// `sip:name@host:port`.
    pub fn uri(&self) -> String {
        format!("sip:{}@{}", self.name, self.local)
    }

    fn unique(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Sends raw bytes to `dest`.
    pub fn send_raw(&mut self, data: &[u8], dest: SocketAddr) {
        self.outbox.push((dest, Bytes::copy_from_slice(data)));
    }

    pub(super) fn take_outbox(&mut self) -> Vec<(SocketAddr, Bytes)> {
        std::mem::take(&mut self.outbox)
    }

    // ----- UAC ------------------------------------------------------------------------------

    /// An out-of-dialog request; add headers or a body, then `.send()` it.
    pub fn request(&mut self, method: &str, request_uri: &str) -> Outgoing<'_> {
        Outgoing {
            ua: self,
            method: method.to_string(),
            request_uri: request_uri.to_string(),
            headers: Vec::new(),
            body: None,
            dialog: None,
            dest: None,
            max_forwards: 70,
        }
    }

    /// An INVITE with an SDP offer, sent.
    pub fn invite(&mut self, request_uri: &str) -> Message {
        self.invite_to(request_uri).send()
    }

    /// An INVITE with an SDP offer, to finish and send.
    pub fn invite_to(&mut self, request_uri: &str) -> Outgoing<'_> {
        let offer = sdp(&self.name);
        self.request("INVITE", request_uri)
            .body("application/sdp", &offer)
    }

    /// A request inside `dialog` (CSeq + 1, Route set, remote target), sent to the first Route
    /// hop.
    pub fn in_dialog<'a>(&'a mut self, method: &str, dialog: &'a mut Dialog) -> Outgoing<'a> {
        dialog.local_cseq += 1;
        let uri = dialog.remote_target.clone();
        let mut out = self.request(method, &uri);
        out.dialog = Some(dialog.clone());
        out
    }

    /// BYE inside `dialog`.
    pub fn bye(&mut self, dialog: &mut Dialog) -> Message {
        self.in_dialog("BYE", dialog).send()
    }

    /// The ACK for a 2xx to our INVITE (§13.2.2.4): a transaction of its own with the INVITE's
    /// CSeq number, sent along the route set learnt from the response. Returns the dialog.
    pub fn ack_2xx(&mut self, response: &Message) -> Dialog {
        let status = response.status().expect("a response");
        assert!(
            (200..300).contains(&status),
            "ack_2xx wants a 2xx, got {status}"
        );
        let (invite, _) = self
            .sent
            .get(&tx_key(response))
            .expect("a response to our INVITE");
        let dialog = Dialog::from_uac(invite, response);
        let mut for_ack = dialog.clone();
        for_ack.local_cseq -= 1; // the ACK repeats the INVITE's number
        let ack = self.in_dialog("ACK", &mut for_ack).send();
        let key = (
            ack.call_id().unwrap().to_vec(),
            dialog.local_cseq,
            dialog.remote_tag.clone().into_bytes(),
        );
        self.acks_sent
            .insert(key, (ack.source_bytes().clone(), dialog.next_hop()));
        dialog
    }

    /// CANCEL of a pending request we sent (§9.1): same Request-URI, Call-ID, From, To, CSeq
    /// number, top Via and Route, sent where the request went.
    pub fn cancel(&mut self, request: &Message) -> Message {
        let (original, dest) = self
            .sent
            .get(&tx_key(request))
            .expect("cancel a request this UA sent");
        let dest = *dest;
        let cancel = derived_request(original, "CANCEL", original.header(HeaderName::To));
        self.send_request(cancel, dest)
    }

    /// The ACK of a non-2xx final response to INVITE (§17.1.1.3): same branch, Request-URI,
    /// Route; To from the response.
    fn ack_non_2xx(&mut self, response: &Message) {
        let Some((invite, dest)) = self.sent.get(&tx_key(response)) else {
            return; // not ours (a raw INVITE): nothing to ACK with
        };
        let ack = derived_request(invite, "ACK", response.header(HeaderName::To));
        let dest = *dest;
        self.send_raw(ack.as_bytes(), dest);
    }

    fn send_request(&mut self, request: String, dest: SocketAddr) -> Message {
        self.send_raw(request.as_bytes(), dest);
        let msg = Message::parse(Bytes::from(request)).expect("the UA's own request parses");
        self.sent.insert(tx_key(&msg), (msg.clone(), dest));
        msg
    }

    // ----- UAS ------------------------------------------------------------------------------

    /// Answers `request` (§8.2.6): a stable To tag per dialog, Record-Route copied into 1xx/2xx
    /// to INVITE (§12.1.1), Contact in those and in every 2xx, an SDP answer in a 2xx to
    /// INVITE. Sent where the request came from (§18.2.2). Returns the response sent.
    pub fn respond(&mut self, request: &Message, code: u16, reason: &str) -> Message {
        self.respond_with(request, code, reason, &[])
    }

    /// `respond` with extra header fields.
    pub fn respond_with(
        &mut self,
        request: &Message,
        code: u16,
        reason: &str,
        extra: &[(&str, &str)],
    ) -> Message {
        let key = tx_key(request);
        let source = *self
            .sources
            .get(&key)
            .expect("respond to a request this UA received");
        let is_invite = request.method() == Some(&Method::Invite);
        let dialog_key = (
            request.call_id().expect("Call-ID").to_vec(),
            request
                .from()
                .ok()
                .and_then(|f| f.tag())
                .unwrap_or(b"")
                .to_vec(),
        );
        let n = self.unique();
        let fresh = format!("{}-{n}", self.name);
        let tag = self.to_tags.entry(dialog_key).or_insert(fresh).clone();
        let contact = format!("<{}>", self.uri());
        let answer = sdp(&self.name);
        let record_routes: Vec<&[u8]> = request.headers_named("Record-Route").collect();
        let mut builder = ResponseBuilder::new(request, code, reason).to_tag(tag.as_bytes());
        if is_invite && (101..300).contains(&code) {
            for rr in &record_routes {
                builder = builder.header("Record-Route", rr);
            }
        }
        if (is_invite && (101..300).contains(&code)) || (200..300).contains(&code) {
            builder = builder.header("Contact", contact.as_bytes());
        }
        for (name, value) in extra {
            builder = builder.header(name, value.as_bytes());
        }
        if is_invite && (200..300).contains(&code) {
            builder = builder.body("application/sdp", answer.as_bytes());
        }
        let bytes = builder.build();
        let dest = request.top_via().expect("Via").response_addr(source, 5060);
        self.send_raw(&bytes, dest);
        self.answered.insert(key, bytes.clone());
        Message::parse(bytes).expect("the UA's own response parses")
    }

    // ----- receiving ------------------------------------------------------------------------

    /// What the harness delivers: through the transaction-layer rules into the inbox. Garbage
    /// is dropped, as a transport would.
    pub(super) fn receive(&mut self, data: Bytes, source: SocketAddr) {
        let Ok(message) = Message::parse(data) else {
            return;
        };
        if let Some(message) = self.transaction_layer(message, source) {
            self.inbox.push_back(message);
        }
    }

    pub(super) fn has_response(&self) -> bool {
        self.inbox.iter().any(Message::is_response)
    }

    pub(super) fn has_request(&self) -> bool {
        self.inbox.iter().any(Message::is_request)
    }

    pub(super) fn take_response(&mut self) -> Option<Message> {
        let i = self.inbox.iter().position(Message::is_response)?;
        self.inbox.remove(i)
    }

    pub(super) fn take_request(&mut self) -> Option<Message> {
        let i = self.inbox.iter().position(Message::is_request)?;
        self.inbox.remove(i)
    }

    pub(super) fn take_any(&mut self) -> Option<Message> {
        self.inbox.pop_front()
    }

    /// What a transaction layer does with an arriving message; `None` when it is absorbed.
    fn transaction_layer(&mut self, mut m: Message, source: SocketAddr) -> Option<Message> {
        let key = tx_key(&m);
        if m.is_request() {
            if self.absorb_retransmissions && self.sources.contains_key(&key) {
                if let Some(last) = self.answered.get(&key).cloned() {
                    let dest = m.top_via().ok()?.response_addr(source, 5060);
                    self.send_raw(&last, dest);
                }
                return None;
            }
            m.stamp_received(source).expect("Via is stampable"); // §18.2.1
            self.sources.insert(key, source);
            return Some(m);
        }
        let status = m.status()?;
        if status < 200 {
            return Some(m);
        }
        let is_invite = key.1 == "INVITE";
        if is_invite && status >= 300 {
            self.ack_non_2xx(&m);
        }
        let to_tag = m.to().ok().and_then(|to| to.tag()).unwrap_or(b"").to_vec();
        let new = self
            .finals_seen
            .insert((key.0, key.1, status, to_tag.clone()));
        if !new && is_invite && status < 300 {
            let ack_key = (m.call_id().ok()?.to_vec(), m.cseq().ok()?.seq, to_tag);
            if let Some((ack, dest)) = self.acks_sent.get(&ack_key).cloned() {
                self.send_raw(&ack, dest);
            }
        }
        new.then_some(m)
    }
}

/// A request being put together; `.send()` sends it and returns it as sent.
pub struct Outgoing<'u> {
    ua: &'u mut Ua,
    method: String,
    request_uri: String,
    headers: Vec<(String, String)>,
    body: Option<(String, String)>,
    dialog: Option<Dialog>,
    dest: Option<SocketAddr>,
    max_forwards: u32,
}

impl Outgoing<'_> {
    /// Max-Forwards of the request (70 unless set).
    pub fn max_forwards(mut self, value: u32) -> Self {
        self.max_forwards = value;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, content_type: &str, body: &str) -> Self {
        self.body = Some((content_type.to_string(), body.to_string()));
        self
    }

    /// Sends to `dest` instead of the outbound proxy / Route hop / Request-URI.
    pub fn to(mut self, dest: SocketAddr) -> Self {
        self.dest = Some(dest);
        self
    }

    pub fn send(self) -> Message {
        let ua = self.ua;
        let method = &self.method;
        let local = ua.local;
        let n = ua.unique();
        let (from, to, call_id, cseq, routes, hop) = match &self.dialog {
            Some(d) => (
                d.local.clone(),
                d.remote.clone(),
                d.call_id.clone(),
                d.local_cseq,
                d.route_set.clone(),
                d.next_hop(),
            ),
            None => {
                ua.cseq += 1;
                let hop = ua.outbound.unwrap_or_else(|| hop_addr(&self.request_uri));
                let from_host = ua.from_domain.clone().unwrap_or_else(|| local.to_string());
                (
                    format!("<sip:{}@{from_host}>;tag={}-{n}", ua.name, ua.name),
                    format!("<{}>", self.request_uri),
                    format!("{n}-{}-{}@{}", ua.name, local.port(), local.ip()),
                    ua.cseq,
                    Vec::new(),
                    hop,
                )
            }
        };
        let mut request = format!(
            "{method} {} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-{}-{}-{n};rport\r\n\
             Max-Forwards: {}\r\n",
            self.request_uri,
            ua.name,
            local.port(),
            self.max_forwards
        );
        for route in &routes {
            request += &format!("Route: {route}\r\n");
        }
        request += &format!(
            "From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n\
             Contact: <{}>\r\n",
            ua.uri()
        );
        for (name, value) in &self.headers {
            request += &format!("{name}: {value}\r\n");
        }
        let body = match &self.body {
            Some((content_type, body)) => {
                request += &format!("Content-Type: {content_type}\r\n");
                body.as_str()
            }
            None => "",
        };
        request += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
        ua.send_request(request, self.dest.unwrap_or(hop))
    }
}
