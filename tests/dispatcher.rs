//! The dispatcher end to end: a server routed by a script using `req:ds_select` and
//! `req:ds_next` (or the shipped `scripts/balancer.lua`), three test UAS destinations on
//! loopback UDP sockets, a caller. Covers the distribution of each algorithm, failover with no
//! failed request at the caller (a destination answering 503, or falling silent mid-run, is
//! marked down and gets nothing more), OPTIONS probing taking a silent destination down within
//! its interval and bringing it back, and Call-ID stickiness. Nothing sleeps: state changes are
//! awaited on `Dispatcher::watch` with generous timeouts.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::ua::{expect_status, TestUa, WAIT};
use moonroute::config::{Config, LocationBackend};
use moonroute::dispatcher::{DestinationConfig, SetConfig, State};
use moonroute::metrics::EngineMetrics;
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::transport::{ListenAddr, TransportKind};
use tokio::sync::mpsc;

const SCRIPT: &str = r#"
function on_request(req)
    local algorithm = req:header("X-Algorithm") or "round_robin"
    local set = tonumber(req:header("X-Set") or "1")
    local destination, why = req:ds_select(set, algorithm)
    if not destination then
        req:reply(503, "No Destination")
        return
    end
    req:t_relay()
end

function on_failure(req, res)
    if req:ds_next(res.status) then
        req:t_relay()
    end
end
"#;

struct Running {
    _server: ServerHandle,
    host: Arc<ScriptHost>,
    udp: SocketAddr,
    metrics: Arc<EngineMetrics>,
}

/// What a destination answers calls with; [`SILENT`]: nothing, not even probes (a gateway
/// whose plug was pulled).
const SILENT: u16 = 0;

/// A destination: a UAS answering every request with `answer` and reporting the index of the
/// destination for each new request but probes (OPTIONS) and ACKs (retransmissions are
/// absorbed by the UA).
struct Destination {
    uri: String,
    answer: Arc<AtomicU16>,
}

/// Each destination runs on a thread of its own (a `Message` is not `Sync`, so a UA's task
/// cannot move between threads), for as long as the test process.
async fn destinations(count: usize, seen: mpsc::UnboundedSender<usize>) -> Vec<Destination> {
    let mut out = Vec::new();
    for index in 0..count {
        let answer = Arc::new(AtomicU16::new(200));
        let code = answer.clone();
        let seen = seen.clone();
        let (address, bound) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(serve_destination(index, code, seen, address));
        });
        out.push(Destination {
            uri: format!("sip:{}", bound.await.unwrap()),
            answer,
        });
    }
    out
}

async fn serve_destination(
    index: usize,
    code: Arc<AtomicU16>,
    seen: mpsc::UnboundedSender<usize>,
    address: tokio::sync::oneshot::Sender<SocketAddr>,
) {
    let mut ua = TestUa::udp(&format!("gw{index}")).await;
    let _ = address.send(ua.local);
    {
        {
            loop {
                let request = ua.recv_request(Duration::from_secs(600)).await;
                let code = code.load(Ordering::Relaxed);
                let method = request.method().map(|m| m.as_str().to_owned());
                if code == SILENT || method.as_deref() == Some("ACK") {
                    continue;
                }
                if method.as_deref() != Some("OPTIONS") {
                    let _ = seen.send(index);
                }
                let reason = if code == 200 {
                    "OK"
                } else {
                    "Service Unavailable"
                };
                ua.respond(&request, code, reason).await;
            }
        }
    }
}

/// How a lab server is set up.
struct Setup<'a> {
    script: &'a Path,
    /// Set 1: every destination with weight 1; set 2: the same with weights 1, 2, 3...
    destinations: &'a [Destination],
    /// `(interval, timeout)` in ms; `None`: probing off (destinations start active).
    probing: Option<(u64, u64)>,
    /// T1 in ms: Timer B/F (64*T1) is when a silent destination's call fails over.
    t1_ms: u64,
}

impl Setup<'_> {
    fn new<'a>(script: &'a Path, destinations: &'a [Destination]) -> Setup<'a> {
        Setup {
            script,
            destinations,
            probing: None,
            t1_ms: 500,
        }
    }
}

fn start(script: &Path, destinations: &[Destination]) -> Running {
    start_with(Setup::new(script, destinations))
}

fn start_with(setup: Setup<'_>) -> Running {
    let mut config = Config {
        listen: vec!["udp:127.0.0.1:0".parse::<ListenAddr>().unwrap()],
        workers: 2,
        script: setup.script.to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Memory;
    config.timers.t1_ms = setup.t1_ms;
    // No CDR file in the working directory's default data_dir (tests/dialog.rs covers it).
    config.dialog.cdr = false;
    match setup.probing {
        None => config.dispatcher.probe_interval_secs = 0,
        Some((interval, timeout)) => {
            config.dispatcher.probe_interval_ms = interval;
            config.dispatcher.probe_timeout_ms = timeout;
        }
    }
    let set = |id: u32, weight: &dyn Fn(usize) -> u32| SetConfig {
        id,
        destinations: setup
            .destinations
            .iter()
            .enumerate()
            .map(|(i, d)| DestinationConfig {
                uri: d.uri.clone(),
                weight: weight(i),
                priority: 0,
                attrs: String::new(),
            })
            .collect(),
    };
    config.dispatcher.set = vec![set(1, &|_| 1), set(2, &|i| i as u32 + 1)];
    let host = ScriptHost::from_config(&config).expect("the script loads");
    let metrics = EngineMetrics::detached();
    let factory = CoreFactory::with_router(&config, host.router_factory())
        .with_dispatcher(Arc::clone(&host.services().dispatcher))
        .with_metrics(Arc::clone(&metrics));
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        _server: server,
        host,
        metrics,
    }
}

/// Waits until `uri` is in `state`; returns how long that took. Panics after `within`.
async fn wait_state(running: &Running, uri: &str, state: State, within: Duration) -> Duration {
    let dispatcher = &running.host.services().dispatcher;
    let mut changes = dispatcher.watch();
    let started = std::time::Instant::now();
    let reached = tokio::time::timeout(within, async {
        while dispatcher.state(uri) != Some(state) {
            changes.changed().await.expect("the dispatcher lives");
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "{uri} still {:?} after {within:?}, not {state}",
        dispatcher.state(uri)
    );
    started.elapsed()
}

fn script(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("balancer.lua");
    std::fs::write(&path, SCRIPT).unwrap();
    path
}

/// A MESSAGE through the proxy, answered 200; returns the request sent.
async fn message(
    caller: &mut TestUa,
    proxy: SocketAddr,
    algorithm: &str,
) -> moonroute::sip::Message {
    let (sent, answer) = message_in(caller, proxy, 1, algorithm, WAIT).await;
    expect_status(&answer, 200);
    sent
}

/// A MESSAGE to set `set` through the proxy, and its answer within `wait`.
async fn message_in(
    caller: &mut TestUa,
    proxy: SocketAddr,
    set: u32,
    algorithm: &str,
    wait: Duration,
) -> (moonroute::sip::Message, moonroute::sip::Message) {
    let sent = caller
        .request("MESSAGE", &format!("sip:gateway@{proxy}"))
        .header("X-Algorithm", algorithm)
        .header("X-Set", &set.to_string())
        .to(proxy)
        .await;
    let answer = caller.recv_response(wait).await;
    assert_eq!(answer.call_id().unwrap(), sent.call_id().unwrap());
    (sent, answer)
}

/// The index of the destination that got the request just sent (and its failovers).
async fn received(seen: &mut mpsc::UnboundedReceiver<usize>) -> usize {
    tokio::time::timeout(WAIT, seen.recv())
        .await
        .expect("a destination got the request")
        .unwrap()
}

#[tokio::test]
async fn round_robin_spreads_evenly_over_three_destinations() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let gateways = destinations(3, tx).await;
    let server = start(&script(&dir), &gateways);
    let mut caller = TestUa::udp("caller").await;
    let mut counts = [0; 3];
    for _ in 0..300 {
        message(&mut caller, server.udp, "round_robin").await;
        counts[received(&mut seen).await] += 1;
    }
    // Two event loops share the set's turn counter: exactly a third each.
    assert_eq!(counts, [100, 100, 100]);
}

#[tokio::test]
async fn a_failing_destination_fails_over_and_gets_no_more_calls() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let gateways = destinations(3, tx).await;
    let server = start(&script(&dir), &gateways);
    let mut caller = TestUa::udp("caller").await;
    gateways[1].answer.store(503, Ordering::Relaxed);
    let mut counts = [0; 3];
    let mut failed_over = 0;
    for _ in 0..60 {
        message(&mut caller, server.udp, "round_robin").await;
        let first = received(&mut seen).await;
        counts[first] += 1;
        if first == 1 {
            // The 503 moved the request on: the next destination answered it.
            counts[received(&mut seen).await] += 1;
            failed_over += 1;
        }
    }
    assert_eq!(failed_over, 1, "gw1 was tried once, then marked down");
    assert_eq!(counts[1], 1, "{counts:?}");
    assert_eq!(counts[0] + counts[2], 60, "{counts:?}");
    let dispatcher = &server.host.services().dispatcher;
    assert_eq!(dispatcher.state(&gateways[1].uri), Some(State::Inactive));
    let view = dispatcher
        .list(Some(1), std::time::Instant::now())
        .into_iter()
        .find(|v| v.uri == gateways[1].uri)
        .unwrap();
    assert_eq!((view.sent, view.failovers), (1, 1));

    // Back in service (ctl ds set / sip.ds.mark): it gets its share again.
    gateways[1].answer.store(200, Ordering::Relaxed);
    dispatcher
        .mark(&gateways[1].uri, State::Active, "test")
        .unwrap();
    let mut back = 0;
    for _ in 0..30 {
        message(&mut caller, server.udp, "round_robin").await;
        back += usize::from(received(&mut seen).await == 1);
    }
    assert_eq!(back, 10);
}

#[tokio::test]
async fn a_call_id_hash_keeps_every_request_of_a_call_on_one_destination() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let gateways = destinations(3, tx).await;
    let server = start(&script(&dir), &gateways);
    let mut caller = TestUa::udp("caller").await;
    let mut used = [false; 3];
    for _ in 0..12 {
        let first = message(&mut caller, server.udp, "call_id").await;
        let destination = received(&mut seen).await;
        used[destination] = true;
        for _ in 0..3 {
            // The same Call-ID, CSeq + 1: a later request of the same call.
            let again = caller
                .request("MESSAGE", &format!("sip:gateway@{}", server.udp))
                .header("X-Algorithm", "0")
                .retry_of(&first)
                .to(server.udp)
                .await;
            let answer = caller.recv_response(WAIT).await;
            assert_eq!(answer.call_id().unwrap(), again.call_id().unwrap());
            expect_status(&answer, 200);
            assert_eq!(received(&mut seen).await, destination);
        }
    }
    assert!(
        used.iter().filter(|u| **u).count() >= 2,
        "12 calls all hashed to one of three"
    );
}

#[test]
fn the_shipped_balancer_script_passes_moonroute_check() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/balancer.lua");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_moonroute"))
        .arg("check")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("ok (on_request, on_failure)"), "{stdout}");
}

/// Every algorithm over real sockets: round robin and weighted exactly (their counters are
/// shared by the event loops), the hashes and random within a tolerance, priority all to the
/// first, call load evenly (each MESSAGE ends before the next: no load, ties broken in turn).
#[tokio::test]
async fn each_algorithm_spreads_calls_as_it_should() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let gateways = destinations(3, tx).await;
    let server = start(&script(&dir), &gateways);
    let mut caller = TestUa::udp("caller").await;
    let proxy = server.udp;
    macro_rules! spread {
        ($set:expr, $algorithm:expr, $calls:expr) => {{
            let mut counts = [0usize; 3];
            for _ in 0..$calls {
                let (_, answer) = message_in(&mut caller, proxy, $set, $algorithm, WAIT).await;
                expect_status(&answer, 200);
                counts[received(&mut seen).await] += 1;
            }
            counts
        }};
    }
    assert_eq!(spread!(2, "weighted", 600), [100, 200, 300]);
    assert_eq!(spread!(1, "4", 300), [100, 100, 100]);
    let priority = spread!(1, "priority", 30);
    assert_eq!(
        priority.iter().filter(|c| **c == 30).count(),
        1,
        "{priority:?}"
    );
    for (set, algorithm, expected) in [
        (1, "call_id", [200.0, 200.0, 200.0]),
        (2, "call_id", [100.0, 200.0, 300.0]),
        (1, "random", [200.0, 200.0, 200.0]),
    ] {
        let counts = spread!(set, algorithm, 600);
        for (count, expected) in counts.iter().zip(expected) {
            // Binomial: 3.5 standard deviations at most (sd = 12.2 for 200 of 600).
            let tolerance = 3.5 * (expected * (1.0 - expected / 600.0_f64)).sqrt();
            assert!(
                (*count as f64 - expected).abs() <= tolerance,
                "{algorithm} on set {set}: {counts:?}, expected about {expected} each"
            );
        }
    }
    let load = spread!(1, "call_load", 30);
    assert!(
        load.iter().all(|c| *c > 0),
        "call_load starves one: {load:?}"
    );
}

/// Probing with real sockets: destinations never probed start `probing`, become `active` at
/// their first answer; one that falls silent is `inactive` within its interval plus the
/// timeout and gets no calls; when it answers again (up_after = 2 answers) it is used again.
#[tokio::test]
async fn a_silent_destination_is_probed_down_within_its_interval_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let gateways = destinations(3, tx).await;
    let (interval, timeout) = (300, 200);
    let server = start_with(Setup {
        probing: Some((interval, timeout)),
        ..Setup::new(&script(&dir), &gateways)
    });
    // Margins for a loaded 2-core box: what takes milliseconds may take seconds.
    let margin = Duration::from_secs(10);
    for gateway in &gateways {
        wait_state(&server, &gateway.uri, State::Active, margin).await;
    }
    gateways[1].answer.store(SILENT, Ordering::Relaxed);
    let down = wait_state(&server, &gateways[1].uri, State::Inactive, margin).await;
    eprintln!(
        "silent destination down after {down:?} (interval {interval} ms, timeout {timeout} ms)"
    );
    let view = |uri: &str| {
        server
            .host
            .services()
            .dispatcher
            .list(Some(1), std::time::Instant::now())
            .into_iter()
            .find(|v| v.uri == uri)
            .unwrap()
    };
    assert!(view(&gateways[1].uri).probes_failed >= 1);
    let mut caller = TestUa::udp("caller").await;
    for _ in 0..30 {
        message(&mut caller, server.udp, "round_robin").await;
        assert_ne!(
            received(&mut seen).await,
            1,
            "a down destination got a call"
        );
    }

    gateways[1].answer.store(200, Ordering::Relaxed);
    let up = wait_state(&server, &gateways[1].uri, State::Active, margin).await;
    eprintln!("destination back after {up:?} (up_after 2)");
    let mut back = 0;
    for _ in 0..30 {
        message(&mut caller, server.udp, "round_robin").await;
        back += usize::from(received(&mut seen).await == 1);
    }
    assert_eq!(back, 10);
    let last = view(&gateways[1].uri).last_probe.expect("probed");
    assert_eq!(last.0, moonroute::dispatcher::ProbeOutcome::Reply(200));
}

/// A destination pulled mid-run: the calls it had fail over when their transaction times
/// out (Timer F = 64*T1), probes take it down meanwhile, and no call fails at the caller.
#[tokio::test]
async fn a_destination_pulled_mid_run_costs_no_call() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let gateways = destinations(3, tx).await;
    let t1_ms = 100;
    let server = start_with(Setup {
        probing: Some((300, 200)),
        t1_ms,
        ..Setup::new(&script(&dir), &gateways)
    });
    let margin = Duration::from_secs(10);
    for gateway in &gateways {
        wait_state(&server, &gateway.uri, State::Active, margin).await;
    }
    let mut caller = TestUa::udp("caller").await;
    // The answer of a call stuck at the silent destination comes after 64*T1 and a failover.
    let wait = Duration::from_millis(64 * t1_ms) + margin;
    let (mut answered, mut to_silent) = (0, 0);
    for call in 0..60 {
        if call == 20 {
            gateways[2].answer.store(SILENT, Ordering::Relaxed);
        }
        let was_down =
            server.host.services().dispatcher.state(&gateways[2].uri) == Some(State::Inactive);
        let (_, answer) = message_in(&mut caller, server.udp, 1, "round_robin", wait).await;
        expect_status(&answer, 200);
        answered += 1;
        // The silent one reports nothing: whoever answered is one of the others.
        let destination = received(&mut seen).await;
        if call >= 20 {
            assert_ne!(
                destination, 2,
                "call {call} answered by the silent destination"
            );
            to_silent += usize::from(!was_down);
        }
    }
    assert_eq!(answered, 60, "every call answered 200");
    let dispatcher = &server.host.services().dispatcher;
    assert_eq!(dispatcher.state(&gateways[2].uri), Some(State::Inactive));
    let listing = moonroute::control::ds::command(
        &["list".to_owned(), "1".to_owned()],
        dispatcher,
        std::time::Instant::now(),
    );
    let line = listing
        .text
        .lines()
        .find(|l| l.contains(&gateways[2].uri))
        .unwrap()
        .to_owned();
    assert!(line.contains("state=inactive"), "{line}");
    assert_metrics_say_inactive(&server, &gateways[2].uri);
    eprintln!("{to_silent} calls started before the silent destination was marked down; {line}");
}

/// The shipped `scripts/balancer.lua`, with the test's caller allowed: INVITE calls (ACK,
/// BYE) through it to three destinations, one pulled mid-run. Every call is answered 200,
/// each BYE reaches the destination of its INVITE, the pulled one is taken down, and the
/// calls in progress are counted per destination (`call_load`).
#[tokio::test]
async fn the_shipped_balancer_keeps_every_call_when_a_destination_is_pulled() {
    let dir = tempfile::tempdir().unwrap();
    let script = shipped_balancer(&dir, &[]);
    let (tx, mut seen) = mpsc::unbounded_channel();
    let gateways = destinations(3, tx).await;
    let t1_ms = 100;
    let server = start_with(Setup {
        probing: Some((300, 200)),
        t1_ms,
        ..Setup::new(&script, &gateways)
    });
    let margin = Duration::from_secs(10);
    for gateway in &gateways {
        wait_state(&server, &gateway.uri, State::Active, margin).await;
    }
    let dispatcher = &server.host.services().dispatcher;
    let mut caller = TestUa::udp("caller").await;
    let wait = Duration::from_millis(64 * t1_ms) + margin;
    let mut used = [0; 3];
    for call in 0..30 {
        if call == 10 {
            gateways[0].answer.store(SILENT, Ordering::Relaxed);
        }
        caller
            .invite(&format!("sip:+15551234@{}", server.udp))
            .to(server.udp)
            .await;
        let answer = loop {
            let response = caller.recv_response(wait).await;
            if response.status().unwrap() >= 200 {
                break response;
            }
        };
        expect_status(&answer, 200);
        let destination = received(&mut seen).await;
        used[destination] += 1;
        let in_progress: u64 = dispatcher
            .list(Some(1), std::time::Instant::now())
            .iter()
            .map(|v| v.calls)
            .sum();
        assert!(in_progress >= 1, "the INVITE just answered is in progress");
        let mut dialog = caller.ack_2xx(&answer).await;
        caller.bye(&mut dialog).await;
        caller.expect_final(200).await;
        assert_eq!(
            received(&mut seen).await,
            destination,
            "the BYE of call {call} went elsewhere than its INVITE"
        );
    }
    assert_eq!(dispatcher.state(&gateways[0].uri), Some(State::Inactive));
    assert_eq!(used.iter().sum::<usize>(), 30);
    assert!(used[1] > 0 && used[2] > 0, "{used:?}");
}

/// The metrics show destination `uri` inactive.
fn assert_metrics_say_inactive(server: &Running, uri: &str) {
    let metrics = server.host.services().metrics.render();
    let state = format!("moonroute_dispatcher_state{{destination=\"{uri}\",state=\"inactive\"}} 1");
    assert!(metrics.contains(&state), "{metrics}");
}

/// The shipped `scripts/balancer.lua` in `dir`, with the test's caller allowed and the
/// `(from, to)` replacements made (each must apply).
fn shipped_balancer(dir: &tempfile::TempDir, changes: &[(&str, &str)]) -> PathBuf {
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/balancer.lua"))
            .unwrap();
    let mut text = shipped.clone();
    for (from, to) in [(
        "local CALLERS = {}",
        "local CALLERS = { [\"127.0.0.1\"] = true }",
    )]
    .iter()
    .chain(changes)
    {
        assert!(text.contains(from), "balancer.lua has {from:?}");
        text = text.replace(from, to);
    }
    let script = dir.path().join("balancer.lua");
    std::fs::write(&script, text).unwrap();
    script
}

/// `moonroute ctl --socket SOCKET ARGS...`, the real client binary: its output.
fn ctl(socket: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_moonroute"))
        .arg("ctl")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "ctl {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The shipped balancer (its `t_set_fr(0, 2000)`) with a gateway silent from the start and no
/// probing to notice it: the call sent there fails over to the next gateway after the 2 s
/// failure timer, not after Timer B (64*T1 = 32 s with the default T1), and the failover
/// takes the silent one down, as `moonroute ctl ds list` shows over the control socket.
#[tokio::test]
async fn a_silent_gateway_costs_a_call_the_failure_timer_not_timer_b() {
    let dir = tempfile::tempdir().unwrap();
    // Round robin: the silent one gets one of the first three calls, whatever the Call-IDs.
    let script = shipped_balancer(
        &dir,
        &[(
            "local ALGORITHM = \"call_id\"",
            "local ALGORITHM = \"round_robin\"",
        )],
    );
    let (tx, mut seen) = mpsc::unbounded_channel();
    let gateways = destinations(3, tx).await;
    gateways[0].answer.store(SILENT, Ordering::Relaxed);
    let server = start(&script, &gateways);
    let dispatcher = Arc::clone(&server.host.services().dispatcher);
    let socket = dir.path().join("ctl.sock");
    let handler_dispatcher = Arc::clone(&dispatcher);
    let handler: moonroute::control::Handler = Arc::new(move |args: &[String]| match args {
        [ds, rest @ ..] if ds == "ds" => {
            moonroute::control::ds::command(rest, &handler_dispatcher, std::time::Instant::now())
        }
        _ => moonroute::control::Reply::error("only ds here"),
    });
    let _control = moonroute::control::ControlServer::bind(&socket, handler)
        .await
        .unwrap();
    let before = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || ctl(&socket, &["ds", "list", "1"])
    })
    .await
    .unwrap();
    assert_eq!(before.matches("state=active").count(), 3, "{before}");

    let timer_b = Duration::from_millis(64 * 500);
    let mut caller = TestUa::udp("caller").await;
    let mut slowest = Duration::ZERO;
    for call in 0..6 {
        let started = std::time::Instant::now();
        caller
            .invite(&format!("sip:+15551234@{}", server.udp))
            .to(server.udp)
            .await;
        let answer = loop {
            let response = caller.recv_response(timer_b).await;
            if response.status().unwrap() >= 200 {
                break response;
            }
        };
        let took = started.elapsed();
        expect_status(&answer, 200);
        assert_ne!(
            received(&mut seen).await,
            0,
            "call {call}: the silent one answered"
        );
        let mut dialog = caller.ack_2xx(&answer).await;
        caller.bye(&mut dialog).await;
        caller.expect_final(200).await;
        received(&mut seen).await;
        slowest = slowest.max(took);
    }
    // One call waited for the failure timer (it cannot fire early); none for Timer B.
    assert!(slowest >= Duration::from_millis(1900), "{slowest:?}");
    assert!(
        slowest < timer_b / 2,
        "{slowest:?}: the failover waited for Timer B"
    );
    assert_eq!(dispatcher.state(&gateways[0].uri), Some(State::Inactive));
    let after = tokio::task::spawn_blocking(move || ctl(&socket, &["ds", "list", "1"]))
        .await
        .unwrap();
    let line = after
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{} ", gateways[0].uri)))
        .unwrap_or_else(|| panic!("{after}"));
    assert!(line.contains("state=inactive"), "{line}");
    assert!(line.contains("failovers=1"), "{line}");
    assert_metrics_say_inactive(&server, &gateways[0].uri);
    eprintln!("slowest call {slowest:?}; {line}");
}

/// docs/load-balancing.md's walk-through: its configuration parses and validates, with three gateways
/// probed, and the copied balancer with a caller listed passes `moonroute check`.
#[test]
fn the_documented_balancer_walkthrough_holds() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/load-balancing.md"),
    )
    .unwrap();
    let section = doc
        .split("# Load balancing gateways")
        .nth(1)
        .expect("docs/load-balancing.md has the walk-through");
    let toml = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a toml block");
    let config = Config::parse(toml).expect("the documented configuration parses");
    config.validate().expect("and validates");
    assert_eq!(config.script, Path::new("balancer.lua"));
    assert_eq!(config.dispatcher.set[0].destinations.len(), 3);
    assert!(config.dispatcher.probe_interval().is_some());

    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/balancer.lua"))
            .unwrap();
    let script = dir.path().join("balancer.lua");
    std::fs::write(
        &script,
        shipped.replace(
            "local CALLERS = {}",
            "local CALLERS = { [\"192.0.2.20\"] = true }",
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_moonroute"))
        .arg("check")
        .arg(&script)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

/// Calls over `call_load`, record-routed; an INVITE with `X-Track` is tracked as a dialog
/// (`req:dlg_manage()`), the others are not.
const CALL_SCRIPT: &str = r#"
function on_request(req)
    if req:has_to_tag() then
        if req:loose_route() then
            return req:t_relay()
        end
        return req:reply(404, "Not Here")
    end
    if req:is_method("INVITE") and req:header("X-Track") then
        req:dlg_manage()
    end
    req:record_route()
    if not req:ds_select(1, "call_load") then
        return req:reply(503, "No Destination")
    end
    req:t_relay()
end
"#;

fn call_script(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("calls.lua");
    std::fs::write(&path, CALL_SCRIPT).unwrap();
    path
}

/// Calls in progress at each destination of set 1, in configured order.
fn calls(server: &Running) -> Vec<u64> {
    let dispatcher = &server.host.services().dispatcher;
    dispatcher
        .list(Some(1), std::time::Instant::now())
        .iter()
        .map(|v| v.calls)
        .collect()
}

/// An INVITE through the proxy, answered 200 and ACKed; the destination that got it and the
/// caller's dialog.
async fn call(
    caller: &mut TestUa,
    proxy: SocketAddr,
    seen: &mut mpsc::UnboundedReceiver<usize>,
    tracked: bool,
) -> (usize, common::ua::Dialog) {
    let mut invite = caller.invite(&format!("sip:gateway@{proxy}")).to(proxy);
    if tracked {
        invite = invite.header("X-Track", "yes");
    }
    invite.await;
    let answer = caller.expect_final(200).await;
    let destination = received(seen).await;
    (destination, caller.ack_2xx(&answer).await)
}

/// Waits until no transaction is live (the answered INVITEs' transactions are over: RFC 6026,
/// 64*T1 after their 2xx), polling the gauge for at most `within`.
async fn transactions_over(server: &Running, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while server.metrics.transactions.live() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} transactions still live after {within:?}",
            server.metrics.transactions.live()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the destinations' call counts are `expected`, for at most `within`.
async fn calls_become(server: &Running, expected: &[u64], within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while calls(server) != expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `call_load` with the dialog module (Kamailio's alg 10 with `dialog`): a tracked call counts
/// at its destination from the INVITE to its BYE, however long it outlives its INVITE
/// transaction, and steers the next call elsewhere; an untracked call counts only while its
/// INVITE transaction lives. T1 = 50 ms so the transactions end (64*T1 = 3.2 s) within the test.
#[tokio::test]
async fn call_load_counts_a_tracked_call_from_invite_to_bye() {
    let dir = tempfile::tempdir().unwrap();
    let path = call_script(&dir);
    let (tx, mut seen) = mpsc::unbounded_channel();
    let gateways = destinations(2, tx).await;
    let server = start_with(Setup {
        t1_ms: 50,
        ..Setup::new(&path, &gateways)
    });
    let mut caller = TestUa::udp("caller").await.via_proxy(server.udp);

    let (tracked_at, mut tracked) = call(&mut caller, server.udp, &mut seen, true).await;
    let (untracked_at, mut untracked) = call(&mut caller, server.udp, &mut seen, false).await;
    assert_ne!(
        tracked_at, untracked_at,
        "the second call avoids the loaded one"
    );
    assert_eq!(calls(&server), vec![1, 1]);

    transactions_over(&server, Duration::from_secs(20)).await;
    let mut expected = vec![0, 0];
    expected[tracked_at] = 1;
    // The live-transaction counter drops in the transaction layer, and the loop releases the
    // untracked call's count when it handles the transaction's end just after: wait for that.
    calls_become(&server, &expected, Duration::from_secs(5)).await;
    assert_eq!(
        calls(&server),
        expected,
        "only the tracked call still counts"
    );
    // The next call goes where the call in progress is not.
    let (next_at, mut next) = call(&mut caller, server.udp, &mut seen, true).await;
    assert_eq!(next_at, untracked_at);

    caller.bye(&mut tracked).await;
    caller.expect_final(200).await;
    expected[tracked_at] = 0;
    expected[next_at] = 1;
    assert_eq!(
        calls(&server),
        expected,
        "the BYE ended the tracked call's count"
    );
    caller.bye(&mut next).await;
    caller.expect_final(200).await;
    caller.bye(&mut untracked).await;
    caller.expect_final(200).await;
    assert_eq!(calls(&server), vec![0, 0]);
}

/// A tracked call that fails stops counting when its failure goes upstream, not when its
/// transaction ends (the ACK, then Timer I): the dialog ends with it.
#[tokio::test]
async fn call_load_stops_counting_a_tracked_call_at_its_failure() {
    let dir = tempfile::tempdir().unwrap();
    let path = call_script(&dir);
    let (tx, mut seen) = mpsc::unbounded_channel();
    let gateways = destinations(1, tx).await;
    gateways[0].answer.store(486, Ordering::Relaxed);
    let server = start(&path, &gateways);
    let mut caller = TestUa::udp("caller").await.via_proxy(server.udp);
    caller
        .invite(&format!("sip:gateway@{}", server.udp))
        .header("X-Track", "yes")
        .to(server.udp)
        .await;
    caller.expect_final(486).await;
    received(&mut seen).await;
    assert_eq!(calls(&server), vec![0]);
}
