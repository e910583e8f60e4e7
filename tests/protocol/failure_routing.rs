//! Failure routing from a script (Kamailio's `t_set_fr`, `$du`,
//! `event_route[tm:branch-failure]`) in the harness: a server routed by Lua, simulated agents
//! as the caller and the next hops, one of them silent. `req.du` sends a branch to a next hop
//! without rewriting the Request-URI or adding a Route, and a failure route's new branch does
//! not inherit it; `req:t_set_fr()` gives a silent next hop up long before Timer F, at exactly
//! its time; `on_branch_failure` and `res.branches` see the proxy's own 408; `req:reply` in
//! `on_failure` answers the caller, and header edits there reach the new branches.

use std::time::Duration;

use super::harness::{config, expect_status, Harness, Message, UaId};

/// Nothing is there: a branch sent by its Request-URI would never reach an agent.
const NOWHERE: &str = "sip:bob@127.0.0.77:5099";

/// A server routed by `script`, and a caller sending to it.
fn start(script: &str) -> (Harness, UaId) {
    let mut h = Harness::with_script(&config(), script);
    let caller = h.add_ua_via_proxy("caller", "127.0.0.1:5070");
    (h, caller)
}

/// A MESSAGE for `ruri` through the server, naming the next hops the scripts below read:
/// `X-First`, then `X-Second`, then any `extra` headers.
fn send_via(
    h: &mut Harness,
    caller: UaId,
    ruri: &str,
    hops: &[UaId],
    extra: &[(&str, &str)],
) -> Message {
    let hops: Vec<String> = hops
        .iter()
        .map(|&hop| format!("sip:{}", h.ua(hop).local))
        .collect();
    let mut request = h.ua(caller).request("MESSAGE", ruri);
    for (name, hop) in ["X-First", "X-Second"].into_iter().zip(&hops) {
        request = request.header(name, hop);
    }
    for (name, value) in extra {
        request = request.header(name, value);
    }
    request.send()
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

/// The first next hop is silent: `t_set_fr(0, 1000)` gives it up after exactly 1 s (Timer F
/// would take 32 s), the failure route sees the 408 and sends the request to the second next
/// hop with a `du` of its own; both copies keep the Request-URI and carry no Route.
#[test]
fn du_and_t_set_fr_fail_a_silent_next_hop_over_to_another() {
    let (mut h, caller) = start(DU_FAILOVER);
    let silent = h.add_ua("silent", "127.0.0.1:5081");
    let second = h.add_ua("second", "127.0.0.1:5082");
    let ruri = "sip:+15551234@127.0.0.77:5099";
    send_via(&mut h, caller, ruri, &[silent, second], &[]);
    let to_silent = h.expect_request(silent, "MESSAGE");
    assert_eq!(to_silent.request_uri_bytes().unwrap(), ruri.as_bytes());
    assert!(to_silent.headers_named("Route").next().is_none());
    h.advance(Duration::from_millis(999));
    h.expect_nothing(second);
    h.advance(Duration::from_millis(1));
    let to_second = h.expect_request(second, "MESSAGE");
    assert_eq!(to_second.request_uri_bytes().unwrap(), ruri.as_bytes());
    assert!(to_second.headers_named("Route").next().is_none());
    h.ua(second).respond(&to_second, 200, "OK");
    h.expect_final(caller, 200);

    assert_eq!(h.kv("branches"), "408/true/Request Timeout");
    assert_eq!(
        h.kv("du_in_failure"),
        "nil",
        "du starts unset in on_failure"
    );
    assert_eq!(
        h.kv("branch_failure"),
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
#[test]
fn a_received_rejection_is_the_next_hops_outcome() {
    let (mut h, caller) = start(REJECTED);
    let gateway = h.add_ua("gateway", "127.0.0.1:5081");
    send_via(&mut h, caller, NOWHERE, &[gateway], &[]);
    let request = h.expect_request(gateway, "MESSAGE");
    h.ua(gateway).respond(&request, 486, "Busy Here");
    h.expect_final(caller, 486);
    assert_eq!(h.kv("branches"), "1 486 false false Busy Here");
}

const BAD_TIMER: &str = r#"
function on_request(req)
  req:t_set_fr(tonumber(req:header("X-Fr")))
  return req:t_relay("sip:127.0.0.1:9")
end
"#;

/// A negative failure timer is the script's error: the request gets 500.
#[test]
fn a_bad_failure_timer_costs_the_request_a_500() {
    let (mut h, caller) = start(BAD_TIMER);
    h.ua(caller)
        .request("MESSAGE", NOWHERE)
        .header("X-Fr", "-5")
        .send();
    h.expect_final(caller, 500);
    assert!(h.lost.is_empty(), "nothing relayed: {:?}", h.lost);
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
#[test]
fn the_failure_route_answers_with_its_own_reply() {
    let (mut h, caller) = start(REPLY_IN_FAILURE);
    let callee = h.add_ua("callee", "127.0.0.1:5081");
    for (reply, expected) in [("480", 480), ("200", 486)] {
        let extra = [("X-Reply", reply)];
        send_via(&mut h, caller, NOWHERE, &[callee], &extra);
        let request = h.expect_request(callee, "MESSAGE");
        h.ua(callee).respond(&request, 486, "Busy Here");
        let answer = h.recv_response(caller);
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
#[test]
fn header_edits_in_the_failure_route_reach_the_new_branch() {
    let (mut h, caller) = start(EDIT_IN_FAILURE);
    let first = h.add_ua("first", "127.0.0.1:5081");
    let second = h.add_ua("second", "127.0.0.1:5082");
    send_via(&mut h, caller, NOWHERE, &[first, second], &[]);
    let to_first = h.expect_request(first, "MESSAGE");
    assert!(to_first.headers_named("X-Original-To").next().is_none());
    h.ua(first).respond(&to_first, 486, "Busy Here");
    let to_second = h.expect_request(second, "MESSAGE");
    let original: Vec<_> = to_second.headers_named("X-Original-To").collect();
    assert_eq!(original, [NOWHERE.as_bytes()]);
    h.ua(second).respond(&to_second, 200, "OK");
    h.expect_final(caller, 200);
}
