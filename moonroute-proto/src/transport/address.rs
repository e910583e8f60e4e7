//! What the core knows of transports, as plain data: the transport kinds (RFC 3261 §18), the
//! addresses a server listens on, where a received message came from ([`Meta`]) and where a
//! message goes ([`Destination`], with the response rule of §18.2.2). No sockets: the shell
//! (`transport`'s other submodules) fills these in and carries them out.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use super::advertise::{self, Advertise};

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

#[cfg(feature = "serde")]
impl serde::Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
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
