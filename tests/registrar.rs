//! The registrar end to end over the durable location store: the real server routed by
//! `scripts/default.lua` (`req:save()`, `req:lookup()`), with `[location] store = "sled"` in a
//! temporary data directory per test, and test user agents (`tests/common/ua.rs`) on loopback
//! UDP sockets.
//!
//! Covers RFC 3261 §10.3 as a client sees it: register, refresh, unregister, query (with
//! `expires` parameters and a `Date`), several contacts with q values and how a proxied INVITE
//! forks over them, 423 with `Min-Expires`, `Contact: *`, an out-of-order CSeq, expiry, Path
//! (RFC 3327) and bindings that survive a restart of the server on the same data directory.
//!
//! Nothing sleeps to wait for behaviour: every wait is for a message, bounded by a timeout.
//! The one wait for the clock is the expiry test's, whose subject is the clock: it waits for
//! the instant a one-second binding expires, then checks it is gone.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::ua::{expect_status, header_text, show, TestUa, WAIT};
use moonroute::config::{Config, LocationBackend};
use moonroute::location::{LocationStore, SledLocation};
use moonroute::script::ScriptHost;
use moonroute::server::core::CoreFactory;
use moonroute::server::{Server, ServerHandle};
use moonroute::sip::{Contact, HeaderName, Message};
use moonroute::transport::{ListenAddr, TransportKind};
use tempfile::TempDir;

// ----- helpers -------------------------------------------------------------------------------

/// The domain the test servers are responsible for (besides their listen addresses). AORs
/// are in this domain, so they stay "ours" when a restarted server listens on another port.
const DOMAIN: &str = "moonroute.test";

/// A server routed by scripts/default.lua over a sled location store.
struct Running {
    server: ServerHandle,
    host: Arc<ScriptHost>,
    udp: SocketAddr,
}

impl Running {
    /// Stops the server and closes its location store: the event loops are joined, then the
    /// script host (which owns the registrar and its store) is dropped. Asserts that nothing
    /// else kept the store open, so the data directory can be opened again at once.
    fn stop(self) {
        let registrar = self
            .host
            .services()
            .registrar
            .as_ref()
            .expect("the server has a registrar");
        let store = Arc::downgrade(registrar.store());
        drop(self.server);
        drop(self.host);
        assert!(
            store.upgrade().is_none(),
            "the location store must be closed once the server and its script host are gone"
        );
    }
}

/// Two event loops on an ephemeral UDP port of 127.0.0.1, routed by scripts/default.lua,
/// registrations in sled under `data_dir`; no control socket, no file watcher.
fn config(data_dir: &Path) -> Config {
    let mut config = Config {
        listen: vec!["udp:127.0.0.1:0".parse::<ListenAddr>().unwrap()],
        domains: vec![DOMAIN.to_owned()],
        workers: 2,
        script: common::default_script_without_auth(),
        data_dir: data_dir.to_path_buf(),
        ..Config::default()
    };
    config.control.socket = PathBuf::new();
    config.lua.watch = false;
    config.location.store = LocationBackend::Sled;
    config
}

fn start(config: &Config) -> Running {
    let host = ScriptHost::from_config(config).expect("the script and the location store load");
    let factory = CoreFactory::with_router(config, host.router_factory());
    let server = Server::start(config, Arc::new(factory)).expect("server starts");
    Running {
        udp: server.local_addr(TransportKind::Udp).unwrap(),
        server,
        host,
    }
}

/// A server on a fresh data directory; the directory lives as long as the returned `TempDir`.
fn start_fresh() -> (Running, TempDir) {
    let dir = TempDir::new().unwrap();
    (start(&config(dir.path())), dir)
}

fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn aor(user: &str) -> String {
    format!("sip:{user}@{DOMAIN}")
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

/// One binding as a 200 (OK) to a REGISTER lists it (§10.3 step 8).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    uri: String,
    expires: u32,
    /// q in thousandths; 1000 when the Contact has no q.
    q: u16,
}

/// The bindings a 200 lists, in order. Every Contact must carry an `expires` parameter.
fn listed(response: &Message) -> Vec<Listed> {
    response
        .contacts()
        .map(|c| {
            let c = c.unwrap_or_else(|e| panic!("a Contact that parses: {e}\n{}", show(response)));
            let Contact::Addr(addr) = c else {
                panic!("no `*` in a 200\n{}", show(response));
            };
            Listed {
                uri: text(addr.uri.raw()),
                expires: c
                    .expires()
                    .expect("every listed binding has an expires parameter")
                    .expect("a valid expires"),
                q: c.q().map_or(1000, |q| q.expect("a valid q")),
            }
        })
        .collect()
}

/// The binding of `uri` in `bindings`.
fn find<'a>(bindings: &'a [Listed], uri: &str) -> &'a Listed {
    bindings
        .iter()
        .find(|b| b.uri == uri)
        .unwrap_or_else(|| panic!("{uri} is not listed in {bindings:?}"))
}

/// Asserts that `expires` is what was asked for, give or take the seconds the test took.
fn assert_remaining(expires: u32, asked: u32) {
    assert!(
        expires <= asked && expires + 10 >= asked,
        "expires={expires}, registered for {asked}"
    );
}

/// Asserts the 200 carries a `Date` (§20.17) that is the current time in RFC 1123 form.
fn assert_date_now(response: &Message) {
    let date = header_text(response, "Date").expect("a Date in the 200");
    let now = SystemTime::now();
    let around: Vec<String> = (0..=4)
        .map(|s| moonroute::registrar::rfc1123_date(now - Duration::from_secs(s)))
        .collect();
    assert!(
        around.contains(&date),
        "Date {date:?} should be the current time (one of {around:?})"
    );
}

/// A REGISTER being put together; `send` sends it and returns its final response.
struct Register {
    aor: String,
    call_id: String,
    cseq: u32,
    contacts: Vec<String>,
    expires: Option<u32>,
    headers: Vec<(String, String)>,
}

impl Register {
    /// A REGISTER for `aor` with a fresh Call-ID, CSeq 1, no Contact (a query) and no Expires.
    fn new(aor: &str) -> Register {
        Register {
            aor: aor.to_owned(),
            call_id: format!("reg-{}@127.0.0.1", unique()),
            cseq: 1,
            contacts: Vec::new(),
            expires: None,
            headers: Vec::new(),
        }
    }

    /// Adds a Contact field value (`<uri>;params` or `*`).
    fn contact(mut self, value: &str) -> Self {
        self.contacts.push(value.to_owned());
        self
    }

    fn expires(mut self, secs: u32) -> Self {
        self.expires = Some(secs);
        self
    }

    fn call(mut self, call_id: &str, cseq: u32) -> Self {
        self.call_id = call_id.to_owned();
        self.cseq = cseq;
        self
    }

    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sends it from `ua` to `registrar` and returns the answer (there are no provisional
    /// responses to a REGISTER here). Asserts the answer is this request's.
    async fn send(self, ua: &mut TestUa, registrar: SocketAddr) -> Message {
        let request = self.raw(ua.local, registrar, unique());
        ua.send_raw(request.as_bytes(), registrar).await;
        self.answer(ua).await
    }

    /// The request's text, from `local` to `registrar`; `n` makes its branch and From tag.
    fn raw(&self, local: SocketAddr, registrar: SocketAddr, n: u64) -> String {
        let mut request = format!(
            "REGISTER sip:{registrar} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {};branch=z9hG4bK-reg-{n};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <{}>;tag=reg-{n}\r\n\
             To: <{}>\r\n\
             Call-ID: {}\r\n\
             CSeq: {} REGISTER\r\n",
            local, self.aor, self.aor, self.call_id, self.cseq
        );
        for contact in &self.contacts {
            request += &format!("Contact: {contact}\r\n");
        }
        if let Some(expires) = self.expires {
            request += &format!("Expires: {expires}\r\n");
        }
        for (name, value) in &self.headers {
            request += &format!("{name}: {value}\r\n");
        }
        request += "Content-Length: 0\r\n\r\n";
        request
    }

    /// The next response `ua` gets, asserted to answer this request.
    async fn answer(&self, ua: &mut TestUa) -> Message {
        let response = ua.recv_response(WAIT).await;
        let cseq = response.cseq().unwrap();
        assert!(
            text(response.call_id().unwrap()) == self.call_id
                && cseq.seq == self.cseq
                && cseq.method.as_str() == "REGISTER",
            "the answer to the REGISTER {} {}, got\n{}",
            self.call_id,
            self.cseq,
            show(&response)
        );
        response
    }
}

/// A query (REGISTER without Contact, §10.2.3): asserts the 200 and its Date, returns the
/// bindings it lists.
async fn query(ua: &mut TestUa, registrar: SocketAddr, aor: &str) -> Vec<Listed> {
    let ok = Register::new(aor).send(ua, registrar).await;
    expect_status(&ok, 200);
    assert_date_now(&ok);
    listed(&ok)
}

/// Registers `ua`'s own contact for `aor` for `expires` seconds; asserts the 200 and returns
/// the bindings it lists.
async fn register_self(
    ua: &mut TestUa,
    registrar: SocketAddr,
    aor: &str,
    expires: u32,
) -> Vec<Listed> {
    let contact = format!("<{}>", ua.uri());
    let ok = Register::new(aor)
        .contact(&contact)
        .expires(expires)
        .send(ua, registrar)
        .await;
    expect_status(&ok, 200);
    listed(&ok)
}

/// INVITE from `caller` to `request_uri` through the proxy, answered by `callee` (180, 200),
/// ACKed and hung up by the caller; every in-dialog request follows the Record-Route.
async fn call(caller: &mut TestUa, callee: &mut TestUa, request_uri: &str) {
    let invite = caller.invite(request_uri).await;
    let incoming = callee.expect_request("INVITE").await;
    assert_eq!(
        incoming.request_uri_bytes(),
        Some(callee.uri().as_bytes()),
        "the Request-URI is the registered contact\n{}",
        show(&incoming)
    );
    assert_eq!(incoming.call_id().unwrap(), invite.call_id().unwrap());
    assert_eq!(via_count(&incoming), 2, "the proxy's Via on top");
    callee.respond(&incoming, 180, "Ringing").await;
    callee.respond(&incoming, 200, "OK").await;
    caller.expect_response(100).await;
    caller.expect_response(180).await;
    let answer = caller.expect_response(200).await;
    let mut dialog = caller.ack_2xx(&answer).await;
    assert!(!dialog.route_set.is_empty(), "the dialog goes through us");
    callee.expect_request("ACK").await;
    caller.bye(&mut dialog).await;
    let bye = callee.expect_request("BYE").await;
    assert_eq!(via_count(&bye), 2, "the BYE traversed the proxy");
    callee.respond(&bye, 200, "OK").await;
    caller.expect_response(200).await;
}

// ----- register, refresh, unregister, query --------------------------------------------------

/// §10.3 steps 7 and 8, §10.2.3: a binding is added, listed by a query, refreshed, joined by a
/// second one, and removed (Expires header, then `expires` parameter); a query of an AOR
/// without bindings lists nothing, and the user is then unknown to the proxy.
#[tokio::test]
async fn register_refresh_unregister_and_query() {
    let (proxy, _dir) = start_fresh();
    let mut alice = TestUa::udp("alice").await;
    let mut desk = TestUa::udp("alice").await;
    let alice_aor = aor("alice");
    let (mobile_uri, desk_uri) = (alice.uri(), desk.uri());

    // Nothing registered yet: the query lists nothing.
    assert_eq!(query(&mut alice, proxy.udp, &alice_aor).await, vec![]);

    let ok = Register::new(&alice_aor)
        .contact(&format!("<{mobile_uri}>"))
        .expires(600)
        .send(&mut alice, proxy.udp)
        .await;
    expect_status(&ok, 200);
    assert_date_now(&ok);
    assert!(ok.to().unwrap().tag().is_some(), "a To tag\n{}", show(&ok));
    let bindings = listed(&ok);
    assert_eq!(bindings.len(), 1, "{}", show(&ok));
    assert_eq!(bindings[0].uri, mobile_uri);
    assert_eq!(bindings[0].q, 1000);
    assert_remaining(bindings[0].expires, 600);

    let bindings = query(&mut alice, proxy.udp, &alice_aor).await;
    assert_eq!(bindings.len(), 1);
    assert_remaining(find(&bindings, &mobile_uri).expires, 600);

    // A refresh from the same Call-ID with a higher CSeq, for longer: still one binding.
    let call_id = format!("refresh-{}@127.0.0.1", unique());
    let first = Register::new(&alice_aor)
        .call(&call_id, 1)
        .contact(&format!("<{mobile_uri}>"))
        .expires(900)
        .send(&mut alice, proxy.udp)
        .await;
    expect_status(&first, 200);
    let refreshed = Register::new(&alice_aor)
        .call(&call_id, 2)
        .contact(&format!("<{mobile_uri}>"))
        .expires(1800)
        .send(&mut alice, proxy.udp)
        .await;
    expect_status(&refreshed, 200);
    let bindings = listed(&refreshed);
    assert_eq!(bindings.len(), 1, "{}", show(&refreshed));
    assert_remaining(bindings[0].expires, 1800);

    // A second device: no Expires anywhere, so the default (3600); both are listed.
    let ok = Register::new(&alice_aor)
        .contact(&format!("<{desk_uri}>"))
        .send(&mut desk, proxy.udp)
        .await;
    expect_status(&ok, 200);
    let bindings = listed(&ok);
    assert_eq!(bindings.len(), 2, "{}", show(&ok));
    assert_remaining(find(&bindings, &mobile_uri).expires, 1800);
    assert_remaining(find(&bindings, &desk_uri).expires, 3600);

    // Unregister the first with Expires: 0: the 200 lists what is left.
    let ok = Register::new(&alice_aor)
        .contact(&format!("<{mobile_uri}>"))
        .expires(0)
        .send(&mut alice, proxy.udp)
        .await;
    expect_status(&ok, 200);
    let bindings = listed(&ok);
    assert_eq!(bindings.len(), 1, "{}", show(&ok));
    assert_eq!(bindings[0].uri, desk_uri);
    assert_eq!(query(&mut alice, proxy.udp, &alice_aor).await, bindings);

    // Unregister the second with an expires parameter of 0 (it wins over the header field).
    let ok = Register::new(&alice_aor)
        .contact(&format!("<{desk_uri}>;expires=0"))
        .expires(600)
        .send(&mut desk, proxy.udp)
        .await;
    expect_status(&ok, 200);
    assert_eq!(listed(&ok), vec![], "{}", show(&ok));
    assert_eq!(query(&mut alice, proxy.udp, &alice_aor).await, vec![]);

    let mut carol = TestUa::udp("carol").await.via_proxy(proxy.udp);
    carol.invite(&alice_aor).await;
    carol.expect_final(404).await;
}

/// One REGISTER with several contacts and q values: the 200 lists them all, each with its q
/// (written only when below 1); a later REGISTER with one more contact lists all four.
#[tokio::test]
async fn several_contacts_with_q_values_are_all_listed() {
    let (proxy, _dir) = start_fresh();
    let mut ua = TestUa::udp("bob").await;
    let bob = aor("bob");
    let contacts = [
        ("sip:bob@127.0.0.1:7001", "", 1000),
        ("sip:bob@127.0.0.1:7002", ";q=0.5", 500),
        ("sip:bob@127.0.0.1:7003;transport=tcp", ";q=0.25", 250),
    ];
    let mut register = Register::new(&bob).expires(600);
    for (uri, params, _) in &contacts {
        register = register.contact(&format!("<{uri}>{params}"));
    }
    let ok = register.send(&mut ua, proxy.udp).await;
    expect_status(&ok, 200);
    let bindings = listed(&ok);
    assert_eq!(bindings.len(), 3, "{}", show(&ok));
    for (uri, _, q) in &contacts {
        let b = find(&bindings, uri);
        assert_eq!(b.q, *q, "{b:?}");
        assert_remaining(b.expires, 600);
    }
    let values = header_values(&ok, "Contact");
    assert!(
        values
            .iter()
            .any(|v| v.starts_with("<sip:bob@127.0.0.1:7002>") && v.ends_with(";q=0.5")),
        "{values:?}"
    );
    assert!(
        values
            .iter()
            .any(|v| v.starts_with("<sip:bob@127.0.0.1:7001>") && !v.contains(";q=")),
        "q=1 is not written: {values:?}"
    );

    let ok = Register::new(&bob)
        .contact("<sip:bob@127.0.0.1:7004>;q=0.75")
        .expires(300)
        .send(&mut ua, proxy.udp)
        .await;
    expect_status(&ok, 200);
    let bindings = listed(&ok);
    assert_eq!(bindings.len(), 4, "{}", show(&ok));
    assert_eq!(find(&bindings, "sip:bob@127.0.0.1:7004").q, 750);
    assert_remaining(find(&bindings, "sip:bob@127.0.0.1:7004").expires, 300);
    assert_remaining(find(&bindings, "sip:bob@127.0.0.1:7001").expires, 600);
    assert_eq!(query(&mut ua, proxy.udp, &bob).await.len(), 4);
}

// ----- lookup: forking by q ------------------------------------------------------------------

/// Two contacts of equal q ring in parallel (§16.6 with lookup's order); the 200 of one
/// cancels the other.
#[tokio::test]
async fn lookup_forks_in_parallel_for_equal_q() {
    let (proxy, _dir) = start_fresh();
    let mut first = TestUa::udp("alice").await;
    let mut second = TestUa::udp("alice").await;
    let mut carol = TestUa::udp("carol").await.via_proxy(proxy.udp);
    let alice_aor = aor("alice");
    register_self(&mut first, proxy.udp, &alice_aor, 600).await;
    let bindings = register_self(&mut second, proxy.udp, &alice_aor, 600).await;
    assert_eq!(bindings.len(), 2, "{bindings:?}");

    carol.invite(&alice_aor).await;
    let in1 = first.expect_request("INVITE").await;
    let in2 = second.expect_request("INVITE").await;
    assert_eq!(in1.request_uri_bytes(), Some(first.uri().as_bytes()));
    assert_eq!(in2.request_uri_bytes(), Some(second.uri().as_bytes()));
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

/// Asserts that `ua` has not been sent anything before a MESSAGE that `marker` sends to it
/// now: the proxy sends the copies of one fork together, so a copy for `ua` would already
/// be in its socket before the marker.
async fn nothing_rang(marker: &mut TestUa, ua: &mut TestUa, what: &str) {
    marker
        .request("MESSAGE", &ua.uri())
        .header("X-Marker", what)
        .await;
    let next = ua.recv_request(WAIT).await;
    assert_eq!(
        next.method().unwrap().as_str(),
        "MESSAGE",
        "{what}: must not ring yet, got\n{}",
        show(&next)
    );
    ua.respond(&next, 200, "OK").await;
    marker.expect_response(200).await;
}

/// Contacts of different q are tried one after the other, highest first, whatever order they
/// were registered in (§16.6, §8.1.3.4): a lower one only rings once the higher ones failed.
#[tokio::test]
async fn lookup_forks_serially_by_decreasing_q() {
    let (proxy, _dir) = start_fresh();
    let mut high = TestUa::udp("alice").await;
    let mut middle = TestUa::udp("alice").await;
    let mut low = TestUa::udp("alice").await;
    let mut marker = TestUa::udp("marker").await;
    let mut carol = TestUa::udp("carol").await.via_proxy(proxy.udp);
    let alice_aor = aor("alice");
    // Registered lowest first, in two REGISTERs.
    let ok = Register::new(&alice_aor)
        .contact(&format!("<{}>;q=0.2", low.uri()))
        .contact(&format!("<{}>;q=0.6", middle.uri()))
        .expires(600)
        .send(&mut low, proxy.udp)
        .await;
    expect_status(&ok, 200);
    let ok = Register::new(&alice_aor)
        .contact(&format!("<{}>;q=0.9", high.uri()))
        .expires(600)
        .send(&mut high, proxy.udp)
        .await;
    expect_status(&ok, 200);
    assert_eq!(listed(&ok).len(), 3, "{}", show(&ok));

    let invite = carol.invite(&alice_aor).await;
    let in1 = high.expect_request("INVITE").await;
    assert_eq!(in1.request_uri_bytes(), Some(high.uri().as_bytes()));
    nothing_rang(&mut marker, &mut middle, "q=0.6 while q=0.9 rings").await;
    nothing_rang(&mut marker, &mut low, "q=0.2 while q=0.9 rings").await;
    high.respond(&in1, 486, "Busy Here").await;
    high.expect_request("ACK").await;

    let in2 = middle.expect_request("INVITE").await;
    assert_eq!(in2.request_uri_bytes(), Some(middle.uri().as_bytes()));
    nothing_rang(&mut marker, &mut low, "q=0.2 while q=0.6 rings").await;
    middle.respond(&in2, 480, "Temporarily Unavailable").await;
    middle.expect_request("ACK").await;

    let in3 = low.expect_request("INVITE").await;
    assert_eq!(in3.request_uri_bytes(), Some(low.uri().as_bytes()));
    assert_ne!(top_branch(&in1), top_branch(&in3));
    low.respond(&in3, 200, "OK").await;
    let answer = carol.expect_final(200).await;
    assert_eq!(answer.call_id().unwrap(), invite.call_id().unwrap());
    carol.ack_2xx(&answer).await;
    low.expect_request("ACK").await;
}

// ----- refusals ------------------------------------------------------------------------------

/// §10.3 step 7: a non-zero expiry under `min_expires` (60 by default) gets 423 with
/// `Min-Expires`, and nothing of that REGISTER is stored (all or nothing); one above
/// `max_expires` is lowered to it.
#[tokio::test]
async fn interval_too_brief_gets_423_with_min_expires() {
    let (proxy, _dir) = start_fresh();
    let mut ua = TestUa::udp("dave").await;
    let dave = aor("dave");

    let brief = Register::new(&dave)
        .contact("<sip:dave@127.0.0.1:7001>")
        .expires(30)
        .send(&mut ua, proxy.udp)
        .await;
    expect_status(&brief, 423);
    assert_eq!(header_text(&brief, "Min-Expires").as_deref(), Some("60"));
    assert_eq!(
        header_values(&brief, "Contact"),
        Vec::<String>::new(),
        "{}",
        show(&brief)
    );

    // One brief contact among good ones refuses the whole request.
    let mixed = Register::new(&dave)
        .contact("<sip:dave@127.0.0.1:7002>")
        .contact("<sip:dave@127.0.0.1:7003>;expires=59")
        .expires(600)
        .send(&mut ua, proxy.udp)
        .await;
    expect_status(&mixed, 423);
    assert_eq!(header_text(&mixed, "Min-Expires").as_deref(), Some("60"));
    assert_eq!(query(&mut ua, proxy.udp, &dave).await, vec![]);

    // min_expires itself is fine; far too long is lowered to max_expires (86400).
    let ok = Register::new(&dave)
        .contact("<sip:dave@127.0.0.1:7004>;expires=60")
        .contact("<sip:dave@127.0.0.1:7005>;expires=1000000")
        .send(&mut ua, proxy.udp)
        .await;
    expect_status(&ok, 200);
    let bindings = listed(&ok);
    assert_remaining(find(&bindings, "sip:dave@127.0.0.1:7004").expires, 60);
    assert_remaining(find(&bindings, "sip:dave@127.0.0.1:7005").expires, 86400);
}

/// §10.3 step 6: `Contact: *` with `Expires: 0` removes every binding of the AOR; without
/// `Expires: 0`, or together with another Contact, it is a 400 and nothing changes.
#[tokio::test]
async fn contact_star_with_expires_zero_removes_all() {
    let (proxy, _dir) = start_fresh();
    let mut ua = TestUa::udp("erin").await;
    let erin = aor("erin");
    let other = aor("frank");
    let ok = Register::new(&erin)
        .contact("<sip:erin@127.0.0.1:7001>")
        .contact("<sip:erin@127.0.0.1:7002>;q=0.5")
        .expires(600)
        .send(&mut ua, proxy.udp)
        .await;
    expect_status(&ok, 200);
    let before = listed(&ok);
    assert_eq!(before.len(), 2);
    register_self(&mut ua, proxy.udp, &other, 600).await;

    for (what, register) in [
        ("no Expires", Register::new(&erin).contact("*")),
        ("Expires: 5", Register::new(&erin).contact("*").expires(5)),
        (
            "* and another Contact",
            Register::new(&erin)
                .contact("*")
                .contact("<sip:erin@127.0.0.1:7003>")
                .expires(0),
        ),
    ] {
        let refused = register.send(&mut ua, proxy.udp).await;
        assert_eq!(refused.status(), Some(400), "{what}: {}", show(&refused));
        assert_eq!(header_values(&refused, "Contact"), Vec::<String>::new());
        let now = query(&mut ua, proxy.udp, &erin).await;
        assert_eq!(now.len(), 2, "{what}: nothing removed, {now:?}");
    }

    let ok = Register::new(&erin)
        .contact("*")
        .expires(0)
        .send(&mut ua, proxy.udp)
        .await;
    expect_status(&ok, 200);
    assert_eq!(listed(&ok), vec![], "{}", show(&ok));
    assert_date_now(&ok);
    assert_eq!(query(&mut ua, proxy.udp, &erin).await, vec![]);
    // Another AOR is not touched.
    assert_eq!(query(&mut ua, proxy.udp, &other).await.len(), 1);
}

/// §10.3 step 7: a REGISTER with the Call-ID of a binding and a lower CSeq than the one that
/// wrote it is out of order: 500, and the bindings stay as they were (neither removed nor
/// refreshed). A higher CSeq then works.
#[tokio::test]
async fn same_call_id_with_lower_cseq_is_refused() {
    let (proxy, _dir) = start_fresh();
    let mut ua = TestUa::udp("gina").await;
    let gina = aor("gina");
    let contact = "<sip:gina@127.0.0.1:7001>";
    let call_id = format!("ordered-{}@127.0.0.1", unique());
    let ok = Register::new(&gina)
        .call(&call_id, 5)
        .contact(contact)
        .expires(600)
        .send(&mut ua, proxy.udp)
        .await;
    expect_status(&ok, 200);
    let before = listed(&ok);

    let removal = Register::new(&gina)
        .call(&call_id, 4)
        .contact(contact)
        .expires(0)
        .send(&mut ua, proxy.udp)
        .await;
    expect_status(&removal, 500);
    let refresh = Register::new(&gina)
        .call(&call_id, 3)
        .contact(contact)
        .expires(3000)
        .send(&mut ua, proxy.udp)
        .await;
    expect_status(&refresh, 500);
    let star = Register::new(&gina)
        .call(&call_id, 2)
        .contact("*")
        .expires(0)
        .send(&mut ua, proxy.udp)
        .await;
    expect_status(&star, 500);

    let now = query(&mut ua, proxy.udp, &gina).await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0].uri, before[0].uri);
    assert_remaining(now[0].expires, 600);

    let ok = Register::new(&gina)
        .call(&call_id, 6)
        .contact(contact)
        .expires(0)
        .send(&mut ua, proxy.udp)
        .await;
    expect_status(&ok, 200);
    assert_eq!(listed(&ok), vec![]);
}

/// A retransmitted REGISTER (the same datagram again, after its 200) gets the same answer and
/// changes nothing. The registrar keeps no transaction once it has answered (like Kamailio's
/// stateless reply), so the copy runs the script again and the registrar recognizes the
/// request it already applied by its Call-ID and CSeq.
#[tokio::test]
async fn a_retransmitted_register_gets_the_same_answer() {
    let (proxy, _dir) = start_fresh();
    // A plain socket: a test UA would absorb the second 200 as a retransmission.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = socket.local_addr().unwrap();
    let contact = format!("sip:rita@{local}");
    let rita = aor("rita");
    let raw = Register::new(&rita)
        .contact(&format!("<{contact}>"))
        .expires(600)
        .raw(local, proxy.udp, unique());
    let mut answers = Vec::new();
    for _ in 0..2 {
        socket.send_to(raw.as_bytes(), proxy.udp).await.unwrap();
        let mut buf = vec![0; 65536];
        let (n, _) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
            .await
            .expect("an answer to the REGISTER")
            .unwrap();
        buf.truncate(n);
        answers.push(Message::parse(bytes::Bytes::from(buf)).unwrap());
    }
    let (first, second) = (&answers[0], &answers[1]);
    expect_status(first, 200);
    expect_status(second, 200);
    assert_eq!(first.to().unwrap().tag(), second.to().unwrap().tag());
    let uris = |m: &Message| listed(m).into_iter().map(|l| l.uri).collect::<Vec<_>>();
    assert_eq!(uris(first), std::slice::from_ref(&contact));
    assert_eq!(uris(second), [contact]);
    let mut ua = TestUa::udp("rita").await;
    assert_eq!(query(&mut ua, proxy.udp, &rita).await.len(), 1);
}

// ----- expiry --------------------------------------------------------------------------------

/// A binding registered for one second disappears from queries (and from lookup) once it
/// has expired, while a longer one of the same AOR stays.
#[tokio::test]
async fn expired_binding_disappears() {
    let dir = TempDir::new().unwrap();
    let mut config = config(dir.path());
    config.registrar.min_expires = 1;
    let proxy = start(&config);
    let mut short = TestUa::udp("hank").await;
    let mut long = TestUa::udp("hank").await;
    let hank = aor("hank");

    // The server counts the second from when it handled the REGISTER, which is before the
    // 200 arrives here: one second after the 200 arrived, the binding has expired.
    let ok = Register::new(&hank)
        .contact(&format!("<{}>;expires=1", short.uri()))
        .contact(&format!("<{}>;expires=600", long.uri()))
        .send(&mut short, proxy.udp)
        .await;
    let expired_at = tokio::time::Instant::now() + Duration::from_secs(1);
    expect_status(&ok, 200);
    let bindings = listed(&ok);
    assert_eq!(find(&bindings, &short.uri()).expires, 1, "{bindings:?}");
    assert_remaining(find(&bindings, &long.uri()).expires, 600);

    // What is under test here is the clock itself: wait for the expiry instant (no sweep has
    // to run: a binding leaves lookups the moment it expires), then query once.
    tokio::time::sleep_until(expired_at).await;
    let remaining = query(&mut short, proxy.udp, &hank).await;
    assert_eq!(
        remaining.len(),
        1,
        "the expires=1 binding should be gone once its second is over: {remaining:?}"
    );
    assert_eq!(remaining[0].uri, long.uri());

    // The proxy no longer rings it: the INVITE reaches the long-lived contact only.
    let mut carol = TestUa::udp("carol").await.via_proxy(proxy.udp);
    carol.invite(&hank).await;
    let incoming = long.expect_request("INVITE").await;
    long.respond(&incoming, 486, "Busy Here").await;
    long.expect_request("ACK").await;
    carol.expect_final(486).await;
    let mut marker = TestUa::udp("marker").await;
    nothing_rang(&mut marker, &mut short, "the expired contact").await;
}

// ----- Path ----------------------------------------------------------------------------------

/// RFC 3327: the Path of a REGISTER is echoed in its 200 and stored with the binding, so a
/// request for the AOR goes through the edge proxy the UA registered through: the INVITE
/// reaches the edge with the contact as Request-URI and the Path as its Route.
#[tokio::test]
async fn path_is_echoed_and_stored() {
    let (proxy, _dir) = start_fresh();
    let mut ivan = TestUa::udp("ivan").await;
    let mut edge = TestUa::udp("edge").await;
    let ivan_aor = aor("ivan");
    let path = format!("<sip:edge@{};lr>", edge.local);

    let ok = Register::new(&ivan_aor)
        .contact(&format!("<{}>", ivan.uri()))
        .expires(600)
        .header("Path", &path)
        .header("Supported", "path")
        .send(&mut ivan, proxy.udp)
        .await;
    expect_status(&ok, 200);
    assert_eq!(
        header_values(&ok, "Path"),
        vec![path.clone()],
        "{}",
        show(&ok)
    );
    assert_eq!(listed(&ok).len(), 1);

    // A query (no Path of its own) still lists the binding.
    assert_eq!(query(&mut ivan, proxy.udp, &ivan_aor).await.len(), 1);

    let mut carol = TestUa::udp("carol").await.via_proxy(proxy.udp);
    carol.invite(&ivan_aor).await;
    let incoming = edge.expect_request("INVITE").await;
    assert_eq!(
        incoming.request_uri_bytes(),
        Some(ivan.uri().as_bytes()),
        "the Request-URI is the contact\n{}",
        show(&incoming)
    );
    let routes = header_values(&incoming, "Route");
    assert_eq!(
        routes.first(),
        Some(&path),
        "the stored Path is the Route\n{}",
        show(&incoming)
    );
    edge.respond(&incoming, 486, "Busy Here").await;
    edge.expect_request("ACK").await;
    carol.expect_final(486).await;
}

// ----- restart -------------------------------------------------------------------------------

/// Bindings are durable: a server is stopped (its store closed), the data directory opens
/// again directly, and a new server on the same directory lists the bindings with their
/// remaining expiry and routes calls to them.
#[tokio::test]
async fn bindings_survive_a_restart() {
    let dir = TempDir::new().unwrap();
    let config = config(dir.path());
    let mut alice = TestUa::udp("alice").await;
    let mut bob = TestUa::udp("bob").await;
    let (alice_aor, bob_aor) = (aor("alice"), aor("bob"));
    let edge = "<sip:edge@127.0.0.1:7999;lr>";

    let first = start(&config);
    register_self(&mut alice, first.udp, &alice_aor, 600).await;
    let ok = Register::new(&bob_aor)
        .contact(&format!("<{}>;q=0.5", bob.uri()))
        .expires(1200)
        .header("Path", edge)
        .header("User-Agent", "restart-test/1")
        .send(&mut bob, first.udp)
        .await;
    expect_status(&ok, 200);
    let first_addr = first.udp;
    first.stop();

    // The directory opens again at once, with both bindings and what they recorded.
    {
        let (store, report) = SledLocation::open(
            &dir.path().join("location"),
            1000,
            1 << 20,
            SystemTime::now(),
        )
        .expect("the data directory opens again once the server is gone");
        assert_eq!(
            (report.aors, report.bindings, report.expired, report.corrupt),
            (2, 2, 0, 0),
            "{report:?}"
        );
        let now = SystemTime::now();
        let a = store.lookup(&alice_aor, now);
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0].contact, alice.uri());
        assert_eq!(a[0].received, Some((TransportKind::Udp, alice.local)));
        assert_eq!(a[0].local, Some(first_addr));
        let b = store.lookup(&bob_aor, now);
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].contact, bob.uri());
        assert_eq!(b[0].q, 500);
        assert_eq!(b[0].path, vec![edge.to_owned()]);
        assert_eq!(b[0].user_agent.as_deref(), Some("restart-test/1"));
        assert_eq!(b[0].cseq, 1);
    }

    let second = start(&config);
    assert_ne!(second.udp, first_addr, "a new server, on a new port");
    let bindings = query(&mut alice, second.udp, &alice_aor).await;
    assert_eq!(bindings.len(), 1, "{bindings:?}");
    assert_eq!(bindings[0].uri, alice.uri());
    assert_remaining(bindings[0].expires, 600);
    let bindings = query(&mut bob, second.udp, &bob_aor).await;
    assert_eq!(bindings.len(), 1, "{bindings:?}");
    assert_eq!(bindings[0].uri, bob.uri());
    assert_eq!(bindings[0].q, 500);
    assert_remaining(bindings[0].expires, 1200);

    let mut carol = TestUa::udp("carol").await.via_proxy(second.udp);
    call(&mut carol, &mut alice, &alice_aor).await;

    // Changes made after the restart are durable too.
    let ok = Register::new(&alice_aor)
        .contact(&format!("<{}>", alice.uri()))
        .expires(0)
        .send(&mut alice, second.udp)
        .await;
    expect_status(&ok, 200);
    second.stop();
    let third = start(&config);
    assert_eq!(query(&mut alice, third.udp, &alice_aor).await, vec![]);
    assert_eq!(query(&mut bob, third.udp, &bob_aor).await.len(), 1);
}
