//! The engine's own metric families (`moonroute_*`), registered once per server and handed
//! to the parts that count: the server core (requests and responses), the transaction layer
//! (RFC 3261 §17: transactions created, timed out, retransmissions), the transport shell
//! (messages, parse errors, connections), DNS (RFC 3263 lookups) and the overload limits.
//! The transaction layer, the transport shell and DNS own their families
//! (`crate::transaction::metrics`, `crate::transport::metrics`, `crate::dns::metrics`): this
//! module registers them together and hands each part its handles.
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

pub use super::StatusCounters;
use super::{counter_family, Counter, Registry};
pub use crate::dns::metrics::{DnsMetrics, DnsType};
use crate::sip::Method;
pub use crate::transaction::metrics::{OverloadReason, TransactionKind, TransactionMetrics};
pub use crate::transport::metrics::{
    response_code, ConnectionRefusal, ShellMetrics, StreamTimeout, TransportMetrics,
};

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
            transport: crate::transport::metrics::register(registry),
            dns: crate::dns::metrics::register(registry),
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

    /// The handles the transport shell counts into, sharing their counts with these.
    pub fn shell(&self) -> ShellMetrics {
        ShellMetrics::new(
            &self.registry,
            self.transport.clone(),
            self.responses_sent.clone(),
            self.dns.clone(),
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::message_clock::Overdue;
    use crate::transport::registry::Limit;
    use crate::transport::TransportKind;

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
        metrics.shell().connections_open(|_| 0);
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
