//! `sip.metrics` end to end: a server routed by a script that defines its own counters and
//! gauges, requests from a test user agent on 127.0.0.1, and the server's metrics registry
//! (what the `[metrics] listen` endpoint serves): the script's families with the right values,
//! kept across a reload; the engine's script families (hook calls, errors, duration, version,
//! reloads); a refused reload naming the script's file:line. Nothing sleeps: each request waits
//! for its answer.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::ua::{expect_status, TestUa};
use moonroute::config::{Config, LocationBackend};
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::transport::{ListenAddr, TransportKind};

const SCRIPT: &str = r#"
local requests = sip.metrics.counter("app_requests_total", {method = "MESSAGE"})
local last = sip.metrics.gauge{name = "app_last_length", help = "Length of the last Subject."}
local sizes = sip.metrics.histogram("app_subject_length", nil, {5, 10})

function on_request(req)
  requests:inc()
  local subject = req:header("Subject") or ""
  last:set(#subject)
  sizes:observe(#subject)
  if subject == "boom" then error("the script fails on purpose") end
  return req:reply(200, "Counted")
end
"#;

struct Running {
    _server: ServerHandle,
    host: Arc<ScriptHost>,
    udp: SocketAddr,
}

fn start(script: &Path) -> Running {
    let mut config = Config {
        listen: vec!["udp:127.0.0.1:0".parse::<ListenAddr>().unwrap()],
        workers: 2,
        script: script.to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Memory;
    let host = ScriptHost::from_config(&config).expect("the script loads");
    let factory = CoreFactory::with_router(&config, host.router_factory());
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        _server: server,
        host,
    }
}

/// A MESSAGE with this Subject; returns the status.
async fn message(ua: &mut TestUa, proxy: SocketAddr, subject: &str) -> u16 {
    ua.request("MESSAGE", &format!("sip:app@{proxy}"))
        .header("Subject", subject)
        .send()
        .await;
    ua.recv_response(common::ua::WAIT)
        .await
        .status()
        .unwrap_or(0)
}

/// The sample line of `series` (name and labels, exactly) in the exposition.
fn value(text: &str, series: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_owned)
}

#[tokio::test]
async fn script_metrics_count_requests_and_survive_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.lua");
    std::fs::write(&path, SCRIPT).unwrap();
    let server = start(&path);
    let mut ua = TestUa::udp("alice").await.via_proxy(server.udp);

    for subject in ["hi", "hello world!"] {
        assert_eq!(message(&mut ua, server.udp, subject).await, 200);
    }
    assert_eq!(message(&mut ua, server.udp, "boom").await, 500);

    let metrics = &server.host.services().metrics;
    let text = metrics.render();
    assert_eq!(
        value(&text, r#"app_requests_total{method="MESSAGE"}"#).as_deref(),
        Some("3"),
        "{text}"
    );
    assert!(
        text.contains("# HELP app_last_length Length of the last Subject.\n"),
        "{text}"
    );
    assert_eq!(value(&text, "app_last_length").as_deref(), Some("4"));
    assert_eq!(
        value(&text, r#"app_subject_length_bucket{le="5"}"#).as_deref(),
        Some("2")
    );
    assert_eq!(
        value(&text, r#"app_subject_length_bucket{le="+Inf"}"#).as_deref(),
        Some("3")
    );
    // The engine's own script families.
    assert_eq!(
        value(
            &text,
            r#"moonroute_script_hook_calls_total{hook="on_request"}"#
        )
        .as_deref(),
        Some("3"),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"moonroute_script_hook_errors_total{hook="on_request"}"#
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(
        value(
            &text,
            r#"moonroute_script_hook_duration_seconds_count{hook="on_request"}"#
        )
        .as_deref(),
        Some("3")
    );
    assert_eq!(
        value(&text, "moonroute_script_version").as_deref(),
        Some("1")
    );
    assert_eq!(
        value(&text, "moonroute_script_reloads_total").as_deref(),
        Some("0")
    );

    // A reload (same families): the values go on from where they were.
    std::fs::write(&path, SCRIPT.replace("Counted", "Counted again")).unwrap();
    assert_eq!(server.host.reload().unwrap(), 2);
    ua.request("MESSAGE", &format!("sip:app@{}", server.udp))
        .header("Subject", "x")
        .send()
        .await;
    let response = ua.recv_response(common::ua::WAIT).await;
    expect_status(&response, 200);
    assert_eq!(response.reason(), Some(&b"Counted again"[..]));
    let text = metrics.render();
    assert_eq!(
        value(&text, r#"app_requests_total{method="MESSAGE"}"#).as_deref(),
        Some("4"),
        "{text}"
    );
    assert_eq!(
        value(&text, "moonroute_script_version").as_deref(),
        Some("2")
    );
    assert_eq!(
        value(&text, "moonroute_script_reloads_total").as_deref(),
        Some("1")
    );

    // A reload that redefines a family with another kind is refused at its line.
    std::fs::write(
        &path,
        format!("{SCRIPT}\nlocal bad = sip.metrics.gauge(\"app_requests_total\")\n"),
    )
    .unwrap();
    let error = server.host.reload().unwrap_err().to_string();
    let line = SCRIPT.lines().count() + 2;
    assert!(
        error.contains(&format!("metrics.lua:{line}:")) && error.contains("already exists"),
        "{error}"
    );
    let text = metrics.render();
    assert_eq!(
        value(&text, "moonroute_script_reload_failures_total").as_deref(),
        Some("1")
    );
    assert_eq!(
        value(&text, "moonroute_script_version").as_deref(),
        Some("2")
    );
}
