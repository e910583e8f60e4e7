//! Transports: what crosses the boundary between the tokio shell and the sans-IO core.
//!
//! This module owns the interface contract between the shell (sockets, event loops) and the
//! core (SIP parsing, transactions, routing): the core is a [`Worker`] that turns an [`Input`]
//! into [`Output`]s and never touches a socket; the shell receives, frames and sends.
//!
//! Submodules:
//! - [`address`]: transport kinds, listen addresses, where a message came from and where one
//!   goes: plain data the core reads and writes.
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
//! - [`metrics`]: the shell's metric families and the handles it counts into.
//! - `dispatch`: one event loop's glue: runs inputs through its Worker, carries out outputs.
//! - `load`: how busy each event loop is ([`LoadSample`]), for the Worker's overload control.

pub mod framing;
pub mod message_clock;
pub mod metrics;
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
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use moonroute_proto::transport::{address, advertise};

pub use address::{
    response_destination, ConnectionId, Destination, ListenAddr, Meta, ParseListenAddrError,
    TransportKind, TRANSPORTS,
};
pub use advertise::Advertise;

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

    /// The metric handles the transport shell counts into (messages, connections, DNS);
    /// `None`: handles that nobody serves.
    fn metrics(&self) -> Option<metrics::ShellMetrics> {
        None
    }
}

/// Resource limits the transports enforce (from `[limits]` in the configuration, converted by
/// `crate::config`).
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
