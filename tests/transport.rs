//! The tokio shell over real sockets: a `Server` on 127.0.0.1 (or ::1), port 0, with a small
//! scripted Worker, driven by plain tokio sockets. Tests wait on events with timeouts and
//! never sleep.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use moonroute::config::Config;
use moonroute::server::{Server, ServerHandle};
use moonroute::transport::framing::{Frame, StreamFramer};
use moonroute::transport::{
    Destination, FramingError, Input, ListenAddr, Meta, Output, TransportKind, Worker,
    WorkerFactory,
};

/// How long any single expected event may take.
const WAIT: Duration = Duration::from_secs(5);
/// The message size limit of the test servers.
const MAX_MESSAGE: usize = 2048;
/// Outbound messages queued per connection in the test servers.
const SEND_QUEUE: usize = 8;
/// Outputs the Worker produces for a FLOOD message: more than the queue holds.
const FLOOD_COPIES: usize = 64;
/// Where the Worker pretends TCP replies go: the reply must travel on `conn` instead
/// (RFC 3261 §18.2.2); were it sent by address, the connect would fail and the test time out.
const UNROUTABLE: &str = "127.0.0.1:9";

/// What the Worker saw, reported to the test.
#[derive(Debug)]
enum Seen {
    Message {
        data: Bytes,
        meta: Meta,
    },
    FramingError {
        head: Bytes,
        error: FramingError,
        meta: Meta,
    },
    Unreachable {
        kind: TransportKind,
        addr: SocketAddr,
    },
}

/// A Worker driven by the message it gets:
/// - `FORWARD <ip:port> ...` (a datagram): sends a framed message to that address over TCP
///   without a connection id;
/// - `FLOOD ...`: replies `FLOOD_COPIES` times on the connection;
/// - anything else: echoes it back (on the connection for TCP, to the source for UDP);
/// - a framing error: replies with a status line naming the error, then the shell closes.
struct ScriptedWorker {
    seen: mpsc::UnboundedSender<Seen>,
}

struct ScriptedFactory {
    seen: mpsc::UnboundedSender<Seen>,
}

impl WorkerFactory for ScriptedFactory {
    fn make_worker(&self, _index: usize) -> Box<dyn Worker> {
        Box::new(ScriptedWorker {
            seen: self.seen.clone(),
        })
    }
}

impl Worker for ScriptedWorker {
    fn on_input(&mut self, input: Input, _now: Instant, out: &mut Vec<Output>) {
        match input {
            Input::Message { data, meta } => {
                if let Some(target) = data.strip_prefix(b"FORWARD ") {
                    out.push(forward(target, &data));
                } else if data.starts_with(b"FLOOD") {
                    let reply = reply_to(&meta, data.clone());
                    out.extend((0..FLOOD_COPIES).map(|_| reply.clone()));
                } else {
                    out.push(reply_to(&meta, data.clone()));
                }
                let _ = self.seen.send(Seen::Message { data, meta });
            }
            Input::FramingError { head, error, meta } => {
                let status = match error {
                    FramingError::TooLarge { .. } => "413 Message Too Large",
                    _ => "400 Bad Request",
                };
                let reply = format!("SIP/2.0 {status}\r\nContent-Length: 0\r\n\r\n");
                out.push(reply_to(&meta, Bytes::from(reply)));
                let _ = self.seen.send(Seen::FramingError { head, error, meta });
            }
            Input::Unreachable { kind, addr } => {
                let _ = self.seen.send(Seen::Unreachable { kind, addr });
            }
            Input::Wake | Input::Resolved { .. } => {}
        }
    }
}

fn reply_to(meta: &Meta, data: Bytes) -> Output {
    let addr = match meta.conn {
        Some(_) => UNROUTABLE.parse().unwrap(),
        None => meta.source,
    };
    let dest = Destination {
        kind: meta.kind,
        addr,
        conn: meta.conn,
        local: Some(meta.local),
        tls_name: None,
        reuse_only: false,
    };
    Output::Send { dest, data }
}

fn forward(target: &[u8], datagram: &[u8]) -> Output {
    let target = std::str::from_utf8(target).unwrap();
    let addr = target.split_whitespace().next().unwrap().parse().unwrap();
    let body = String::from_utf8_lossy(datagram);
    let dest = Destination {
        kind: TransportKind::Tcp,
        addr,
        conn: None,
        local: None,
        tls_name: None,
        reuse_only: false,
    };
    Output::Send {
        dest,
        data: Bytes::from(sip_message(&body)),
    }
}

/// A complete SIP request with a Content-Length, as streams require (RFC 3261 §18.3).
fn request(method: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1;branch=z9hG4bKt\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn sip_message(body: &str) -> Vec<u8> {
    request("MESSAGE", body)
}

struct Harness {
    server: ServerHandle,
    seen: mpsc::UnboundedReceiver<Seen>,
}

fn test_config(listen: &[&str]) -> Config {
    let mut config = Config {
        listen: listen.iter().map(|addr| addr.parse().unwrap()).collect(),
        workers: 2,
        ..Config::default()
    };
    config.limits.max_message_size = MAX_MESSAGE;
    config.limits.max_connections = 16;
    // Every client here is on 127.0.0.1 (the per-address limits have tests of their own).
    config.limits.max_connections_per_ip = Some(16);
    config.limits.max_pending_connections_per_ip = Some(16);
    config.limits.tcp_idle_timeout_secs = 30;
    config.limits.tcp_connect_timeout_secs = 2;
    config.limits.tcp_send_queue = SEND_QUEUE;
    config
}

fn start(config: Config) -> Harness {
    init_logs();
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let factory = Arc::new(ScriptedFactory { seen: seen_tx });
    let server = Server::start(&config, factory).expect("server starts");
    Harness { server, seen }
}

fn start_default() -> Harness {
    start(test_config(&["udp:127.0.0.1:0", "tcp:127.0.0.1:0"]))
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "moonroute=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Harness {
    fn addr(&self, kind: TransportKind) -> SocketAddr {
        self.server.local_addr(kind).expect("listening")
    }

    async fn next_seen(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("the Worker saw an input in time")
            .expect("server running")
    }

    async fn next_message(&mut self) -> (Bytes, Meta) {
        match self.next_seen().await {
            Seen::Message { data, meta } => (data, meta),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    async fn connect(&self) -> TcpStream {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(self.addr(TransportKind::Tcp)))
            .await
            .expect("connected in time")
            .expect("connected");
        stream.set_nodelay(true).unwrap();
        stream
    }
}

/// Reads from `stream` until `framer` yields a frame.
async fn read_frame(stream: &mut TcpStream, framer: &mut StreamFramer) -> Frame {
    loop {
        if let Some(frame) = framer.next_frame().expect("server sends well-framed data") {
            return frame;
        }
        let read = tokio::time::timeout(WAIT, stream.read_buf(framer.read_space(4096)))
            .await
            .expect("data arrived in time")
            .expect("read");
        assert_ne!(read, 0, "connection closed before a whole frame arrived");
    }
}

async fn read_message(stream: &mut TcpStream, framer: &mut StreamFramer) -> Bytes {
    match read_frame(stream, framer).await {
        Frame::Message(data) => data,
        Frame::KeepAlivePing => panic!("expected a message, got a ping"),
    }
}

/// Reads until the server closes the connection (a reset counts as closed).
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut received)).await;
    match read.expect("the server closed the connection in time") {
        Ok(_) => {}
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset),
    }
    received
}

async fn udp_exchange(server: SocketAddr, bind: &str, datagram: &[u8]) -> (Vec<u8>, SocketAddr) {
    let client = UdpSocket::bind(bind).await.unwrap();
    client.send_to(datagram, server).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let (len, from) = tokio::time::timeout(WAIT, client.recv_from(&mut buf))
        .await
        .expect("UDP reply in time")
        .unwrap();
    buf.truncate(len);
    (buf, from)
}

#[tokio::test]
async fn server_reports_the_ports_it_bound() {
    let harness = start_default();
    let addrs = harness.server.listen_addrs();
    assert_eq!(addrs.len(), 2);
    assert!(addrs.iter().all(|listen| listen.addr.port() != 0));
    assert_eq!(harness.server.worker_count(), 2);
}

#[tokio::test]
async fn udp_datagram_is_echoed() {
    let mut harness = start_default();
    let server = harness.addr(TransportKind::Udp);
    let datagram = sip_message("over udp");
    let (reply, from) = udp_exchange(server, "127.0.0.1:0", &datagram).await;
    assert_eq!(reply, datagram);
    assert_eq!(from, server);
    let (data, meta) = harness.next_message().await;
    assert_eq!(data, datagram);
    assert_eq!(meta.kind, TransportKind::Udp);
    assert_eq!(meta.local, server);
    assert!(meta.conn.is_none());
    assert!(meta.worker < 2);
}

#[tokio::test]
async fn udp_over_ipv6_loopback() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipping: ::1 is not available on this machine");
        return;
    }
    let mut harness = start(test_config(&["udp:[::1]:0", "tcp:[::1]:0"]));
    let server = harness.addr(TransportKind::Udp);
    assert!(server.is_ipv6());
    let datagram = sip_message("over udp6");
    let (reply, from) = udp_exchange(server, "[::1]:0", &datagram).await;
    assert_eq!(reply, datagram);
    assert_eq!(from, server);
    assert!(harness.next_message().await.1.source.is_ipv6());

    let mut stream = harness.connect().await;
    let message = sip_message("over tcp6");
    stream.write_all(&message).await.unwrap();
    let mut framer = StreamFramer::new(MAX_MESSAGE);
    assert_eq!(read_message(&mut stream, &mut framer).await, message);
}

#[tokio::test]
async fn tcp_two_messages_in_one_write_are_delivered_separately() {
    let mut harness = start_default();
    let mut stream = harness.connect().await;
    let (first, second) = (sip_message("first"), sip_message(""));
    stream
        .write_all(&[first.clone(), second.clone()].concat())
        .await
        .unwrap();

    let (data, meta) = harness.next_message().await;
    assert_eq!(data, first);
    assert_eq!(meta.kind, TransportKind::Tcp);
    assert_eq!(meta.source, stream.local_addr().unwrap());
    assert!(meta.conn.is_some());
    let (data, second_meta) = harness.next_message().await;
    assert_eq!(data, second);
    assert_eq!(second_meta.conn, meta.conn);

    let mut framer = StreamFramer::new(MAX_MESSAGE);
    assert_eq!(read_message(&mut stream, &mut framer).await, first);
    assert_eq!(read_message(&mut stream, &mut framer).await, second);
}

#[tokio::test]
async fn tcp_message_split_across_writes_is_delivered_whole() {
    let mut harness = start_default();
    let mut stream = harness.connect().await;
    let message = sip_message("split\r\n\r\nacross writes");
    let cuts = [0, 10, message.len() - 20, message.len() - 3, message.len()];
    for piece in cuts.windows(2) {
        stream
            .write_all(&message[piece[0]..piece[1]])
            .await
            .unwrap();
        stream.flush().await.unwrap();
    }
    assert_eq!(harness.next_message().await.0, message);
    let mut framer = StreamFramer::new(MAX_MESSAGE);
    assert_eq!(read_message(&mut stream, &mut framer).await, message);
}

#[tokio::test]
async fn tcp_keepalive_ping_gets_a_pong() {
    let harness = start_default();
    let mut stream = harness.connect().await;
    stream.write_all(b"\r\n\r\n").await.unwrap();
    let mut pong = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut pong))
        .await
        .expect("pong in time")
        .unwrap();
    assert_eq!(&pong, b"\r\n");

    // The connection is still framed correctly afterwards.
    let message = sip_message("after ping");
    stream.write_all(&message).await.unwrap();
    let mut framer = StreamFramer::new(MAX_MESSAGE);
    assert_eq!(read_message(&mut stream, &mut framer).await, message);
}

#[tokio::test]
async fn tcp_message_without_content_length_is_a_framing_error_and_closes() {
    let mut harness = start_default();
    let mut stream = harness.connect().await;
    let head = b"OPTIONS sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TCP h\r\n\r\n";
    stream.write_all(head).await.unwrap();

    match harness.next_seen().await {
        Seen::FramingError {
            head: seen_head,
            error,
            meta,
        } => {
            assert_eq!(error, FramingError::MissingContentLength);
            assert_eq!(seen_head, Bytes::from_static(head));
            assert!(meta.conn.is_some());
        }
        other => panic!("expected a framing error, got {other:?}"),
    }
    let reply = read_to_close(&mut stream).await;
    assert_eq!(
        reply,
        b"SIP/2.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
    );
}

#[tokio::test]
async fn tcp_message_above_the_size_limit_is_too_large_and_closes() {
    let mut harness = start_default();
    let mut stream = harness.connect().await;
    let head =
        format!("MESSAGE sip:bob@example.com SIP/2.0\r\nContent-Length: {MAX_MESSAGE}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![b'x'; MAX_MESSAGE]).await.unwrap();

    match harness.next_seen().await {
        Seen::FramingError {
            head: seen_head,
            error,
            ..
        } => {
            assert_eq!(error, FramingError::TooLarge { limit: MAX_MESSAGE });
            assert_eq!(seen_head, head.as_bytes());
        }
        other => panic!("expected a framing error, got {other:?}"),
    }
    let reply = read_to_close(&mut stream).await;
    assert_eq!(
        reply,
        b"SIP/2.0 413 Message Too Large\r\nContent-Length: 0\r\n\r\n"
    );
}

#[tokio::test]
async fn tcp_connections_beyond_the_limit_are_refused() {
    let mut config = test_config(&["tcp:127.0.0.1:0"]);
    config.limits.max_connections = 2;
    config.limits.max_inbound_connections = Some(2);
    let mut harness = start(config);
    let mut framer = StreamFramer::new(MAX_MESSAGE);

    // An echo proves each of the first two connections was accepted and registered.
    let mut open = Vec::new();
    for body in ["first", "second"] {
        let mut stream = harness.connect().await;
        stream.write_all(&sip_message(body)).await.unwrap();
        assert_eq!(
            read_message(&mut stream, &mut framer).await,
            sip_message(body)
        );
        harness.next_message().await;
        open.push(stream);
    }
    assert_eq!(harness.server.connection_count(), 2);

    let mut refused = harness.connect().await;
    assert!(read_to_close(&mut refused).await.is_empty());

    // The accepted ones still work.
    open[0].write_all(&sip_message("still")).await.unwrap();
    assert_eq!(
        read_message(&mut open[0], &mut framer).await,
        sip_message("still")
    );
}

#[tokio::test]
async fn tcp_reply_to_conn_goes_back_on_that_connection() {
    let mut harness = start_default();
    let mut alice = harness.connect().await;
    let mut bob = harness.connect().await;
    alice.write_all(&sip_message("for alice")).await.unwrap();
    bob.write_all(&sip_message("for bob")).await.unwrap();

    let (mut alice_framer, mut bob_framer) = (
        StreamFramer::new(MAX_MESSAGE),
        StreamFramer::new(MAX_MESSAGE),
    );
    assert_eq!(
        read_message(&mut bob, &mut bob_framer).await,
        sip_message("for bob")
    );
    assert_eq!(
        read_message(&mut alice, &mut alice_framer).await,
        sip_message("for alice")
    );
    let (_, first) = harness.next_message().await;
    let (_, second) = harness.next_message().await;
    assert_ne!(first.conn, second.conn);
}

#[tokio::test]
async fn tcp_send_without_conn_opens_a_connection_then_reuses_it() {
    let mut harness = start_default();
    let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server_udp = harness.addr(TransportKind::Udp);
    let mut framer = StreamFramer::new(MAX_MESSAGE);

    let first = format!("FORWARD {peer_addr} one");
    client.send_to(first.as_bytes(), server_udp).await.unwrap();
    let (mut stream, _) = tokio::time::timeout(WAIT, peer.accept())
        .await
        .expect("the server connected in time")
        .unwrap();
    assert_eq!(
        read_message(&mut stream, &mut framer).await,
        sip_message(&first)
    );

    // The second request travels on the same connection: a new one would never be read.
    let second = format!("FORWARD {peer_addr} two");
    client.send_to(second.as_bytes(), server_udp).await.unwrap();
    assert_eq!(
        read_message(&mut stream, &mut framer).await,
        sip_message(&second)
    );
    assert_eq!(harness.server.connection_count(), 1);

    // What the peer sends back on that connection reaches the Worker too.
    stream.write_all(&sip_message("reply")).await.unwrap();
    assert_eq!(
        read_message(&mut stream, &mut framer).await,
        sip_message("reply")
    );
    let mut seen_reply = false;
    for _ in 0..3 {
        let (data, meta) = harness.next_message().await;
        if data == sip_message("reply") {
            assert_eq!(meta.source, peer_addr);
            assert!(meta.conn.is_some());
            seen_reply = true;
        }
    }
    assert!(seen_reply);
}

#[tokio::test]
async fn tcp_idle_connection_is_closed() {
    let mut config = test_config(&["tcp:127.0.0.1:0"]);
    config.limits.tcp_idle_timeout_secs = 1;
    let harness = start(config);
    let mut stream = harness.connect().await;
    stream
        .write_all(&sip_message("then silence"))
        .await
        .unwrap();
    let mut framer = StreamFramer::new(MAX_MESSAGE);
    read_message(&mut stream, &mut framer).await;
    assert!(read_to_close(&mut stream).await.is_empty());
}

#[tokio::test]
async fn tcp_peer_that_overflows_its_send_queue_is_disconnected() {
    let mut harness = start_default();
    let mut stream = harness.connect().await;
    let flood_request = request("FLOOD", "");
    stream.write_all(&flood_request).await.unwrap();
    harness.next_message().await;

    let received = read_to_close(&mut stream).await;
    assert!(
        received.len() < FLOOD_COPIES * flood_request.len(),
        "received {} bytes: the queue of {SEND_QUEUE} should have overflowed",
        received.len()
    );
}

#[tokio::test]
async fn a_port_held_by_another_socket_is_refused() {
    init_logs();
    let squatter = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap();
    let mut config = test_config(&[]);
    config.listen = vec![ListenAddr::new(TransportKind::Udp, taken)];
    let (seen, _) = mpsc::unbounded_channel();
    let error = Server::start(&config, Arc::new(ScriptedFactory { seen }))
        .err()
        .expect("the port is taken");
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
    assert!(
        error.to_string().contains(&format!("udp:{taken}")),
        "{error}"
    );
}

#[tokio::test]
async fn shutdown_closes_connections() {
    let harness = start_default();
    let mut stream = harness.connect().await;
    stream.write_all(&sip_message("hello")).await.unwrap();
    let mut framer = StreamFramer::new(MAX_MESSAGE);
    read_message(&mut stream, &mut framer).await;
    harness.server.shutdown();
    assert!(read_to_close(&mut stream).await.is_empty());
}

/// §8.1.3.1 / §17.1.4: a send the shell cannot carry out is reported to the Worker that asked
/// for it, so the core can fail the transaction instead of waiting for its timer.
#[tokio::test]
async fn tcp_connect_refused_is_reported_to_the_worker() {
    let mut harness = start_default();
    // A port that was free a moment ago and has no listener now: connect is refused.
    let closed = {
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        probe.local_addr().unwrap()
    };
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let forward = format!("FORWARD {closed} nobody home");
    client
        .send_to(forward.as_bytes(), harness.addr(TransportKind::Udp))
        .await
        .unwrap();
    let _ = harness.next_message().await;
    match harness.next_seen().await {
        Seen::Unreachable { kind, addr } => {
            assert_eq!(kind, TransportKind::Tcp);
            assert_eq!(addr, closed);
        }
        other => panic!("expected an Unreachable report, got {other:?}"),
    }
}
