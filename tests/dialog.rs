//! Dialog tracking, call limits and CDRs (issue 22, `moonroute-proto/src/dialog/`) end to end: the shipped
//! `scripts/default.lua` (digest authentication off) or a small limiting script, real UDP
//! sockets of 127.0.0.1, CDRs in a temporary data directory.
//!
//! Hosts: alice (our user) on 127.0.0.2, bob (registered) on 127.0.0.3, eve (a caller from
//! elsewhere) on 127.0.0.4, mallory (a stranger holding a captured Route) on 127.0.0.6.
//!
//! Nothing sleeps: every wait is for a message, bounded by a timeout. A CDR is written before
//! the message that ends its call is relayed, so it is on file once that message arrives.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use common::ua::{Dialog, TestUa};
use moonroute::config::{Config, LocationBackend};
use moonroute::dialog::Directory;
use moonroute::script::kv::KvValue;
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::Message;
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;

const DOMAIN: &str = "moonroute.test";
const ALICE_IP: [u8; 4] = [127, 0, 0, 2];
const BOB_IP: [u8; 4] = [127, 0, 0, 3];
const EVE_IP: [u8; 4] = [127, 0, 0, 4];
const MALLORY_IP: [u8; 4] = [127, 0, 0, 6];

struct Running {
    _server: ServerHandle,
    host: Arc<ScriptHost>,
    udp: SocketAddr,
    dir: TempDir,
    /// What `moonroute ctl dlg` reads and sends its end requests through.
    dialogs: Arc<Directory>,
}

/// `script` on UDP of 127.0.0.1, two event loops, data (registrations, CDRs) in a fresh
/// directory.
fn start(script: &Path) -> Running {
    start_with(script, |_| {})
}

/// [`start`], with `edit` applied to the configuration first.
fn start_with(script: &Path, edit: impl FnOnce(&mut Config)) -> Running {
    let dir = TempDir::new().unwrap();
    let mut config = Config {
        listen: vec!["udp:127.0.0.1:0".parse::<ListenAddr>().unwrap()],
        domains: vec![DOMAIN.to_owned()],
        workers: 2,
        script: script.to_path_buf(),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Memory;
    edit(&mut config);
    config.validate().unwrap();
    let host = ScriptHost::from_config(&config).expect("the script loads");
    let factory = CoreFactory::with_router(&config, host.router_factory());
    let dialogs = factory.dialog_directory();
    let server = Server::start(&config, Arc::new(factory)).expect("server starts");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        _server: server,
        host,
        dir,
        dialogs,
    }
}

/// [`start_with`] the script `text` (in the returned directory, to keep while it runs).
fn start_script(text: &str, edit: impl FnOnce(&mut Config)) -> (TempDir, Running) {
    let dir = TempDir::new().unwrap();
    let script = dir.path().join("script.lua");
    std::fs::write(&script, text).unwrap();
    let proxy = start_with(&script, edit);
    (dir, proxy)
}

/// The CDR lines written so far.
fn cdrs(proxy: &Running) -> Vec<String> {
    std::fs::read_to_string(proxy.dir.path().join("cdr.jsonl"))
        .map(|text| text.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The raw JSON value of `name` in a CDR line (`"x"` with its quotes, a number, `null`).
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let key = format!("\"{name}\":");
    let start = line
        .find(&key)
        .unwrap_or_else(|| panic!("{name} in {line}"))
        + key.len();
    let rest = &line[start..];
    let end = match rest.strip_prefix('"') {
        Some(quoted) => quoted.find('"').map_or(rest.len(), |i| i + 2),
        None => rest.find([',', '}']).unwrap_or(rest.len()),
    };
    &rest[..end]
}

fn number(line: &str, name: &str) -> f64 {
    field(line, name)
        .parse()
        .unwrap_or_else(|_| panic!("{name} is a number in {line}"))
}

fn aor(user: &str) -> String {
    format!("sip:{user}@{DOMAIN}")
}

async fn phone(name: &str, ip: [u8; 4], proxy: &Running, domain: &str) -> TestUa {
    let mut ua = TestUa::udp_on(name, SocketAddr::from((ip, 0))).await;
    ua.from_domain = Some(domain.to_owned());
    ua.outbound = Some(proxy.udp);
    ua
}

async fn registered_bob(proxy: &Running) -> TestUa {
    let mut bob = phone("bob", BOB_IP, proxy, DOMAIN).await;
    bob.request("REGISTER", &aor("bob"))
        .header("Expires", "600")
        .await;
    bob.expect_final(200).await;
    bob
}

/// `caller` calls `callee` at `uri`: INVITE, 180, 200, ACK. The caller's dialog and the
/// callee's.
async fn answered_call(caller: &mut TestUa, callee: &mut TestUa, uri: &str) -> (Dialog, Dialog) {
    caller.invite(uri).await;
    let incoming = callee.expect_request("INVITE").await;
    callee.respond(&incoming, 180, "Ringing").await;
    let answer = callee.respond(&incoming, 200, "OK").await;
    let ok = caller.expect_final(200).await;
    let dialog = caller.ack_2xx(&ok).await;
    callee.expect_request("ACK").await;
    (dialog, Dialog::from_uas(&incoming, &answer))
}

/// A BYE from `from` reaching `to` through the proxy, answered 200.
async fn hang_up(from: &mut TestUa, dialog: &mut Dialog, to: &mut TestUa) -> Message {
    from.bye(dialog).await;
    let bye = to.expect_request("BYE").await;
    to.respond(&bye, 200, "OK").await;
    from.expect_final(200).await;
    bye
}

#[tokio::test]
async fn a_call_hung_up_by_either_side_gives_one_cdr_with_sane_times() {
    let proxy = start(&common::default_script_without_auth());
    let mut bob = registered_bob(&proxy).await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;

    let (mut alices, _) = answered_call(&mut alice, &mut bob, &aor("bob")).await;
    assert!(cdrs(&proxy).is_empty(), "no CDR while the call is up");
    hang_up(&mut alice, &mut alices, &mut bob).await;
    let (_, mut bobs) = answered_call(&mut alice, &mut bob, &aor("bob")).await;
    hang_up(&mut bob, &mut bobs, &mut alice).await;

    let lines = cdrs(&proxy);
    assert_eq!(lines.len(), 2, "one CDR per call: {lines:#?}");
    for (line, (reason, who)) in lines.iter().zip([
        ("\"caller_bye\"", "\"caller\""),
        ("\"callee_bye\"", "\"callee\""),
    ]) {
        assert_eq!(field(line, "reason"), reason, "{line}");
        assert_eq!(field(line, "hangup"), who, "{line}");
        assert_eq!(field(line, "status"), "200", "{line}");
        assert_eq!(
            field(line, "from_uri"),
            format!("\"{}\"", aor("alice")),
            "{line}"
        );
        assert_eq!(field(line, "ruri"), format!("\"{}\"", aor("bob")), "{line}");
        assert!(field(line, "src").starts_with("\"udp:127.0.0.2:"), "{line}");
        let (start, answer, end) = (
            number(line, "start"),
            number(line, "answer"),
            number(line, "end"),
        );
        assert!(start <= answer && answer <= end, "{line}");
        assert!(end - start < 60.0, "the test's calls last seconds: {line}");
        let duration = number(line, "duration");
        assert!((duration - (end - answer)).abs() < 0.002, "{line}");
    }
}

#[tokio::test]
async fn a_cancelled_call_gives_a_failed_attempt_record() {
    let proxy = start(&common::default_script_without_auth());
    let mut bob = registered_bob(&proxy).await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;

    let invite = alice.invite(&aor("bob")).await;
    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 180, "Ringing").await;
    alice.expect_response(100).await;
    alice.expect_response(180).await;
    alice.cancel(&invite).await;
    let cancel = bob.expect_request("CANCEL").await;
    bob.respond(&cancel, 200, "OK").await;
    bob.respond(&incoming, 487, "Request Terminated").await;
    // The CANCEL's 200 and the INVITE's 487, in either order.
    let mut statuses = Vec::new();
    while !statuses.contains(&487) {
        statuses.push(
            alice
                .recv_response(common::ua::WAIT)
                .await
                .status()
                .unwrap(),
        );
    }

    let lines = cdrs(&proxy);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = &lines[0];
    assert_eq!(field(line, "reason"), "\"cancelled\"", "{line}");
    assert_eq!(field(line, "status"), "487", "{line}");
    assert_eq!(field(line, "answer"), "null", "{line}");
    assert_eq!(field(line, "hangup"), "null", "{line}");
    assert_eq!(field(line, "duration"), "0.000", "{line}");
}

#[tokio::test]
async fn a_stranger_holding_a_captured_route_reaches_nobody_and_nothing_passes_after_the_end() {
    let proxy = start(&common::default_script_without_auth());
    let mut bob = registered_bob(&proxy).await;
    let mut eve = phone("eve", EVE_IP, &proxy, "elsewhere.example").await;
    let mut mallory = phone("mallory", MALLORY_IP, &proxy, "elsewhere.example").await;

    let (mut eves, bobs) = answered_call(&mut eve, &mut bob, &aor("bob")).await;
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
    mallory.bye(&mut forged).await;
    mallory.expect_final(481).await;

    // The call goes on, and ends normally.
    hang_up(&mut eve, &mut eves, &mut bob).await;
    assert_eq!(cdrs(&proxy).len(), 1);
    // After the end, the same route set reaches nobody: a re-INVITE in the ended dialog.
    eve.in_dialog("INVITE", &mut eves)
        .body("application/sdp", &common::ua::sdp("eve"))
        .await;
    eve.expect_final(481).await;
    assert_eq!(cdrs(&proxy).len(), 1, "nothing more was accounted");
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

#[tokio::test]
async fn a_per_user_limit_of_two_refuses_the_third_call_and_admits_it_after_a_hangup() {
    let (_script, proxy) = start_script(LIMITING_SCRIPT, |_| {});
    let mut bob = phone("bob", BOB_IP, &proxy, DOMAIN).await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;
    let bob_uri = bob.uri();

    let (mut first, _) = answered_call(&mut alice, &mut bob, &bob_uri).await;
    let (_second, _) = answered_call(&mut alice, &mut bob, &bob_uri).await;
    let third = alice.invite(&bob_uri).await;
    alice.expect_final(486).await;
    hang_up(&mut alice, &mut first, &mut bob).await;
    let (_fourth, _) = answered_call(&mut alice, &mut bob, &bob_uri).await;

    // The script's on_dialog_end saw both ends.
    let ended = |call_id: &str| match proxy
        .host
        .services()
        .kv
        .get(&format!("ended:{call_id}"), Instant::now())
    {
        Some(KvValue::Str(text)) => text,
        other => panic!("on_dialog_end did not record {call_id}: {other:?}"),
    };
    let third_id = String::from_utf8_lossy(third.call_id().unwrap()).into_owned();
    assert_eq!(ended(&third_id), "failed 486 - - unanswered");
    assert_eq!(ended(&first.call_id), "caller_bye 200 caller 0 answered");

    let lines = cdrs(&proxy);
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

#[tokio::test]
async fn dialogs_survive_a_script_reload() {
    let proxy = start(&common::default_script_without_auth());
    let mut bob = registered_bob(&proxy).await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;

    let (_, mut bobs) = answered_call(&mut alice, &mut bob, &aor("bob")).await;
    assert_eq!(proxy.host.reload().expect("the same script reloads"), 2);
    // The new version knows the call: bob's BYE is relayed, and accounted.
    hang_up(&mut bob, &mut bobs, &mut alice).await;
    let lines = cdrs(&proxy);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(field(&lines[0], "reason"), "\"callee_bye\"");
}

/// The BYE the proxy sends `ua` in the name of its peer, answered 200: it names `ua`'s dialog
/// (Call-ID, `ua`'s tag in To, the peer's in From) and comes from the proxy.
async fn bye_from_the_proxy(ua: &mut TestUa, dialog: &Dialog, proxy: &Running) -> Message {
    // Generous: the max-duration timer fires a second after the answer, and a loaded machine
    // may run it late.
    let bye = ua.recv_request(std::time::Duration::from_secs(20)).await;
    assert_eq!(bye.method(), Some(&moonroute::sip::Method::Bye), "{bye:?}");
    let (call_id, from_tag, to_tag) = moonroute::dialog::tags(&bye).expect("in-dialog BYE");
    assert_eq!(call_id, dialog.call_id.as_bytes());
    assert_eq!(from_tag, dialog.remote_tag.as_bytes(), "in the peer's name");
    assert_eq!(to_tag, dialog.local_tag.as_bytes());
    let via =
        String::from_utf8_lossy(bye.header(moonroute::sip::HeaderName::Via).unwrap()).into_owned();
    assert!(
        via.contains(&proxy.udp.to_string()),
        "one Via, the proxy's: {via}"
    );
    ua.respond(&bye, 200, "OK").await;
    bye
}

/// A CDR is written when the call ends, before its BYEs leave: once both BYEs are in, the
/// call's one line is on file.
fn only_cdr(proxy: &Running) -> String {
    let lines = cdrs(proxy);
    assert_eq!(lines.len(), 1, "one CDR: {lines:#?}");
    lines[0].clone()
}

#[tokio::test]
async fn max_duration_cuts_the_call_with_a_bye_to_each_party() {
    let proxy = start_with(&common::default_script_without_auth(), |config| {
        config.dialog.max_duration_secs = 1;
    });
    let mut bob = registered_bob(&proxy).await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;

    let (alices, bobs) = answered_call(&mut alice, &mut bob, &aor("bob")).await;
    // Nobody hangs up: a second after the answer the proxy does, to both (within WAIT).
    let to_alice = bye_from_the_proxy(&mut alice, &alices, &proxy).await;
    let to_bob = bye_from_the_proxy(&mut bob, &bobs, &proxy).await;
    // Each in the name of the other party, with that party's next CSeq (neither sent a
    // request since the INVITE, CSeq 1 on both sides: bob never sent one).
    assert_eq!(to_bob.cseq().unwrap().seq, alices.local_cseq + 1);
    assert_eq!(to_alice.cseq().unwrap().seq, 1);

    let line = only_cdr(&proxy);
    assert_eq!(field(&line, "reason"), "\"max_duration\"", "{line}");
    assert_eq!(field(&line, "hangup"), "\"proxy\"", "{line}");
    let duration = number(&line, "duration");
    assert!(
        (1.0..30.0).contains(&duration),
        "cut a second after the answer (a loaded machine may be late, never early): {line}"
    );
}

#[tokio::test]
async fn ctl_dlg_end_hangs_up_a_call_from_outside() {
    let proxy = start(&common::default_script_without_auth());
    let mut bob = registered_bob(&proxy).await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;
    let (alices, bobs) = answered_call(&mut alice, &mut bob, &aor("bob")).await;

    // What `moonroute ctl dlg end CALL-ID` runs, off the event loops as the control socket
    // runs it: queued to the loop owning the call, answered once its BYEs are sent.
    let end = |call_id: String| {
        let dialogs = Arc::clone(&proxy.dialogs);
        tokio::task::spawn_blocking(move || {
            moonroute::control::dlg::command(
                &["end".to_owned(), call_id],
                &dialogs,
                std::time::SystemTime::now(),
            )
        })
    };
    let reply = end(alices.call_id.clone()).await.unwrap();
    assert!(reply.ok, "{}", reply.text);
    assert_eq!(
        reply.text,
        format!("{}: ended: BYE sent to caller and callee\n", alices.call_id)
    );
    bye_from_the_proxy(&mut alice, &alices, &proxy).await;
    bye_from_the_proxy(&mut bob, &bobs, &proxy).await;
    let line = only_cdr(&proxy);
    assert_eq!(field(&line, "reason"), "\"ctl\"", "{line}");

    // Ended: a second `end` finds no live call, and the parties' own BYEs find no dialog.
    let again = end(alices.call_id.clone()).await.unwrap();
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

#[tokio::test]
async fn the_script_s_timeout_wins_over_the_configured_one() {
    let (_script, proxy) = start_script(SHORT_CALLS_SCRIPT, |config| {
        config.dialog.max_duration_secs = 3600
    });
    let mut bob = phone("bob", BOB_IP, &proxy, DOMAIN).await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;
    let bob_uri = bob.uri();

    let (alices, bobs) = answered_call(&mut alice, &mut bob, &bob_uri).await;
    bye_from_the_proxy(&mut alice, &alices, &proxy).await;
    bye_from_the_proxy(&mut bob, &bobs, &proxy).await;
    let line = only_cdr(&proxy);
    assert_eq!(field(&line, "reason"), "\"max_duration\"", "{line}");
    let duration = number(&line, "duration");
    assert!((0.5..30.0).contains(&duration), "{line}");
}

/// docs/routing-scripts.md's two Lua lines ("Calls: dialogs, limits, CDRs"), in place of each
/// `track_call(req)` line of scripts/default.lua (digest authentication off).
fn default_script_with_the_documented_limit(dir: &Path) -> PathBuf {
    let doc = include_str!("../docs/routing-scripts.md");
    let section = &doc[doc
        .find("## Calls: dialogs, limits, CDRs")
        .expect("the section")..];
    let block = &section[section.find("```lua\n").expect("a Lua block") + 7..];
    let lines = &block[..block.find("```").expect("its end")];
    let script = std::fs::read_to_string(common::default_script_without_auth()).unwrap();
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
    let path = dir.join("default-limited.lua");
    std::fs::write(&path, limited).unwrap();
    path
}

#[tokio::test]
async fn the_documented_two_lines_limit_a_user_of_default_lua_to_two_calls() {
    let dir = TempDir::new().unwrap();
    let proxy = start(&default_script_with_the_documented_limit(dir.path()));
    let mut bob = registered_bob(&proxy).await;
    let mut alice = phone("alice", ALICE_IP, &proxy, DOMAIN).await;

    let (mut first, _) = answered_call(&mut alice, &mut bob, &aor("bob")).await;
    let _second = answered_call(&mut alice, &mut bob, &aor("bob")).await;
    alice.invite(&aor("bob")).await;
    alice.expect_final(486).await;
    hang_up(&mut alice, &mut first, &mut bob).await;
    let _fourth = answered_call(&mut alice, &mut bob, &aor("bob")).await;
}
