//! Slow and greedy TCP clients against the real server (its SIP core, no script) on
//! 127.0.0.1: the `[limits]` that keep them from locking others out. RFC 3261 §18.3 frames
//! stream messages but bounds neither how long one may take nor how many connections a peer
//! may hold; these tests check that
//! - a header block or body trickling past its deadline, and a connection that never sends a
//!   message, are dropped with one `moonroute::refused` line, and counted;
//! - one address (IPv4, or IPv6 /64) holds at most `max_pending_connections_per_ip`
//!   connections that have not delivered a message yet, and `max_connections_per_ip` in all;
//! - inbound connections cannot take the slots kept for the server's own outbound ones.
//!
//! Misbehaving clients use other loopback addresses (127.0.0.2 and up), one set per test, so
//! that each test finds its own refused lines (`common::refused_log`); well-behaved clients
//! are on 127.0.0.1. Trickling clients write on a bounded schedule (at most a few seconds);
//! every wait is for an event (a close, a response, a log line) bounded by a timeout.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::task::JoinHandle;

use common::refused_log;
use common::ua::{connect_from, next_close, read_until_closed, watch_closes, TestUa, WAIT};
use moonroute::config::Config;
use moonroute::metrics::engine::{ConnectionRefusal, StreamTimeout};
use moonroute::metrics::EngineMetrics;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::transport::message_clock::Overdue;
use moonroute::transport::registry::Limit;
use moonroute::transport::TransportKind;

/// The short deadlines of the timeout tests.
const HEADER_MS: u64 = 1000;
const MESSAGE_MS: u64 = 1500;
/// How often a trickling client sends its next byte.
const TRICKLE: Duration = Duration::from_millis(200);

struct Running {
    server: ServerHandle,
    metrics: Arc<EngineMetrics>,
    tcp: SocketAddr,
}

/// UDP and TCP on 127.0.0.1 (ephemeral ports), two event loops (the limits hold across
/// them), requests for other hosts relayed to their Request-URI (for the outbound test),
/// stream deadlines longer than any test unless a test shortens them.
fn config() -> Config {
    let mut config = Config {
        listen: vec![
            "udp:127.0.0.1:0".parse().unwrap(),
            "tcp:127.0.0.1:0".parse().unwrap(),
        ],
        workers: 2,
        ..Config::default()
    };
    config.proxy.relay_to_request_uri = true;
    config.limits.tcp_header_timeout_ms = 30_000;
    config.limits.tcp_message_timeout_ms = 30_000;
    config
}

fn short_deadlines() -> Config {
    let mut config = config();
    config.limits.tcp_header_timeout_ms = HEADER_MS;
    config.limits.tcp_message_timeout_ms = MESSAGE_MS;
    config
}

fn start(config: &Config) -> Running {
    let metrics = EngineMetrics::detached();
    let factory = CoreFactory::new(config).with_metrics(Arc::clone(&metrics));
    let server = Server::start(config, Arc::new(factory)).expect("server starts");
    let tcp = server.local_addr(TransportKind::Tcp).unwrap();
    Running {
        server,
        metrics,
        tcp,
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Writes `bytes` one at a time, `TRICKLE` apart, until they run out or a write fails (the
/// server closed the connection). At most `bytes.len()` × `TRICKLE`.
fn trickle(mut writer: OwnedWriteHalf, bytes: Vec<u8>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(TRICKLE);
        for byte in bytes {
            ticks.tick().await;
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
        }
    })
}

/// Waits for the server to close `reader`'s connection without an answer, and checks that
/// this was no sooner than `deadline_ms` after `started` (the deadline, not something else).
async fn dropped_at_deadline(
    reader: &mut (impl AsyncRead + Unpin),
    started: Instant,
    deadline_ms: u64,
) {
    assert!(
        read_until_closed(reader, WAIT).await.is_empty(),
        "no answer"
    );
    let took = started.elapsed();
    // An accepted connection's first message is timed from the accept, which comes before
    // `connect` returns here (by some milliseconds on a loaded machine: 995.9 ms was seen for
    // a 1 s deadline): a tenth of the deadline is the margin, and any earlier is a failure.
    let deadline = Duration::from_millis(deadline_ms);
    assert!(
        took >= deadline.mul_f64(0.9),
        "closed after {took:?}, well before {deadline:?}"
    );
}

/// An OPTIONS for the server itself, answered 200 by the core.
async fn options_answered(ua: &mut TestUa, server: SocketAddr) {
    ua.options(&format!("sip:{server}")).send().await;
    ua.expect_final(200).await;
}

/// The server: `max_connections = 6` and the per-address limits left to their
/// defaults (derived from it). Six connections from 127.0.0.2 trickling a header block, a byte
/// every 200 ms, used to take every slot; now one of them is accepted (its first message is
/// pending), the rest are refused at once, and a client on 127.0.0.1 is served while the
/// slow one still holds its slot.
#[tokio::test]
async fn slow_clients_from_one_address_do_not_lock_out_another() {
    let mut refused = refused_log::subscribe();
    let mut config = config();
    config.limits.max_connections = 6;
    assert_eq!(config.limits.pending_connections_per_ip(), 1);
    let running = start(&config);

    let mut open = Vec::new();
    let mut tricklers = Vec::new();
    for _ in 0..6 {
        let (reader, writer) = connect_from(ip("127.0.0.2"), running.tcp)
            .await
            .into_split();
        let head = format!(
            "OPTIONS sip:{} SIP/2.0\r\nVia: SIP/2.0/TCP x\r\n",
            running.tcp
        );
        tricklers.push(trickle(writer, head.into_bytes()));
        open.push(reader);
    }
    for _ in 0..5 {
        refused
            .expect(
                "127.0.0.2",
                "limits.max_pending_connections_per_ip (1) reached",
                WAIT,
            )
            .await;
    }
    let pending_limit = ConnectionRefusal::Limit(Limit::PendingConnectionsPerIp);
    let counted = running
        .metrics
        .transport
        .refused_count(TransportKind::Tcp, pending_limit);
    assert_eq!(counted, 5);

    let started = Instant::now();
    let mut alice = TestUa::tcp("alice", running.tcp).await;
    options_answered(&mut alice, running.tcp).await;
    let took = started.elapsed();
    eprintln!("served in {took:?} while the slow client held its connection");
    assert!(took < Duration::from_secs(1), "served in {took:?}");
    assert_eq!(
        running.server.connection_count(),
        2,
        "alice's and the one slow connection accepted"
    );
    for trickler in tricklers {
        trickler.abort();
    }
}

/// A header block trickling a byte every 200 ms is dropped at `tcp_header_timeout_ms` from
/// its first byte, whatever the idle timeout; a client that delivered its message long before
/// keeps its connection.
#[tokio::test]
async fn a_header_block_trickling_past_its_deadline_is_dropped() {
    let mut refused = refused_log::subscribe();
    let running = start(&short_deadlines());
    let mut alice = TestUa::tcp("alice", running.tcp).await;
    options_answered(&mut alice, running.tcp).await;

    let (mut reader, writer) = connect_from(ip("127.0.0.3"), running.tcp)
        .await
        .into_split();
    let started = Instant::now();
    let head = format!(
        "OPTIONS sip:{} SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.3:9;branch=z9hG4bK-slow\r\n\
         Max-Forwards: 70\r\n",
        running.tcp
    );
    let trickler = trickle(writer, head.into_bytes());
    dropped_at_deadline(&mut reader, started, HEADER_MS).await;
    let line = refused
        .expect(
            "127.0.0.3",
            "header block not complete within 1000 ms",
            WAIT,
        )
        .await;
    assert_eq!(line["target"], "moonroute::refused");
    assert_eq!(line["transport"], "tcp");
    assert!(
        line["reason"]
            .as_str()
            .unwrap()
            .contains("(limits.tcp_header_timeout_ms)"),
        "{line}"
    );
    let header = StreamTimeout::Message(Overdue::Header);
    let counted = running
        .metrics
        .transport
        .timed_out_count(TransportKind::Tcp, header);
    assert_eq!(counted, 1);
    trickler.abort();

    // Alice connected before the slow client, so more than the header deadline ago: her
    // connection is still served, since she has sent a message.
    options_answered(&mut alice, running.tcp).await;
}

/// A complete header block whose body trickles is dropped at `tcp_message_timeout_ms` from
/// the message's first byte.
#[tokio::test]
async fn a_body_trickling_past_its_deadline_is_dropped() {
    let mut refused = refused_log::subscribe();
    let running = start(&short_deadlines());
    let stream = connect_from(ip("127.0.0.4"), running.tcp).await;
    let (mut reader, mut writer) = stream.into_split();
    let head = format!(
        "MESSAGE sip:bob@{} SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.4:9;branch=z9hG4bK-body\r\n\
         Max-Forwards: 70\r\nContent-Length: 50\r\n\r\n",
        running.tcp
    );
    let started = Instant::now();
    writer.write_all(head.as_bytes()).await.unwrap();
    let trickler = trickle(writer, vec![b'x'; 50]);
    dropped_at_deadline(&mut reader, started, MESSAGE_MS).await;
    refused
        .expect(
            "127.0.0.4",
            "message body not complete within 1500 ms of its first byte (limits.tcp_message_timeout_ms)",
            WAIT,
        )
        .await;
    let body = StreamTimeout::Message(Overdue::Message);
    let counted = running
        .metrics
        .transport
        .timed_out_count(TransportKind::Tcp, body);
    assert_eq!(counted, 1);
    trickler.abort();
}

/// A client that connects and says nothing is closed at the header deadline, not the idle
/// timeout (300 s here).
#[tokio::test]
async fn a_connection_that_never_sends_a_message_is_dropped() {
    let mut refused = refused_log::subscribe();
    let running = start(&short_deadlines());
    let started = Instant::now();
    let mut silent = connect_from(ip("127.0.0.5"), running.tcp).await;
    dropped_at_deadline(&mut silent, started, HEADER_MS).await;
    refused
        .expect(
            "127.0.0.5",
            "no SIP message within 1000 ms of connecting",
            WAIT,
        )
        .await;
}

/// Connections from one address that did deliver messages are bounded too, by
/// `max_connections_per_ip`; other addresses are not affected.
#[tokio::test]
async fn connections_beyond_the_per_address_limit_are_refused() {
    let mut refused = refused_log::subscribe();
    let mut config = config();
    config.limits.max_connections_per_ip = Some(2);
    let running = start(&config);
    let mut held = Vec::new();
    for name in ["u1", "u2"] {
        let mut ua = TestUa::tcp_from(name, ip("127.0.0.6"), running.tcp).await;
        options_answered(&mut ua, running.tcp).await;
        held.push(ua);
    }
    let mut third = connect_from(ip("127.0.0.6"), running.tcp).await;
    assert!(read_until_closed(&mut third, WAIT).await.is_empty());
    refused
        .expect(
            "127.0.0.6",
            "limits.max_connections_per_ip (2) reached",
            WAIT,
        )
        .await;
    let per_ip = ConnectionRefusal::Limit(Limit::ConnectionsPerIp);
    let counted = running
        .metrics
        .transport
        .refused_count(TransportKind::Tcp, per_ip);
    assert_eq!(counted, 1);

    let mut alice = TestUa::tcp("alice", running.tcp).await;
    options_answered(&mut alice, running.tcp).await;
    // The two held connections still work.
    options_answered(&mut held[0], running.tcp).await;
}

/// With the inbound share of the table full (`max_inbound_connections = 3` of
/// `max_connections = 4`), a further client is refused, yet the server still opens the
/// connection to a UA it relays to.
#[tokio::test]
async fn outbound_connections_open_while_inbound_slots_are_full() {
    let mut refused = refused_log::subscribe();
    let mut config = config();
    config.limits.max_connections = 4;
    config.limits.max_inbound_connections = Some(3);
    config.limits.max_connections_per_ip = Some(4);
    config.limits.max_pending_connections_per_ip = Some(4);
    let running = start(&config);

    let mut alice = TestUa::tcp("alice", running.tcp).await;
    options_answered(&mut alice, running.tcp).await;
    // Three silent clients for the two inbound places left: whichever is accepted last (two
    // event loops accept) is refused.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(connect_from(ip("127.0.0.7"), running.tcp).await);
    }
    let mut closes = watch_closes(silent);
    next_close(&mut closes, WAIT).await;
    refused
        .expect(
            "127.0.0.7",
            "limits.max_inbound_connections (3) reached",
            WAIT,
        )
        .await;
    assert_eq!(running.server.connection_count(), 3);

    let mut bob = TestUa::tcp_listener_on("bob", "127.0.0.8:0".parse().unwrap()).await;
    alice.options(&bob.uri()).send().await;
    let incoming = bob.expect_request("OPTIONS").await;
    bob.respond(&incoming, 200, "OK").await;
    alice.expect_final(200).await;
    assert_eq!(
        running.server.connection_count(),
        4,
        "three inbound and the outbound one to bob"
    );
}
