//! A SIP user agent on real loopback sockets, for integration tests: enough of a UAC and a UAS
//! (RFC 3261 §8, §12, §13, §17) to drive calls through the proxy and check what comes out.
//!
//! One `TestUa` is one user (`alice`, `bob`) on one transport (UDP, TCP, TLS with a rustls
//! configuration the test provides, or WebSocket / secure WebSocket as a browser stack speaks
//! it: RFC 7118, `.invalid` Via and Contact hosts, one SIP message per WebSocket message). It sends requests to its
//! outbound proxy when it has one (else to the host:port of the Request-URI), in-dialog requests
//! to the first Route hop. It never retransmits (tests run on loopback), but it behaves like a
//! transaction layer on the receiving side:
//! - non-2xx final responses to an INVITE are ACKed automatically, every time one arrives
//!   (§17.1.1.3), and a retransmitted final response is absorbed;
//! - a retransmitted 2xx to an INVITE that was ACKed gets the same ACK again (§13.2.2.4);
//! - a retransmitted request is absorbed and answered with the last response sent for it.
//!
//! Messages that arrive while the test waits for the other kind (a BYE while waiting for a
//! response) are kept in order for the next `recv_request` / `recv_response`. Every wait is
//! bounded by a timeout and panics with the UA's name when nothing comes.
//!
//! Out of scope: strict routing (every Route is treated as loose, `;lr`), DNS names (hops must
//! be IP literals), authentication, PRACK. A forked INVITE answered by several callees yields
//! one 2xx per To tag (RFC 6026), each ACKed into its own `Dialog` by `ack_2xx`.

#![allow(dead_code)] // each test binary uses a different part of the UA

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use moonroute::sip::{Contact, HeaderName, Message, Method, NameAddr, ResponseBuilder, Uri};

/// Default wait for `expect_response` / `expect_request`.
pub const WAIT: Duration = Duration::from_secs(5);

/// The body of INVITEs and of 2xx answers to them.
pub fn sdp(user: &str) -> String {
    format!(
        "v=0\r\no={user} 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio 49170 RTP/AVP 0\r\n"
    )
}

/// Process-wide counter for branches, tags and Call-IDs (tests run in parallel).
fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Where a SIP URI (or a name-addr holding one) points: its host must be an IP literal.
pub fn hop_addr(uri_or_name_addr: &str) -> SocketAddr {
    let bytes = uri_or_name_addr.as_bytes();
    let uri = match NameAddr::parse(bytes) {
        Ok(na) => na.uri,
        Err(_) => Uri::parse(bytes).unwrap_or_else(|e| panic!("bad URI {uri_or_name_addr}: {e}")),
    };
    let sip = uri
        .as_sip()
        .unwrap_or_else(|| panic!("not a SIP URI: {uri_or_name_addr}"));
    let ip = sip
        .host
        .ip()
        .unwrap_or_else(|| panic!("test hops must be IP literals: {uri_or_name_addr}"));
    SocketAddr::new(ip, sip.port.unwrap_or(5060))
}

/// The dialog state of §12: what a UA needs to send requests inside a call.
#[derive(Clone, Debug)]
pub struct Dialog {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
    /// From of requests we send (name-addr with our tag).
    pub local: String,
    /// To of requests we send (name-addr with the peer's tag).
    pub remote: String,
    /// Route header values in the order they are written (§12.1.1, §12.1.2).
    pub route_set: Vec<String>,
    /// The peer's Contact URI: Request-URI of in-dialog requests.
    pub remote_target: String,
    pub local_cseq: u32,
    pub remote_cseq: Option<u32>,
}

impl Dialog {
    /// The UAC's view after a dialog-creating response (§12.1.2): route set is the response's
    /// Record-Route reversed.
    pub fn from_uac(request: &Message, response: &Message) -> Dialog {
        let mut route_set = record_routes(response);
        route_set.reverse();
        let remote = text(response.header(HeaderName::To).expect("To"));
        Dialog {
            call_id: text(request.call_id().expect("Call-ID")),
            local_tag: text(request.from().expect("From").tag().expect("From tag")),
            remote_tag: text(
                response
                    .to()
                    .expect("To")
                    .tag()
                    .expect("To tag in the response"),
            ),
            local: text(request.header(HeaderName::From).expect("From")),
            remote,
            route_set,
            remote_target: contact_uri(response).expect("Contact in the response"),
            local_cseq: request.cseq().expect("CSeq").seq,
            remote_cseq: None,
        }
    }

    /// The UAS's view after answering (§12.1.1): route set is the request's Record-Route in
    /// order.
    pub fn from_uas(request: &Message, response: &Message) -> Dialog {
        Dialog {
            call_id: text(request.call_id().expect("Call-ID")),
            local_tag: text(
                response
                    .to()
                    .expect("To")
                    .tag()
                    .expect("To tag in the response"),
            ),
            remote_tag: text(request.from().expect("From").tag().expect("From tag")),
            local: text(response.header(HeaderName::To).expect("To")),
            remote: text(request.header(HeaderName::From).expect("From")),
            route_set: record_routes(request),
            remote_target: contact_uri(request).expect("Contact in the request"),
            local_cseq: 0,
            remote_cseq: Some(request.cseq().expect("CSeq").seq),
        }
    }

    /// Where in-dialog requests go: the first Route hop, else the remote target.
    pub fn next_hop(&self) -> SocketAddr {
        hop_addr(self.route_set.first().unwrap_or(&self.remote_target))
    }
}

/// Record-Route values, one per entry, in message order.
pub fn record_routes(m: &Message) -> Vec<String> {
    m.values(HeaderName::RecordRoute)
        .map(|v| text(v.expect("Record-Route parses")))
        .collect()
}

fn contact_uri(m: &Message) -> Option<String> {
    match m.contacts().next()?.ok()? {
        Contact::Addr(addr) => Some(text(addr.uri.raw())),
        Contact::Star => None,
    }
}

/// The top Via branch and CSeq method: what identifies a transaction (§17.1.3, §17.2.3).
fn tx_key(m: &Message) -> TxKey {
    let branch = m.top_via().ok().and_then(|v| v.branch()).unwrap_or(b"");
    let method = m.cseq().map(|c| c.method.as_str().to_string());
    (branch.to_vec(), method.unwrap_or_default())
}

/// Which 2xx an ACK answers: Call-ID, CSeq number, To tag.
type AckKey = (Vec<u8>, u32, Vec<u8>);

// ----- the sans-IO half, shared with the harness's simulated UA (tests/protocol/ua.rs) -------

/// A transaction: the top Via branch and the CSeq method (§17.1.3, §17.2.3).
type TxKey = (Vec<u8>, String);

/// What a test UA remembers of its transactions and dialogs, without I/O: the requests it
/// sent and where, the final responses it has seen, the ACKs of 2xx responses, where each
/// received request came from and how it was answered, its To tags. The socket [`TestUa`] and
/// the harness's simulated UA each keep one and only move the bytes it asks for.
#[derive(Default)]
pub struct UaBook {
    /// CSeq of the last out-of-dialog request.
    pub cseq: u32,
    /// Requests sent, by transaction, with where they went.
    sent: HashMap<TxKey, (Message, SocketAddr)>,
    /// Final responses seen, by transaction, status and To tag (two callees of a forked
    /// INVITE each send a 2xx: they are two answers, not a retransmission).
    finals_seen: HashSet<(Vec<u8>, String, u16, Vec<u8>)>,
    /// ACKs of 2xx responses, to repeat on a retransmitted 2xx.
    acks_sent: HashMap<AckKey, (Bytes, SocketAddr)>,
    /// Where each received request came from (connection or datagram source).
    sources: HashMap<TxKey, SocketAddr>,
    /// The last response to each received request, to repeat on a retransmission.
    answered: HashMap<TxKey, Bytes>,
    /// Our To tag per (Call-ID, From tag): stable for every response in a dialog.
    to_tags: HashMap<(Vec<u8>, Vec<u8>), String>,
}

/// How a UA's transaction layer treats what arrives.
#[derive(Clone, Copy)]
pub struct ArrivalRules {
    /// Responses go back on the connection (TCP, TLS, WebSocket), not to the Via (§18.2.2).
    pub stream: bool,
    /// Absorb a retransmitted request, answering it with the last response sent.
    pub absorb_retransmissions: bool,
    /// ACK non-2xx final responses to INVITE as they arrive.
    pub auto_ack: bool,
}

/// A message after the transaction-layer rules: for the test unless absorbed, and what to send
/// in answer (a repeated response or ACK).
pub struct Arrival {
    pub message: Option<Message>,
    pub send: Option<(Bytes, SocketAddr)>,
}

/// The UA as a response names it.
pub struct Responder<'a> {
    pub name: &'a str,
    /// The Contact header value (`<uri>`).
    pub contact: &'a str,
    /// See [`ArrivalRules::stream`].
    pub stream: bool,
}

/// The UA as a request names it.
pub struct Sender<'a> {
    pub name: &'a str,
    /// See [`TestUa::from_domain`].
    pub from_domain: Option<&'a str>,
    pub local: SocketAddr,
    /// Where out-of-dialog requests go; `None`: the host:port of the Request-URI.
    pub outbound: Option<SocketAddr>,
    /// The whole Via value, with a new branch.
    pub via: String,
    /// The Contact header value (`<uri>`).
    pub contact: String,
}

impl UaBook {
    /// Keeps a request as sent to `dest` (to build its ACK or CANCEL) and returns it parsed.
    pub fn record_sent(&mut self, request: String, dest: SocketAddr) -> Message {
        let msg = Message::parse(Bytes::from(request)).expect("the UA's own request parses");
        self.sent.insert(tx_key(&msg), (msg.clone(), dest));
        msg
    }

    /// The dialog a 2xx to our INVITE creates (§12.1.2), and the one its ACK is sent in: a
    /// transaction of its own with the INVITE's CSeq number (§13.2.2.4).
    pub fn dialog_of_2xx(&self, response: &Message) -> (Dialog, Dialog) {
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
        (dialog, for_ack)
    }

    /// Keeps the ACK of a 2xx in `dialog`, to repeat when the 2xx is (§13.2.2.4).
    pub fn record_ack(&mut self, ack: &Message, dialog: &Dialog) {
        let key = (
            ack.call_id().unwrap().to_vec(),
            dialog.local_cseq,
            dialog.remote_tag.clone().into_bytes(),
        );
        self.acks_sent
            .insert(key, (ack.source_bytes().clone(), dialog.next_hop()));
    }

    /// CANCEL of a pending request we sent (§9.1): same Request-URI, Call-ID, From, To, CSeq
    /// number, top Via and Route, and where it goes (where the request went).
    pub fn cancel_of(&self, request: &Message) -> (String, SocketAddr) {
        let (original, dest) = self
            .sent
            .get(&tx_key(request))
            .expect("cancel a request this UA sent");
        let cancel = derived_request(original, "CANCEL", original.header(HeaderName::To));
        (cancel, *dest)
    }

    /// The ACK of a non-2xx final response to INVITE (§17.1.1.3): same branch, Request-URI,
    /// Route; To from the response. `None` for a response to a request we did not build.
    fn ack_non_2xx(&self, response: &Message) -> Option<(Bytes, SocketAddr)> {
        let (invite, dest) = self.sent.get(&tx_key(response))?;
        let ack = derived_request(invite, "ACK", response.header(HeaderName::To));
        Some((Bytes::from(ack), *dest))
    }

    /// Answers `request` (§8.2.6): a stable To tag per dialog (`fresh` numbers a new one),
    /// Record-Route copied into 1xx/2xx to INVITE (§12.1.1), Contact in those and in every
    /// 2xx, an SDP answer in a 2xx to INVITE. Returns the response and where it goes: where
    /// the request came from (§18.2.2).
    pub fn response(
        &mut self,
        me: &Responder<'_>,
        request: &Message,
        code: u16,
        reason: &str,
        extra: &[(&str, &str)],
        fresh: impl FnOnce() -> u64,
    ) -> (Bytes, SocketAddr) {
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
        let tag = self
            .to_tags
            .entry(dialog_key)
            .or_insert_with(|| format!("{}-{}", me.name, fresh()))
            .clone();
        let answer = sdp(me.name);
        let mut builder = ResponseBuilder::new(request, code, reason).to_tag(tag.as_bytes());
        if is_invite && (101..300).contains(&code) {
            for rr in request.headers_named("Record-Route") {
                builder = builder.header("Record-Route", rr);
            }
        }
        if (is_invite && (101..300).contains(&code)) || (200..300).contains(&code) {
            builder = builder.header("Contact", me.contact.as_bytes());
        }
        for (name, value) in extra {
            builder = builder.header(name, value.as_bytes());
        }
        if is_invite && (200..300).contains(&code) {
            builder = builder.body("application/sdp", answer.as_bytes());
        }
        let bytes = builder.build();
        let dest = if me.stream {
            source
        } else {
            request.top_via().expect("Via").response_addr(source, 5060)
        };
        self.answered.insert(key, bytes.clone());
        (bytes, dest)
    }

    /// What a transaction layer does with a message arriving from `source`.
    pub fn arrive(&mut self, mut m: Message, source: SocketAddr, rules: ArrivalRules) -> Arrival {
        let absorbed = |send| Arrival {
            message: None,
            send,
        };
        let key = tx_key(&m);
        if m.is_request() {
            if rules.absorb_retransmissions && self.sources.contains_key(&key) {
                let dest = if rules.stream {
                    Some(source)
                } else {
                    m.top_via().ok().map(|via| via.response_addr(source, 5060))
                };
                let last = self.answered.get(&key).cloned();
                return absorbed(last.zip(dest));
            }
            m.stamp_received(source).expect("Via is stampable"); // §18.2.1
            self.sources.insert(key, source);
            return Arrival {
                message: Some(m),
                send: None,
            };
        }
        let status = m.status().expect("a response");
        if status < 200 {
            return Arrival {
                message: Some(m),
                send: None,
            };
        }
        let is_invite = key.1 == "INVITE";
        let mut send = None;
        if is_invite && status >= 300 && rules.auto_ack {
            send = self.ack_non_2xx(&m);
        }
        let to_tag = m.to().ok().and_then(|to| to.tag()).unwrap_or(b"").to_vec();
        let new = self
            .finals_seen
            .insert((key.0, key.1, status, to_tag.clone()));
        if !new && is_invite && status < 300 {
            let call_id = m.call_id().map(<[u8]>::to_vec);
            let seq = m.cseq().map(|c| c.seq);
            if let (Ok(call_id), Ok(seq)) = (call_id, seq) {
                send = self.acks_sent.get(&(call_id, seq, to_tag)).cloned();
            }
        }
        Arrival {
            message: new.then_some(m),
            send,
        }
    }
}

/// A request a test UA sends, before its text is written (§8.1.1).
pub struct Draft {
    method: String,
    request_uri: String,
    headers: Vec<(String, String)>,
    body: Option<(String, String)>,
    dialog: Option<Dialog>,
    /// The request this one repeats (with credentials, or a REGISTER refresh).
    retry: Option<Message>,
    dest: Option<SocketAddr>,
    max_forwards: u32,
}

impl Draft {
    /// The request's text and where it goes: in a dialog, its From, To, Call-ID, CSeq, route
    /// set and next hop (§12.2.1.1); else a new From tag and Call-ID numbered `n` and the next
    /// `cseq`; a retry repeats its predecessor's with CSeq + 1.
    pub fn write(&self, me: &Sender<'_>, cseq: &mut u32, n: u64) -> (String, SocketAddr) {
        let method = &self.method;
        let local = me.local;
        let (from, to, call_id, seq, routes, hop) = match &self.dialog {
            Some(d) => (
                d.local.clone(),
                d.remote.clone(),
                d.call_id.clone(),
                d.local_cseq,
                d.route_set.clone(),
                d.next_hop(),
            ),
            None => {
                *cseq += 1;
                let hop = me.outbound.unwrap_or_else(|| hop_addr(&self.request_uri));
                let from_host = me
                    .from_domain
                    .map_or_else(|| local.to_string(), str::to_owned);
                (
                    format!("<sip:{}@{from_host}>;tag={}-{n}", me.name, me.name),
                    format!("<{}>", self.request_uri),
                    format!("{n}-{}-{}@{}", me.name, local.port(), local.ip()),
                    *cseq,
                    Vec::new(),
                    hop,
                )
            }
        };
        let (from, to, call_id, seq) = match &self.retry {
            Some(previous) => (
                text(previous.header(HeaderName::From).expect("From")),
                text(previous.header(HeaderName::To).expect("To")),
                text(previous.call_id().expect("Call-ID")),
                previous.cseq().expect("CSeq").seq + 1,
            ),
            None => (from, to, call_id, seq),
        };
        let mut request = format!(
            "{method} {} SIP/2.0\r\nVia: {}\r\nMax-Forwards: {}\r\n",
            self.request_uri, me.via, self.max_forwards
        );
        for route in &routes {
            request += &format!("Route: {route}\r\n");
        }
        request += &format!(
            "From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {seq} {method}\r\n\
             Contact: {}\r\n",
            me.contact
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
        (request, self.dest.unwrap_or(hop))
    }
}

/// A request being put together by UA `U`; sending it returns it as sent (`.await` it for
/// the socket UA).
pub struct Outgoing<'u, U = TestUa> {
    pub ua: &'u mut U,
    pub draft: Draft,
}

impl<'u, U> Outgoing<'u, U> {
    /// An out-of-dialog request.
    pub fn new(ua: &'u mut U, method: &str, request_uri: &str) -> Self {
        let draft = Draft {
            method: method.to_string(),
            request_uri: request_uri.to_string(),
            headers: Vec::new(),
            body: None,
            dialog: None,
            retry: None,
            dest: None,
            max_forwards: 70,
        };
        Outgoing { ua, draft }
    }

    /// A request inside `dialog` (CSeq + 1, Route set, remote target), sent to the first Route
    /// hop. Takes the dialog by `&mut` to advance its CSeq.
    pub fn in_dialog(ua: &'u mut U, method: &str, dialog: &mut Dialog) -> Self {
        dialog.local_cseq += 1;
        let mut out = Outgoing::new(ua, method, &dialog.remote_target);
        out.draft.dialog = Some(dialog.clone());
        out
    }

    /// Max-Forwards of the request (70 unless set).
    pub fn max_forwards(mut self, value: u32) -> Self {
        self.draft.max_forwards = value;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.draft
            .headers
            .push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, content_type: &str, body: &str) -> Self {
        self.draft.body = Some((content_type.to_string(), body.to_string()));
        self
    }

    pub fn no_body(mut self) -> Self {
        self.draft.body = None;
        self
    }

    /// The request again after a 401/407 (RFC 3261 §8.1.3.5, §22.2), or a REGISTER refresh
    /// (§10.2.4): the Call-ID, From (with its tag) and To of `previous`, its CSeq plus one,
    /// a new branch.
    pub fn retry_of(mut self, previous: &Message) -> Self {
        self.draft.retry = Some(previous.clone());
        self
    }

    /// Sends to `dest` instead of the outbound proxy / Route hop / Request-URI.
    pub fn to(mut self, dest: SocketAddr) -> Self {
        self.draft.dest = Some(dest);
        self
    }
}

/// The sending half of a stream connection (TCP, or TLS over TCP).
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

enum Inbound {
    /// A stream connection (accepted or opened), keyed by the peer address.
    Connected(SocketAddr, Writer),
    Message(Message, SocketAddr),
}

enum Net {
    Udp(Arc<UdpSocket>),
    /// Stream connections by peer address.
    Tcp(HashMap<SocketAddr, Writer>),
}

/// A TCP connection to `server` from `source` (any port), within [`WAIT`].
pub async fn connect_from(source: std::net::IpAddr, server: SocketAddr) -> TcpStream {
    let socket = match source {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .expect("a TCP socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .unwrap_or_else(|error| panic!("bind {source}: {error}"));
    tokio::time::timeout(WAIT, socket.connect(server))
        .await
        .expect("connected in time")
        .expect("connected")
}

/// Reads `stream` until the peer closes it (or resets it); panics if it stays open for
/// `within`. Returns what was read.
pub async fn read_until_closed(stream: &mut (impl AsyncRead + Unpin), within: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept the connection open");
    seen
}

/// Watches connections whose fate the test knows only in number (say, one of several
/// accepted by different event loops is refused, whichever came last): reports the index of
/// each as the peer closes it. Each stays open, read and discarded, until then (or until the
/// test ends).
pub fn watch_closes(streams: Vec<TcpStream>) -> mpsc::UnboundedReceiver<usize> {
    let (closed, closes) = mpsc::unbounded_channel();
    for (index, mut stream) in streams.into_iter().enumerate() {
        let closed = closed.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(1..) = stream.read(&mut buf).await {}
            let _ = closed.send(index);
        });
    }
    closes
}

/// The next index from [`watch_closes`]; panics if no connection closes within `within`.
pub async fn next_close(closes: &mut mpsc::UnboundedReceiver<usize>, within: Duration) -> usize {
    tokio::time::timeout(within, closes.recv())
        .await
        .expect("a connection closed in time")
        .expect("still watching")
}

pub struct TestUa {
    pub name: String,
    /// The address in our Via and Contact: the UDP socket, TCP listener or connection.
    pub local: SocketAddr,
    /// Where out-of-dialog requests go; `None`: the host:port of the Request-URI.
    pub outbound: Option<SocketAddr>,
    /// Absorb retransmitted requests (answering with the last response sent). On by default.
    pub absorb_retransmissions: bool,
    /// ACK non-2xx final responses to INVITE as they arrive. On by default.
    pub auto_ack: bool,
    /// The host of the From URI of out-of-dialog requests (`sip:name@domain`, the user's AOR,
    /// which digest authentication checks); `None`: the UA's own address.
    pub from_domain: Option<String>,
    net: Net,
    /// The stream connections are TLS: Via says `TLS`, the URI `;transport=tls`. A TLS UA only
    /// sends on connections it already has (it cannot open new ones).
    tls: bool,
    /// A WebSocket client (RFC 7118 §5): the `.invalid` host its Via and Contact carry.
    /// Like a TLS UA it only sends on the connection it has.
    websocket: Option<String>,
    inbound_tx: mpsc::UnboundedSender<Inbound>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    pending: VecDeque<Message>,
    /// Its transactions and dialogs, shared with the harness's simulated UA.
    book: UaBook,
}

impl TestUa {
    /// A UA on a UDP socket bound to 127.0.0.1:0, without an outbound proxy.
    pub async fn udp(name: &str) -> TestUa {
        TestUa::udp_on(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// A UA on a UDP socket bound to `bind` (e.g. `[::1]:0` for IPv6), without an outbound
    /// proxy. Its Via, Contact and URI carry the bound address (`[::1]:port` for IPv6).
    pub async fn udp_on(name: &str, bind: SocketAddr) -> TestUa {
        let socket = Arc::new(UdpSocket::bind(bind).await.expect("bind UDP"));
        let local = socket.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = (socket.clone(), tx.clone());
        tokio::spawn(async move {
            let (socket, tx) = reader;
            let mut buf = vec![0u8; 65535];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                // Garbage is dropped, as a transport would (§18.3 / §16.3 leave it unanswered).
                if let Ok(m) = Message::parse(Bytes::copy_from_slice(&buf[..n])) {
                    if tx.send(Inbound::Message(m, from)).is_err() {
                        return;
                    }
                }
            }
        });
        TestUa::with_net(name, local, Net::Udp(socket), tx, rx)
    }

    /// A UA with one TCP connection to `proxy`, which is also its outbound proxy. Its Via and
    /// Contact carry the connection's local address, so requests can reach it over the same
    /// connection.
    pub async fn tcp(name: &str, proxy: SocketAddr) -> TestUa {
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = TcpStream::connect(proxy).await.expect("connect TCP");
        let local = stream.local_addr().unwrap();
        let mut ua = TestUa::with_net(name, local, Net::Tcp(HashMap::new()), tx, rx);
        ua.adopt(stream, proxy);
        ua.outbound = Some(proxy);
        ua
    }

    /// [`TestUa::tcp`] from the local address `source` (e.g. 127.0.0.2, another client host).
    pub async fn tcp_from(name: &str, source: std::net::IpAddr, proxy: SocketAddr) -> TestUa {
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = connect_from(source, proxy).await;
        let local = stream.local_addr().unwrap();
        let mut ua = TestUa::with_net(name, local, Net::Tcp(HashMap::new()), tx, rx);
        ua.adopt(stream, proxy);
        ua.outbound = Some(proxy);
        ua
    }

    /// A UA with one TLS connection to `proxy` (its outbound proxy), the server's certificate
    /// checked by `connector` for `server_name`. Like [`TestUa::tcp`] otherwise.
    pub async fn tls(
        name: &str,
        proxy: SocketAddr,
        connector: tokio_rustls::TlsConnector,
        server_name: &str,
    ) -> TestUa {
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = TcpStream::connect(proxy).await.expect("connect TCP");
        let local = stream.local_addr().unwrap();
        let stream = tls_connect(&connector, server_name, stream).await;
        let mut ua = TestUa::with_net(name, local, Net::Tcp(HashMap::new()), tx, rx);
        ua.tls = true;
        ua.adopt(stream, proxy);
        ua.outbound = Some(proxy);
        ua
    }

    /// A WebSocket client of `proxy` (its outbound proxy), as a browser stack is (RFC 7118):
    /// the HTTP Upgrade offers the `sip` subprotocol (and `origin`, when given, as a browser
    /// page's would), then over `tls` (a connector and the server name) for secure WebSocket.
    /// Its Via and Contact host is a random `.invalid` name. Panics if the Upgrade is refused.
    pub async fn websocket(
        name: &str,
        proxy: SocketAddr,
        tls: Option<(tokio_rustls::TlsConnector, &str)>,
        origin: Option<&str>,
    ) -> TestUa {
        let stream = TcpStream::connect(proxy).await.expect("connect TCP");
        let local = stream.local_addr().unwrap();
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let request = websocket_request(&format!("{scheme}://{proxy}/"), Some("sip"), origin);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut ua = TestUa::with_net(name, local, Net::Tcp(HashMap::new()), tx, rx);
        let bridge = match tls {
            Some((connector, server_name)) => {
                let stream = tls_connect(&connector, server_name, stream).await;
                ua.tls = true;
                websocket_bridge(request, stream).await
            }
            None => websocket_bridge(request, stream).await,
        };
        ua.websocket = Some(format!("{name}{}.invalid", unique()));
        ua.adopt(bridge, proxy);
        ua.outbound = Some(proxy);
        ua
    }

    /// A UA accepting TLS connections on 127.0.0.1:0 with `acceptor` (a callee). It answers on
    /// the connections requests come in on and never opens connections of its own.
    pub async fn tls_listener(name: &str, acceptor: tokio_rustls::TlsAcceptor) -> TestUa {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind TCP");
        let local = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let accept_tx = tx.clone();
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let (acceptor, accept_tx) = (acceptor.clone(), accept_tx.clone());
                tokio::spawn(async move {
                    // A failed handshake (a client that refuses our certificate) is no message.
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let (read, write) = tokio::io::split(stream);
                    if accept_tx
                        .send(Inbound::Connected(peer, Box::new(write)))
                        .is_ok()
                    {
                        read_stream(read, peer, accept_tx).await;
                    }
                });
            }
        });
        let mut ua = TestUa::with_net(name, local, Net::Tcp(HashMap::new()), tx, rx);
        ua.tls = true;
        ua
    }

    /// A UA listening for TCP connections on 127.0.0.1:0 (a callee); it opens connections of
    /// its own for the requests it sends.
    pub async fn tcp_listener(name: &str) -> TestUa {
        TestUa::tcp_listener_on(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// [`TestUa::tcp_listener`] on `bind` (e.g. `[::1]:0` for IPv6).
    pub async fn tcp_listener_on(name: &str, bind: SocketAddr) -> TestUa {
        let listener = TcpListener::bind(bind).await.expect("bind TCP");
        let local = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let accept_tx = tx.clone();
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let (read, write) = stream.into_split();
                if accept_tx
                    .send(Inbound::Connected(peer, Box::new(write)))
                    .is_err()
                {
                    return;
                }
                tokio::spawn(read_stream(read, peer, accept_tx.clone()));
            }
        });
        TestUa::with_net(name, local, Net::Tcp(HashMap::new()), tx, rx)
    }

    fn with_net(
        name: &str,
        local: SocketAddr,
        net: Net,
        inbound_tx: mpsc::UnboundedSender<Inbound>,
        inbound: mpsc::UnboundedReceiver<Inbound>,
    ) -> TestUa {
        TestUa {
            name: name.to_string(),
            local,
            outbound: None,
            absorb_retransmissions: true,
            auto_ack: true,
            from_domain: None,
            net,
            tls: false,
            websocket: None,
            inbound_tx,
            inbound,
            pending: VecDeque::new(),
            book: UaBook::default(),
        }
    }

    /// Sets the outbound proxy (builder style).
    pub fn via_proxy(mut self, proxy: SocketAddr) -> TestUa {
        self.outbound = Some(proxy);
        self
    }

    fn adopt<S>(&mut self, stream: S, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        tokio::spawn(read_stream(read, peer, self.inbound_tx.clone()));
        if let Net::Tcp(conns) = &mut self.net {
            conns.insert(peer, Box::new(write));
        }
    }

    fn transport(&self) -> &'static str {
        match self.net {
            Net::Tcp(_) if self.websocket.is_some() && self.tls => "WSS",
            Net::Tcp(_) if self.websocket.is_some() => "WS",
            Net::Udp(_) => "UDP",
            Net::Tcp(_) if self.tls => "TLS",
            Net::Tcp(_) => "TCP",
        }
    }

    /// `sip:name@host:port`, with `;transport=tcp` over TCP and `;transport=tls` over TLS.
    pub fn uri(&self) -> String {
        if let Some(host) = &self.websocket {
            return format!("sip:{}@{host};transport=ws", self.name);
        }
        let tp = match self.net {
            Net::Udp(_) => "",
            Net::Tcp(_) if self.tls => ";transport=tls",
            Net::Tcp(_) => ";transport=tcp",
        };
        format!("sip:{}@{}{tp}", self.name, self.local)
    }

    /// The Via sent-by: the local address, or a WebSocket client's `.invalid` host.
    fn sent_by(&self) -> String {
        match &self.websocket {
            Some(host) => host.clone(),
            None => self.local.to_string(),
        }
    }

    fn contact(&self) -> String {
        format!("<{}>", self.uri())
    }

    fn new_branch(&self) -> String {
        format!("z9hG4bK-{}-{}-{}", self.name, self.local.port(), unique())
    }

    /// Sends raw bytes to `dest` (over TCP: the connection to it, opened when needed).
    pub async fn send_raw(&mut self, data: &[u8], dest: SocketAddr) {
        match &mut self.net {
            Net::Udp(socket) => {
                socket.send_to(data, dest).await.expect("UDP send");
            }
            Net::Tcp(conns) => {
                if !conns.contains_key(&dest) {
                    assert!(!self.tls, "{}: no TLS connection to {dest}", self.name);
                    let stream = TcpStream::connect(dest).await.expect("connect TCP");
                    self.adopt(stream, dest);
                }
                let Net::Tcp(conns) = &mut self.net else {
                    unreachable!()
                };
                let conn = conns.get_mut(&dest).expect("connection");
                conn.write_all(data).await.expect("TCP send");
                conn.flush().await.expect("TCP flush");
            }
        }
    }

    // ----- UAC ------------------------------------------------------------------------------

    /// An out-of-dialog request; add headers or a body, then `.await` it (or `.send().await`).
    pub fn request(&mut self, method: &str, request_uri: &str) -> Outgoing<'_> {
        Outgoing::new(self, method, request_uri)
    }

    /// An INVITE with an SDP offer.
    pub fn invite(&mut self, request_uri: &str) -> Outgoing<'_> {
        let offer = sdp(&self.name);
        self.request("INVITE", request_uri)
            .body("application/sdp", &offer)
    }

    pub fn options(&mut self, request_uri: &str) -> Outgoing<'_> {
        self.request("OPTIONS", request_uri)
    }

    /// A request inside `dialog` (CSeq + 1, Route set, remote target), sent to the first Route
    /// hop. Takes the dialog by `&mut` to advance its CSeq.
    pub fn in_dialog<'a>(&'a mut self, method: &str, dialog: &'a mut Dialog) -> Outgoing<'a> {
        Outgoing::in_dialog(self, method, dialog)
    }

    /// BYE inside `dialog`.
    pub async fn bye(&mut self, dialog: &mut Dialog) -> Message {
        self.in_dialog("BYE", dialog).send().await
    }

    /// The ACK for a 2xx to our INVITE (§13.2.2.4): a transaction of its own with the INVITE's
    /// CSeq number, sent along the route set learnt from the response. Returns the dialog.
    pub async fn ack_2xx(&mut self, response: &Message) -> Dialog {
        let (dialog, mut for_ack) = self.book.dialog_of_2xx(response);
        let ack = self.in_dialog("ACK", &mut for_ack).send().await;
        self.book.record_ack(&ack, &dialog);
        dialog
    }

    /// CANCEL of a pending request we sent (§9.1): same Request-URI, Call-ID, From, To, CSeq
    /// number, top Via and Route, sent where the request went.
    pub async fn cancel(&mut self, request: &Message) -> Message {
        let (cancel, dest) = self.book.cancel_of(request);
        self.send_request(cancel, dest).await
    }

    async fn send_request(&mut self, request: String, dest: SocketAddr) -> Message {
        self.send_raw(request.as_bytes(), dest).await;
        self.book.record_sent(request, dest)
    }

    /// The next response (a request arriving meanwhile is kept for `recv_request`). Final
    /// responses seen before are absorbed.
    pub async fn recv_response(&mut self, timeout: Duration) -> Message {
        if let Some(i) = self.pending.iter().position(|m| m.is_response()) {
            return self.pending.remove(i).unwrap();
        }
        self.recv_until(timeout, Message::is_response).await
    }

    /// The next response, which must have status `code`.
    pub async fn expect_response(&mut self, code: u16) -> Message {
        let response = self.recv_response(WAIT).await;
        expect_status(&response, code);
        response
    }

    /// Responses until the final one (skipping provisionals), which must have status `code`.
    pub async fn expect_final(&mut self, code: u16) -> Message {
        loop {
            let response = self.recv_response(WAIT).await;
            if response.status().unwrap() >= 200 {
                expect_status(&response, code);
                return response;
            }
        }
    }

    // ----- UAS ------------------------------------------------------------------------------

    /// The next request (a response arriving meanwhile is kept for `recv_response`).
    pub async fn recv_request(&mut self, timeout: Duration) -> Message {
        if let Some(i) = self.pending.iter().position(|m| m.is_request()) {
            return self.pending.remove(i).unwrap();
        }
        self.recv_until(timeout, Message::is_request).await
    }

    /// The next request, which must be a `method`.
    pub async fn expect_request(&mut self, method: &str) -> Message {
        let request = self.recv_request(WAIT).await;
        let got = request.method().unwrap().as_str();
        assert_eq!(
            got,
            method,
            "{}: expected a {method}, got\n{}",
            self.name,
            show(&request)
        );
        request
    }

    /// Answers `request` (§8.2.6): a stable To tag per dialog, Record-Route copied into 1xx/2xx
    /// to INVITE (§12.1.1), Contact in those and in every 2xx, an SDP answer in a 2xx to
    /// INVITE. Sent where the request came from (§18.2.2). Returns the response sent.
    pub async fn respond(&mut self, request: &Message, code: u16, reason: &str) -> Message {
        self.respond_with(request, code, reason, &[]).await
    }

    /// `respond` with extra header fields.
    pub async fn respond_with(
        &mut self,
        request: &Message,
        code: u16,
        reason: &str,
        extra: &[(&str, &str)],
    ) -> Message {
        let stream = matches!(self.net, Net::Tcp(_));
        let me = Responder {
            name: &self.name,
            contact: &self.contact(),
            stream,
        };
        let (bytes, dest) = self
            .book
            .response(&me, request, code, reason, extra, unique);
        self.send_raw(&bytes, dest).await;
        Message::parse(bytes).expect("the UA's own response parses")
    }

    // ----- receiving ------------------------------------------------------------------------

    /// Reads until a message `wanted` accepts arrives; others are queued.
    async fn recv_until(&mut self, timeout: Duration, wanted: fn(&Message) -> bool) -> Message {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.inbound.recv()).await;
            let inbound = next
                .unwrap_or_else(|_| panic!("{}: nothing arrived within {timeout:?}", self.name))
                .expect("the UA's readers live as long as the UA");
            let (message, source) = match inbound {
                Inbound::Connected(peer, write) => {
                    if let Net::Tcp(conns) = &mut self.net {
                        conns.insert(peer, write);
                    }
                    continue;
                }
                Inbound::Message(m, source) => (m, source),
            };
            let Some(message) = self.transaction_layer(message, source).await else {
                continue;
            };
            if wanted(&message) {
                return message;
            }
            self.pending.push_back(message);
        }
    }

    /// What a transaction layer does with an arriving message; `None` when it is absorbed.
    async fn transaction_layer(&mut self, m: Message, source: SocketAddr) -> Option<Message> {
        let rules = ArrivalRules {
            stream: matches!(self.net, Net::Tcp(_)),
            absorb_retransmissions: self.absorb_retransmissions,
            auto_ack: self.auto_ack,
        };
        let arrival = self.book.arrive(m, source, rules);
        if let Some((data, dest)) = arrival.send {
            self.send_raw(&data, dest).await;
        }
        arrival.message
    }
}

/// An ACK or CANCEL built from the request it refers to (§9.1, §17.1.1.3).
pub fn derived_request(original: &Message, method: &str, to: Option<&[u8]>) -> String {
    let header = |name| text(original.header(name).unwrap_or(b""));
    let top_via = original.values(HeaderName::Via).next().unwrap().unwrap();
    let mut out = format!(
        "{method} {} SIP/2.0\r\nVia: {}\r\nMax-Forwards: 70\r\n",
        text(original.request_uri_bytes().unwrap()),
        text(top_via)
    );
    for route in original.headers_named("Route") {
        out += &format!("Route: {}\r\n", text(route));
    }
    out += &format!(
        "From: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} {method}\r\nContent-Length: 0\r\n\r\n",
        header(HeaderName::From),
        text(to.unwrap_or(b"")),
        header(HeaderName::CallId),
        original.cseq().unwrap().seq
    );
    out
}

impl Outgoing<'_, TestUa> {
    pub async fn send(self) -> Message {
        let Outgoing { ua, draft } = self;
        let via = format!(
            "SIP/2.0/{} {};branch={};rport",
            ua.transport(),
            ua.sent_by(),
            ua.new_branch()
        );
        let me = Sender {
            name: &ua.name,
            from_domain: ua.from_domain.as_deref(),
            local: ua.local,
            outbound: ua.outbound,
            via,
            contact: ua.contact(),
        };
        let (request, dest) = draft.write(&me, &mut ua.book.cseq, unique());
        ua.send_request(request, dest).await
    }
}

impl<'u> IntoFuture for Outgoing<'u> {
    type Output = Message;
    type IntoFuture = Pin<Box<dyn Future<Output = Message> + Send + 'u>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// The TLS client side of `stream`, the server's certificate checked for `server_name`.
async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    server_name: &str,
    stream: TcpStream,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let server_name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .expect("a valid server name");
    connector
        .connect(server_name, stream)
        .await
        .expect("TLS handshake with the proxy")
}

/// The HTTP Upgrade request of a WebSocket client to `url`, offering `protocol` and sending
/// `origin` when given.
pub fn websocket_request(
    url: &str,
    protocol: Option<&str>,
    origin: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("a WebSocket URL");
    let headers = request.headers_mut();
    if let Some(protocol) = protocol {
        headers.insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    }
    if let Some(origin) = origin {
        headers.insert("Origin", origin.parse().unwrap());
    }
    request
}

/// Opens a WebSocket over `stream` with `request`, and returns a byte stream the UA reads and
/// writes as if it were a TCP connection: each SIP message written to it goes out as one text
/// message, each message received is written into it (RFC 7118 §5).
async fn websocket_bridge<S>(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
    stream: S,
) -> tokio::io::DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    let (mut ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("the WebSocket Upgrade is accepted");
    let protocol = response.headers().get("Sec-WebSocket-Protocol");
    assert_eq!(
        protocol.and_then(|p| p.to_str().ok()),
        Some("sip"),
        "the server confirms the sip subprotocol (RFC 7118 §4)"
    );
    let (ua_side, mut bridge_side) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(8192);
        loop {
            while let Some(frame) = next_frame(&mut buf) {
                let text = String::from_utf8(frame.to_vec()).expect("SIP is UTF-8");
                if ws.send(WsMessage::text(text)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                read = bridge_side.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => {
                        let _ = ws.close(None).await;
                        return;
                    }
                    Ok(_) => {}
                },
                received = ws.next() => match received {
                    Some(Ok(WsMessage::Text(text))) => {
                        if bridge_side.write_all(text.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(WsMessage::Binary(data))) => {
                        if bridge_side.write_all(&data).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                },
            }
        }
    });
    ua_side
}

/// Reads one stream connection, splitting messages by Content-Length (§18.3), until it closes.
async fn read_stream(
    mut read: impl AsyncRead + Unpin,
    peer: SocketAddr,
    tx: mpsc::UnboundedSender<Inbound>,
) {
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        while let Some(frame) = next_frame(&mut buf) {
            let message = Message::parse(frame).expect("a framed message parses");
            if tx.send(Inbound::Message(message, peer)).is_err() {
                return;
            }
        }
        match read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Takes one whole message off the front of `buf`, skipping CRLF keep-alives (RFC 5626 §3.5.1);
/// `None` until one has fully arrived. A message without Content-Length counts as bodiless.
pub fn next_frame(buf: &mut BytesMut) -> Option<Bytes> {
    while buf.starts_with(b"\r\n") {
        buf.advance(2);
    }
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let body_len = head
        .split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| {
            let name = name.trim();
            name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l")
        })
        .map_or(0, |(_, value)| {
            value.trim().parse::<usize>().expect("Content-Length")
        });
    if buf.len() < head_end + body_len {
        return None;
    }
    Some(buf.split_to(head_end + body_len).freeze())
}

/// The message as text, for assertion messages.
pub fn show(m: &Message) -> String {
    text(&m.to_bytes())
}

/// Asserts a response's status code, showing the whole response when it differs.
pub fn expect_status(response: &Message, code: u16) {
    assert_eq!(
        response.status(),
        Some(code),
        "expected {code}, got\n{}",
        show(response)
    );
}

/// The first value of a header field as text (any name, case-insensitive).
pub fn header_text(m: &Message, name: &str) -> Option<String> {
    m.headers_named(name).next().map(text)
}
