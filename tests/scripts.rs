//! Routing scripts end to end: the real server routed by a Lua script (`ScriptHost`), test user
//! agents (`tests/common/ua.rs`) on loopback sockets, and the `moonroute check` / `moonroute
//! test` commands of the built binary. Covers the shipped scripts (registrar and proxy,
//! redirect server, stateless forwarder), the hooks (`on_branch`, `on_reply`, `on_failure`) and
//! `req.vars`, what a failing or runaway script does to a running server, and hot reload with
//! version pinning. Nothing sleeps: every wait is for a message, bounded by a timeout.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::ua::{expect_status, header_text, show, TestUa, WAIT};
use moonroute::config::{Config, LocationBackend};
use moonroute::proxy::identity::LocalIdentity;
use moonroute::script::engine::{Env, LogSink};
use moonroute::script::{Engine, Limits, ScriptHost, Services};
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::{HeaderName, Message};
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;

// ----- helpers -------------------------------------------------------------------------------

/// A server routed by a script, and the script's host (to reload it).
struct Running {
    /// Dropping the handle stops the server.
    _server: ServerHandle,
    host: Arc<ScriptHost>,
    udp: SocketAddr,
    tcp: Option<SocketAddr>,
}

/// A repository file (the shipped scripts, the test data).
fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Two event loops on an ephemeral UDP port of 127.0.0.1, routed by `script`; no control
/// socket, no file watcher (tests reload by hand).
fn config(script: &Path) -> Config {
    let mut config = Config {
        listen: vec!["udp:127.0.0.1:0".parse::<ListenAddr>().unwrap()],
        workers: 2,
        script: script.to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    // The durable store has its own tests (tests/registrar.rs); here registrations live in
    // memory, so parallel tests share no data directory.
    config.location.store = LocationBackend::Memory;
    // No CDR file in the working directory's default data_dir (tests/dialog.rs covers it).
    config.dialog.cdr = false;
    config
}

fn start(config: &Config) -> Running {
    let host = ScriptHost::from_config(config).expect("the script loads");
    let factory = CoreFactory::with_router(config, host.router_factory());
    let server = Server::start(config, Arc::new(factory)).expect("server starts");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        tcp: server.local_addr(TransportKind::Tcp),
        _server: server,
        host,
    }
}

fn start_script(script: &Path) -> Running {
    start(&config(script))
}

/// Writes `text` to `name` in `dir`; returns the path.
fn write_script(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write the script");
    path
}

fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn via_count(m: &Message) -> usize {
    m.values(HeaderName::Via).count()
}

fn top_branch(m: &Message) -> String {
    text(m.top_via().unwrap().branch().unwrap())
}

fn header_values(m: &Message, name: &str) -> Vec<String> {
    m.headers_named(name).map(text).collect()
}

/// The AOR of `user` at the server: its listen address is its domain.
fn aor(user: &str, proxy: SocketAddr) -> String {
    format!("sip:{user}@{proxy}")
}

/// Sends a REGISTER for `aor` from `ua` to `registrar` (over the UA's transport) with the
/// given Contact field values, and returns the response.
async fn register(
    ua: &mut TestUa,
    registrar: SocketAddr,
    aor: &str,
    contacts: &[String],
    expires: Option<u32>,
) -> Message {
    register_with(ua, registrar, aor, contacts, expires, &[]).await
}

/// [`register`] with extra header field lines (`Name: value`).
async fn register_with(
    ua: &mut TestUa,
    registrar: SocketAddr,
    aor: &str,
    contacts: &[String],
    expires: Option<u32>,
    extra: &[String],
) -> Message {
    let transport = if ua.uri().contains(";transport=tcp") {
        "TCP"
    } else {
        "UDP"
    };
    let n = unique();
    let mut request = format!(
        "REGISTER sip:{registrar} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {};branch=z9hG4bK-reg-{n};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <{aor}>;tag=reg-{n}\r\n\
         To: <{aor}>\r\n\
         Call-ID: reg-{n}@127.0.0.1\r\n\
         CSeq: 1 REGISTER\r\n",
        ua.local
    );
    for contact in contacts {
        request += &format!("Contact: {contact}\r\n");
    }
    if let Some(expires) = expires {
        request += &format!("Expires: {expires}\r\n");
    }
    for line in extra {
        request += line;
        request += "\r\n";
    }
    request += "Content-Length: 0\r\n\r\n";
    ua.send_raw(request.as_bytes(), registrar).await;
    let response = ua.recv_response(WAIT).await;
    assert_eq!(
        text(response.call_id().unwrap()),
        format!("reg-{n}@127.0.0.1"),
        "the answer to the REGISTER, got\n{}",
        show(&response)
    );
    response
}

/// Registers `ua`'s own contact for `aor`; asserts the 200.
async fn register_self(ua: &mut TestUa, registrar: SocketAddr, aor: &str) -> Message {
    let contact = format!("<{}>", ua.uri());
    let ok = register(ua, registrar, aor, &[contact], Some(3600)).await;
    expect_status(&ok, 200);
    ok
}

/// Asserts that the next response `ua` gets is the answer to a MESSAGE sent to the proxy
/// now, with status `code` (the scripts under test answer MESSAGEs themselves).
async fn message_answered(ua: &mut TestUa, proxy: SocketAddr, header: &str, code: u16) -> Message {
    let mut out = ua.request("MESSAGE", &aor("anyone", proxy)).to(proxy);
    if !header.is_empty() {
        out = out.header("X-Test", header);
    }
    let sent = out.await;
    let answer = ua.recv_response(WAIT).await;
    assert_eq!(
        answer.call_id().unwrap(),
        sent.call_id().unwrap(),
        "{}: the next response should answer the MESSAGE, got\n{}",
        ua.name,
        show(&answer)
    );
    expect_status(&answer, code);
    answer
}

/// INVITE from `caller` to `request_uri` through the proxy, answered by `callee` (180, 200),
/// ACKed and hung up by the caller: every in-dialog request must follow the Record-Route.
async fn call(caller: &mut TestUa, callee: &mut TestUa, request_uri: &str, proxy_rr: &str) {
    let invite = caller.invite(request_uri).await;
    let incoming = callee.expect_request("INVITE").await;
    assert_eq!(
        incoming.request_uri_bytes(),
        Some(callee.uri().as_bytes()),
        "the Request-URI is the registered contact"
    );
    assert_eq!(incoming.body(), invite.body(), "the SDP offer arrives");
    assert_eq!(via_count(&incoming), 2, "the proxy's Via on top");
    let rr = header_values(&incoming, "Record-Route");
    assert!(
        rr.first()
            .is_some_and(|r| r.contains(proxy_rr) && r.contains(";lr")),
        "the proxy Record-Routes (loose): {rr:?}\n{}",
        show(&incoming)
    );
    callee.respond(&incoming, 180, "Ringing").await;
    callee.respond(&incoming, 200, "OK").await;

    caller.expect_response(100).await;
    let ringing = caller.expect_response(180).await;
    assert_eq!(via_count(&ringing), 1);
    let answer = caller.expect_response(200).await;
    assert_eq!(via_count(&answer), 1);
    // Our entry comes back re-signed for the caller (§16.7 step 8, `route_sign`).
    let unsigned = |values: Vec<String>| -> Vec<String> {
        values
            .iter()
            .map(|v| common::without_signature(v))
            .collect()
    };
    let answered = header_values(&answer, "Record-Route");
    assert_eq!(unsigned(answered.clone()), unsigned(rr.clone()));
    // The callee's copy (`q`) and the caller's (`s`); `t` and `u` for a call the script
    // tracks (default.lua tracks the calls it record-routes).
    assert!(
        (rr[0].contains(";mrs=q") || rr[0].contains(";mrs=t"))
            && (answered[0].contains(";mrs=s") || answered[0].contains(";mrs=u")),
        "{rr:?} {answered:?}"
    );

    let mut dialog = caller.ack_2xx(&answer).await;
    assert!(!dialog.route_set.is_empty(), "the dialog goes through us");
    let ack = callee.expect_request("ACK").await;
    assert_eq!(via_count(&ack), 2, "the ACK traversed the proxy");
    caller.bye(&mut dialog).await;
    let bye = callee.expect_request("BYE").await;
    assert_eq!(via_count(&bye), 2, "the BYE traversed the proxy");
    assert_eq!(bye.call_id().unwrap(), invite.call_id().unwrap());
    callee.respond(&bye, 200, "OK").await;
    let bye_ok = caller.expect_response(200).await;
    assert_eq!(bye_ok.cseq().unwrap().method.as_str(), "BYE");
}

/// Runs the built `moonroute` binary in the repository root.
fn moonroute(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moonroute"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run moonroute")
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr)
    )
}

// ----- 1-2: scripts/default.lua, registrar and proxy -----------------------------------------

#[tokio::test]
async fn default_registered_user_is_called_through_the_proxy() {
    let proxy = start_script(&common::default_script_without_auth());
    let mut alice = TestUa::udp("alice").await;
    let mut carol = TestUa::udp("carol").await.via_proxy(proxy.udp);
    let alice_aor = aor("alice", proxy.udp);

    let ok = register_self(&mut alice, proxy.udp, &alice_aor).await;
    let contacts = header_values(&ok, "Contact");
    assert_eq!(contacts.len(), 1, "{}", show(&ok));
    let expires = contacts[0]
        .strip_prefix(&format!("<{}>;expires=", alice.uri()))
        .unwrap_or_else(|| panic!("the binding with its expiry: {}", contacts[0]))
        .parse::<u32>()
        .unwrap();
    assert!((3590..=3600).contains(&expires), "expires={expires}");
    let date = header_text(&ok, "Date").expect("a Date in the 200");
    assert!(date.ends_with(" GMT"), "an RFC 1123 date: {date}");
    assert!(
        ok.to().unwrap().tag().is_some(),
        "the 200 has a To tag\n{}",
        show(&ok)
    );

    // A query (no Contact) lists the binding again.
    let query = register(&mut alice, proxy.udp, &alice_aor, &[], None).await;
    expect_status(&query, 200);
    assert_eq!(header_values(&query, "Contact").len(), 1);

    call(&mut carol, &mut alice, &alice_aor, &proxy.udp.to_string()).await;
}

/// RFC 3327 §5.3: a contact registered through an edge proxy (Path) is reached through it:
/// the Path values become the request's Route set, so the INVITE goes to the edge first.
#[tokio::test]
async fn default_lookup_routes_through_the_registered_path() {
    let proxy = start_script(&common::default_script_without_auth());
    let alice = TestUa::udp("alice").await;
    let mut edge = TestUa::udp("edge").await;
    let mut carol = TestUa::udp("carol").await.via_proxy(proxy.udp);
    let alice_aor = aor("alice", proxy.udp);
    let path = format!("<sip:{};lr>", edge.local);
    let ok = register_with(
        &mut edge,
        proxy.udp,
        &alice_aor,
        &[format!("<{}>", alice.uri())],
        Some(600),
        &[format!("Path: {path}")],
    )
    .await;
    expect_status(&ok, 200);
    assert_eq!(
        header_values(&ok, "Path"),
        std::slice::from_ref(&path),
        "{}",
        show(&ok)
    );

    carol.invite(&alice_aor).await;
    let at_edge = edge.expect_request("INVITE").await;
    assert_eq!(
        at_edge.request_uri_bytes(),
        Some(alice.uri().as_bytes()),
        "{}",
        show(&at_edge)
    );
    assert_eq!(
        header_values(&at_edge, "Route"),
        [path],
        "{}",
        show(&at_edge)
    );
    edge.respond(&at_edge, 486, "Busy Here").await;
    carol.expect_final(486).await;
    edge.expect_request("ACK").await;
}

#[tokio::test]
async fn default_unregistered_user_gets_404() {
    let proxy = start_script(&common::default_script_without_auth());
    let mut carol = TestUa::udp("carol").await.via_proxy(proxy.udp);
    carol.invite(&aor("nobody", proxy.udp)).await;
    let answer = carol.expect_final(404).await;
    assert_eq!(via_count(&answer), 1);
    // A registration removed with Expires: 0 is gone too.
    let mut dave = TestUa::udp("dave").await;
    let dave_aor = aor("dave", proxy.udp);
    register_self(&mut dave, proxy.udp, &dave_aor).await;
    let dave_contact = format!("<{}>", dave.uri());
    let removed = register(&mut dave, proxy.udp, &dave_aor, &[dave_contact], Some(0)).await;
    expect_status(&removed, 200);
    assert!(header_values(&removed, "Contact").is_empty());
    carol.invite(&dave_aor).await;
    carol.expect_final(404).await;
}

/// Contacts with different q values are tried one after the other, highest first (§16.6,
/// §8.1.3.4): the lower one only rings once the higher one has failed.
#[tokio::test]
async fn default_forks_serially_by_decreasing_q() {
    let proxy = start_script(&common::default_script_without_auth());
    let mut first = TestUa::udp("alice").await;
    let mut second = TestUa::udp("alice").await;
    let mut marker = TestUa::udp("marker").await;
    let mut carol = TestUa::udp("carol").await.via_proxy(proxy.udp);
    let alice_aor = aor("alice", proxy.udp);
    let contacts = [
        format!("<{}>;q=0.5", second.uri()),
        format!("<{}>;q=1.0", first.uri()),
    ];
    let ok = register(&mut first, proxy.udp, &alice_aor, &contacts, Some(600)).await;
    expect_status(&ok, 200);
    let contacts = header_values(&ok, "Contact");
    assert_eq!(contacts.len(), 2, "{}", show(&ok));
    assert!(
        contacts
            .iter()
            .any(|c| c.starts_with(&format!("<{}>", second.uri())) && c.ends_with(";q=0.5")),
        "{contacts:?}"
    );

    let invite = carol.invite(&alice_aor).await;
    let in1 = first.expect_request("INVITE").await;
    assert_eq!(in1.request_uri_bytes(), Some(first.uri().as_bytes()));
    // Had the proxy sent the INVITE to the second contact as well, it would have reached that
    // socket before this marker (the proxy sends a fork's copies together).
    marker
        .request("MESSAGE", &second.uri())
        .header("X-Marker", "serial")
        .await;
    let next = second.recv_request(WAIT).await;
    assert_eq!(
        next.method().unwrap().as_str(),
        "MESSAGE",
        "the q=0.5 contact must not ring before the q=1 one failed, got\n{}",
        show(&next)
    );
    first.respond(&in1, 180, "Ringing").await;
    first.respond(&in1, 486, "Busy Here").await;
    first.expect_request("ACK").await;

    let in2 = second.expect_request("INVITE").await;
    assert_eq!(in2.request_uri_bytes(), Some(second.uri().as_bytes()));
    assert_ne!(top_branch(&in1), top_branch(&in2));
    second.respond(&in2, 200, "OK").await;
    let answer = carol.expect_final(200).await;
    assert_eq!(answer.call_id().unwrap(), invite.call_id().unwrap());
    carol.ack_2xx(&answer).await;
    second.expect_request("ACK").await;
}

/// Contacts with equal q values ring in parallel; the 200 of one cancels the other.
#[tokio::test]
async fn default_forks_in_parallel_for_equal_q() {
    let proxy = start_script(&common::default_script_without_auth());
    let mut first = TestUa::udp("alice").await;
    let mut second = TestUa::udp("alice").await;
    let mut carol = TestUa::udp("carol").await.via_proxy(proxy.udp);
    let alice_aor = aor("alice", proxy.udp);
    register_self(&mut first, proxy.udp, &alice_aor).await;
    let ok = register_self(&mut second, proxy.udp, &alice_aor).await;
    assert_eq!(header_values(&ok, "Contact").len(), 2, "{}", show(&ok));

    carol.invite(&alice_aor).await;
    let in1 = first.expect_request("INVITE").await;
    let in2 = second.expect_request("INVITE").await;
    first.respond(&in1, 180, "Ringing").await;
    second.respond(&in2, 180, "Ringing").await;
    carol.expect_response(100).await;
    carol.expect_response(180).await;
    carol.expect_response(180).await;
    second.respond(&in2, 200, "OK").await;
    let answer = carol.expect_final(200).await;

    let cancel = first.expect_request("CANCEL").await;
    assert_eq!(top_branch(&cancel), top_branch(&in1));
    first.respond(&cancel, 200, "OK").await;
    first.respond(&in1, 487, "Request Terminated").await;
    first.expect_request("ACK").await;
    carol.ack_2xx(&answer).await;
    second.expect_request("ACK").await;
}

#[tokio::test]
async fn default_refuses_open_relay() {
    let proxy = start_script(&common::default_script_without_auth());
    let mut carol = TestUa::udp("carol").await.via_proxy(proxy.udp);
    let mut bob = TestUa::udp("bob").await;
    // Carol's From (her own address) is not in our domain, nor is the Request-URI.
    carol.invite("sip:bob@example.invalid").await;
    let refused = carol.expect_final(403).await;
    assert_eq!(refused.reason(), Some(&b"Relaying Forbidden"[..]));
    carol.request("MESSAGE", &bob.uri()).await;
    carol.expect_final(403).await;

    // One of our users may send out of the domain: relayed to the Request-URI.
    let local = carol.local;
    let n = unique();
    let options = format!(
        "OPTIONS {bob_uri} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-out-{n};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:carol@{proxy}>;tag=out-{n}\r\n\
         To: <{bob_uri}>\r\n\
         Call-ID: out-{n}@127.0.0.1\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n",
        bob_uri = bob.uri(),
        proxy = proxy.udp,
    );
    carol.send_raw(options.as_bytes(), proxy.udp).await;
    let incoming = bob.expect_request("OPTIONS").await;
    assert_eq!(via_count(&incoming), 2);
    bob.respond(&incoming, 200, "OK").await;
    let answer = carol.expect_response(200).await;
    assert_eq!(
        text(answer.call_id().unwrap()),
        format!("out-{n}@127.0.0.1")
    );
}

#[tokio::test]
async fn default_register_interval_too_brief_gets_423() {
    let mut config = config(&common::default_script_without_auth());
    config.registrar.min_expires = 60;
    let proxy = start(&config);
    let mut alice = TestUa::udp("alice").await;
    let alice_aor = aor("alice", proxy.udp);
    let contact = format!("<{}>", alice.uri());
    let brief = register(
        &mut alice,
        proxy.udp,
        &alice_aor,
        std::slice::from_ref(&contact),
        Some(10),
    )
    .await;
    expect_status(&brief, 423);
    assert_eq!(header_text(&brief, "Min-Expires").as_deref(), Some("60"));
    // Nothing was bound: a query lists no contact.
    let query = register(&mut alice, proxy.udp, &alice_aor, &[], None).await;
    expect_status(&query, 200);
    assert!(header_values(&query, "Contact").is_empty());
    // The expires parameter counts too; at the minimum it is accepted.
    let brief = register(
        &mut alice,
        proxy.udp,
        &alice_aor,
        &[format!("{contact};expires=59")],
        None,
    )
    .await;
    expect_status(&brief, 423);
    let ok = register(&mut alice, proxy.udp, &alice_aor, &[contact], Some(60)).await;
    expect_status(&ok, 200);
}

/// The caller and the callee on TCP: the REGISTER comes over a connection, the proxy opens
/// one to the registered `;transport=tcp` contact.
#[tokio::test]
async fn default_call_over_tcp() {
    let mut config = config(&common::default_script_without_auth());
    config.listen = vec![
        "udp:127.0.0.1:0".parse().unwrap(),
        "tcp:127.0.0.1:0".parse().unwrap(),
    ];
    let proxy = start(&config);
    let proxy_tcp = proxy.tcp.expect("a TCP listener");
    let mut alice = TestUa::tcp_listener("alice").await;
    let alice_aor = aor("alice", proxy.udp);
    let ok = register_self(&mut alice, proxy_tcp, &alice_aor).await;
    assert!(
        header_values(&ok, "Contact")[0].contains(";transport=tcp"),
        "{}",
        show(&ok)
    );
    let mut carol = TestUa::tcp("carol", proxy_tcp).await;
    call(&mut carol, &mut alice, &alice_aor, &proxy_tcp.to_string()).await;
}

// ----- 3: scripts/redirect.lua ---------------------------------------------------------------

#[tokio::test]
async fn redirect_answers_302_with_the_contacts() {
    let proxy = start_script(&repo_path("scripts/redirect.lua"));
    let mut alice = TestUa::udp("alice").await;
    let alice2 = TestUa::udp("alice").await;
    let mut carol = TestUa::udp("carol").await.via_proxy(proxy.udp);
    let alice_aor = aor("alice", proxy.udp);
    let contacts = [
        format!("<{}>;q=0.5", alice2.uri()),
        format!("<{}>", alice.uri()),
    ];
    let ok = register(&mut alice, proxy.udp, &alice_aor, &contacts, Some(3600)).await;
    expect_status(&ok, 200);

    let invite = carol.invite(&alice_aor).await;
    let moved = carol.expect_final(302).await;
    assert_eq!(moved.call_id().unwrap(), invite.call_id().unwrap());
    assert_eq!(
        header_values(&moved, "Contact"),
        vec![
            format!("<{}>", alice.uri()),
            format!("<{}>;q=0.5", alice2.uri())
        ],
        "the contacts, highest q first\n{}",
        show(&moved)
    );
    // The test UA ACKed the 302; the server absorbs the ACK and keeps answering.
    message_answered(&mut carol, proxy.udp, "", 404).await;

    carol.invite(&aor("nobody", proxy.udp)).await;
    carol.expect_final(404).await;
    carol.invite("sip:bob@example.invalid").await;
    carol.expect_final(403).await;
}

// ----- 4: scripts/stateless.lua --------------------------------------------------------------

/// scripts/stateless.lua with NEXT_HOPS replaced by `hops`.
fn stateless_script(dir: &TempDir, hops: &[String]) -> PathBuf {
    let shipped = std::fs::read_to_string(repo_path("scripts/stateless.lua")).unwrap();
    let start = shipped
        .find("NEXT_HOPS = {")
        .expect("NEXT_HOPS in stateless.lua");
    let end = start + shipped[start..].find('}').unwrap() + 1;
    let list: Vec<String> = hops.iter().map(|h| format!("\"{h}\"")).collect();
    let script = format!(
        "{}NEXT_HOPS = {{ {} }}{}",
        &shipped[..start],
        list.join(", "),
        &shipped[end..]
    );
    write_script(dir, "stateless.lua", &script)
}

#[tokio::test]
async fn stateless_forwards_requests_and_responses_without_state() {
    let dir = TempDir::new().unwrap();
    let mut bob = TestUa::udp("bob").await;
    bob.absorb_retransmissions = false; // see every copy the proxy sends
    let proxy = start_script(&stateless_script(&dir, &[format!("sip:{}", bob.local)]));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);

    let options = alice.options("sip:service@example.test").await;
    let incoming = bob.expect_request("OPTIONS").await;
    assert_eq!(incoming.call_id().unwrap(), options.call_id().unwrap());
    assert_eq!(via_count(&incoming), 2, "{}", show(&incoming));
    let top = incoming.top_via().unwrap();
    assert_eq!(top.port, Some(proxy.udp.port()), "{}", show(&incoming));
    let branch = top_branch(&incoming);
    assert!(
        branch.starts_with("z9hG4bK") && branch.ends_with(".sl"),
        "a stateless branch: {branch}"
    );
    // The hop is only the destination: the Request-URI goes on unchanged (Kamailio's
    // forward(uri), a load balancer in front of servers that need the user part).
    assert_eq!(
        incoming.request_uri_bytes(),
        Some(&b"sip:service@example.test"[..])
    );
    assert_eq!(incoming.max_forwards().unwrap().unwrap(), 69);
    assert!(
        incoming.headers_named("Record-Route").next().is_none(),
        "not Record-Routed"
    );

    // bob's answer matches no transaction at the proxy: forwarded by its Via alone.
    bob.respond(&incoming, 200, "OK").await;
    let answer = alice.expect_response(200).await;
    assert_eq!(answer.call_id().unwrap(), options.call_id().unwrap());
    assert_eq!(via_count(&answer), 1, "the proxy's Via removed");

    // A retransmission is forwarded again, with the same branch (§16.11).
    alice.send_raw(options.source_bytes(), proxy.udp).await;
    let again = bob.expect_request("OPTIONS").await;
    assert_eq!(again.call_id().unwrap(), options.call_id().unwrap());
    assert_eq!(top_branch(&again), branch);

    // An INVITE goes the same way; its 2xx too.
    let invite = alice.invite("sip:bob@example.test").await;
    let incoming = bob.expect_request("INVITE").await;
    assert!(top_branch(&incoming).ends_with(".sl"));
    bob.respond(&incoming, 180, "Ringing").await;
    bob.respond(&incoming, 200, "OK").await;
    alice.expect_response(180).await;
    let answer = alice.expect_response(200).await;
    assert_eq!(answer.call_id().unwrap(), invite.call_id().unwrap());

    // A CANCEL takes the same way with the INVITE's branch (§9.1): the proxy keeps no state,
    // so it must compute the same branch again.
    let invite = alice.invite("sip:bob@example.test").await;
    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 180, "Ringing").await;
    alice.expect_response(180).await;
    alice.cancel(&invite).await;
    let cancel = bob.expect_request("CANCEL").await;
    assert_eq!(
        top_branch(&cancel),
        top_branch(&incoming),
        "{}",
        show(&cancel)
    );
    bob.respond(&cancel, 200, "OK").await;
    let ok = alice.expect_response(200).await;
    assert_eq!(ok.cseq().unwrap().method.as_str(), "CANCEL");
}

/// The ACK of a non-2xx final response belongs to the INVITE transaction (§17.1.1.3): it must
/// reach the hop the INVITE went to, with the INVITE's branch, or that hop retransmits its
/// response until Timer H. It carries the callee's To tag, so stateless.lua takes it for an
/// in-dialog request and forwards it to its Request-URI (the original one, here a name that
/// does not resolve; in general not the hop the INVITE went to).
#[tokio::test]

async fn stateless_ack_of_a_non_2xx_follows_the_invite() {
    let dir = TempDir::new().unwrap();
    let mut bob = TestUa::udp("bob").await;
    let proxy = start_script(&stateless_script(&dir, &[format!("sip:{}", bob.local)]));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);

    alice.invite("sip:bob@example.test").await;
    let incoming = bob.expect_request("INVITE").await;
    bob.respond(&incoming, 486, "Busy Here").await;
    alice.expect_final(486).await; // and the test UA ACKs it
    let ack = bob.expect_request("ACK").await;
    assert_eq!(top_branch(&ack), top_branch(&incoming), "{}", show(&ack));
}

// ----- 5: script errors and runaway scripts --------------------------------------------------

#[tokio::test]
async fn script_error_gets_500_and_the_next_request_is_served() {
    let proxy = start_script(&repo_path("tests/data/scripts/errors.lua"));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);
    message_answered(&mut alice, proxy.udp, "boom", 500).await;
    let fine = message_answered(&mut alice, proxy.udp, "", 200).await;
    assert_eq!(fine.reason(), Some(&b"Fine"[..]));
    // Two decisions in one call are an error; no decision is a 500 too.
    message_answered(&mut alice, proxy.udp, "twice", 500).await;
    message_answered(&mut alice, proxy.udp, "undecided", 500).await;
    // An INVITE that fails gets its 500 through the INVITE server transaction (ACKed).
    alice
        .invite(&aor("anyone", proxy.udp))
        .header("X-Test", "boom")
        .await;
    alice.expect_final(500).await;
    message_answered(&mut alice, proxy.udp, "", 200).await;
}

#[tokio::test]
async fn runaway_script_is_stopped_by_the_instruction_budget() {
    let mut config = config(&repo_path("tests/data/scripts/errors.lua"));
    config.lua.max_instructions = 100_000;
    let proxy = start(&config);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);
    for _ in 0..2 {
        let started = std::time::Instant::now();
        message_answered(&mut alice, proxy.udp, "loop", 500).await;
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "stopped by the budget"
        );
        message_answered(&mut alice, proxy.udp, "", 200).await;
    }
}

#[tokio::test]
async fn memory_hog_is_stopped_by_the_memory_limit() {
    let mut config = config(&repo_path("tests/data/scripts/errors.lua"));
    config.lua.memory_limit_mb = 8;
    // Enough instructions to reach the limit: the memory limit must be what stops it.
    config.lua.max_instructions = 200_000_000;
    let proxy = start(&config);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);
    for _ in 0..2 {
        message_answered(&mut alice, proxy.udp, "hog", 500).await;
        message_answered(&mut alice, proxy.udp, "", 200).await;
    }
}

/// Which limit stopped the hook: the two tests above only see the 500, so this calls
/// errors.lua's on_request directly (with a stand-in for `req`) and reads the error.
#[test]
fn limits_name_themselves_in_the_error() {
    let path = repo_path("tests/data/scripts/errors.lua");
    let source = moonroute::script::router::read_source(&path, 1).unwrap();
    let env = || Env {
        identity: LocalIdentity::default(),
        services: Arc::new(Services::default()),
        log: LogSink::Tracing,
    };
    let fail = |limits: Limits, what: &str| -> String {
        let engine = Engine::load(&source, limits, env()).expect("errors.lua loads");
        let req = engine.lua().create_table().unwrap();
        let what = what.to_owned();
        let header = engine
            .lua()
            .create_function(move |_, (_req, _name): (mlua::Value, String)| Ok(what.clone()))
            .unwrap();
        req.set("header", header).unwrap();
        let error = engine
            .call(&engine.hooks().on_request, req.clone())
            .expect_err("the hook is stopped");
        // The state is still usable afterwards.
        let ok = engine.lua().create_table().unwrap();
        let fine = engine
            .lua()
            .create_function(|_, (_req, _name): (mlua::Value, String)| Ok(String::new()))
            .unwrap();
        ok.set("header", fine).unwrap();
        let reply = engine
            .lua()
            .create_function(|_, _: mlua::Variadic<mlua::Value>| Ok(()))
            .unwrap();
        ok.set("reply", reply).unwrap();
        engine
            .call(&engine.hooks().on_request, ok)
            .expect("the next call runs");
        error.to_string()
    };
    let name = path.display().to_string();
    let budget = fail(
        Limits {
            max_instructions: 100_000,
            memory_bytes: 64 << 20,
        },
        "loop",
    );
    assert!(
        budget.contains("instruction budget exceeded") && budget.contains(&format!("{name}:9:")),
        "{budget}"
    );
    let memory = fail(
        Limits {
            max_instructions: 200_000_000,
            memory_bytes: 8 << 20,
        },
        "hog",
    );
    assert!(
        memory.contains("out of memory") && memory.contains("memory_limit_mb"),
        "{memory}"
    );
    let boom = fail(Limits::default(), "boom");
    assert!(boom.contains(&format!("{name}:7: boom")), "{boom}");
}

/// tests/data/scripts/sandbox.lua, written to `dir` with its placeholder replaced by a real
/// binary chunk of the embedded Lua: `string.dump` in an unsandboxed state, of a function that
/// returns "Escaped". That state loads and runs the chunk, so what refuses it in the sandbox is
/// the text-only `load`, not a chunk from another Lua version.
fn sandbox_script(dir: &TempDir) -> PathBuf {
    let free = mlua::Lua::new();
    let chunk: mlua::LuaString = free
        .load("return string.dump(function() return 'Escaped' end)")
        .eval()
        .expect("string.dump outside the sandbox");
    let chunk = chunk.as_bytes().to_vec();
    let escaped: String = free
        .load(&chunk[..])
        .set_mode(mlua::chunk::ChunkMode::Binary)
        .call(())
        .expect("the chunk loads and runs outside the sandbox");
    assert_eq!(escaped, "Escaped");
    // Decimal escapes of three digits: never read together with a following digit.
    let literal: String = chunk.iter().map(|b| format!("\\{b:03}")).collect();
    let text = std::fs::read_to_string(repo_path("tests/data/scripts/sandbox.lua"))
        .unwrap()
        .replacen("@BYTECODE@", &literal, 1);
    write_script(dir, "sandbox.lua", &text)
}

/// Lua does not verify bytecode (a crafted chunk escapes the VM): a hook that makes bytecode
/// (`string.dump` is gone) or loads it, from a string or a reader function, fails like any
/// script error (500), and the request after it is served. Text chunks still load, whatever
/// mode they ask for.
#[tokio::test]
async fn bytecode_is_refused_in_a_hook_and_text_still_loads() {
    let dir = TempDir::new().unwrap();
    let proxy = start_script(&sandbox_script(&dir));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);
    for probe in ["dump", "bytecode", "reader"] {
        message_answered(&mut alice, proxy.udp, probe, 500).await;
        message_answered(&mut alice, proxy.udp, "", 200).await;
    }
    let text = message_answered(&mut alice, proxy.udp, "text", 200).await;
    assert_eq!(text.reason(), Some(&b"Text loads"[..]));
}

/// The same probes through `moonroute test`, which prints the hook's error: each names the
/// script's file and the line of the probe.
#[test]
fn bytecode_probes_fail_at_the_scripts_line() {
    let dir = TempDir::new().unwrap();
    let script = sandbox_script(&dir);
    let probe = |what: &str| {
        let message = dir.path().join(format!("{what}.sip"));
        std::fs::write(
            &message,
            format!(
                "MESSAGE sip:anyone@127.0.0.1:5060 SIP/2.0\n\
                 Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{what}\n\
                 Max-Forwards: 70\n\
                 From: <sip:alice@example.net>;tag=a\n\
                 To: <sip:anyone@127.0.0.1:5060>\n\
                 Call-ID: {what}@127.0.0.1\n\
                 CSeq: 1 MESSAGE\n\
                 X-Test: {what}\n\
                 Content-Length: 0\n\n"
            ),
        )
        .unwrap();
        let output = moonroute(&[
            "test",
            script.to_str().unwrap(),
            "--message",
            message.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "{}", describe(&output));
        text(&output.stdout)
    };
    let name = script.display();
    for (what, expected) in [
        ("dump", format!("error:     {name}:9: ")),
        (
            "bytecode",
            format!("error:     {name}:12: attempt to load a binary chunk (mode is 't')"),
        ),
        (
            "reader",
            format!("error:     {name}:21: attempt to load a binary chunk (mode is 't')"),
        ),
    ] {
        let stdout = probe(what);
        assert!(stdout.contains(&expected), "{what}: {stdout}");
        assert!(
            stdout.contains("decision:  reply 500 Server Internal Error (the hook failed)"),
            "{what}: {stdout}"
        );
    }
    assert!(
        probe("dump").contains("attempt to call a nil value (field 'dump')"),
        "string.dump is nil"
    );
    assert!(probe("text").contains("decision:  reply 200 Text loads"));

    // `moonroute check` runs the top-level code: a script that dumps there is refused.
    let dumping = write_script(
        &dir,
        "dumping.lua",
        "function on_request(req) end\nlocal chunk = string.dump(on_request)\n",
    );
    let output = moonroute(&["check", dumping.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains(&format!("{}:2:", dumping.display())),
        "{}",
        describe(&output)
    );
}

// ----- 6: hooks and per-transaction variables ------------------------------------------------

const FAILOVER: &str = r#"
BOB = "@BOB@"
CAROL = "@CAROL@"

function on_request(req)
  if req:has_to_tag() then
    return req:t_relay()
  end
  req.vars.caller = req.from_uri
  req.vars.attempt = 1
  return req:t_relay(BOB)
end

function on_branch(req, branch)
  branch:append_header("X-Caller", req.vars.caller)
  branch:append_header("X-Attempt", tostring(req.vars.attempt))
end

function on_reply(req, res)
  if res.status == 180 then
    res:drop()
  end
end

function on_failure(req, res)
  if req.vars.attempt == 1 and res.status == 486 and req.vars.caller == req.from_uri then
    req.vars.attempt = 2
    return req:t_relay(CAROL)
  end
end
"#;

#[tokio::test]
async fn vars_survive_from_request_to_branch_reply_and_failure() {
    let dir = TempDir::new().unwrap();
    let mut bob = TestUa::udp("bob").await;
    let mut carol = TestUa::udp("carol").await;
    let script = FAILOVER
        .replace("@BOB@", &bob.uri())
        .replace("@CAROL@", &carol.uri());
    let proxy = start_script(&write_script(&dir, "failover.lua", &script));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);
    let alice_from = format!("sip:alice@{}", alice.local);

    let invite = alice.invite(&aor("someone", proxy.udp)).await;
    let in_bob = bob.expect_request("INVITE").await;
    assert_eq!(
        header_text(&in_bob, "X-Caller").as_deref(),
        Some(alice_from.as_str()),
        "on_branch sees req.vars.caller\n{}",
        show(&in_bob)
    );
    assert_eq!(header_text(&in_bob, "X-Attempt").as_deref(), Some("1"));
    bob.respond(&in_bob, 180, "Ringing").await;
    bob.respond(&in_bob, 486, "Busy Here").await;
    bob.expect_request("ACK").await;

    // on_failure checked req.vars and relayed to carol (serial failover).
    let in_carol = carol.expect_request("INVITE").await;
    assert_eq!(in_carol.call_id().unwrap(), invite.call_id().unwrap());
    assert_eq!(
        header_text(&in_carol, "X-Caller").as_deref(),
        Some(alice_from.as_str())
    );
    assert_eq!(
        header_text(&in_carol, "X-Attempt").as_deref(),
        Some("2"),
        "on_failure's change of req.vars is seen by the next on_branch"
    );
    assert_eq!(in_carol.request_uri_bytes(), Some(carol.uri().as_bytes()));
    carol.respond(&in_carol, 180, "Ringing").await;
    carol.respond(&in_carol, 200, "OK").await;

    // on_reply dropped both 180s: after the 100, the next response is the 200.
    alice.expect_response(100).await;
    let answer = alice.expect_response(200).await;
    assert_eq!(via_count(&answer), 1);
    alice.ack_2xx(&answer).await;
    carol.expect_request("ACK").await;
}

/// A failure route that does nothing sends the best response; a second failure after the
/// failover goes upstream too.
#[tokio::test]
async fn failure_route_without_targets_sends_the_best_response() {
    let dir = TempDir::new().unwrap();
    let mut bob = TestUa::udp("bob").await;
    let mut carol = TestUa::udp("carol").await;
    let script = FAILOVER
        .replace("@BOB@", &bob.uri())
        .replace("@CAROL@", &carol.uri());
    let proxy = start_script(&write_script(&dir, "failover.lua", &script));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);

    alice.invite(&aor("someone", proxy.udp)).await;
    let in_bob = bob.expect_request("INVITE").await;
    bob.respond(&in_bob, 486, "Busy Here").await;
    bob.expect_request("ACK").await;
    let in_carol = carol.expect_request("INVITE").await;
    carol.respond(&in_carol, 603, "Decline").await;
    carol.expect_request("ACK").await;
    // §16.7 step 6: a 6xx wins over the 486.
    alice.expect_final(603).await;

    // Not a 486: no failover at all.
    alice.invite(&aor("someone", proxy.udp)).await;
    let in_bob = bob.expect_request("INVITE").await;
    bob.respond(&in_bob, 404, "Not Found").await;
    alice.expect_final(404).await;
}

const HOOKS: &str = r#"
BOB = "@BOB@"
CAROL = "@CAROL@"

function on_request(req)
  req.vars.mode = req:header("X-Test") or ""
  if req.vars.mode == "drop-one" or req.vars.mode == "drop-all" then
    return req:fork({BOB, CAROL})
  end
  return req:t_relay(BOB)
end

function on_branch(req, branch)
  local mode = req.vars.mode
  if mode == "branch-boom" then
    branch:append_header("X-Before", "1")
    error("branch boom")
  end
  if mode == "drop-all" or (mode == "drop-one" and branch.ruri == CAROL) then
    return branch:drop()
  end
  branch:append_header("X-Branch", branch.ruri)
end

function on_reply(req, res)
  if req.vars.mode == "reply-boom" then
    error("reply boom")
  end
end

function on_failure(req, res)
  if req.vars.mode == "failure-boom" then
    error("failure boom")
  elseif req.vars.mode == "failure-reply" then
    -- a 2xx is no failure's answer: an error, the best response goes upstream
    return req:reply(200)
  end
end
"#;

/// Errors in on_branch, on_reply and on_failure never lose a request: the branch goes out
/// unchanged, the response is passed on, the best response goes upstream.
#[tokio::test]
async fn errors_in_later_hooks_fall_back_to_the_default() {
    let dir = TempDir::new().unwrap();
    let mut bob = TestUa::udp("bob").await;
    let carol = TestUa::udp("carol").await;
    let script = HOOKS
        .replace("@BOB@", &bob.uri())
        .replace("@CAROL@", &carol.uri());
    let proxy = start_script(&write_script(&dir, "hooks.lua", &script));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);
    let target = aor("someone", proxy.udp);

    alice.request("MESSAGE", &target).await;
    let normal = bob.expect_request("MESSAGE").await;
    assert_eq!(header_text(&normal, "X-Branch"), Some(bob.uri()));
    bob.respond(&normal, 200, "OK").await;
    alice.expect_response(200).await;

    alice
        .request("MESSAGE", &target)
        .header("X-Test", "branch-boom")
        .await;
    let unchanged = bob.expect_request("MESSAGE").await;
    assert_eq!(
        header_text(&unchanged, "X-Before"),
        None,
        "the branch goes out as it was before the failed hook\n{}",
        show(&unchanged)
    );
    bob.respond(&unchanged, 200, "OK").await;
    alice.expect_response(200).await;

    alice
        .request("MESSAGE", &target)
        .header("X-Test", "reply-boom")
        .await;
    let incoming = bob.expect_request("MESSAGE").await;
    bob.respond(&incoming, 202, "Accepted").await;
    alice.expect_response(202).await;

    for mode in ["failure-boom", "failure-reply"] {
        alice.invite(&target).header("X-Test", mode).await;
        let incoming = bob.expect_request("INVITE").await;
        bob.respond(&incoming, 486, "Busy Here").await;
        bob.expect_request("ACK").await;
        alice.expect_final(486).await;
    }
}

#[tokio::test]
async fn branch_drop_skips_a_target() {
    let dir = TempDir::new().unwrap();
    let mut bob = TestUa::udp("bob").await;
    let mut carol = TestUa::udp("carol").await;
    let mut marker = TestUa::udp("marker").await;
    let script = HOOKS
        .replace("@BOB@", &bob.uri())
        .replace("@CAROL@", &carol.uri());
    let proxy = start_script(&write_script(&dir, "hooks.lua", &script));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);
    let target = aor("someone", proxy.udp);

    alice
        .request("MESSAGE", &target)
        .header("X-Test", "drop-one")
        .await;
    let incoming = bob.expect_request("MESSAGE").await;
    let sent = marker.request("MESSAGE", &carol.uri()).await;
    let next = carol.recv_request(WAIT).await;
    assert_eq!(
        next.call_id().unwrap(),
        sent.call_id().unwrap(),
        "carol's branch was dropped, got\n{}",
        show(&next)
    );
    bob.respond(&incoming, 200, "OK").await;
    alice.expect_response(200).await;

    // Every branch dropped: nothing was sent, the caller still gets a final answer at once.
    alice.invite(&target).header("X-Test", "drop-all").await;
    let answer = alice.recv_response(WAIT).await;
    let answer = match answer.status() {
        Some(100) => alice.recv_response(WAIT).await,
        _ => answer,
    };
    // Each skipped branch counts as unreachable (503), which goes upstream as 500 (§16.7).
    expect_status(&answer, 500);
}

/// An upstream CANCEL of a call routed by default.lua reaches the ringing contact.
#[tokio::test]
async fn default_cancel_of_a_ringing_call() {
    let proxy = start_script(&common::default_script_without_auth());
    let mut alice = TestUa::udp("alice").await;
    let mut carol = TestUa::udp("carol").await.via_proxy(proxy.udp);
    let alice_aor = aor("alice", proxy.udp);
    register_self(&mut alice, proxy.udp, &alice_aor).await;

    let invite = carol.invite(&alice_aor).await;
    let incoming = alice.expect_request("INVITE").await;
    alice.respond(&incoming, 180, "Ringing").await;
    carol.expect_response(100).await;
    carol.expect_response(180).await;
    carol.cancel(&invite).await;
    let cancel = alice.expect_request("CANCEL").await;
    assert_eq!(top_branch(&cancel), top_branch(&incoming));
    alice.respond(&cancel, 200, "OK").await;
    alice.respond(&incoming, 487, "Request Terminated").await;
    alice.expect_request("ACK").await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let r = carol.recv_response(WAIT).await;
        got.push((
            r.cseq().unwrap().method.as_str().to_string(),
            r.status().unwrap(),
        ));
    }
    got.sort();
    assert_eq!(
        got,
        vec![("CANCEL".to_string(), 200), ("INVITE".to_string(), 487)]
    );
}

/// `sip.kv` is one store for every event loop: a counter incremented by requests from many
/// sockets (which the kernel spreads over the loops) counts each of them once.
#[tokio::test]
async fn kv_store_is_shared_by_the_event_loops() {
    let dir = TempDir::new().unwrap();
    let script = r#"
function on_request(req)
  if req:header("X-Test") == "read" then
    return req:reply(200, "Count " .. tostring(sip.kv.get("calls")))
  end
  local n = sip.kv.incr("calls")
  sip.kv.set("last", req.from_uri, 60)
  return req:reply(200, "Call " .. n)
end
"#;
    let proxy = start_script(&write_script(&dir, "kv.lua", script));
    let mut seen = Vec::new();
    for i in 0..8 {
        let mut ua = TestUa::udp(&format!("ua{i}")).await.via_proxy(proxy.udp);
        let answer = message_answered(&mut ua, proxy.udp, "", 200).await;
        seen.push(text(answer.reason().unwrap()));
    }
    seen.sort_by_key(|r| r[5..].parse::<u32>().unwrap());
    let expected: Vec<String> = (1..=8).map(|n| format!("Call {n}")).collect();
    assert_eq!(seen, expected);
    let mut reader = TestUa::udp("reader").await.via_proxy(proxy.udp);
    let answer = message_answered(&mut reader, proxy.udp, "read", 200).await;
    assert_eq!(answer.reason(), Some(&b"Count 8"[..]));
}

const FIELDS: &str = r#"
BOB = "@BOB@"

function on_request(req)
  if req:header("X-Test") == "managed" then
    req:set_header("Call-ID", "forged")
  end
  if req:is_method("MESSAGE") then
    return req:reply(200, "Fields", {
      ["X-Method"] = req.method,
      ["X-Ruri"] = req.ruri,
      ["X-Ruri-Parts"] = req.ruri_user .. "|" .. req.ruri_host .. "|" .. tostring(req.ruri_port),
      ["X-From"] = req.from_uri .. "|" .. req.from_tag,
      ["X-To"] = req.to_uri .. "|" .. tostring(req.to_tag),
      ["X-Call"] = req.call_id .. "|" .. req.cseq .. "|" .. req.cseq_method,
      ["X-Source"] = req.transport .. "|" .. req.src_ip .. "|" .. req.src_port,
      ["X-Body"] = req.body,
      ["X-Multi"] = table.concat(req:headers("X-Multi"), "|"),
      ["X-Checks"] = tostring(req:is_myself(req.ruri)) .. "|" .. tostring(req:is_myself(BOB))
        .. "|" .. tostring(req:has_to_tag()) .. "|" .. tostring(req:is_method("message", "INVITE")),
    })
  end
  req.ruri = BOB
  req.ruri_user = "robert"
  req:set_header("Subject", "edited")
  req:remove_header("X-Secret")
  req:append_header("X-Added", "yes")
  return req:t_relay()
end
"#;

/// What `req` shows a script, and what its edits do to the relayed request.
#[tokio::test]
async fn request_fields_and_edits() {
    let dir = TempDir::new().unwrap();
    let mut bob = TestUa::udp("bob").await;
    let script = FIELDS.replace("@BOB@", &bob.uri());
    let proxy = start_script(&write_script(&dir, "fields.lua", &script));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);
    let ruri = format!("sip:someone@{};x=1", proxy.udp);

    let sent = alice
        .request("MESSAGE", &ruri)
        .header("X-Multi", "a")
        .header("X-Multi", "b")
        .body("text/plain", "hello")
        .await;
    let answer = alice.expect_response(200).await;
    let field = |name: &str| header_text(&answer, name).unwrap_or_default();
    assert_eq!(field("X-Method"), "MESSAGE");
    assert_eq!(field("X-Ruri"), ruri);
    assert_eq!(
        field("X-Ruri-Parts"),
        format!("someone|127.0.0.1|{}", proxy.udp.port())
    );
    let from_tag = text(sent.from().unwrap().tag().unwrap());
    assert_eq!(
        field("X-From"),
        format!("sip:alice@{}|{from_tag}", alice.local)
    );
    assert_eq!(field("X-To"), format!("{ruri}|nil"));
    assert_eq!(
        field("X-Call"),
        format!(
            "{}|{}|MESSAGE",
            text(sent.call_id().unwrap()),
            sent.cseq().unwrap().seq
        )
    );
    assert_eq!(
        field("X-Source"),
        format!("udp|127.0.0.1|{}", alice.local.port())
    );
    assert_eq!(field("X-Body"), "hello");
    assert_eq!(field("X-Multi"), "a|b");
    assert_eq!(field("X-Checks"), "true|false|false|true");

    // (An OPTIONS for the server itself is answered by the core: this one is for elsewhere.)
    alice
        .options("sip:someone@example.test")
        .header("Subject", "original")
        .header("X-Secret", "s3cret")
        .await;
    let incoming = bob.expect_request("OPTIONS").await;
    assert_eq!(
        incoming.request_uri_bytes(),
        Some(format!("sip:robert@{}", bob.local).as_bytes()),
        "{}",
        show(&incoming)
    );
    assert_eq!(header_values(&incoming, "Subject"), vec!["edited"]);
    assert!(header_values(&incoming, "X-Secret").is_empty());
    assert_eq!(header_values(&incoming, "X-Added"), vec!["yes"]);
    bob.respond(&incoming, 200, "OK").await;
    alice.expect_response(200).await;

    // Headers the engine owns cannot be edited: the script fails, 500.
    alice
        .request("MESSAGE", &ruri)
        .header("X-Test", "managed")
        .await;
    alice.expect_response(500).await;
}

// ----- 7: hot reload -------------------------------------------------------------------------

#[tokio::test]
async fn reload_switches_versions_and_refuses_broken_scripts() {
    let dir = TempDir::new().unwrap();
    let path = write_script(
        &dir,
        "route.lua",
        "function on_request(req)\n  return req:reply(403)\nend\n",
    );
    let proxy = start_script(&path);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);
    assert_eq!(proxy.host.version(), 1);
    message_answered(&mut alice, proxy.udp, "", 403).await;

    std::fs::write(
        &path,
        "function on_request(req)\n  return req:reply(404, \"Version 2\")\nend\n",
    )
    .unwrap();
    assert_eq!(proxy.host.reload(), Ok(2));
    assert_eq!(proxy.host.version(), 2);
    for _ in 0..4 {
        // Every loop switches at its next request.
        let answer = message_answered(&mut alice, proxy.udp, "", 404).await;
        assert_eq!(answer.reason(), Some(&b"Version 2"[..]));
    }

    // A syntax error: refused with file:line, the running version keeps serving.
    std::fs::write(
        &path,
        "function on_request(req)\n  return req:reply(200)\nend\nthis is not Lua\n",
    )
    .unwrap();
    let error = proxy.host.reload().expect_err("a broken script is refused");
    let shown = error.to_string();
    assert!(
        shown.contains(&format!("{}:4:", path.display())),
        "file:line in {shown:?}"
    );
    assert_eq!(proxy.host.version(), 2);
    message_answered(&mut alice, proxy.udp, "", 404).await;

    // An error in the top-level code: refused too.
    std::fs::write(
        &path,
        "function on_request(req)\n  return req:reply(200)\nend\nlocal x = nil\nx.y = 1\n",
    )
    .unwrap();
    let error = proxy.host.reload().expect_err("top-level error");
    assert!(
        error
            .to_string()
            .contains(&format!("{}:5:", path.display())),
        "{error}"
    );

    // A runaway top level: stopped by the instruction budget, refused.
    std::fs::write(
        &path,
        "function on_request(req)\n  return req:reply(200)\nend\nwhile true do end\n",
    )
    .unwrap();
    let error = proxy.host.reload().expect_err("runaway top level");
    assert!(
        error.to_string().contains("instruction budget exceeded"),
        "{error}"
    );

    // A hook that is not a function: refused.
    std::fs::write(
        &path,
        "function on_request(req)\n  return req:reply(200)\nend\non_failure = 5\n",
    )
    .unwrap();
    let error = proxy.host.reload().expect_err("on_failure = 5");
    assert!(
        error.to_string().contains("on_failure must be a function"),
        "{error}"
    );

    // No on_request: refused.
    std::fs::write(&path, "function on_reply(req, res)\nend\n").unwrap();
    let error = proxy
        .host
        .reload()
        .expect_err("a script without on_request");
    assert!(error.to_string().contains("on_request"), "{error}");

    // A file that is gone: refused.
    std::fs::remove_file(&path).unwrap();
    let error = proxy.host.reload().expect_err("no file");
    assert!(error.to_string().contains("route.lua"), "{error}");

    assert_eq!(proxy.host.version(), 2);
    assert_eq!(proxy.host.reload_counts(), (1, 6));
    for _ in 0..2 {
        let answer = message_answered(&mut alice, proxy.udp, "", 404).await;
        assert_eq!(answer.reason(), Some(&b"Version 2"[..]));
    }

    // Fixed again: version 3.
    std::fs::write(
        &path,
        "function on_request(req)\n  return req:reply(200, \"Version 3\")\nend\n",
    )
    .unwrap();
    assert_eq!(proxy.host.reload(), Ok(3));
    let answer = message_answered(&mut alice, proxy.udp, "", 200).await;
    assert_eq!(answer.reason(), Some(&b"Version 3"[..]));
}

const PINNED_OLD: &str = r#"
function on_request(req)
  req.vars.version = "old"
  return req:t_relay("@BOB@")
end

function on_branch(req, branch)
  branch:append_header("X-Version", req.vars.version)
end

function on_failure(req, res)
  return req:t_relay("@CAROL@")
end
"#;

const PINNED_NEW: &str = r#"
function on_request(req)
  return req:reply(488, "New Version")
end

function on_branch(req, branch)
  branch:append_header("X-Version", "new")
end

function on_failure(req, res)
end
"#;

/// A request keeps the script version that ran its on_request: its failure route and branch
/// hook are the old version's, while new requests get the new version.
#[tokio::test]
async fn reload_keeps_pending_transactions_on_their_version() {
    let dir = TempDir::new().unwrap();
    let mut bob = TestUa::udp("bob").await;
    let mut carol = TestUa::udp("carol").await;
    let (bob_uri, carol_uri) = (bob.uri(), carol.uri());
    let fill = |text: &str| {
        text.replace("@BOB@", &bob_uri)
            .replace("@CAROL@", &carol_uri)
    };
    let path = write_script(&dir, "route.lua", &fill(PINNED_OLD));
    let proxy = start_script(&path);
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);

    let invite = alice.invite(&aor("someone", proxy.udp)).await;
    let in_bob = bob.expect_request("INVITE").await;
    assert_eq!(header_text(&in_bob, "X-Version").as_deref(), Some("old"));
    bob.respond(&in_bob, 180, "Ringing").await;
    alice.expect_response(100).await;
    alice.expect_response(180).await;

    std::fs::write(&path, fill(PINNED_NEW)).unwrap();
    assert_eq!(proxy.host.reload(), Ok(2));
    // New requests get the new version at once.
    let mut dave = TestUa::udp("dave").await.via_proxy(proxy.udp);
    for _ in 0..2 {
        dave.invite(&aor("someone", proxy.udp)).await;
        let refused = dave.expect_final(488).await;
        assert_eq!(refused.reason(), Some(&b"New Version"[..]));
    }

    // The pending INVITE fails at bob: the old version's failure route relays to carol, and
    // the old on_branch marks the new branch.
    bob.respond(&in_bob, 486, "Busy Here").await;
    bob.expect_request("ACK").await;
    let in_carol = carol.expect_request("INVITE").await;
    assert_eq!(in_carol.call_id().unwrap(), invite.call_id().unwrap());
    assert_eq!(
        header_text(&in_carol, "X-Version").as_deref(),
        Some("old"),
        "{}",
        show(&in_carol)
    );
    carol.respond(&in_carol, 200, "OK").await;
    let answer = alice.expect_final(200).await;
    alice.ack_2xx(&answer).await;
    carol.expect_request("ACK").await;

    alice.invite(&aor("someone", proxy.udp)).await;
    alice.expect_final(488).await;
}

// ----- 8: moonroute check / moonroute test ---------------------------------------------------

#[test]
fn check_accepts_the_shipped_scripts() {
    for script in [
        "scripts/default.lua",
        "scripts/redirect.lua",
        "scripts/stateless.lua",
        "tests/data/scripts/vars.lua",
    ] {
        let output = moonroute(&["check", script]);
        assert!(output.status.success(), "{script}: {}", describe(&output));
        let stdout = text(&output.stdout);
        assert!(
            stdout.contains(&format!("{script}: ok (on_request")),
            "{}",
            describe(&output)
        );
    }
}

/// The mistakes issue 24 found `check` saying ok for: each is flagged at its line.
#[test]
fn check_flags_what_only_a_message_would_reveal() {
    let dir = TempDir::new().unwrap();
    let script = write_script(
        &dir,
        "mistakes.lua",
        "function on_request(req)
  if req.method == 'OPTIONS' then
    req:reply(200)
  end
  if req.ruri_usr == 'x' then return req:sl_send_reply(404, 'x') end
  return req:t_relay()
end
function on_faliure(req, res)
end
function on_failure(req, res)
  return req:forward('sip:a@127.0.0.1')
end
",
    );
    let output = moonroute(&["check", script.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = text(&output.stderr);
    let name = script.display();
    for expected in [
        format!("{name}:5: req.ruri_usr: req has no such field or method (did you mean req.ruri_user?)"),
        format!("{name}:5: req:sl_send_reply: req has no such field or method"),
        format!("{name}:6: req:t_relay after req:reply (line 3) on a path that did not return"),
        format!("{name}:8: function on_faliure is not a hook the engine calls (did you mean on_failure?)"),
        format!("{name}:11: req:forward is not available on req in on_failure"),
    ] {
        assert!(stderr.contains(&expected), "{expected}\n{}", describe(&output));
    }
    // errors.lua answers twice on purpose (to test the run-time error): check sees it too.
    let output = moonroute(&["check", "tests/data/scripts/errors.lua"]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(text(&output.stderr).contains("errors.lua:17: req:reply after req:reply (line 16)"));
}

#[test]
fn check_reports_a_broken_script_with_file_and_line() {
    let dir = TempDir::new().unwrap();
    let broken = write_script(
        &dir,
        "broken.lua",
        "function on_request(req)\n  return req:reply(404)\nend)\n",
    );
    let output = moonroute(&["check", broken.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:3:", broken.display())),
        "{}",
        describe(&output)
    );

    let no_hook = write_script(&dir, "no_hook.lua", "local x = 1\n");
    let output = moonroute(&["check", no_hook.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("on_request"),
        "{}",
        describe(&output)
    );

    let output = moonroute(&["check", "tests/data/scripts/does-not-exist.lua"]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
}

#[test]
fn test_command_shows_the_decision_for_a_message() {
    let output = moonroute(&[
        "test",
        "scripts/default.lua",
        "--message",
        "tests/data/scripts/invite.sip",
        "--location",
        "tests/data/scripts/location.txt",
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("decision:  relay"), "{}", describe(&output));
    assert!(
        stdout.contains("record-route: yes"),
        "{}",
        describe(&output)
    );
    let first = stdout.find("sip:bob@127.0.0.1:5080").expect("first target");
    let second = stdout
        .find("sip:bob@127.0.0.1:5081")
        .expect("second target");
    assert!(first < second, "highest q first\n{stdout}");

    // Without the location fixture bob is unknown.
    let output = moonroute(&[
        "test",
        "scripts/default.lua",
        "--message",
        "tests/data/scripts/invite.sip",
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(
        text(&output.stdout).contains("decision:  reply 404 Not Found"),
        "{}",
        describe(&output)
    );
}

/// `--subscribers`: the challenge's nonce (signed with the fixed offline secret) is answered in
/// a second run, and the REGISTER is saved.
#[test]
fn test_command_authenticates_against_a_subscriber_fixture() {
    let run = |message: &str| {
        moonroute(&[
            "test",
            "scripts/default.lua",
            "--message",
            message,
            "--subscribers",
            "tests/data/scripts/subscribers.txt",
        ])
    };
    let output = run("tests/data/scripts/register.sip");
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("decision:  reply 401 Unauthorized (req:auth_challenge)"),
        "{}",
        describe(&output)
    );
    let challenge = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("header:  WWW-Authenticate: "))
        .expect("a challenge");
    let answer = moonroute::auth::digest::answer(
        challenge.as_bytes(),
        &moonroute::auth::digest::Answer {
            username: "alice",
            password: "alice-secret",
            method: "REGISTER",
            uri: "sip:127.0.0.1:5060",
            nc: 1,
            cnonce: "c1",
        },
    )
    .unwrap();
    let register = std::fs::read_to_string(repo_path("tests/data/scripts/register.sip")).unwrap();
    let register = register.replacen(
        "Expires: 600\n",
        &format!("Expires: 600\nAuthorization: {answer}\n"),
        1,
    );
    let dir = TempDir::new().unwrap();
    let answered = write_script(&dir, "answered.sip", &register);
    let output = run(answered.to_str().unwrap());
    assert!(
        text(&output.stdout).contains("decision:  reply 200 OK (req:save)"),
        "{}",
        describe(&output)
    );

    // A broken fixture is refused with its line.
    let broken = write_script(
        &dir,
        "broken.txt",
        "alice@127.0.0.1 pw\nalice-without-domain pw\n",
    );
    let output = moonroute(&[
        "test",
        "scripts/default.lua",
        "--message",
        "tests/data/scripts/register.sip",
        "--subscribers",
        broken.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("subscriber fixture: line 2:"),
        "{}",
        describe(&output)
    );
}

#[test]
fn lua_test_file_passes() {
    let output = moonroute(&["test", "--lua", "tests/data/scripts/default_test.lua"]);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(
        text(&output.stdout).contains("default_test.lua: ok"),
        "{}",
        describe(&output)
    );
}

#[test]
fn lua_test_file_failing_assert_reports_file_and_line() {
    let dir = TempDir::new().unwrap();
    let default = repo_path("scripts/default.lua");
    let test = write_script(
        &dir,
        "failing_test.lua",
        &format!(
            "local r = moonroute.run{{\n  script = {:?},\n  message = [[\n\
             OPTIONS sip:nobody@127.0.0.1:5060 SIP/2.0\n\
             Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-fail\n\
             From: <sip:alice@example.net>;tag=a\n\
             To: <sip:nobody@127.0.0.1:5060>\n\
             Call-ID: fail@127.0.0.1\n\
             CSeq: 1 OPTIONS\n\
             Content-Length: 0\n\
             ]],\n}}\n\
             assert(r.code == 404, \"first\")\n\
             assert(r.decision == \"relay\", \"nobody is relayed\")\n",
            default.display().to_string()
        ),
    );
    let output = moonroute(&["test", "--lua", test.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:14: nobody is relayed", test.display())),
        "{}",
        describe(&output)
    );
}

/// A MESSAGE from `ua` to the proxy carrying X-Hop and X-Test.
async fn message_via(ua: &mut TestUa, proxy: SocketAddr, hop: &str, test: &str) -> Message {
    ua.request("MESSAGE", &aor("anyone", proxy))
        .to(proxy)
        .header("X-Hop", hop)
        .header("X-Test", test)
        .await
}

#[tokio::test]
async fn sip_resolve_suspends_on_request_until_the_answer() {
    let proxy = start_script(&repo_path("tests/data/scripts/resolve.lua"));
    let mut alice = TestUa::udp("alice").await.via_proxy(proxy.udp);
    let mut bob = TestUa::udp("bob").await;
    let bob_hop = format!("sip:{}", bob.local);

    // The answer, as the script sees it.
    message_via(&mut alice, proxy.udp, &bob_hop, "show").await;
    let shown = alice.expect_final(200).await;
    let port = bob.local.port();
    assert_eq!(
        text(shown.reason().unwrap()),
        format!("sip:127.0.0.1:{port};transport=udp|udp|127.0.0.1|{port}")
    );

    // Relayed to the resolved address, once or after two suspensions, with req.vars kept.
    for test in ["relay", "twice"] {
        message_via(&mut alice, proxy.udp, &bob_hop, test).await;
        let incoming = bob.expect_request("MESSAGE").await;
        assert_eq!(header_text(&incoming, "X-Vars").as_deref(), Some("kept"));
        bob.respond(&incoming, 200, "OK").await;
        // on_reply's sip.resolve is an error; the 200 still goes up.
        alice.expect_final(200).await;
    }

    // A bad URI is an error at the script's line: 500, and the server goes on.
    message_via(&mut alice, proxy.udp, &bob_hop, "bad").await;
    alice.expect_final(500).await;
    message_via(&mut alice, proxy.udp, &bob_hop, "show").await;
    alice.expect_final(200).await;
}
