//! The engine's own metric families (`moonroute_*`), registered once per server and handed
//! to the parts that count: the server core (requests and responses), the transaction layer
//! (RFC 3261 §17: transactions created, timed out, retransmissions), the transport shell
//! (messages, parse errors, connections), DNS (RFC 3263 lookups) and the overload limits.
//!
//! Every handle is resolved here, at start: the hot path only does relaxed atomic adds on
//! handles it already holds (an array index per method, transport or status code), never a
//! lock or an allocation. Parts built without a registry (unit tests, `moonroute test`) get
//! [`EngineMetrics::detached`], whose handles count into a registry nobody renders.
//!
//! The families whose values already live elsewhere are read at scrape time instead:
//! uptime, open connections (the connection registry), location bindings (the store).

use std::sync::Arc;
use std::time::Instant;

use super::{counter_family, Counter, Exposition, Histogram, Kind, Registry};
use crate::sip::Method;
pub use crate::transaction::metrics::{OverloadReason, TransactionKind, TransactionMetrics};
use crate::transport::message_clock::Overdue;
use crate::transport::registry::Limit;
use crate::transport::TransportKind;

/// Status codes counted one by one (RFC 3261 §7.2, §21: 100 to 699).
const FIRST_CODE: u16 = 100;
const LAST_CODE: u16 = 699;

/// Methods with a label of their own; any extension method counts as `other` (the label set
/// stays bounded whatever peers send).
const METHODS: [&str; 15] = [
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "REGISTER",
    "OPTIONS",
    "INFO",
    "UPDATE",
    "PRACK",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "MESSAGE",
    "PUBLISH",
    "other",
];

fn method_index(method: &Method) -> usize {
    match method {
        Method::Invite => 0,
        Method::Ack => 1,
        Method::Bye => 2,
        Method::Cancel => 3,
        Method::Register => 4,
        Method::Options => 5,
        Method::Info => 6,
        Method::Update => 7,
        Method::Prack => 8,
        Method::Subscribe => 9,
        Method::Notify => 10,
        Method::Refer => 11,
        Method::Message => 12,
        Method::Publish => 13,
        Method::Other(_) => 14,
    }
}

use crate::transport::TRANSPORTS;

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

/// DNS record types looked up by RFC 3263 resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsType {
    Naptr,
    Srv,
    A,
    Aaaa,
}

impl DnsType {
    const ALL: [DnsType; 4] = [DnsType::Naptr, DnsType::Srv, DnsType::A, DnsType::Aaaa];

    fn label(self) -> &'static str {
        match self {
            DnsType::Naptr => "NAPTR",
            DnsType::Srv => "SRV",
            DnsType::A => "A",
            DnsType::Aaaa => "AAAA",
        }
    }
}

/// One counter per status code 100..=699, rendered at scrape time for the codes seen only
/// (600 mostly-zero series would drown the useful ones). Clones share the counts.
#[derive(Clone, Debug)]
pub struct StatusCounters(Arc<[Counter]>);

impl Default for StatusCounters {
    fn default() -> Self {
        StatusCounters(
            (FIRST_CODE..=LAST_CODE)
                .map(|_| Counter::default())
                .collect(),
        )
    }
}

impl StatusCounters {
    /// Counts one response with this status code; codes outside 100..=699 are not counted
    /// (the parser refuses them).
    pub fn inc(&self, code: u16) {
        if let Some(counter) = code
            .checked_sub(FIRST_CODE)
            .and_then(|index| self.0.get(usize::from(index)))
        {
            counter.inc();
        }
    }

    pub fn get(&self, code: u16) -> u64 {
        code.checked_sub(FIRST_CODE)
            .and_then(|index| self.0.get(usize::from(index)))
            .map_or(0, Counter::get)
    }

    /// The samples of the codes counted at least once, ascending, as `name{code="NNN"}`.
    pub fn write(&self, out: &mut Exposition, name: &str) {
        for (code, counter) in (FIRST_CODE..=LAST_CODE).zip(self.0.iter()) {
            let value = counter.get();
            if value > 0 {
                out.sample(name, &[("code", &code.to_string())], value as f64);
            }
        }
    }

    fn register(registry: &Registry, name: &str, help: &str) -> StatusCounters {
        let counters = StatusCounters::default();
        let rendered = counters.clone();
        let owned = name.to_owned();
        registry.collect(
            name,
            help,
            Kind::Counter,
            Box::new(move |out| rendered.write(out, &owned)),
        );
        counters
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

/// DNS lookups (RFC 3263), by record type.
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    lookups: [Counter; 4],
    failures: [Counter; 4],
}

impl DnsMetrics {
    pub fn lookup(&self, rtype: DnsType) {
        self.lookups[rtype as usize].inc();
    }

    /// A lookup that got no answer (timeout, server failure); NXDOMAIN and NODATA are answers.
    pub fn failure(&self, rtype: DnsType) {
        self.failures[rtype as usize].inc();
    }
}

/// Every engine handle of one server. See the module docs.
#[derive(Debug)]
pub struct EngineMetrics {
    registry: Arc<Registry>,
    requests_received: [Counter; METHODS.len()],
    pub responses_received: StatusCounters,
    pub responses_sent: StatusCounters,
    pub transactions: TransactionMetrics,
    pub transport: TransportMetrics,
    pub dns: DnsMetrics,
    started: Instant,
}

impl EngineMetrics {
    /// Registers every engine family in `registry` (once per server) and returns the handles.
    pub fn register(registry: &Arc<Registry>) -> Arc<EngineMetrics> {
        register_build_info(registry);
        EngineMetrics::register_counting(registry)
    }

    /// Handles counting into a private registry: for servers and tests that export nothing.
    pub fn detached() -> Arc<EngineMetrics> {
        EngineMetrics::register_counting(&Registry::new())
    }

    /// Every family but the build information (which starts a Lua state to ask its version).
    fn register_counting(registry: &Arc<Registry>) -> Arc<EngineMetrics> {
        let started = Instant::now();
        registry.gauge_fn(
            "moonroute_uptime_seconds",
            "Seconds since this server started.",
            move || started.elapsed().as_secs_f64(),
        );
        let requests = counter_family(
            registry,
            "moonroute_requests_received_total",
            "SIP requests received, retransmissions included, by method (extension methods count as \"other\").",
            "method",
        );
        let requests_received = METHODS.map(|method| requests.with(&[method]));
        let responses_received = StatusCounters::register(
            registry,
            "moonroute_responses_received_total",
            "SIP responses received, by status code (codes never seen are not listed).",
        );
        let responses_sent = StatusCounters::register(
            registry,
            "moonroute_responses_sent_total",
            "SIP responses sent (answered here or relayed), retransmissions included, by status code.",
        );
        Arc::new(EngineMetrics {
            registry: Arc::clone(registry),
            requests_received,
            responses_received,
            responses_sent,
            transactions: TransactionMetrics::register(registry),
            transport: register_transport(registry),
            dns: register_dns(registry),
            started,
        })
    }

    /// The registry these handles belong to.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn request_received(&self, method: &Method) {
        self.requests_received[method_index(method)].inc();
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
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

fn register_build_info(registry: &Registry) {
    let info = registry
        .gauge_family(
            "moonroute_build_info",
            "Always 1: the moonroute version and the Lua version its scripts run on.",
            &["version", "lua"],
        )
        .unwrap_or_else(|error| panic!("{error}"));
    info.with(&[env!("CARGO_PKG_VERSION"), &lua_version()])
        .set(1.0);
}

/// The Lua version scripts run on, e.g. "Lua 5.4" (its `_VERSION`).
pub fn lua_version() -> String {
    mlua::Lua::new()
        .globals()
        .get::<String>("_VERSION")
        .unwrap_or_else(|_| "Lua".to_owned())
}

fn register_transport(registry: &Registry) -> TransportMetrics {
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
    let each = |family: &super::Family<Counter>, second: Option<&str>| {
        TRANSPORTS.map(|kind| match second {
            Some(value) => family.with(&[transport_label(kind), value]),
            None => family.with(&[transport_label(kind)]),
        })
    };
    let stream_counter = |family: &super::Family<Counter>, kind, second: &str| match kind {
        // UDP has no connections: its handle is detached, so no udp series is exported.
        TransportKind::Udp => Counter::default(),
        _ => family.with(&[transport_label(kind), second]),
    };
    let streams_only = |family: &super::Family<Counter>, direction: &str| {
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

fn register_dns(registry: &Registry) -> DnsMetrics {
    let lookups = counter_family(
        registry,
        "moonroute_dns_lookups_total",
        "DNS lookups issued to locate next hops (RFC 3263), cache hits included, by record type.",
        "type",
    );
    let failures = counter_family(
        registry,
        "moonroute_dns_failures_total",
        "DNS lookups that got no answer (timeout, server failure); NXDOMAIN and empty answers are not failures.",
        "type",
    );
    DnsMetrics {
        lookups: DnsType::ALL.map(|rtype| lookups.with(&[rtype.label()])),
        failures: DnsType::ALL.map(|rtype| failures.with(&[rtype.label()])),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_counters_render_only_the_codes_seen() {
        let registry = Registry::new();
        let counters = StatusCounters::register(&registry, "x_responses_total", "Responses.");
        counters.inc(180);
        counters.inc(200);
        counters.inc(200);
        counters.inc(699);
        counters.inc(99);
        counters.inc(700);
        assert_eq!(counters.get(200), 2);
        assert_eq!(counters.get(700), 0);
        assert_eq!(
            registry.render(),
            "# HELP x_responses_total Responses.\n# TYPE x_responses_total counter\n\
             x_responses_total{code=\"180\"} 1\nx_responses_total{code=\"200\"} 2\n\
             x_responses_total{code=\"699\"} 1\n"
        );
    }

    #[test]
    fn response_codes_are_read_from_the_status_line() {
        assert_eq!(response_code(b"SIP/2.0 180 Ringing\r\n"), Some(180));
        assert_eq!(response_code(b"SIP/2.0 603 Decline\r\n"), Some(603));
        assert_eq!(response_code(b"INVITE sip:a@b SIP/2.0\r\n"), None);
        assert_eq!(response_code(b"SIP/2.0 2x0 Odd\r\n"), None);
        assert_eq!(response_code(b"SIP/2.0 20"), None);
        assert_eq!(response_code(b"\r\n\r\n"), None);
    }

    #[test]
    fn every_engine_family_is_registered_with_its_labels() {
        let registry = Registry::new();
        let metrics = EngineMetrics::register(&registry);
        metrics.request_received(&Method::Other(bytes::Bytes::from_static(b"FOO")));
        metrics.transactions.created(TransactionKind::InviteServer);
        metrics.transactions.ended(1);
        metrics.connections_open(|_| 0);
        let text = registry.render();
        for family in [
            "moonroute_build_info",
            "moonroute_uptime_seconds",
            "moonroute_requests_received_total",
            "moonroute_responses_received_total",
            "moonroute_responses_sent_total",
            "moonroute_transactions_live",
            "moonroute_transactions_memory_bytes",
            "moonroute_transactions_created_total",
            "moonroute_transactions_timed_out_total",
            "moonroute_retransmissions_total",
            "moonroute_messages_total",
            "moonroute_parse_errors_total",
            "moonroute_connections_open",
            "moonroute_connections_opened_total",
            "moonroute_connections_refused_total",
            "moonroute_connections_timed_out_total",
            "moonroute_hand_overs_total",
            "moonroute_hand_overs_dropped_total",
            "moonroute_udp_batch_size",
            "moonroute_dns_lookups_total",
            "moonroute_dns_failures_total",
            "moonroute_overload_rejections_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} in\n{text}"
            );
        }
        assert!(text.contains("moonroute_requests_received_total{method=\"other\"} 1\n"));
        assert!(text.contains("moonroute_transactions_created_total{kind=\"invite_server\"} 1\n"));
        assert!(text.contains("moonroute_transactions_live 0\n"));
        assert!(text.contains("moonroute_build_info{version=\""), "{text}");
        assert!(text.contains(",lua=\"Lua 5.4\"} 1\n"), "{text}");
        assert!(!text.contains("transport=\"udp\",direction=\"inbound\""));
        assert!(!text.contains("transport=\"udp\",reason="));
    }

    #[test]
    fn connection_refusals_and_timeouts_are_counted_by_transport_and_key() {
        let registry = Registry::new();
        let metrics = EngineMetrics::register(&registry);
        let transport = &metrics.transport;
        let per_ip = ConnectionRefusal::Limit(Limit::PendingConnectionsPerIp);
        transport.connection_refused(TransportKind::Tls, per_ip);
        transport.connection_refused(TransportKind::Tcp, ConnectionRefusal::MaxHandshakes);
        transport.connection_timed_out(TransportKind::Tcp, StreamTimeout::Message(Overdue::Header));
        assert_eq!(transport.refused_count(TransportKind::Tls, per_ip), 1);
        assert_eq!(transport.refused_count(TransportKind::Tcp, per_ip), 0);
        let text = registry.render();
        for sample in [
            "moonroute_connections_refused_total{transport=\"tls\",reason=\"max_pending_connections_per_ip\"} 1\n",
            "moonroute_connections_refused_total{transport=\"tcp\",reason=\"max_handshakes\"} 1\n",
            "moonroute_connections_refused_total{transport=\"tcp\",reason=\"max_inbound_connections\"} 0\n",
            "moonroute_connections_timed_out_total{transport=\"tcp\",reason=\"tcp_header_timeout_ms\"} 1\n",
            "moonroute_connections_timed_out_total{transport=\"tls\",reason=\"handshake_timeout_ms\"} 0\n",
        ] {
            assert!(text.contains(sample), "{sample} in\n{text}");
        }
    }
}
