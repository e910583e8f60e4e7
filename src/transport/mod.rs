//! Transports: what crosses the boundary between the tokio shell and the sans-IO core.
//!
//! This module owns the interface contract between the shell (sockets, event loops) and the
//! core (SIP parsing, transactions, routing): the core is a [`Worker`] that turns an [`Input`]
//! into [`Output`]s and never touches a socket; the shell receives, frames and sends.
//!
//! Submodules:
//! - [`advertise`]: the address a listener tells peers to reach it at, when it is not its
//!   socket address (a wildcard listener, a NAT, a container's port mapping).
//! - [`framing`]: sans-IO message framing of byte streams (RFC 3261 §18.3, §7.5;
//!   RFC 5626 §3.5.1 CRLF keep-alives).
//! - [`message_clock`]: sans-IO deadlines for a message to arrive whole on a byte stream, so
//!   a slow sender cannot hold a connection without ever delivering a message.
//! - `udp`, `tcp`: socket binding, receive loops and sending (RFC 3261 §18.1, §18.2); the TCP
//!   connection task serves any byte stream.
//! - `tls`: TLS over TCP (RFC 3261 §26.2) with rustls: listeners, handshakes, and the RFC 5922
//!   check of the certificates of servers we connect to.
//! - [`registry`]: the process-wide table of open stream connections, so responses go back on
//!   the connection the request came in on (RFC 3261 §18.2.2) and requests reuse connections;
//!   it enforces the connection limits, overall, for inbound connections and per source.
//! - `ws`: SIP over WebSocket and secure WebSocket (RFC 7118), server side: HTTP Upgrade with
//!   the `sip` subprotocol, one SIP message per WebSocket message, reachable only through the
//!   client's own connection.
//! - `udp_batch`: UDP datagrams received and sent many per system call (`recvmmsg`,
//!   `sendmmsg`).
//! - `dispatch`: one event loop's glue: runs inputs through its Worker, carries out outputs.
//! - `load`: how busy each event loop is ([`LoadSample`]), for the Worker's overload control.

pub mod advertise;
pub mod framing;
pub mod message_clock;
pub mod registry;

pub(crate) mod dispatch;
pub(crate) mod load;
pub(crate) mod tcp;
pub(crate) mod timer_grid;
pub(crate) mod tls;
pub(crate) mod udp;
pub(crate) mod udp_batch;
pub(crate) mod ws;

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use advertise::Advertise;

/// A SIP transport protocol (RFC 3261 §18; the `transport` value of a Via, §20.42).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportKind {
    Udp,
    Tcp,
    /// TLS over TCP (RFC 3261 §26.2); `[tls]` in the configuration.
    Tls,
    /// SIP over WebSocket (RFC 7118): server side only, one SIP message per WebSocket message.
    Ws,
    /// SIP over secure WebSocket (RFC 7118), TLS from `[tls]`.
    Wss,
}

/// Every transport, in the order metrics and listings use.
pub const TRANSPORTS: [TransportKind; 5] = [
    TransportKind::Udp,
    TransportKind::Tcp,
    TransportKind::Tls,
    TransportKind::Ws,
    TransportKind::Wss,
];

impl TransportKind {
    /// The name used in the Via sent-protocol (RFC 3261 §20.42, RFC 7118 §5.1): `UDP`, `TCP`,
    /// `TLS`, `WS` or `WSS`.
    pub fn via_name(self) -> &'static str {
        match self {
            TransportKind::Udp => "UDP",
            TransportKind::Tcp => "TCP",
            TransportKind::Tls => "TLS",
            TransportKind::Ws => "WS",
            TransportKind::Wss => "WSS",
        }
    }

    /// The transport a Via sent-protocol or a URI `transport` parameter names (any case).
    /// `ws` in a URI means WebSocket either way (RFC 7118 §5.2: a secure one is `sips:` with
    /// `transport=ws`); `wss`, which some clients write, is read as WSS.
    pub fn from_name(name: &[u8]) -> Option<TransportKind> {
        TRANSPORTS
            .into_iter()
            .find(|k| k.via_name().as_bytes().eq_ignore_ascii_case(name))
    }

    /// The value of a SIP URI `transport` parameter naming this transport (RFC 3261 §19.1.1,
    /// RFC 7118 §5.2: `ws` for plain and secure WebSocket alike).
    pub fn uri_param(self) -> &'static str {
        match self {
            TransportKind::Wss => "ws",
            other => other.scheme(),
        }
    }

    /// Whether this is SIP over WebSocket (RFC 7118), plain or secure. A WebSocket client is
    /// only reachable over the connection it opened (§5: its Contact and Via hosts are
    /// `.invalid` names), so nothing is ever sent to one on a new connection.
    pub fn is_websocket(self) -> bool {
        matches!(self, TransportKind::Ws | TransportKind::Wss)
    }

    /// Whether the transport runs over TLS (`tls`, `wss`).
    pub fn is_secure(self) -> bool {
        matches!(self, TransportKind::Tls | TransportKind::Wss)
    }

    /// The port a Via sent-by or URI without one means: 5061 for TLS, 5060 otherwise
    /// (RFC 3261 §18.1.1, §19.1.2; RFC 7118 defines none of its own for SIP URIs).
    pub fn default_port(self) -> u16 {
        match self {
            TransportKind::Tls => 5061,
            _ => 5060,
        }
    }

    /// Whether the transport is reliable (RFC 3261 §17.1.1.2: timers A/E/G are not used then).
    pub fn is_reliable(self) -> bool {
        !matches!(self, TransportKind::Udp)
    }

    /// Whether messages travel over a connection (TCP, TLS, WebSocket): responses go back on
    /// it (RFC 3261 §18.2.2), a NATed contact is reached only through it (RFC 5626 §5.3).
    /// TCP and TLS are byte streams framed by Content-Length (§18.3); a WebSocket carries one
    /// message per WebSocket message (RFC 7118 §5).
    pub fn is_stream(self) -> bool {
        !matches!(self, TransportKind::Udp)
    }

    /// The lower-case scheme used in [`ListenAddr`] strings: `udp`, `tcp`, `tls`, `ws` or
    /// `wss`.
    pub fn scheme(self) -> &'static str {
        match self {
            TransportKind::Udp => "udp",
            TransportKind::Tcp => "tcp",
            TransportKind::Tls => "tls",
            TransportKind::Ws => "ws",
            TransportKind::Wss => "wss",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme())
    }
}

/// Identifies one stream connection; unique for the life of the process (never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u64);

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn-{}", self.0)
    }
}

/// A transport and socket address to listen on, written `udp:127.0.0.1:5060`,
/// `tcp:[::1]:5060` or `tls:0.0.0.0:5061`; the address must be an IP literal with a port.
/// `,advertise=HOST[:PORT]` after it names the address peers reach the listener at
/// ([`Advertise`]): `udp:0.0.0.0:5060,advertise=sip.example.com:5060`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ListenAddr {
    pub kind: TransportKind,
    pub addr: SocketAddr,
    /// What Via, Record-Route and keep-alives carry for this listener instead of `addr`.
    pub advertise: Option<Advertise>,
}

impl ListenAddr {
    /// A listener on `addr` advertising nothing but its own address.
    pub fn new(kind: TransportKind, addr: SocketAddr) -> ListenAddr {
        ListenAddr {
            kind,
            addr,
            advertise: None,
        }
    }

    /// Whether this and `other` are the same socket (whatever they advertise).
    pub fn same_socket(&self, other: &ListenAddr) -> bool {
        self.kind == other.kind && self.addr == other.addr
    }

    /// `transport:ip:port`, without what it advertises (log fields, error messages).
    pub fn socket(&self) -> impl fmt::Display + '_ {
        SocketText(self)
    }
}

struct SocketText<'a>(&'a ListenAddr);

impl fmt::Display for SocketText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SocketAddr's Display already brackets IPv6 addresses.
        write!(f, "{}:{}", self.0.kind.scheme(), self.0.addr)
    }
}

/// Why a [`ListenAddr`] string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseListenAddrError {
    input: String,
    reason: String,
}

impl fmt::Display for ParseListenAddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid listen address '{}': {} (expected TRANSPORT:IP:PORT[,advertise=HOST[:PORT]], \
             e.g. udp:127.0.0.1:5060, tcp:[::1]:5060 or udp:0.0.0.0:5060,advertise=sip.example.com)",
            self.input, self.reason
        )
    }
}

impl std::error::Error for ParseListenAddrError {}

impl FromStr for ListenAddr {
    type Err = ParseListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = |reason: &str| ParseListenAddrError {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (socket, options) = match s.split_once(',') {
            Some((socket, options)) => (socket, Some(options)),
            None => (s, None),
        };
        let (scheme, addr) = socket
            .split_once(':')
            .ok_or_else(|| error("missing transport"))?;
        let kind = TRANSPORTS
            .into_iter()
            .find(|kind| kind.scheme().eq_ignore_ascii_case(scheme))
            .ok_or_else(|| error("unknown transport (use udp, tcp, tls, ws or wss)"))?;
        let addr = addr
            .parse()
            .map_err(|_| error("not an IP address and port"))?;
        let mut listen = ListenAddr::new(kind, addr);
        for option in options.into_iter().flat_map(|o| o.split(',')) {
            let value = match option.split_once('=') {
                Some((key, value)) if key.trim().eq_ignore_ascii_case("advertise") => value.trim(),
                _ => {
                    return Err(error(&format!(
                        "unknown option '{option}' (only advertise=)"
                    )))
                }
            };
            if listen.advertise.is_some() {
                return Err(error("advertise= given twice"));
            }
            let advertise = value
                .parse()
                .map_err(|e: advertise::ParseAdvertiseError| error(&e.to_string()))?;
            listen.advertise = Some(advertise);
        }
        Ok(listen)
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.socket())?;
        if let Some(advertise) = &self.advertise {
            write!(f, ",advertise={advertise}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An event loop's load counters at an instant, cumulative since the loop started (the shell
/// measures them, see `load`; `server::overload` decides on them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSample {
    pub at: Instant,
    /// Time the loop had work: not parked waiting for input.
    pub busy: Duration,
    /// How many times the loop went idle (parked with every queue drained).
    pub idles: u64,
    /// The thread's time on a CPU, when the system tells.
    pub cpu: Option<Duration>,
    /// The thread's time runnable but waiting while other threads held the CPU, when the
    /// system tells.
    pub cpu_wait: Option<Duration>,
    /// Bytes waiting in the loop's UDP receive queues now (kernel accounting), when the system
    /// tells.
    pub queued: Option<u64>,
}

impl LoadSample {
    pub fn new(at: Instant, busy: Duration, idles: u64) -> LoadSample {
        LoadSample {
            at,
            busy,
            idles,
            cpu: None,
            cpu_wait: None,
            queued: None,
        }
    }
}

/// Where a message came from.
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    pub kind: TransportKind,
    /// The peer's address (for streams: the remote end of the connection).
    pub source: SocketAddr,
    /// UDP: the address the receiving socket is bound to (as configured, so a wildcard
    /// listener gives the wildcard address). Streams: the connection's own local address.
    pub local: SocketAddr,
    /// The stream connection the message arrived on; `None` for UDP.
    pub conn: Option<ConnectionId>,
    /// Index of the event loop (and Worker) that received the message.
    pub worker: usize,
}

/// Stream framing failure (RFC 3261 §18.3). `head` is the header block when it was complete
/// (so the core can build a 400/413), empty otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    /// A stream message without Content-Length (mandatory on streams, RFC 3261 §18.3, §20.14).
    MissingContentLength,
    /// Content-Length is not a decimal number that fits, or two values disagree (§20.14).
    BadContentLength,
    /// Header block plus body would exceed the configured maximum message size.
    TooLarge { limit: usize },
    /// No end of the header block within the configured maximum message size.
    HeadTooLarge { limit: usize },
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FramingError::MissingContentLength => {
                f.write_str("stream message without Content-Length (RFC 3261 §18.3)")
            }
            FramingError::BadContentLength => f.write_str("invalid Content-Length value"),
            FramingError::TooLarge { limit } => {
                write!(f, "message larger than the limit of {limit} bytes")
            }
            FramingError::HeadTooLarge { limit } => {
                write!(f, "no end of header block within {limit} bytes")
            }
        }
    }
}

impl std::error::Error for FramingError {}

/// What the shell hands to a [`Worker`].
#[derive(Debug, Clone)]
pub enum Input {
    /// One complete SIP message: a whole UDP datagram, or exactly one framed stream message.
    Message { data: Bytes, meta: Meta },
    /// A stream could not be framed. The connection is closed by the shell after the
    /// outputs produced for this input are sent.
    FramingError {
        head: Bytes,
        error: FramingError,
        meta: Meta,
    },
    /// Messages to this peer could not be sent (TCP connect refused or timed out, the
    /// connection limit, a UDP send error, no listener for the transport): the Worker fails the
    /// transactions sending there (RFC 3261 §8.1.3.1, §17.1.4). Reported to the loop that sent.
    Unreachable {
        kind: TransportKind,
        addr: SocketAddr,
    },
    /// The Worker's [`Worker::wake_signal`] was woken: something it waits for outside the
    /// loop (a durable write) may be done.
    Wake,
    /// The answer to [`Output::Resolve`] `id`: the next hop's addresses in the order to try
    /// them (RFC 3263 §4), or why there are none. Delivered to the loop that asked.
    Resolved {
        id: u64,
        result: Result<Vec<crate::dns::Candidate>, crate::dns::ResolveError>,
    },
}

/// Where to send a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub kind: TransportKind,
    pub addr: SocketAddr,
    /// send on this connection if it is still open (responses, §18.2.2)
    pub conn: Option<ConnectionId>,
    /// send from the listener bound to this local address if there is one
    pub local: Option<SocketAddr>,
    /// TLS only: the SIP domain the peer's certificate must match when a new connection is
    /// opened (RFC 5922 §4: the host of the URI that was resolved, not the SRV target).
    /// `None` for responses and for other transports.
    pub tls_name: Option<std::sync::Arc<str>>,
    /// Streams only: send on an open connection to `addr` or not at all (reported
    /// unreachable), never open a new one. A contact behind a NAT is reached only through the
    /// connection it registered on (RFC 5626 §5.3): a connection opened to its public address
    /// would reach the NAT, not the phone.
    pub reuse_only: bool,
}

/// What a [`Worker`] asks the shell to do.
#[derive(Debug, Clone)]
pub enum Output {
    Send {
        dest: Destination,
        data: Bytes,
    },
    /// Close a stream connection once what is already queued on it has been written.
    Close(ConnectionId),
    /// This input belongs to another event loop (e.g. a response for a transaction that loop
    /// owns, found by the loop index in the branch): pass it there. Loops share no state, so
    /// this is how they cooperate; a full hand-over queue drops the input with a log line
    /// (UDP retransmissions recover it).
    HandOver {
        worker: usize,
        input: Input,
    },
    /// Locate this next hop in the DNS (RFC 3263) without blocking the loop, and answer with
    /// [`Input::Resolved`] carrying the same `id`.
    Resolve {
        id: u64,
        query: crate::dns::Query,
    },
}

/// Where a response to a request received with `top_via` and `meta` goes (RFC 3261 §18.2.2):
/// back on the connection for a reliable transport (falling back to the source address if it
/// has closed), else to the source address at the port the Via asks for (RFC 3581 `rport`,
/// else sent-by, else the transport's default port), from the socket the request arrived on.
pub fn response_destination(top_via: &crate::sip::Via<'_>, meta: &Meta) -> Destination {
    let default_port = meta.kind.default_port();
    let addr = if meta.kind.is_reliable() {
        meta.source
    } else {
        top_via.response_addr(meta.source, default_port)
    };
    Destination {
        kind: meta.kind,
        addr,
        conn: meta.conn,
        local: Some(meta.local),
        tls_name: None,
        reuse_only: false,
    }
}

/// One per event loop; created inside the loop's thread, so it need not be Send.
pub trait Worker: 'static {
    fn on_input(&mut self, input: Input, now: Instant, out: &mut Vec<Output>);

    /// The earliest instant at which [`Worker::on_timer`] must run (the transaction timers of
    /// RFC 3261 §17 live behind this), or `None` when nothing is scheduled. The shell asks
    /// again after every input and every timer run.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    /// Runs what became due at `now` (at or after the last [`Worker::next_deadline`]).
    fn on_timer(&mut self, _now: Instant, _out: &mut Vec<Output>) {}

    /// A signal other threads wake when something this Worker waits for is ready; the shell
    /// then gives the Worker an [`Input::Wake`]. Asked once, when the loop starts. `None`
    /// (the default): the Worker waits for nothing outside its loop.
    fn wake_signal(&self) -> Option<std::sync::Arc<crate::wake::WakeSignal>> {
        None
    }

    /// The loop's load counters, every `load::SAMPLE_INTERVAL` (100 ms) or so while it runs:
    /// what overload control decides on. Default: ignored.
    fn on_load(&mut self, _sample: LoadSample) {}
}

/// Makes the [`Worker`] of each event loop; called once per loop, inside the loop's thread.
pub trait WorkerFactory: Send + Sync + 'static {
    fn make_worker(&self, index: usize) -> Box<dyn Worker>;

    /// Like [`WorkerFactory::make_worker`], also told the addresses actually bound (port 0
    /// resolved) and how many loops run: what a Worker needs to write its own address into Via
    /// and Record-Route and to hand inputs to other loops.
    fn make_bound_worker(
        &self,
        index: usize,
        _loops: usize,
        _bound: &[ListenAddr],
    ) -> Box<dyn Worker> {
        self.make_worker(index)
    }

    /// The flows the script's location lookups check (WebSocket bindings whose connection
    /// closed are skipped); attached to the server's connections when it starts. `None`:
    /// nobody asks.
    fn flows(&self) -> Option<std::sync::Arc<registry::Flows>> {
        None
    }

    /// The engine's metric handles the transport shell counts into (messages, connections,
    /// DNS); `None`: a registry of its own that nobody serves.
    fn metrics(&self) -> Option<std::sync::Arc<crate::metrics::EngineMetrics>> {
        None
    }
}

/// Resource limits the transports enforce (from `[limits]` in the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportLimits {
    /// Largest message accepted: a whole datagram, or header block plus body on a stream.
    pub max_message_size: usize,
    /// A connection with no traffic either way for this long is closed; also the longest a
    /// single write may stall.
    pub tcp_idle_timeout: Duration,
    /// How long to wait for an outbound TCP connection to be established.
    pub tcp_connect_timeout: Duration,
    /// Messages queued for sending per connection; a peer that lets it fill is disconnected.
    pub tcp_send_queue: usize,
    /// The bounds on open stream connections, overall and per source address.
    pub connections: registry::ConnectionLimits,
    /// How long one message may take to arrive on a stream.
    pub message_timeouts: message_clock::MessageTimeouts,
}

impl From<&crate::config::Limits> for TransportLimits {
    fn from(limits: &crate::config::Limits) -> Self {
        TransportLimits {
            max_message_size: limits.max_message_size,
            tcp_idle_timeout: Duration::from_secs(limits.tcp_idle_timeout_secs),
            tcp_connect_timeout: Duration::from_secs(limits.tcp_connect_timeout_secs),
            tcp_send_queue: limits.tcp_send_queue,
            connections: registry::ConnectionLimits {
                max_connections: limits.max_connections,
                max_inbound: limits.inbound_connections(),
                max_per_source: limits.connections_per_ip(),
                max_pending_per_source: limits.pending_connections_per_ip(),
            },
            message_timeouts: message_clock::MessageTimeouts {
                header: Duration::from_millis(limits.tcp_header_timeout_ms),
                message: Duration::from_millis(limits.tcp_message_timeout_ms),
            },
        }
    }
}

/// Lets `group_size` sockets, one per event loop, bind the same address (SO_REUSEPORT); the
/// kernel then spreads datagrams and connections over them by flow.
#[cfg(unix)]
pub(crate) fn share_port(socket: &socket2::Socket, _group_size: usize) -> std::io::Result<()> {
    socket.set_reuse_port(true)
}

#[cfg(not(unix))]
pub(crate) fn share_port(_socket: &socket2::Socket, group_size: usize) -> std::io::Result<()> {
    if group_size > 1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "more than one worker needs SO_REUSEPORT, which this platform lacks",
        ));
    }
    Ok(())
}

/// The IP address and port a socket is bound to.
pub(crate) fn socket_local_addr(socket: &socket2::Socket) -> std::io::Result<SocketAddr> {
    socket.local_addr()?.as_socket().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "socket has no IP address")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addr_parses_ipv4_ipv6_and_every_transport() {
        let udp: ListenAddr = "udp:127.0.0.1:5060".parse().unwrap();
        assert_eq!(udp.kind, TransportKind::Udp);
        assert_eq!(udp.addr, "127.0.0.1:5060".parse().unwrap());
        let tcp: ListenAddr = "tcp:[::1]:5060".parse().unwrap();
        assert_eq!(tcp.kind, TransportKind::Tcp);
        assert_eq!(tcp.addr, "[::1]:5060".parse().unwrap());
        let tls: ListenAddr = "TLS:0.0.0.0:5061".parse().unwrap();
        assert_eq!(tls.kind, TransportKind::Tls);
    }

    #[test]
    fn listen_addr_display_round_trips() {
        for text in ["udp:127.0.0.1:5060", "tcp:[::1]:5060", "tls:0.0.0.0:5061"] {
            let parsed: ListenAddr = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn listen_addr_rejects_malformed_input() {
        for bad in [
            "",
            "udp",
            "127.0.0.1:5060",
            "sctp:127.0.0.1:5060",
            "udp:127.0.0.1",
            "udp:localhost:5060",
            "udp:::1:5060",
            "udp:127.0.0.1:70000",
        ] {
            let error = bad.parse::<ListenAddr>().unwrap_err();
            assert!(
                error.to_string().contains("expected TRANSPORT:IP:PORT"),
                "{bad}"
            );
        }
    }

    #[test]
    fn listen_addr_carries_an_advertised_address() {
        let wildcard: ListenAddr = "udp:0.0.0.0:5060,advertise=sip.example.com:5080"
            .parse()
            .unwrap();
        assert_eq!(wildcard.addr, "0.0.0.0:5060".parse().unwrap());
        let advertise = wildcard.advertise.as_ref().unwrap();
        assert_eq!(
            (advertise.host(), advertise.port_for(5060)),
            ("sip.example.com", 5080)
        );
        assert_eq!(
            wildcard.to_string(),
            "udp:0.0.0.0:5060,advertise=sip.example.com:5080"
        );
        assert_eq!(wildcard.socket().to_string(), "udp:0.0.0.0:5060");
        let v6: ListenAddr = "TCP:[::]:5060, Advertise=[2001:db8::7]".parse().unwrap();
        assert_eq!(v6.to_string(), "tcp:[::]:5060,advertise=[2001:db8::7]");
        assert!(v6.same_socket(&"tcp:[::]:5060".parse().unwrap()));
        for bad in [
            "udp:0.0.0.0:5060,advertise=",
            "udp:0.0.0.0:5060,advertise=0.0.0.0",
            "udp:0.0.0.0:5060,advertise=a.example,advertise=b.example",
            "udp:0.0.0.0:5060,adverise=a.example",
            "udp:0.0.0.0:5060,",
        ] {
            let error = bad.parse::<ListenAddr>().unwrap_err().to_string();
            assert!(error.contains("advertise"), "{bad}: {error}");
        }
    }

    #[test]
    fn transport_kind_names() {
        assert_eq!(TransportKind::Udp.via_name(), "UDP");
        assert_eq!(TransportKind::Tcp.via_name(), "TCP");
        assert_eq!(TransportKind::Tls.via_name(), "TLS");
        assert!(!TransportKind::Udp.is_reliable());
        assert!(TransportKind::Tcp.is_reliable());
        assert!(TransportKind::Tls.is_reliable());
        assert_eq!(TransportKind::Ws.via_name(), "WS");
        assert_eq!(TransportKind::Wss.via_name(), "WSS");
        assert!(TransportKind::Wss.is_reliable() && TransportKind::Wss.is_websocket());
        // RFC 7118 §5.2: `transport=ws` for both.
        assert_eq!(TransportKind::Wss.uri_param(), "ws");
        assert_eq!(TransportKind::from_name(b"ws"), Some(TransportKind::Ws));
        assert_eq!(TransportKind::from_name(b"WSS"), Some(TransportKind::Wss));
    }

    #[test]
    fn listen_addr_parses_websocket_listeners() {
        let ws: ListenAddr = "ws:127.0.0.1:8080".parse().unwrap();
        assert_eq!(ws.kind, TransportKind::Ws);
        let wss: ListenAddr = "WSS:[::1]:8443,advertise=sip.example.com".parse().unwrap();
        assert_eq!(wss.kind, TransportKind::Wss);
        assert_eq!(wss.to_string(), "wss:[::1]:8443,advertise=sip.example.com");
    }
}
