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
//! Hops must be IP literals; every Route is treated as loose (`;lr`). Over TCP
//! ([`Ua::stream`]) the harness carries what it sends on connections.

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::Bytes;

use moonroute::sip::Message;

pub use super::common_ua::{record_routes, sdp, Dialog};
use super::common_ua::{ArrivalRules, Outgoing, Responder, Sender, UaBook};

pub struct Ua {
    pub name: String,
    /// Where the harness delivers to us, and the address in our Via and Contact unless we are
    /// behind a NAT.
    pub local: SocketAddr,
    /// Behind a NAT: the private address we believe we have, in our Via, Contact and From
    /// (the server sees `local`).
    pub private: Option<SocketAddr>,
    /// Where out-of-dialog requests go; `None`: the host:port of the Request-URI.
    pub outbound: Option<SocketAddr>,
    /// Over TCP (the harness carries what it sends on connections): Via says `TCP`, the URI
    /// `;transport=tcp`, responses go back on the request's connection (§18.2.2).
    pub stream: bool,
    /// Absorb retransmitted requests (answering with the last response sent). On by default.
    pub absorb_retransmissions: bool,
    /// The host of the From URI of out-of-dialog requests (`sip:name@domain`, the user's
    /// AOR); `None`: the agent's own address.
    pub from_domain: Option<String>,
    /// Counter for branches, tags and Call-IDs.
    next: u64,
    outbox: Vec<(SocketAddr, Bytes)>,
    inbox: VecDeque<Message>,
    /// Its transactions and dialogs (the socket UA's bookkeeping).
    book: UaBook,
}

impl Ua {
    /// Agent number `index` of the harness: its tags, branches and Call-IDs are numbered
    /// apart from every other agent's, so two agents of one name (two phones of one user)
    /// never answer with the same To tag.
    pub fn new(name: &str, local: SocketAddr, index: usize) -> Ua {
        Ua {
            name: name.to_owned(),
            local,
            private: None,
            outbound: None,
            stream: false,
            absorb_retransmissions: true,
            from_domain: None,
            next: index as u64 * 1_000_000,
            outbox: Vec::new(),
            inbox: VecDeque::new(),
            book: UaBook::default(),
        }
    }

    /// `sip:name@host:port`, with `;transport=tcp` over TCP.
    pub fn uri(&self) -> String {
        let transport = if self.stream { ";transport=tcp" } else { "" };
        let addr = self.private.unwrap_or(self.local);
        format!("sip:{}@{addr}{transport}", self.name)
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
    pub fn request(&mut self, method: &str, request_uri: &str) -> Outgoing<'_, Ua> {
        Outgoing::new(self, method, request_uri)
    }

    /// An INVITE with an SDP offer, sent.
    pub fn invite(&mut self, request_uri: &str) -> Message {
        self.invite_to(request_uri).send()
    }

    /// An INVITE with an SDP offer, to finish and send.
    pub fn invite_to(&mut self, request_uri: &str) -> Outgoing<'_, Ua> {
        let offer = sdp(&self.name);
        self.request("INVITE", request_uri)
            .body("application/sdp", &offer)
    }

    /// A request inside `dialog` (CSeq + 1, Route set, remote target), sent to the first Route
    /// hop.
    pub fn in_dialog<'a>(&'a mut self, method: &str, dialog: &'a mut Dialog) -> Outgoing<'a, Ua> {
        Outgoing::in_dialog(self, method, dialog)
    }

    /// BYE inside `dialog`.
    pub fn bye(&mut self, dialog: &mut Dialog) -> Message {
        self.in_dialog("BYE", dialog).send()
    }

    /// The ACK for a 2xx to our INVITE (§13.2.2.4): a transaction of its own with the INVITE's
    /// CSeq number, sent along the route set learnt from the response. Returns the dialog.
    pub fn ack_2xx(&mut self, response: &Message) -> Dialog {
        let (dialog, mut for_ack) = self.book.dialog_of_2xx(response);
        let ack = self.in_dialog("ACK", &mut for_ack).send();
        self.book.record_ack(&ack, &dialog);
        dialog
    }

    /// CANCEL of a pending request we sent (§9.1): same Request-URI, Call-ID, From, To, CSeq
    /// number, top Via and Route, sent where the request went.
    pub fn cancel(&mut self, request: &Message) -> Message {
        let (cancel, dest) = self.book.cancel_of(request);
        self.send_request(cancel, dest)
    }

    fn send_request(&mut self, request: String, dest: SocketAddr) -> Message {
        self.send_raw(request.as_bytes(), dest);
        self.book.record_sent(request, dest)
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
        let n = self.unique();
        let contact = format!("<{}>", self.uri());
        let me = Responder {
            name: &self.name,
            contact: &contact,
            stream: self.stream,
        };
        let (bytes, dest) = self.book.response(&me, request, code, reason, extra, || n);
        self.send_raw(&bytes, dest);
        Message::parse(bytes).expect("the UA's own response parses")
    }

    // ----- receiving ------------------------------------------------------------------------

    /// What the harness delivers: through the transaction-layer rules into the inbox. Garbage
    /// is dropped, as a transport would.
    pub(super) fn receive(&mut self, data: Bytes, source: SocketAddr) {
        let Ok(message) = Message::parse(data) else {
            return;
        };
        let rules = ArrivalRules {
            stream: self.stream,
            absorb_retransmissions: self.absorb_retransmissions,
            auto_ack: true,
        };
        let arrival = self.book.arrive(message, source, rules);
        if let Some((data, dest)) = arrival.send {
            self.send_raw(&data, dest);
        }
        if let Some(message) = arrival.message {
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
}

impl Outgoing<'_, Ua> {
    pub fn send(self) -> Message {
        let Outgoing { ua, draft } = self;
        let n = ua.unique();
        let local = ua.private.unwrap_or(ua.local);
        let me = Sender {
            name: &ua.name,
            from_domain: ua.from_domain.as_deref(),
            local,
            outbound: ua.outbound,
            via: format!(
                "SIP/2.0/{} {local};branch=z9hG4bK-{}-{}-{n};rport",
                if ua.stream { "TCP" } else { "UDP" },
                ua.name,
                local.port()
            ),
            contact: format!("<{}>", ua.uri()),
        };
        let mut cseq = ua.book.cseq;
        let (request, dest) = draft.write(&me, &mut cseq, n);
        ua.book.cseq = cseq;
        ua.send_request(request, dest)
    }
}
