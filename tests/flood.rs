//! Flood and abuse protection end to end, over real UDP on loopback:
//! - `scripts/default.lua`'s pike + ban idiom: a source flooding far over `[pike]` is banned
//!   (its requests dropped) while a legitimate source on another address keeps being served,
//!   with zero failures, during and after the flood; the ban ends after its TTL.
//! - the overload answer: with `limits.max_backlog` requests waiting for DNS, a new request
//!   gets 503 with Retry-After before the script runs, while OPTIONS to the server itself is
//!   still answered; and, driving the core directly with load samples in simulated time, a
//!   loop saturated for longer than `limits.overload_after_ms` refuses new requests with 503
//!   but still serves retransmissions and requests inside a dialog, and serves everything
//!   again once it has time to spare.
//! - `req:sanity()` through the default script: requests the engine accepts but the stricter
//!   checks refuse get the reason in a 400 (or 416).
//!
//! Nothing sleeps to wait for behaviour: every wait is for a message or a DNS query, bounded by
//! a timeout. Waiting for the *absence* of an answer (a banned source) is a bounded wait too.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::dns_server::{DnsServer, RecordType};
use common::flood::Flooder;
use common::ua::{expect_status, header_text, TestUa, WAIT};
use moonroute::config::{Config, LocationBackend};
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::Message;
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;

const DOMAIN: &str = "moonroute.test";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn config(script: &Path) -> Config {
    let mut config = Config {
        listen: vec!["udp:127.0.0.1:0".parse::<ListenAddr>().unwrap()],
        domains: vec![DOMAIN.to_owned()],
        workers: 2,
        script: script.to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Memory;
    config
}

fn start(config: &Config) -> (ServerHandle, SocketAddr) {
    let host = ScriptHost::from_config(config).expect("the script loads");
    let factory = CoreFactory::with_router(config, host.router_factory());
    let server = Server::start(config, Arc::new(factory)).expect("server starts");
    let udp = server.local_addr(TransportKind::Udp).unwrap();
    (server, udp)
}

/// scripts/default.lua (digest auth off: tests/auth.rs covers it) with its ban shortened to
/// `seconds`, written into `dir`.
fn default_script_with_ban(dir: &TempDir, seconds: u32) -> PathBuf {
    let text = std::fs::read_to_string(common::default_script_without_auth()).unwrap();
    let line = "local BAN_SECONDS = 300";
    assert!(text.contains(line), "default.lua sets {line}");
    let path = dir.path().join("default.lua");
    std::fs::write(
        &path,
        text.replace(line, &format!("local BAN_SECONDS = {seconds}")),
    )
    .unwrap();
    path
}

/// `carol` registers, then `dave` sends her a MESSAGE through the proxy (both UAs' outbound
/// proxy), which she answers.
/// Any failure panics: the legitimate source must be served every time.
async fn legitimate_exchange(carol: &mut TestUa, dave: &mut TestUa) {
    let aor = format!("sip:carol@{DOMAIN}");
    carol
        .request("REGISTER", &aor)
        .header("Expires", "300")
        .await;
    carol.expect_final(200).await;
    dave.request("MESSAGE", &aor)
        .body("text/plain", "hello")
        .await;
    let message = carol.expect_request("MESSAGE").await;
    carol.respond(&message, 200, "OK").await;
    dave.expect_final(200).await;
}

#[tokio::test]
async fn a_flooding_source_is_banned_while_a_legitimate_source_is_served() {
    const LIMIT: u32 = 100;
    const FLOOD: u32 = 500;
    const BAN: Duration = Duration::from_secs(1);
    let dir = TempDir::new().unwrap();
    let mut config = config(&default_script_with_ban(&dir, BAN.as_secs() as u32));
    // The default window (2 s): the flood below takes ~0.1 s, well inside one window.
    config.pike.max_requests = LIMIT;
    // What is tested is the script's ban. A debug build on a loaded machine can be 500 ms
    // behind its socket during the burst, and would then (rightly) refuse new requests from
    // the legitimate source too; overload control has its own test below.
    config.limits.overload_after_ms = 0;
    let (_server, server) = start(&config);

    let mut flooder = Flooder::bind([127, 0, 0, 2], DOMAIN).await;
    let legit: SocketAddr = "127.0.0.3:0".parse().unwrap();
    let mut carol = TestUa::udp_on("carol", legit).await;
    let mut dave = TestUa::udp_on("dave", legit).await;
    carol.outbound = Some(server);
    dave.outbound = Some(server);

    // The flood: 500 requests, as fast as the socket takes them, with a legitimate exchange
    // every 50 (each one must succeed).
    let flood_started = Instant::now();
    let mut exchanges = 0;
    for n in 1..=FLOOD {
        flooder.send(server, "nobody").await;
        if n % 50 == 0 {
            legitimate_exchange(&mut carol, &mut dave).await;
            exchanges += 1;
        }
    }
    // The first LIMIT requests were answered; from the next one on, the source is banned and
    // its requests are dropped.
    let answered = flooder.drain(Duration::from_millis(500), 404).await;
    assert_eq!(
        answered, LIMIT as usize,
        "answered {answered} of {FLOOD} flood requests"
    );
    flooder.send(server, "nobody").await;
    assert_eq!(
        flooder.answer(Duration::from_millis(300)).await,
        None,
        "a banned source gets no answer"
    );
    // Served after the flood too.
    legitimate_exchange(&mut carol, &mut dave).await;
    exchanges += 1;
    assert_eq!(
        exchanges,
        FLOOD / 50 + 1,
        "every legitimate exchange succeeded"
    );

    // The ban ends after its TTL (and pike's flag once a window passes within the limit):
    // a request every 100 ms, within the limit, until one is answered.
    let deadline = Instant::now() + Duration::from_secs(10);
    let served_again = loop {
        assert!(Instant::now() < deadline, "the ban never ended");
        flooder.send(server, "nobody").await;
        if let Some(status) = flooder.answer(Duration::from_millis(100)).await {
            assert_eq!(status, 404);
            break Instant::now();
        }
    };
    assert!(
        served_again - flood_started >= BAN,
        "served again after {:?}, before the ban's {BAN:?}",
        served_again - flood_started
    );
}

#[tokio::test]
async fn a_full_backlog_answers_503_with_retry_after_before_the_script() {
    const BACKLOG: usize = 3;
    let dns = DnsServer::start(Vec::new());
    let mut config = config(&repo_path("tests/data/scripts/resolve.lua"));
    config.workers = 1;
    config.limits.max_backlog = BACKLOG;
    // Long enough that the waiting requests are still waiting when the next one arrives.
    config.dns = dns.config(30_000);
    let (_server, server) = start(&config);
    let mut alice = TestUa::udp("alice").await;
    alice.outbound = Some(server);

    // BACKLOG requests whose script waits for DNS answers that never come.
    for n in 0..BACKLOG {
        let host = format!("slow-{n}.test");
        dns.silence(&host);
        alice
            .request("MESSAGE", &format!("sip:bob@{DOMAIN}"))
            .header("X-Hop", &format!("sip:{host}"))
            .header("X-Test", "show")
            .await;
        let asked = dns.wait_queries(&host, RecordType::NAPTR, 1, WAIT);
        assert!(asked, "the script asked for {host}: {:?}", dns.query_log());
    }
    // The next request is refused before the script runs (no DNS query for it).
    dns.silence("slow-next.test");
    alice
        .request("MESSAGE", &format!("sip:bob@{DOMAIN}"))
        .header("X-Hop", "sip:slow-next.test")
        .await;
    let refused = alice.expect_final(503).await;
    assert_eq!(header_text(&refused, "Retry-After").as_deref(), Some("5"));
    assert_eq!(dns.queries("slow-next.test", RecordType::NAPTR), 0);
    // Keep-alives to the server itself are still answered (statelessly, before the layer).
    alice.options(&format!("sip:{server}")).await;
    alice.expect_final(200).await;
}

#[tokio::test]
async fn the_default_script_refuses_insane_requests_with_the_reason() {
    let (_server, server) = start(&config(&repo_path("scripts/default.lua")));
    let mut alice = TestUa::udp("alice").await;
    let local = alice.local;
    // Requests the engine accepts, but req:sanity() does not.
    let cases = [
        (
            "INVITE",
            2147483648u32,
            "",
            "CSeq: number not less than 2^31",
            400,
        ),
        (
            "REGISTER",
            1,
            "Expires: soon\r\n",
            "Expires: not a number of seconds",
            400,
        ),
    ];
    for (n, (method, cseq, extra, reason, code)) in cases.into_iter().enumerate() {
        let request = format!(
            "{method} sip:{DOMAIN} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK-insane-{n};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:alice@{DOMAIN}>;tag=a{n}\r\n\
             To: <sip:alice@{DOMAIN}>\r\n\
             Call-ID: insane-{n}@127.0.0.1\r\n\
             CSeq: {cseq} {method}\r\n\
             {extra}Content-Length: 0\r\n\r\n"
        );
        alice.send_raw(request.as_bytes(), server).await;
        let answer = alice.recv_response(WAIT).await;
        expect_status(&answer, code);
        assert_eq!(
            String::from_utf8_lossy(answer.reason().unwrap()),
            reason,
            "{method}"
        );
    }
}

// ----- the primitives, one hook run each (moonroute test's engine) ---------------------------

const INVITE: &[u8] = b"INVITE sip:bob@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-prim\r\n\
Max-Forwards: 70\r\n\
From: <sip:alice@127.0.0.1>;tag=a\r\n\
To: <sip:bob@127.0.0.1>\r\n\
Call-ID: prim@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@127.0.0.1:5070>\r\n\
Content-Length: 0\r\n\r\n";

fn run(script: &str) -> moonroute::script::offline::Outcome {
    let source = moonroute::script::ScriptSource {
        name: "flood_test.lua".to_owned(),
        text: script.to_owned(),
        version: 1,
    };
    moonroute::script::offline::run_once(&source, INVITE, None, &Default::default())
        .expect("the script loads and the message parses")
}

#[test]
fn pike_check_counts_per_source_and_says_true_over_the_limit() {
    // The default limit is 200 per 2 s: the 201st request of one source is over it.
    let outcome = run(r#"
        function on_request(req)
          for i = 1, 200 do
            if req:pike_check() then return req:reply(500, "early " .. i) end
          end
          local other = sip.pike_check("192.0.2.1")
          local v6 = sip.pike_check("[2001:db8::1]")
          return req:reply(200, tostring(req:pike_check()) .. " " .. tostring(other) .. " " .. tostring(v6))
        end
    "#);
    assert_eq!(outcome.error, None);
    assert_eq!(outcome.reason.as_deref(), Some("true false false"));
}

#[test]
fn pike_check_of_something_not_an_ip_is_an_error_at_the_line() {
    let outcome = run("function on_request(req)\n  sip.pike_check('example.com')\nend\n");
    let error = outcome.error.expect("an error");
    assert!(error.contains("flood_test.lua:2"), "{error}");
    assert!(error.contains("not an IP address"), "{error}");
}

#[test]
fn sanity_reports_what_an_edit_broke() {
    let outcome = run(r#"
        function on_request(req)
          local ok = req:sanity()
          assert(ok == true, "the request is sane as received")
          req:set_header("Expires", "soon")
          local ok, why, code = req:sanity()
          if not ok then return req:reply(code, why) end
          return req:reply(200)
        end
    "#);
    assert_eq!(outcome.error, None);
    assert_eq!(outcome.code, Some(400));
    assert_eq!(
        outcome.reason.as_deref(),
        Some("Expires: not a number of seconds")
    );
}

/// RFC 4475 §3.4.1's RFC 2543 INVITE (no Contact, no Max-Forwards, no branch cookie).
const INVITE_2543: &[u8] = include_bytes!("data/rfc4475/inv2543.sip");

#[test]
fn sanity_flags_turn_on_the_stricter_checks() {
    let source = moonroute::script::ScriptSource {
        name: "flood_test.lua".to_owned(),
        text: r#"
        function on_request(req)
          local results = {}
          for _, flags in ipairs({ {}, { invite_contact = true }, { via_branch = true },
                                   { invite_contact = false, via_branch = false } }) do
            local ok, why, code = req:sanity(flags)
            results[#results + 1] = ok and "ok" or (code .. " " .. why)
          end
          assert(req:sanity() == true, "the defaults accept it")
          return req:reply(200, table.concat(results, "; "))
        end
    "#
        .to_owned(),
        version: 1,
    };
    let outcome =
        moonroute::script::offline::run_once(&source, INVITE_2543, None, &Default::default())
            .expect("the script loads and the message parses");
    assert_eq!(outcome.error, None);
    assert_eq!(
        outcome.reason.as_deref(),
        Some("ok; 400 Contact: missing in INVITE; 400 Via: no branch; ok")
    );
}

#[test]
fn a_misspelt_sanity_flag_is_an_error_at_the_line() {
    for (call, expected) in [
        (
            "req:sanity({invite_contacts = true})",
            "unknown flag \"invite_contacts\"",
        ),
        (
            "req:sanity({via_branch = 1})",
            "via_branch is true or false",
        ),
        ("req:sanity({true})", "flags are named"),
    ] {
        let outcome = run(&format!("function on_request(req)\n  {call}\nend\n"));
        let error = outcome.error.expect("an error");
        assert!(error.contains("flood_test.lua:2"), "{error}");
        assert!(error.contains(expected), "{call}: {error}");
    }
}

// ----- overload control, driven through the core (sans-IO) -----------------------------------

fn message_from(n: u32, source: SocketAddr) -> Bytes {
    Bytes::from(format!(
        "MESSAGE sip:nobody@{DOMAIN} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {source};branch=z9hG4bK-lag-{n}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@{DOMAIN}>;tag=l{n}\r\n\
         To: <sip:nobody@{DOMAIN}>\r\n\
         Call-ID: lag-{n}@127.0.0.1\r\n\
         CSeq: 1 MESSAGE\r\n\
         Content-Length: 0\r\n\r\n"
    ))
}

/// The statuses of the responses among `outputs`.
fn sent_statuses(outputs: &[moonroute::transport::Output]) -> Vec<(u16, Option<String>)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            moonroute::transport::Output::Send { data, .. } => {
                let m = Message::parse(data.clone()).ok()?;
                Some((m.status()?, header_text(&m, "Retry-After")))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_saturated_loop_refuses_new_requests_but_serves_retransmissions_and_dialogs() {
    use moonroute::transport::{Input, LoadSample, Meta, WorkerFactory};
    let mut config = config(&common::default_script_without_auth());
    config.limits.overload_after_ms = 500;
    let host = ScriptHost::from_config(&config).expect("the script loads");
    let factory = CoreFactory::with_router(&config, host.router_factory());
    let mut core = factory.make_worker(0);
    let source: SocketAddr = "127.0.0.5:5070".parse().unwrap();
    let meta = Meta {
        kind: TransportKind::Udp,
        source,
        local: "127.0.0.1:5060".parse().unwrap(),
        conn: None,
        worker: 0,
    };
    let deliver = |core: &mut Box<dyn moonroute::transport::Worker>, data: Bytes| {
        let mut out = Vec::new();
        core.on_input(Input::Message { data, meta }, Instant::now(), &mut out);
        sent_statuses(&out)
    };
    // The shell's samples, every 100 ms of simulated time: busy `busy_ms` of each, idle in
    // each or never.
    let t0 = Instant::now();
    let mut clock = (t0, Duration::ZERO, 0u64);
    let mut run =
        |core: &mut Box<dyn moonroute::transport::Worker>, ms: u64, busy_ms: u64, idle: bool| {
            for _ in 0..ms / 100 {
                clock.0 += Duration::from_millis(100);
                clock.1 += Duration::from_millis(busy_ms);
                clock.2 += u64::from(idle);
                core.on_load(LoadSample::new(clock.0, clock.1, clock.2));
            }
        };

    // Busy 90% but idle now and then: not overloaded, whatever the work.
    run(&mut core, 5000, 90, true);
    assert_eq!(deliver(&mut core, message_from(1, source)), [(404, None)]);
    // 400 ms without idling: not yet.
    run(&mut core, 400, 100, false);
    assert_eq!(deliver(&mut core, message_from(2, source)), [(404, None)]);
    // Saturated for 3 s: nearly every new request is refused before the script, with
    // Retry-After...
    run(&mut core, 2600, 100, false);
    assert_eq!(
        deliver(&mut core, message_from(3, source)),
        [(503, Some("5".to_owned()))]
    );
    // ...while a retransmission of an accepted request still gets its answer (§17.2.2)...
    assert_eq!(deliver(&mut core, message_from(1, source)), [(404, None)]);
    // ...and a request inside a dialog still reaches the script (which has no such dialog).
    let in_dialog = String::from_utf8(message_from(4, source).to_vec())
        .unwrap()
        .replace(
            &format!("To: <sip:nobody@{DOMAIN}>"),
            &format!("To: <sip:nobody@{DOMAIN}>;tag=d4"),
        );
    let answer = deliver(&mut core, Bytes::from(in_dialog));
    assert!(answer.iter().all(|(code, _)| *code != 503), "{answer:?}");
    // Half idle again: the admitted share doubles each 100 ms, all served within a second.
    run(&mut core, 1000, 50, true);
    assert_eq!(deliver(&mut core, message_from(5, source)), [(404, None)]);
}
