//! The transport shell's metric families: messages and parse errors by transport, stream
//! connections opened, refused (RFC 3261 §18.3 framing bounds, `[limits]`) and timed out, UDP
//! batch sizes, hand-overs between event loops; and [`ShellMetrics`], every handle the shell
//! counts into (its own, the responses it sends, the DNS lookups of its resolvers).
//!
//! Owned here so the shell names nothing of the engine's aggregate (`crate::metrics::engine`
//! gathers these handles with the others); the hot path only does relaxed atomic adds on
//! handles resolved at start.

use std::sync::Arc;

use super::message_clock::Overdue;
use super::registry::Limit;
use super::{TransportKind, TRANSPORTS};
use crate::dns::metrics::DnsMetrics;
use crate::metrics::{counter_family, Counter, Family, Histogram, Kind, Registry, StatusCounters};

/// The handles the transport shell counts into. Clones share the counts.
#[derive(Clone, Debug)]
pub struct ShellMetrics {
    registry: Arc<Registry>,
    pub transport: TransportMetrics,
    /// Responses sent (answered here or relayed), by status code.
    pub responses_sent: StatusCounters,
    pub dns: DnsMetrics,
}

impl ShellMetrics {
    /// The handles `registry` holds already (`crate::metrics::engine::EngineMetrics::shell`).
    pub fn new(
        registry: &Arc<Registry>,
        transport: TransportMetrics,
        responses_sent: StatusCounters,
        dns: DnsMetrics,
    ) -> ShellMetrics {
        ShellMetrics {
            registry: Arc::clone(registry),
            transport,
            responses_sent,
            dns,
        }
    }

    /// Handles that count into a registry nobody renders: for servers whose Worker factory
    /// exports nothing.
    pub fn detached() -> ShellMetrics {
        ShellMetrics {
            registry: Registry::new(),
            transport: TransportMetrics::default(),
            responses_sent: StatusCounters::default(),
            dns: DnsMetrics::default(),
        }
    }

    /// `moonroute_connections_open{transport}`, read at scrape time from `count` (open
    /// connections of a transport). Replaces an earlier reader (a restarted server).
    pub fn connections_open(&self, count: impl Fn(TransportKind) -> usize + Send + Sync + 'static) {
        self.registry.collect(
            "moonroute_connections_open",
            "Open TCP and TLS connections (inbound and outbound), by transport.",
            Kind::Gauge,
            Box::new(move |out| {
                for kind in [TransportKind::Tcp, TransportKind::Tls] {
                    let name = "moonroute_connections_open";
                    out.sample(
                        name,
                        &[("transport", transport_label(kind))],
                        count(kind) as f64,
                    );
                }
            }),
        );
    }
}

fn transport_index(kind: TransportKind) -> usize {
    match kind {
        TransportKind::Udp => 0,
        TransportKind::Tcp => 1,
        TransportKind::Tls => 2,
        TransportKind::Ws => 3,
        TransportKind::Wss => 4,
    }
}

fn transport_label(kind: TransportKind) -> &'static str {
    kind.scheme()
}

/// Why an accepted TCP or TLS connection was closed at once: the key of the limit reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// A `[limits]` connection limit (`crate::transport::registry`).
    Limit(Limit),
    /// `tls.max_handshakes` on the accepting event loop.
    MaxHandshakes,
    /// A WebSocket Upgrade refused: no `sip` subprotocol, or an `Origin` not allowed
    /// (`crate::transport::ws`).
    Upgrade,
}

impl ConnectionRefusal {
    const ALL: [ConnectionRefusal; 6] = [
        ConnectionRefusal::Limit(Limit::Connections),
        ConnectionRefusal::Limit(Limit::InboundConnections),
        ConnectionRefusal::Limit(Limit::ConnectionsPerIp),
        ConnectionRefusal::Limit(Limit::PendingConnectionsPerIp),
        ConnectionRefusal::MaxHandshakes,
        ConnectionRefusal::Upgrade,
    ];

    fn index(self) -> usize {
        match self {
            ConnectionRefusal::Limit(Limit::Connections) => 0,
            ConnectionRefusal::Limit(Limit::InboundConnections) => 1,
            ConnectionRefusal::Limit(Limit::ConnectionsPerIp) => 2,
            ConnectionRefusal::Limit(Limit::PendingConnectionsPerIp) => 3,
            ConnectionRefusal::MaxHandshakes => 4,
            ConnectionRefusal::Upgrade => 5,
        }
    }

    fn label(self) -> &'static str {
        match self {
            ConnectionRefusal::Limit(limit) => limit.key(),
            ConnectionRefusal::MaxHandshakes => "max_handshakes",
            ConnectionRefusal::Upgrade => "websocket_upgrade",
        }
    }
}

/// Why a TCP or TLS connection was closed for being too slow: the key of the bound missed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamTimeout {
    /// A message did not arrive whole in time (`crate::transport::message_clock`).
    Message(Overdue),
    /// `tls.handshake_timeout_ms`, on an accepted connection.
    Handshake,
}

impl StreamTimeout {
    const ALL: [StreamTimeout; 3] = [
        StreamTimeout::Message(Overdue::Header),
        StreamTimeout::Message(Overdue::Message),
        StreamTimeout::Handshake,
    ];

    fn index(self) -> usize {
        match self {
            StreamTimeout::Message(Overdue::Header) => 0,
            StreamTimeout::Message(Overdue::Message) => 1,
            StreamTimeout::Handshake => 2,
        }
    }

    fn label(self) -> &'static str {
        match self {
            StreamTimeout::Message(overdue) => overdue.key(),
            StreamTimeout::Handshake => "handshake_timeout_ms",
        }
    }
}

/// The transport shell's counters, by transport.
#[derive(Clone, Debug, Default)]
pub struct TransportMetrics {
    messages_in: [Counter; 5],
    messages_out: [Counter; 5],
    parse_errors: [Counter; 5],
    opened_inbound: [Counter; 5],
    opened_outbound: [Counter; 5],
    /// By transport, then [`ConnectionRefusal::index`].
    refused: [[Counter; 6]; 5],
    /// By transport, then [`StreamTimeout::index`].
    timed_out: [[Counter; 3]; 5],
    hand_overs: Counter,
    hand_overs_dropped: Counter,
    udp_batches: UdpBatchSizes,
}

/// Upper bounds of the UDP batch-size buckets: datagrams per system call (`udp_batch`'s
/// batches hold at most 32).
const UDP_BATCH_BOUNDS: [f64; 6] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0];

/// Datagrams per receive and per send system call on UDP sockets.
#[derive(Clone, Debug)]
struct UdpBatchSizes {
    received: Histogram,
    sent: Histogram,
}

impl Default for UdpBatchSizes {
    fn default() -> Self {
        let bounds: Arc<[f64]> = UDP_BATCH_BOUNDS.into();
        UdpBatchSizes {
            received: Histogram::new(Arc::clone(&bounds)),
            sent: Histogram::new(bounds),
        }
    }
}

impl TransportMetrics {
    pub fn message_in(&self, kind: TransportKind) {
        self.messages_in[transport_index(kind)].inc();
    }

    pub fn message_out(&self, kind: TransportKind) {
        self.messages_out[transport_index(kind)].inc();
    }

    pub fn parse_error(&self, kind: TransportKind) {
        self.parse_errors[transport_index(kind)].inc();
    }

    pub fn connection_opened(&self, kind: TransportKind, inbound: bool) {
        let counters = match inbound {
            true => &self.opened_inbound,
            false => &self.opened_outbound,
        };
        counters[transport_index(kind)].inc();
    }

    /// An accepted connection was closed at once because of `reason`.
    pub fn connection_refused(&self, kind: TransportKind, reason: ConnectionRefusal) {
        self.refused[transport_index(kind)][reason.index()].inc();
    }

    /// A connection was closed because of the slowness `reason`.
    pub fn connection_timed_out(&self, kind: TransportKind, reason: StreamTimeout) {
        self.timed_out[transport_index(kind)][reason.index()].inc();
    }

    pub fn refused_count(&self, kind: TransportKind, reason: ConnectionRefusal) -> u64 {
        self.refused[transport_index(kind)][reason.index()].get()
    }

    pub fn timed_out_count(&self, kind: TransportKind, reason: StreamTimeout) -> u64 {
        self.timed_out[transport_index(kind)][reason.index()].get()
    }

    /// A received message passed to the event loop that owns its transaction or dialog.
    pub fn handed_over(&self) {
        self.hand_overs.inc();
    }

    /// A hand-over dropped: the owning loop's queue was full.
    pub fn hand_over_dropped(&self) {
        self.hand_overs_dropped.inc();
    }

    /// One system call received `datagrams` UDP datagrams.
    pub fn udp_received_batch(&self, datagrams: usize) {
        self.udp_batches.received.observe(datagrams as f64);
    }

    /// One system call sent `datagrams` UDP datagrams.
    pub fn udp_sent_batch(&self, datagrams: usize) {
        self.udp_batches.sent.observe(datagrams as f64);
    }
}

/// Registers the transport families in `registry` (once per server) and returns the handles.
pub fn register(registry: &Registry) -> TransportMetrics {
    let messages = registry
        .counter_family(
            "moonroute_messages_total",
            "SIP messages received (in) and sent (out), by transport.",
            &["transport", "direction"],
        )
        .unwrap_or_else(|error| panic!("{error}"));
    let parse_errors = counter_family(
        registry,
        "moonroute_parse_errors_total",
        "Received messages refused or dropped as malformed (unparsable, invalid, or broken stream framing), by transport.",
        "transport",
    );
    let opened = registry
        .counter_family(
            "moonroute_connections_opened_total",
            "TCP and TLS connections opened, accepted (inbound) or connected (outbound), by transport.",
            &["transport", "direction"],
        )
        .unwrap_or_else(|error| panic!("{error}"));
    let each = |family: &Family<Counter>, second: Option<&str>| {
        TRANSPORTS.map(|kind| match second {
            Some(value) => family.with(&[transport_label(kind), value]),
            None => family.with(&[transport_label(kind)]),
        })
    };
    let stream_counter = |family: &Family<Counter>, kind, second: &str| match kind {
        // UDP has no connections: its handle is detached, so no udp series is exported.
        TransportKind::Udp => Counter::default(),
        _ => family.with(&[transport_label(kind), second]),
    };
    let streams_only = |family: &Family<Counter>, direction: &str| {
        TRANSPORTS.map(|kind| stream_counter(family, kind, direction))
    };
    let refused = registry
        .counter_family(
            "moonroute_connections_refused_total",
            "Accepted TCP and TLS connections closed at once because a limit was reached, by transport and limit (the limits.* or tls.* key).",
            &["transport", "reason"],
        )
        .unwrap_or_else(|error| panic!("{error}"));
    let timed_out = registry
        .counter_family(
            "moonroute_connections_timed_out_total",
            "TCP and TLS connections closed because a message did not arrive whole in time (tcp_header_timeout_ms, tcp_message_timeout_ms) or a TLS handshake did not finish in time (handshake_timeout_ms), by transport and limit.",
            &["transport", "reason"],
        )
        .unwrap_or_else(|error| panic!("{error}"));
    let refused = TRANSPORTS.map(|kind| {
        ConnectionRefusal::ALL.map(|reason| stream_counter(&refused, kind, reason.label()))
    });
    let timed_out = TRANSPORTS.map(|kind| {
        StreamTimeout::ALL.map(|reason| stream_counter(&timed_out, kind, reason.label()))
    });
    TransportMetrics {
        messages_in: each(&messages, Some("in")),
        messages_out: each(&messages, Some("out")),
        parse_errors: each(&parse_errors, None),
        opened_inbound: streams_only(&opened, "inbound"),
        opened_outbound: streams_only(&opened, "outbound"),
        refused,
        timed_out,
        hand_overs: registry.counter(
            "moonroute_hand_overs_total",
            "Received messages passed to the event loop that owns their dialog (requests, by Call-ID) or client transaction (responses, by branch).",
        ),
        hand_overs_dropped: registry.counter(
            "moonroute_hand_overs_dropped_total",
            "Hand-overs dropped because the owning event loop's queue was full (a loop falling behind).",
        ),
        udp_batches: register_udp_batches(registry),
    }
}

fn register_udp_batches(registry: &Registry) -> UdpBatchSizes {
    let family = registry
        .histogram_family(
            "moonroute_udp_batch_size",
            "UDP datagrams per system call: received per recvmmsg (in), sent per sendmmsg or sendto (out).",
            &["direction"],
            &UDP_BATCH_BOUNDS,
        )
        .unwrap_or_else(|error| panic!("{error}"));
    UdpBatchSizes {
        received: family.with(&["in"]),
        sent: family.with(&["out"]),
    }
}

/// The status code of an outgoing message when it is a response (`SIP/2.0 NNN ...`): read
/// from the first bytes only, so counting what is sent costs no parse.
pub fn response_code(data: &[u8]) -> Option<u16> {
    let rest = data.strip_prefix(b"SIP/2.0 ")?;
    match rest {
        [a, b, c, ..] if a.is_ascii_digit() && b.is_ascii_digit() && c.is_ascii_digit() => {
            Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
        }
        _ => None,
    }
}
