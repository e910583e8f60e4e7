//! Failure routing from a script, end to end (Kamailio's `t_set_fr`, `$du`,
//! `event_route[tm:branch-failure]`): a server routed by Lua, test user agents on loopback UDP
//! as the caller and the next hops, one of them silent. `req.du` sends a branch to a next hop
//! without rewriting the Request-URI or adding a Route, and a failure route's new branch does
//! not inherit it; `req:t_set_fr()` gives a silent next hop up long before Timer F;
//! `on_branch_failure` and `res.branches` see the proxy's own 408; `req:reply` in
//! `on_failure` answers the caller, and header edits there reach the new branches. Nothing
//! sleeps.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ua::{expect_status, TestUa, WAIT};
use moonroute::config::{Config, LocationBackend};
use moonroute::script::kv::KvValue;
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::transport::{ListenAddr, TransportKind};

struct Running {
    _server: ServerHandle,
    host: Arc<ScriptHost>,
    udp: SocketAddr,
}

fn start(dir: &tempfile::TempDir, script: &str) -> Running {
    let path: PathBuf = dir.path().join("failure.lua");
    std::fs::write(&path, script).unwrap();
    let mut config = Config {
        listen: vec!["udp:127.0.0.1:0".parse::<ListenAddr>().unwrap()],
        workers: 2,
        script: path,
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Memory;
    config.dialog.cdr = false;
    config.dispatcher.probe_interval_secs = 0;
    let host = ScriptHost::from_config(&config).expect("the script loads");
    let factory = CoreFactory::with_router(&config, host.router_factory());
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        _server: server,
        host,
    }
}

impl Running {
    /// What the script stored under `key` in `sip.kv`.
    fn kv(&self, key: &str) -> String {
        match self.host.services().kv.get(key, Instant::now()) {
            Some(KvValue::Str(s)) => s,
            other => panic!("{key}: {other:?}"),
        }
    }
}

/// A MESSAGE for `ruri` through the server, naming the next hops the scripts below read:
/// `X-First`, then `X-Second`, then any `extra` headers.
async fn send_via(
    caller: &mut TestUa,
    server: &Running,
    ruri: &str,
    hops: &[&TestUa],
    extra: &[(&str, &str)],
) {
    let mut request = caller.request("MESSAGE", ruri);
    for (name, hop) in ["X-First", "X-Second"].into_iter().zip(hops) {
        request = request.header(name, &format!("sip:{}", hop.local));
    }
    for (name, value) in extra {
        request = request.header(name, value);
    }
    request.to(server.udp).await;
}

const DU_FAILOVER: &str = r#"
function on_request(req)
  req.du = req:header("X-First")
  req.vars.second = req:header("X-Second")
  req:t_set_fr(0, 1000)
  return req:t_relay()
end

function on_branch_failure(req, res)
  local b = res.branch
  sip.kv.set("branch_failure", table.concat({b.uri, b.code, tostring(b.timeout),
    tostring(b.generated), res.status, b.reason}, " "))
end

function on_failure(req, res)
  local seen = {}
  for _, b in ipairs(res.branches) do
    seen[#seen + 1] = b.code .. "/" .. tostring(b.timeout) .. "/" .. b.reason
  end
  sip.kv.set("branches", table.concat(seen, ","))
  sip.kv.set("du_in_failure", tostring(req.du))
  if not req.vars.tried then
    req.vars.tried = true
    req.du = req.vars.second
    return req:t_relay()
  end
end
"#;

/// The first next hop is silent: `t_set_fr(0, 1000)` gives it up after 1 s (Timer F would take
/// 32 s), the failure route sees the 408 and sends the request to the second next hop with a
/// `du` of its own; both copies keep the Request-URI and carry no Route.
#[tokio::test]
async fn du_and_t_set_fr_fail_a_silent_next_hop_over_to_another() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, DU_FAILOVER);
    let mut silent = TestUa::udp("silent").await;
    let mut second = TestUa::udp("second").await;
    let mut caller = TestUa::udp("caller").await;
    // Nothing listens there: a branch sent by its Request-URI would never reach a UA.
    let ruri = "sip:+15551234@127.0.0.77:5099";
    let started = Instant::now();
    send_via(&mut caller, &server, ruri, &[&silent, &second], &[]).await;
    let to_silent = silent.recv_request(WAIT).await;
    assert_eq!(to_silent.request_uri_bytes().unwrap(), ruri.as_bytes());
    assert!(to_silent.headers_named("Route").next().is_none());
    let to_second = second.recv_request(WAIT).await;
    let waited = started.elapsed();
    assert_eq!(to_second.request_uri_bytes().unwrap(), ruri.as_bytes());
    assert!(to_second.headers_named("Route").next().is_none());
    second.respond(&to_second, 200, "OK").await;
    let answer = caller.recv_response(WAIT).await;
    expect_status(&answer, 200);
    assert!(waited >= Duration::from_millis(950), "{waited:?}");
    assert!(
        waited < Duration::from_secs(16),
        "{waited:?}: Timer F, not t_set_fr"
    );

    assert_eq!(server.kv("branches"), "408/true/Request Timeout");
    assert_eq!(
        server.kv("du_in_failure"),
        "nil",
        "du starts unset in on_failure"
    );
    assert_eq!(
        server.kv("branch_failure"),
        format!("{ruri} 408 true true 408 Request Timeout")
    );
}

const REJECTED: &str = r#"
function on_request(req)
  req.du = req:header("X-First")
  return req:t_relay()
end

function on_failure(req, res)
  local b = res.branches[1]
  sip.kv.set("branches", #res.branches .. " " .. b.code .. " " .. tostring(b.timeout)
    .. " " .. tostring(b.generated) .. " " .. b.reason)
end
"#;

/// A next hop's own rejection is in `res.branches` as received, not the proxy's.
#[tokio::test]
async fn a_received_rejection_is_the_next_hops_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, REJECTED);
    let mut gateway = TestUa::udp("gateway").await;
    let mut caller = TestUa::udp("caller").await;
    send_via(
        &mut caller,
        &server,
        "sip:bob@127.0.0.77:5099",
        &[&gateway],
        &[],
    )
    .await;
    let request = gateway.recv_request(WAIT).await;
    gateway.respond(&request, 486, "Busy Here").await;
    let answer = caller.recv_response(WAIT).await;
    expect_status(&answer, 486);
    assert_eq!(server.kv("branches"), "1 486 false false Busy Here");
}

const BAD_TIMER: &str = r#"
function on_request(req)
  req:t_set_fr(tonumber(req:header("X-Fr")))
  return req:t_relay("sip:127.0.0.1:9")
end
"#;

/// A negative failure timer is the script's error: the request gets 500.
#[tokio::test]
async fn a_bad_failure_timer_costs_the_request_a_500() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, BAD_TIMER);
    let mut caller = TestUa::udp("caller").await;
    caller
        .request("MESSAGE", "sip:bob@127.0.0.77:5099")
        .header("X-Fr", "-5")
        .to(server.udp)
        .await;
    expect_status(&caller.recv_response(WAIT).await, 500);
}

const REPLY_IN_FAILURE: &str = r#"
function on_request(req)
  req.du = req:header("X-First")
  return req:t_relay()
end

function on_failure(req, res)
  if res.status == 486 then
    return req:reply(tonumber(req:header("X-Reply")), "Temporarily Unavailable",
      {["X-Failure"] = "callee busy"})
  end
end
"#;

/// `req:reply` in `on_failure` (Kamailio's `t_reply` in a failure route) answers the caller
/// with the script's failure instead of the callee's 486; a 2xx there is the script's error,
/// and the caller gets the best response (the 486).
#[tokio::test]
async fn the_failure_route_answers_with_its_own_reply() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, REPLY_IN_FAILURE);
    let mut callee = TestUa::udp("callee").await;
    let mut caller = TestUa::udp("caller").await;
    for (reply, expected) in [("480", 480), ("200", 486)] {
        let extra = [("X-Reply", reply)];
        send_via(
            &mut caller,
            &server,
            "sip:bob@127.0.0.77:5099",
            &[&callee],
            &extra,
        )
        .await;
        let request = callee.recv_request(WAIT).await;
        callee.respond(&request, 486, "Busy Here").await;
        let answer = caller.recv_response(WAIT).await;
        expect_status(&answer, expected);
        let failure: Vec<_> = answer.headers_named("X-Failure").collect();
        if expected == 480 {
            assert_eq!(answer.reason(), Some(&b"Temporarily Unavailable"[..]));
            assert_eq!(failure, [&b"callee busy"[..]]);
            let to = answer.headers_named("To").next().unwrap();
            assert!(String::from_utf8_lossy(to).contains(";tag="));
        } else {
            assert!(failure.is_empty());
        }
    }
}

const EDIT_IN_FAILURE: &str = r#"
function on_request(req)
  req.du = req:header("X-First")
  req.vars.second = req:header("X-Second")
  return req:t_relay()
end

function on_failure(req, res)
  if not req.vars.tried then
    req.vars.tried = true
    req:append_header("X-Original-To", req.ruri)
    req.du = req.vars.second
    return req:t_relay()
  end
end
"#;

/// A header `on_failure` adds reaches the branch it starts (failover to a second UAS), not
/// the one sent before.
#[tokio::test]
async fn header_edits_in_the_failure_route_reach_the_new_branch() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, EDIT_IN_FAILURE);
    let mut first = TestUa::udp("first").await;
    let mut second = TestUa::udp("second").await;
    let mut caller = TestUa::udp("caller").await;
    let ruri = "sip:bob@127.0.0.77:5099";
    send_via(&mut caller, &server, ruri, &[&first, &second], &[]).await;
    let to_first = first.recv_request(WAIT).await;
    assert!(to_first.headers_named("X-Original-To").next().is_none());
    first.respond(&to_first, 486, "Busy Here").await;
    let to_second = second.recv_request(WAIT).await;
    let original: Vec<_> = to_second.headers_named("X-Original-To").collect();
    assert_eq!(original, [ruri.as_bytes()]);
    second.respond(&to_second, 200, "OK").await;
    expect_status(&caller.recv_response(WAIT).await, 200);
}
