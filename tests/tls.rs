//! TLS (RFC 3261 §26.2, RFC 5922) over real loopback sockets: the server with its built-in
//! relay, test user agents on TLS and UDP, and certificates made at test time with rcgen (a
//! test CA, a leaf for `localhost` / 127.0.0.1, and bad variants). Nothing sleeps: every wait
//! is for a message or an end of stream, bounded by a timeout.

mod common;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use common::ua::{connect_from, next_close, read_until_closed, show, watch_closes, TestUa, WAIT};
use moonroute::config::Config;
use moonroute::metrics::engine::{ConnectionRefusal, StreamTimeout};
use moonroute::metrics::EngineMetrics;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::{HeaderName, Message};
use moonroute::transport::registry::Limit;
use moonroute::transport::{ListenAddr, TransportKind};

// ----- certificates ---------------------------------------------------------------------------

/// A test CA that signs leaves.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

/// A certificate chain (leaf only) and its key, as PEM.
struct Leaf {
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    fn leaf(&self, sans: Vec<SanType>) -> Leaf {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "moonroute test");
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        Leaf {
            cert_pem: params.signed_by(&key, &issuer).unwrap().pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// The usual server leaf: `localhost` and 127.0.0.1.
    fn localhost(&self) -> Leaf {
        self.leaf(vec![dns("localhost"), ip("127.0.0.1")])
    }

    /// A client configuration trusting only this CA (names checked the HTTPS way, which is
    /// enough for a test client talking to the proxy).
    fn connector(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

impl Leaf {
    fn acceptor(&self) -> TlsAcceptor {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().unwrap())
}

fn ip(addr: &str) -> SanType {
    SanType::IpAddress(addr.parse().unwrap())
}

// ----- the server -----------------------------------------------------------------------------

/// The server's files: its certificate and key, and the CA it verifies next hops against.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// An open relay listening on UDP and TLS (127.0.0.1, ephemeral ports), two event loops, with
/// `leaf` as its certificate and `ca` as the roots for next hops.
fn config(files: &Files, ca: &Ca, leaf: &Leaf) -> Config {
    let mut config = Config {
        listen: vec![
            "udp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
            "tls:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
        ],
        workers: 2,
        ..Config::default()
    };
    config.proxy.relay_to_request_uri = true;
    config.tls.certificate = files.write("server.pem", &leaf.cert_pem);
    config.tls.private_key = files.write("server.key", &leaf.key_pem);
    config.tls.ca_file = files.write("ca.pem", &ca.pem);
    config
}

fn start(config: &Config) -> ServerHandle {
    Server::start(config, Arc::new(CoreFactory::new(config))).expect("server starts")
}

fn start_error(config: &Config) -> String {
    match Server::start(config, Arc::new(CoreFactory::new(config))) {
        Ok(_) => panic!("the server should refuse to start"),
        Err(error) => error.to_string(),
    }
}

fn tls_addr(server: &ServerHandle) -> SocketAddr {
    server.local_addr(TransportKind::Tls).unwrap()
}

fn udp_addr(server: &ServerHandle) -> SocketAddr {
    server.local_addr(TransportKind::Udp).unwrap()
}

fn vias(m: &Message) -> Vec<String> {
    m.values(HeaderName::Via)
        .map(|v| String::from_utf8_lossy(v.unwrap()).into_owned())
        .collect()
}

/// The Record-Route values, without our signature (checked by `without_signature`).
fn record_routes(m: &Message) -> Vec<String> {
    m.headers_named("Record-Route")
        .map(|v| common::without_signature(&String::from_utf8_lossy(v)))
        .collect()
}

// ----- tests ----------------------------------------------------------------------------------

/// INVITE in over TLS, out over UDP: the response comes back on the caller's TLS connection,
/// Via says TLS, and Record-Route is doubled with the TLS side marked `transport=tls`; the
/// in-dialog ACK and BYE follow it.
#[tokio::test]
async fn call_in_over_tls_out_over_udp() {
    let (files, ca) = (Files::new(), Ca::new("test CA"));
    let server = start(&config(&files, &ca, &ca.localhost()));
    let proxy = tls_addr(&server);
    let mut alice = TestUa::tls("alice", proxy, ca.connector(), "localhost").await;
    let mut bob = TestUa::udp("bob").await;

    let invite = alice.invite(&bob.uri()).await;
    let incoming = bob.expect_request("INVITE").await;
    let via = vias(&incoming);
    assert_eq!(via.len(), 2, "{}", show(&incoming));
    assert!(
        via[0].starts_with(&format!("SIP/2.0/UDP {}", udp_addr(&server))),
        "{via:?}"
    );
    assert!(
        via[1].starts_with(&format!("SIP/2.0/TLS {}", alice.local)),
        "{via:?}"
    );
    let rr = record_routes(&incoming);
    assert_eq!(
        rr,
        [
            format!("<sip:{};transport=udp;lr>", udp_addr(&server)),
            format!("<sip:{proxy};transport=tls;lr>"),
        ],
        "double Record-Route, outbound (UDP) interface on top"
    );

    bob.respond(&incoming, 180, "Ringing").await;
    bob.respond(&incoming, 200, "OK").await;
    alice.expect_response(100).await;
    alice.expect_response(180).await;
    let answer = alice.expect_response(200).await;
    assert_eq!(answer.call_id().unwrap(), invite.call_id().unwrap());
    assert_eq!(record_routes(&answer), rr);
    assert_eq!(
        server.connection_count(),
        1,
        "responses went back on alice's connection"
    );

    let mut dialog = alice.ack_2xx(&answer).await;
    assert_eq!(
        common::without_signature(&dialog.route_set[0]),
        rr[1],
        "alice's first hop is the TLS side"
    );
    bob.expect_request("ACK").await;
    alice.bye(&mut dialog).await;
    let bye = bob.expect_request("BYE").await;
    bob.respond(&bye, 200, "OK").await;
    alice.expect_response(200).await;
    assert_eq!(server.connection_count(), 1);
}

/// Requests in over UDP, out over TLS to a UAS whose certificate is checked against the CA of
/// `[tls] ca_file` for the Request-URI's host; the second request (a `sips:` URI for the same
/// host) reuses the connection.
#[tokio::test]
async fn requests_out_over_tls_are_verified_and_reuse_the_connection() {
    let (files, ca) = (Files::new(), Ca::new("test CA"));
    let server = start(&config(&files, &ca, &ca.localhost()));
    let mut alice = TestUa::udp("alice").await.via_proxy(udp_addr(&server));
    let mut bob = TestUa::tls_listener("bob", ca.localhost().acceptor()).await;
    let port = bob.local.port();

    let uris = [
        format!("sip:bob@localhost:{port};transport=tls"),
        format!("sips:bob@localhost:{port}"),
        format!("sip:bob@127.0.0.1:{port};transport=tls"),
    ];
    for uri in &uris {
        alice.options(uri).await;
        let incoming = bob.expect_request("OPTIONS").await;
        let via = vias(&incoming);
        assert!(via[0].starts_with("SIP/2.0/TLS 127.0.0.1:"), "{via:?}");
        bob.respond(&incoming, 200, "OK").await;
        alice.expect_response(200).await;
    }
    // `localhost` was verified against the dNSName, 127.0.0.1 against the IP address: the
    // name differs, so the last request opened a connection of its own.
    assert_eq!(server.connection_count(), 2);
}

/// Wraps a stream and keeps a copy of every byte read from it.
struct Recording<S> {
    inner: S,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        self.seen.lock().unwrap().extend_from_slice(&new);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TLS server for one connection with `leaf`'s certificate. Reports whether the handshake
/// succeeded and every byte the client sent until it closed.
async fn recording_tls_server(leaf: &Leaf) -> (SocketAddr, oneshot::Receiver<(bool, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = leaf.acceptor();
    let (report, reported) = oneshot::channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recording = Recording {
            inner: stream,
            seen: Arc::clone(&seen),
        };
        // Whatever the outcome, read on (raw) until the client closes.
        let (accepted, mut stream) = match acceptor.accept(recording).into_fallible().await {
            Ok(tls) => (true, tls.into_inner().0),
            Err((_, stream)) => (false, stream),
        };
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
        let all = seen.lock().unwrap().clone();
        let _ = report.send((accepted, all));
    });
    (addr, reported)
}

/// A next hop whose certificate is untrusted, or for another name: the handshake is refused,
/// the branch fails (the caller gets a 5xx) and no SIP byte leaves in plaintext.
#[tokio::test]
async fn bad_server_certificates_are_refused() {
    let (files, ca) = (Files::new(), Ca::new("test CA"));
    let server = start(&config(&files, &ca, &ca.localhost()));
    let mut alice = TestUa::udp("alice").await.via_proxy(udp_addr(&server));
    let stranger = Ca::new("another CA");
    let cases = [
        ("untrusted CA", stranger.localhost()),
        ("another name", ca.leaf(vec![dns("other.example.com")])),
        ("wildcard only", ca.leaf(vec![dns("*.localhost")])),
        ("another IP", ca.leaf(vec![ip("127.0.0.2")])),
    ];
    for (case, leaf) in cases {
        let (addr, reported) = recording_tls_server(&leaf).await;
        let uri = format!("sip:bob@localhost:{};transport=tls", addr.port());
        alice.options(&uri).await;
        let answer = alice.recv_response(WAIT).await;
        assert!(
            answer.status().unwrap() >= 500,
            "{case}: the caller gets a server error, got\n{}",
            show(&answer)
        );
        let (accepted, seen) = tokio::time::timeout(WAIT, reported).await.unwrap().unwrap();
        assert!(!accepted, "{case}: the handshake must fail");
        assert!(!seen.is_empty(), "{case}: a ClientHello was sent");
        let text = String::from_utf8_lossy(&seen);
        assert!(
            !text.contains("SIP/2.0") && !text.contains("OPTIONS"),
            "{case}: SIP sent in plaintext: {text:?}"
        );
    }
}

/// Plaintext SIP and random bytes on the TLS port: the connection is closed and the server
/// goes on serving TLS clients.
#[tokio::test]
async fn plaintext_and_garbage_on_the_tls_port_are_dropped() {
    let (files, ca) = (Files::new(), Ca::new("test CA"));
    let server = start(&config(&files, &ca, &ca.localhost()));
    let proxy = tls_addr(&server);
    let plaintext = format!(
        "OPTIONS sip:{proxy} SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bK-plain\r\n\
         Max-Forwards: 70\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:{proxy}>\r\n\
         Call-ID: plain\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for bytes in [plaintext.as_bytes(), &garbage] {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        // The server may close before it has read everything: a failed write is fine.
        let _ = stream.write_all(bytes).await;
        let answer = read_until_closed(&mut stream, WAIT).await;
        assert!(
            !String::from_utf8_lossy(&answer).contains("SIP/2.0"),
            "no SIP answer in plaintext"
        );
    }
    let mut alice = TestUa::tls("alice", proxy, ca.connector(), "localhost").await;
    let options = alice.options(&format!("sip:{proxy}")).await;
    let answer = alice.expect_response(200).await;
    assert_eq!(answer.call_id().unwrap(), options.call_id().unwrap());
}

/// A client that connects and never sends its ClientHello is dropped after the handshake
/// timeout.
#[tokio::test]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let (files, ca) = (Files::new(), Ca::new("test CA"));
    let mut config = config(&files, &ca, &ca.localhost());
    config.tls.handshake_timeout_ms = 300;
    let server = start(&config);
    let started = Instant::now();
    let mut stream = TcpStream::connect(tls_addr(&server)).await.unwrap();
    let seen = read_until_closed(&mut stream, WAIT).await;
    assert!(seen.is_empty(), "nothing is sent to a silent client");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed by the handshake timeout, not at once ({:?})",
        started.elapsed()
    );
}

#[test]
fn start_up_errors_name_the_problem() {
    let (files, ca) = (Files::new(), Ca::new("test CA"));
    let leaf = ca.localhost();

    let mut missing = config(&files, &ca, &leaf);
    missing.tls.certificate = files.path("missing.pem");
    let error = start_error(&missing);
    assert!(
        error.contains("missing.pem") && error.contains("cannot read"),
        "{error}"
    );

    let mut no_certificate = config(&files, &ca, &leaf);
    no_certificate.tls.certificate = files.write("empty.pem", "no PEM here\n");
    let error = start_error(&no_certificate);
    assert!(
        error.contains("empty.pem") && error.contains("no certificate"),
        "{error}"
    );

    let mut no_key = config(&files, &ca, &leaf);
    no_key.tls.private_key = files.write("nokey.pem", &leaf.cert_pem);
    let error = start_error(&no_key);
    assert!(
        error.contains("nokey.pem") && error.contains("no private key"),
        "{error}"
    );

    let mut mismatch = config(&files, &ca, &leaf);
    mismatch.tls.private_key = files.write("other.key", &ca.localhost().key_pem);
    let error = start_error(&mismatch);
    assert!(
        error.contains("other.key") && error.contains("does not match"),
        "{error}"
    );

    let mut unconfigured = config(&files, &ca, &leaf);
    unconfigured.tls = Default::default();
    let error = start_error(&unconfigured);
    assert!(
        error.contains("tls:") && error.contains("certificate and private_key are not set"),
        "{error}"
    );

    let mut bad_ca = config(&files, &ca, &leaf);
    bad_ca.tls.ca_file = files.path("no-ca.pem");
    let error = start_error(&bad_ca);
    assert!(error.contains("no-ca.pem"), "{error}");

    let mut shared = config(&files, &ca, &leaf);
    shared.listen = vec![
        "tcp:127.0.0.1:15999".parse().unwrap(),
        "tls:127.0.0.1:15999".parse().unwrap(),
    ];
    let error = start_error(&shared);
    assert!(error.contains("cannot both listen"), "{error}");

    // The same files, consistent, start.
    drop(start(&config(&files, &ca, &leaf)));
}

/// Beyond `max_handshakes` handshakes in progress on a loop, a new TLS connection is closed at
/// once; the ones in progress keep their slot and can still complete.
#[tokio::test]
async fn handshakes_beyond_the_cap_are_refused_at_once() {
    let (files, ca) = (Files::new(), Ca::new("test CA"));
    let mut config = config(&files, &ca, &ca.localhost());
    config.workers = 1;
    config.tls.max_handshakes = 1;
    let server = start(&config);
    let proxy = tls_addr(&server);
    let slow = TcpStream::connect(proxy).await.unwrap();
    let mut refused = TcpStream::connect(proxy).await.unwrap();
    let started = Instant::now();
    read_until_closed(&mut refused, WAIT).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once, not by the handshake timeout"
    );
    // The first client, silent so far, still completes its handshake and is served.
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = ca.connector().connect(name, slow).await.expect("handshake");
    let options = format!(
        "OPTIONS sip:{proxy} SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:9;branch=z9hG4bK-cap\r\n\
         Max-Forwards: 70\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:{proxy}>\r\n\
         Call-ID: cap\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    tls.write_all(options.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, tls.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(
        answer.starts_with(b"SIP/2.0 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// Clients on 127.0.0.2 that connect to the TLS port and stall their handshake: the address
/// holds at most `max_pending_connections_per_ip` of them (the next is refused at once, with
/// its refused line), each is dropped at the handshake timeout (refused line, counted), and a
/// client on 127.0.0.1 completes its handshake and is served meanwhile. Once they are gone
/// the address may connect again.
#[tokio::test]
async fn stalled_handshakes_are_bounded_per_address() {
    let mut refused = common::refused_log::subscribe();
    let (files, ca) = (Files::new(), Ca::new("test CA"));
    let mut config = config(&files, &ca, &ca.localhost());
    config.tls.handshake_timeout_ms = 1500;
    config.limits.max_pending_connections_per_ip = Some(2);
    let metrics = EngineMetrics::detached();
    let factory = CoreFactory::new(&config).with_metrics(Arc::clone(&metrics));
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    let proxy = tls_addr(&server);
    let stranger = "127.0.0.2".parse().unwrap();

    // Three for two places: whichever is accepted last (two event loops accept) is refused.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(connect_from(stranger, proxy).await);
    }
    let mut closes = watch_closes(stalled);
    next_close(&mut closes, WAIT).await;
    // At once, by the limit, not by the handshake timeout:
    refused
        .expect(
            "127.0.0.2",
            "limits.max_pending_connections_per_ip (2) reached",
            WAIT,
        )
        .await;

    let mut alice = TestUa::tls("alice", proxy, ca.connector(), "localhost").await;
    let options = alice.options(&format!("sip:{proxy}")).await;
    let answer = alice.expect_response(200).await;
    assert_eq!(answer.call_id().unwrap(), options.call_id().unwrap());

    for _ in 0..2 {
        next_close(&mut closes, WAIT).await;
    }
    for _ in 0..2 {
        let reason = "TLS handshake not finished within 1500 ms (tls.handshake_timeout_ms)";
        refused.expect("127.0.0.2", reason, WAIT).await;
    }
    let transport = &metrics.transport;
    let pending = ConnectionRefusal::Limit(Limit::PendingConnectionsPerIp);
    assert_eq!(transport.refused_count(TransportKind::Tls, pending), 1);
    let handshake = StreamTimeout::Handshake;
    assert_eq!(transport.timed_out_count(TransportKind::Tls, handshake), 2);

    let again = connect_from(stranger, proxy).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    ca.connector()
        .connect(name, again)
        .await
        .expect("127.0.0.2 may connect again once its stalled handshakes are gone");
}
