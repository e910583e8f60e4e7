//! Dialog tracking, call limits and CDRs (`moonroute-proto/src/dialog/`) in the harness: the shipped
//! `scripts/default.lua` (digest authentication off) or a small limiting script, two event
//! loops, CDRs in the script's data directory. A call's end, its max duration (`[dialog]
//! max_duration_secs`, `dlg_set_timeout`) is checked at exactly its simulated time, and so is
//! the CDR's duration (the harness's clock is the dialog table's wall clock for an answer and
//! an end). A CDR's start is stamped by the script with the real clock, so the test comparing
//! start, answer and end stays on sockets (`tests/dialog.rs`).
//!
//! Hosts: alice (our user) on 127.0.0.2, bob (registered) on 127.0.0.3, eve (a caller from
//! elsewhere) on 127.0.0.4, mallory (a stranger holding a captured Route) on 127.0.0.6.
//!
//! A CDR is written before the message that ends its call is relayed, so it is on file once
//! that message arrives.

use std::time::{Duration, SystemTime};

use super::common_cdr::{self as cdr, field, number};
use super::harness::{
    config, default_script_without_auth, Config, Harness, HeaderName, Message, UaId, PROXY,
};
use super::ua::{sdp, Dialog};

const DOMAIN: &str = "moonroute.test";
const ALICE: &str = "127.0.0.2:5060";
const BOB: &str = "127.0.0.3:5060";
const EVE: &str = "127.0.0.4:5060";
const MALLORY: &str = "127.0.0.6:5060";

/// The harness's configuration with our domain and CDRs on.
fn dialog_config() -> Config {
    let mut config = config();
    config.domains = vec![DOMAIN.to_owned()];
    config.dialog.cdr = true;
    config
}

/// A server routed by `script`, with `edit` applied to the configuration first.
fn start_with(script: &str, edit: impl FnOnce(&mut Config)) -> Harness {
    let mut config = dialog_config();
    edit(&mut config);
    config.validate().unwrap();
    Harness::with_script(&config, script)
}

/// A server routed by the shipped policy without digest authentication.
fn start() -> Harness {
    start_with(&default_script_without_auth(), |_| {})
}

/// The CDR lines written so far.
fn cdrs(h: &Harness) -> Vec<String> {
    cdr::lines(&h.data_dir())
}

fn aor(user: &str) -> String {
    format!("sip:{user}@{DOMAIN}")
}

/// A phone at `addr` whose outbound proxy is the server; `domain` is its From host.
fn phone(h: &mut Harness, name: &str, addr: &str, domain: &str) -> UaId {
    let ua = h.add_ua_via_proxy(name, addr);
    h.ua(ua).from_domain = Some(domain.to_owned());
    ua
}

fn registered_bob(h: &mut Harness) -> UaId {
    let bob = phone(h, "bob", BOB, DOMAIN);
    h.ua(bob)
        .request("REGISTER", &aor("bob"))
        .header("Expires", "600")
        .send();
    h.expect_final(bob, 200);
    bob
}

/// `caller` calls `callee` at `uri`: INVITE, 180, 200, ACK. The caller's dialog and the
/// callee's.
fn answered_call(h: &mut Harness, caller: UaId, callee: UaId, uri: &str) -> (Dialog, Dialog) {
    h.ua(caller).invite(uri);
    let incoming = h.expect_request(callee, "INVITE");
    h.ua(callee).respond(&incoming, 180, "Ringing");
    let answer = h.ua(callee).respond(&incoming, 200, "OK");
    let ok = h.expect_final(caller, 200);
    let dialog = h.ua(caller).ack_2xx(&ok);
    h.expect_request(callee, "ACK");
    (dialog, Dialog::from_uas(&incoming, &answer))
}

/// A BYE from `from` reaching `to` through the proxy, answered 200.
fn hang_up(h: &mut Harness, from: UaId, dialog: &mut Dialog, to: UaId) -> Message {
    h.ua(from).bye(dialog);
    let bye = h.expect_request(to, "BYE");
    h.ua(to).respond(&bye, 200, "OK");
    h.expect_final(from, 200);
    bye
}

#[test]
fn a_cancelled_call_gives_a_failed_attempt_record() {
    let mut h = start();
    let bob = registered_bob(&mut h);
    let alice = phone(&mut h, "alice", ALICE, DOMAIN);

    let invite = h.ua(alice).invite(&aor("bob"));
    let incoming = h.expect_request(bob, "INVITE");
    h.ua(bob).respond(&incoming, 180, "Ringing");
    h.expect_response(alice, 100);
    h.expect_response(alice, 180);
    h.ua(alice).cancel(&invite);
    let cancel = h.expect_request(bob, "CANCEL");
    h.ua(bob).respond(&cancel, 200, "OK");
    h.ua(bob).respond(&incoming, 487, "Request Terminated");
    // The CANCEL's 200 and the INVITE's 487, in either order.
    let mut statuses = Vec::new();
    while !statuses.contains(&487) {
        statuses.push(h.recv_response(alice).status().unwrap());
    }

    let lines = cdrs(&h);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = &lines[0];
    assert_eq!(field(line, "reason"), "\"cancelled\"", "{line}");
    assert_eq!(field(line, "status"), "487", "{line}");
    assert_eq!(field(line, "answer"), "null", "{line}");
    assert_eq!(field(line, "hangup"), "null", "{line}");
    assert_eq!(field(line, "duration"), "0.000", "{line}");
}

#[test]
fn a_stranger_holding_a_captured_route_reaches_nobody_and_nothing_passes_after_the_end() {
    let mut h = start();
    let bob = registered_bob(&mut h);
    let eve = phone(&mut h, "eve", EVE, "elsewhere.example");
    let mallory = phone(&mut h, "mallory", MALLORY, "elsewhere.example");

    let (mut eves, bobs) = answered_call(&mut h, eve, bob, &aor("bob"));
    // Both copies of our Record-Route say the call is tracked (`t`, `u`): once the table
    // forgets the call (32 s after it ends), they still tell `dlg_known()` it ended.
    assert!(
        bobs.route_set.iter().any(|r| r.contains(";mrs=t")),
        "{:?}",
        bobs.route_set
    );
    assert!(
        eves.route_set.iter().any(|r| r.contains(";mrs=u")),
        "{:?}",
        eves.route_set
    );
    // Mallory holds bob's copy of the Record-Route (it binds the Call-ID and eve's tag, not
    // bob's) and sends eve a BYE in bob's name with a tag of her own: the signature passes,
    // the dialog does not know her.
    let mut forged = bobs.clone();
    forged.local = bobs.local.replace(&bobs.local_tag, "mallory-tag");
    forged.local_tag = "mallory-tag".to_owned();
    h.ua(mallory).bye(&mut forged);
    h.expect_final(mallory, 481);

    // The call goes on, and ends normally.
    hang_up(&mut h, eve, &mut eves, bob);
    assert_eq!(cdrs(&h).len(), 1);
    // After the end, the same route set reaches nobody: a re-INVITE in the ended dialog.
    h.ua(eve)
        .in_dialog("INVITE", &mut eves)
        .body("application/sdp", &sdp("eve"))
        .send();
    h.expect_final(eve, 481);
    assert_eq!(cdrs(&h).len(), 1, "nothing more was accounted");
    h.expect_nothing(bob);
}

/// Record-routes and relays to the Request-URI; tracks every INVITE and limits each caller
/// (From URI) to two calls at once; in-dialog requests as `scripts/default.lua` checks them.
const LIMITING_SCRIPT: &str = r#"
function on_request(req)
  if req:has_to_tag() then
    if req:loose_route() then
      local known, why = req:dlg_known()
      if known or why == "untracked" then
        return req:t_relay()
      end
      if req:is_method("ACK") then
        return req:drop()
      end
      return req:reply(481, "Call/Transaction Does Not Exist")
    end
    return req:reply(404, "Not Here")
  end
  if req:is_method("INVITE") then
    req:record_route()
    req:dlg_manage()
    if not sip.dlg.profile_add("caller", req.from_uri, 2) then
      return req:reply(486, "Busy Here")
    end
    sip.dlg.acc("calls_before", sip.dlg.profile_count("caller", req.from_uri) - 1)
  end
  return req:t_relay()
end

-- A custom sink: what ended, in sip.kv.
function on_dialog_end(dlg)
  sip.kv.set("ended:" .. dlg.call_id, table.concat({dlg.reason, dlg.status, dlg.hangup or "-",
    dlg.extra.calls_before or "-", dlg.answer and "answered" or "unanswered"}, " "))
end
"#;

#[test]
fn a_per_user_limit_of_two_refuses_the_third_call_and_admits_it_after_a_hangup() {
    let mut h = start_with(LIMITING_SCRIPT, |_| {});
    let bob = phone(&mut h, "bob", BOB, DOMAIN);
    let alice = phone(&mut h, "alice", ALICE, DOMAIN);
    let bob_uri = h.ua(bob).uri();

    let (mut first, _) = answered_call(&mut h, alice, bob, &bob_uri);
    let (_second, _) = answered_call(&mut h, alice, bob, &bob_uri);
    let third = h.ua(alice).invite(&bob_uri);
    h.expect_final(alice, 486);
    hang_up(&mut h, alice, &mut first, bob);
    let (_fourth, _) = answered_call(&mut h, alice, bob, &bob_uri);

    // The script's on_dialog_end saw both ends.
    let third_id = String::from_utf8_lossy(third.call_id().unwrap()).into_owned();
    assert_eq!(
        h.kv(&format!("ended:{third_id}")),
        "failed 486 - - unanswered"
    );
    assert_eq!(
        h.kv(&format!("ended:{}", first.call_id)),
        "caller_bye 200 caller 0 answered"
    );

    let lines = cdrs(&h);
    assert_eq!(
        lines.len(),
        2,
        "the refused attempt and the first call: {lines:#?}"
    );
    assert_eq!(field(&lines[0], "status"), "486", "{}", lines[0]);
    assert_eq!(field(&lines[0], "reason"), "\"failed\"", "{}", lines[0]);
    assert_eq!(field(&lines[1], "reason"), "\"caller_bye\"", "{}", lines[1]);
    assert!(
        lines[1].ends_with("\"extra\":{\"calls_before\":\"0\"}}"),
        "the script's field: {}",
        lines[1]
    );
}

#[test]
fn dialogs_survive_a_script_reload() {
    let mut h = start();
    let bob = registered_bob(&mut h);
    let alice = phone(&mut h, "alice", ALICE, DOMAIN);

    let (_, mut bobs) = answered_call(&mut h, alice, bob, &aor("bob"));
    assert_eq!(h.script().reload().expect("the same script reloads"), 2);
    // The new version knows the call: bob's BYE is relayed, and accounted.
    hang_up(&mut h, bob, &mut bobs, alice);
    let lines = cdrs(&h);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(field(&lines[0], "reason"), "\"callee_bye\"");
}

/// The BYE the proxy sends `ua` in the name of its peer, answered 200: it names `ua`'s dialog
/// (Call-ID, `ua`'s tag in To, the peer's in From) and comes from the proxy.
fn bye_from_the_proxy(h: &mut Harness, ua: UaId, dialog: &Dialog) -> Message {
    let bye = h.expect_request(ua, "BYE");
    let (call_id, from_tag, to_tag) = moonroute::dialog::tags(&bye).expect("in-dialog BYE");
    assert_eq!(call_id, dialog.call_id.as_bytes());
    assert_eq!(from_tag, dialog.remote_tag.as_bytes(), "in the peer's name");
    assert_eq!(to_tag, dialog.local_tag.as_bytes());
    let via = String::from_utf8_lossy(bye.header(HeaderName::Via).unwrap()).into_owned();
    assert!(via.contains(PROXY), "one Via, the proxy's: {via}");
    h.ua(ua).respond(&bye, 200, "OK");
    bye
}

/// A CDR is written when the call ends, before its BYEs leave: once both BYEs are in, the
/// call's one line is on file.
fn only_cdr(h: &Harness) -> String {
    let lines = cdrs(h);
    assert_eq!(lines.len(), 1, "one CDR: {lines:#?}");
    lines[0].clone()
}

/// Advances the clock to just before `after` has passed, checks that neither party got a
/// BYE yet, then to exactly `after`.
fn nothing_until(h: &mut Harness, after: Duration, parties: [UaId; 2]) {
    h.advance(after - Duration::from_millis(1));
    for party in parties {
        h.expect_nothing(party);
    }
    h.advance(Duration::from_millis(1));
}

#[test]
fn max_duration_cuts_the_call_with_a_bye_to_each_party() {
    let mut h = start_with(&default_script_without_auth(), |config| {
        config.dialog.max_duration_secs = 1;
    });
    let bob = registered_bob(&mut h);
    let alice = phone(&mut h, "alice", ALICE, DOMAIN);

    let (alices, bobs) = answered_call(&mut h, alice, bob, &aor("bob"));
    // Nobody hangs up: exactly a second after the answer the proxy does, to both.
    nothing_until(&mut h, Duration::from_secs(1), [alice, bob]);
    let to_alice = bye_from_the_proxy(&mut h, alice, &alices);
    let to_bob = bye_from_the_proxy(&mut h, bob, &bobs);
    // Each in the name of the other party, with that party's next CSeq (neither sent a
    // request since the INVITE, CSeq 1 on both sides: bob never sent one).
    assert_eq!(to_bob.cseq().unwrap().seq, alices.local_cseq + 1);
    assert_eq!(to_alice.cseq().unwrap().seq, 1);

    let line = only_cdr(&h);
    assert_eq!(field(&line, "reason"), "\"max_duration\"", "{line}");
    assert_eq!(field(&line, "hangup"), "\"proxy\"", "{line}");
    let duration = number(&line, "duration");
    assert!(
        (duration - 1.0).abs() <= 0.001,
        "cut exactly a second after the answer: {line}"
    );
}

#[test]
fn ctl_dlg_end_hangs_up_a_call_from_outside() {
    let mut h = start();
    let bob = registered_bob(&mut h);
    let alice = phone(&mut h, "alice", ALICE, DOMAIN);
    let (alices, bobs) = answered_call(&mut h, alice, bob, &aor("bob"));

    // What `moonroute ctl dlg end CALL-ID` runs, off the event loops as the control socket
    // runs it: queued to the loop owning the call, answered once its BYEs are sent.
    let dialogs = h.dialogs();
    let end = |h: &mut Harness, call_id: &str| {
        let args = ["end".to_owned(), call_id.to_owned()];
        h.off_loop(|| moonroute::control::dlg::command(&args, &dialogs, SystemTime::now()))
    };
    let reply = end(&mut h, &alices.call_id);
    assert!(reply.ok, "{}", reply.text);
    assert_eq!(
        reply.text,
        format!("{}: ended: BYE sent to caller and callee\n", alices.call_id)
    );
    bye_from_the_proxy(&mut h, alice, &alices);
    bye_from_the_proxy(&mut h, bob, &bobs);
    let line = only_cdr(&h);
    assert_eq!(field(&line, "reason"), "\"ctl\"", "{line}");

    // Ended: a second `end` finds no live call, and the parties' own BYEs find no dialog.
    let again = end(&mut h, &alices.call_id);
    assert!(
        !again.ok && again.text.contains("no live call"),
        "{}",
        again.text
    );
}

/// Record-routes, tracks every INVITE and cuts it half a second after the answer.
const SHORT_CALLS_SCRIPT: &str = r#"
function on_request(req)
  if req:has_to_tag() then
    if req:loose_route() then
      return req:t_relay()
    end
    return req:reply(404, "Not Here")
  end
  if req:is_method("INVITE") then
    req:record_route()
    req:dlg_manage()
    local ok, err = pcall(function() req:dlg_set_timeout(-1) end)
    assert(not ok and tostring(err):find("seconds must be from 0"), tostring(err))
    req:dlg_set_timeout(0.5)
  end
  return req:t_relay()
end
"#;

#[test]
fn the_script_s_timeout_wins_over_the_configured_one() {
    let mut h = start_with(SHORT_CALLS_SCRIPT, |config| {
        config.dialog.max_duration_secs = 3600
    });
    let bob = phone(&mut h, "bob", BOB, DOMAIN);
    let alice = phone(&mut h, "alice", ALICE, DOMAIN);
    let bob_uri = h.ua(bob).uri();

    let (alices, bobs) = answered_call(&mut h, alice, bob, &bob_uri);
    nothing_until(&mut h, Duration::from_millis(500), [alice, bob]);
    bye_from_the_proxy(&mut h, alice, &alices);
    bye_from_the_proxy(&mut h, bob, &bobs);
    let line = only_cdr(&h);
    assert_eq!(field(&line, "reason"), "\"max_duration\"", "{line}");
    let duration = number(&line, "duration");
    assert!((duration - 0.5).abs() <= 0.001, "{line}");
}

/// docs/routing-scripts.md's two Lua lines ("Calls: dialogs, limits, CDRs"), in place of each
/// `track_call(req)` line of scripts/default.lua (digest authentication off).
fn default_script_with_the_documented_limit() -> String {
    let doc = include_str!("../../docs/routing-scripts.md");
    let section = &doc[doc
        .find("## Calls: dialogs, limits, CDRs")
        .expect("the section")..];
    let block = &section[section.find("```lua\n").expect("a Lua block") + 7..];
    let lines = &block[..block.find("```").expect("its end")];
    let script = default_script_without_auth();
    let indented = |indent: &str| {
        lines
            .lines()
            .map(|line| format!("{indent}{line}\n"))
            .collect::<String>()
    };
    let limited = script.replace("    track_call(req)\n", &indented("    "));
    assert_eq!(
        limited.matches("profile_add(\"caller\"").count(),
        3,
        "two call sites and the comment"
    );
    limited
}

#[test]
fn the_documented_two_lines_limit_a_user_of_default_lua_to_two_calls() {
    let mut h = start_with(&default_script_with_the_documented_limit(), |_| {});
    let bob = registered_bob(&mut h);
    let alice = phone(&mut h, "alice", ALICE, DOMAIN);

    let (mut first, _) = answered_call(&mut h, alice, bob, &aor("bob"));
    let _second = answered_call(&mut h, alice, bob, &aor("bob"));
    h.ua(alice).invite(&aor("bob"));
    h.expect_final(alice, 486);
    hang_up(&mut h, alice, &mut first, bob);
    let _fourth = answered_call(&mut h, alice, bob, &aor("bob"));
}
