//! The dispatcher end to end: a server routed by a script using `req:ds_select` and
//! `req:ds_next`, three test UAS destinations on loopback UDP sockets, a caller. Covers the
//! distribution of an algorithm, failover with no failed request at the caller (a destination
//! answering 503 is marked down and gets nothing more), and Call-ID stickiness. Probing is off
//! here (its state machine has simulated-time tests in `src/dispatcher/`). Nothing sleeps.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::ua::{expect_status, TestUa, WAIT};
use moonroute::config::{Config, LocationBackend};
use moonroute::dispatcher::{DestinationConfig, SetConfig, State};
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::transport::{ListenAddr, TransportKind};
use tokio::sync::mpsc;

const SCRIPT: &str = r#"
function on_request(req)
    local algorithm = req:header("X-Algorithm") or "round_robin"
    local destination, why = req:ds_select(1, algorithm)
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
}

/// A destination: a UAS answering every request with `answer`, reporting its index.
struct Destination {
    uri: String,
    answer: Arc<AtomicU16>,
}

async fn destinations(count: usize, seen: mpsc::UnboundedSender<usize>) -> Vec<Destination> {
    let mut out = Vec::new();
    for index in 0..count {
        let mut ua = TestUa::udp(&format!("gw{index}")).await;
        let answer = Arc::new(AtomicU16::new(200));
        let code = answer.clone();
        let seen = seen.clone();
        out.push(Destination {
            uri: format!("sip:{}", ua.local),
            answer,
        });
        tokio::spawn(async move {
            loop {
                let request = ua.recv_request(Duration::from_secs(120)).await;
                let _ = seen.send(index);
                let code = code.load(Ordering::Relaxed);
                let reason = if code == 200 {
                    "OK"
                } else {
                    "Service Unavailable"
                };
                ua.respond(&request, code, reason).await;
            }
        });
    }
    out
}

fn start(script: &Path, destinations: &[Destination]) -> Running {
    let mut config = Config {
        listen: vec!["udp:127.0.0.1:0".parse::<ListenAddr>().unwrap()],
        workers: 2,
        script: script.to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Memory;
    config.dispatcher.probe_interval_secs = 0;
    config.dispatcher.set = vec![SetConfig {
        id: 1,
        destinations: destinations
            .iter()
            .map(|d| DestinationConfig {
                uri: d.uri.clone(),
                weight: 1,
                priority: 0,
                attrs: String::new(),
            })
            .collect(),
    }];
    let host = ScriptHost::from_config(&config).expect("the script loads");
    let factory = CoreFactory::with_router(&config, host.router_factory());
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        _server: server,
        host,
    }
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
    let sent = caller
        .request("MESSAGE", &format!("sip:gateway@{proxy}"))
        .header("X-Algorithm", algorithm)
        .to(proxy)
        .await;
    let answer = caller.recv_response(WAIT).await;
    assert_eq!(answer.call_id().unwrap(), sent.call_id().unwrap());
    expect_status(&answer, 200);
    sent
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
