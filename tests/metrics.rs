//! The engine's metrics end to end: a server routed by `scripts/default.lua` (without auth)
//! with its Prometheus endpoint, driven by test user agents on loopback sockets and scraped
//! over a real TCP connection after each step; each step asserts exactly how far the
//! counters it concerns moved, and every scrape is checked to be valid exposition format.
//! Then the real binary: `--metrics-listen`, `ctl stats [PREFIX]` and `ctl status`.
//!
//! Nothing sleeps to wait for behaviour: every wait is for a message or a log line, bounded.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::exposition::assert_valid_exposition;
use common::ua::{expect_status, header_text, TestUa, WAIT};
use moonroute::config::{Config, LocationBackend};
use moonroute::metrics::http::MetricsEndpoint;
use moonroute::metrics::EngineMetrics;
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::Message;
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

// ----- helpers -------------------------------------------------------------------------------

struct Running {
    _server: ServerHandle,
    _host: Arc<ScriptHost>,
    _endpoint: MetricsEndpoint,
    _dir: TempDir,
    udp: SocketAddr,
    tcp: SocketAddr,
    metrics: SocketAddr,
}

/// One event loop on UDP and TCP ports of 127.0.0.1, scripts/default.lua without auth,
/// registrations in memory, and the metrics endpoint on an ephemeral port. T1 is 3 s, so no
/// retransmission timer fires while a step runs: the counts are exact.
async fn start() -> Running {
    let dir = TempDir::new().unwrap();
    let mut config = Config {
        listen: vec![
            "udp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
            "tcp:127.0.0.1:0".parse::<ListenAddr>().unwrap(),
        ],
        workers: 1,
        script: common::default_script_without_auth(),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Memory;
    config.timers.t1_ms = 3000;
    config.timers.t2_ms = 4000;
    let host = ScriptHost::from_config(&config).expect("the script loads");
    let registry = Arc::clone(&host.services().metrics);
    let metrics = EngineMetrics::register(&registry);
    let factory = CoreFactory::with_router(&config, host.router_factory()).with_metrics(metrics);
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    let endpoint = MetricsEndpoint::bind("127.0.0.1:0".parse().unwrap(), registry)
        .await
        .expect("the metrics endpoint binds");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        tcp: server.local_addr(TransportKind::Tcp).unwrap(),
        metrics: endpoint.local_addr(),
        _server: server,
        _host: host,
        _endpoint: endpoint,
        _dir: dir,
    }
}

/// Sends `request` over a new TCP connection and reads the answer until the server closes.
async fn http(addr: SocketAddr, request: &str) -> String {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect to /metrics");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        String::from_utf8(answer).expect("UTF-8 answer")
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .expect("the endpoint answers in time")
}

/// GET /metrics: asserts a 200 with the exposition content type and a valid body, and returns
/// the samples by `name{labels}`.
async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let answer = http(addr, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nConnection: close"), "{head}");
    assert!(
        head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
        "{head}"
    );
    assert_valid_exposition(body);
    samples(body)
}

fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap_or(f64::NAN))
        })
        .collect()
}

/// Asserts that each series moved by exactly its expected amount between two scrapes (a
/// series absent from a scrape counts as 0).
fn assert_moved(
    step: &str,
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    expected: &[(&str, f64)],
) {
    let mut wrong = Vec::new();
    for (series, delta) in expected {
        let was = before.get(*series).copied().unwrap_or(0.0);
        let now = after.get(*series).copied().unwrap_or(0.0);
        if now - was != *delta {
            wrong.push(format!("{series}: {was} -> {now}, expected +{delta}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{step}:\n{}\nall changes: {:#?}",
        wrong.join("\n"),
        changes(before, after)
    );
}

fn changes(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Vec<String> {
    after
        .iter()
        .filter(|(series, now)| {
            !series.starts_with("moonroute_uptime")
                && before.get(*series).copied().unwrap_or(0.0) != **now
        })
        .map(|(series, now)| {
            format!(
                "{series}: {} -> {now}",
                before.get(series).copied().unwrap_or(0.0)
            )
        })
        .collect()
}

fn method(name: &str) -> String {
    format!("moonroute_requests_received_total{{method=\"{name}\"}}")
}

fn sent(code: u16) -> String {
    format!("moonroute_responses_sent_total{{code=\"{code}\"}}")
}

fn received(code: u16) -> String {
    format!("moonroute_responses_received_total{{code=\"{code}\"}}")
}

fn created(kind: &str) -> String {
    format!("moonroute_transactions_created_total{{kind=\"{kind}\"}}")
}

fn messages(transport: &str, direction: &str) -> String {
    format!("moonroute_messages_total{{transport=\"{transport}\",direction=\"{direction}\"}}")
}

const RETRANSMISSIONS_RECEIVED: &str = "moonroute_retransmissions_total{direction=\"received\"}";
const RETRANSMISSIONS_SENT: &str = "moonroute_retransmissions_total{direction=\"sent\"}";
const PARSE_ERRORS_UDP: &str = "moonroute_parse_errors_total{transport=\"udp\"}";

/// Waits for a response with `code` on a raw socket (bounded), skipping others.
async fn raw_response(socket: &UdpSocket, code: u16) -> Message {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, _) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {code} in time"))
            .unwrap();
        let message = Message::parse(bytes::Bytes::copy_from_slice(&buf[..n])).unwrap();
        if message.status() == Some(code) {
            return message;
        }
    }
}

// ----- the endpoint, step by step --------------------------------------------------------

#[tokio::test]
async fn counters_follow_a_registration_a_call_a_retransmission_garbage_and_a_tcp_client() {
    let proxy = start().await;
    let first = scrape(proxy.metrics).await;
    assert_eq!(first.get("moonroute_transactions_live"), Some(&0.0));
    assert_eq!(first.get("moonroute_location_bindings"), Some(&0.0));
    assert!(
        first
            .keys()
            .any(|k| k.starts_with("moonroute_build_info{version=\"")
                && k.ends_with(",lua=\"Lua 5.4\"}")),
        "{first:?}"
    );
    assert!(first.contains_key("moonroute_uptime_seconds"));

    // 1. Bob registers: one REGISTER answered 200, one binding.
    let mut bob = TestUa::udp("bob").await;
    let aor = format!("sip:bob@{}", proxy.udp);
    let register = format!(
        "REGISTER sip:{proxy} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-metrics-register;rport\r\n\
         Max-Forwards: 70\r\n\
         From: <{aor}>;tag=bob1\r\n\
         To: <{aor}>\r\n\
         Call-ID: metrics-register@127.0.0.1\r\n\
         CSeq: 1 REGISTER\r\n\
         Contact: <{contact}>\r\n\
         Expires: 3600\r\n\
         Content-Length: 0\r\n\r\n",
        proxy = proxy.udp,
        local = bob.local,
        contact = bob.uri(),
    );
    bob.send_raw(register.as_bytes(), proxy.udp).await;
    expect_status(&bob.recv_response(WAIT).await, 200);
    let registered = scrape(proxy.metrics).await;
    assert_moved(
        "REGISTER",
        &first,
        &registered,
        &[
            (&method("REGISTER"), 1.0),
            (&sent(200), 1.0),
            ("moonroute_registrations_total", 1.0),
            (&created("non_invite_server"), 1.0),
            (&messages("udp", "in"), 1.0),
            (&messages("udp", "out"), 1.0),
            ("moonroute_location_bindings", 1.0),
            ("moonroute_transactions_live", 0.0),
        ],
    );

    // 2. Alice calls bob through the proxy: INVITE/100/180/200/ACK, then BYE/200.
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);
    let invite = alice.invite(&aor).await;
    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 180, "Ringing").await;
    bob.respond(&incoming, 200, "OK").await;
    alice.expect_response(100).await;
    alice.expect_response(180).await;
    let answer = alice.expect_response(200).await;
    let mut dialog = alice.ack_2xx(&answer).await;
    bob.expect_request("ACK").await;
    alice.bye(&mut dialog).await;
    let bye = bob.expect_request("BYE").await;
    assert_eq!(bye.call_id().unwrap(), invite.call_id().unwrap());
    bob.respond(&bye, 200, "OK").await;
    alice.expect_response(200).await;
    let called = scrape(proxy.metrics).await;
    assert_moved(
        "call",
        &registered,
        &called,
        &[
            (&method("INVITE"), 1.0),
            (&method("ACK"), 1.0),
            (&method("BYE"), 1.0),
            (&received(180), 1.0),
            (&received(200), 2.0),
            (&sent(100), 1.0),
            (&sent(180), 1.0),
            (&sent(200), 2.0),
            (&created("invite_server"), 1.0),
            (&created("invite_client"), 1.0),
            (&created("non_invite_server"), 1.0),
            (&created("non_invite_client"), 1.0),
            // In: INVITE, 180, 200, ACK, BYE, 200. Out: 100, INVITE, 180, 200, ACK, BYE, 200.
            (&messages("udp", "in"), 6.0),
            (&messages("udp", "out"), 7.0),
            (RETRANSMISSIONS_RECEIVED, 0.0),
            (RETRANSMISSIONS_SENT, 0.0),
            (PARSE_ERRORS_UDP, 0.0),
        ],
    );

    // 3. An INVITE to nobody gets 404; sent again, its transaction absorbs it and repeats
    // the 404 (RFC 3261 §17.2.1); the ACK completes it.
    let raw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = raw.local_addr().unwrap();
    let invite = format!(
        "INVITE sip:nobody@{proxy} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-metrics-retransmitted;rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:carol@{local}>;tag=carol1\r\n\
         To: <sip:nobody@{proxy}>\r\n\
         Call-ID: metrics-retransmitted@127.0.0.1\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:carol@{local}>\r\n\
         Content-Length: 0\r\n\r\n",
        proxy = proxy.udp
    );
    raw.send_to(invite.as_bytes(), proxy.udp).await.unwrap();
    let not_found = raw_response(&raw, 404).await;
    raw.send_to(invite.as_bytes(), proxy.udp).await.unwrap();
    let again = raw_response(&raw, 404).await;
    assert_eq!(again.to_bytes(), not_found.to_bytes(), "the same 404 again");
    let to = header_text(&not_found, "To").expect("a To header");
    let ack = format!(
        "ACK sip:nobody@{proxy} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-metrics-retransmitted;rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:carol@{local}>;tag=carol1\r\n\
         To: {to}\r\n\
         Call-ID: metrics-retransmitted@127.0.0.1\r\n\
         CSeq: 1 ACK\r\n\
         Content-Length: 0\r\n\r\n",
        proxy = proxy.udp
    );
    raw.send_to(ack.as_bytes(), proxy.udp).await.unwrap();
    // The ACK is absorbed (no answer): an OPTIONS after it, answered, proves it was read.
    let options = format!(
        "OPTIONS sip:{proxy} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-metrics-options;rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:carol@{local}>;tag=carol2\r\n\
         To: <sip:{proxy}>\r\n\
         Call-ID: metrics-options@127.0.0.1\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n",
        proxy = proxy.udp
    );
    raw.send_to(options.as_bytes(), proxy.udp).await.unwrap();
    raw_response(&raw, 200).await;
    let retransmitted = scrape(proxy.metrics).await;
    assert_moved(
        "retransmitted INVITE",
        &called,
        &retransmitted,
        &[
            (&method("INVITE"), 2.0),
            (&method("ACK"), 1.0),
            (&method("OPTIONS"), 1.0),
            (&created("invite_server"), 1.0),
            (&created("invite_client"), 0.0),
            (RETRANSMISSIONS_RECEIVED, 1.0),
            (RETRANSMISSIONS_SENT, 1.0),
            (&sent(404), 2.0),
            (&sent(200), 1.0),
            (&messages("udp", "in"), 4.0),
            (PARSE_ERRORS_UDP, 0.0),
        ],
    );

    // 4. A datagram that is not SIP: dropped, counted as a parse error, nothing sent.
    raw.send_to(b"\x16\x03\x01 not a SIP message\r\n\r\n", proxy.udp)
        .await
        .unwrap();
    // Datagrams of one socket are handled in order: the OPTIONS answer proves the garbage
    // was read first.
    let options = options.replace("metrics-options", "metrics-options-2");
    raw.send_to(options.as_bytes(), proxy.udp).await.unwrap();
    raw_response(&raw, 200).await;
    let garbage = scrape(proxy.metrics).await;
    assert_moved(
        "garbage",
        &retransmitted,
        &garbage,
        &[
            (PARSE_ERRORS_UDP, 1.0),
            (&messages("udp", "in"), 2.0),
            (&messages("udp", "out"), 1.0),
            (&method("OPTIONS"), 1.0),
            (&sent(400), 0.0),
        ],
    );

    // 5. A TCP client: one inbound connection, open while the client lives.
    let mut dave = TestUa::tcp("dave", proxy.tcp).await;
    dave.options(&format!("sip:{}", proxy.tcp)).await;
    dave.expect_response(200).await;
    let tcp = scrape(proxy.metrics).await;
    assert_moved(
        "TCP client",
        &garbage,
        &tcp,
        &[
            (
                "moonroute_connections_opened_total{transport=\"tcp\",direction=\"inbound\"}",
                1.0,
            ),
            (
                "moonroute_connections_opened_total{transport=\"tcp\",direction=\"outbound\"}",
                0.0,
            ),
            ("moonroute_connections_open{transport=\"tcp\"}", 1.0),
            (&messages("tcp", "in"), 1.0),
            (&messages("tcp", "out"), 1.0),
            (&messages("udp", "in"), 0.0),
            (&method("OPTIONS"), 1.0),
            (&sent(200), 1.0),
        ],
    );
}

#[tokio::test]
async fn other_paths_get_404_other_methods_405_and_garbage_400() {
    let proxy = start().await;
    let answer = http(proxy.metrics, "GET / HTTP/1.1\r\nHost: test\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
    assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");
    let answer = http(
        proxy.metrics,
        "POST /metrics HTTP/1.1\r\nHost: test\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\r\nAllow: GET\r\n"), "{answer}");
    let answer = http(proxy.metrics, "hello\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Filler: {}\r\n\r\n",
        "x".repeat(10_000)
    );
    let answer = http(proxy.metrics, &huge).await;
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{answer}"
    );
    // Still serving.
    scrape(proxy.metrics).await;
}

// ----- the real binary: --metrics-listen, ctl stats, ctl status -----------------------------

#[test]
fn ctl_stats_and_status_and_the_endpoint_of_the_real_binary() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = TempDir::new().unwrap();
    let socket = dir.path().join("ctl.sock");
    let config = common::write_binary_config(dir.path(), &socket);
    let mut server = Command::new(env!("CARGO_BIN_EXE_moonroute"))
        .args(["run", "--metrics-listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moonroute");
    // The metrics address comes from its log line; the control socket is ready after it.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stderr = server.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut metrics = None;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("metrics endpoint ready") {
                metrics = line
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("listen="))
                    .and_then(|addr| addr.parse::<SocketAddr>().ok());
            }
            if line.contains("control socket ready") {
                let _ = ready_tx.send(metrics);
            }
        }
    });
    let ready = ready_rx.recv_timeout(Duration::from_secs(20));
    let ctl = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_moonroute"))
            .arg("ctl")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let result = std::panic::catch_unwind(|| {
        let metrics = ready
            .expect("the server is ready")
            .expect("the metrics endpoint logged its address");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let scraped = runtime.block_on(scrape(metrics));
        assert!(scraped.contains_key("moonroute_transactions_live"));

        let (code, out, err) = ctl(&["stats"]);
        assert_eq!(code, Some(0), "{err}");
        assert!(!out.contains('#'), "no comment lines:\n{out}");
        assert!(out.contains("\nmoonroute_transactions_live 0\n"), "{out}");
        assert!(out.contains("moonroute_build_info{version=\""), "{out}");

        let (code, out, err) = ctl(&["stats", "moonroute_transactions"]);
        assert_eq!(code, Some(0), "{err}");
        assert!(!out.is_empty());
        for line in out.lines() {
            assert!(line.starts_with("moonroute_transactions"), "{line}");
        }
        assert!(
            out.contains("moonroute_transactions_created_total{kind=\"invite_server\"} 0\n"),
            "{out}"
        );

        let (code, out, err) = ctl(&["stats", "nosuch_"]);
        assert_eq!(code, Some(1), "{out}");
        assert!(
            err.starts_with("no metric name starts with \"nosuch_\"; the metrics are: "),
            "{err}"
        );

        let (code, out, err) = ctl(&["status"]);
        assert_eq!(code, Some(0), "{err}");
        assert!(out.contains("\nuptime: "), "{out}");
        assert!(out.contains("\nlive transactions: 0\n"), "{out}");
        assert!(
            out.contains("\nlocation: 0 bindings, sled (this node only, durable)\n"),
            "{out}"
        );
        assert!(out.contains("\nkv: memory (this node only)\n"), "{out}");
    });
    let _ = server.kill();
    let _ = server.wait();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn a_metrics_address_in_use_stops_the_start_with_a_sentence() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new().unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/default.lua");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_moonroute"))
        .args(["run", "--listen", "udp:127.0.0.1:0", "--control-socket"])
        .arg(dir.path().join("ctl.sock"))
        .arg("--script")
        .arg(&script)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--metrics-listen", &addr])
        .env("RUST_LOG", "off")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run moonroute");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "moonroute: cannot serve metrics on {addr} (metrics.listen): "
        )),
        "{stderr}"
    );
}

// ----- DNS -----------------------------------------------------------------------------------

/// `moonroute_dns_lookups_total` counts each lookup RFC 3263 resolution issues, by type (as
/// many as the name server saw for an answered name: no retries were needed), and
/// `moonroute_dns_failures_total` the ones left unanswered (a silent name server), not the
/// empty answers.
#[tokio::test]
async fn dns_lookups_and_failures_are_counted_by_record_type() {
    use common::dns_server::{DnsServer, Record, RecordType};
    use moonroute::dns::{Query, Resolver};

    let dns = DnsServer::start(vec![Record::a(
        "plain.test",
        std::net::Ipv4Addr::new(192, 0, 2, 7),
        60,
    )]);
    let registry = moonroute::metrics::Registry::new();
    let metrics = EngineMetrics::register(&registry);
    let resolver = Resolver::from_config(&dns.config(200))
        .unwrap()
        .with_metrics(metrics.dns.clone());
    let query = |host: &str| Query {
        host: host.to_owned(),
        port: None,
        transport: None,
        secure: false,
    };
    let found = tokio::time::timeout(
        WAIT,
        resolver.locate(&query("plain.test"), &[TransportKind::Udp]),
    )
    .await
    .expect("in time");
    assert!(found.is_ok(), "{found:?}");
    let after_plain = samples(&registry.render());
    let types = [
        ("NAPTR", RecordType::NAPTR),
        ("SRV", RecordType::SRV),
        ("A", RecordType::A),
        ("AAAA", RecordType::AAAA),
    ];
    let served = |rtype| {
        dns.query_log()
            .iter()
            .filter(|(_, t, _)| *t == rtype)
            .map(|(_, _, n)| n)
            .sum::<usize>() as f64
    };
    for (label, rtype) in types {
        let lookups = after_plain[&format!("moonroute_dns_lookups_total{{type=\"{label}\"}}")];
        assert_eq!(lookups, served(rtype), "{label}: {:?}", dns.query_log());
        assert_eq!(
            after_plain[&format!("moonroute_dns_failures_total{{type=\"{label}\"}}")],
            0.0,
            "{label}"
        );
    }
    assert!(after_plain["moonroute_dns_lookups_total{type=\"A\"}"] >= 1.0);

    dns.silence("silent.test");
    let failed = tokio::time::timeout(
        WAIT,
        resolver.locate(&query("silent.test"), &[TransportKind::Udp]),
    )
    .await
    .expect("in time");
    assert!(failed.is_err(), "{failed:?}");
    let after_silent = samples(&registry.render());
    assert_moved(
        "silent name server",
        &after_plain,
        &after_silent,
        &[
            ("moonroute_dns_failures_total{type=\"NAPTR\"}", 1.0),
            ("moonroute_dns_failures_total{type=\"A\"}", 1.0),
            ("moonroute_dns_failures_total{type=\"AAAA\"}", 1.0),
            // _sip._udp.silent.test is answered (no such name): not a failure.
            ("moonroute_dns_failures_total{type=\"SRV\"}", 0.0),
        ],
    );
}
